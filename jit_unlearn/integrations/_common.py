"""Small helpers shared by the drop-in call sites: argument checks, unwrapping framework wrappers,
restoring a model when a call fails, and reading the input out of a batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping

import torch


def check_real(value, name: str, *, low: float | None = None, strict: bool = False) -> float:
    """`value` as a float; TypeError / ValueError naming `name` unless it is a finite real number
    (>= low, or > low when strict)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if low is not None and (value < low or (strict and value == low)):
        raise ValueError(f"{name}: must be {'>' if strict else '>='} {low}, got {value}")
    return value


def check_int(value, name: str, *, low: int) -> int:
    """`value` unchanged; TypeError / ValueError naming `name` unless it is an int >= low."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    return value


def check_module(model, name: str = "model") -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel or Fabric wrapper (one level, through `.module`),
    else the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def batch_input(batch, name: str) -> torch.Tensor:
    """The input tensor of a batch: the batch itself, or the first element of a tuple or list
    (so `(x, index, y)` and `(x, y)` batches both work)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        f"{name}: a batch must be a tensor or a tuple whose first element is the input tensor, "
        f"got {type(batch).__name__}"
    )


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_params(opt) -> set[int]:
    """ids of the parameters a torch.optim.Optimizer holds; TypeError naming `opt` otherwise."""
    groups = getattr(opt, "param_groups", None)
    if not isinstance(groups, list):
        raise TypeError(f"opt: expected a torch.optim.Optimizer, got {type(opt).__name__}")
    return {id(p) for g in groups for p in g["params"]}


def check_importance_values(tensors: Mapping[str, torch.Tensor], name: str) -> None:
    """ValueError naming `name[key]` for the first tensor holding a NaN, an inf or a negative value
    (one host sync for all of them)."""
    keys, bounds = [], []
    for key, t in tensors.items():
        if t.numel():
            keys.append(key)
            lo, hi = torch.aminmax(t.detach())
            bounds.append(torch.stack([lo, hi]).double().cpu())
    if not keys:
        return
    b = torch.stack(bounds)
    good = ((b[:, 0] >= 0) & (b[:, 1] < math.inf)).tolist()  # NaN fails both comparisons
    for key, ok in zip(keys, good):
        if not ok:
            raise ValueError(f"{name}[{key!r}]: holds NaN, inf or negative values; refusing to dampen with it")


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no element of `tensors` is inf or NaN (one host sync)."""
    maxima = [t.detach().abs().amax().float().cpu() for t in tensors if t.numel()]
    return not maxima or bool(torch.isfinite(torch.stack(maxima)).all())


@contextlib.contextmanager
def restore_on_failure(model: torch.nn.Module) -> Iterator[None]:
    """If the body raises (KeyboardInterrupt included), put every parameter and buffer of `model`
    back bitwise, clear the gradients, restore each module's train/eval flag, and re-raise."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    saved = [t.detach().clone() for t in tensors]
    modules = list(model.modules())
    flags = [m.training for m in modules]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for t, copy in zip(tensors, saved):
                t.copy_(copy)
        for p in model.parameters():
            p.grad = None
        for m, flag in zip(modules, flags):
            m.training = flag
        raise
