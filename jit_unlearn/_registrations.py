"""Fake (meta) kernels and autograd formulas of the compiled ops (torch.compile and opcheck need them).

`register()` attaches them once the library is loaded, from whichever path it came."""

from __future__ import annotations

from collections.abc import Collection

import torch

from .torch_ops import opmath_dtype

_registered = False


def _check_one_device(*named) -> None:
    """The fakes' device check.  A call that mixes devices (one tensor on meta, the others on CPU) reaches
    the Meta kernel, the fake, instead of a compiled kernel's checks; it must raise as they do.

    named: (name, tensor or list of tensors) pairs; the first tensor sets the device of the call."""
    ref = ref_name = None
    for name, value in named:
        if isinstance(value, torch.Tensor):
            tensors = [(name, value)]
        else:
            tensors = [(f"{name}[{i}]", t) for i, t in enumerate(value)]
        for label, t in tensors:
            if ref is None:
                ref, ref_name = t.device, label
            elif t.device != ref:
                raise ValueError(f"{label}: expected device {ref} (as {ref_name}), got {t.device}")


def _perturb_fake(x, num_samples, sigma, seed, offset, clamp):
    x_tilde = x.new_empty((num_samples, *x.shape))
    in_norm = x.new_empty((num_samples, x.shape[0]), dtype=opmath_dtype(x.dtype))
    return x_tilde, in_norm


def _perturb_out_fake(x, num_samples, sigma, seed, offset, clamp, x_tilde, in_norm):
    _check_one_device(("x", x), ("x_tilde", x_tilde), ("in_norm", in_norm))
    return None


def _lipschitz_ratio_fake(out, out_perturbed, in_norm):
    _check_one_device(("out", out), ("out_perturbed", out_perturbed), ("in_norm", in_norm))
    return out.new_empty(tuple(out_perturbed.shape[:2]), dtype=opmath_dtype(out.dtype))


def _lipschitz_ratio_backward_fake(grad, out, out_perturbed, in_norm, compute_perturbed_grad):
    _check_one_device(("out", out), ("out_perturbed", out_perturbed), ("in_norm", in_norm), ("grad", grad))
    shape = tuple(out_perturbed.shape) if compute_perturbed_grad else (0,)
    return out.new_empty(tuple(out.shape)), out_perturbed.new_empty(shape)


def _lipschitz_ratio_and_grad_fake(grad, out, out_perturbed, in_norm):
    _check_one_device(("out", out), ("out_perturbed", out_perturbed), ("in_norm", in_norm), ("grad", grad))
    ratio = out.new_empty(tuple(out_perturbed.shape[:2]), dtype=opmath_dtype(out.dtype))
    return ratio, out.new_empty(tuple(out.shape))


def _accumulate_importance_fake(acc, grads, importance_mode, scale):
    _check_one_device(("acc", acc), ("grads", grads))
    return None


def _ssd_dampen_fake(params, imp_forget, imp_full, alpha, lam, exponent):
    _check_one_device(("params", params), ("imp_forget", imp_forget), ("imp_full", imp_full))
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty((len(params),), dtype=torch.int64, device=device)


def _masked_reset_fake(params, init, masks):
    _check_one_device(("params", params), ("init", init), ("masks", masks))
    return None


_FAKES = {
    "perturb": _perturb_fake,
    "_perturb_out": _perturb_out_fake,
    "lipschitz_ratio": _lipschitz_ratio_fake,
    "_lipschitz_ratio_backward": _lipschitz_ratio_backward_fake,
    "_lipschitz_ratio_and_grad": _lipschitz_ratio_and_grad_fake,
    "accumulate_importance_": _accumulate_importance_fake,
    "ssd_dampen_": _ssd_dampen_fake,
    "masked_reset_": _masked_reset_fake,
}


def _lipschitz_setup_context(ctx, inputs, output):
    out, out_perturbed, in_norm = inputs
    ctx.save_for_backward(out, out_perturbed, in_norm, output)


def _lipschitz_backward(ctx, grad):
    out, out_perturbed, in_norm, ratio = ctx.saved_tensors
    need_out, need_pert, need_norm = ctx.needs_input_grad
    grad_out = grad_pert = grad_norm = None
    if need_out or need_pert:
        g_out, g_pert = torch.ops.jit_unlearn._lipschitz_ratio_backward.default(
            grad, out, out_perturbed, in_norm, bool(need_pert)
        )
        grad_out = g_out if need_out else None
        grad_pert = g_pert if need_pert else None
    if need_norm:
        # d(num / in_norm) / d(in_norm) = -ratio / in_norm, 0 where in_norm <= 0.
        den = in_norm.to(ratio.dtype)
        valid = den > 0
        safe = torch.where(valid, den, torch.ones_like(den))
        grad_norm = torch.where(valid, -grad * ratio / safe, torch.zeros_like(ratio)).to(in_norm.dtype)
    return grad_out, grad_pert, grad_norm


def register(available: Collection[str]) -> None:
    """Register the fakes of the `available` ops of the loaded library and the autograd of
    `lipschitz_ratio`; once per process (later calls do nothing)."""
    global _registered
    if _registered:
        return
    for op, fake in _FAKES.items():
        if op in available:
            torch.library.register_fake(f"jit_unlearn::{op}", fake)
    if "lipschitz_ratio" in available and "_lipschitz_ratio_backward" in available:
        torch.library.register_autograd(
            "jit_unlearn::lipschitz_ratio", _lipschitz_backward, setup_context=_lipschitz_setup_context
        )
    _registered = True
