"""Tests of lipschitz_ratio, _lipschitz_ratio_backward and _lipschitz_ratio_and_grad: compiled kernels,
pure-PyTorch tier, autograd."""

import os
import subprocess
import sys

import pytest
import torch

import jit_unlearn
from conftest import requires_cuda
from jit_unlearn import _backend, ops, torch_ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, B, K): K below, at and above the CPU kernel's 8-lane block, with ragged tails.
SHAPES = [(1, 1, 1), (3, 5, 7), (2, 4, 8), (2, 4, 16), (4, 3, 33), (25, 16, 100), (6, 2, 257)]

HAS_COMPILED_CPU = _backend.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "jit_unlearn::lipschitz_ratio", "CPU"
)
requires_compiled = pytest.mark.skipif(not HAS_COMPILED_CPU, reason="compiled CPU kernels not built")


def _fwd(*args):
    return torch.ops.jit_unlearn.lipschitz_ratio.default(*args)


def _bwd(*args):
    return torch.ops.jit_unlearn._lipschitz_ratio_backward.default(*args)


def _fused(*args):
    return torch.ops.jit_unlearn._lipschitz_ratio_and_grad.default(*args)


def _inputs(n, b, k, dtype, seed=0, norm_dtype=None):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(b, k, generator=g, dtype=torch.float64).to(dtype)
    out_perturbed = (out.double() + 0.3 * torch.randn(n, b, k, generator=g, dtype=torch.float64)).to(dtype)
    in_norm = (0.5 + torch.rand(n, b, generator=g, dtype=torch.float64)).to(norm_dtype or dtype)
    return out, out_perturbed, in_norm


def _tol(dtype):
    """Tolerances for outputs stored in `dtype` (accumulation is always float32 or float64)."""
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=1e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    }[dtype]


def _independent(out, out_perturbed, in_norm, grad):
    """Float64 transcription of the maths: ratio and the gradients of sum(grad * ratio)."""
    o, p, d, g = out.double(), out_perturbed.double(), in_norm.double(), grad.double()
    diff = o.unsqueeze(0) - p
    num = diff.pow(2).sum(dim=2).sqrt()
    ok_den = d > 0
    ratio = torch.where(ok_den, num / torch.where(ok_den, d, 1.0), 0.0)
    ok = ok_den & (num > 0)
    coef = torch.where(ok, g / torch.where(ok, num * d, 1.0), 0.0)
    grad_out = (diff * coef.unsqueeze(2)).sum(dim=0)
    grad_norm = torch.where(ok_den, -g * ratio / torch.where(ok_den, d, 1.0), 0.0)
    return ratio, grad_out, -diff * coef.unsqueeze(2), grad_norm


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_matches_torch_ops(dtype, shape):
    n, b, k = shape
    out, out_perturbed, in_norm = _inputs(n, b, k, dtype, seed=n * 1000 + b * 10 + k)
    ratio = _fwd(out, out_perturbed, in_norm)
    expected = torch_ops.lipschitz_ratio(out, out_perturbed, in_norm)
    assert ratio.dtype == torch_ops.opmath_dtype(dtype) and ratio.shape == (n, b)
    torch.testing.assert_close(ratio, expected, **_tol(ratio.dtype))

    grad = torch.randn(n, b, generator=torch.Generator().manual_seed(k), dtype=ratio.dtype)
    grad_out, grad_pert = _bwd(grad, out, out_perturbed, in_norm, True)
    ref_out, ref_pert = torch_ops.lipschitz_ratio_backward(grad, out, out_perturbed, in_norm, True)
    assert grad_out.dtype == dtype and grad_pert.dtype == dtype
    torch.testing.assert_close(grad_out, ref_out, **_tol(dtype))
    torch.testing.assert_close(grad_pert, ref_pert, **_tol(dtype))

    only_out, empty = _bwd(grad, out, out_perturbed, in_norm, False)
    assert empty.shape == (0,) and empty.dtype == dtype
    torch.testing.assert_close(only_out, grad_out, rtol=0, atol=0)


