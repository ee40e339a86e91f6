"""Short timings on a CIFAR-shaped ResNet-18: JiT against its batched floor, and SSD dampening
against a plain copy of the parameter list.

JiT's floor is the model alone doing the same work per forget batch (benchmarks/bench_jit.py):
a no-grad forward of the N*B perturbed samples in the chunks JiT uses, a forward with grad of the
batch, a backward and an SGD step; the perturbed inputs are made beforehand.  The two alternate
round by round, so a change of machine speed hits both alike.  Dampening reads three tensors
(parameter, both importances) and writes the parameter; the copy reads one and writes one: the
bandwidth ratio counts those bytes.
"""

from __future__ import annotations

import copy
import functools
import os
import statistics
import time

import torch

from .. import _backend, ops
from ..models import ResNet18
from ._report import INFO, Recorder, sync

try:  # the chunking rule JiT uses for its no-grad forwards
    from ..methods.jit import default_max_batch_elems
except ImportError:  # pragma: no cover - the rule's home moved

    def default_max_batch_elems(device: torch.device) -> int:
        return {"cpu": 1 << 17, "cuda": 1 << 22}.get(torch.device(device).type, 1 << 22)


# device -> (ResNet-18 width, forget samples, batch, N, rounds).  On the CPU the network is a quarter
# as wide (64 -> 16 channels in the stem: the same layers at 1/16 of the work), to keep the check short.
JIT_WORKLOADS = {"cpu": (16, 16, 16, 4, 3), "cuda": (64, 512, 128, 25, 5)}
QUICK_JIT_WORKLOAD = (16, 8, 8, 2, 1)
DAMPEN_ROUNDS = {"cpu": 5, "cuda": 20}
# Seconds after which a timing stops adding rounds (it keeps at least one): a loaded machine still
# finishes in time.
BUDGET_S = {"cpu": 20.0, "cuda": 60.0}
SIGMA, LR = 0.5, 3e-4


def _rounds(k: int) -> str:
    return f"{k} round" + ("" if k == 1 else "s")


def _budget(device: str, quick: bool) -> float:
    return BUDGET_S.get(device, BUDGET_S["cuda"]) / (4 if quick else 1)


