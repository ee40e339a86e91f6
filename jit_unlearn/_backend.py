"""Loads the compiled library, decides which tier runs each op, and hands out the kernels.

Tiers: compiled CUDA kernels -> compiled C++ CPU kernels -> pure PyTorch (`jit_unlearn.torch_ops`).
`JIT_UNLEARN_BACKEND=torch` (or `force_backend("torch")`) forces the pure-PyTorch tier.

The library is found by path, as a file `_C<suffix>` next to this module for one of the
interpreter's extension suffixes, and loaded with `torch.ops.load_library`; the package never
imports it as a module.  `JIT_UNLEARN_LIBRARY=<path>` loads another build instead (a CMake build,
say), and `load_library(path)` loads one into a process whose package has none.  Loading registers
the fake kernels and autograd formulas of `_registrations` once, whichever file the ops came from.
"""

from __future__ import annotations

import importlib.machinery
import os
import warnings
from collections.abc import Callable

import torch

from . import _registrations, torch_ops

__all__ = ["OPS", "kernel", "load_library", "backend_info", "backend_name", "force_backend", "has_kernel"]

OPS = (
    "perturb",
    "_perturb_out",
    "lipschitz_ratio",
    "_lipschitz_ratio_backward",
    "_lipschitz_ratio_and_grad",
    "accumulate_importance_",
    "ssd_dampen_",
    "masked_reset_",
)
LIBRARY_ENV = "JIT_UNLEARN_LIBRARY"
_VALID = ("auto", "compiled", "torch")

# The pure-PyTorch function of every op (a private op's function drops the leading underscore).
_TORCH_TIER: dict[str, Callable] = {op: getattr(torch_ops, op.lstrip("_")) for op in OPS}
# Filled when a library loads: the compiled overloads, and whether every op has a kernel per device.
# Plain dict lookups, unlike the dispatcher probe, are traceable by torch.compile(fullgraph=True).
_COMPILED: dict[str, Callable] = {}
_HAS_KERNEL = {"cpu": False, "cuda": False}
_library_path: str | None = None
_load_error: str | None = None
_forced: str | None = None
_warned_values: set[str] = set()  # JIT_UNLEARN_BACKEND values already warned about (once per process)


def find_library(directory: str | None = None) -> str | None:
    """Path of the compiled library `_C<suffix>` in `directory` (default: the package folder), or None."""
    directory = os.path.dirname(os.path.abspath(__file__)) if directory is None else directory
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(directory, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def _probe(dispatch_key: str) -> bool:
    # A tier is usable only when every op has a kernel for the device.
    return all(
        op in _COMPILED and torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_unlearn::{op}", dispatch_key)
        for op in OPS
    )


def load_library(path: str | os.PathLike) -> None:
    """Load a compiled jit_unlearn library (built by setup.py or CMake) and use its kernels.

    Registers the ops' fake kernels and autograd formulas (once per process) and probes which
    devices have kernels.  Loading the file that is already loaded does nothing.

    Args:
        path: the shared library, e.g. `build-cmake/_C.cpython-311-x86_64-linux-gnu.so`.
    Raises:
        FileNotFoundError: no such file.  RuntimeError: another jit_unlearn library is loaded
        already (the ops of one namespace register once per process).  OSError: the file does not
        load (for instance, it was built against another torch).
    """
    global _library_path, _load_error
    path = os.path.realpath(os.fspath(path))
    if _library_path is not None:
        if path == _library_path:
            return
        raise RuntimeError(
            f"path: a jit_unlearn library is loaded already, from {_library_path}; one process holds one"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file: {path}")
    torch.ops.load_library(path)
    _library_path, _load_error = path, None
    for op in OPS:
        try:
            _COMPILED[op] = getattr(torch.ops.jit_unlearn, op).default
        except (AttributeError, RuntimeError):  # a library from an older build lacks the op
            pass
    _registrations.register(_COMPILED)
    _HAS_KERNEL.update(cpu=_probe("CPU"), cuda=_probe("CUDA"))


def _load_default() -> None:
    global _load_error
    path = os.environ.get(LIBRARY_ENV) or find_library()
    if path is None:
        _load_error = "no compiled library (_C*.so) next to the package"
        return
    try:
        load_library(path)
    except (OSError, RuntimeError) as exc:  # the package works without it, on the pure-PyTorch tier
        _load_error = f"{path}: {exc}"


_load_default()


def extension_loaded() -> bool:
    """True when a compiled library is loaded."""
    return _library_path is not None


def _requested() -> str:
    if _forced is not None:
        return _forced
    value = os.environ.get("JIT_UNLEARN_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID:
        if value not in _warned_values:
            _warned_values.add(value)
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


def has_kernel(device_type: str) -> bool:
    """True when the compiled library has a kernel for every op on `device_type` ("cpu" or "cuda")."""
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
            f"'{device.type}'"
            + (f" (no library loaded: {_load_error})" if _load_error else "")
            + ". Rebuild with `pip install --no-build-isolation -e .` (FORCE_CUDA=1 for CUDA)."
        )
    return available


def kernel(name: str, device: torch.device) -> Callable:
    """The implementation of op `name` (one of OPS) that runs on `device`, chosen once per call site:
    the compiled op `torch.ops.jit_unlearn.<name>.default`, or the pure-PyTorch function of the same
    name from `torch_ops`.  Both take the same arguments and return the same results; neither
    checks them (the public wrappers in `jit_unlearn.ops` do)."""
    if use_compiled(device):
        return _COMPILED[name]
    return _TORCH_TIER[name]


def backend_name(device: torch.device | str = "cpu") -> str:
    """Name of the tier that runs ops on `device`: "cuda", "cpu" (compiled) or "torch"."""
    device = torch.device(device)
    if not use_compiled(device):
        return "torch"
    return device.type


def backend_info() -> dict:
    """Which tiers are compiled and which will run.

    Returns a dict: extension_loaded, library (its path or None), load_error, compiled_cpu,
    compiled_cuda, cuda_available, requested (auto/compiled/torch), active ({"cpu": tier,
    "cuda": tier or None}), fast_bf16 ({"cpu": bool, "cuda": bool or None}: whether
    precision="auto" picks bfloat16 there) and fast_bf16_features (the hardware features behind
    it per device, e.g. ["AMX-BF16", "AVX512-BF16"])."""
    from . import _precision

    info = {
        "extension_loaded": extension_loaded(),
        "library": _library_path,
        "load_error": _load_error,
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
    info["fast_bf16_features"] = {
        dev: list(_precision.fast_bf16_features(dev)) if dev == "cpu" or torch.cuda.is_available() else None
        for dev in ("cpu", "cuda")
    }
    info["fast_bf16"] = {dev: None if f is None else bool(f) for dev, f in info["fast_bf16_features"].items()}
    return info
