"""perturb (x [128, 3, 32, 32], N = 25) against the composition randn + add + clamp + norm."""

import pytest
import torch

from jit_unlearn import _backend, ops

NUM_SAMPLES = 25
SIGMA = 0.5


@pytest.fixture(scope="module")
def x():
    return torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def composition(x):
    z = torch.randn(NUM_SAMPLES, *x.shape)
    x_tilde = (x + SIGMA * z).clamp(x.min(), x.max())
    return x_tilde, (x_tilde - x).flatten(2).norm(dim=2)


def test_perturb_composition(benchmark, x):
    benchmark.group = "perturb"
    benchmark(composition, x)


@pytest.mark.skipif(not _backend.has_kernel("cpu"), reason="compiled CPU kernels not built")
def test_perturb_op(benchmark, x):
    benchmark.group = "perturb"
    _backend.force_backend("compiled")
    try:
        benchmark(ops.perturb, x, NUM_SAMPLES, SIGMA, seed=0, offset=0, clamp=True)
    finally:
        _backend.force_backend(None)
