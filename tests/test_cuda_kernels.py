"""The CUDA kernels against the CPU kernels (skipped without a GPU and a CUDA build).

Every test calls torch.ops.jit_unlearn.* on CUDA tensors, so the CUDA kernel is what runs (asserted on
the outputs' device), and compares with the CPU kernel on the same inputs:
- perturb and _perturb_out: x_tilde and in_norm bitwise (in_norm has no float atomics and follows the CPU
  summation order, tests/kernel_oracles.py), the same bits on every run;
- lipschitz_ratio and its backward: bitwise (8 lanes per row, the CPU order);
- the multi-tensor ops: bitwise on aligned tensors (4-wide vector path) and on offset views (scalar
  path); ssd_dampen_ with exponent != 1 within a stated tolerance (device pow and glibc pow differ in
  the last bits); errors and untouched parameters as on the CPU.
NaN payloads are the one exception to "bitwise": after a float -> half/bfloat16 conversion the device
gives its canonical NaN (0x7FFF) and c10's software conversion on the CPU another pattern (0x7E00 with
the sign for half, 0x7FC0 for bfloat16).  Comparisons here take NaNs by position, as everywhere else.
"""

import math

import kernel_oracles
import pytest
import torch

from jit_unlearn import _backend, torch_ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _backend.has_kernel("cuda") and _backend.has_kernel("cpu")),
    reason="needs a CUDA device and both compiled tiers",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
lib = torch.ops.jit_unlearn


def _bitwise(gpu: torch.Tensor, cpu: torch.Tensor) -> None:
    """gpu ran on CUDA and equals cpu bit for bit, NaNs by position."""
    assert gpu.device.type == "cuda", "the CUDA kernel did not run"
    got = gpu.cpu()
    assert got.dtype == cpu.dtype and got.shape == cpu.shape
    if not got.is_floating_point():
        assert torch.equal(got, cpu)
        return
    assert torch.equal(got.isnan(), cpu.isnan()), "NaN positions differ"
    keep = ~cpu.isnan()
    diff = (got[keep].view(_BITS[got.dtype]) != cpu[keep].view(_BITS[cpu.dtype])).nonzero()
    assert diff.numel() == 0, f"{diff.numel()} elements differ"


def _offset(t: torch.Tensor, k: int) -> torch.Tensor:
    """t's values in a view k elements into a buffer on t's device (no vector width divides its address
    for odd k)."""
    buf = torch.zeros(t.numel() + k, dtype=t.dtype, device=t.device)
    view = buf[k:].view(t.shape)
    view.copy_(t)
    return view


# --------------------------------------------------------------------------------------------------
# perturb
# --------------------------------------------------------------------------------------------------

