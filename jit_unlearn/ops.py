"""Public ops: validate the inputs, then make one call to the kernel `_backend.kernel` picks for the
device (the compiled op or its pure-PyTorch twin in `torch_ops`).

Every function here accepts float32 and float64 tensors, and half / bfloat16 tensors with float32
arithmetic inside; non-contiguous inputs are handled (made contiguous); empty tensors are fine.
Bad shapes, dtypes, devices or values raise ValueError / TypeError naming the argument, before
anything is written; so does an in-place target with overlapping elements (an expanded tensor).
Other tools may also call the compiled ops directly as ``torch.ops.jit_unlearn.<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend
from . import _checks as checks
from .torch_ops import check_no_overlap, opmath_dtype

__all__ = [
    "perturb",
    "lipschitz_ratio",
    "lipschitz_ratio_backward",
    "accumulate_importance_",
    "ssd_dampen_",
    "masked_reset_",
]


def perturb(
    x: torch.Tensor, num_samples: int, sigma: float, seed: int = 0, offset: int = 0, clamp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
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
    checks.float_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x: expected a batch with at least 1 dimension [B, ...], got shape {tuple(x.shape)}")
    num_samples = checks.int64(num_samples, "num_samples")
    if num_samples < 0:
        raise ValueError(f"num_samples: must be >= 0, got {num_samples}")
    checks.element_count(
        (num_samples, *x.shape), "num_samples", f"{num_samples} perturbed copies of x {tuple(x.shape)}"
    )
    sigma = checks.real(sigma, "sigma", low=0.0)
    seed = checks.seed64(seed, "seed")
    offset = checks.seed64(offset, "offset")
    checks.boolean(clamp, "clamp")
    return _backend.kernel("perturb", x.device)(x, num_samples, sigma, seed, offset, clamp)


def _check_lipschitz_args(out, out_perturbed, in_norm) -> None:
    checks.float_tensor(out, "out")
    checks.float_tensor(out_perturbed, "out_perturbed")
    checks.float_tensor(in_norm, "in_norm")
    if out.dim() != 2:
        raise ValueError(f"out: expected shape [B, K], got {tuple(out.shape)}")
    if out_perturbed.dim() != 3 or out_perturbed.shape[1:] != out.shape:
        raise ValueError(
            f"out_perturbed: expected shape [N, {out.shape[0]}, {out.shape[1]}], got {tuple(out_perturbed.shape)}"
        )
    if in_norm.shape != out_perturbed.shape[:2]:
        raise ValueError(
            f"in_norm: expected shape [{out_perturbed.shape[0]}, {out.shape[0]}], got {tuple(in_norm.shape)}"
        )
    if out_perturbed.dtype != out.dtype:
        raise TypeError(f"out_perturbed: expected dtype {out.dtype} (same as out), got {out_perturbed.dtype}")
    checks.same_device([(out_perturbed, "out_perturbed"), (in_norm, "in_norm")], out.device)


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
    return _backend.kernel("lipschitz_ratio", out.device)(out, out_perturbed, in_norm)


def lipschitz_ratio_backward(
    grad: torch.Tensor, out: torch.Tensor, out_perturbed: torch.Tensor, in_norm: torch.Tensor
) -> torch.Tensor:
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
    checks.float_tensor(grad, "grad")
    if grad.shape != out_perturbed.shape[:2]:
        raise ValueError(f"grad: expected shape [{out_perturbed.shape[0]}, {out.shape[0]}], got {tuple(grad.shape)}")
    checks.same_device([(grad, "grad")], out.device)
    grad = grad.to(opmath_dtype(out.dtype))
    return _backend.kernel("_lipschitz_ratio_backward", out.device)(grad, out, out_perturbed, in_norm, False)[0]


def _dense(t: torch.Tensor) -> bool:
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    # element-aligned too (the kernels refuse to write foreign memory at an odd address)
    return dense and (
        torch.compiler.is_compiling()
        or t.device.type == "meta"
        or t.numel() == 0
        or t.data_ptr() % t.element_size() == 0
    )


def _overlap_operands(lists, names):
    """(tensor, "name[i]", written) triples for torch_ops.check_no_overlap; the first list is written."""
    return [(t, f"{name}[{i}]", k == 0) for k, (lst, name) in enumerate(zip(lists, names)) for i, t in enumerate(lst)]


def _run_inplace(targets: Sequence[torch.Tensor], run):
    """Call run(list) on in-place targets (checked `writable` by the caller); strided or misaligned
    views (which the kernels reject) go through a dense temporary that is copied back without
    autograd (as the kernels write a parameter that requires grad), so every tier accepts the same
    inputs and no copy fails after another target was written."""
    work = [t if _dense(t) else t.clone(memory_format=torch.contiguous_format) for t in targets]
    result = run(work)
    with torch.no_grad():
        for t, w in zip(targets, work):
            if w is not t:
                t.copy_(w)
    return result


def accumulate_importance_(
    acc: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], mode: str = "square", scale: float = 1.0
) -> None:
    """In place, for every i: acc[i] += scale * grads[i]**2 (mode "square") or scale * |grads[i]| ("abs").

    acc[i] are floating tensors (any of the four dtypes); grads[i] floating tensors of the same shape
    and device; arithmetic in acc's opmath dtype."""
    checks.tensor_lists([acc, grads], ["acc", "grads"], floating=["grads"])
    checks.choice(mode, "mode", ("square", "abs"))
    scale = checks.real(scale, "scale")
    checks.writable(acc, "acc")
    if not acc:
        return
    check_no_overlap("accumulate_importance_", _overlap_operands([acc, grads], ["acc", "grads"]))
    accumulate = _backend.kernel("accumulate_importance_", checks.list_device(acc))
    _run_inplace(acc, lambda a: accumulate(a, list(grads), mode, scale))


