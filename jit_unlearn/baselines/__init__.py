"""The comparison baselines of the unlearning literature, on the package's fine-tuning loop.

Every function is called as the methods are, `fn(model, forget, retain, *, ..., seed, progress)`,
changes `model` in place and returns a `BaselineReport` (with `seconds`).  Arguments are checked
before anything changes, and on any failure the model is restored bitwise.  Sources, defaults and
what was changed for this package: docs/BASELINES.md.
"""

from ._common import BaselineReport
from .bad_teacher import bad_teacher
from .finetune import finetune
from .neggrad_plus import neggrad_plus
from .random_label import random_label
from .scrub import scrub

__all__ = ["BaselineReport", "finetune", "neggrad_plus", "random_label", "bad_teacher", "scrub"]
