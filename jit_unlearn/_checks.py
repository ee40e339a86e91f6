"""Argument checks shared by the ops, the methods, training, evaluation and the CLI.

Every check names the argument first ("sigma: must be > 0, got -1.0"), raises TypeError for a value
of the wrong type and ValueError for a value out of range, and returns the checked value (a real
number as float), so callers write `lr = checks.real(lr, "lr", low=0.0)`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch

from .torch_ops import FLOAT_DTYPES

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_END = 2**64


def _type_name(value) -> str:
    return type(value).__name__


def real(
    value,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite int or float (not a bool) as float, within [low, high] (an end open when asked).

    Raises:
        TypeError: not a real number.  ValueError: NaN, inf, or out of bounds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    below = low is not None and (value < low or (low_open and value == low))
    above = high is not None and (value > high or (high_open and value == high))
    if below or above:
        if high is None:
            raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value}")
        if low is None:
            raise ValueError(f"{name}: must be {'<' if high_open else '<='} {high}, got {value}")
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}: must be in {lo}{low}, {high}{hi}, got {value}")
    return value


def integer(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) within [low, high].

    Raises:
        TypeError: not an int.  ValueError: out of bounds.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {_type_name(value)}")
    if low is not None and value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")
    return value


def optional_integer(value, name: str, *, low: int | None = None) -> int | None:
    """None, or an int >= low (see `integer`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int or None, got {_type_name(value)}")
    return integer(value, name, low=low)


def int64(value, name: str) -> int:
    """An int that fits a schema `int` argument (int64)."""
    value = integer(value, name)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name}: does not fit in int64: {value}")
    return value


def seed64(value, name: str) -> int:
    """A 64-bit seed or stream offset: an int in [-2^63, 2^64), returned as the int64 with the same
    bit pattern (values >= 2^63 wrap to negative), as the ops' schema takes it."""
    value = integer(value, name)
    if not INT64_MIN <= value < UINT64_END:
        raise ValueError(f"{name}: must be in [-2^63, 2^64), got {value}")
    return value - UINT64_END if value > INT64_MAX else value


def boolean(value, name: str) -> bool:
    """A bool (not 0/1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {_type_name(value)}")
    return value


def choice(value, name: str, choices: Collection[str]) -> str:
    """One of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def module(value, name: str = "model") -> torch.nn.Module:
    """A torch.nn.Module."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {_type_name(value)}")
    return value


def float_tensor(value, name: str) -> torch.Tensor:
    """A floating-point tensor (float32, float64, float16 or bfloat16)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_type_name(value)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float32/float64/float16/bfloat16), got {value.dtype}"
        )
    return value


def same_device(tensors_and_names: Sequence[tuple[torch.Tensor, str]], device: torch.device) -> None:
    """Every tensor is on `device`."""
    for t, name in tensors_and_names:
        if t.device != device:
            raise ValueError(f"{name}: expected device {device}, got {t.device}")


def tensor_lists(lists: Sequence, names: Sequence[str], *, floating: Sequence[str] = ()) -> None:
    """Equal-length lists of tensors, element i of each list of the shape and device of the first
    list's element i; the first list and those named in `floating` hold floating-point tensors."""
    first, first_name = lists[0], names[0]
    for lst, name in zip(lists, names):
        if isinstance(lst, torch.Tensor) or not isinstance(lst, Sequence):
            raise TypeError(f"{name}: expected a list of tensors, got {_type_name(lst)}")
        if len(lst) != len(first):
            raise ValueError(f"{name}: expected {len(first)} tensors (as many as {first_name}), got {len(lst)}")
    for i, ref in enumerate(first):
        float_tensor(ref, f"{first_name}[{i}]")
        for lst, name in zip(lists[1:], names[1:]):
            t = lst[i]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {_type_name(t)}")
            if t.shape != ref.shape:
                raise ValueError(
                    f"{name}[{i}]: expected shape {tuple(ref.shape)} (as {first_name}[{i}]), got {tuple(t.shape)}"
                )
            if t.device != ref.device:
                raise ValueError(f"{name}[{i}]: expected device {ref.device} (as {first_name}[{i}]), got {t.device}")
    for lst, name in zip(lists[1:], names[1:]):
        if name in floating:
            for i, t in enumerate(lst):
                float_tensor(t, f"{name}[{i}]")


def writable(tensors: Sequence[torch.Tensor], name: str) -> None:
    """Every tensor can be updated in place: none has several elements on one memory location (an
    expanded tensor, say), which an in-place write cannot give distinct values, and none is an
    inference tensor outside inference mode.  Checked for the whole list before any op writes, so a
    refusal leaves every tensor as it was."""
    for i, t in enumerate(tensors):
        if torch._debug_has_internal_overlap(t) == 1:  # 1: overlap for sure (0: none, 2: too hard to tell)
            raise ValueError(
                f"{name}[{i}]: several of its elements share one memory location (e.g. an expanded "
                f"tensor of shape {tuple(t.shape)}, strides {t.stride()}), so it cannot be updated in place; "
                "pass a tensor with its own storage (e.g. .clone())"
            )
        if t.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(
                f"{name}[{i}]: is an inference tensor (made under torch.inference_mode), which torch lets "
                "nothing update outside inference mode; clone it, or call the op inside inference mode"
            )


