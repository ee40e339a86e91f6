"""jit_unlearn: fast machine unlearning for trained PyTorch classifiers.

Methods: `jit` (zero-shot Lipschitz smoothing), `ssd`, `lf_ssd`, `assd` (selective synaptic
dampening), `del_unlearn` (localize, reset, fine-tune); the literature's comparison baselines in
`jit_unlearn.baselines` (docs/BASELINES.md).  Fused ops live in `jit_unlearn.ops` and,
when the compiled library is loaded, in `torch.ops.jit_unlearn`.  The maths of every method is in
docs/METHODS.md.  Submodules (`eval`, `data`, `models`, `methods`, `distributed`, `cli`, ...) are
importable as attributes after `import jit_unlearn`.
"""

from __future__ import annotations

import importlib

from . import ops
from ._backend import backend_info, force_backend, load_library

__version__ = "0.1.0"

# Public names -> the module that defines them; imported on first use.
_LAZY = {
    "jit": ".methods.jit",
    "JiTReport": ".methods.jit",
    "importances": ".importance",
    "Importances": ".importance",
    "dampen_": ".methods.ssd",
    "ssd": ".methods.ssd",
    "lf_ssd": ".methods.ssd",
    "assd": ".methods.ssd",
    "assd_alpha": ".methods.ssd",
    "SSDReport": ".methods.ssd",
    "localize": ".methods.deletion",
    "Mask": ".methods.deletion",
    "del_unlearn": ".methods.deletion",
    "masked_finetune": ".methods.deletion",
    "FinetuneObjective": ".methods.deletion",
    "DELReport": ".methods.deletion",
    "FinetuneReport": ".methods.deletion",
}
# Submodules reachable as attributes without an explicit import, as torch does for its own.
_SUBMODULES = ("baselines", "cli", "data", "distributed", "eval", "importance", "methods", "models", "torch_ops")

__all__ = ["ops", "backend_info", "force_backend", "load_library", *_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # importing binds the attribute
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jit_unlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