@requires_compiled
def test_compiled_independent_of_thread_count():
    out, out_perturbed, in_norm = _inputs(25, 64, 100, torch.float32, seed=31)
    grad = torch.randn(25, 64)
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            results.append((_fwd(out, out_perturbed, in_norm), *_bwd(grad, out, out_perturbed, in_norm, True)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


_ISA_SCRIPT = """
import sys, torch, jit_unlearn
cases = torch.load(sys.argv[1])
results = [(torch.ops.jit_unlearn.lipschitz_ratio(out, pert, in_norm),
            *torch.ops.jit_unlearn._lipschitz_ratio_backward(grad, out, pert, in_norm, True))
           for out, pert, in_norm, grad in cases]
torch.save(results, sys.argv[2])
"""


@requires_compiled
def test_baseline_isa_path_agrees_bitwise(tmp_path):
    # A child process with ATEN_CPU_CAPABILITY=default runs the baseline-ISA loops; this process runs
    # the AVX2 ones where the CPU has them.  Same inputs, so every output must match bit for bit.
    cases = []
    for dtype in DTYPES:
        out, pert, in_norm = _inputs(5, 7, 101, dtype, seed=37)
        cases.append((out, pert, in_norm, torch.randn(5, 7, dtype=torch_ops.opmath_dtype(dtype))))
    torch.save(cases, tmp_path / "cases.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(jit_unlearn.__file__)))
    env = dict(
        os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    )
    subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "cases.pt"), str(tmp_path / "base.pt")], env=env, check=True
    )
    for (out, pert, in_norm, grad), base in zip(cases, torch.load(tmp_path / "base.pt")):
        here = (_fwd(out, pert, in_norm), *_bwd(grad, out, pert, in_norm, True))
        for x, y in zip(here, base):
            assert torch.equal(x, y)


@requires_compiled
@pytest.mark.parametrize("norm_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_in_norm_any_float_dtype(norm_dtype):
    out, out_perturbed, in_norm = _inputs(3, 4, 20, torch.float32, seed=5, norm_dtype=norm_dtype)
    ratio = _fwd(out, out_perturbed, in_norm)
    assert ratio.dtype == torch.float32
    torch.testing.assert_close(ratio, torch_ops.lipschitz_ratio(out, out_perturbed, in_norm))
    grad = torch.ones_like(ratio)
    for got, want in zip(
        _bwd(grad, out, out_perturbed, in_norm, True),
        torch_ops.lipschitz_ratio_backward(grad, out, out_perturbed, in_norm, True),
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ops_match_independent_maths(backend, dtype):
    out, out_perturbed, in_norm = _inputs(5, 6, 19, dtype, seed=11)
    out.requires_grad_(True)
    out_perturbed.requires_grad_(True)
    in_norm.requires_grad_(True)
    ratio = ops.lipschitz_ratio(out, out_perturbed, in_norm)
    grad = torch.randn(ratio.shape, generator=torch.Generator().manual_seed(2), dtype=ratio.dtype)
    ratio.backward(grad)
    want_ratio, want_out, want_pert, want_norm = _independent(
        out.detach(), out_perturbed.detach(), in_norm.detach(), grad
    )
    tol = _tol(dtype)
    torch.testing.assert_close(ratio.detach(), want_ratio.to(dtype), **tol)
    torch.testing.assert_close(out.grad, want_out.to(dtype), **tol)
    torch.testing.assert_close(out_perturbed.grad, want_pert.to(dtype), **tol)
    torch.testing.assert_close(in_norm.grad, want_norm.to(dtype), **tol)


def _triangles(dtype):
    """3-4-5 and 6-8-10 triangles; b = 1 has a zero difference (n = 0) and a zero in_norm (n = 1)."""
    out = torch.tensor([[3.0, 4.0], [1.0, 1.0]], dtype=dtype)
    out_perturbed = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[-3.0, -4.0], [7.0, 9.0]]], dtype=dtype)
    in_norm = torch.tensor([[2.0, 1.0], [4.0, 0.0]], dtype=dtype)
    return out, out_perturbed, in_norm