def list_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    """The one device of a list of tensors (CPU for an empty list)."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors are on several devices {sorted(map(str, devices))}; one call takes one device")
    return next(iter(devices)) if devices else torch.device("cpu")


def device(value, name: str = "device") -> torch.device:
    """A torch.device (or its name; "auto" or None picks CUDA when available, else CPU) that exists
    on this machine."""
    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name}: not a torch device: {value!r} (e.g. cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {value!r} asked for, but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: {value!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return dev


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (CUDA) so that a wall-clock reading covers it; a no-op on CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def model(value, name: str = "model") -> torch.nn.Module:
    """A torch.nn.Module whose parameters are floating-point tensors with data (not on `meta`).

    Raises:
        TypeError: not a Module, or an integer / bool / complex parameter (integer state belongs in
        a buffer).  ValueError: a parameter on the meta device (shapes without values).
    """
    module(value, name)
    for pname, p in value.named_parameters():
        if p.is_meta:
            raise ValueError(
                f"{name}: parameter {pname!r} is on the meta device (it has a shape but no values); "
                "materialise the model first (e.g. to_empty(device=...) and load_state_dict)"
            )
        if not p.is_floating_point():
            raise TypeError(
                f"{name}: parameter {pname!r} has dtype {p.dtype}; the methods need floating-point "
                "parameters (register integer state as a buffer)"
            )
    return value


def fits_dtype(value: float, name: str, dtypes: Collection[torch.dtype]) -> float:
    """A real number that the narrowest of `dtypes` (the parameters' dtypes) holds as a finite value,
    so that a step scaled by it cannot overflow before it meets a gradient."""
    limits = [torch.finfo(d).max for d in dtypes if d.is_floating_point]
    if limits and abs(value) > min(limits):
        dtype = min((d for d in dtypes if d.is_floating_point), key=lambda d: torch.finfo(d).max)
        largest = torch.finfo(dtype).max
        raise ValueError(
            f"{name}: {value:g} overflows the parameters' dtype {dtype} (largest finite value {largest:g})"
        )
    return value


def element_count(factors: Sequence[int], name: str, what: str) -> int:
    """The product of `factors` (the sizes of a tensor to be allocated), which must fit in int64."""
    total = math.prod(factors)
    if total > INT64_MAX:
        raise ValueError(f"{name}: {what} would need {total} elements, more than int64 can index")
    return total


def batch_name(name: str, batch: int) -> str:
    """How error messages name batch `batch` (0-based) of the data argument `name`."""
    return f"{name}: batch {batch} (counting from 0)"


def labels(
    y, name: str, *, batch: int, batch_size: int, num_classes: int | None = None, defer: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class-index labels of one batch: an integer tensor [B] (B = `batch_size`), every value in
    [0, num_classes) (the range is not checked when num_classes is None).  Returns (labels as int64,
    None) when the values were checked here, or, with `defer=True`, (labels clamped into range, a
    0-dim bool tensor that is True when every value was in range), so that the caller can check the
    values later with one host sync instead of one per batch (clamping keeps an out-of-range index
    from reaching a CUDA gather, which would abort the process).

    Raises:
        TypeError: not an integer tensor.  ValueError: a shape other than [B], or a value out of range.
    """
    where = batch_name(name, batch)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{where}: labels must be a tensor of class indices, got {_type_name(y)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{where}: labels must be integer class indices, got dtype {y.dtype}")
    if y.shape != (batch_size,):
        hint = " (squeeze the label dimension)" if y.numel() == batch_size else ""
        raise ValueError(f"{where}: labels must have shape [B] = ({batch_size},), got {tuple(y.shape)}{hint}")
    y = y.long()
    if num_classes is None or y.numel() == 0:
        return y, None
    if not defer:
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{where}: label {bad} is outside [0, {num_classes}) for a model with {num_classes} outputs"
                + (" (ignore_index labels are not supported: drop those samples)" if bad < 0 else "")
            )
        return y, None
    ok = ((y >= 0) & (y < num_classes)).all()
    return y.clamp(0, num_classes - 1), ok


PRECISIONS = ("float32", "bfloat16", "float16", "auto")


def precision(value, device: torch.device | str, name: str = "precision") -> str:
    """One of PRECISIONS for a model on `device`: "float16" runs on CUDA only."""
    choice(value, name, PRECISIONS)
    device_type = torch.device(device).type
    if value == "float16" and device_type != "cuda":
        raise ValueError(
            f"{name}: 'float16' runs on CUDA only, and the model is on {device_type}; use 'bfloat16' or 'auto'"
        )
    return value
