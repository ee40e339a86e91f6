"""Reduced precision, channels_last and compiled passes (issue 12) against the published code in float32,
CIFAR-shaped ResNet-18 (random weights and inputs: the cost does not depend on them).

Groups (each entry timed in the same pytest-benchmark run):
- jit, forget 64, batch 32, N=25: the published loop (float32) vs jit in float32 and in bfloat16;
  the "-paired" group times jit in bfloat16 with a round of the published loop before each round.
- ssd end to end, forget 64 of a full set of 256, batch 32: the published code vs ssd float32 / bfloat16.
- large forget set, 1,024 samples, batch 128: jit (N=4) and the SSD importance pass, float32,
  bfloat16 and (jit) bfloat16 compiled, against the published code; extra_info holds samples/s.
- per-sample importances over the whole digits training set (1,797 samples): ours vs BackPACK's
  SumGradSquared (skipped without `backpack-for-pytorch`, the `bench` extra).

Run: python -m pytest benchmarks/bench_precision.py --benchmark-only  (then benchmarks/ratios.py)
"""

import copy
import statistics
import time

import pytest
import torch
from bench_jit import _published_loop
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
import published  # tests/published.py
from jit_unlearn.data import digits
from jit_unlearn.models import MLP, ResNet18

SIGMA, LR = 0.5, 3e-4


def _resnet(seed=0):
    torch.manual_seed(seed)
    return ResNet18(10)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _rounds(benchmark, group, fn, model, rounds, warmup=1):
    """Time fn(fresh copy of model); the copy is made outside the timed region."""
    benchmark.group = group
    benchmark.pedantic(
        fn, setup=lambda: ((copy.deepcopy(model),), {}), rounds=rounds, iterations=1, warmup_rounds=warmup
    )


def _samples_per_second(benchmark, samples):
    if benchmark.stats is not None:
        benchmark.extra_info.update(
            samples_per_s_best=samples / benchmark.stats.stats.min,
            samples_per_s_median=samples / benchmark.stats.stats.median,
        )


# ---------------------------------------------------------------- JiT, the target setting

JIT_FORGET, JIT_BATCH, JIT_N = 64, 32, 25


def _jit(precision, n=JIT_N, batch=JIT_BATCH, compile=False):
    def run(model, x):
        ju.jit(model, x, sigma=SIGMA, lr=LR, num_samples=n, batch_size=batch, precision=precision, compile=compile,
               progress=False)  # fmt: skip

    return run


def _published_jit(model, x, n=JIT_N, batch=JIT_BATCH):
    model.train()  # the published loop runs the model as the caller left it (bench_jit)
    _published_loop(model, x, batch, n, SIGMA, LR)


JIT_VARIANTS = {"published_float32": _published_jit, "float32": _jit("float32"), "bfloat16": _jit("bfloat16")}


@pytest.mark.parametrize("variant", list(JIT_VARIANTS))
def test_jit_resnet18(benchmark, variant):
    x, _ = _images(JIT_FORGET)
    fn = JIT_VARIANTS[variant]
    _rounds(benchmark, "precision: jit, ResNet-18, forget 64, batch 32, N=25", lambda m: fn(m, x), _resnet(), 3)


def test_jit_resnet18_bfloat16_paired(benchmark):
    """jit in bfloat16 timed by pytest-benchmark, each round right after a round of the published
    loop in float32 that this test times itself; extra_info holds the per-round ratios."""
    x, _ = _images(JIT_FORGET)
    model = _resnet()
    baseline = []

    def setup():
        m = copy.deepcopy(model)
        start = time.perf_counter()
        _published_jit(m, x)
        baseline.append(time.perf_counter() - start)
        return (copy.deepcopy(model), x), {}

    benchmark.group = "precision: jit, ResNet-18, forget 64, batch 32, N=25, paired"
    benchmark.pedantic(JIT_VARIANTS["bfloat16"], setup=setup, rounds=4, iterations=1, warmup_rounds=1)
    _paired_info(benchmark, baseline, "published loop, float32")


def _paired_info(benchmark, baseline, name):
    if benchmark.stats is None:  # --benchmark-disable
        return
    times = list(benchmark.stats.stats.data)
    baseline = baseline[-len(times) :]  # the warm-up round's baseline is not paired
    ratios = [b / t for t, b in zip(times, baseline)]
    benchmark.extra_info.update(
        baseline=name,
        baseline_min=min(baseline),
        baseline_median=statistics.median(baseline),
        speedup_of_mins=min(baseline) / min(times),
        speedup_of_medians=statistics.median(baseline) / statistics.median(times),
        median_paired_speedup=statistics.median(ratios),
    )


# ---------------------------------------------------------------- SSD end to end

SSD_FULL, SSD_FORGET, SSD_BATCH = 256, 64, 32


def _ssd_loaders():
    x, y = _images(SSD_FULL, seed=1)
    full = DataLoader(TensorDataset(x, y), batch_size=SSD_BATCH)
    forget = DataLoader(TensorDataset(x[:SSD_FORGET], y[:SSD_FORGET]), batch_size=SSD_BATCH)
    return forget, full


SSD_VARIANTS = {
    "published_float32": lambda m, forget, full: published.ssd(m, forget, full),
    "float32": lambda m, forget, full: ju.ssd(m, forget, full, progress=False),
    "bfloat16": lambda m, forget, full: ju.ssd(m, forget, full, precision="bfloat16", progress=False),
}


