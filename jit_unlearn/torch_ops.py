"""The pure-PyTorch tier: every jit_unlearn op written in plain PyTorch, the fallback and the test oracle.

Each function computes exactly what the compiled op computes (see csrc/common/*_utils.h for the
per-element formulas), with the same argument order and the same output dtypes.  The Philox
generator and the Box-Muller transform are transcribed operation for operation, in float32, so
the fallback draws the same noise as the C++ and CUDA kernels.  A private op's function drops the
op's leading underscore (`perturb_out` is `torch.ops.jit_unlearn._perturb_out`); callers get the
function or the compiled op through `jit_unlearn._backend.kernel`.
"""

from __future__ import annotations

import math

import torch

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF

# float32 constants of the normal transform; the same literals are in csrc/common/rng_utils.h.
_LN2_HI = 6.93138123e-01  # ln 2 = _LN2_HI + _LN2_LO; e * _LN2_HI is exact for |e| < 2^7
_LN2_LO = 9.05800061e-06
_SQRT2 = 1.41421354e00
_INV_SQRT2 = 7.07106769e-01
_HALF_PI = 1.57079637e00
# log(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = (m - 1) / (m + 1), |s| <= 0.1716.
_LOG_C = (3.33333343e-01, 2.00000003e-01, 1.42857149e-01, 1.11111112e-01, 9.09090936e-02)
# Taylor coefficients of sin and cos on |t| <= pi/4.
_SIN_C = (-1.66666672e-01, 8.33333377e-03, -1.98412701e-04, 2.75573188e-06, -2.50521079e-08)
_COS_C = (-5.00000000e-01, 4.16666679e-02, -1.38888892e-03, 2.48015876e-05, -2.75573188e-07, 2.08767570e-09)


# The four floating dtypes every op computes in (csrc/common/operand_checks.h); is_floating_point() also
# admits the float8 types, which no kernel supports.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_no_overlap(op: str, operands) -> None:
    """Raise ValueError when an operand the op writes shares memory with another operand of the call.

    The rule and the message of the kernels' OverlapCheck (csrc/common/operand_checks.h): byte extents
    of the non-empty operands (a strided view counts as its whole hull), sorted by first byte; the first
    written/any pair that intersects is reported, named in argument order.  Skipped while torch.compile
    traces (fake tensors have no memory); meta tensors have none either.

    Args:
        op: the op's name, for the message.
        operands: (tensor, name, written) triples in argument order, e.g. (p, "params[0]", True).
    """
    if torch.compiler.is_compiling():
        return
    entries = []
    for order, (t, name, written) in enumerate(operands):
        if t.numel() == 0 or t.device.type == "meta":
            continue
        begin = t.data_ptr()
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        entries.append((begin, order, begin + (last + 1) * t.element_size(), t, name, written))
    entries.sort(key=lambda e: (e[0], e[1]))
    active = []
    for e in entries:
        active = [a for a in active if a[2] > e[0]]
        for a in active:
            if a[5] or e[5]:
                first, second = (a, e) if a[1] < e[1] else (e, a)
                ta, tb = first[3], second[3]
                # at::get_overlap_status's "Full": one storage, dense, same extent and strides
                same = (
                    first[0] == second[0]
                    and first[2] == second[2]
                    and ta.stride() == tb.stride()
                    and ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
                    and _dense_memory(ta)
                    and _dense_memory(tb)
                )
                raise ValueError(
                    f"{op}: {first[4]} and {second[4]} "
                    f"{'are the same memory' if same else 'share memory'}; an operand the op "
                    "writes must not overlap any other operand of the call"
                )
        active.append(e)


