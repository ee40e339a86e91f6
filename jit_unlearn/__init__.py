"""jit_unlearn: fast machine unlearning for trained PyTorch classifiers.

Methods: `jit` (zero-shot Lipschitz smoothing), `ssd`, `lf_ssd`, `assd` (selective synaptic
dampening), `del_unlearn` (localize, reset, fine-tune).  Fused ops live in `jit_unlearn.ops` and,
when the extension is compiled, in `torch.ops.jit_unlearn`.
"""
from __future__ import annotations

import importlib

from . import ops
from ._backend import backend_info, force_backend
# Imported eagerly: the submodule `importances` shares its name with the function, and a later
# `import jit_unlearn.importances` must not rebind `jit_unlearn.importances` to the module.
from .importances import Importances, importances

__version__ = "0.1.0"

# Public names -> the module that defines them; imported on first use.
_LAZY = {
    "jit": ".methods.jit",
    "JiTReport": ".methods.jit",
    "importances": ".importances",
    "Importances": ".importances",
    "dampen_": ".methods.ssd",
    "ssd": ".methods.ssd",
    "lf_ssd": ".methods.ssd",
    "assd": ".methods.ssd",
    "assd_alpha": ".methods.ssd",
    "localize": ".methods.del_",
    "Mask": ".methods.del_",
    "del_unlearn": ".methods.del_",
    "masked_finetune": ".methods.del_",
}

__all__ = ["ops", "backend_info", "force_backend", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jit_unlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