def _check_triangles(ratio, grad_out, grad_pert, grad_norm, dtype):
    # ratios: 5 / 2, 0 / 1, 10 / 4, (in_norm 0) -> 0.
    torch.testing.assert_close(ratio, torch.tensor([[2.5, 0.0], [2.5, 0.0]], dtype=ratio.dtype), rtol=0, atol=0)
    # d/d out_0 = (3, 4) / (5 * 2) + (6, 8) / (10 * 4); out_1 gets nothing.
    torch.testing.assert_close(grad_out, torch.tensor([[0.45, 0.6], [0.0, 0.0]], dtype=dtype))
    torch.testing.assert_close(
        grad_pert, torch.tensor([[[-0.3, -0.4], [0.0, 0.0]], [[-0.15, -0.2], [0.0, 0.0]]], dtype=dtype)
    )
    # d/d in_norm = -ratio / in_norm, 0 where in_norm is 0.
    torch.testing.assert_close(grad_norm, torch.tensor([[-1.25, 0.0], [-0.625, 0.0]], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triangles_by_hand_ops(backend, dtype):
    out, out_perturbed, in_norm = (t.requires_grad_(True) for t in _triangles(dtype))
    ratio = ops.lipschitz_ratio(out, out_perturbed, in_norm)
    ratio.sum().backward()
    _check_triangles(ratio.detach(), out.grad, out_perturbed.grad, in_norm.grad, dtype)


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_triangles_by_hand_compiled(dtype):
    out, out_perturbed, in_norm = (t.requires_grad_(True) for t in _triangles(dtype))
    ratio = _fwd(out, out_perturbed, in_norm)
    ratio.sum().backward()
    _check_triangles(ratio.detach(), out.grad, out_perturbed.grad, in_norm.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_backward_matches_hand_and_autograd(backend, dtype):
    # the graph-free gradient w.r.t. out: the triangles by hand, with a scalar seed expanded to [N, B]
    out, out_perturbed, in_norm = _triangles(dtype)
    seed = torch.ones((), dtype=dtype).expand(2, 2)
    got = ops.lipschitz_ratio_backward(seed, out, out_perturbed, in_norm)
    torch.testing.assert_close(got, torch.tensor([[0.45, 0.6], [0.0, 0.0]], dtype=dtype))
    # and what autograd gives through the differentiable op, for a general upstream gradient:
    # bitwise on the compiled tier (its autograd calls the same kernel), to rounding on the torch tier
    out, out_perturbed, in_norm = _inputs(5, 6, 19, dtype, seed=3)
    grad = torch.rand(5, 6, generator=torch.Generator().manual_seed(4), dtype=dtype)
    leaf = out.clone().requires_grad_(True)
    ops.lipschitz_ratio(leaf, out_perturbed, in_norm).backward(grad)
    got = ops.lipschitz_ratio_backward(grad, out, out_perturbed, in_norm)
    if backend == "compiled":
        assert torch.equal(got, leaf.grad)
    torch.testing.assert_close(got, leaf.grad, **_tol(dtype))


@pytest.mark.parametrize(
    "bad,exc,name",
    [
        ({"grad": torch.ones(3, 2)}, ValueError, "grad"),
        ({"grad": torch.ones(2, 2, dtype=torch.int64)}, TypeError, "grad"),
        ({"grad": "ones"}, TypeError, "grad"),
        ({"out": torch.ones(2, 3)}, ValueError, "out_perturbed"),
        ({"in_norm": torch.ones(2, 3)}, ValueError, "in_norm"),
    ],
)
def test_public_backward_bad_arguments_name_the_argument(backend, bad, exc, name):
    out, out_perturbed, in_norm = _triangles(torch.float32)
    args = {"grad": torch.ones(2, 2), "out": out, "out_perturbed": out_perturbed, "in_norm": in_norm, **bad}
    with pytest.raises(exc, match=name):
        ops.lipschitz_ratio_backward(**args)


def test_zero_difference_gives_zero_gradient(backend):
    out = torch.randn(4, 6, dtype=torch.float64)
    out_perturbed = out.unsqueeze(0).repeat(3, 1, 1)
    out_perturbed[1, 2] += 0.5  # one row differs; all others are exactly equal to out
    out.requires_grad_(True)
    out_perturbed.requires_grad_(True)
    in_norm = torch.full((3, 4), 0.7, dtype=torch.float64, requires_grad=True)
    ratio = ops.lipschitz_ratio(out, out_perturbed, in_norm)
    ratio.sum().backward()
    same = torch.ones(3, 4, dtype=torch.bool)
    same[1, 2] = False
    assert torch.all(ratio.detach()[same] == 0)
    for g in (out.grad, out_perturbed.grad, in_norm.grad):
        assert torch.isfinite(g).all()
    assert torch.all(out.grad[[0, 1, 3]] == 0) and torch.all(out_perturbed.grad[same] == 0)
    assert torch.all(in_norm.grad[same] == 0)
    torch.testing.assert_close(out.grad[2], torch.full((6,), -0.5 / (1.5**0.5 * 0.7), dtype=torch.float64))


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_difference_compiled_all_dtypes(dtype):
    out = torch.randn(3, 5).to(dtype)
    out_perturbed = out.unsqueeze(0).expand(2, 3, 5)
    in_norm = torch.ones(2, 3)
    ratio = _fwd(out, out_perturbed, in_norm)
    assert torch.all(ratio == 0)
    grad_out, grad_pert = _bwd(torch.ones_like(ratio), out, out_perturbed, in_norm, True)
    assert torch.all(grad_out == 0) and torch.all(grad_pert == 0)


def test_zero_or_negative_in_norm(backend):
    out, out_perturbed, _ = _inputs(2, 3, 4, torch.float32, seed=3)
    in_norm = torch.tensor([[0.0, -1.0, 0.0], [-0.0, 0.0, -2.5]], requires_grad=True)
    out.requires_grad_(True)
    out_perturbed.requires_grad_(True)
    ratio = ops.lipschitz_ratio(out, out_perturbed, in_norm)
    assert torch.all(ratio.detach() == 0)
    ratio.sum().backward()
    for g in (out.grad, out_perturbed.grad, in_norm.grad):
        assert torch.all(g == 0)


def _gradcheck(fn):
    out, out_perturbed, in_norm = _inputs(3, 4, 5, torch.float64, seed=7)
    # Differences of about 0.3 per element and in_norm in [0.5, 1.5]: far from both kinks.
    args = tuple(t.clone().requires_grad_(True) for t in (out, out_perturbed, in_norm))
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_ops(backend):
    _gradcheck(ops.lipschitz_ratio)


@requires_compiled
def test_gradcheck_compiled_op():
    _gradcheck(_fwd)


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    out, out_perturbed, in_norm = _inputs(3, 4, 18, dtype, seed=9)
    torch.library.opcheck(torch.ops.jit_unlearn.lipschitz_ratio.default, (out, out_perturbed, in_norm))
    if dtype in (torch.float32, torch.float64):
        grad_args = (
            out.clone().requires_grad_(True),
            out_perturbed.clone().requires_grad_(True),
            in_norm.clone().requires_grad_(True),
        )
        torch.library.opcheck(torch.ops.jit_unlearn.lipschitz_ratio.default, grad_args)
        torch.library.opcheck(torch.ops.jit_unlearn.lipschitz_ratio.default, (grad_args[0], out_perturbed, in_norm))
    grad = torch.randn(3, 4, dtype=torch_ops.opmath_dtype(dtype))
    for compute_perturbed_grad in (True, False):
        torch.library.opcheck(
            torch.ops.jit_unlearn._lipschitz_ratio_backward.default,
            (grad, out, out_perturbed, in_norm, compute_perturbed_grad),
        )


def _loss(out, out_perturbed, in_norm):
    return ops.lipschitz_ratio(out, out_perturbed, in_norm).sum() / out_perturbed.shape[0]


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    out, out_perturbed, in_norm = _inputs(4, 3, 10, torch.float32, seed=13)
    leaf = out.clone().requires_grad_(True)
    loss = compiled(leaf, out_perturbed, in_norm)
    loss.backward()
    eager = out.clone().requires_grad_(True)
    want = torch_ops.lipschitz_ratio(eager, out_perturbed, in_norm).sum() / 4
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(leaf.grad, eager.grad)
    torch._dynamo.reset()


@requires_compiled
def test_torch_compile_fullgraph_compiled_op_both_grads():
    torch._dynamo.reset()

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = str(gm.code)
            return make_boxed_func(gm.forward)

        return compiler

    def loss(out, out_perturbed, in_norm):
        return torch.ops.jit_unlearn.lipschitz_ratio(out, out_perturbed, in_norm).mean()

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    out, out_perturbed, in_norm = _inputs(3, 5, 7, torch.float64, seed=17)
    args = [t.clone().requires_grad_(True) for t in (out, out_perturbed, in_norm)]
    compiled(*args).backward()
    ref_args = [t.clone().requires_grad_(True) for t in (out, out_perturbed, in_norm)]
    torch_ops.lipschitz_ratio(*ref_args).mean().backward()
    for a, r in zip(args, ref_args):
        torch.testing.assert_close(a.grad, r.grad)
    # The traced graphs call the fused ops, not a decomposition.
    assert "jit_unlearn.lipschitz_ratio" in graphs["forward"]
    assert "jit_unlearn._lipschitz_ratio_backward" in graphs["backward"]
    torch._dynamo.reset()


def test_non_contiguous_inputs(backend):
    out_c, pert_c, norm_c = _inputs(4, 6, 9, torch.float32, seed=19)
    out = out_c.t().contiguous().t()  # [B, K] with column-major strides
    pert = pert_c.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    in_norm = torch.stack([norm_c, torch.zeros_like(norm_c)], dim=2)[..., 0]  # stride 2
    assert not (out.is_contiguous() or pert.is_contiguous() or in_norm.is_contiguous())
    leaf = out.clone(memory_format=torch.preserve_format).requires_grad_(True)
    ratio = ops.lipschitz_ratio(leaf, pert, in_norm)
    ratio.sum().backward()
    torch.testing.assert_close(ratio.detach(), torch_ops.lipschitz_ratio(out_c, pert_c, norm_c))
    want, _ = torch_ops.lipschitz_ratio_backward(torch.ones(4, 6), out_c, pert_c, norm_c, False)
    torch.testing.assert_close(leaf.grad, want)


@requires_compiled
def test_non_contiguous_backward_op():
    out_c, pert_c, norm_c = _inputs(3, 5, 21, torch.float64, seed=23)
    grad_c = torch.randn(3, 5, dtype=torch.float64)
    pert = pert_c.transpose(0, 1).contiguous().transpose(0, 1)
    got = _bwd(grad_c.t().contiguous().t(), out_c.t().contiguous().t(), pert, norm_c.t().contiguous().t(), True)
    want = torch_ops.lipschitz_ratio_backward(grad_c, out_c, pert_c, norm_c, True)
    for g, w in zip(got, want):
        assert g.is_contiguous()
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0)])
def test_empty(backend, shape):
    n, b, k = shape
    out = torch.randn(b, k, requires_grad=True)
    out_perturbed = torch.randn(n, b, k, requires_grad=True)
    in_norm = torch.ones(n, b)
    ratio = ops.lipschitz_ratio(out, out_perturbed, in_norm)
    assert ratio.shape == (n, b) and ratio.dtype == torch.float32
    assert torch.all(ratio == 0)  # K = 0: zero distance
    ratio.sum().backward()
    assert out.grad.shape == (b, k) and torch.all(out.grad == 0)
    assert out_perturbed.grad.shape == (n, b, k)


