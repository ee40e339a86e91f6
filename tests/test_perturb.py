"""Tests of the perturb op: Philox known answers, compiled vs pure PyTorch, noise statistics, edge cases."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from conftest import requires_cuda
from jit_unlearn import _backend, ops, torch_ops

requires_compiled = pytest.mark.skipif(not _backend.has_kernel("cpu"), reason="compiled CPU kernels not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASK32 = 0xFFFFFFFF

# Random123 known-answer vectors for philox4x32-10: counter[4], key[2] -> output[4].
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def philox_python(ctr, key, rounds=10):
    """Philox4x32 on Python ints, written from the paper's round function."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(rounds):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def as_int64(u64):
    return u64 - (1 << 64) if u64 >= 1 << 63 else u64


def torch_ops_philox(ctr, key):
    group = as_int64(ctr[0] | (ctr[1] << 32))
    offset = ctr[2] | (ctr[3] << 32)
    seed = key[0] | (key[1] << 32)
    words = torch_ops.philox4x32(torch.tensor([group], dtype=torch.int64), seed, offset)
    return tuple(int(w[0]) for w in words)


def run(x, n, sigma, seed=0, offset=0, clamp=True):
    return ops.perturb(x, n, sigma, seed=seed, offset=offset, clamp=clamp)


def norm_tolerance(dtype):
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}


# --- the generator -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answers(ctr, key, expected):
    assert philox_python(ctr, key) == expected
    assert torch_ops_philox(ctr, key) == expected


def test_torch_ops_philox_matches_python_ints():
    gen = np.random.default_rng(0)
    for _ in range(20):
        ctr = tuple(int(v) for v in gen.integers(0, 1 << 32, size=4, dtype=np.uint64))
        key = tuple(int(v) for v in gen.integers(0, 1 << 32, size=2, dtype=np.uint64))
        assert torch_ops_philox(ctr, key) == philox_python(ctr, key)


def test_normal_transform_is_box_muller():
    # float64 Box-Muller of the same Philox words: z = sqrt(-2 log u1) (cos, sin)(2 pi u2).
    seed, offset, groups = 77, 3, 4096
    z = torch_ops.philox_normal(4 * groups, seed, offset).double().view(groups, 4)
    words = [w.double() for w in torch_ops.philox4x32(torch.arange(groups), seed, offset)]
    u = [(torch.floor(w / 512) * 2 + 1) / 2**24 for w in words]
    rad01, rad23 = torch.sqrt(-2 * torch.log(u[0])), torch.sqrt(-2 * torch.log(u[2]))
    expected = torch.stack(
        [
            rad01 * torch.cos(2 * math.pi * u[1]),
            rad01 * torch.sin(2 * math.pi * u[1]),
            rad23 * torch.cos(2 * math.pi * u[3]),
            rad23 * torch.sin(2 * math.pi * u[3]),
        ],
        dim=1,
    )
    torch.testing.assert_close(z, expected, rtol=0, atol=2e-6)


# --- compiled vs pure PyTorch ------------------------------------------------------------------------


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clamp", [True, False])
def test_compiled_matches_torch_ops(dtype, clamp):
    gen = torch.Generator().manual_seed(1)
    for trial in range(6):
        ndim = int(torch.randint(1, 5, (1,), generator=gen))
        shape = [int(v) for v in torch.randint(1, 7, (ndim,), generator=gen)]
        x = (torch.randn(shape, generator=gen) * 2).to(dtype)
        n = int(torch.randint(1, 5, (1,), generator=gen))
        sigma = float(torch.rand((), generator=gen)) * 1.5
        seed, offset = 1000 + trial, 7 * trial
        got_x, got_norm = torch.ops.jit_unlearn.perturb(x, n, sigma, seed, offset, clamp)
        ref_x, ref_norm = torch_ops.perturb(x, n, sigma, seed, offset, clamp)
        assert got_x.dtype == dtype and got_norm.dtype == torch_ops.opmath_dtype(dtype)
        assert got_x.shape == (n, *shape) and got_norm.shape == (n, shape[0])
        assert torch.equal(got_x, ref_x), (shape, n, sigma)
        torch.testing.assert_close(got_norm, ref_norm, **norm_tolerance(dtype))


