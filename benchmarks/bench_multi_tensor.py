"""ssd_dampen_ and accumulate_importance_ on a ResNet-18-shaped parameter list (62 tensors, 11.17 M float32
elements), each next to its baselines in one benchmark group.

    python -m pytest benchmarks/bench_multi_tensor.py --benchmark-only --benchmark-min-rounds=3
"""

import pytest
import torch

import jit_unlearn.ops  # noqa: F401  (loads the compiled extension)
from jit_unlearn import _backend

pytestmark = pytest.mark.skipif(
    not (
        _backend.extension_loaded()
        and torch._C._dispatch_has_kernel_for_dispatch_key("jit_unlearn::ssd_dampen_", "CPU")
    ),
    reason="compiled CPU kernels not built",
)

ALPHA = 10.0
SELECTED_FRACTION = 0.01  # share of elements with I_f > alpha * I_D; ~1% is typical of SSD runs
RESTORED_ROUNDS = 25  # rounds of the ssd_dampen group (pedantic mode: params restored before each round)


def resnet18_shapes(num_classes: int = 10, width: int = 64) -> list[tuple[int, ...]]:
    """Parameter shapes of the CIFAR ResNet-18 (3x3 stem, four stages of two BasicBlocks, 1x1 downsample
    convolutions, BatchNorm weight/bias, linear head): 62 tensors, 11,173,962 elements for 10 classes."""
    shapes: list[tuple[int, ...]] = [(width, 3, 3, 3), (width,), (width,)]
    in_ch = width
    for stage, out_ch in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            block_in = in_ch if block == 0 else out_ch
            shapes += [(out_ch, block_in, 3, 3), (out_ch,), (out_ch,), (out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]
            if block == 0 and stage > 0:  # stride-2 stages project the shortcut
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
        in_ch = out_ch
    shapes += [(num_classes, 8 * width), (num_classes,)]
    return shapes


@pytest.fixture(scope="module")
def resnet18_lists():
    """params, imp_forget, imp_full (float32), with SELECTED_FRACTION of elements selected at ALPHA,
    scattered uniformly (the hardest case for touching theta only where selected)."""
    gen = torch.Generator().manual_seed(0)
    shapes = resnet18_shapes()
    assert len(shapes) == 62 and sum(torch.Size(s).numel() for s in shapes) == 11_173_962
    params = [torch.randn(s, generator=gen) for s in shapes]
    imp_full = [torch.rand(s, generator=gen) + 1e-3 for s in shapes]
    imp_forget = [
        torch.where(torch.rand(s, generator=gen) < SELECTED_FRACTION, d * (2 * ALPHA), d * (ALPHA / 2))
        for s, d in zip(shapes, imp_full)
    ]
    return params, imp_forget, imp_full


def _published_dampen(params, imp_forget, imp_full, alpha, lam=1.0, exponent=1.0):
    """The per-tensor loop of the published SSD code."""
    for p, f, d in zip(params, imp_forget, imp_full):
        locations = torch.where(f > d * alpha)
        weight = ((d * lam) / f).pow(exponent)
        update = weight[locations]
        update[update > 1] = 1
        p[locations] = p[locations] * update


def _run_restoring(benchmark, fn, params, pristine):
    """Time fn() with params restored (untimed) before every round, so repeated dampening never drifts
    toward subnormal values."""

    def setup():
        torch._foreach_copy_(params, pristine)

    benchmark.pedantic(fn, setup=setup, rounds=RESTORED_ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="ssd_dampen")
def test_ssd_dampen_ours(benchmark, resnet18_lists):
    pristine, f, d = resnet18_lists
    params = [p.clone() for p in pristine]
    benchmark.extra_info["selected"] = int(
        torch.ops.jit_unlearn.ssd_dampen_([p.clone() for p in pristine], f, d, ALPHA, 1.0, 1.0).sum()
    )
    _run_restoring(
        benchmark, lambda: torch.ops.jit_unlearn.ssd_dampen_(params, f, d, ALPHA, 1.0, 1.0), params, pristine
    )


@pytest.mark.benchmark(group="ssd_dampen")
def test_ssd_dampen_copy_floor(benchmark, resnet18_lists):
    """Memory-bandwidth floor: copying the parameter list once (foreach)."""
    pristine, _, _ = resnet18_lists
    params = [p.clone() for p in pristine]
    dst = [torch.empty_like(p) for p in pristine]
    _run_restoring(benchmark, lambda: torch._foreach_copy_(dst, params), params, pristine)


@pytest.mark.benchmark(group="ssd_dampen")
def test_ssd_dampen_copy_loop(benchmark, resnet18_lists):
    """Memory-bandwidth floor: copying the parameter list once (per-tensor copy_)."""
    pristine, _, _ = resnet18_lists
    params = [p.clone() for p in pristine]
    dst = [torch.empty_like(p) for p in pristine]

    def copy_loop():
        for out, p in zip(dst, params):
            out.copy_(p)

    _run_restoring(benchmark, copy_loop, params, pristine)


@pytest.mark.benchmark(group="ssd_dampen")
def test_ssd_dampen_published_loop(benchmark, resnet18_lists):
    pristine, f, d = resnet18_lists
    params = [p.clone() for p in pristine]
    _run_restoring(benchmark, lambda: _published_dampen(params, f, d, ALPHA), params, pristine)


@pytest.fixture(scope="module")
def accumulate_lists(resnet18_lists):
    params = resnet18_lists[0]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    return [torch.zeros_like(p) for p in params], grads


@pytest.mark.benchmark(group="accumulate_importance")
def test_accumulate_importance_ours(benchmark, accumulate_lists):
    acc, grads = accumulate_lists
    benchmark(torch.ops.jit_unlearn.accumulate_importance_, acc, grads, "square", 1.0)


@pytest.mark.benchmark(group="accumulate_importance")
def test_accumulate_importance_published_loop(benchmark, accumulate_lists):
    """The published per-tensor update: imp += grad.pow(2)."""
    acc, grads = accumulate_lists

    def loop():
        for a, g in zip(acc, grads):
            a += g.pow(2)

    benchmark(loop)


@pytest.mark.benchmark(group="accumulate_importance")
def test_accumulate_importance_foreach_addcmul(benchmark, accumulate_lists):
    acc, grads = accumulate_lists
    benchmark(torch._foreach_addcmul_, acc, grads, grads)
