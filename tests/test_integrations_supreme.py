"""SUPREME's method call sites (jit_unlearn.integrations.supreme) with a stand-in Fabric, against the
transcriptions in tests/published.py; registration with SUPREME's plugin registry; and, when
supreme-unlearning is installed, against SUPREME's own functions (skipped otherwise)."""

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn
import published
from jit_unlearn.integrations import supreme as sup
from jit_unlearn.models import MLP, SmallCNN
from stand_in_fabric import StandInFabric

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(seed=0, dropout=0.2):
    torch.manual_seed(seed)
    model = SmallCNN(1, 10, width=8, dropout=dropout)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(64, (32, 32), 10)


def _triples(shape, n, batch_size, seed=1):
    """SUPREME's loaders yield (x, index, y)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n), y), batch_size=batch_size)


def _loaders(shape=(1, 8, 8)):
    return _triples(shape, 20, 8, seed=1), _triples(shape, 52, 16, seed=2)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, other):
    sa = model.state_dict()
    for k, v in (other.state_dict() if isinstance(other, nn.Module) else other).items():
        assert torch.equal(sa[k], v), k


def _flags(model):
    return [m.training for m in model.modules()]


def _supreme_alpha(f, d, n_forget, n_full):
    """SUPREME's adaptive alpha, from its description: numpy's percentile of the finite ratios at
    100 - ln(1 + (n_forget / n_full) * 100), through a float32 tensor."""
    ratios = np.concatenate([r[np.isfinite(r)] for r in ((f[k] / d[k]).numpy().ravel() for k in f)])
    return torch.tensor([float(np.nanpercentile(ratios, 100 - np.log(1 + (n_forget / n_full) * 100)))]).item()


# ---------------------------------------------------------------- SSD family vs the transcriptions


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name,label_free", [("ssd", False), ("lfssd", True)])
def test_ssd_and_lfssd_bitwise_equal_published(name, label_free, strategy):
    model, reference = _cnn().train(), _cnn()
    forget, full = _loaders()
    fabric = StandInFabric()
    returned = getattr(sup, name)(
        fabric, 1, False, model, forget, full, 0.8, 2.0, distributed_strategy_name=strategy, model_name="SmallCNN"
    )
    published.ssd(reference, forget, full, alpha=2.0, lam=0.8, label_free=label_free)
    _assert_same(model, reference)
    assert returned is model and not any(_flags(model))  # SUPREME returns the model in eval mode
    assert ("setup" in fabric.calls) == (strategy == "ddp") and "barrier" in fabric.calls
    assert sum(int((p != q).sum()) for p, q in zip(model.parameters(), _cnn().parameters())) > 0


class FabricLoader:
    """Lightning's Fabric loader wrapper as SUPREME receives its loaders: it sets a sampler's epoch,
    counts iterations and moves batches to a device."""

    def __init__(self, dataloader):
        self.__dict__.update(dataloader.__dict__)
        self._dataloader = dataloader
        self._num_iter_calls = 0

    def __len__(self):
        return len(self._dataloader)

    def __iter__(self):
        for holder in (self._dataloader.sampler, self._dataloader.batch_sampler):
            if callable(getattr(holder, "set_epoch", None)):
                holder.set_epoch(self._num_iter_calls)
        self._num_iter_calls += 1
        for x, index, y in self._dataloader:
            yield x.to("cpu"), index.to("cpu"), y.to("cpu")


class EpochSampler(torch.utils.data.SequentialSampler):
    epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


@pytest.mark.parametrize("name", ["ssd", "assd", "lfssd_det"])
def test_fabric_wrapped_loaders_give_the_same_result(name):
    """Reading the DataLoader inside Fabric's wrapper changes nothing but speed; the wrapper's
    iteration count advances as if it had been read, and a sampler with set_epoch keeps the wrapper."""
    forget, full = _loaders()
    plain, wrapped = _cnn(), _cnn()
    getattr(sup, name)(StandInFabric(), 1, False, plain, forget, full, 1.0, 2.0)
    loaders = FabricLoader(forget), FabricLoader(full)
    getattr(sup, name)(StandInFabric(), 1, False, wrapped, *loaders, 1.0, 2.0)
    _assert_same(wrapped, plain)
    assert [w._num_iter_calls for w in loaders] == [1, 1]
    assert sup._plain_loader(loaders[0]) is forget
    EpochSampler.epochs = []
    sampled = FabricLoader(DataLoader(full.dataset, batch_size=16, sampler=EpochSampler(full.dataset)))
    assert sup._plain_loader(sampled) is sampled
    with_epochs = _cnn()
    getattr(sup, name)(StandInFabric(), 1, False, with_epochs, loaders[0], sampled, 1.0, 2.0)
    _assert_same(with_epochs, plain)
    assert EpochSampler.epochs == [0]


def test_ssd_unwraps_a_wrapped_model():
    class Wrapper(nn.Module):  # DistributedDataParallel / Fabric style: the network is .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    inner, reference = _cnn(), _cnn()
    forget, full = _loaders()
    returned = sup.ssd(StandInFabric(), 1, False, Wrapper(inner), forget, full, 1.0, 3.0)
    published.ssd(reference, forget, full, alpha=3.0, lam=1.0)
    assert returned is inner
    _assert_same(inner, reference)


def test_assd_bitwise_equals_supreme_rule():
    model, reference = _cnn(), _cnn()
    forget, full = _loaders()
    fabric = StandInFabric()
    sup.assd(fabric, 1, False, model, forget, full, 0.9, 10.0)
    reference.eval()
    f, d = published.calc_importance(reference, forget), published.calc_importance(reference, full)
    alpha = _supreme_alpha(f, d, 20, 52)
    published.modify_weight(reference, d, f, alpha, 0.9)
    _assert_same(model, reference)
    assert any(f"{alpha:.6f}" in line for line in fabric.printed)


def test_assd_alpha_falls_back_to_99_without_finite_ratio():
    zeros = {"w": torch.zeros(3)}
    fabric = StandInFabric()
    assert sup._supreme_assd_alpha(fabric, zeros, zeros, 1, 2) == 99.0
    assert fabric.printed


@pytest.mark.parametrize("name,label_free", [("ssd_det", False), ("lfssd_det", True)])
def test_det_variants_match_per_sample_loop(name, label_free):
    """Per-sample importances come from vectorised gradients, SUPREME's from one backward per
    sample: equal to float tolerance (alpha chosen away from ties)."""
    model, reference = _cnn().double(), _cnn().double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(36, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (36,), generator=g)
    forget = DataLoader(TensorDataset(x[:12], torch.arange(12), y[:12]), batch_size=5)
    full = DataLoader(TensorDataset(x, torch.arange(36), y), batch_size=7)
    getattr(sup, name)(StandInFabric(), 1, False, model, forget, full, 1.0, 2.2)
    f = published.per_sample_importance(reference, forget, label_free=label_free)
    d = published.per_sample_importance(reference, full, label_free=label_free)
    published.modify_weight(reference, d, f, 2.2, 1.0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert sum(int((p != q).sum()) for p, q in zip(model.parameters(), _cnn().double().parameters())) > 0


def test_ssd_failure_restores_model_and_flags():
    model = _cnn().train()
    model.fc.eval()
    saved, flags = _state(model), _flags(model)
    forget, _ = _loaders()

    class Broken:
        dataset = range(10)

        def __iter__(self):
            yield from _triples((1, 8, 8), 16, 8)
            raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        sup.ssd(StandInFabric(), 1, False, model, forget, Broken(), 1.0, 2.0)
    _assert_same(model, saved)
    assert _flags(model) == flags


@pytest.mark.parametrize(
    "args,exc,name",
    [
        ({"dampening_constant": -1.0}, ValueError, "dampening_constant"),
        ({"selection_weighting": 0.0}, ValueError, "selection_weighting"),
        ({"selection_weighting": "10"}, TypeError, "selection_weighting"),
        ({"full_train_dataloader": None}, TypeError, "full_train_dataloader"),
        ({"model": "resnet"}, TypeError, "model"),
    ],
)
def test_ssd_bad_arguments_change_nothing(args, exc, name):
    model = _cnn()
    saved = _state(model)
    forget, full = _loaders()
    kwargs = {
        "fabric": StandInFabric(),
        "num_gpus": 1,
        "wandb_logging_flag": False,
        "model": model,
        "forget_train_dataloader": forget,
        "full_train_dataloader": full,
        "dampening_constant": 1.0,
        "selection_weighting": 10.0,
        **args,
    }
    with pytest.raises(exc, match=name):
        sup.ssd(**kwargs)
    _assert_same(model, saved)


def test_fabric_without_needed_members_rejected():
    class Partial:
        device = torch.device("cpu")

    forget, full = _loaders()
    with pytest.raises(TypeError, match=r"fabric: lacks \['setup', 'backward'"):
        sup.ssd(Partial(), 1, False, _cnn(), forget, full, 1.0, 10.0)
    with pytest.raises(TypeError, match="fabric"):
        sup.jit(Partial(), 1, False, _cnn(), forget)


def test_assd_needs_sized_datasets():
    forget, full = _loaders()
    with pytest.raises(TypeError, match="full_train_dataloader: assd needs"):
        sup.assd(StandInFabric(), 1, False, _cnn(), forget, iter(full), 1.0, 10.0)


def test_wandb_config_updated_only_when_asked(monkeypatch):
    updates = []
    wandb = types.SimpleNamespace(config=types.SimpleNamespace(update=updates.append))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    forget, full = _loaders()
    sup.ssd(StandInFabric(), 1, False, _cnn(), forget, full, 1.0, 10.0)
    assert updates == []
    sup.ssd(StandInFabric(), 1, True, _cnn(), forget, full, 1.0, 10.0)
    assert updates[0]["selection_weighting"] == 10.0 and updates[0]["dampening_constant"] == 1.0


# ---------------------------------------------------------------- JiT


@pytest.mark.parametrize("make,shape", [(_cnn, (1, 8, 8)), (_mlp, (64,))], ids=["cnn_bn_dropout", "mlp"])
def test_jit_bitwise_equals_supreme_semantics(make, shape):
    model, reference = make().eval(), make().eval()
    loader = _triples(shape, 30, 8, seed=4)
    fabric = StandInFabric()
    torch.manual_seed(9)
    returned = sup.jit(
        fabric,
        1,
        False,
        model,
        loader,
        n_epochs=2,
        n_samples=3,
        learning_rate=0.05,
        jit_weighting=0.3,
        type_of_unlearning_strategy="fullclass",
    )
    torch.manual_seed(9)
    published.supreme_jit(reference, loader, sigma=0.3, lr=0.05, n=3, epochs=2)
    _assert_same(model, reference)  # parameters and BatchNorm statistics
    assert returned is model and all(_flags(model))  # left in train mode, as SUPREME leaves it
    assert fabric.calls.count("backward") == 8 and "all_reduce" in fabric.calls


def test_jit_leaves_the_random_stream_where_supreme_does():
    model, reference = _cnn(), _cnn()
    loader = _triples((1, 8, 8), 16, 8, seed=4)
    torch.manual_seed(9)
    sup.jit(StandInFabric(), 1, False, model, loader, n_samples=2)
    after = torch.randn(4)
    torch.manual_seed(9)
    published.supreme_jit(reference, loader, sigma=0.1, lr=0.001, n=2)
    assert torch.equal(after, torch.randn(4))
    _assert_same(model, reference)


def test_jit_default_mode_runs_jit_unlearn_default():
    model, reference = _mlp(), _mlp()
    loader = _triples((64,), 24, 8, seed=4)
    sup.jit(
        StandInFabric(),
        1,
        False,
        model,
        loader,
        n_epochs=2,
        n_samples=4,
        learning_rate=0.01,
        jit_weighting=0.5,
        jit_unlearn_mode="default",
        seed=7,
    )
    for epoch in range(2):
        jit_unlearn.jit(
            reference, (b[0] for b in loader), sigma=0.5, lr=0.01, num_samples=4, seed=7 + epoch, progress=False
        )
    _assert_same(model, reference)
    assert sum(int((p != q).sum()) for p, q in zip(model.parameters(), _mlp().parameters())) > 0


def test_jit_failure_mid_run_restores_model_and_flags():
    model = _cnn()
    model.features.eval()
    saved, flags = _state(model), _flags(model)

    def broken():
        yield from _triples((1, 8, 8), 16, 8)
        raise KeyboardInterrupt

    class Loader:
        def __iter__(self):
            return broken()

    with pytest.raises(KeyboardInterrupt):
        sup.jit(StandInFabric(), 1, False, model, Loader(), n_samples=2)
    _assert_same(model, saved)
    assert _flags(model) == flags and all(p.grad is None for p in model.parameters())


def test_jit_non_finite_result_raises_and_restores():
    model = _mlp()
    saved = _state(model)
    with pytest.raises(FloatingPointError, match="jit"):
        sup.jit(StandInFabric(), 1, False, model, _triples((64,), 16, 8), n_samples=2, learning_rate=1e38)
    _assert_same(model, saved)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"n_samples": 0}, ValueError, "n_samples"),
        ({"n_epochs": -1}, ValueError, "n_epochs"),
        ({"n_samples": 2.5}, TypeError, "n_samples"),
        ({"jit_weighting": 0.0}, ValueError, "jit_weighting"),
        ({"learning_rate": -0.1}, ValueError, "learning_rate"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"jit_unlearn_mode": "fast"}, ValueError, "jit_unlearn_mode"),
    ],
)
def test_jit_bad_arguments_change_nothing(kwargs, exc, name):
    model = _mlp()
    saved = _state(model)
    with pytest.raises(exc, match=name):
        sup.jit(StandInFabric(), 1, False, model, _triples((64,), 16, 8), **kwargs)
    _assert_same(model, saved)


# ---------------------------------------------------------------- registration


@pytest.fixture
def fake_supreme(monkeypatch):
    """A stand-in `supreme` package that records register_unlearning_method calls."""
    registered = {}
    module = types.ModuleType("supreme")
    module.register_unlearning_method = lambda name, target: registered.__setitem__(name, target)
    monkeypatch.setitem(sys.modules, "supreme", module)
    return registered


def _resolve(target):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def test_register_routes_names_to_these_functions(fake_supreme):
    assert sup.register(["ssd", "jit"]) == ["ssd", "jit"]
    assert {n: _resolve(t) for n, t in fake_supreme.items()} == {"ssd": sup.ssd, "jit": sup.jit}
    assert sup.register() == list(sup.METHODS)
    with pytest.raises(ValueError, match="methods: unknown names"):
        sup.register(["scrub"])


@pytest.mark.parametrize(
    "value,expected", [("", []), ("all", list(sup.METHODS)), (" ssd, lfssd_det ", ["ssd", "lfssd_det"])]
)
def test_plugin_setup_reads_the_environment(fake_supreme, monkeypatch, value, expected):
    monkeypatch.setenv(sup.ENV_VAR, value)
    sup.plugin_setup()
    assert list(fake_supreme) == expected


def test_plugin_setup_rejects_unknown_names(fake_supreme, monkeypatch):
    monkeypatch.setenv(sup.ENV_VAR, "ssd,scrubb")
    with pytest.raises(ValueError, match=f"{sup.ENV_VAR}='ssd,scrubb'"):
        sup.plugin_setup()
    assert fake_supreme == {}


def test_pyproject_declares_the_plugin_entry_point():
    """The entry point SUPREME's registry scans (group "supreme.plugins") names a real callable."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    target = config["project"]["entry-points"]["supreme.plugins"]["jit_unlearn"]
    assert _resolve(target) is sup.plugin_setup


