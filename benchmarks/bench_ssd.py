"""SSD-family benchmarks: SSD and LF-SSD end to end against a plain-PyTorch transcription of the
published code (digits MLP, CIFAR-shaped ResNet-18); the importance pass against the bare
forward+backward passes it needs; the dampening step against the published rule and a parameter
copy; per-sample importances against one backward pass per sample.

Run: python -m pytest benchmarks/bench_ssd.py --benchmark-only --benchmark-min-rounds=3
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
import published  # tests/published.py, on sys.path via benchmarks/conftest.py
from jit_unlearn.data import digits
from jit_unlearn.models import MLP, ResNet18, SmallCNN


def bare_passes(model, loader):
    """The floor of an importance pass: forward, batch-mean loss and backward on every batch."""
    model.eval()
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def per_sample_loop(model, x, y):
    """One backward pass per sample, accumulating g_i^2."""
    model.eval()
    params = list(model.parameters())
    acc = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for a, p in zip(acc, params):
            a.addcmul_(p.grad, p.grad)
    return [a / x.shape[0] for a in acc]


# ---------------------------------------------------------------- cases


def _digits_case():
    torch.manual_seed(0)
    x, y = digits().tensors
    model = MLP(64, (256, 256), 10)  # 85 k parameters
    forget = DataLoader(TensorDataset(x[y == 3], y[y == 3]), batch_size=64)
    full = DataLoader(TensorDataset(x, y), batch_size=64)  # 29 batches
    return model, forget, full


def _resnet_case():
    torch.manual_seed(0)
    model = ResNet18(num_classes=10)  # 11.17 M parameters
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    forget = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)
    full = DataLoader(TensorDataset(x, y), batch_size=16)  # 4 batches
    return model, forget, full


CASES = {"digits-mlp": _digits_case, "resnet18-cifar": _resnet_case}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, forget, full = CASES[request.param]()
    return request.param, model, copy.deepcopy(model.state_dict()), forget, full


def _rounds(benchmark, fn, model, state):
    def setup():
        model.load_state_dict(state)

    benchmark.pedantic(fn, setup=setup, rounds=3, warmup_rounds=1)


# ---------------------------------------------------------------- end to end


def test_ssd_ours(benchmark, case):
    name, model, state, forget, full = case
    benchmark.group = f"ssd end to end: {name}"
    _rounds(benchmark, lambda: ju.ssd(model, forget, full, progress=False), model, state)


def test_ssd_published(benchmark, case):
    name, model, state, forget, full = case
    benchmark.group = f"ssd end to end: {name}"
    _rounds(benchmark, lambda: published.ssd(model, forget, full), model, state)


def test_lf_ssd_ours(benchmark, case):
    name, model, state, forget, full = case
    benchmark.group = f"lf-ssd end to end: {name}"
    _rounds(benchmark, lambda: ju.lf_ssd(model, forget, full, progress=False), model, state)


def test_lf_ssd_published(benchmark, case):
    name, model, state, forget, full = case
    benchmark.group = f"lf-ssd end to end: {name}"
    _rounds(benchmark, lambda: published.ssd(model, forget, full, label_free=True), model, state)


# ---------------------------------------------------------------- importance pass vs its floor


def test_importance_pass_ours(benchmark, case):
    name, model, _, _, full = case
    benchmark.group = f"importance pass over the full loader: {name}"
    benchmark.pedantic(lambda: ju.importances(model, full, progress=False), rounds=3, warmup_rounds=1)


def test_importance_pass_floor(benchmark, case):
    name, model, _, _, full = case
    benchmark.group = f"importance pass over the full loader: {name}"
    benchmark.pedantic(lambda: bare_passes(model, full), rounds=3, warmup_rounds=1)


# ---------------------------------------------------------------- dampening step


@pytest.fixture(scope="module")
def dampen_case():
    torch.manual_seed(0)
    model = ResNet18(num_classes=10)
    g = torch.Generator().manual_seed(1)
    f = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    d = {n: torch.rand(p.shape, generator=g) * 0.2 for n, p in model.named_parameters()}
    return model, ju.Importances(f, kind="fisher"), ju.Importances(d, kind="fisher")


DAMPEN_GROUP = "dampening step: ResNet-18 (11.17 M params, ~45 % selected)"


def _dampen_rounds(benchmark, model, fn):
    # parameters are reset before every round, so repeated dampening never drifts into subnormals
    state = copy.deepcopy(model.state_dict())

    def setup():
        model.load_state_dict(state)

    benchmark.pedantic(fn, setup=setup, rounds=10, warmup_rounds=1)


def test_dampen_ours(benchmark, dampen_case):
    model, f, d = dampen_case
    benchmark.group = DAMPEN_GROUP
    _dampen_rounds(benchmark, model, lambda: ju.dampen_(model, f, d, alpha=2.0))


def test_dampen_published(benchmark, dampen_case):
    model, f, d = dampen_case
    benchmark.group = DAMPEN_GROUP
    _dampen_rounds(benchmark, model, lambda: published.modify_weight(model, dict(d), dict(f), 2.0, 1.0))


def test_dampen_floor_param_copy(benchmark, dampen_case):
    model, _, _ = dampen_case
    benchmark.group = DAMPEN_GROUP
    params = [p.detach() for p in model.parameters()]
    copies = [torch.empty_like(p) for p in params]
    _dampen_rounds(benchmark, model, lambda: torch._foreach_copy_(copies, params))


# ---------------------------------------------------------------- per-sample importances

PER_SAMPLE = {
    "digits-mlp": (lambda: MLP(64, (256, 256), 10), lambda: digits().tensors),
    "digits-small-cnn": (lambda: SmallCNN(in_channels=1, width=8), lambda: digits(image=True).tensors),
}


@pytest.fixture(scope="module", params=list(PER_SAMPLE))
def per_sample_case(request):
    torch.manual_seed(0)
    build, load = PER_SAMPLE[request.param]
    x, y = load()
    x, y = x[:256], y[:256]
    return request.param, build(), x, y


def test_per_sample_vmap(benchmark, per_sample_case):
    name, model, x, y = per_sample_case
    benchmark.group = f"per-sample importances, 256 samples: {name}"
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    benchmark.pedantic(
        lambda: ju.importances(model, loader, per_sample=True, progress=False), rounds=3, warmup_rounds=1
    )


def test_per_sample_loop(benchmark, per_sample_case):
    name, model, x, y = per_sample_case
    benchmark.group = f"per-sample importances, 256 samples: {name}"
    benchmark.pedantic(per_sample_loop, args=(model, x, y), rounds=3, warmup_rounds=1)
