"""Multi-tensor in-place ops (accumulate_importance_, ssd_dampen_, masked_reset_): compiled kernels against
jit_unlearn.torch_ops and hand-computed values, opcheck, torch.compile, argument errors."""

import math
import os

import pytest
import torch

import jit_unlearn
import jit_unlearn.ops as ops
from conftest import expected_tier, requires_cuda
from jit_unlearn import _backend, torch_ops


def _has_compiled(op: str, key: str = "CPU") -> bool:
    return _backend.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_unlearn::{op}", key)


requires_compiled = pytest.mark.skipif(
    not all(_has_compiled(op) for op in ("accumulate_importance_", "ssd_dampen_", "masked_reset_")),
    reason="compiled CPU kernels of the multi-tensor ops not built",
)

# Sizes around the CPU block widths (8, 1024 elements) and the parallel grain (32768), plus empty tensors.
SHAPES = [(0,), (1,), (7,), (8,), (33,), (1023,), (1025,), (3, 5, 7), (64, 3, 3, 3), (0, 4), (40_003,)]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _op(name):
    return getattr(torch.ops.jit_unlearn, name).default


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaNs compare by position only; -0.0 differs from +0.0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    bits_a = actual.contiguous().view(_INT_VIEW[actual.dtype])[~nan_a]
    bits_e = expected.contiguous().view(_INT_VIEW[expected.dtype])[~nan_e]
    mismatch = (bits_a != bits_e).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.numel()} elements differ, first at {mismatch[:5].flatten().tolist()}"


def _importances(shapes, dtype, gen, alpha, zero_frac=0.1, select_frac=0.2):
    """imp_full (with exact zeros) and imp_forget with about select_frac of elements above alpha * imp_full."""
    full, forget = [], []
    for shape in shapes:
        d = torch.rand(shape, generator=gen, dtype=torch.float64)
        d[torch.rand(shape, generator=gen) < zero_frac] = 0
        ratio = torch.where(
            torch.rand(shape, generator=gen) < select_frac,
            torch.rand(shape, generator=gen, dtype=torch.float64) * 4 + 1.01,
            torch.rand(shape, generator=gen, dtype=torch.float64) * 0.99,
        )
        f = ratio * alpha * d + torch.rand(shape, generator=gen, dtype=torch.float64) * 1e-3
        f[torch.rand(shape, generator=gen) < zero_frac] = 0
        full.append(d.to(dtype))
        forget.append(f.to(dtype))
    return forget, full


def _randn_list(shapes, dtype, gen):
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _clone(tensors):
    return [t.clone() for t in tensors]


# --------------------------------------------------------------------------------------------------
# ssd_dampen_
# --------------------------------------------------------------------------------------------------


@requires_compiled
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("alpha,lam", [(10.0, 1.0), (1.0, 0.5), (0.0, 1.0), (2.5, 3.0)])
def test_ssd_dampen_matches_torch_ops_bitwise(dtype, alpha, lam):
    gen = torch.Generator().manual_seed(1)
    params = _randn_list(SHAPES, dtype, gen)
    f, d = _importances(SHAPES, dtype, gen, alpha)
    ours, ref = _clone(params), _clone(params)
    counts = _op("ssd_dampen_")(ours, f, d, alpha, lam, 1.0)
    ref_counts = torch_ops.ssd_dampen_(ref, f, d, alpha, lam, 1.0)
    assert counts.dtype == torch.int64 and counts.shape == (len(SHAPES),)
    assert torch.equal(counts, ref_counts)
    for a, b in zip(ours, ref):
        assert_bitwise(a, b)
    assert sum(counts.tolist()) > 0


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("exponent", [0.5, 2.0, 1.7, -0.3])
def test_ssd_dampen_exponent_close_to_torch_ops(dtype, exponent):
    gen = torch.Generator().manual_seed(2)
    params = _randn_list(SHAPES, dtype, gen)
    f, d = _importances(SHAPES, dtype, gen, 3.0)
    ours, ref = _clone(params), _clone(params)
    counts = _op("ssd_dampen_")(ours, f, d, 3.0, 0.8, exponent)
    assert torch.equal(counts, torch_ops.ssd_dampen_(ref, f, d, 3.0, 0.8, exponent))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fn_name", ["ops", "torch_ops", "torch.ops"])
