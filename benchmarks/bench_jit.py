"""JiT vs its floor (the model alone doing the same forwards and step) and vs the published loop.

Run: python -m pytest benchmarks/bench_jit.py --benchmark-only
 or: python benchmarks/bench_jit.py [digits_mlp|cifar_resnet18] --rounds R --threads T  (interleaved)
Per group, divide `default` by the `floor_*` rows (target <= 1.10) and `reference` by
`transcription` (target <= 1.0); the `-paired` groups alternate default and floor round by round
and carry the ratios in extra_info (benchmarks/ratios.py prints them).  Models: a digits MLP and a
CIFAR-shaped ResNet-18.
"""

import argparse
import copy
import statistics
import time

import pytest
import torch

from jit_unlearn import jit, torch_ops
from jit_unlearn.data import digits
from jit_unlearn.methods.jit import default_max_batch_elems
from jit_unlearn.models import MLP, ResNet18


def _digit3():
    x, y = digits().tensors
    return x[y == 3]


# name: (model factory, forget-set factory, batch size, N, sigma, lr, rounds)
CASES = {
    # every sample of digit 3 in scikit-learn digits (183), published N, batch 64 -> 3 steps
    "digits_mlp": (lambda: MLP(64, (256, 256), 10), _digit3, 64, 25, 1.0, 1.7e-3, 40),
    # 64 random CIFAR-shaped samples, batch 32, N=4 -> 2 steps of 5 forwards + 1 backward each
    "cifar_resnet18": (
        lambda: ResNet18(10),
        lambda: torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        32,
        4,
        0.5,
        3e-4,
        5,
    ),
}


def _make(case):
    make_model, make_forget, bs, n, sigma, lr, rounds = CASES[case]
    torch.manual_seed(0)
    return make_model(), make_forget(), bs, n, sigma, lr, rounds


def _run(benchmark, group, fn, model, rounds):
    """Time fn(fresh copy of model) `rounds` times; the copy is made outside the timed region."""
    benchmark.group = group
    benchmark.pedantic(fn, setup=lambda: ((copy.deepcopy(model),), {}), rounds=rounds, iterations=1, warmup_rounds=1)