def test_import_needs_neither_supreme_nor_lightning_nor_wandb():
    code = (
        "import sys; import jit_unlearn.integrations.supreme, jit_unlearn.integrations.published; "
        "print(sorted(m for m in ('supreme', 'lightning', 'wandb') if m in sys.modules))"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- against SUPREME itself (when installed)


@pytest.fixture
def supreme_method(monkeypatch):
    """Import SUPREME's own method module `name`; skip when supreme-unlearning (or Lightning) is not
    installed.  Its modules import wandb, which calls with wandb_logging_flag=False never touch, so
    an empty module stands in when wandb is absent."""
    pytest.importorskip("supreme")
    pytest.importorskip("lightning.fabric")
    if importlib.util.find_spec("wandb") is None:
        monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))

    def load(name):
        if name == "jit":
            pytest.importorskip("torchvision")
        return getattr(importlib.import_module(f"supreme.methods.unlearning_methods.{name}"), name)

    return load


@pytest.mark.parametrize("name", ["ssd", "lfssd", "assd"])
def test_bitwise_equal_to_supreme(supreme_method, name):
    model, theirs = _cnn().train(), _cnn().train()
    forget, full = _loaders()
    getattr(sup, name)(StandInFabric(), 1, False, model, forget, full, 0.8, 2.0)
    supreme_method(name)(StandInFabric(), 1, False, theirs, forget, full, 0.8, 2.0)
    _assert_same(model, theirs)
    assert _flags(model) == _flags(theirs)


