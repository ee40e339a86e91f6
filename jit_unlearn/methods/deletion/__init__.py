"""DEL (Deletion by Example Localization, docs/METHODS.md §3): localize the parameters most critical to
the forget set (`localize.py`), reset them to a fresh initialisation and fine-tune only them on the
retain set (`finetune.py`; its loop, `sgd_loop.py`, also takes a custom `FinetuneObjective`, `objective.py`), driven by
`del_unlearn` (`unlearn.py`); the selection is a `Mask` (`mask.py`).
`mode="reference"` runs the published code's versions of these steps (`reference.py`)."""

from .finetune import OBJECTIVES, FinetuneReport, masked_finetune
from .localize import CRITERIA, GRANULARITIES, localize
from .mask import Mask
from .objective import FinetuneObjective
from .unlearn import DELReport, del_unlearn

__all__ = [
    "Mask",
    "localize",
    "masked_finetune",
    "FinetuneObjective",
    "del_unlearn",
    "DELReport",
    "FinetuneReport",
    "CRITERIA",
    "GRANULARITIES",
    "OBJECTIVES",
]
