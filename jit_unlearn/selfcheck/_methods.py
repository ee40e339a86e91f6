"""Method checks: JiT, SSD and DEL on a small trained MLP, on every checked device (and on the CPU
also with the pure-PyTorch tier), each result checked for sense and compared across tiers and devices.

Tolerances for the comparisons (same inputs, same seeds; the sums inside the model's layers and the
ops run in another order on another device or tier):
- JiT: every parameter within rtol 1e-4, atol 1e-5.
- SSD: the selected counts within 0.1 % of the parameters, at most 0.1 % of the parameters outside
  rtol 1e-4, atol 1e-5 (an importance within rounding of the threshold may select differently).
- DEL: the masks agree on at least 99 % of the entries, accuracies within 2 points (the fine-tuning
  after the reset amplifies differences, so parameters are only reported).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Iterator

import torch
from torch.utils.data import TensorDataset

from .. import _backend
from ..models import MLP
from ._report import FAIL, PASS, SKIP, Recorder, tier

FORGET_CLASS = 3
HIDDEN = (128, 128)


def _dataset() -> tuple[str, torch.Tensor, torch.Tensor]:
    """(description, x [N, F] float32, y [N] int64): scikit-learn's digits, or the bundled MNIST test
    images when scikit-learn is not installed."""
    from ..data import digits, mnist

    try:
        x, y = digits().tensors
        return "scikit-learn digits (1,797 x 64)", x, y
    except ImportError:
        x, y = mnist().tensors
        return "bundled MNIST, first 3,000 images (scikit-learn not installed)", x[:3000].flatten(1), y[:3000]


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def _train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    """A seeded MLP trained on the CPU: SGD with momentum, label smoothing 0.1, cosine rate."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MLP(x.shape[1], HIDDEN, 10)
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        steps = epochs * -(-x.shape[0] // 64)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=gen).split(64):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
    return model.eval()


@contextlib.contextmanager
def _settings() -> Iterator[None]:
    """One CPU thread (a model this small runs faster without OpenMP's fork/join per op, and sums in
    one order) and no TF32 in CUDA matmuls and convolutions (the comparisons assume float32)."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def _run_method(method: str, base: torch.nn.Module, data: dict, device: str, epochs_del: int) -> dict:
    from .. import del_unlearn, jit, ssd

    model = copy.deepcopy(base).to(device)
    d = {k: v.to(device) for k, v in data.items()}
    start = time.perf_counter()
    extra: dict = {}
    if method == "JiT":
        report = jit(model, d["xf"], sigma=1.0, lr=1.7e-3, num_samples=25, batch_size=64, seed=0, progress=False)
        extra = {"tier": report.backend, "mean_loss": report.mean_loss}
    elif method == "SSD":
        report = ssd(
            model,
            TensorDataset(d["xf"], d["yf"]),
            TensorDataset(d["x"], d["y"]),
            alpha=10.0,
            batch_size=64,
            progress=False,
        )
        extra = {"selected": report.total_selected, "elements": report.total_elements}
    else:
        in_features = data["x"].shape[1]
        report = del_unlearn(
            model,
            TensorDataset(d["xf"], d["yf"]),
            TensorDataset(d["xr"], d["yr"]),
            init=lambda: MLP(in_features, HIDDEN, 10),
            budget=0.3,
            lr=0.015,
            epochs=epochs_del,
            batch_size=128,
            seed=0,
            progress=False,
        )
        extra = {"mask": {n: m.cpu() for n, m in report.mask.items()}, "masked": report.masked}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "seconds": seconds,
        "forget_acc": _accuracy(model, d["xf"], d["yf"]),
        "retain_acc": _accuracy(model, d["xr"], d["yr"]),
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **extra,
    }


def _sense(method: str, run: dict, before: dict, base: torch.nn.Module) -> tuple[str, str]:
    """Did the method do something sensible: finite, changed, forgot?"""
    state = run["state"]
    text = (
        f"forget acc {before['forget']:.0%} -> {run['forget_acc']:.0%}, retain acc {before['retain']:.0%} -> "
        f"{run['retain_acc']:.0%}, {run['seconds']:.2f} s"
    )
    if method == "JiT":
        text += f", op tier {run['tier']}"
    elif method == "SSD":
        text += f", {run['selected']:,} of {run['elements']:,} parameters dampened"
    else:
        text += f", {run['masked']:,} entries reset"
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        return FAIL, "non-finite parameters; " + text
    if all(torch.equal(state[k], v) for k, v in base.state_dict().items()):
        return FAIL, "the model did not change; " + text
    if not run["forget_acc"] < before["forget"]:
        return FAIL, "the forget accuracy did not fall; " + text
    return PASS, text


def _param_outside(a: dict, b: dict, rtol: float, atol: float) -> tuple[int, int, float]:
    bad = total = 0
    worst = 0.0
    for k, t in a.items():
        if not t.is_floating_point():
            continue
        err = (t.double() - b[k].double()).abs()
        bad += int((err > atol + rtol * b[k].double().abs()).sum())
        total += t.numel()
        worst = max(worst, float(err.max()) if err.numel() else 0.0)
    return bad, total, worst


def _agree(method: str, got: dict, want: dict) -> tuple[str, str]:
    """Compare two runs of one method (another device or tier) within the tolerances above."""
    acc = (
        f"forget acc {got['forget_acc']:.1%} vs {want['forget_acc']:.1%}, retain acc {got['retain_acc']:.1%} vs "
        f"{want['retain_acc']:.1%}"
    )
    bad, total, worst = _param_outside(got["state"], want["state"], 1e-4, 1e-5)
    if method == "JiT":
        ok = bad == 0
        text = f"{bad} of {total:,} parameters outside rtol 1e-4, atol 1e-5 (max |diff| {worst:.2g}); {acc}"
    elif method == "SSD":
        dsel = abs(got["selected"] - want["selected"])
        ok = bad <= total // 1000 and dsel <= total // 1000
        text = (
            f"selected {got['selected']:,} vs {want['selected']:,}; {bad} of {total:,} parameters outside rtol "
            f"1e-4, atol 1e-5 (allowed {total // 1000}); {acc}"
        )
    else:
        same = sum(int((got["mask"][n] == want["mask"][n]).sum()) for n in want["mask"])
        entries = sum(m.numel() for m in want["mask"].values())
        acc_ok = (
            abs(got["forget_acc"] - want["forget_acc"]) <= 0.02 and abs(got["retain_acc"] - want["retain_acc"]) <= 0.02
        )
        ok = same >= 0.99 * entries and acc_ok
        text = (
            f"masks agree on {same / entries:.2%} of {entries:,} entries (>= 99%); {acc} (within 2 points); "
            f"max parameter |diff| {worst:.2g}"
        )
    return (PASS if ok else FAIL), text


def check_methods(rec: Recorder, devices: list[str], quick: bool) -> None:
    """Train the MLP once, then run JiT, SSD and DEL on each device (CPU: compiled and pure-PyTorch
    tiers) and compare the results."""
    with _settings():
        _check_methods(rec, devices, quick)


def _check_methods(rec: Recorder, devices: list[str], quick: bool) -> None:
    name, x, y = _dataset()
    start = time.perf_counter()
    base = _train(x, y, epochs=10)
    forget = y == FORGET_CLASS
    data = {"x": x, "y": y, "xf": x[forget], "yf": y[forget], "xr": x[~forget], "yr": y[~forget]}
    before = {"forget": _accuracy(base, data["xf"], data["yf"]), "retain": _accuracy(base, data["xr"], data["yr"])}
    trained = (
        f"{name}; MLP {x.shape[1]}-{HIDDEN[0]}-{HIDDEN[1]}-10; forget class {FORGET_CLASS}: forget acc "
        f"{before['forget']:.0%}, retain acc {before['retain']:.0%} ({time.perf_counter() - start:.1f} s)"
    )
    rec.run("methods", "train the MLP", "cpu", lambda: (PASS if before["retain"] > 0.8 else FAIL, trained))
    epochs_del = 1 if quick else 2
    # (label, device, tier): the CPU with the compiled kernels and with pure PyTorch, then CUDA.
    variants = [("cpu", "cpu", "compiled" if _backend.has_kernel("cpu") else "torch")]
    if _backend.has_kernel("cpu"):
        variants.append(("cpu, torch tier", "cpu", "torch"))
    if "cuda" in devices:
        variants.append(("cuda", "cuda", "compiled" if _backend.has_kernel("cuda") else "torch"))
    for method in ("JiT", "SSD", "DEL"):
        runs: dict[str, dict] = {}

        def one(method, label, device, tier_name, runs=runs):
            with tier(tier_name):
                runs[label] = _run_method(method, base, data, device, epochs_del)
            return _sense(method, runs[label], before, base)

        def compare(method, label, runs=runs):
            if label not in runs or "cpu" not in runs:
                return SKIP, "a run above failed; nothing to compare"
            return _agree(method, runs[label], runs["cpu"])

        for label, device, tier_name in variants:
            rec.run(
                "methods",
                f"{method} ({tier_name} tier)",
                device,
                functools.partial(one, method, label, device, tier_name),
            )
        for label, device, _ in variants[1:]:
            what = "pure-PyTorch vs compiled tier" if label == "cpu, torch tier" else "CUDA vs CPU"
            rec.run("methods", f"{method}: {what}", device, functools.partial(compare, method, label))