def test_ssd_dampen_hand_computed(backend, fn_name):
    # alpha = 2: element 0: 1 > 1 is a tie (unselected); 1: 2 > 0.2 -> w = 0.1/2; 2: 3 > 2 -> w = 1/3;
    # 3: 0 > 0 (unselected); 4: I_D = 0 < I_f -> w = 0; 5: 0.5 > 0.2 -> w = 0.1/0.5 = 0.2;
    # 6: lam I_D / I_f = 2.2/2.1 > 1, clamped to 1.
    # Each tier explicitly: the public op on the tier the fixture forces, the pure-PyTorch function,
    # and the compiled op (only on the compiled pass).
    if fn_name == "torch.ops" and backend != "compiled":
        return
    fn = {"ops": ops.ssd_dampen_, "torch_ops": torch_ops.ssd_dampen_, "torch.ops": _op("ssd_dampen_")}[fn_name]
    assert _backend.backend_name("cpu") == ("cpu" if backend == "compiled" else "torch")
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0, -3.0, 1.0, 5.0])
    f = torch.tensor([1.0, 2.0, 3.0, 0.0, 5.0, 0.5, 2.1])
    d = torch.tensor([0.5, 0.1, 1.0, 0.0, 0.0, 0.1, 1.0])
    expected = torch.tensor([1.0, 0.05, 1.0 / 3.0, 1.0, -0.0, 0.2, 5.0])
    # lam = 1 except for element 6, which gets its own call with lam = 2.2
    p = [theta[:6].clone(), theta[6:].clone()]
    counts = fn([p[0]], [f[:6]], [d[:6]], 2.0, 1.0, 1.0)
    counts2 = fn([p[1]], [f[6:]], [d[6:]], 2.0, 2.2, 1.0)
    assert counts.tolist() == [4] and counts2.tolist() == [1]
    assert_bitwise(torch.cat(p), expected)


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssd_dampen_ties_zeros_inf(dtype):
    # NaN importances raise (tests/test_kernel_safety.py)
    inf = math.inf
    big = 1e38 if dtype == torch.float32 else 5e307
    #            tie   d=0  both0 f=0  f=inf  both inf d=inf inf/inf  normal
    f = torch.tensor([6.0, 2.0, 0.0, 0.0, inf, inf, 1.0, inf, 9.0], dtype=dtype)
    d = torch.tensor([2.0, 0.0, 0.0, 1.0, 1.0, inf, inf, big, 1.0], dtype=dtype)
    theta = torch.tensor([1.5, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 10.0, 11.0], dtype=dtype)
    # alpha = 3 (f == 3 d at element 0 is a tie; 3 big is finite), lam = 4 (4 big overflows to inf)
    ours, ref = [theta.clone()], [theta.clone()]
    counts = _op("ssd_dampen_")(ours, [f], [d], 3.0, 4.0, 1.0)
    ref_counts = torch_ops.ssd_dampen_(ref, [f], [d], 3.0, 4.0, 1.0)
    # selected: d=0 (1), f=inf with finite d (4), inf/inf (7), normal (8)
    assert counts.tolist() == [4] and ref_counts.tolist() == [4]
    expected = theta.clone()
    expected[1] = -0.0
    expected[4] = 0.0
    expected[8] = theta[8] * (torch.tensor(4.0, dtype=dtype) / 9.0)
    assert_bitwise(ours[0], expected)
    assert_bitwise(ours[0], ref[0])
    assert torch.isfinite(ours[0]).all()
    # alpha = 0: 0 * inf is NaN, so an infinite I_D is never selected
    p = [theta.clone()]
    _op("ssd_dampen_")(p, [f], [d], 0.0, 1.0, 1.0)
    assert torch.isfinite(p[0]).all()
    assert p[0][6] == theta[6]


