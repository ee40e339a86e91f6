"""The CPU kernels on operands at every alignment: views that start one or more elements into a buffer
(so no vector width divides their address), as outputs, in-place targets and inputs, give bitwise the
results of the pure-PyTorch tier (or of the kernels' own summation order, transcribed in
tests/kernel_oracles.py).  Memory that is not even element-aligned (torch.frombuffer at an odd byte
offset) is copied when read and refused when written by the compiled ops; jit_unlearn.ops accepts it
on every tier."""

import kernel_oracles
import pytest
import torch

import jit_unlearn.ops as ops
from jit_unlearn import _backend, torch_ops

pytestmark = pytest.mark.skipif(not _backend.has_kernel("cpu"), reason="compiled CPU kernels not built")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OFFSETS = [1, 3, 7]  # elements into the buffer: 4 to 56 bytes, no 16/32/64-byte vector aligned
_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
lib = torch.ops.jit_unlearn


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def _offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's values in a contiguous view that starts `offset` elements into a larger buffer."""
    buf = torch.empty(t.numel() + offset + 5, dtype=t.dtype)
    view = buf[offset : offset + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous()
    return view


def _values(shape, dtype, gen, low=-4.0, high=4.0):
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)


def _unaligned_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's values in memory one byte past an element boundary (torch.frombuffer at an odd offset)."""
    raw = bytearray(t.numel() * t.element_size() + 1)
    out = torch.frombuffer(raw, dtype=t.dtype, offset=1, count=t.numel()).view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % t.element_size() != 0
    out._keepalive = raw  # the tensor does not own the bytearray
    return out


# --------------------------------------------------------------------------------------------------
# perturb / _perturb_out
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape,n", [((37, 3, 11, 7), 3), ((9, 1024), 2), ((5, 3), 4), ((2, 1500), 3)])
def test_perturb_out_into_offset_buffers(dtype, offset, shape, n):
    gen = torch.Generator().manual_seed(offset)
    x = _values(shape, dtype, gen)
    want_x, _ = torch_ops.perturb(x, n, 0.4, 2**40 + 3, 9, True)
    want_norm = kernel_oracles.perturb_in_norm(x, want_x)
    x_tilde = _offset_view(torch.zeros(n, *shape, dtype=dtype), offset)
    in_norm = _offset_view(torch.zeros(n, shape[0], dtype=torch_ops.opmath_dtype(dtype)), offset + 1)
    lib._perturb_out(_offset_view(x, offset + 2), n, 0.4, 2**40 + 3, 9, True, x_tilde, in_norm)
    assert _bits_equal(x_tilde, want_x)
    assert _bits_equal(in_norm, want_norm)
    got_x, got_norm = lib.perturb(_offset_view(x, offset), n, 0.4, 2**40 + 3, 9, True)
    assert _bits_equal(got_x, want_x) and _bits_equal(got_norm, want_norm)


def test_perturb_reads_unaligned_memory_and_refuses_to_write_it():
    gen = torch.Generator().manual_seed(0)
    x = _values((6, 50), torch.float32, gen)
    want = lib.perturb(x, 2, 0.3, 1, 2, True)
    got = lib.perturb(_unaligned_bytes(x), 2, 0.3, 1, 2, True)
    assert _bits_equal(got[0], want[0]) and _bits_equal(got[1], want[1])
    x_tilde, in_norm = torch.empty(2, 6, 50), torch.empty(2, 6)
    with pytest.raises(ValueError, match=r"_perturb_out: x_tilde: its data pointer .* element-aligned"):
        lib._perturb_out(x, 2, 0.3, 1, 2, True, _unaligned_bytes(x_tilde), in_norm)
    with pytest.raises(ValueError, match=r"_perturb_out: in_norm: its data pointer"):
        lib._perturb_out(x, 2, 0.3, 1, 2, True, x_tilde, _unaligned_bytes(in_norm))


# --------------------------------------------------------------------------------------------------
# lipschitz
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 10, 16, 19, 100])
def test_lipschitz_on_offset_inputs(dtype, k):
    gen = torch.Generator().manual_seed(k)
    op = torch_ops.opmath_dtype(dtype)
    out, pert = _values((13, k), dtype, gen), _values((5, 13, k), dtype, gen)
    in_norm, grad = _values((5, 13), op, gen, 0.1, 2.0), _values((5, 13), op, gen, 0.0, 1.0)
    in_norm[0, 0] = 0.0
    want_ratio, want_out, want_pert = kernel_oracles.lipschitz(out, pert, in_norm, grad)
    for offset in OFFSETS:
        args = [_offset_view(t, offset + i) for i, t in enumerate((out, pert, in_norm))]
        g = _offset_view(grad, offset)
        assert _bits_equal(lib.lipschitz_ratio(*args), want_ratio)
        got_out, got_pert = lib._lipschitz_ratio_backward(g, *args, True)
        assert _bits_equal(got_out, want_out) and _bits_equal(got_pert, want_pert)
        ratio, grad_out = lib._lipschitz_ratio_and_grad(g, *args)
        assert _bits_equal(ratio, want_ratio) and _bits_equal(grad_out, want_out)
    unaligned = [_unaligned_bytes(t) for t in (out, pert, in_norm)]
    assert _bits_equal(lib.lipschitz_ratio(*unaligned), want_ratio)