def _timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _floor(model: torch.nn.Module, batches: list[torch.Tensor], noisy: list[torch.Tensor]) -> None:
    model.eval()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    for x, xn in zip(batches, noisy):
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():
            flat = xn.view(-1, *x.shape[1:])
            rows = max(1, default_max_batch_elems(x.device) // x[0].numel())
            chunks = -(-flat.shape[0] // rows)
            for chunk in flat.split(-(-flat.shape[0] // chunks)):
                model(chunk)
        model(x).sum().backward()
        sgd.step()


def time_jit(device: str, quick: bool) -> tuple[str, str, dict]:
    from .. import jit

    width, samples, bs, n, rounds = QUICK_JIT_WORKLOAD if quick else JIT_WORKLOADS.get(device, JIT_WORKLOADS["cuda"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ResNet18(10, width=width).to(device).eval()
    forget = torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    batches = list(forget.split(bs))
    noisy = [ops.perturb(x, n, SIGMA, 0, t, True)[0] for t, x in enumerate(batches)]
    jit_times, floor_times = [], []
    start = time.perf_counter()
    for r in range(rounds + 1):  # round 0 warms up both
        if len(jit_times) and time.perf_counter() - start > _budget(device, quick):
            break
        t_jit = _timed(
            functools.partial(
                jit, copy.deepcopy(model), forget, sigma=SIGMA, lr=LR, num_samples=n, batch_size=bs, progress=False
            ),
            device,
        )
        t_floor = _timed(functools.partial(_floor, copy.deepcopy(model), batches, noisy), device)
        if r:
            jit_times.append(t_jit)
            floor_times.append(t_floor)
    net = "ResNet-18" if width == 64 else f"ResNet-18 at width {width}"
    data = {
        "workload": f"{net} (CIFAR shape), {samples} forget samples, batch {bs}, N={n}, {_rounds(len(jit_times))}",
        "jit_min_s": min(jit_times),
        "jit_median_s": statistics.median(jit_times),
        "floor_min_s": min(floor_times),
        "floor_median_s": statistics.median(floor_times),
        "ratio_of_mins": min(jit_times) / min(floor_times),
        "median_paired_ratio": statistics.median(j / f for j, f in zip(jit_times, floor_times)),
        "target": "<= 1.05 on a GPU (issue 15)",
        "op_tier": _backend.backend_name(device),
    }
    detail = (
        f"{data['workload']}: JiT {data['jit_min_s'] * 1e3:.1f} ms, floor {data['floor_min_s'] * 1e3:.1f} ms "
        f"(min); ratio {data['ratio_of_mins']:.3f} (mins), {data['median_paired_ratio']:.3f} (median of "
        f"paired rounds); target {data['target']}"
    )
    return INFO, detail, data


def time_dampen(device: str, quick: bool) -> tuple[str, str, dict]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ResNet18(10).to(device)
    params = [p.detach() for p in model.parameters()]
    saved = [p.clone() for p in params]
    g = torch.Generator().manual_seed(1)
    imp_f = [torch.rand(p.shape, generator=g).to(device) for p in params]
    imp_d = [(torch.rand(p.shape, generator=g) * 0.2).to(device) for p in params]
    copies = [torch.empty_like(p) for p in params]
    rounds = 2 if quick else DAMPEN_ROUNDS.get(device, DAMPEN_ROUNDS["cuda"])
    t_damp, t_copy = [], []
    start = time.perf_counter()
    for r in range(rounds + 1):
        if len(t_damp) and time.perf_counter() - start > _budget(device, quick):
            break
        torch._foreach_copy_(params, saved)  # every round dampens the same values
        t = _timed(lambda: ops.ssd_dampen_(params, imp_f, imp_d, alpha=2.0), device)
        t_c = _timed(lambda: torch._foreach_copy_(copies, params), device)
        if r:
            t_damp.append(t)
            t_copy.append(t_c)
    torch._foreach_copy_(params, saved)
    selected = int(ops.ssd_dampen_(params, imp_f, imp_d, alpha=2.0).sum())
    numel = sum(p.numel() for p in params)
    size = params[0].element_size()
    damp_bw = 4 * numel * size / min(t_damp)
    copy_bw = 2 * numel * size / min(t_copy)
    data = {
        "workload": f"ResNet-18 parameters ({numel / 1e6:.2f} M float32 in {len(params)} tensors), "
        f"{selected / numel:.0%} selected, {_rounds(len(t_damp))}",
        "dampen_min_s": min(t_damp),
        "copy_min_s": min(t_copy),
        "dampen_gb_s": damp_bw / 1e9,
        "copy_gb_s": copy_bw / 1e9,
        "bandwidth_ratio": damp_bw / copy_bw,
        "target": ">= 0.70 of the copy's bandwidth on a GPU (issue 15)",
        "op_tier": _backend.backend_name(device),
    }
    detail = (
        f"{data['workload']}: ssd_dampen_ {data['dampen_min_s'] * 1e3:.2f} ms ({data['dampen_gb_s']:.0f} GB/s), "
        f"copy {data['copy_min_s'] * 1e3:.2f} ms ({data['copy_gb_s']:.0f} GB/s); bandwidth ratio "
        f"{data['bandwidth_ratio']:.2f}; target {data['target']}"
    )
    return INFO, detail, data


def _busy(status: str, detail: str, data: dict) -> tuple[str, str, dict]:
    """Add the CPU load to a CPU timing: on an oversubscribed machine OpenMP's threads wait for each
    other and the numbers say little."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # no load average on this platform
        return status, detail, data
    data["load_average"] = load
    if load > cpus:
        detail += f"; machine busy (load average {load:.1f} on {cpus} CPUs): unreliable"
    return status, detail, data


def run_timings(rec: Recorder, devices: list[str], quick: bool) -> None:
    """Record the two timings on every device in `devices`."""

    def timed(fn, device):
        result = fn(device, quick)
        return _busy(*result) if device == "cpu" else result

    for device in devices:
        rec.run("timings", "JiT vs its batched floor", device, functools.partial(timed, time_jit, device))
        rec.run("timings", "ssd_dampen_ vs parameter copy", device, functools.partial(timed, time_dampen, device))