@requires_compiled
def test_ssd_dampen_mixed_importance_dtypes_and_layouts():
    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 8, 3, 3), (33,), (5, 7)]
    params = _randn_list(shapes, torch.float32, gen)
    params[0] = params[0].to(memory_format=torch.channels_last)  # dense but not contiguous: accepted
    f, d = _importances(shapes, torch.float64, gen, 2.0)
    f[1] = f[1].to(torch.float16)  # f and d of different dtypes: both read in the opmath dtype
    d[2] = d[2].t().contiguous().t()  # non-contiguous read-only input
    ours, ref = _clone(params), _clone(params)
    ours[0] = ours[0].contiguous(memory_format=torch.channels_last)
    counts = _op("ssd_dampen_")(ours, f, d, 2.0, 1.0, 1.0)
    assert torch.equal(counts, torch_ops.ssd_dampen_(ref, f, d, 2.0, 1.0, 1.0))
    for a, b in zip(ours, ref):
        assert_bitwise(a.contiguous(), b.contiguous())
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


@requires_compiled
def test_ssd_dampen_half_params_float_importances():
    gen = torch.Generator().manual_seed(4)
    params = _randn_list(SHAPES, torch.float16, gen)
    f, d = _importances(SHAPES, torch.float32, gen, 5.0)
    ours, ref = _clone(params), _clone(params)
    counts = _op("ssd_dampen_")(ours, f, d, 5.0, 1.0, 1.0)
    assert torch.equal(counts, torch_ops.ssd_dampen_(ref, f, d, 5.0, 1.0, 1.0))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# accumulate_importance_
# --------------------------------------------------------------------------------------------------


@requires_compiled
@pytest.mark.parametrize("mode", ["square", "abs"])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1.0 / 3.0])
@pytest.mark.parametrize(
    "acc_dtype,grad_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float32, torch.float64),
        (torch.float64, torch.float16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ],
)
def test_accumulate_importance_matches_torch_ops(mode, scale, acc_dtype, grad_dtype):
    gen = torch.Generator().manual_seed(5)
    acc = [t.abs() for t in _randn_list(SHAPES, acc_dtype, gen)]
    grads = _randn_list(SHAPES, grad_dtype, gen)
    grads[2][0] = -0.0
    ours, ref = _clone(acc), _clone(acc)
    for _ in range(2):  # accumulation over two "batches"
        _op("accumulate_importance_")(ours, grads, mode, scale)
        torch_ops.accumulate_importance_(ref, grads, mode, scale)
    for a, b in zip(ours, ref):
        assert_bitwise(a, b)


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulate_importance_scale_one_is_published_update(dtype):
    # the published code: imp += grad.pow(2) per batch (and |grad| for the label-free variant)
    gen = torch.Generator().manual_seed(6)
    acc = [torch.zeros(s, dtype=dtype) for s in SHAPES]
    expected_sq, expected_abs = _clone(acc), _clone(acc)
    ours_sq, ours_abs = _clone(acc), _clone(acc)
    for _ in range(3):
        grads = _randn_list(SHAPES, dtype, gen)
        _op("accumulate_importance_")(ours_sq, grads, "square", 1.0)
        _op("accumulate_importance_")(ours_abs, grads, "abs", 1.0)
        for e_sq, e_abs, g in zip(expected_sq, expected_abs, grads):
            e_sq += g.pow(2)
            e_abs += g.abs()
    for a, b in zip(ours_sq + ours_abs, expected_sq + expected_abs):
        assert_bitwise(a, b)


# --------------------------------------------------------------------------------------------------
# masked_reset_
# --------------------------------------------------------------------------------------------------