def _dense_memory(t: torch.Tensor) -> bool:
    from torch._prims_common import is_non_overlapping_and_dense_or_false

    return is_non_overlapping_and_dense_or_false(t)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of an op: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product a * b, for a < 2^32 and b an int64 tensor of
    values < 2^32, without overflowing int64 (a is split into 16-bit halves)."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo  # < 2^48
    p_hi = b * a_hi  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32(group: torch.Tensor, seed: int, offset: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on counters (group_lo, group_hi, offset_lo, offset_hi) with key (seed_lo, seed_hi).

    group: int64 tensor of counter values (negative values stand for their uint64 bit patterns).
    Returns four int64 tensors of uint32 values.
    """
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    c0 = group & _MASK32
    c1 = (group >> 32) & _MASK32
    c2 = torch.full_like(group, offset & _MASK32)
    c3 = torch.full_like(group, offset >> 32)
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _neg2log_uniform(r: torch.Tensor) -> torch.Tensor:
    """-2 log(u) for u = (2 (r >> 9) + 1) 2^-24 in (0, 1), in float32."""
    u = ((r >> 9) * 2 + 1).to(torch.float32) * 5.9604644775390625e-08  # exact
    bits = u.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # mantissa in [1, 2)
    big = m > _f32(_SQRT2, m)
    m = torch.where(big, m * _f32(0.5, m), m)
    e = (e + big.to(torch.int32)).to(torch.float32)
    s = (m - _f32(1.0, m)) / (m + _f32(1.0, m))
    s2 = s * s
    p = _f32(_LOG_C[4], s)
    for c in reversed(_LOG_C[:4]):
        p = p * s2 + _f32(c, s)
    two_s = s * _f32(2.0, s)
    log_m = two_s + two_s * s2 * p
    log_u = e * _f32(_LN2_HI, s) + (e * _f32(_LN2_LO, s) + log_m)
    return log_u * _f32(-2.0, s)


def _sincos_2pi_uniform(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of 2 pi u for u = (2 (r >> 9) + 1) 2^-24, in float32.

    The quadrant comes from the top two bits, so the reduction is exact; the polynomials run on
    t = (f - 1/2) pi/2 in (-pi/4, pi/4)."""
    m = r >> 9
    quadrant = m >> 21
    f = ((m & 0x1FFFFF) * 2 + 1).to(torch.float32) * 2.384185791015625e-07  # (2 rem + 1) 2^-22
    t = (f - _f32(0.5, f)) * _f32(_HALF_PI, f)
    t2 = t * t
    ps = _f32(_SIN_C[4], t)
    for c in reversed(_SIN_C[:4]):
        ps = ps * t2 + _f32(c, t)
    sin_t = t + t * t2 * ps
    pc = _f32(_COS_C[5], t)
    for c in reversed(_COS_C[:5]):
        pc = pc * t2 + _f32(c, t)
    cos_t = _f32(1.0, t) + t2 * pc
    # angle within the quadrant = pi/4 + t
    cos_a = (cos_t - sin_t) * _f32(_INV_SQRT2, t)
    sin_a = (cos_t + sin_t) * _f32(_INV_SQRT2, t)
    cos_q = torch.where(
        quadrant == 0, cos_a, torch.where(quadrant == 1, -sin_a, torch.where(quadrant == 2, -cos_a, sin_a))
    )
    sin_q = torch.where(
        quadrant == 0, sin_a, torch.where(quadrant == 1, cos_a, torch.where(quadrant == 2, -sin_a, -cos_a))
    )
    return cos_q, sin_q


def _sqrt_f32(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt, as sqrtf in C++ and CUDA.  torch's CPU float32 sqrt may be
    1 ulp off; rounding a float64 sqrt is exact for float32 inputs, since the exact root of a float32
    lies at least 4 float64 ulps away from a float32 rounding boundary."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def philox_normal(numel: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """The first `numel` standard normals of stream (seed, offset), float32, flat.

    Element j comes from Philox group j // 4: lanes 0, 1 are Box-Muller (cos, sin) of words (r0, r1),
    lanes 2, 3 of words (r2, r3)."""
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    r0, r1, r2, r3 = philox4x32(g, seed, offset)
    rad01 = _sqrt_f32(_neg2log_uniform(r0))
    c01, s01 = _sincos_2pi_uniform(r1)
    rad23 = _sqrt_f32(_neg2log_uniform(r2))
    c23, s23 = _sincos_2pi_uniform(r3)
    z = torch.stack([rad01 * c01, rad01 * s01, rad23 * c23, rad23 * s23], dim=1)
    return z.reshape(-1)[:numel]


def perturb(
    x: torch.Tensor, num_samples: int, sigma: float, seed: int, offset: int, clamp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, ...] -> (x_tilde [N, B, ...] in x.dtype, in_norm [N, B] in the opmath dtype).

    x_tilde = clamp(x + sigma * z, min(x), max(x)); in_norm = ||x_tilde - x|| per sample, computed
    from the stored (rounded) x_tilde."""
    n = int(num_samples)
    x = x.contiguous()  # so the outputs are contiguous too
    b = x.shape[0]
    op = opmath_dtype(x.dtype)
    z = philox_normal(n * x.numel(), seed, offset, device=x.device).view(n, *x.shape)
    xo = x.to(op)
    noisy = xo.unsqueeze(0) + torch.tensor(sigma, dtype=op, device=x.device) * z.to(op)
    if clamp and x.numel() > 0:
        lo, hi = x.min().to(op), x.max().to(op)
        noisy = torch.minimum(torch.maximum(noisy, lo), hi)
    x_tilde = noisy.to(x.dtype)
    diff = x_tilde.to(op) - xo.unsqueeze(0)
    in_norm = torch.sqrt((diff * diff).reshape(n, b, math.prod(x.shape[1:])).sum(dim=2))
    return x_tilde, in_norm


def perturb_out(
    x: torch.Tensor,
    num_samples: int,
    sigma: float,
    seed: int,
    offset: int,
    clamp: bool,
    x_tilde: torch.Tensor,
    in_norm: torch.Tensor,
) -> None:
    """`perturb` written into the caller's x_tilde [N, *x.shape] and in_norm [N, B], which must share
    no memory with x or with each other (ValueError, as the kernels)."""
    check_no_overlap("_perturb_out", [(x, "x", False), (x_tilde, "x_tilde", True), (in_norm, "in_norm", True)])
    got_x, got_norm = perturb(x, num_samples, sigma, seed, offset, clamp)
    x_tilde.copy_(got_x)
    in_norm.copy_(got_norm)


def _lipschitz_parts(out, out_perturbed, in_norm):
    op = opmath_dtype(out.dtype)
    diff = out.to(op).unsqueeze(0) - out_perturbed.to(op)  # [N, B, K]
    num = torch.sqrt((diff * diff).sum(dim=2))  # [N, B]
    den = in_norm.to(op)
    valid = den > 0
    safe_den = torch.where(valid, den, torch.ones_like(den))
    return diff, num, den, valid, safe_den


def lipschitz_ratio(out: torch.Tensor, out_perturbed: torch.Tensor, in_norm: torch.Tensor) -> torch.Tensor:
    """ratio [N, B] = ||out_b - out_perturbed_nb||_2 / in_norm_nb, 0 where in_norm_nb <= 0.

    Differentiable by plain autograd; the gradient at a zero output difference is zero."""
    op = opmath_dtype(out.dtype)
    diff = out.to(op).unsqueeze(0) - out_perturbed.to(op)
    # sqrt(sum d^2) with a zero-safe gradient: torch's vector_norm backward is 0 at 0.
    num = torch.linalg.vector_norm(diff, ord=2, dim=2)
    den = in_norm.to(op)
    valid = den > 0
    safe_den = torch.where(valid, den, torch.ones_like(den))
    return torch.where(valid, num / safe_den, torch.zeros_like(num))


def lipschitz_ratio_backward(
    grad: torch.Tensor,
    out: torch.Tensor,
    out_perturbed: torch.Tensor,
    in_norm: torch.Tensor,
    compute_perturbed_grad: bool,
):
    """Explicit backward of lipschitz_ratio: returns (grad_out [B, K], grad_out_perturbed [N, B, K]
    or an empty [0] tensor).  coef_nb = grad_nb / (num_nb * in_norm_nb), 0 where either is 0."""
    diff, num, den, valid, safe_den = _lipschitz_parts(out, out_perturbed, in_norm)
    ok = valid & (num > 0)
    coef = torch.where(
        ok, grad.to(num.dtype) / torch.where(ok, num * safe_den, torch.ones_like(num)), torch.zeros_like(num)
    )
    term = diff * coef.unsqueeze(2)  # [N, B, K]
    grad_out = term.sum(dim=0).to(out.dtype)
    if compute_perturbed_grad:
        grad_pert = (-term).to(out_perturbed.dtype)
    else:
        grad_pert = out_perturbed.new_empty(0)
    return grad_out, grad_pert


def lipschitz_ratio_and_grad(
    grad: torch.Tensor, out: torch.Tensor, out_perturbed: torch.Tensor, in_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lipschitz_ratio(out, out_perturbed, in_norm), the gradient of sum(grad * ratio) w.r.t. out)."""
    ratio = lipschitz_ratio(out, out_perturbed, in_norm)
    return ratio, lipschitz_ratio_backward(grad, out, out_perturbed, in_norm, False)[0]


def accumulate_importance_(acc: list[torch.Tensor], grads: list[torch.Tensor], mode: str, scale: float) -> None:
    """acc[i] += scale * g^2 ("square") or scale * |g| ("abs"), in acc's opmath dtype."""
    for a, g in zip(acc, grads):
        op = opmath_dtype(a.dtype)
        go = g.to(op)
        term = go * go if mode == "square" else go.abs()
        if scale != 1.0:
            term = torch.tensor(scale, dtype=op, device=a.device) * term
        with torch.no_grad():  # an in-place op writes as the compiled one does, whatever the grad mode
            a.copy_((a.to(op) + term).to(a.dtype))


def ssd_dampen_(
    params: list[torch.Tensor],
    imp_forget: list[torch.Tensor],
    imp_full: list[torch.Tensor],
    alpha: float,
    lam: float,
    exponent: float,
) -> torch.Tensor:
    """SSD dampening (docs/METHODS.md §2), per element in the opmath dtype:
    selected = I_f > alpha * I_D; theta *= min(((lam * I_D) / I_f) ** exponent, 1) where selected.
    Returns the selected count per tensor (int64 [T], on the parameters' device).  A negative or NaN
    importance raises ValueError before any parameter is written, as in the kernels."""
    _check_importances(imp_forget, imp_full)
    counts = []
    for p, f, d in zip(params, imp_forget, imp_full):
        op = opmath_dtype(p.dtype)
        fo, do = f.to(op), d.to(op)
        a_ = torch.tensor(alpha, dtype=op, device=p.device)
        l_ = torch.tensor(lam, dtype=op, device=p.device)
        selected = fo > a_ * do
        w = (l_ * do) / torch.where(selected, fo, torch.ones_like(fo))
        if exponent != 1.0:
            w = w.pow(exponent)
        # min(w, 1) written so that a NaN factor (only I_f = inf with lam * I_D = inf) keeps theta.
        w = torch.where(w <= 1, w, torch.ones_like(w))
        new = torch.where(selected, p.to(op) * w, p.to(op))
        with torch.no_grad():
            p.copy_(new.to(p.dtype))
        counts.append(selected.sum())
    device = params[0].device if params else torch.device("cpu")
    if not counts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.stack(counts).to(torch.int64)


def _check_importances(imp_forget: list[torch.Tensor], imp_full: list[torch.Tensor]) -> None:
    """ValueError naming the first importance (imp_forget[i] before imp_full[i]) holding a value that is
    not >= 0; one host sync for all tensors.  Skipped while torch.compile traces."""
    if torch.compiler.is_compiling() or not imp_forget or imp_forget[0].device.type == "meta":
        return
    invalid = [~(t >= 0).all() for pair in zip(imp_forget, imp_full) for t in pair]
    if not bool(torch.stack(invalid).any()):
        return
    for k, bad in enumerate(invalid):
        if bool(bad):
            name = "imp_forget" if k % 2 == 0 else "imp_full"
            raise ValueError(
                f"ssd_dampen_: {name}[{k // 2}]: holds a negative or NaN value; importances must "
                "be >= 0 (a negative one would flip the parameter's sign)"
            )


def masked_reset_(params: list[torch.Tensor], init: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """params[i] = where(masks[i], init[i], params[i])."""
    for p, i, m in zip(params, init, masks):
        with torch.no_grad():
            p.copy_(torch.where(m, i.to(p.dtype), p))
