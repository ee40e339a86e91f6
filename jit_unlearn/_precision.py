"""How the model's own passes run: in reduced precision, in channels_last, compiled (docs/METHODS.md §7).

Every method takes `precision` ("float32", "bfloat16", "float16" or "auto") and resolves it once with
`resolve`.  Graded passes (forward + backward) run on the caller's model under autocast
(`graded_forward`), so gradients arrive in float32 on the float32 master weights; no-grad passes
run on a `_forward_copy.ForwardCopy`, a private copy of the model in the reduced dtype.  Neither
changes the caller's model: its parameters keep their dtype and layout.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from . import _checks as checks
from ._utils import model_device

__all__ = [
    "PRECISIONS",
    "Precision",
    "graded_forward",
    "resolve",
    "fast_bf16",
    "fast_bf16_features",
    "describe",
]

PRECISIONS = checks.PRECISIONS
_REDUCED = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def _cpu_bf16_features() -> tuple[str, ...]:
    if not torch.backends.mkldnn.is_available():  # oneDNN runs the bf16 convolutions and matmuls
        return ()
    flags: set[str] = set()
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        caps = get() if get is not None else None
    except Exception:  # an older torch, or a platform it cannot probe
        caps = None
    if isinstance(caps, dict):
        flags = {k for k in ("amx_bf16", "avx512_bf16") if caps.get(k)}
    else:
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("flags"):
                        flags = {k for k in ("amx_bf16", "avx512_bf16") if k in line.split()}
                        break
        except OSError:
            pass
    names = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
    return tuple(names[k] for k in ("amx_bf16", "avx512_bf16") if k in flags)


def fast_bf16_features(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The hardware features that make bfloat16 fast on `device`: ("AMX-BF16", "AVX512-BF16") or a
    subset on CPU, ("CUDA capability X.Y",) on a CUDA device of capability >= 8.0; empty otherwise."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return _cpu_bf16_features()
    if dev.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(dev)
        return (f"CUDA capability {major}.{minor}",) if major >= 8 else ()
    return ()


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """True when `device` runs bfloat16 fast: a CPU with AMX-BF16 or AVX512-BF16 (and oneDNN), or a
    CUDA device of capability >= 8.0.  precision="auto" picks bfloat16 exactly there."""
    return bool(fast_bf16_features(device))


@dataclass(frozen=True)
class Precision:
    """A resolved `precision`: what each kind of model pass runs in.

    requested: the argument ("auto" included).  name: "float32" (the model's own dtype: nothing
    changes), "bfloat16" or "float16".  channels_last: reduced passes feed 4-D inputs (and the
    private copy's 4-D weights) in channels_last; set for models with a Conv2d.  head: the name of
    the module kept in float32 in reduced passes, the model's last nn.Linear (the classifier head:
    rounding the logits themselves to bfloat16 would cost ~0.4 % of their magnitude, which
    softmax and the output distances magnify).
    Graded passes run reduced only for bfloat16: float16 backward passes would need loss scaling
    (small gradients and importances flush to zero), so under float16 only no-grad passes are
    reduced."""

    requested: str
    name: str
    device_type: str
    channels_last: bool = False
    head: str | None = None

    @property
    def dtype(self) -> torch.dtype | None:
        """The reduced dtype of the no-grad passes, or None (the model's dtype)."""
        return _REDUCED.get(self.name)

    @property
    def reduced(self) -> bool:
        """Whether any pass runs in reduced precision."""
        return self.name != "float32"

    @property
    def graded(self) -> bool:
        """Whether the graded (forward + backward) passes run under autocast."""
        return self.name == "bfloat16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of a graded forward: bfloat16 autocast, or nothing."""
        if not self.graded:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def graded_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the graded pass feeds it to the model: channels_last for a 4-D input of a conv net
        under reduced precision, else x itself."""
        if self.graded and self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """A graded pass's logits in float32 (losses, norms and ratios are computed in float32)."""
        if self.graded and isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != torch.float32:
            return out.float()
        return out


def graded_forward(model: nn.Module, x: torch.Tensor, precision: Precision | None):
    """model(x) for a pass that backpropagates: under bfloat16 autocast with a channels_last input
    (conv nets), the head in float32, and float32 logits when `precision` says so; else exactly
    model(x)."""
    if precision is None or not precision.graded:
        return model(x)
    hooks = float32_head(model.get_submodule(precision.head), autocast=precision.device_type) if precision.head else []
    try:
        with precision.autocast():
            out = model(precision.graded_input(x))
    finally:
        for h in hooks:
            h.remove()
    return precision.logits(out)


def float32_head(head: nn.Module, autocast: str | None = None) -> list:
    """Hooks that run `head` in float32: its floating inputs are cast up, and (under autocast on
    device type `autocast`) autocast is off while it runs.  Returns the hook handles."""

    def pre(module, args):
        if autocast is not None:
            torch.set_autocast_enabled(autocast, False)
        return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    handles = [head.register_forward_pre_hook(pre)]
    if autocast is not None:  # (the autocast context restores its own state on exit if the head raises)
        handles.append(head.register_forward_hook(lambda module, args, out: torch.set_autocast_enabled(autocast, True)))
    return handles


def head_name(model: nn.Module) -> str | None:
    """The name of the model's last nn.Linear (in `named_modules` order), or None."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def resolve(precision: str, model: nn.Module, *, name: str = "precision", plain: str | None = None) -> Precision:
    """Check `precision` for `model` and resolve "auto".

    "auto" is "bfloat16" for a float32 model on a device where `fast_bf16` holds, else "float32".
    An explicit "bfloat16" or "float16" needs a float32 model.  `plain` names a way of running
    that keeps the model's own dtype (e.g. "mode='reference'", the published code as it is): it
    takes only "float32" or "auto", which then means "float32".
    Raises:
        ValueError: not one of PRECISIONS, "float16" off CUDA, a reduced precision for a model
        that is not float32, or a reduced precision with `plain` (all naming `name`).
    """
    device = model_device(model)
    checks.precision(precision, device, name)
    if plain is not None:
        if precision not in ("float32", "auto"):
            raise ValueError(
                f"{name}: {plain} runs the model in its own dtype; got {precision!r}, pass 'float32' or 'auto'"
            )
        return Precision(precision, "float32", device.type)
    dtype = model_dtype(model)
    chosen = precision
    if precision == "auto":
        chosen = "bfloat16" if dtype == torch.float32 and fast_bf16(device) else "float32"
    elif precision != "float32" and dtype != torch.float32:
        raise ValueError(
            f"{name}: {precision!r} runs the passes of a float32 model in reduced precision; "
            f"this model is {dtype} (use 'float32')"
        )
    if chosen == "float32":
        return Precision(precision, chosen, device.type)
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return Precision(precision, chosen, device.type, conv, head_name(model))


def describe(precision: str, device: torch.device | str) -> str:
    """One line saying what `precision` means on `device`, e.g. "bfloat16 (auto: AMX-BF16, AVX512-BF16)"."""
    dev = torch.device(device)
    if precision != "auto":
        return precision
    features = fast_bf16_features(dev)
    if features:
        return f"bfloat16 (auto: {', '.join(features)})"
    return f"float32 (auto: no fast bfloat16 on {dev.type})"