@requires_compiled
@pytest.mark.parametrize(
    "dtype,init_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float64),
        (torch.float16, torch.float32),
    ],
)
def test_masked_reset_matches_where(dtype, init_dtype):
    gen = torch.Generator().manual_seed(7)
    params = _randn_list(SHAPES, dtype, gen)
    init = _randn_list(SHAPES, init_dtype, gen)
    masks = [torch.rand(s, generator=gen) < 0.3 for s in SHAPES]
    masks[3] = masks[3].t().contiguous().t() if masks[3].dim() == 2 else masks[3]
    ours, ref = _clone(params), _clone(params)
    _op("masked_reset_")(ours, init, masks)
    torch_ops.masked_reset_(ref, init, masks)
    for a, b, p, i, m in zip(ours, ref, params, init, masks):
        assert_bitwise(a, b)
        assert_bitwise(a, torch.where(m, i.to(dtype), p))


# --------------------------------------------------------------------------------------------------
# public API (both tiers), opcheck, torch.compile
# --------------------------------------------------------------------------------------------------


def _public_ops_run(gen_seed: int, device: str = "cpu"):
    """accumulate_importance_ twice, ssd_dampen_, then masked_reset_ with a random mask, through the
    public ops on the tier in force; returns every intermediate result."""
    gen = torch.Generator().manual_seed(gen_seed)
    shapes = [(64, 3, 3, 3), (64,), (10, 64), (0,), (1025,)]
    params = [t.to(device) for t in _randn_list(shapes, torch.float32, gen)]
    grads = [t.to(device) for t in _randn_list(shapes, torch.float32, gen)]
    init = [t.to(device) for t in _randn_list(shapes, torch.float32, gen)]
    masks = [(torch.rand(s, generator=gen) < 0.3).to(device) for s in shapes]
    acc_f = [torch.zeros(s, device=device) for s in shapes]
    acc_d = [torch.zeros(s, device=device) for s in shapes]
    ops.accumulate_importance_(acc_f, grads, "square", 1.0)
    ops.accumulate_importance_(acc_d, params, mode="abs", scale=0.5)
    dampened = _clone(params)
    counts = ops.ssd_dampen_(dampened, acc_f, acc_d, 1.0, 2.0, 1.0)
    reset = _clone(dampened)
    ops.masked_reset_(reset, init, masks)
    inputs = {"params": params, "grads": grads, "init": init, "masks": masks}
    return inputs, {"acc_f": acc_f, "acc_d": acc_d, "dampened": dampened, "counts": counts, "reset": reset}


def test_public_ops_agree_across_tiers():
    """The same calls on the compiled and the pure-PyTorch tier give bitwise the same tensors at every
    stage, and both equal a float64 transcription of the rules."""
    if not _backend.has_kernel("cpu"):
        pytest.skip("compiled CPU kernels not built: there is one tier to compare")
    runs = {}
    try:
        for tier in ("compiled", "torch"):
            _backend.force_backend(tier)
            assert _backend.backend_name("cpu") == ("cpu" if tier == "compiled" else "torch")
            runs[tier] = _public_ops_run(8)
    finally:
        _backend.force_backend(None)
    (inputs, compiled), (_, pure) = runs["compiled"], runs["torch"]
    assert torch.equal(compiled["counts"], pure["counts"])
    for key in ("acc_f", "acc_d", "dampened", "reset"):
        for a, b in zip(compiled[key], pure[key]):
            assert_bitwise(a, b)
    # float64 transcription: I_f = g^2, I_D = |theta| / 2; selected <=> I_f > 1 * I_D;
    # theta *= min(2 * I_D / I_f, 1) (the cap matters for I_D < I_f < 2 I_D); then theta = mask ? init : theta.
    total_selected = 0
    for i, (p, g, init, m) in enumerate(zip(inputs["params"], inputs["grads"], inputs["init"], inputs["masks"])):
        p64, g64 = p.double(), g.double()
        f, d = g64 * g64, 0.5 * p64.abs()
        torch.testing.assert_close(compiled["acc_f"][i].double(), f, rtol=1e-6, atol=0)
        torch.testing.assert_close(compiled["acc_d"][i].double(), d, rtol=1e-6, atol=0)
        selected = f > d
        total_selected += int(selected.sum())
        assert int(compiled["counts"][i]) == int(selected.sum())
        want = torch.where(selected, p64 * torch.clamp(2.0 * d / torch.where(selected, f, 1.0), max=1.0), p64)
        torch.testing.assert_close(compiled["dampened"][i].double(), want, rtol=1e-6, atol=1e-30)
        want = torch.where(m, init.double(), want)
        torch.testing.assert_close(compiled["reset"][i].double(), want, rtol=1e-6, atol=1e-30)
    # the run is not trivial: elements were dampened, some kept, and the reset left some dampened values
    assert 0 < total_selected < sum(p.numel() for p in inputs["params"])


