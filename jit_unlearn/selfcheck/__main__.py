"""`python -m jit_unlearn.selfcheck`: see jit_unlearn.selfcheck."""

import sys

from . import main

sys.exit(main())
