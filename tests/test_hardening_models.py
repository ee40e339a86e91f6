"""Models from the ecosystem: a forward that returns an object with `.logits` (transformers' ModelOutput,
here a ViTForImageClassification built from a tiny config, no weights) or a dict with "logits" works in
every method and metric, bitwise as the same model returning the logits tensor; `pixel_values` dict
batches are read; `jit_unlearn.eval` is reachable after a bare `import jit_unlearn`."""

from __future__ import annotations

import copy
import subprocess
import sys
import types

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import jit_unlearn as ju
from conftest import ROOT, subprocess_env
from jit_unlearn._utils import check_logits, logits_of
from jit_unlearn.methods.deletion import Mask

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching"),
]


class _Unwrap(nn.Module):
    """The same model, returning the logits tensor itself (the reference behaviour)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return logits_of(self.inner(x))


class _DictOut(nn.Module):
    def __init__(self, style: str):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.style = style

    def forward(self, x):
        logits = self.net(x)
        if self.style == "dict":
            return {"logits": logits, "hidden": logits.detach()}
        return types.SimpleNamespace(logits=logits, loss=None)


def _vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=4, patch_size=2, num_channels=1, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval()


_X = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
_Y = torch.tensor([0, 1, 2, 0, 1, 2])
_FORGET, _FULL = TensorDataset(_X[:3], _Y[:3]), TensorDataset(_X, _Y)


def _init(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


_METHODS = {
    "jit": lambda m, init: ju.jit(m, _X, sigma=0.5, lr=0.05, num_samples=2, batch_size=3, progress=False),
    "jit_reference": lambda m, init: ju.jit(m, _X, sigma=0.5, lr=0.05, num_samples=2, mode="reference", progress=False),
    "ssd": lambda m, init: ju.ssd(m, _FORGET, _FULL, alpha=1.0, progress=False),
    "ssd_per_sample": lambda m, init: ju.ssd(m, _FORGET, _FULL, alpha=1.0, per_sample=True, progress=False),
    "lf_ssd": lambda m, init: ju.lf_ssd(m, _X[:3], _X, alpha=1.0, progress=False),
    "assd": lambda m, init: ju.assd(m, _FORGET, _FULL, progress=False),
    "del": lambda m, init: ju.del_unlearn(m, _FORGET, _FULL, init=init, epochs=1, batch_size=3, progress=False),
    "del_reference": lambda m, init: ju.del_unlearn(
        m, _FORGET, _FULL, init=init, epochs=1, batch_size=3, mode="reference", progress=False
    ),
    "masked_finetune": lambda m, init: ju.masked_finetune(
        m, Mask({}), _FULL, forget=_FORGET, objective="relabel", head=_head(m), lr=0.05, epochs=1, progress=False
    ),
}


def _head(model):
    inner = model.inner if isinstance(model, _Unwrap) else model
    name = "classifier" if hasattr(inner, "classifier") else "net.4"
    return f"inner.{name}" if inner is not model else name


def _pair(kind: str):
    """(the model under test, the same model returning the logits tensor), equal values."""
    model = _vit() if kind == "vit" else _DictOut(kind)
    return model, _Unwrap(copy.deepcopy(model))


def _init_for(model, like):
    # the same fresh values for both models, under each one's own parameter names
    return dict(zip(model.state_dict().keys(), like.values()))


@pytest.mark.parametrize("kind", ["vit", "dict", "object"])
@pytest.mark.parametrize("method", list(_METHODS))
def test_methods_read_logits_out_of_the_output(kind, method):
    model, plain = _pair(kind)
    fresh = _init(_pair(kind)[0])
    torch.manual_seed(5)
    report = _METHODS[method](model, _init_for(model, fresh))
    torch.manual_seed(5)
    expected = _METHODS[method](plain, _init_for(plain, fresh))
    assert type(report) is type(expected)
    got, want = list(model.state_dict().values()), list(plain.state_dict().values())
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert any(not torch.equal(a, b) for a, b in zip(got, fresh.values()))  # the method did change the model


@pytest.mark.parametrize("kind", ["vit", "dict", "object"])
def test_metrics_read_logits_out_of_the_output(kind):
    model, plain = _pair(kind)
    splits = {"forget": _FORGET, "retain": _FULL, "test": _FULL}
    assert ju.eval.accuracy(model, _FULL) == ju.eval.accuracy(plain, _FULL)
    assert ju.eval.entropy_mia(model, _FULL, _FORGET, _FULL) == ju.eval.entropy_mia(plain, _FULL, _FORGET, _FULL)
    big = TensorDataset(_X.repeat(4, 1, 1, 1), _Y.repeat(4))
    assert ju.eval.loss_mia(model, big, big, n_splits=2) == ju.eval.loss_mia(plain, big, big, n_splits=2)
    got, want = ju.eval.evaluate(model, splits, mia=False), ju.eval.evaluate(plain, splits, mia=False)
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    a, b = ju.importances(model, _FULL, progress=False), ju.importances(plain, _FULL, progress=False)
    assert all(torch.equal(a[n], b[m]) for n, m in zip(a, b))


def test_pixel_values_batches_are_read():
    model = _vit()
    batches = [{"pixel_values": _X[:3], "labels": _Y[:3]}, {"pixel_values": _X[3:], "labels": _Y[3:]}]
    assert ju.eval.accuracy(model, iter(batches)) == ju.eval.accuracy(model, _FULL)


def test_an_output_without_logits_is_refused_clearly():
    with pytest.raises(
        TypeError, match=r"model: must return a \[B, K\] tensor of logits \(or an output with a `logits`"
    ):
        check_logits((torch.ones(2, 3),), 2)
    with pytest.raises(TypeError, match="returned dict"):
        check_logits({"scores": torch.ones(2, 3)}, 2)
    assert check_logits(types.SimpleNamespace(logits=torch.ones(2, 3)), 2).shape == (2, 3)


def test_submodules_are_attributes_after_a_bare_import():
    code = (
        "import jit_unlearn, torch\n"
        "m = torch.nn.Linear(2, 2)\n"
        "ds = torch.utils.data.TensorDataset(torch.ones(4, 2), torch.tensor([0, 1, 0, 1]))\n"
        "print(jit_unlearn.eval.accuracy(m, ds) >= 0, jit_unlearn.data.__name__, jit_unlearn.models.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "jit_unlearn.data", "jit_unlearn.models"]