@requires_compiled
def test_opcheck():
    gen = torch.Generator().manual_seed(9)
    shapes = [(4, 3), (5,), (0,), (2, 2, 2)]
    params = _randn_list(shapes, torch.float32, gen)
    f, d = _importances(shapes, torch.float32, gen, 2.0)
    grads = _randn_list(shapes, torch.float64, gen)
    masks = [torch.rand(s, generator=gen) < 0.5 for s in shapes]
    torch.library.opcheck(_op("ssd_dampen_"), (params, f, d, 2.0, 1.0, 1.0))
    torch.library.opcheck(_op("ssd_dampen_"), (params, f, d, 2.0, 0.5, 2.0))
    torch.library.opcheck(_op("accumulate_importance_"), (_clone(f), grads, "square", 0.5))
    torch.library.opcheck(_op("accumulate_importance_"), (_clone(f), grads, "abs", 1.0))
    torch.library.opcheck(_op("masked_reset_"), (params, d, masks))


@requires_compiled
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_keeps_list_mutations(compile_backend):
    def step(params, f, d, acc, grads, init, masks):
        torch.ops.jit_unlearn.accumulate_importance_(acc, grads, "square", 0.5)
        counts = torch.ops.jit_unlearn.ssd_dampen_(params, f, d, 2.0, 1.0, 1.0)
        torch.ops.jit_unlearn.masked_reset_(params, init, masks)
        return counts + 0

    gen = torch.Generator().manual_seed(10)
    shapes = [(6, 4), (9,), (3, 3, 3)]
    params = _randn_list(shapes, torch.float32, gen)
    f, d = _importances(shapes, torch.float32, gen, 2.0)
    acc = [t.abs() for t in _randn_list(shapes, torch.float32, gen)]
    grads = _randn_list(shapes, torch.float32, gen)
    init = _randn_list(shapes, torch.float32, gen)
    masks = [torch.rand(s, generator=gen) < 0.3 for s in shapes]

    p_ref, acc_ref = _clone(params), _clone(acc)
    torch_ops.accumulate_importance_(acc_ref, grads, "square", 0.5)
    counts_ref = torch_ops.ssd_dampen_(p_ref, f, d, 2.0, 1.0, 1.0)
    torch_ops.masked_reset_(p_ref, init, masks)

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    p_c, acc_c = _clone(params), _clone(acc)
    counts = compiled(p_c, f, d, acc_c, grads, init, masks)
    assert torch.equal(counts, counts_ref)
    for a, b in zip(p_c + acc_c, p_ref + acc_ref):
        assert_bitwise(a, b)


# --------------------------------------------------------------------------------------------------
# bad arguments: errors name the argument, and nothing is written
# --------------------------------------------------------------------------------------------------


def _ssd_args():
    params = [torch.ones(3, 4), torch.ones(5)]
    return params, [torch.full((3, 4), 9.0), torch.full((5,), 9.0)], [torch.ones(3, 4), torch.ones(5)]


