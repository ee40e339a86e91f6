"""The ops refuse what they cannot do correctly, before writing anything: unsupported dtypes (float8),
operands that share memory with a written one, mixed devices reaching the fake kernels, negative or NaN
SSD importances.  Every case runs on the compiled kernels (torch.ops.jit_unlearn.*, which have no Python
checks in front of them) and through jit_unlearn.ops on both tiers, with the same error."""

import math

import pytest
import torch

import jit_unlearn.ops as ops
from jit_unlearn import _backend, torch_ops

requires_compiled = pytest.mark.skipif(not _backend.has_kernel("cpu"), reason="compiled CPU kernels not built")
FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]
_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.bool: torch.uint8,
}


def _lib(name):
    return getattr(torch.ops.jit_unlearn, name).default


def _snapshot(tensors):
    return [t.clone() for t in tensors]


def _assert_unchanged(tensors, before):
    """Bitwise, NaN payloads included: nothing may have been written."""
    for t, b in zip(tensors, before):
        bits = _BITS.get(t.dtype, torch.uint8)  # float8: one byte
        assert torch.equal(t.view(bits), b.view(bits))


def _callers(name):
    """(label, fn): the compiled op itself (when built) and the public wrapper on each tier."""
    callers = [("ops-torch", "torch", getattr(ops, name))]
    if _backend.has_kernel("cpu"):
        callers += [("ops-compiled", "compiled", getattr(ops, name)), ("torch.ops", None, _lib(name))]
    return callers


def _run(tier, fn, *args):
    _backend.force_backend(tier)
    try:
        return fn(*args)
    finally:
        _backend.force_backend(None)


def _ssd_lists(n=3):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(40, generator=gen) for _ in range(n)]
    full = [torch.rand(40, generator=gen) for _ in range(n)]
    forget = [d * 3 + torch.rand(40, generator=gen) for d in full]
    return params, forget, full


# --------------------------------------------------------------------------------------------------
# dtypes: exactly float32/float64/float16/bfloat16 (float8 passes at::isFloatingType)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not FLOAT8, reason="this torch has no float8 dtypes")
@pytest.mark.parametrize("dtype", FLOAT8)
@pytest.mark.parametrize("position", ["params", "imp_forget", "imp_full"])
def test_ssd_dampen_float8_rejected_before_any_write(dtype, position):
    for _label, tier, fn in _callers("ssd_dampen_"):
        params, forget, full = _ssd_lists()
        lists = {"params": params, "imp_forget": forget, "imp_full": full}
        lists[position][2] = lists[position][2].to(dtype)  # the last tuple: earlier ones would be written first
        before = _snapshot(params)
        with pytest.raises(TypeError, match=rf"{position}\[2\]"):
            _run(tier, fn, params, forget, full, 2.0, 1.0, 1.0)
        _assert_unchanged(params, before)


@pytest.mark.skipif(not FLOAT8, reason="this torch has no float8 dtypes")
def test_float8_rejected_by_every_op():
    f8 = FLOAT8[0]
    for label, tier, fn in _callers("accumulate_importance_"):
        acc = [torch.zeros(5), torch.zeros(5)]
        with pytest.raises(TypeError, match=r"grads\[1\]"):
            _run(tier, fn, acc, [torch.ones(5), torch.ones(5).to(f8)], "square", 1.0)
        assert all(bool((a == 0).all()) for a in acc), label
        with pytest.raises(TypeError, match=r"acc\[1\]"):
            _run(tier, fn, [torch.zeros(5), torch.zeros(5).to(f8)], [torch.ones(5)] * 2, "square", 1.0)
    for label, tier, fn in _callers("masked_reset_"):
        params = [torch.zeros(5), torch.zeros(5)]
        with pytest.raises(TypeError, match=r"init\[1\]"):
            _run(tier, fn, params, [torch.ones(5), torch.ones(5).to(f8)], [torch.ones(5, dtype=torch.bool)] * 2)
        assert all(bool((p == 0).all()) for p in params), label
    x = torch.randn(4, 3).to(f8)
    with pytest.raises(TypeError, match=r"x"):
        ops.perturb(x, 2, 0.1)
    out, pert, norm = torch.randn(3, 4), torch.randn(2, 3, 4), torch.rand(2, 3)
    with pytest.raises(TypeError, match=r"in_norm"):
        ops.lipschitz_ratio(out, pert, norm.to(f8))
    with pytest.raises(TypeError, match=r"out"):
        ops.lipschitz_ratio(out.to(f8), pert.to(f8), norm)
    if _backend.has_kernel("cpu"):
        lib = torch.ops.jit_unlearn
        with pytest.raises(TypeError, match=r"x"):
            lib.perturb(x, 2, 0.1, 0, 0, True)
        with pytest.raises(TypeError, match=r"in_norm"):
            lib.lipschitz_ratio(out, pert, norm.to(f8))
        with pytest.raises(TypeError, match=r"grad"):
            lib._lipschitz_ratio_backward(norm.to(f8), out, pert, norm, False)