@pytest.mark.parametrize("variant", list(SSD_VARIANTS))
def test_ssd_resnet18(benchmark, variant):
    forget, full = _ssd_loaders()
    fn = SSD_VARIANTS[variant]
    group = "precision: ssd end to end, ResNet-18, full 256, forget 64, batch 32"
    _rounds(benchmark, group, lambda m: fn(m, forget, full), _resnet(), 3)


def test_ssd_resnet18_bfloat16_paired(benchmark):
    """ssd in bfloat16 timed by pytest-benchmark, each round right after a round of the published
    code in float32 that this test times itself; extra_info holds the per-round ratios."""
    forget, full = _ssd_loaders()
    model = _resnet()
    baseline = []

    def setup():
        m = copy.deepcopy(model)
        start = time.perf_counter()
        SSD_VARIANTS["published_float32"](m, forget, full)
        baseline.append(time.perf_counter() - start)
        return (copy.deepcopy(model), forget, full), {}

    benchmark.group = "precision: ssd end to end, ResNet-18, full 256, forget 64, batch 32, paired"
    benchmark.pedantic(SSD_VARIANTS["bfloat16"], setup=setup, rounds=4, iterations=1, warmup_rounds=1)
    _paired_info(benchmark, baseline, "published code, float32")


# ---------------------------------------------------------------- a large forget set

LARGE, LARGE_BATCH, LARGE_N = 1024, 128, 4

LARGE_JIT = {
    "published_float32": lambda m, x: _published_jit(m, x, LARGE_N, LARGE_BATCH),
    "float32": _jit("float32", LARGE_N, LARGE_BATCH),
    "bfloat16": _jit("bfloat16", LARGE_N, LARGE_BATCH),
    "bfloat16_compiled": _jit("bfloat16", LARGE_N, LARGE_BATCH, compile=True),
}


@pytest.mark.parametrize("variant", list(LARGE_JIT))
def test_jit_large_forget_set(benchmark, variant):
    x, _ = _images(LARGE, seed=2)
    fn = LARGE_JIT[variant]
    group = "precision: jit, ResNet-18, forget 1,024, batch 128, N=4 (each call compiles anew)"
    _rounds(benchmark, group, lambda m: fn(m, x), _resnet(), 2, warmup=0)
    _samples_per_second(benchmark, LARGE)


def _published_importance(model, loader):
    model.eval()
    published.calc_importance(model, loader)
    model.zero_grad(set_to_none=True)


LARGE_IMPORTANCE = {
    "published_float32": _published_importance,
    "float32": lambda m, loader: ju.importances(m, loader, progress=False),
    "bfloat16": lambda m, loader: ju.importances(m, loader, precision="bfloat16", progress=False),
}


@pytest.mark.parametrize("variant", list(LARGE_IMPORTANCE))
def test_importance_pass_large(benchmark, variant):
    x, y = _images(LARGE, seed=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=LARGE_BATCH)
    fn = LARGE_IMPORTANCE[variant]
    model = _resnet()
    benchmark.group = "precision: SSD importance pass, ResNet-18, 1,024 samples, batch 128"
    benchmark.pedantic(lambda: fn(model, loader), rounds=2, iterations=1, warmup_rounds=0)
    _samples_per_second(benchmark, LARGE)


# ---------------------------------------------------------------- per-sample importances vs BackPACK


def _backpack_sum_grad_squared(model, loader):
    """sum_i g_i^2 / n with BackPACK's SumGradSquared (CE summed over the batch: per-sample gradients)."""
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    acc = [torch.zeros_like(p) for p in model.parameters()]
    n = 0
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        with backpack(SumGradSquared()):
            loss_fn(model(x), y).backward()
        torch._foreach_add_(acc, [p.sum_grad_squared for p in model.parameters()])
        n += x.shape[0]
    model.zero_grad(set_to_none=True)
    return [a / n for a in acc]


@pytest.fixture(scope="module")
def backpack_case():
    pytest.importorskip("backpack", reason="backpack-for-pytorch (the bench extra) is not installed")
    from backpack import extend

    torch.manual_seed(0)
    x, y = digits().tensors
    ours = MLP(64, (256, 256), 10).eval()
    theirs = MLP(64, (256, 256), 10).eval()
    theirs.load_state_dict(ours.state_dict())
    for m in theirs.modules():  # BackPACK's module hooks refuse in-place activations
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    theirs = extend(theirs)
    return ours, theirs, x, y


@pytest.mark.parametrize("batch_size", [64, 256, 1797])
@pytest.mark.parametrize("variant", ["ours", "backpack"])
def test_per_sample_vs_backpack(benchmark, backpack_case, variant, batch_size):
    ours, theirs, x, y = backpack_case
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    if variant == "ours":
        expected = _backpack_sum_grad_squared(theirs, loader)
        got = ju.importances(ours, loader, per_sample=True, progress=False)
        for g, e in zip(got.values(), expected):  # the same quantity
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-9)

        def fn():
            ju.importances(ours, loader, per_sample=True, progress=False)
    else:

        def fn():
            _backpack_sum_grad_squared(theirs, loader)

    benchmark.group = f"precision: per-sample importances, digits MLP, all 1,797 samples, batch {batch_size}"
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)