@pytest.mark.parametrize("name", ["ssd_det", "lfssd_det"])
def test_det_variants_close_to_supreme(supreme_method, name):
    model, theirs = _cnn().double(), _cnn().double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(30, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (30,), generator=g)
    forget = DataLoader(TensorDataset(x[:10], torch.arange(10), y[:10]), batch_size=4)
    full = DataLoader(TensorDataset(x, torch.arange(30), y), batch_size=8)
    getattr(sup, name)(StandInFabric(), 1, False, model, forget, full, 1.0, 2.2)
    supreme_method(name)(StandInFabric(), 1, False, theirs, forget, full, 1.0, 2.2)
    for p, q in zip(model.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_jit_bitwise_equal_to_supreme(supreme_method):
    model, theirs = _cnn(), _cnn()
    loader = _triples((1, 8, 8), 30, 8, seed=4)
    torch.manual_seed(5)
    sup.jit(StandInFabric(), 1, False, model, loader, n_epochs=2, n_samples=3, learning_rate=0.05, jit_weighting=0.3)
    ours_next = torch.randn(2)
    torch.manual_seed(5)
    supreme_method("jit")(
        StandInFabric(), 1, False, theirs, loader, n_epochs=2, n_samples=3, learning_rate=0.05, jit_weighting=0.3
    )
    _assert_same(model, theirs)
    assert _flags(model) == _flags(theirs) and torch.equal(ours_next, torch.randn(2))


def test_bitwise_equal_to_supreme_under_lightning_fabric(supreme_method):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    forget, full = _loaders()
    model, theirs = _cnn(), _cnn()
    ours_out = sup.ssd(fabric, 1, False, model, forget, full, 1.0, 2.0)
    their_out = supreme_method("ssd")(fabric, 1, False, theirs, forget, full, 1.0, 2.0)
    _assert_same(model, theirs)
    assert type(ours_out) is type(their_out)
    model, theirs = _cnn(), _cnn()
    torch.manual_seed(6)
    ours_out = sup.jit(fabric, 1, False, model, forget, n_samples=3, learning_rate=0.05, jit_weighting=0.3)
    torch.manual_seed(6)
    their_out = supreme_method("jit")(
        fabric, 1, False, theirs, forget, n_samples=3, learning_rate=0.05, jit_weighting=0.3
    )
    _assert_same(model, theirs)
    assert type(ours_out) is type(their_out)


def test_bitwise_equal_to_supreme_with_fabric_loaders(supreme_method):
    """SUPREME's pipeline hands its methods loaders wrapped by Fabric.setup_dataloaders."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    plain = _loaders()
    model, theirs = _cnn(), _cnn()
    sup.ssd(fabric, 1, False, model, *fabric.setup_dataloaders(*plain), 1.0, 2.0)
    supreme_method("ssd")(fabric, 1, False, theirs, *fabric.setup_dataloaders(*plain), 1.0, 2.0)
    _assert_same(model, theirs)


def test_supreme_registry_resolves_registered_names(supreme_method, monkeypatch):
    registry = importlib.import_module("supreme.registry")
    monkeypatch.setattr(registry, "_callable_overrides", {k: dict(v) for k, v in registry._callable_overrides.items()})
    monkeypatch.delenv(sup.ENV_VAR, raising=False)
    assert registry.resolve_method_location("ssd") == ("supreme.methods.unlearning_methods.ssd", "ssd")
    sup.register(["ssd"])
    module, attr = registry.resolve_method_location("ssd")
    assert getattr(importlib.import_module(module), attr) is sup.ssd
    assert registry.resolve_method_location("lfssd") == ("supreme.methods.unlearning_methods.lfssd", "lfssd")