# --------------------------------------------------------------------------------------------------
# memory overlap: a written operand shares memory with no other operand
# --------------------------------------------------------------------------------------------------


def _overlap_cases():
    """(name, build() -> (args, written list), message pattern)."""

    def same_param_twice():
        p = torch.randn(8)
        return ([p, p], [torch.rand(8) * 9, torch.rand(8) * 9], [torch.rand(8)] * 2, 1.0, 1.0, 1.0), [p]

    def overlapping_param_views():
        buf = torch.randn(20)
        return ([buf[:12], buf[8:]], [torch.rand(12) * 9, torch.rand(12) * 9], [torch.rand(12)] * 2, 1.0, 1.0, 1.0), [
            buf
        ]

    def param_is_importance():
        p = torch.rand(8) + 1
        return ([p], [p], [torch.rand(8) * 0.1], 1.0, 1.0, 1.0), [p]

    def param_overlaps_other_index_importance():
        buf = torch.rand(16) + 1
        return ([buf[:8], torch.randn(8)], [torch.rand(8), buf[4:12]], [torch.rand(8) * 0.1] * 2, 1.0, 1.0, 1.0), [buf]

    def param_overlaps_strided_importance():
        # the read operand is strided: its whole extent counts (conservative), element 0 is shared anyway
        buf = torch.rand(4, 4) + 1
        return ([buf[0]], [buf[:, 0]], [torch.rand(4) * 0.1], 1.0, 1.0, 1.0), [buf]

    return [
        ("ssd_dampen_", same_param_twice, r"params\[0\] and params\[1\] are the same memory"),
        ("ssd_dampen_", overlapping_param_views, r"params\[0\] and params\[1\] share memory"),
        ("ssd_dampen_", param_is_importance, r"params\[0\] and imp_forget\[0\] are the same memory"),
        ("ssd_dampen_", param_overlaps_other_index_importance, r"params\[0\] and imp_forget\[1\] share memory"),
        ("ssd_dampen_", param_overlaps_strided_importance, r"params\[0\] and imp_forget\[0\] share memory"),
    ]


@pytest.mark.parametrize("case", _overlap_cases(), ids=lambda c: c[1].__name__)
def test_ssd_dampen_refuses_overlap(case):
    name, build, pattern = case
    for _label, tier, fn in _callers(name):
        args, memory = build()
        before = _snapshot(memory)
        with pytest.raises(ValueError, match=pattern):
            _run(tier, fn, *args)
        _assert_unchanged(memory, before)


def test_accumulate_and_reset_refuse_overlap():
    for label, tier, fn in _callers("accumulate_importance_"):
        a = torch.rand(6)
        with pytest.raises(ValueError, match=r"accumulate_importance_: acc\[0\] and grads\[0\] are the same memory"):
            _run(tier, fn, [a], [a], "square", 1.0)
        buf = torch.zeros(10)
        with pytest.raises(ValueError, match=r"acc\[0\] and acc\[1\] share memory"):
            _run(tier, fn, [buf[:6], buf[4:]], [torch.ones(6)] * 2, "abs", 1.0)
        assert bool((buf == 0).all()), label
    for label, tier, fn in _callers("masked_reset_"):
        p = torch.zeros(6)
        init = torch.ones(12)
        with pytest.raises(ValueError, match=r"masked_reset_: params\[1\] and init\[0\] share memory"):
            _run(
                tier, fn, [torch.zeros(6), init[3:9]], [init[:6], torch.ones(6)], [torch.ones(6, dtype=torch.bool)] * 2
            )
        with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] are the same memory"):
            _run(tier, fn, [p, p], [torch.ones(6)] * 2, [torch.ones(6, dtype=torch.bool)] * 2)
        assert bool((p == 0).all()) and bool((init == 1).all()), label