@requires_compiled
def test_compiled_matches_torch_ops_image_batch():
    # Rows of 3 * 5 * 7 = 105 elements: Philox groups straddle rows and chunk boundaries.
    x = torch.rand(9, 3, 5, 7)
    got = torch.ops.jit_unlearn.perturb(x, 4, 0.3, 5, 11, True)
    ref = torch_ops.perturb(x, 4, 0.3, 5, 11, True)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


@requires_compiled
@pytest.mark.parametrize(
    "seed,offset", [(2**64 - 1, 2**64 - 1), (0x299F31D0A4093822, 0x0370734413198A2E), (-5, 2**63 + 3)]
)
def test_large_seed_and_offset(seed, offset):
    # ops maps [2^63, 2^64) onto int64 bit patterns; the kernel and torch_ops use the same uint64.
    x = torch.randn(3, 10)
    _backend.force_backend("compiled")
    try:
        got = run(x, 2, 0.5, seed=seed, offset=offset)
    finally:
        _backend.force_backend(None)
    ref = torch_ops.perturb(x, 2, 0.5, seed, offset, True)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


def test_noise_is_torch_ops_philox_normal(backend):
    x = torch.randn(4, 3, 5)
    sigma = 0.25
    x_tilde, _ = run(x, 3, sigma, seed=9, offset=2, clamp=False)
    z = torch_ops.philox_normal(3 * x.numel(), 9, 2).view(3, *x.shape)
    assert torch.equal(x_tilde, x + torch.tensor(sigma, dtype=torch.float32) * z)


# --- semantics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_norm_from_stored_x_tilde(backend, dtype):
    x = torch.randn(5, 2, 3, 3).to(dtype)
    x_tilde, in_norm = run(x, 3, 0.4, seed=3)
    diff = x_tilde.double() - x.double().unsqueeze(0)
    expected = diff.pow(2).flatten(2).sum(dim=2).sqrt()
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(in_norm.double(), expected, **tol)


