"""`python -m jit_unlearn.cli`: the `jit-unlearn` command."""

import sys

from .commands import main

sys.exit(main())
