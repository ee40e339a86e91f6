"""Public ops: validate the inputs, then run the compiled kernel or the pure-PyTorch reference.

Every function here accepts float32 and float64 tensors, and half / bfloat16 tensors with float32
arithmetic inside; non-contiguous inputs are handled (made contiguous); empty tensors are fine.
Bad shapes, dtypes, devices or values raise ValueError / TypeError naming the argument.
Other tools may also call the compiled ops directly as ``torch.ops.jit_unlearn.<name>``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _backend, reference
from . import _registrations  # noqa: F401  (fake kernels and autograd for the compiled ops)

__all__ = ["perturb", "lipschitz_ratio", "lipschitz_ratio_backward", "accumulate_importance_", "ssd_dampen_", "masked_reset_"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT64 = 2**64


def _check_float_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in reference.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float32/float64/float16/bfloat16), "
                        f"got {t.dtype}")


def _check_number(value, name: str, *, low: float | None = None, low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if low is not None and (value < low or (not low_inclusive and value == low)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name}: must be {op} {low}, got {value}")
    return value


def _as_int64(value, name: str, *, unsigned64: bool = False) -> int:
    """Ints for schema `int` arguments; unsigned64 maps [0, 2^64) onto int64 bit patterns."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if unsigned64:
        if not (_INT64_MIN <= value < _UINT64):
            raise ValueError(f"{name}: must be in [-2^63, 2^64), got {value}")
        return value - _UINT64 if value > _INT64_MAX else value
    if not (_INT64_MIN <= value <= _INT64_MAX):
        raise ValueError(f"{name}: does not fit in int64: {value}")
    return value


def _same_device(tensors_and_names, reference_device: torch.device) -> None:
    for t, name in tensors_and_names:
        if t.device != reference_device:
            raise ValueError(f"{name}: expected device {reference_device}, got {t.device}")