# --------------------------------------------------------------------------------------------------
# multi-tensor in-place ops
# --------------------------------------------------------------------------------------------------

SHAPES = [(1,), (7,), (33,), (257,), (1025,), (3, 5, 7), (40_003,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_ssd_dampen_offset_params_and_importances(dtype, offset):
    gen = torch.Generator().manual_seed(offset)
    params = [_values(s, dtype, gen) for s in SHAPES]
    full = [_values(s, dtype, gen, 0.0, 1.0) for s in SHAPES]
    forget = [
        torch.where(torch.rand(s, generator=gen) < 0.2, d.double() * 4 + 0.1, d.double() * 0.5).to(dtype)
        for s, d in zip(SHAPES, full)
    ]
    ref = [p.clone() for p in params]
    want_counts = torch_ops.ssd_dampen_(ref, forget, full, 2.0, 0.7, 1.0)
    ours = [_offset_view(p, offset + i) for i, p in enumerate(params)]
    counts = lib.ssd_dampen_(
        ours, [_offset_view(f, offset) for f in forget], [_offset_view(d, offset + 1) for d in full], 2.0, 0.7, 1.0
    )
    assert counts.tolist() == want_counts.tolist()
    for a, b in zip(ours, ref):
        assert _bits_equal(a, b)


@pytest.mark.parametrize(
    "acc_dtype,grad_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
@pytest.mark.parametrize("offset", OFFSETS)
def test_accumulate_importance_offset_operands(acc_dtype, grad_dtype, offset):
    gen = torch.Generator().manual_seed(offset)
    acc = [_values(s, acc_dtype, gen, 0.0, 2.0) for s in SHAPES]
    grads = [_values(s, grad_dtype, gen) for s in SHAPES]
    for mode in ("square", "abs"):
        ref = [a.clone() for a in acc]
        torch_ops.accumulate_importance_(ref, grads, mode, 0.25)
        ours = [_offset_view(a, offset + i) for i, a in enumerate(acc)]
        lib.accumulate_importance_(ours, [_offset_view(g, offset) for g in grads], mode, 0.25)
        for a, b in zip(ours, ref):
            assert _bits_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_masked_reset_offset_operands(dtype, offset):
    gen = torch.Generator().manual_seed(offset)
    params = [_values(s, dtype, gen) for s in SHAPES]
    init = [_values(s, torch.float32, gen) for s in SHAPES]
    masks = [torch.rand(s, generator=gen) < 0.3 for s in SHAPES]
    ref = [p.clone() for p in params]
    torch_ops.masked_reset_(ref, init, masks)
    ours = [_offset_view(p, offset + i) for i, p in enumerate(params)]
    mask_views = []
    for i, m in enumerate(masks):  # masks one byte into their buffer
        buf = torch.zeros(m.numel() + offset + i, dtype=torch.bool)
        mask_views.append(buf[offset + i :].view(m.shape))
        mask_views[-1].copy_(m)
    lib.masked_reset_(ours, [_offset_view(v, offset) for v in init], mask_views)
    for a, b in zip(ours, ref):
        assert _bits_equal(a, b)


def test_multi_tensor_ops_unaligned_memory():
    """Read operands over unaligned memory are copied; written ones are refused by the compiled ops and
    handled through an aligned temporary by jit_unlearn.ops, on both tiers."""
    gen = torch.Generator().manual_seed(5)
    params = [_values((300,), torch.float32, gen), _values((41,), torch.float32, gen)]
    full = [_values(p.shape, torch.float32, gen, 0.0, 1.0) for p in params]
    forget = [d * 3 for d in full]
    ref = [p.clone() for p in params]
    want = torch_ops.ssd_dampen_(ref, forget, full, 2.0, 1.0, 1.0)
    ours = [p.clone() for p in params]
    got = lib.ssd_dampen_(
        ours, [_unaligned_bytes(f) for f in forget], [_unaligned_bytes(d) for d in full], 2.0, 1.0, 1.0
    )
    assert got.tolist() == want.tolist() and all(_bits_equal(a, b) for a, b in zip(ours, ref))
    unaligned = [params[0].clone(), _unaligned_bytes(params[1])]
    before = unaligned[1].clone()
    with pytest.raises(ValueError, match=r"params\[1\]: its data pointer .* element-aligned"):
        lib.ssd_dampen_(unaligned, forget, full, 2.0, 1.0, 1.0)
    assert _bits_equal(unaligned[1], before) and _bits_equal(unaligned[0], params[0])
    with pytest.raises(ValueError, match=r"acc\[0\]: its data pointer"):
        lib.accumulate_importance_([_unaligned_bytes(full[0])], [forget[0]], "square", 1.0)
    with pytest.raises(ValueError, match=r"params\[0\]: its data pointer"):
        lib.masked_reset_([_unaligned_bytes(full[0])], [forget[0]], [torch.ones(300, dtype=torch.bool)])
    for tier in ("compiled", "torch"):
        _backend.force_backend(tier)
        try:
            targets = [_unaligned_bytes(p) for p in params]
            counts = ops.ssd_dampen_(targets, forget, full, 2.0)
        finally:
            _backend.force_backend(None)
        assert counts.tolist() == want.tolist()
        assert all(_bits_equal(a.clone(), b) for a, b in zip(targets, ref))
