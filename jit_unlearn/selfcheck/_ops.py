"""Op checks: every op on the compiled tier against the pure-PyTorch tier on each device (and run to
run), and the CUDA kernels against the CPU kernels.

Bitwise where the two sides compute the same float operations in the same order: perturb's and
_perturb_out's x_tilde (the same Philox noise on every tier and device), _perturb_out against
perturb, _lipschitz_ratio_and_grad against the separate forward and backward ops of its tier,
accumulate_importance_, ssd_dampen_ with exponent 1 (and its counts always), masked_reset_.
Everything that sums (the norms of perturb, the Lipschitz ratios and gradients) has a tolerance,
as has ssd_dampen_ with exponent != 1 (pow differs in the last bits between libraries).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import torch

from .. import _backend, ops
from ._report import FAIL, PASS, SKIP, Recorder, Tally, bitwise, close, tier, verdict

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
DTYPES = (F32, F64, F16, BF16)

# (rtol, atol) by the dtype of the compared tensor.
NORM_TOL = {F64: (1e-10, 1e-12), F32: (1e-5, 1e-6)}  # input norms (accumulated in float32/float64)
LIPSCHITZ_TOL = {F64: (1e-12, 1e-12), F32: (1e-5, 1e-6), F16: (2e-3, 1e-3), BF16: (1.6e-2, 1e-2)}
POW_TOL = {F64: (1e-7, 1e-7), F32: (1.3e-6, 1e-5), F16: (1e-3, 1e-5), BF16: (1.6e-2, 1e-5)}

# An output to compare: (label, tensor on the CPU, None for bitwise or (rtol, atol)).
Output = tuple[str, torch.Tensor, "tuple[float, float] | None"]


@dataclasses.dataclass
class OpSpec:
    """How to check one op: its input cases, and how each tier computes the outputs for one case.

    compiled(device, case) and torch_tier(device, case) return lists of Outputs; `also` is an
    optional second compiled computation (e.g. the unfused ops) that must agree bitwise with
    `compiled`."""

    name: str
    cases: Callable[[bool], list[tuple[str, tuple]]]
    compiled: Callable[[str, tuple], list[Output]]
    torch_tier: Callable[[str, tuple], list[Output]]
    also: tuple[str, Callable[[str, tuple], list[Output]]] | None = None


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- perturb and _perturb_out


def _perturb_cases(quick: bool) -> list[tuple[str, tuple]]:
    g = _gen(1)
    shapes = [((9, 3, 5, 7), 4), ((6, 231), 7), ((5, 3), 2), ((7,), 3), ((4, 0), 2), ((0, 4), 2)]
    if quick:
        shapes = shapes[::2]
    cases = []
    for dtype in DTYPES:
        for shape, n in shapes:
            for clamp in (True, False):
                x = (torch.randn(shape, generator=g, dtype=F64) * 2).to(dtype)
                cases.append(
                    (f"{str(dtype)[6:]} {shape} N={n} clamp={clamp}", (x, n, 0.6, 1000 + len(cases), 17, clamp))
                )
    big = torch.randn(16 if quick else 64, 3, 32, 32, generator=g)
    cases.append(("float32 CIFAR batch N=3", (big, 3, 0.5, 7, 2, True)))
    cases.append(
        ("float32 seed/offset near 2^64", (torch.randn(5, 11, generator=g), 3, 1.0, 2**63 + 5, 2**64 - 1, True))
    )
    return cases


def _perturb_outputs(x_tilde, in_norm) -> list[Output]:
    return [("x_tilde", _cpu(x_tilde), None), ("in_norm", _cpu(in_norm), NORM_TOL[in_norm.dtype])]


def _perturb(device: str, case: tuple) -> list[Output]:
    x, *rest = case
    return _perturb_outputs(*ops.perturb(x.to(device), *rest))


def _perturb_compiled(device: str, case: tuple) -> list[Output]:
    with tier("compiled"):
        return _perturb(device, case)


def _perturb_torch(device: str, case: tuple) -> list[Output]:
    with tier("torch"):
        return _perturb(device, case)


def _signed64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def _perturb_out(device: str, case: tuple) -> list[Output]:
    x, n, sigma, seed, offset, clamp = case
    x = x.to(device)
    # Stale NaNs in the buffers must not leak into the result.
    x_tilde = torch.full((n, *x.shape), float("nan"), dtype=x.dtype, device=device)
    in_norm = torch.full((n, x.shape[0]), float("nan"), dtype=_opmath(x.dtype), device=device)
    torch.ops.jit_unlearn._perturb_out(x, n, sigma, _signed64(seed), _signed64(offset), clamp, x_tilde, in_norm)
    return _perturb_outputs(x_tilde, in_norm)


# ---------------------------------------------------------------- Lipschitz ratio and its gradients


def _lipschitz_cases(quick: bool) -> list[tuple[str, tuple]]:
    g = _gen(2)
    shapes = [(1, 1, 1), (3, 5, 7), (2, 4, 16), (4, 3, 33), (25, 16, 100), (6, 2, 257), (0, 3, 4), (2, 3, 0)]
    if quick:
        shapes = shapes[1::2]
    cases = []
    for dtype in DTYPES:
        for n, b, k in shapes:
            out = torch.randn(b, k, generator=g, dtype=F64)
            pert = out + 0.3 * torch.randn(n, b, k, generator=g, dtype=F64)
            in_norm = 0.5 + torch.rand(n, b, generator=g, dtype=F64)
            if n > 1 and b > 1:
                in_norm[0, 0] = 0.0  # the in_norm <= 0 guard
                pert[1, 1] = out[1]  # and the zero-difference guard
            grad = torch.randn(n, b, generator=g, dtype=F64)
            op = _opmath(dtype)
            cases.append(
                (f"{str(dtype)[6:]} N,B,K={n},{b},{k}", (out.to(dtype), pert.to(dtype), in_norm.to(op), grad.to(op)))
            )
    return cases


def _lipschitz_public(device: str, case: tuple) -> list[Output]:
    out, pert, in_norm, grad = (t.to(device) for t in case)
    leaf_out, leaf_pert = out.clone().requires_grad_(), pert.clone().requires_grad_()
    ratio = ops.lipschitz_ratio(leaf_out, leaf_pert, in_norm)
    (ratio * grad).sum().backward()
    graph_free = ops.lipschitz_ratio_backward(grad, out, pert, in_norm)
    tol_r, tol_g = LIPSCHITZ_TOL[ratio.dtype], LIPSCHITZ_TOL[out.dtype]
    return [
        ("ratio", _cpu(ratio), tol_r),
        ("grad out", _cpu(leaf_out.grad), tol_g),
        ("grad out_perturbed", _cpu(leaf_pert.grad), tol_g),
        ("lipschitz_ratio_backward", _cpu(graph_free), tol_g),
    ]


def _lipschitz_compiled(device: str, case: tuple) -> list[Output]:
    with tier("compiled"):
        return _lipschitz_public(device, case)


def _lipschitz_torch(device: str, case: tuple) -> list[Output]:
    with tier("torch"):
        return _lipschitz_public(device, case)


def _fused_outputs(ratio, grad_out) -> list[Output]:
    return [
        ("ratio", _cpu(ratio), LIPSCHITZ_TOL[ratio.dtype]),
        ("grad out", _cpu(grad_out), LIPSCHITZ_TOL[grad_out.dtype]),
    ]


def _fused(device: str, case: tuple) -> list[Output]:
    out, pert, in_norm, grad = (t.to(device) for t in case)
    return _fused_outputs(*torch.ops.jit_unlearn._lipschitz_ratio_and_grad(grad, out, pert, in_norm))


def _fused_by_separate_compiled_ops(device: str, case: tuple) -> list[Output]:
    out, pert, in_norm, grad = (t.to(device) for t in case)
    ratio = torch.ops.jit_unlearn.lipschitz_ratio(out, pert, in_norm)
    grad_out = torch.ops.jit_unlearn._lipschitz_ratio_backward(grad, out, pert, in_norm, False)[0]
    return [(label, t, None) for label, t, _ in _fused_outputs(ratio, grad_out)]


def _fused_torch(device: str, case: tuple) -> list[Output]:
    out, pert, in_norm, grad = (t.to(device) for t in case)
    with tier("torch"):
        return _fused_outputs(
            ops.lipschitz_ratio(out, pert, in_norm), ops.lipschitz_ratio_backward(grad, out, pert, in_norm)
        )


# ---------------------------------------------------------------- multi-tensor in-place ops

# Around the CPU block widths (8, 1024 elements) and the parallel grain (32768), with empty tensors.
SHAPES = [(0,), (1,), (7,), (8,), (33,), (1023,), (1025,), (3, 5, 7), (64, 3, 3, 3), (0, 4), (40_003,)]
# One long list (outside quick mode): more tensors than one CUDA launch takes, one of several chunks.
LONG = SHAPES + [(257,)] * 60 + [(700_001,)]


def _randn_list(g, dtype, scale=1.0, shapes=SHAPES):
    return [(torch.randn(s, generator=g, dtype=F64) * scale).to(dtype) for s in shapes]


def _importances(g, dtype, alpha, shapes=SHAPES):
    """imp_full with exact zeros and imp_forget with about 20 % of the elements above alpha * imp_full."""
    full, forget = [], []
    for s in shapes:
        d = torch.rand(s, generator=g, dtype=F64)
        d[torch.rand(s, generator=g) < 0.1] = 0
        above = torch.rand(s, generator=g) < 0.2
        ratio = torch.where(
            above, 1.01 + 4 * torch.rand(s, generator=g, dtype=F64), 0.99 * torch.rand(s, generator=g, dtype=F64)
        )
        f = ratio * max(alpha, 1.0) * d + 1e-3 * torch.rand(s, generator=g, dtype=F64)
        f[torch.rand(s, generator=g) < 0.1] = 0
        full.append(d.to(dtype))
        forget.append(f.to(dtype))
    return forget, full


def _accumulate_cases(quick: bool) -> list[tuple[str, tuple]]:
    g = _gen(3)
    cases = []
    for dtype in DTYPES:
        for mode, scale in (("square", 1.0), ("abs", 0.5), ("square", 0.25))[: 2 if quick else 3]:
            acc = [t.abs() for t in _randn_list(g, dtype)]
            cases.append((f"{str(dtype)[6:]} {mode} scale={scale}", (acc, _randn_list(g, dtype), mode, scale)))
    acc = [t.abs() for t in _randn_list(g, F32)]
    cases.append(("float32 acc, bfloat16 grads", (acc, _randn_list(g, BF16), "square", 1.0)))
    if not quick:
        acc = [t.abs() for t in _randn_list(g, F32, shapes=LONG)]
        cases.append((f"float32, {len(LONG)} tensors", (acc, _randn_list(g, F32, shapes=LONG), "square", 0.5)))
    return cases


def _accumulate(device: str, case: tuple) -> list[Output]:
    acc, grads, mode, scale = case
    acc = [t.to(device, copy=True) for t in acc]
    ops.accumulate_importance_(acc, [t.to(device) for t in grads], mode, scale)
    return [(f"acc[{i}]", _cpu(t), None) for i, t in enumerate(acc)]


def _dampen_cases(quick: bool) -> list[tuple[str, tuple]]:
    g = _gen(4)
    cases = []
    settings = (
        (10.0, 1.0, 1.0),
        (1.0, 0.5, 1.0),
        (0.0, 1.0, 1.0),
        (2.5, 3.0, 1.0),
        (3.0, 0.8, 0.5),
        (3.0, 0.8, 1.7),
        (3.0, 0.8, -0.3),
    )
    for dtype in DTYPES:
        for alpha, lam, exponent in settings[::2] if quick else settings:
            forget, full = _importances(g, dtype, alpha)
            cases.append(
                (
                    f"{str(dtype)[6:]} alpha={alpha} lam={lam} exponent={exponent}",
                    (_randn_list(g, dtype), forget, full, alpha, lam, exponent),
                )
            )
    if not quick:
        forget, full = _importances(g, F32, 4.0, shapes=LONG)
        cases.append((f"float32, {len(LONG)} tensors", (_randn_list(g, F32, shapes=LONG), forget, full, 4.0, 1.0, 1.0)))
    return cases


def _dampen(device: str, case: tuple) -> list[Output]:
    params, forget, full, alpha, lam, exponent = case
    params = [t.to(device, copy=True) for t in params]
    counts = ops.ssd_dampen_(params, [t.to(device) for t in forget], [t.to(device) for t in full], alpha, lam, exponent)
    if exponent == 1.0:
        return [("counts", _cpu(counts), None)] + [(f"params[{i}]", _cpu(t), None) for i, t in enumerate(params)]
    crit = POW_TOL[params[0].dtype]
    return [("counts", _cpu(counts), None)] + [
        (f"params (exponent != 1)[{i}]", _cpu(t), crit) for i, t in enumerate(params)
    ]


def _reset_cases(quick: bool) -> list[tuple[str, tuple]]:
    g = _gen(5)
    cases = []
    for dtype, shapes in [(d, SHAPES) for d in DTYPES] + ([] if quick else [(F32, LONG)]):
        masks = [torch.rand(s, generator=g) < 0.5 for s in shapes]
        cases.append(
            (
                f"{str(dtype)[6:]}, {len(shapes)} tensors",
                (_randn_list(g, dtype, shapes=shapes), _randn_list(g, dtype, 3.0, shapes=shapes), masks),
            )
        )
    return cases


def _reset(device: str, case: tuple) -> list[Output]:
    params, init, masks = case
    params = [t.to(device, copy=True) for t in params]
    ops.masked_reset_(params, [t.to(device) for t in init], [m.to(device) for m in masks])
    return [(f"params[{i}]", _cpu(t), None) for i, t in enumerate(params)]


def _tiered(fn):
    """compiled and torch-tier runners of a public op."""

    def compiled(device, case):
        with tier("compiled"):
            return fn(device, case)

    def torch_tier(device, case):
        with tier("torch"):
            return fn(device, case)

    return compiled, torch_tier


SPECS = [
    OpSpec("perturb", _perturb_cases, _perturb_compiled, _perturb_torch),
    OpSpec(
        "_perturb_out", _perturb_cases, _perturb_out, _perturb_torch, also=("perturb (compiled)", _perturb_compiled)
    ),
    OpSpec("lipschitz_ratio + backward", _lipschitz_cases, _lipschitz_compiled, _lipschitz_torch),
    OpSpec(
        "_lipschitz_ratio_and_grad",
        _lipschitz_cases,
        _fused,
        _fused_torch,
        also=("lipschitz_ratio + _lipschitz_ratio_backward (compiled)", _fused_by_separate_compiled_ops),
    ),
    OpSpec("accumulate_importance_", _accumulate_cases, *_tiered(_accumulate)),
    OpSpec("ssd_dampen_", _dampen_cases, *_tiered(_dampen)),
    OpSpec("masked_reset_", _reset_cases, *_tiered(_reset)),
]


# ---------------------------------------------------------------- driver


def _compare(
    tallies: dict[str, Tally],
    got: list[Output],
    want: list[Output],
    case: str,
    bitwise_only: bool = False,
    prefix: str = "",
) -> None:
    for (label, a, crit), (_, b, _) in zip(got, want):
        key = prefix or label.split("[")[0]
        tally = tallies.setdefault(key, Tally(key))
        tally.add(bitwise(a, b) if crit is None or bitwise_only else close(a, b, *crit), f"{case} {label}")


def _run_cases(fn, device: str, cases) -> list[list[Output]]:
    return [fn(device, args) for _, args in cases]


def check_ops(rec: Recorder, devices: list[str], quick: bool) -> None:
    """Record one line per op and device (compiled vs torch tier, run to run), and one per op for
    CUDA vs CPU when CUDA is among `devices`."""
    compiled_on = {dev: _backend.has_kernel(dev) for dev in devices}
    for spec in SPECS:
        cases = spec.cases(quick)
        cache: dict[str, list[list[Output]]] = {}
        for device in devices:
            if not compiled_on[device]:
                rec.run(
                    "ops",
                    f"{spec.name}: compiled vs torch tier",
                    device,
                    lambda: (SKIP, "no compiled kernels for this device; the pure-PyTorch tier runs"),
                )
                continue

            def tier_check(device=device, cases=cases, spec=spec, cache=cache):
                tallies: dict[str, Tally] = {}
                first = cache[device] = _run_cases(spec.compiled, device, cases)
                for (label, _), got, want in zip(cases, first, _run_cases(spec.torch_tier, device, cases)):
                    _compare(tallies, got, want, label)
                if spec.also is not None:
                    what, fn = spec.also
                    for (label, _), got, want in zip(cases, first, _run_cases(fn, device, cases)):
                        _compare(tallies, got, want, label, bitwise_only=True, prefix=f"vs {what}")
                for (label, _), got, again in zip(cases, first, _run_cases(spec.compiled, device, cases)):
                    _compare(tallies, got, again, label, bitwise_only=True, prefix="run to run")
                return verdict(list(tallies.values()), len(cases))

            rec.run("ops", f"{spec.name}: compiled vs torch tier", device, tier_check)
        if "cuda" in devices and all(compiled_on.get(d) for d in ("cpu", "cuda")):

            def device_check(cases=cases, cache=cache):
                if "cpu" not in cache or "cuda" not in cache:
                    return FAIL, "the compiled runs above failed; nothing to compare"
                tallies: dict[str, Tally] = {}
                for (label, _), got, want in zip(cases, cache["cuda"], cache["cpu"]):
                    _compare(tallies, got, want, label)
                return verdict(list(tallies.values()), len(cases))

            rec.run("ops", f"{spec.name}: CUDA vs CPU kernels", "cuda", device_check)


def check_backend(rec: Recorder, devices: list[str], requested: str) -> dict:
    """Record what is compiled and active; return backend_info()."""
    info = _backend.backend_info()

    def loaded():
        if info["extension_loaded"]:
            return PASS, "jit_unlearn._C loaded"
        if importlib.util.find_spec("jit_unlearn._C") is None:
            return SKIP, "not built; every op runs on the pure-PyTorch tier (pip install --no-build-isolation -e .)"
        return FAIL, f"the extension is there but failed to load: {info.get('load_error')}"

    rec.run("backend", "compiled extension", "cpu", loaded)
    for device in devices:

        def kernels(device=device):
            if _backend.has_kernel(device):
                return PASS, f"every op has a {device.upper()} kernel; active tier: {info['active'].get(device)}"
            if device == "cuda" and requested == "cuda":
                return FAIL, "--device cuda, but the extension has no CUDA kernels (build with FORCE_CUDA=1)"
            return SKIP, f"no compiled {device.upper()} kernels; the pure-PyTorch tier runs on {device}"

        rec.run("backend", "compiled kernels", device, kernels)
    return info
