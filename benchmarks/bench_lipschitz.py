"""lipschitz_ratio forward+backward (B=128, K=100, N=25): fused op against the autograd composition."""

import pytest
import torch

from jit_unlearn import _backend, ops

B, K, N = 128, 100, 25

HAS_COMPILED_CPU = _backend.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "jit_unlearn::lipschitz_ratio", "CPU"
)


def _composition(out, out_perturbed, in_norm):
    return (out.unsqueeze(0) - out_perturbed).norm(dim=2) / in_norm


IMPLS = {
    # The compiled kernels behind their autograd registration, as jit_unlearn.ops calls them.
    "fused": lambda *a: torch.ops.jit_unlearn.lipschitz_ratio.default(*a),
    # The public entry: argument checks, then the same op (needs the compiled CPU tier to be active).
    "fused-via-ops": ops.lipschitz_ratio,
    "composition": _composition,
}


@pytest.mark.parametrize("grads", ["out", "out+perturbed"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_lipschitz_forward_backward(benchmark, impl, grads):
    if impl == "fused" and not HAS_COMPILED_CPU:
        pytest.skip("compiled CPU kernels not built")
    if impl == "fused-via-ops" and _backend.backend_name("cpu") != "cpu":
        pytest.skip("jit_unlearn.ops does not run the compiled CPU tier here")
    g = torch.Generator().manual_seed(0)
    out = torch.randn(B, K, generator=g).requires_grad_(True)
    out_perturbed = torch.randn(N, B, K, generator=g).requires_grad_(grads == "out+perturbed")
    in_norm = torch.rand(N, B, generator=g) + 0.5
    fn = IMPLS[impl]

    def step():
        out.grad = None
        out_perturbed.grad = None
        fn(out, out_perturbed, in_norm).sum().backward()

    benchmark.group = "lipschitz"
    benchmark.extra_info.update(B=B, K=K, N=N, grads=grads, threads=torch.get_num_threads())
    benchmark(step)
    assert out.grad is not None and out.grad.shape == (B, K)
    assert (out_perturbed.grad is not None) == (grads == "out+perturbed")