# A case: (args, exception, pattern, ops_accepts).  ops_accepts marks a strided but non-overlapping
# in-place target: the compiled op rejects it (it writes flat memory), jit_unlearn.ops accepts it
# through a dense temporary (test_public_ops_accept_what_the_kernels_reject).  An overlapping target
# (expanded) is refused by both, before anything is written.
def _bad_ssd_cases():
    p, f, d = _ssd_args()
    return [
        ((p, f[:1], d, 1.0, 1.0, 1.0), ValueError, r"imp_forget", False),
        ((p, f, d + [torch.ones(2)], 1.0, 1.0, 1.0), ValueError, r"imp_full", False),
        ((p, f, [d[0], torch.ones(6)], 1.0, 1.0, 1.0), ValueError, r"imp_full\[1\]", False),
        ((p, [f[0].int(), f[1]], d, 1.0, 1.0, 1.0), TypeError, r"imp_forget\[0\]", False),
        (([p[0], p[1].long()], f, d, 1.0, 1.0, 1.0), TypeError, r"params\[1\]", False),
        (([p[0], torch.ones(10)[::2]], f, d, 1.0, 1.0, 1.0), ValueError, r"params\[1\]", True),
        (([p[0], torch.ones(1).expand(5)], f, d, 1.0, 1.0, 1.0), ValueError, r"params\[1\]", False),
        ((p, f, d, -1.0, 1.0, 1.0), ValueError, r"alpha", False),
        ((p, f, d, math.nan, 1.0, 1.0), ValueError, r"alpha", False),
        ((p, f, d, 1.0, -0.5, 1.0), ValueError, r"lam", False),
        ((p, f, d, 1.0, 1.0, math.inf), ValueError, r"exponent", False),
    ]


def _bad_accumulate_cases():
    acc, grads = [torch.zeros(3), torch.zeros(2, 2)], [torch.ones(3), torch.ones(2, 2)]
    expanded = torch.zeros(2, 2).t()[:, :1].expand(2, 2)  # two elements per memory location
    return [
        ((acc, grads[:1], "square", 1.0), ValueError, r"grads", False),
        ((acc, [grads[0], torch.ones(4)], "square", 1.0), ValueError, r"grads\[1\]", False),
        ((acc, [grads[0], grads[1].int()], "square", 1.0), TypeError, r"grads\[1\]", False),
        (([acc[0].int(), acc[1]], grads, "square", 1.0), TypeError, r"acc\[0\]", False),
        ((acc, grads, "cube", 1.0), ValueError, r"mode", False),
        ((acc, grads, "square", math.inf), ValueError, r"scale", False),
        (([acc[0], expanded], grads, "square", 1.0), ValueError, r"acc\[1\]", False),
        (([acc[0], torch.zeros(2, 4)[:, ::2]], grads, "square", 1.0), ValueError, r"acc\[1\]", True),
    ]