def test_read_operands_may_share_memory():
    """Only written operands must be apart: one tensor as both importances, or as several grads, is fine."""
    for label, tier, fn in _callers("ssd_dampen_"):
        params, forget, full = _ssd_lists(2)
        expected = _snapshot(params)
        counts = _run(tier, fn, params, [forget[0], forget[0]], [full[0], full[0]], 2.0, 1.0, 1.0)
        ref_counts = torch_ops.ssd_dampen_(expected, [forget[0], forget[0]], [full[0], full[0]], 2.0, 1.0, 1.0)
        assert counts.tolist() == ref_counts.tolist()
        for a, b in zip(params, expected):
            assert torch.equal(a, b), label
    g = torch.randn(5)
    acc = [torch.zeros(5), torch.zeros(5)]
    ops.accumulate_importance_(acc, [g, g], "square", 1.0)
    assert torch.equal(acc[0], g * g) and torch.equal(acc[1], g * g)


@pytest.mark.parametrize("which", ["x_tilde_is_x", "in_norm_in_x", "in_norm_in_x_tilde"])
def test_perturb_out_refuses_overlap(which):
    buf = torch.randn(2 * 4 * 3 + 2 * 4 + 12)
    x = buf[:12].view(4, 3)
    x_tilde = torch.empty(2, 4, 3)
    in_norm = torch.empty(2, 4)
    if which == "x_tilde_is_x":
        x_tilde = buf[:24].view(2, 4, 3)
        pattern = r"_perturb_out: x and x_tilde share memory"
    elif which == "in_norm_in_x":
        in_norm = buf[4:12].view(2, 4)
        pattern = r"_perturb_out: x and in_norm share memory"
    else:
        x_tilde = buf[12:36].view(2, 4, 3)
        in_norm = buf[30:38].view(2, 4)
        pattern = r"_perturb_out: x_tilde and in_norm share memory"
    before = buf.clone()
    fns = [torch_ops.perturb_out] + ([_lib("_perturb_out")] if _backend.has_kernel("cpu") else [])
    for fn in fns:
        with pytest.raises(ValueError, match=pattern):
            fn(x, 2, 0.5, 1, 0, True, x_tilde, in_norm)
        _assert_unchanged([buf], [before])


# --------------------------------------------------------------------------------------------------
# mixed devices: a meta tensor sends the call to the fake kernel, which must refuse it
# --------------------------------------------------------------------------------------------------


@requires_compiled
def test_mixed_meta_and_cpu_raise_in_the_fakes():
    lib = torch.ops.jit_unlearn
    cpu, meta = torch.ones(4), torch.ones(4, device="meta")
    with pytest.raises(ValueError, match=r"imp_full\[0\]: expected device cpu"):
        lib.ssd_dampen_([cpu], [cpu * 2], [meta], 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"imp_forget\[0\]: expected device meta \(as params\[0\]\)"):
        lib.ssd_dampen_([meta], [cpu], [cpu], 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        lib.accumulate_importance_([cpu, cpu.clone()], [cpu, meta], "square", 1.0)
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        lib.masked_reset_([cpu], [cpu.clone()], [torch.ones(4, dtype=torch.bool, device="meta")])
    out, pert, norm = torch.randn(3, 4), torch.randn(2, 3, 4), torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"in_norm"):
        lib.lipschitz_ratio(out, pert, norm.to("meta"))
    with pytest.raises(ValueError, match=r"grad"):
        lib._lipschitz_ratio_backward(norm.to("meta"), out, pert, norm, False)
    with pytest.raises(ValueError, match=r"grad"):
        lib._lipschitz_ratio_and_grad(norm.to("meta"), out, pert, norm)
    with pytest.raises(ValueError, match=r"x_tilde"):
        lib._perturb_out(out, 2, 0.1, 0, 0, True, torch.empty(2, 3, 4, device="meta"), torch.empty(2, 3))
    # all on meta: shape propagation, no error
    assert lib.ssd_dampen_([meta], [meta], [meta], 1.0, 1.0, 1.0).shape == (1,)
    assert lib.lipschitz_ratio(out.to("meta"), pert.to("meta"), norm.to("meta")).shape == (2, 3)