# D = 3072 and 231 cross chunk boundaries (the row pass), 1024 and 4 do not, 3 and 1 take the
# thread-per-span path, 40 the thread-per-lane path with many spans.
PERTURB_CASES = [
    ((128, 3, 32, 32), 3),
    ((37, 3, 11, 7), 5),
    ((9, 1024), 2),
    ((50, 4), 3),
    ((333, 3), 4),
    ((1000, 1), 2),
    ((7,), 3),
    ((26, 40), 2),
    ((4, 0), 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clamp", [True, False])
def test_perturb_bitwise_cpu_and_run_to_run(dtype, clamp):
    gen = torch.Generator().manual_seed(3)
    for shape, n in PERTURB_CASES:
        x = (torch.randn(shape, generator=gen) * 2).to(dtype)
        cpu = lib.perturb(x, n, 0.6, 2**40 + 1, 17, clamp)
        first = lib.perturb(x.cuda(), n, 0.6, 2**40 + 1, 17, clamp)
        second = lib.perturb(x.cuda(), n, 0.6, 2**40 + 1, 17, clamp)
        for g, c in zip(first, cpu):
            _bitwise(g, c)
        for a, b in zip(first, second):
            assert torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype])), "not deterministic"
        if x.numel():
            _bitwise(first[1], kernel_oracles.perturb_in_norm(x, cpu[0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_perturb_out_unaligned_buffers(dtype, k):
    """Offset outputs and input take the scalar loads and stores; the results do not change."""
    x = (torch.randn(37, 3, 11, 7) * 2).to(dtype)
    want = lib.perturb(x, 4, 0.5, 9, 2, True)
    x_tilde = _offset(torch.zeros(4, 37, 3, 11, 7, dtype=dtype, device="cuda"), k)
    in_norm = _offset(torch.zeros(4, 37, dtype=torch_ops.opmath_dtype(dtype), device="cuda"), k + 1)
    lib._perturb_out(_offset(x.cuda(), k + 2), 4, 0.5, 9, 2, True, x_tilde, in_norm)
    _bitwise(x_tilde, want[0])
    _bitwise(in_norm, want[1])


# --------------------------------------------------------------------------------------------------
# lipschitz
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 8, 10, 16, 19, 100, 1000])
def test_lipschitz_bitwise_cpu(dtype, k):
    gen = torch.Generator().manual_seed(k)
    op = torch_ops.opmath_dtype(dtype)
    out = torch.randn(37, k, generator=gen).to(dtype)
    pert = (out.float() + 0.3 * torch.randn(6, 37, k, generator=gen)).to(dtype)
    in_norm = (torch.rand(6, 37, generator=gen) + 0.1).to(op)
    grad = torch.randn(6, 37, generator=gen).to(op)
    in_norm[0, :3] = 0.0
    pert[1, 4] = out[4]
    cuda = [t.cuda() for t in (grad, out, pert, in_norm)]
    _bitwise(lib.lipschitz_ratio(*cuda[1:]), lib.lipschitz_ratio(out, pert, in_norm))
    for flag in (True, False):
        for g, c in zip(
            lib._lipschitz_ratio_backward(*cuda, flag), lib._lipschitz_ratio_backward(grad, out, pert, in_norm, flag)
        ):
            _bitwise(g, c)
    for g, c in zip(lib._lipschitz_ratio_and_grad(*cuda), lib._lipschitz_ratio_and_grad(grad, out, pert, in_norm)):
        _bitwise(g, c)


# --------------------------------------------------------------------------------------------------
# multi-tensor ops
# --------------------------------------------------------------------------------------------------

# > 59 tensors and > 320 chunks of 65536: several launches, a tensor split across launches.
SHAPES = [(1,), (7,), (33,), (1023,), (1025,), (3, 5, 7), (64, 3, 3, 3), (0,)] + [(257,)] * 60 + [(21_000_001,)]


def _lists(dtype, gen, density=0.05):
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    full = [torch.rand(s, generator=gen).to(dtype) for s in SHAPES]
    forget = [
        torch.where(torch.rand(s, generator=gen) < density, d.double() * 5 + 0.1, d.double() * 0.5).to(dtype)
        for s, d in zip(SHAPES, full)
    ]
    return params, forget, full


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 1])
def test_multi_tensor_ops_bitwise_cpu(dtype, k):
    """k = 0: aligned tensors (vector path); k = 1: offset views (scalar path)."""
    gen = torch.Generator().manual_seed(11 + k)
    params, forget, full = _lists(dtype, gen)
    cpu = [p.clone() for p in params]
    counts_cpu = lib.ssd_dampen_(cpu, forget, full, 2.0, 0.9, 1.0)
    gpu = [_offset(p.cuda(), k) for p in params]
    counts = lib.ssd_dampen_(gpu, [_offset(f.cuda(), k) for f in forget], [f.cuda() for f in full], 2.0, 0.9, 1.0)
    _bitwise(counts, counts_cpu)
    for g, c in zip(gpu, cpu):
        _bitwise(g, c)

    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    acc_cpu = [f.abs() for f in forget]
    acc = [_offset(a.cuda(), k) for a in acc_cpu]
    lib.accumulate_importance_(acc_cpu, grads, "square", 0.5)
    lib.accumulate_importance_(acc, [_offset(g.cuda(), k) for g in grads], "square", 0.5)
    for g, c in zip(acc, acc_cpu):
        _bitwise(g, c)

    # mask bytes 0, 1 and > 1: nonzero resets, as on the CPU
    masks = [(torch.randint(0, 4, s, generator=gen, dtype=torch.uint8) * 85).view(torch.bool) for s in SHAPES]
    lib.masked_reset_(cpu, forget, masks)
    lib.masked_reset_(gpu, [f.cuda() for f in forget], [_offset(m.cuda(), k) for m in masks])
    for g, c in zip(gpu, cpu):
        _bitwise(g, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exponent", [0.5, 1.7, -0.3])
def test_ssd_dampen_exponent_within_tolerance(dtype, exponent):
    """Device pow and glibc pow may differ by a few ulp (CUDA documents up to 2 ulp for pow, 4 for powf):
    the factor agrees to 8 ulp of the opmath dtype, and the parameter then to that or one ulp of its own
    dtype.  The selection does not use pow: counts are equal."""
    gen = torch.Generator().manual_seed(5)
    params, forget, full = _lists(dtype, gen, density=0.3)
    cpu = [p.clone() for p in params]
    gpu = [p.cuda() for p in params]
    counts_cpu = lib.ssd_dampen_(cpu, forget, full, 2.0, 1.2, exponent)
    counts = lib.ssd_dampen_(gpu, [f.cuda() for f in forget], [d.cuda() for d in full], 2.0, 1.2, exponent)
    _bitwise(counts, counts_cpu)
    rtol = max(8 * torch.finfo(torch_ops.opmath_dtype(dtype)).eps, torch.finfo(dtype).eps)
    for g, c in zip(gpu, cpu):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), c, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nan_parameters_by_position(dtype):
    """NaN parameters stay NaN at the same positions; their payload bits are not compared (see the
    module docstring)."""
    theta = torch.randn(4096).to(dtype)
    theta[::97] = math.nan
    full = torch.rand(4096).to(dtype)
    forget = (full.double() * 3).to(dtype)  # every element selected at alpha = 2
    cpu, gpu = [theta.clone()], [theta.cuda()]
    lib.ssd_dampen_(cpu, [forget], [full], 2.0, 1.0, 1.0)
    lib.ssd_dampen_(gpu, [forget.cuda()], [full.cuda()], 2.0, 1.0, 1.0)
    _bitwise(gpu[0], cpu[0])


