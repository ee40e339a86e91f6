"""Drop-in call sites (jit_unlearn.integrations) against the code they replace, on the digits data:

- the SSD repository's ParameterPerturber call sequence (SSD and LF-SSD), drop-in vs the plain
  transcription of the published code (tests/published.py);
- the JiT repository's Lipschitz.modify_weight, drop-in vs the transcription;
- SUPREME's ssd, lfssd and jit functions, integration vs SUPREME's own code in the same process
  (skipped when supreme-unlearning is not installed), with a minimal stand-in Fabric and plain
  DataLoaders, and (ssd, lfssd) with lightning's Fabric and its wrapped loaders.

Each test times the drop-in and, right before each of its rounds, the code it replaces (paired
rounds, as in bench_jit.py); benchmarks/ratios.py prints the per-round ratios drop-in / original.
Run: python -m pytest benchmarks/bench_integrations.py --benchmark-only --benchmark-json=integ.json
     python benchmarks/ratios.py integ.json
On a loaded machine add --benchmark-timer=time.process_time (CPU time of the process).
"""

import copy
import importlib
import importlib.util
import statistics
import sys
import time
import types

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import published  # tests/published.py, on sys.path via benchmarks/conftest.py
from jit_unlearn.data import digits
from jit_unlearn.integrations import published as drop_in
from jit_unlearn.integrations import supreme as integration
from jit_unlearn.models import MLP, SmallCNN

SSD_PARAMS = {
    "lower_bound": 1,
    "exponent": 1,
    "magnitude_diff": None,
    "min_layer": -1,
    "max_layer": -1,
    "forget_threshold": 1,
    "dampening_constant": 1.0,
    "selection_weighting": 10.0,
}
JIT_PARAMS = {
    "lower_bound": 1,
    "exponent": 1,
    "min_layer": -1,
    "max_layer": -1,
    "dampening_constant": 1,
    "selection_weighting": 10,
    "n_epochs": 1,
    "n_samples": 25,
    "learning_rate": 1.7e-3,
    "use_quad_weight": False,
    "ewc_lambda": 1,
    "lipschitz_weighting": 1.0,
}


class Fabric:
    """The Fabric members SUPREME's methods call, for one CPU process, doing nothing extra."""

    device = torch.device("cpu")
    global_rank = 0
    world_size = 1

    def setup(self, module, *optimizers):
        return (module, *optimizers) if optimizers else module

    def backward(self, loss, **kwargs):
        loss.backward(**kwargs)

    def all_reduce(self, tensor, group=None, reduce_op="mean"):
        return tensor

    def broadcast(self, obj, src=0):
        return obj

    def barrier(self, name=None):
        pass

    def print(self, *args, **kwargs):
        pass


def _digits_case(image: bool):
    torch.manual_seed(0)
    x, y = digits(image=image).tensors
    model = SmallCNN(1, 10, width=16) if image else MLP(64, (256, 256), 10)
    idx = torch.arange(len(y))
    keep = y == 3
    forget = DataLoader(TensorDataset(x[keep], idx[keep], y[keep]), batch_size=64)  # (x, index, y) triples
    full = DataLoader(TensorDataset(x, idx, y), batch_size=64)  # 29 batches
    return model.eval(), forget, full


CASES = {"digits-mlp": False, "digits-small-cnn": True}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, forget, full = _digits_case(CASES[request.param])
    return request.param, model, copy.deepcopy(model.state_dict()), forget, full