def test_in_norm_hand_computed(backend):
    # One sample of two elements: in_norm = sqrt(d0^2 + d1^2) with d = x_tilde - x.
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    x_tilde, in_norm = run(x, 1, 0.5, seed=4, clamp=False)
    d0, d1 = float(x_tilde[0, 0, 0]) - 1.0, float(x_tilde[0, 0, 1]) + 2.0
    assert in_norm.shape == (1, 1)
    assert float(in_norm[0, 0]) == pytest.approx(math.sqrt(d0 * d0 + d1 * d1), rel=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp_keeps_batch_range(backend, dtype):
    x = torch.rand(6, 4, 4).to(dtype) * 3 - 1
    lo, hi = x.min(), x.max()
    clamped, _ = run(x, 5, 2.0, seed=1, clamp=True)
    assert clamped.min() >= lo and clamped.max() <= hi
    # sigma = 2 against a range of 3: some values sit on the bounds, exactly.
    assert (clamped == lo).any() and (clamped == hi).any()
    free, _ = run(x, 5, 2.0, seed=1, clamp=False)
    assert free.min() < lo and free.max() > hi
    inside = (free >= lo) & (free <= hi)
    assert torch.equal(clamped[inside], free[inside])


def test_clamp_uses_whole_batch_range(backend):
    # Sample 0 spans [0, 1], sample 1 spans [10, 11]: the range is [0, 11], not per sample.
    x = torch.stack([torch.linspace(0, 1, 50), torch.linspace(10, 11, 50)])
    x_tilde, _ = run(x, 4, 3.0, seed=2, clamp=True)
    assert x_tilde.min() >= 0 and x_tilde.max() <= 11
    assert (x_tilde[:, 0] > 1).any() and (x_tilde[:, 1] < 10).any()


def test_sigma_zero_is_identity(backend):
    x = torch.randn(3, 7)
    x_tilde, in_norm = run(x, 2, 0.0, seed=5)
    assert torch.equal(x_tilde, x.expand(2, 3, 7))
    assert torch.equal(in_norm, torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input(backend, dtype):
    base = torch.randn(5, 6, 8).to(dtype)
    for x in (base.transpose(1, 2), base[:, ::2, 1:7], base.permute(2, 0, 1)):
        assert not x.is_contiguous()
        got = run(x, 3, 0.5, seed=8, offset=1)
        want = run(x.contiguous(), 3, 0.5, seed=8, offset=1)
        assert got[0].is_contiguous() and got[1].is_contiguous()
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("shape,n", [((0, 3), 4), ((4, 0), 3), ((0,), 2), ((3, 2, 0, 5), 2), ((5, 3), 0), ((0, 2), 0)])
@pytest.mark.parametrize("clamp", [True, False])
def test_empty_inputs(backend, shape, n, clamp):
    x = torch.randn(shape)
    x_tilde, in_norm = run(x, n, 0.5, seed=1, clamp=clamp)
    assert x_tilde.shape == (n, *shape) and x_tilde.dtype == x.dtype
    assert in_norm.shape == (n, shape[0]) and in_norm.dtype == torch.float32
    assert torch.equal(in_norm, torch.zeros(n, shape[0]))


def test_one_dimensional_batch(backend):
    x = torch.randn(9)
    x_tilde, in_norm = run(x, 2, 0.5, seed=1, clamp=False)
    assert x_tilde.shape == (2, 9) and in_norm.shape == (2, 9)
    torch.testing.assert_close(in_norm, (x_tilde - x).abs(), rtol=1e-6, atol=0)


# --- randomness --------------------------------------------------------------------------------------


def test_same_seed_same_noise(backend):
    x = torch.randn(4, 3, 6)
    a = run(x, 3, 0.5, seed=11, offset=4)
    b = run(x, 3, 0.5, seed=11, offset=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_different_offsets_and_seeds_differ(backend):
    x = torch.zeros(4, 32)
    a = run(x, 2, 1.0, seed=11, offset=0, clamp=False)[0]
    b = run(x, 2, 1.0, seed=11, offset=1, clamp=False)[0]
    c = run(x, 2, 1.0, seed=12, offset=0, clamp=False)[0]
    assert (a != b).float().mean() > 0.99 and (a != c).float().mean() > 0.99


def test_more_samples_extend_the_stream(backend):
    # Copy n draws flat noise elements [n numel, (n + 1) numel): a prefix does not depend on N.
    x = torch.randn(3, 5)
    short = run(x, 2, 0.5, seed=6, offset=3)
    long = run(x, 5, 0.5, seed=6, offset=3)
    assert torch.equal(long[0][:2], short[0]) and torch.equal(long[1][:2], short[1])


def test_backends_agree_bitwise():
    if not _backend.has_kernel("cpu"):
        pytest.skip("compiled CPU kernels not built")
    x = torch.randn(7, 2, 3, 3)
    results = []
    for name in ("compiled", "torch"):
        _backend.force_backend(name)
        try:
            results.append(run(x, 3, 0.7, seed=21, offset=5))
        finally:
            _backend.force_backend(None)
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 12345])
def test_noise_statistics(seed):
    # On the default tier; the tiers draw bitwise the same noise (tests above).
    n_samples, numel = 4, 50_000
    z = run(torch.zeros(1, numel), n_samples, 1.0, seed=seed, clamp=False)[0].reshape(-1).double()
    count = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(count)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / count)
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # Each Box-Muller lane on its own, and the (cos, sin) pair uncorrelated.
    lanes = z.view(-1, 4)
    for k in range(4):
        assert scipy.stats.kstest(lanes[:, k].numpy(), "norm").pvalue > 1e-3
    corr = np.corrcoef(lanes.T.numpy())
    assert np.abs(corr - np.eye(4)).max() < 5 / math.sqrt(lanes.shape[0])


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"x": torch.ones(3, 2, dtype=torch.int64)}, TypeError, "x"),
        ({"x": torch.tensor(1.0)}, ValueError, "x"),
        ({"x": [1.0, 2.0]}, TypeError, "x"),
        ({"num_samples": -1}, ValueError, "num_samples"),
        ({"num_samples": 2.0}, TypeError, "num_samples"),
        ({"sigma": -0.1}, ValueError, "sigma"),
        ({"sigma": float("nan")}, ValueError, "sigma"),
        ({"sigma": float("inf")}, ValueError, "sigma"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"offset": 1.5}, TypeError, "offset"),
        ({"clamp": 1}, TypeError, "clamp"),
    ],
)
def test_bad_arguments_name_the_argument(backend, kwargs, exc, name):
    args = {"x": torch.ones(3, 2), "num_samples": 2, "sigma": 0.5, "seed": 0, "offset": 0, "clamp": True}
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        ops.perturb(**args)


