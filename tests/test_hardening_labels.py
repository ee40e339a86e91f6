"""Labels: every method and metric that reads labels refuses labels outside [0, K) (cross-entropy's
ignore index -100 included), labels that are not integer class indices, and label shapes other than
[B], naming the data and the batch, with the model unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
from jit_unlearn import _checks as checks
from jit_unlearn.eval import Recipe, train
from jit_unlearn.methods.deletion import Mask

pytestmark = pytest.mark.usefixtures("one_thread")

_X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
_GOOD = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _with(label, at=5):
    y = _GOOD.clone()
    y[at] = label
    return y


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, saved):
    return all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


BAD = [(-100, r"label -100 is outside \[0, 3\).*ignore_index"), (3, r"label 3 is outside \[0, 3\)"), (-1, "label -1")]


@pytest.mark.parametrize("label,message", BAD)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("bad", ["forget", "full"])
def test_ssd_refuses_labels_out_of_range(label, message, per_sample, bad):
    clean = TensorDataset(_X, _GOOD)
    forget = TensorDataset(_X, _with(label)) if bad == "forget" else clean
    full = TensorDataset(_X, _with(label)) if bad == "full" else clean
    model = _mlp()
    saved = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{bad}: batch 1 \(counting from 0\): {message}"):
        ju.ssd(model, forget, full, alpha=0.5, batch_size=4, per_sample=per_sample, progress=False)
    assert _same(model, saved)


@pytest.mark.parametrize("label,message", BAD)
@pytest.mark.parametrize("mode", ["default", "reference"])
@pytest.mark.parametrize("bad", ["forget", "retain"])
def test_del_refuses_labels_out_of_range(label, message, mode, bad):
    clean = TensorDataset(_X, _GOOD)
    forget = TensorDataset(_X, _with(label)) if bad == "forget" else clean
    retain = DataLoader(TensorDataset(_X, _with(label)), batch_size=4) if bad == "retain" else clean
    model = _mlp()
    saved = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{bad}: batch 1 \(counting from 0\): {message}"):
        ju.del_unlearn(model, forget, retain, init=_mlp(1).state_dict(), epochs=1, batch_size=4, mode=mode,
                       progress=False)  # fmt: skip
    assert _same(model, saved)


@pytest.mark.parametrize("objective", ["finetune", "neggrad_plus", "relabel"])
def test_masked_finetune_refuses_labels_out_of_range(objective):
    model = _mlp()
    saved = _snapshot(model)
    forget = TensorDataset(_X[:4], _with(-100, at=2)[:4])
    bad = "forget" if objective != "finetune" else "retain"
    retain = TensorDataset(_X, _with(7)) if bad == "retain" else TensorDataset(_X, _GOOD)
    mask = Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match=rf"{bad}: batch 0 \(counting from 0\): label"):
        ju.masked_finetune(model, mask, retain, forget=forget if objective != "finetune" else None,
                           objective=objective, lr=0.1, epochs=1, batch_size=8, progress=False)  # fmt: skip
    assert _same(model, saved)


def test_localize_refuses_labels_out_of_range():
    with pytest.raises(ValueError, match=r"forget: batch 0 \(counting from 0\): label 9"):
        ju.localize(_mlp(), TensorDataset(_X, _with(9)), progress=False)


@pytest.mark.parametrize("metric", ["accuracy", "loss_mia", "evaluate"])
def test_metrics_refuse_labels_out_of_range(metric):
    model = _mlp()
    bad = TensorDataset(_X, _with(-100))
    with pytest.raises(ValueError, match="label -100 is outside"):
        if metric == "accuracy":
            ju.eval.accuracy(model, bad)
        elif metric == "loss_mia":
            ju.eval.loss_mia(model, bad, TensorDataset(_X, _GOOD))
        else:
            ju.eval.evaluate(model, {"forget": bad, "retain": bad, "test": bad})


def test_accuracy_with_column_labels_raises_instead_of_broadcasting():
    # [B, 1] labels used to broadcast against the [B] predictions and give accuracies above 1
    model = _mlp().eval()
    with pytest.raises(ValueError, match=r"labels must have shape \[B\] = \(8,\), got \(8, 1\).*squeeze"):
        ju.eval.accuracy(model, DataLoader(TensorDataset(_X, _GOOD[:, None]), batch_size=8))
    with torch.no_grad():
        expected = (model(_X).argmax(1) == _GOOD).float().mean().item()
    assert ju.eval.accuracy(model, TensorDataset(_X, _GOOD)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "y,error,message",
    [
        (_GOOD.float(), TypeError, "labels must be integer class indices, got dtype torch.float32"),
        (_GOOD.bool(), TypeError, "got dtype torch.bool"),
        (_GOOD[:7], ValueError, r"labels must have shape \[B\] = \(8,\), got \(7,\)"),
        (torch.nn.functional.one_hot(_GOOD, 3), ValueError, r"got \(8, 3\)"),
    ],
)
def test_label_dtype_and_shape_are_checked(y, error, message):
    class Batches:  # an iterable of ready-made batches (no __len__ / __getitem__: not a Dataset)
        def __iter__(self):
            return iter([(_X, y)])

    for call in (
        lambda: ju.eval.accuracy(_mlp(), Batches()),
        lambda: ju.importances(_mlp(), Batches(), progress=False),
        lambda: ju.localize(_mlp(), Batches(), progress=False),
    ):
        with pytest.raises(error, match=message):
            call()


def test_small_integer_labels_are_accepted():
    # uint8 / int32 labels (MNIST ships uint8) are class indices like int64 ones
    model = _mlp()
    a = ju.eval.accuracy(model, TensorDataset(_X, _GOOD))
    assert ju.eval.accuracy(model, TensorDataset(_X, _GOOD.to(torch.uint8))) == a
    assert ju.eval.accuracy(model, TensorDataset(_X, _GOOD.int())) == a


def test_training_loop_refuses_labels_out_of_range():
    with pytest.raises(ValueError, match=r"data: batch 0 \(counting from 0\): label 3"):
        train(_mlp(), TensorDataset(_X, _with(3)), Recipe(epochs=1, batch_size=8))


def test_checks_labels_values():
    y, flag = checks.labels(torch.tensor([0, 2]), "d", batch=0, batch_size=2, num_classes=3)
    assert y.dtype == torch.int64 and y.tolist() == [0, 2] and flag is None
    y, flag = checks.labels(torch.tensor([0, 3]), "d", batch=0, batch_size=2, num_classes=3, defer=True)
    assert y.tolist() == [0, 2] and not bool(flag)
    y, flag = checks.labels(torch.tensor([-5, 9]), "d", batch=0, batch_size=2, num_classes=None)
    assert y.tolist() == [-5, 9] and flag is None  # no K yet: shape and dtype only
    with pytest.raises(ValueError, match=r"d: batch 4 \(counting from 0\): label -5 is outside \[0, 3\)"):
        checks.labels(torch.tensor([-5, 9]), "d", batch=4, batch_size=2, num_classes=3)


@pytest.mark.parametrize("name", ["finetune", "neggrad_plus", "random_label", "scrub"])
@pytest.mark.parametrize("label", [-100, 3])
def test_baselines_refuse_labels_out_of_range(name, label):
    # the custom objectives read the labels in their own losses: the check runs before they do
    # (bad_teacher's loss reads no label, so it has none to refuse)
    from jit_unlearn import baselines

    model = _mlp()
    saved = _snapshot(model)
    retain = TensorDataset(_X, _with(label))
    with pytest.raises(ValueError, match=rf"retain: batch \d \(counting from 0\): label {label} is outside"):
        getattr(baselines, name)(model, TensorDataset(_X, _GOOD), retain, epochs=1, batch_size=4, progress=False)
    assert _same(model, saved)