def _paired(benchmark, group, ours, baseline, baseline_name, model, state, rounds=7):
    """Time `ours` with pytest-benchmark; right before each of its rounds, time `baseline` on the same
    starting state with the same timer, so the two alternate and a change of machine load hits both.
    extra_info carries the baseline's times and the per-round ratios ours / baseline."""
    timer = getattr(benchmark, "_timer", time.perf_counter)
    baseline_times = []

    def reset():
        model.load_state_dict(state)
        model.eval()
        torch.manual_seed(0)

    def setup():
        reset()
        start = timer()
        baseline()
        baseline_times.append(timer() - start)
        reset()

    benchmark.group = group
    benchmark.pedantic(ours, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    our_times = list(benchmark.stats.stats.data)
    baseline_times = baseline_times[-len(our_times) :]  # the warm-up round is not paired
    benchmark.extra_info.update(
        baseline=baseline_name,
        floor_min=min(baseline_times),
        floor_median=statistics.median(baseline_times),
        ratio_of_mins=min(our_times) / min(baseline_times),
        ratio_of_medians=statistics.median(our_times) / statistics.median(baseline_times),
        median_paired_ratio=statistics.median(o / b for o, b in zip(our_times, baseline_times)),
    )


# ---------------------------------------------------------------- the SSD repository's call site


def _perturber_sequence(cls, model, forget, full):
    pdr = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", SSD_PARAMS)
    pdr.modify_weight(pdr.calc_importance(full), pdr.calc_importance(forget))


@pytest.mark.parametrize("label_free", [False, True], ids=["ssd", "lf-ssd"])
def test_parameter_perturber(benchmark, case, label_free):
    name, model, state, forget, full = case
    cls = drop_in.LabelFreeParameterPerturber if label_free else drop_in.ParameterPerturber
    _paired(
        benchmark,
        f"published {'LF-SSD' if label_free else 'SSD'} call site (ParameterPerturber): {name}",
        lambda: _perturber_sequence(cls, model, forget, full),
        lambda: published.ssd(model, forget, full, alpha=10.0, lam=1.0, label_free=label_free),
        "the published code (tests/published.py)",
        model,
        state,
    )


# ---------------------------------------------------------------- the JiT repository's call site


def test_lipschitz(benchmark, case):
    name, model, state, forget, _ = case
    _paired(
        benchmark,
        f"published JiT call site (Lipschitz.modify_weight, N=25): {name}",
        lambda: drop_in.Lipschitz(model, None, "cpu", JIT_PARAMS).modify_weight(forget),
        lambda: published.lipschitz_modify_weight(model, forget, sigma=1.0, lr=1.7e-3, n=25),
        "the published code (tests/published.py)",
        model,
        state,
    )


# ---------------------------------------------------------------- SUPREME's call sites


@pytest.fixture(scope="module")
def supreme_methods():
    """SUPREME's own functions, or a skip.  wandb (imported by its modules, unused with
    wandb_logging_flag=False) is replaced by an empty module when absent."""
    pytest.importorskip("supreme")
    pytest.importorskip("lightning.fabric")
    if importlib.util.find_spec("wandb") is None:
        sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    names = ["ssd", "lfssd"] + (["jit"] if importlib.util.find_spec("torchvision") else [])
    return {n: getattr(importlib.import_module(f"supreme.methods.unlearning_methods.{n}"), n) for n in names}


@pytest.mark.parametrize("wrap", ["stand-in", "lightning"])
@pytest.mark.parametrize("method", ["ssd", "lfssd"])
def test_supreme_ssd_call_site(benchmark, case, supreme_methods, method, wrap):
    """`stand-in`: the minimal Fabric above and plain DataLoaders; `lightning`: a CPU lightning
    Fabric and loaders from its setup_dataloaders, as SUPREME's pipeline passes them."""
    name, model, state, forget, full = case
    ours, theirs = getattr(integration, method), supreme_methods[method]
    if wrap == "lightning":
        from lightning.fabric import Fabric as LightningFabric

        fabric = LightningFabric(accelerator="cpu", devices=1)
        forget, full = fabric.setup_dataloaders(forget, full)
    else:
        fabric = Fabric()
    _paired(
        benchmark,
        f"SUPREME {method} call site ({wrap} Fabric): {name}",
        lambda: ours(fabric, 1, False, model, forget, full, 1.0, 10.0),
        lambda: theirs(fabric, 1, False, model, forget, full, 1.0, 10.0),
        "SUPREME 0.1.5",
        model,
        state,
    )


def test_supreme_jit_call_site(benchmark, case, supreme_methods):
    name, model, state, forget, _ = case
    if "jit" not in supreme_methods:
        pytest.skip("SUPREME's jit module needs torchvision")
    kwargs = {"learning_rate": 1.7e-3, "jit_weighting": 1.0}
    _paired(
        benchmark,
        f"SUPREME jit call site (n_samples=10): {name}",
        lambda: integration.jit(Fabric(), 1, False, model, forget, **kwargs),
        lambda: supreme_methods["jit"](Fabric(), 1, False, model, forget, **kwargs),
        "SUPREME 0.1.5",
        model,
        state,
    )