@requires_compiled
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_empty_backward_op(shape):
    n, b, k = shape
    out, out_perturbed, in_norm = torch.randn(b, k), torch.randn(n, b, k), torch.ones(n, b)
    grad_out, grad_pert = _bwd(torch.ones(n, b), out, out_perturbed, in_norm, True)
    assert grad_out.shape == (b, k) and torch.all(grad_out == 0)
    assert grad_pert.shape == (n, b, k)


def _bad_cases():
    out, pert, norm = torch.randn(3, 4), torch.randn(2, 3, 4), torch.rand(2, 3) + 0.5
    return [
        ("out", ValueError, (torch.randn(3, 4, 1), pert, norm)),
        ("out_perturbed", ValueError, (out, torch.randn(2, 3, 5), norm)),
        ("out_perturbed", ValueError, (out, torch.randn(6, 4), norm)),
        ("in_norm", ValueError, (out, pert, torch.rand(3, 2))),
        ("in_norm", ValueError, (out, pert, torch.rand(6))),
        ("out_perturbed", TypeError, (out, pert.double(), norm)),
        ("out", TypeError, (out.int(), pert.int(), norm)),
        ("in_norm", TypeError, (out, pert, torch.ones(2, 3, dtype=torch.int64))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments_ops(case):
    name, exc, args = _bad_cases()[case]
    with pytest.raises(exc, match=name):
        ops.lipschitz_ratio(*args)


@requires_compiled
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments_torch_ops(case):
    name, exc, args = _bad_cases()[case]
    with pytest.raises(exc, match=f"lipschitz_ratio: {name}:"):
        _fwd(*args)
    with pytest.raises(exc, match=f"_lipschitz_ratio_backward: {name}:"):
        _bwd(torch.ones(2, 3), *args, True)


@requires_compiled
def test_bad_grad_argument_backward_op():
    out, pert, norm = torch.randn(3, 4), torch.randn(2, 3, 4), torch.rand(2, 3) + 0.5
    with pytest.raises(ValueError, match="_lipschitz_ratio_backward: grad:"):
        _bwd(torch.ones(3, 2), out, pert, norm, False)
    with pytest.raises(TypeError, match="_lipschitz_ratio_backward: grad:"):
        _bwd(torch.ones(2, 3, dtype=torch.int32), out, pert, norm, False)


# ---------------------------------------------------------------- _lipschitz_ratio_and_grad


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 4), (2, 3, 0)])
def test_fused_is_bitwise_forward_and_backward(dtype, shape):
    # the fused op's ratios and out-gradient are exactly the two separate ops' results
    out, out_perturbed, in_norm = _inputs(*shape, dtype, seed=31)
    if in_norm.numel():
        in_norm[..., :1] = 0.0  # the in_norm guard
    if out_perturbed.numel():
        out_perturbed[:1, :1] = out[:1]  # and the zero-difference guard
    grad = torch.rand(shape[:2], generator=torch.Generator().manual_seed(1), dtype=torch_ops.opmath_dtype(dtype))
    ratio, grad_out = _fused(grad, out, out_perturbed, in_norm)
    assert ratio.dtype == torch_ops.opmath_dtype(dtype) and grad_out.dtype == dtype
    assert torch.equal(ratio, _fwd(out, out_perturbed, in_norm))
    assert torch.equal(grad_out, _bwd(grad, out, out_perturbed, in_norm, False)[0])
    # and match the pure-PyTorch tier
    want_ratio, want_grad = torch_ops.lipschitz_ratio_and_grad(grad, out, out_perturbed, in_norm)
    torch.testing.assert_close(ratio, want_ratio, **_tol(ratio.dtype))
    torch.testing.assert_close(grad_out, want_grad, **_tol(dtype))