def ssd_dampen_(
    params: Sequence[torch.Tensor],
    imp_forget: Sequence[torch.Tensor],
    imp_full: Sequence[torch.Tensor],
    alpha: float,
    lam: float = 1.0,
    exponent: float = 1.0,
) -> torch.Tensor:
    """SSD dampening of every tensor in one call (docs/METHODS.md §2), in place.

    Per element: if I_f > alpha * I_D then theta *= min(((lam * I_D) / I_f) ** exponent, 1).
    Args:
        params, imp_forget, imp_full: equal-length lists of same-shape floating tensors.
        alpha: selection threshold, finite and >= 0.  lam: >= 0.  exponent: finite.
    Returns:
        int64 [T] tensor of selected-element counts per parameter, on the parameters' device.
    Importances must be >= 0 (a negative or NaN one raises ValueError before anything is written), and
    no parameter may share memory with another operand.
    """
    checks.tensor_lists(
        [params, imp_forget, imp_full], ["params", "imp_forget", "imp_full"], floating=["imp_forget", "imp_full"]
    )
    alpha = checks.real(alpha, "alpha", low=0.0)
    lam = checks.real(lam, "lam", low=0.0)
    exponent = checks.real(exponent, "exponent")
    checks.writable(params, "params")
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    check_no_overlap(
        "ssd_dampen_", _overlap_operands([params, imp_forget, imp_full], ["params", "imp_forget", "imp_full"])
    )
    dampen = _backend.kernel("ssd_dampen_", checks.list_device(params))
    return _run_inplace(params, lambda p: dampen(p, list(imp_forget), list(imp_full), alpha, lam, exponent))


def masked_reset_(params: Sequence[torch.Tensor], init: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """In place, for every i: params[i] = where(masks[i], init[i], params[i]).

    masks[i] must be torch.bool tensors of params[i]'s shape; init[i] floating, same shape."""
    checks.tensor_lists([params, init, masks], ["params", "init", "masks"], floating=["init"])
    for i, m in enumerate(masks):
        if m.dtype != torch.bool:
            raise TypeError(f"masks[{i}]: expected a torch.bool tensor, got {m.dtype}")
    checks.writable(params, "params")
    if not params:
        return
    check_no_overlap("masked_reset_", _overlap_operands([params, init, masks], ["params", "init", "masks"]))
    reset = _backend.kernel("masked_reset_", checks.list_device(params))
    _run_inplace(params, lambda p: reset(p, list(init), list(masks)))