def perturb(x: torch.Tensor, num_samples: int, sigma: float, seed: int = 0, offset: int = 0,
            clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `num_samples` Gaussian perturbations of a batch and their per-sample input norms.

    Args:
        x: [B, ...] floating tensor (the batch; dim 0 indexes samples).
        num_samples: N >= 0 perturbed copies of the batch.
        sigma: noise standard deviation, finite and >= 0.
        seed, offset: Philox key and stream; the same pair gives bitwise the same noise on every
            backend.  Use a new offset (e.g. a running batch counter) for each call of one run.
        clamp: clamp x_tilde to [min(x), max(x)] over the whole batch tensor.
    Returns:
        x_tilde [N, B, ...] in x.dtype, and in_norm [N, B] = ||x_tilde_nb - x_b||_2 in float64 for
        float64 input, float32 otherwise.
    """
    _check_float_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x: expected a batch with at least 1 dimension [B, ...], got shape {tuple(x.shape)}")
    num_samples = _as_int64(num_samples, "num_samples")
    if num_samples < 0:
        raise ValueError(f"num_samples: must be >= 0, got {num_samples}")
    sigma = _check_number(sigma, "sigma", low=0.0)
    seed = _as_int64(seed, "seed", unsigned64=True)
    offset = _as_int64(offset, "offset", unsigned64=True)
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp: expected a bool, got {type(clamp).__name__}")
    if _backend.use_compiled(x.device):
        return torch.ops.jit_unlearn.perturb.default(x, num_samples, sigma, seed, offset, clamp)
    return reference.perturb(x, num_samples, sigma, seed, offset, clamp)


def _check_lipschitz_args(out, out_perturbed, in_norm) -> None:
    _check_float_tensor(out, "out")
    _check_float_tensor(out_perturbed, "out_perturbed")
    _check_float_tensor(in_norm, "in_norm")
    if out.dim() != 2:
        raise ValueError(f"out: expected shape [B, K], got {tuple(out.shape)}")
    if out_perturbed.dim() != 3 or out_perturbed.shape[1:] != out.shape:
        raise ValueError(f"out_perturbed: expected shape [N, {out.shape[0]}, {out.shape[1]}], "
                         f"got {tuple(out_perturbed.shape)}")
    if in_norm.shape != out_perturbed.shape[:2]:
        raise ValueError(f"in_norm: expected shape [{out_perturbed.shape[0]}, {out.shape[0]}], "
                         f"got {tuple(in_norm.shape)}")
    if out_perturbed.dtype != out.dtype:
        raise TypeError(f"out_perturbed: expected dtype {out.dtype} (same as out), got {out_perturbed.dtype}")
    _same_device([(out_perturbed, "out_perturbed"), (in_norm, "in_norm")], out.device)


def lipschitz_ratio(out: torch.Tensor, out_perturbed: torch.Tensor, in_norm: torch.Tensor) -> torch.Tensor:
    """Per-pair Lipschitz ratios, differentiable w.r.t. out and out_perturbed.

    Args:
        out: [B, K] model outputs on the clean batch.
        out_perturbed: [N, B, K] outputs on the perturbed copies (same dtype as out).
        in_norm: [N, B] input-difference norms (e.g. from `perturb`).
    Returns:
        [N, B] ratios ||out_b - out_perturbed_nb||_2 / in_norm_nb in the opmath dtype (float64 for
        float64 out, else float32); 0 where in_norm_nb <= 0.  The gradient is 0 where the output
        difference is 0, never NaN.
    """
    _check_lipschitz_args(out, out_perturbed, in_norm)
    if _backend.use_compiled(out.device):
        return torch.ops.jit_unlearn.lipschitz_ratio.default(out, out_perturbed, in_norm)
    return reference.lipschitz_ratio(out, out_perturbed, in_norm)


def lipschitz_ratio_backward(grad: torch.Tensor, out: torch.Tensor, out_perturbed: torch.Tensor,
                             in_norm: torch.Tensor) -> torch.Tensor:
    """The gradient of sum(grad * lipschitz_ratio(out, out_perturbed, in_norm)) w.r.t. `out`.

    What autograd computes for `lipschitz_ratio`, without building a graph: callers that hold the
    perturbed outputs as constants (JiT does) take the ratio under no_grad, seed `grad`, and pass
    the result to `out.backward(...)` of their model's output.

    Args:
        grad: [N, B] upstream gradient of the ratios (any strides, e.g. an expanded scalar), in
            the opmath dtype of out.
        out, out_perturbed, in_norm: as for `lipschitz_ratio`.
    Returns:
        grad_out [B, K] in out.dtype: sum_n grad_nb (out_b - out_perturbed_nb) / (||out_b -
        out_perturbed_nb|| in_norm_nb), with the pairs of zero output difference or in_norm <= 0 giving 0.
    """
    _check_lipschitz_args(out, out_perturbed, in_norm)
    _check_float_tensor(grad, "grad")
    if grad.shape != out_perturbed.shape[:2]:
        raise ValueError(f"grad: expected shape [{out_perturbed.shape[0]}, {out.shape[0]}], got {tuple(grad.shape)}")
    _same_device([(grad, "grad")], out.device)
    grad = grad.to(reference.opmath_dtype(out.dtype))
    if _backend.use_compiled(out.device):
        return torch.ops.jit_unlearn._lipschitz_ratio_backward.default(grad, out, out_perturbed, in_norm, False)[0]
    return reference.lipschitz_ratio_backward(grad, out, out_perturbed, in_norm, False)[0]


def _check_tensor_lists(lists, names) -> None:
    first, first_name = lists[0], names[0]
    for lst, name in zip(lists, names):
        if isinstance(lst, torch.Tensor) or not isinstance(lst, Sequence):
            raise TypeError(f"{name}: expected a list of tensors, got {type(lst).__name__}")
        if len(lst) != len(first):
            raise ValueError(f"{name}: expected {len(first)} tensors (as many as {first_name}), got {len(lst)}")
    for i, ref in enumerate(first):
        _check_float_tensor(ref, f"{first_name}[{i}]")
        for lst, name in zip(lists[1:], names[1:]):
            t = lst[i]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.shape != ref.shape:
                raise ValueError(f"{name}[{i}]: expected shape {tuple(ref.shape)} (as {first_name}[{i}]), "
                                 f"got {tuple(t.shape)}")
            if t.device != ref.device:
                raise ValueError(f"{name}[{i}]: expected device {ref.device} (as {first_name}[{i}]), got {t.device}")


def _list_device(tensors) -> torch.device:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors are on several devices {sorted(map(str, devices))}; one call takes one device")
    return next(iter(devices)) if devices else torch.device("cpu")


def _dense(t: torch.Tensor) -> bool:
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    # element-aligned too (the kernels refuse to write foreign memory at an odd address)
    return dense and (torch.compiler.is_compiling() or t.device.type == "meta" or t.numel() == 0
                      or t.data_ptr() % t.element_size() == 0)


def _overlap_operands(lists, names, written_first: bool = True):
    """(tensor, "name[i]", written) triples for reference.check_no_overlap; the first list is written."""
    return [(t, f"{name}[{i}]", written_first and k == 0)
            for k, (lst, name) in enumerate(zip(lists, names)) for i, t in enumerate(lst)]


def _run_inplace(targets: Sequence[torch.Tensor], run):
    """Call run(list) on in-place targets; strided or misaligned views (which the kernels reject) go
    through a dense temporary that is copied back, so every tier accepts the same inputs."""
    work = [t if _dense(t) else t.clone(memory_format=torch.contiguous_format) for t in targets]
    result = run(work)
    for t, w in zip(targets, work):
        if w is not t:
            t.copy_(w)
    return result


def accumulate_importance_(acc: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], mode: str = "square",
                           scale: float = 1.0) -> None:
    """In place, for every i: acc[i] += scale * grads[i]**2 (mode "square") or scale * |grads[i]| ("abs").

    acc[i] are floating tensors (any of the four dtypes); grads[i] floating tensors of the same shape
    and device; arithmetic in acc's opmath dtype."""
    _check_tensor_lists([acc, grads], ["acc", "grads"])
    for i, g in enumerate(grads):
        _check_float_tensor(g, f"grads[{i}]")
    if mode not in ("square", "abs"):
        raise ValueError(f"mode: expected 'square' or 'abs', got {mode!r}")
    scale = _check_number(scale, "scale")
    if not acc:
        return
    reference.check_no_overlap("accumulate_importance_", _overlap_operands([acc, grads], ["acc", "grads"]))
    device = _list_device(acc)
    if _backend.use_compiled(device):
        _run_inplace(acc, lambda a: torch.ops.jit_unlearn.accumulate_importance_.default(a, list(grads), mode, scale))
    else:
        _run_inplace(acc, lambda a: reference.accumulate_importance_(a, list(grads), mode, scale))


def ssd_dampen_(params: Sequence[torch.Tensor], imp_forget: Sequence[torch.Tensor],
                imp_full: Sequence[torch.Tensor], alpha: float, lam: float = 1.0,
                exponent: float = 1.0) -> torch.Tensor:
    """SSD dampening of every tensor in one call (ALGORITHMS.md section 2), in place.

    Per element: if I_f > alpha * I_D then theta *= min(((lam * I_D) / I_f) ** exponent, 1).
    Args:
        params, imp_forget, imp_full: equal-length lists of same-shape floating tensors; importances
            must be >= 0 (a negative or NaN one raises ValueError before anything is written), and no
            parameter may share memory with another operand.
        alpha: selection threshold, finite and >= 0.  lam: >= 0.  exponent: finite.
    Returns:
        int64 [T] tensor of selected-element counts per parameter, on the parameters' device.
    """
    _check_tensor_lists([params, imp_forget, imp_full], ["params", "imp_forget", "imp_full"])
    for lst, name in ((imp_forget, "imp_forget"), (imp_full, "imp_full")):
        for i, t in enumerate(lst):
            _check_float_tensor(t, f"{name}[{i}]")
    alpha = _check_number(alpha, "alpha", low=0.0)
    lam = _check_number(lam, "lam", low=0.0)
    exponent = _check_number(exponent, "exponent")
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    reference.check_no_overlap("ssd_dampen_", _overlap_operands([params, imp_forget, imp_full],
                                                                ["params", "imp_forget", "imp_full"]))
    device = _list_device(params)
    if _backend.use_compiled(device):
        return _run_inplace(params, lambda p: torch.ops.jit_unlearn.ssd_dampen_.default(
            p, list(imp_forget), list(imp_full), alpha, lam, exponent))
    return _run_inplace(params, lambda p: reference.ssd_dampen_(p, list(imp_forget), list(imp_full), alpha, lam,
                                                                exponent))


def masked_reset_(params: Sequence[torch.Tensor], init: Sequence[torch.Tensor],
                  masks: Sequence[torch.Tensor]) -> None:
    """In place, for every i: params[i] = where(masks[i], init[i], params[i]).

    masks[i] must be torch.bool tensors of params[i]'s shape; init[i] floating, same shape."""
    _check_tensor_lists([params, init, masks], ["params", "init", "masks"])
    for i, (t, m) in enumerate(zip(init, masks)):
        _check_float_tensor(t, f"init[{i}]")
        if m.dtype != torch.bool:
            raise TypeError(f"masks[{i}]: expected a torch.bool tensor, got {m.dtype}")
    if not params:
        return
    reference.check_no_overlap("masked_reset_", _overlap_operands([params, init, masks], ["params", "init", "masks"]))
    device = _list_device(params)
    if _backend.use_compiled(device):
        _run_inplace(params, lambda p: torch.ops.jit_unlearn.masked_reset_.default(p, list(init), list(masks)))
    else:
        _run_inplace(params, lambda p: reference.masked_reset_(p, list(init), list(masks)))