@requires_compiled
def test_fused_by_hand_with_expanded_seed():
    out, out_perturbed, in_norm = _triangles(torch.float32)
    ratio, grad_out = _fused(torch.ones(()).expand(2, 2), out, out_perturbed, in_norm)
    torch.testing.assert_close(ratio, torch.tensor([[2.5, 0.0], [2.5, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(grad_out, torch.tensor([[0.45, 0.6], [0.0, 0.0]]))


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_opcheck(dtype):
    out, out_perturbed, in_norm = _inputs(3, 4, 18, dtype, seed=9)
    grad = torch.rand(3, 4, dtype=torch_ops.opmath_dtype(dtype))
    torch.library.opcheck(torch.ops.jit_unlearn._lipschitz_ratio_and_grad.default, (grad, out, out_perturbed, in_norm))


@requires_compiled
def test_fused_torch_compile_fullgraph():
    out, out_perturbed, in_norm = _inputs(5, 6, 10, torch.float32, seed=2)
    grad = torch.full((5, 6), 0.2)

    def loss_and_grad(o, p, n, g):
        ratio, grad_out = torch.ops.jit_unlearn._lipschitz_ratio_and_grad(g, o, p, n)
        return ratio.sum(), grad_out * 2

    compiled = torch.compile(loss_and_grad, fullgraph=True, backend="aot_eager")
    got = compiled(out, out_perturbed, in_norm, grad)
    want = loss_and_grad(out, out_perturbed, in_norm, grad)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@requires_compiled
def test_fused_errors_name_the_argument():
    out, pert, norm = torch.randn(3, 4), torch.randn(2, 3, 4), torch.rand(2, 3) + 0.5
    with pytest.raises(ValueError, match="_lipschitz_ratio_and_grad: grad:"):
        _fused(torch.ones(3, 2), out, pert, norm)
    with pytest.raises(ValueError, match="_lipschitz_ratio_and_grad: out_perturbed:"):
        _fused(torch.ones(2, 3), out, pert[:, :2], norm)


@requires_cuda
@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (25, 128, 100), (3, 7, 1000), (0, 3, 4), (2, 3, 0)])
def test_fused_cuda_matches_cpu(dtype, shape):
    out, out_perturbed, in_norm = _inputs(*shape, dtype, seed=37)
    grad = torch.rand(shape[:2], dtype=torch_ops.opmath_dtype(dtype))
    dev = torch.device("cuda")
    got = _fused(grad.to(dev), out.to(dev), out_perturbed.to(dev), in_norm.to(dev))
    want = _fused(grad, out, out_perturbed, in_norm)
    for g, w in zip(got, want):
        assert g.device.type == "cuda" and g.dtype == w.dtype
        torch.testing.assert_close(g.cpu(), w, **_tol(w.dtype))


@requires_cuda
@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (25, 128, 100), (3, 7, 1000), (0, 3, 4), (2, 3, 0)])
def test_cuda_matches_cpu(dtype, shape):
    n, b, k = shape
    out, out_perturbed, in_norm = _inputs(n, b, k, dtype, seed=29)
    in_norm[..., :1] = 0.0  # the in_norm guard runs on the GPU too
    out_perturbed[:1, 1:2] = out[1:2]  # and the zero-difference guard
    grad = torch.randn(n, b, dtype=torch_ops.opmath_dtype(dtype))
    dev = torch.device("cuda")
    ratio = _fwd(out.to(dev), out_perturbed.to(dev), in_norm.to(dev))
    torch.testing.assert_close(ratio.cpu(), _fwd(out, out_perturbed, in_norm), **_tol(ratio.dtype))
    for flag in (True, False):
        got = _bwd(grad.to(dev), out.to(dev), out_perturbed.to(dev), in_norm.to(dev), flag)
        want = _bwd(grad, out, out_perturbed, in_norm, flag)
        for g, w in zip(got, want):
            assert g.device.type == "cuda" and g.dtype == w.dtype
            torch.testing.assert_close(g.cpu(), w, **_tol(w.dtype))
    with pytest.raises(ValueError, match="in_norm: expected device"):
        _fwd(out.to(dev), out_perturbed.to(dev), in_norm)