def test_ssd_dampen_invalid_importance_raises_and_writes_nothing():
    gen = torch.Generator().manual_seed(9)
    params, forget, full = _lists(torch.float32, gen)
    gpu = [p.cuda() for p in params]
    before = [p.clone() for p in gpu]
    bad_full = [d.cuda() for d in full]
    bad_full[-1] = bad_full[-1].clone()
    bad_full[-1][12345] = math.nan  # the last, largest tensor: earlier ones would be written first
    with pytest.raises(ValueError, match=rf"ssd_dampen_: imp_full\[{len(SHAPES) - 1}\]: holds a negative or NaN"):
        lib.ssd_dampen_(gpu, [f.cuda() for f in forget], bad_full, 2.0, 1.0, 1.0)
    for g, b in zip(gpu, before):
        assert torch.equal(g.view(torch.int32), b.view(torch.int32))
    bad_forget = [f.cuda() for f in forget]
    bad_forget[3] = -bad_forget[3]
    bad_full[2] = -bad_full[2]
    with pytest.raises(ValueError, match=r"imp_full\[2\]"):  # the lowest index, as on the CPU
        lib.ssd_dampen_(gpu, bad_forget, bad_full, 2.0, 1.0, 1.0)


def test_cuda_refuses_overlap_and_mixed_devices():
    p = torch.randn(100, device="cuda")
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] are the same memory"):
        lib.ssd_dampen_(
            [p, p], [torch.rand(100, device="cuda")] * 2, [torch.rand(100, device="cuda")] * 2, 1.0, 1.0, 1.0
        )
    with pytest.raises(ValueError, match=r"imp_forget\[0\]: expected device"):
        lib.ssd_dampen_([p], [torch.rand(100)], [torch.rand(100, device="cuda")], 1.0, 1.0, 1.0)
    x = torch.randn(4, 8, device="cuda")
    buf = torch.empty(2 * 32 + 8, device="cuda")
    with pytest.raises(ValueError, match=r"x_tilde and in_norm share memory"):
        lib._perturb_out(x, 2, 0.1, 0, 0, True, buf[:64].view(2, 4, 8), buf[60:68].view(2, 4))