@requires_compiled
@pytest.mark.parametrize(
    "args,exc,name",
    [
        ((torch.ones(3, 2, dtype=torch.int32), 2, 0.5, 0, 0, True), TypeError, "x"),
        ((torch.ones(3, 2, dtype=torch.complex64), 2, 0.5, 0, 0, True), TypeError, "x"),
        ((torch.tensor(1.0), 2, 0.5, 0, 0, True), ValueError, "x"),
        ((torch.ones(3, 2), -2, 0.5, 0, 0, True), ValueError, "num_samples"),
        ((torch.ones(3, 2), 2, -1.0, 0, 0, True), ValueError, "sigma"),
        ((torch.ones(3, 2), 2, float("nan"), 0, 0, True), ValueError, "sigma"),
    ],
)
def test_compiled_op_errors_name_the_argument(args, exc, name):
    with pytest.raises(exc, match=name):
        torch.ops.jit_unlearn.perturb(*args)


# --- torch integration -------------------------------------------------------------------------------


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    for x, n in (
        (torch.randn(4, 3, 5).to(dtype), 3),
        (torch.randn(2, 7).to(dtype), 1),
        (torch.randn(0, 3).to(dtype), 2),
    ):
        for clamp in (True, False):
            torch.library.opcheck(torch.ops.jit_unlearn.perturb.default, (x, n, 0.5, 3, 1, clamp))