def _bad_reset_cases():
    p, i = [torch.zeros(3), torch.zeros(4)], [torch.ones(3), torch.ones(4)]
    m = [torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    return [
        ((p, i[:1], m), ValueError, r"init", False),
        ((p, i, m + m), ValueError, r"masks", False),
        ((p, i, [m[0], torch.ones(4)]), TypeError, r"masks\[1\]", False),
        ((p, i, [m[0], torch.ones(5, dtype=torch.bool)]), ValueError, r"masks\[1\]", False),
        ((p, [i[0], torch.ones(4, dtype=torch.int64)], m), TypeError, r"init\[1\]", False),
        (([p[0], torch.zeros(8)[::2]], i, m), ValueError, r"params\[1\]", True),
        (([p[0], torch.zeros(1).expand(4)], i, m), ValueError, r"params\[1\]", False),
    ]


_CASES = (
    [("ssd_dampen_", c) for c in _bad_ssd_cases()]
    + [("accumulate_importance_", c) for c in _bad_accumulate_cases()]
    + [("masked_reset_", c) for c in _bad_reset_cases()]
)
_BAD = [(via, op, c) for via in ("ops", "torch.ops") for op, c in _CASES if via == "torch.ops" or not c[3]]


@pytest.mark.parametrize("via,op,case", _BAD, ids=[f"{via}-{op}-{i}" for i, (via, op, _) in enumerate(_BAD)])
def test_bad_arguments_name_the_argument(via, op, case):
    """The error names the argument, and no tensor of the in-place list was written (the first
    targets included: every tensor is checked before any is written)."""
    args, exc, pattern, _ = case
    if via == "torch.ops" and not _has_compiled(op):
        pytest.skip("compiled CPU kernels not built")
    fn = getattr(ops, op) if via == "ops" else _op(op)
    before = [t.clone() for t in args[0]]
    with pytest.raises(exc, match=pattern):
        fn(*args)
    for t, b in zip(args[0], before):
        if t.dtype == b.dtype and t.is_floating_point():
            assert_bitwise(t, b)


_BUILDERS = {
    "ssd_dampen_": _bad_ssd_cases,
    "accumulate_importance_": _bad_accumulate_cases,
    "masked_reset_": _bad_reset_cases,
}
_ACCEPTED = [(op, k) for op, build in _BUILDERS.items() for k, c in enumerate(build()) if c[3]]


@pytest.mark.parametrize("op,k", _ACCEPTED, ids=[f"{op}-{k}" for op, k in _ACCEPTED])
def test_public_ops_accept_what_the_kernels_reject(backend, op, k):
    """A strided view as in-place target: jit_unlearn.ops updates it in place on every tier, bitwise as
    the same op on a dense copy."""
    args = _BUILDERS[op]()[k][0]  # fresh tensors: the op writes them
    views = list(args[0])
    dense = [t.contiguous().clone() for t in views]
    before = [t.clone() for t in dense]
    got = getattr(ops, op)(views, *args[1:])
    want = getattr(ops, op)(dense, *args[1:])
    if got is not None:
        assert torch.equal(got, want)
    for v, t in zip(views, dense):
        assert_bitwise(v.contiguous(), t)
    assert not torch.equal(views[1].contiguous(), before[1])  # the strided target was written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fraction", [0.002, 0.05, 0.3, 0.95])
def test_ssd_dampen_bitwise_at_every_selection_density(dtype, fraction):
    """Sparse and dense selections (the CPU kernel switches strategy per chunk) match the pure-PyTorch tier."""
    if not _has_compiled("ssd_dampen_"):
        pytest.skip("compiled CPU kernels not built")
    gen = torch.Generator().manual_seed(int(fraction * 1000))
    n = 70001
    theta = torch.randn(n, generator=gen).to(dtype)
    chosen = torch.rand(n, generator=gen) < fraction
    f = torch.where(chosen, 1.0 + 9.0 * torch.rand(n, generator=gen), 0.01 * torch.rand(n, generator=gen))
    d = torch.rand(n, generator=gen)
    d[torch.rand(n, generator=gen) < 0.05] = 0.0
    f[::991] = 0.0
    ours, expected = theta.clone(), theta.clone()
    counts = _op("ssd_dampen_")([ours], [f], [d], 2.0, 1.0, 1.0)
    expected_counts = torch_ops.ssd_dampen_([expected], [f], [d], 2.0, 1.0, 1.0)
    assert counts.tolist() == expected_counts.tolist() == [int((f > 2.0 * d).sum())]
    assert_bitwise(ours, expected)


def test_strided_inplace_operands(backend):
    """jit_unlearn.ops updates strided views in place on every tier, as it does dense tensors."""
    torch.manual_seed(0)
    base = [torch.randn(6, 8), torch.randn(5, 6)]
    f = [torch.rand(6, 3), torch.rand(2, 5)]
    d = [torch.rand(6, 3) * 0.5, torch.rand(2, 5) * 0.5]
    dense = [b[::2, :6].t().contiguous() if i == 0 else b[:2, :5].contiguous() for i, b in enumerate(base)]
    views = [base[0][::2, :6].t(), base[1][:2, :5]]
    assert not views[0].is_contiguous()
    counts_dense = ops.ssd_dampen_(dense, f, d, 1.0)
    counts_views = ops.ssd_dampen_(views, f, d, 1.0)
    assert counts_dense.tolist() == counts_views.tolist()
    for v, t in zip(views, dense):
        assert_bitwise(v, t)
    acc_view = torch.zeros(6, 6)[:, ::2]
    ops.accumulate_importance_([acc_view], [f[0]], "square", 1.0)
    assert_bitwise(acc_view, f[0] * f[0])
    reset_view = torch.zeros(6, 8)[::2, :6].t()
    ops.masked_reset_([reset_view], [torch.ones(6, 3)], [torch.ones(6, 3, dtype=torch.bool)])
    assert bool((reset_view == 1).all())


def test_device_mismatch_names_the_argument():
    p, f, d = _ssd_args()
    with pytest.raises(ValueError, match=r"imp_full\[1\]"):
        ops.ssd_dampen_(p, f, [d[0], d[1].to("meta")], 1.0)


# --------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------------------


@requires_cuda
def test_public_ops_on_cuda_run_the_expected_tier():
    """On a GPU the public ops run the CUDA kernels when they are built (else the pure-PyTorch tier),
    and give what the same calls give on the CPU; perturb's noise is bitwise the same."""
    tier = expected_tier("cuda")
    assert _backend.backend_name("cuda") == tier and jit_unlearn.backend_info()["active"]["cuda"] == tier
    if os.environ.get("FORCE_CUDA") == "1" and os.environ.get("JIT_UNLEARN_BACKEND") != "torch":
        assert tier == "cuda"  # a build asked for CUDA kernels must run them
    _, cpu = _public_ops_run(12)
    _, gpu = _public_ops_run(12, "cuda")
    assert gpu["counts"].device.type == "cuda" and torch.equal(gpu["counts"].cpu(), cpu["counts"])
    for key in ("acc_f", "acc_d", "dampened", "reset"):
        for a, b in zip(gpu[key], cpu[key]):
            assert a.device.type == "cuda"
            torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0)
    x = torch.randn(6, 3, 9)
    got, want = ops.perturb(x.cuda(), 3, 0.5, seed=4, offset=2), ops.perturb(x, 3, 0.5, seed=4, offset=2)
    assert torch.equal(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.skipif(not _has_compiled("ssd_dampen_", "CUDA"), reason="CUDA kernels not built")
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_matches_cpu_torch_ops(dtype):
    gen = torch.Generator().manual_seed(11)
    # > 48 tensors and > 320 chunks of 65536: several launches, a tensor split across launches
    shapes = SHAPES + [(257,)] * 60 + [(21_000_001,)]
    params = _randn_list(shapes, dtype, gen)
    f, d = _importances(shapes, dtype, gen, 4.0)
    ref = _clone(params)
    ref_counts = torch_ops.ssd_dampen_(ref, f, d, 4.0, 1.0, 1.0)
    cuda = [t.cuda() for t in params]
    counts = _op("ssd_dampen_")(cuda, [t.cuda() for t in f], [t.cuda() for t in d], 4.0, 1.0, 1.0)
    assert counts.device.type == "cuda"
    assert torch.equal(counts.cpu(), ref_counts)
    for a, b in zip(cuda, ref):
        assert_bitwise(a.cpu(), b)

    grads = _randn_list(shapes, dtype, gen)
    acc_ref = [t.abs() for t in _clone(f)]
    acc = [t.cuda() for t in acc_ref]
    torch_ops.accumulate_importance_(acc_ref, grads, "square", 0.5)
    _op("accumulate_importance_")(acc, [g.cuda() for g in grads], "square", 0.5)
    for a, b in zip(acc, acc_ref):
        assert_bitwise(a.cpu(), b)

    masks = [torch.rand(s, generator=gen) < 0.5 for s in shapes]
    torch_ops.masked_reset_(ref, f, masks)
    _op("masked_reset_")(cuda, [t.cuda() for t in f], [m.cuda() for m in masks])
    for a, b in zip(cuda, ref):
        assert_bitwise(a.cpu(), b)


@requires_cuda
@pytest.mark.skipif(not _has_compiled("ssd_dampen_", "CUDA"), reason="CUDA kernels not built")
def test_cuda_device_mismatch_names_the_argument():
    p = [torch.ones(4, device="cuda"), torch.ones(4, device="cuda")]
    f = [torch.ones(4, device="cuda"), torch.ones(4)]
    with pytest.raises(ValueError, match=r"imp_forget\[1\]"):
        _op("ssd_dampen_")(p, f, [torch.ones(4, device="cuda")] * 2, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        _op("accumulate_importance_")(p, f, "square", 1.0)