# --------------------------------------------------------------------------------------------------
# SSD importances must be >= 0 and not NaN
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1e-30, -3.0, math.nan, -math.inf])
@pytest.mark.parametrize("which", ["imp_forget", "imp_full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_ssd_dampen_invalid_importance_raises_before_any_write(bad, which, dtype):
    for _label, tier, fn in _callers("ssd_dampen_"):
        params, forget, full = _ssd_lists(4)
        params = [p.to(dtype) for p in params]
        lists = {"imp_forget": forget, "imp_full": full}
        lists[which][2] = lists[which][2].clone()
        lists[which][2][17] = bad  # tensors 0 and 1 come first and have selected elements
        before = _snapshot(params)
        with pytest.raises(ValueError, match=rf"ssd_dampen_: {which}\[2\]: holds a negative or NaN value"):
            _run(tier, fn, params, forget, full, 2.0, 1.0, 1.0)
        _assert_unchanged(params, before)


def test_ssd_dampen_reports_the_first_invalid_importance():
    for _label, tier, fn in _callers("ssd_dampen_"):
        params, forget, full = _ssd_lists(3)
        forget[2][0] = -1.0
        full[1][5] = math.nan
        forget[1][39] = -2.0
        with pytest.raises(ValueError, match=r"imp_forget\[1\]"):
            _run(tier, fn, params, forget, full, 2.0, 1.0, 1.0)


def test_ssd_dampen_accepts_zero_negative_zero_and_inf():
    """-0.0 is >= 0: I_D = -0 with I_f > 0 is selected, and its factor (-0) / I_f = -0 zeroes theta."""
    f = torch.tensor([1.0, 0.0, math.inf, 2.0, -0.0])
    d = torch.tensor([-0.0, -0.0, 1.0, math.inf, 1.0])
    for label, tier, fn in _callers("ssd_dampen_"):
        p = [torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0])]
        counts = _run(tier, fn, p, [f], [d], 1.0, 1.0, 1.0)
        assert counts.tolist() == [2], label
        assert p[0].tolist() == [0.0, 4.0, 0.0, 6.0, 7.0] and math.copysign(1.0, p[0][0].item()) == -1.0


@requires_compiled
@pytest.mark.parametrize("density", [0.001, 0.02, 0.5, 1.0])
def test_ssd_dampen_two_passes_bitwise_at_every_density(density):
    """The selection bits of pass 1 and the sparse / dense updates of pass 2 agree with the reference
    for selections from almost none to all, over chunk and word boundaries."""
    gen = torch.Generator().manual_seed(int(density * 1000) + 1)
    shapes = [(1,), (63,), (64,), (65,), (255,), (256,), (257,), (4099,), (70_001,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    full = [torch.rand(s, generator=gen) for s in shapes]
    forget = [torch.where(torch.rand(s, generator=gen) < density, d * 4 + 0.5, d * 0.5) for s, d in zip(shapes, full)]
    ours, ref = _snapshot(params), _snapshot(params)
    counts = _lib("ssd_dampen_")(ours, forget, full, 2.0, 1.0, 1.0)
    assert counts.tolist() == torch_ops.ssd_dampen_(ref, forget, full, 2.0, 1.0, 1.0).tolist()
    assert counts.tolist() == [int((f > 2.0 * d).sum()) for f, d in zip(forget, full)]
    for a, b in zip(ours, ref):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# --------------------------------------------------------------------------------------------------
# masked_reset_: a mask byte is true when nonzero
# --------------------------------------------------------------------------------------------------


@requires_compiled
def test_masked_reset_reads_mask_bytes_as_nonzero():
    raw = torch.tensor([0, 1, 2, 255, 0, 128, 7, 0], dtype=torch.uint8)
    mask = raw.view(torch.bool)  # bytes > 1 in a bool tensor
    p = [torch.zeros(8)]
    _lib("masked_reset_")(p, [torch.arange(1.0, 9.0)], [mask])
    assert p[0].tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 6.0, 7.0, 0.0]