def _floor(model, x_batches, noisy_batches, lr, batched):
    """The model alone, per batch: forward with grad, N no-grad forwards of the perturbed copies
    (N separate batches, or one N*B batch chunked like jit's default), a backward, an SGD step."""
    model.eval()
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    for x, noisy in zip(x_batches, noisy_batches):
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():
            if batched:
                flat = noisy.view(-1, *x.shape[1:])
                rows = max(1, default_max_batch_elems(x.device) // x[0].numel())
                chunks = -(-flat.shape[0] // rows)
                for chunk in flat.split(-(-flat.shape[0] // chunks)):
                    model(chunk)
            else:
                for xn in noisy:
                    model(xn)
        model(x).sum().backward()
        sgd.step()


def _floor_variants(case):
    """(model in eval mode, rounds, {variant: fn(model copy)}) for the default-vs-floor group."""
    model, forget, bs, n, sigma, lr, rounds = _make(case)
    model.eval()
    x_batches = list(forget.split(bs))
    noisy = [torch_ops.perturb(x, n, sigma, 0, t, True)[0] for t, x in enumerate(x_batches)]
    return (
        model,
        rounds,
        {
            "default": lambda m: jit(m, forget, sigma=sigma, lr=lr, num_samples=n, batch_size=bs, progress=False),
            "floor_sequential": lambda m: _floor(m, x_batches, noisy, lr, batched=False),
            "floor_batched": lambda m: _floor(m, x_batches, noisy, lr, batched=True),
        },
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", ["default", "floor_sequential", "floor_batched"])
def test_default_vs_floor(benchmark, case, variant):
    model, rounds, fns = _floor_variants(case)
    _run(benchmark, f"jit-{case}", fns[variant], model, rounds)


@pytest.mark.parametrize("case", list(CASES))
def test_default_vs_floor_paired(benchmark, case):
    """The default mode timed by pytest-benchmark, each of its rounds right after a round of the
    batched floor that this test times itself: the two alternate, so a change of machine speed
    between rounds hits both alike (the groups above time each variant in its own block of
    rounds).  extra_info holds the floor's times and the per-round ratios default / floor."""
    model, rounds, fns = _floor_variants(case)
    floor_times = []

    def setup():
        m = copy.deepcopy(model)
        start = time.perf_counter()
        fns["floor_batched"](m)
        floor_times.append(time.perf_counter() - start)
        return (copy.deepcopy(model),), {}

    benchmark.group = f"jit-{case}-paired"
    benchmark.pedantic(fns["default"], setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    default_times = list(benchmark.stats.stats.data)
    floor_times = floor_times[-len(default_times) :]  # the warm-up round's floor run is not paired
    ratios = [d / f for d, f in zip(default_times, floor_times)]
    benchmark.extra_info.update(
        floor_min=min(floor_times),
        floor_median=statistics.median(floor_times),
        ratio_of_mins=min(default_times) / min(floor_times),
        ratio_of_medians=statistics.median(default_times) / statistics.median(floor_times),
        median_paired_ratio=statistics.median(ratios),
    )


def _published_loop(model, forget, bs, n, sigma, lr):
    """The published JiT loop as written there: noise and batch min/max per copy on a deep copy of
    the batch, running sums of the norms, gradients accumulated across batches, plain SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.zero_grad()
    for (x,) in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(forget), batch_size=bs):
        out = model(x)
        loss = torch.tensor(0.0)
        in_n = torch.tensor(0.0)
        out_n = torch.tensor(0.0)
        for _ in range(n):
            img = copy.deepcopy(x)
            hi, lo = img.max(), img.min()
            img2 = torch.clamp(img + torch.randn(img.size()) * sigma + 0.0, min=lo, max=hi)
            with torch.no_grad():
                out2 = model(img2)
            in_norm = torch.linalg.vector_norm(x.view(x.size(0), -1) - img2.view(img2.size(0), -1), dim=1)
            out_norm = torch.linalg.vector_norm(out - out2, dim=1)
            in_n += in_norm.sum()
            out_n += out_norm.sum()
            loss += ((out_norm / in_norm).sum()).abs()
        loss /= n
        loss.backward()
        optimizer.step()


def _reference_variants(case):
    """(model in train mode, rounds, {variant: fn(model copy)}) for the reference group."""
    model, forget, bs, n, sigma, lr, rounds = _make(case)
    model.train()
    return (
        model,
        rounds,
        {
            "reference": lambda m: jit(
                m, forget, sigma=sigma, lr=lr, num_samples=n, batch_size=bs, mode="reference", progress=False
            ),
            "transcription": lambda m: _published_loop(m, forget, bs, n, sigma, lr),
        },
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", ["reference", "transcription"])
def test_reference_vs_transcription(benchmark, case, variant):
    model, rounds, fns = _reference_variants(case)
    _run(benchmark, f"jit-reference-{case}", fns[variant], model, rounds)


def _interleaved(case, rounds, threads):
    """Time every variant of both groups in alternation (one warm-up round), so that load changes on
    a shared machine hit all of them alike; print min and median seconds and the ratios."""
    torch.set_num_threads(threads)
    for (model, _, fns), base in (
        (_floor_variants(case), "floor_batched"),
        (_reference_variants(case), "transcription"),
    ):
        times = {name: [] for name in fns}
        for r in range(rounds + 1):
            for name, fn in fns.items():
                m = copy.deepcopy(model)
                start = time.perf_counter()
                fn(m)
                if r:
                    times[name].append(time.perf_counter() - start)
        stats = {name: (min(t), statistics.median(t)) for name, t in times.items()}
        for name, (lo, mid) in stats.items():
            print(
                f"{case:15s} {name:17s} min {lo:9.4f} s  median {mid:9.4f} s  "
                f"ratio to {base}: min {lo / stats[base][0]:.3f} median {mid / stats[base][1]:.3f}"
            )


if __name__ == "__main__":
    from conftest import ALLOCATOR  # the thread count and heap settings of the pytest runs

    print(ALLOCATOR)
    parser = argparse.ArgumentParser(description=_interleaved.__doc__)
    parser.add_argument("cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for name in args.cases:
        _interleaved(name, args.rounds, args.threads)