@requires_compiled
def test_torch_compile_fullgraph():
    def step(x):
        x_tilde, in_norm = torch.ops.jit_unlearn.perturb(x, 3, 0.5, 7, 2, True)
        return x_tilde.sum(dim=0) * 2, in_norm + 1

    x = torch.randn(4, 3, 5)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), step(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@requires_compiled
def test_torch_compile_fullgraph_public_op():
    def step(x):
        x_tilde, in_norm = ops.perturb(x, 2, 0.25, seed=1, offset=3)
        return x_tilde.mean(dim=0), in_norm

    x = torch.randn(3, 8)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), step(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- _perturb_out (the caller's buffers) ---------------------------------------------------------------


def _out_buffers(x, n):
    op = torch_ops.opmath_dtype(x.dtype)
    return torch.full((n, *x.shape), float("nan"), dtype=x.dtype), torch.full((n, x.shape[0]), float("nan"), dtype=op)


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n", [((9, 3, 5, 7), 4), ((6, 231), 7), ((5, 0), 3), ((0, 4), 2), ((3, 2), 0)])
def test_perturb_out_equals_perturb(dtype, shape, n):
    # stale buffer contents (NaN) must not leak into the result, including in_norm of empty samples
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    for clamp in (True, False):
        x_tilde, in_norm = _out_buffers(x, n)
        assert torch.ops.jit_unlearn._perturb_out(x, n, 0.4, 5, 9, clamp, x_tilde, in_norm) is None
        want = torch.ops.jit_unlearn.perturb(x, n, 0.4, 5, 9, clamp)
        assert torch.equal(x_tilde, want[0]) and torch.equal(in_norm, want[1])
        ref_x, ref_norm = _out_buffers(x, n)
        torch_ops.perturb_out(x, n, 0.4, 5, 9, clamp, ref_x, ref_norm)
        assert torch.equal(ref_x, want[0])
        torch.testing.assert_close(ref_norm, want[1], **norm_tolerance(dtype))


@requires_compiled
@pytest.mark.parametrize(
    "bad,exc,name",
    [
        ({"x_tilde": torch.empty(2, 4, 3)}, ValueError, "x_tilde"),
        ({"x_tilde": torch.empty(3, 4, 3, dtype=torch.float64)}, TypeError, "x_tilde"),
        ({"x_tilde": torch.empty(3, 3, 4).transpose(1, 2)}, ValueError, "contiguous"),
        ({"in_norm": torch.empty(3, 5)}, ValueError, "in_norm"),
        ({"in_norm": torch.empty(3, 4, dtype=torch.float64)}, TypeError, "in_norm"),
    ],
)
def test_perturb_out_errors_name_the_argument(bad, exc, name):
    args = {"x_tilde": torch.empty(3, 4, 3), "in_norm": torch.empty(3, 4), **bad}
    with pytest.raises(exc, match=name):
        torch.ops.jit_unlearn._perturb_out(torch.randn(4, 3), 3, 0.5, 1, 0, True, args["x_tilde"], args["in_norm"])


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_out_opcheck(dtype):
    x = torch.randn(4, 3, 5).to(dtype)
    x_tilde, in_norm = _out_buffers(x, 3)
    torch.library.opcheck(torch.ops.jit_unlearn._perturb_out.default, (x, 3, 0.5, 3, 1, True, x_tilde, in_norm))


@requires_compiled
def test_perturb_out_torch_compile_fullgraph():
    def step(x, x_tilde, in_norm):
        torch.ops.jit_unlearn._perturb_out(x, 3, 0.5, 7, 2, True, x_tilde, in_norm)
        return x_tilde.sum(dim=0) * 2, in_norm + 1

    x = torch.randn(4, 3, 5)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, *_out_buffers(x, 3)), step(x, *_out_buffers(x, 3))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@requires_cuda
@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_out_cuda_matches_cpu(dtype):
    x = torch.randn(6, 3, 9).to(dtype)
    x_tilde, in_norm = (t.cuda() for t in _out_buffers(x, 4))
    torch.ops.jit_unlearn._perturb_out(x.cuda(), 4, 0.5, 3, 1, True, x_tilde, in_norm)
    want = torch.ops.jit_unlearn.perturb(x, 4, 0.5, 3, 1, True)
    assert torch.equal(x_tilde.cpu(), want[0])
    torch.testing.assert_close(in_norm.cpu(), want[1], **norm_tolerance(dtype))


# --- CUDA --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clamp", [True, False])
def test_cuda_matches_cpu_bitwise(dtype, clamp):
    if not (_backend.has_kernel("cuda") and _backend.has_kernel("cpu")):
        pytest.skip("compiled CUDA and CPU kernels not both built")
    seed = as_int64(2**63 + 5)
    for shape, n in (((128, 3, 32, 32), 3), ((9, 3, 5, 7), 4), ((5, 3), 2), ((7,), 3), ((4, 0), 2)):
        x = (torch.randn(shape) * 2).to(dtype)
        cpu = torch.ops.jit_unlearn.perturb(x, n, 0.6, seed, 17, clamp)
        gpu = torch.ops.jit_unlearn.perturb(x.cuda(), n, 0.6, seed, 17, clamp)
        assert torch.equal(gpu[0].cpu(), cpu[0]), (shape, dtype)
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], **norm_tolerance(dtype))
        ref = torch_ops.perturb(x.cuda(), n, 0.6, seed, 17, clamp)
        assert torch.equal(ref[0].cpu(), cpu[0]), (shape, dtype)
