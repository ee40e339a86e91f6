"""Loads the compiled extension and decides which tier runs each op.

Tiers: compiled CUDA kernels -> compiled C++ CPU kernels -> pure PyTorch (jit_unlearn.reference).
`JIT_UNLEARN_BACKEND=torch` (or `force_backend("torch")`) forces the pure-PyTorch tier.
"""
from __future__ import annotations

import os
import warnings

import torch

_LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading registers torch.ops.jit_unlearn.*)

    _LOADED = True
except ImportError as exc:  # the package works without it, on the reference tier
    _LOADED = False
    _LOAD_ERROR = str(exc)

_VALID = ("auto", "compiled", "torch")
OPS = ("perturb", "_perturb_out", "lipschitz_ratio", "_lipschitz_ratio_backward", "_lipschitz_ratio_and_grad",
       "accumulate_importance_", "ssd_dampen_", "masked_reset_")
_forced: str | None = None


def _requested() -> str:
    if _forced is not None:
        return _forced
    value = os.environ.get("JIT_UNLEARN_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID:
        warnings.warn(f"JIT_UNLEARN_BACKEND={value!r} is not one of {_VALID}; using 'auto'", stacklevel=3)
        return "auto"
    return value


def force_backend(name: str | None) -> None:
    """Force a tier for every later op call: "compiled", "torch", or None/"auto" to choose freely.

    "compiled" raises at call time when the compiled kernel for the tensor's device is missing."""
    global _forced
    if name is not None and name not in _VALID:
        raise ValueError(f"backend: expected one of {_VALID} or None, got {name!r}")
    _forced = None if name in (None, "auto") else name


def extension_loaded() -> bool:
    return _LOADED


def _probe_kernels(key: str) -> bool:
    # A tier is usable only when every op has a kernel for the device.
    return _LOADED and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_unlearn::{op}", key) for op in OPS)


# Probed once: the kernels register when _C loads.  A plain dict lookup, unlike the probe itself,
# is traceable by torch.compile(fullgraph=True) through jit_unlearn.ops.
_HAS_KERNEL = {"cpu": _probe_kernels("CPU"), "cuda": _probe_kernels("CUDA")}


def has_kernel(device_type: str) -> bool:
    """True when the compiled extension has a kernel for every op on `device_type` ("cpu" or "cuda")."""
    return _HAS_KERNEL.get(device_type, False)


def use_compiled(device: torch.device) -> bool:
    """Whether ops on `device` run the compiled kernels (True) or the pure-PyTorch tier (False)."""
    requested = _requested()
    if requested == "torch":
        return False
    available = has_kernel(device.type)
    if requested == "compiled" and not available:
        raise RuntimeError(
            f"jit_unlearn: the compiled backend was requested but no compiled kernel exists for device "
            f"'{device.type}'" + (f" (extension failed to load: {_LOAD_ERROR})" if _LOAD_ERROR else "")
            + ". Rebuild with `pip install --no-build-isolation -e .` (FORCE_CUDA=1 for CUDA).")
    return available


def backend_name(device: torch.device | str = "cpu") -> str:
    """Name of the tier that runs ops on `device`: "cuda", "cpu" (compiled) or "torch"."""
    device = torch.device(device)
    if not use_compiled(device):
        return "torch"
    return device.type


def backend_info() -> dict:
    """Which tiers are compiled and which will run.

    Returns a dict: extension_loaded, load_error, compiled_cpu, compiled_cuda, cuda_available,
    requested (auto/compiled/torch) and active ({"cpu": tier, "cuda": tier or None})."""
    info = {
        "extension_loaded": _LOADED,
        "load_error": _LOAD_ERROR,
        "compiled_cpu": has_kernel("cpu"),
        "compiled_cuda": has_kernel("cuda"),
        "cuda_available": torch.cuda.is_available(),
        "requested": _requested(),
    }
    active = {}
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            active[dev] = None
            continue
        try:
            active[dev] = backend_name(dev)
        except RuntimeError:
            active[dev] = "unavailable"
    info["active"] = active
    return info
