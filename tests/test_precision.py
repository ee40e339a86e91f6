"""Reduced precision (float16, bfloat16) for every method and the importances, on both tiers.

Each run is compared with an independent oracle, and the error is bounded relative to the size of
the update the oracle makes, so a run that does nothing, or twice too much, fails (an error of 1.0
or more); each test also shows that a wrong hyper-parameter (lr or alpha) exceeds its bound.
  * JiT: `oracles.jit_default` in float64 (its own Philox and Box-Muller noise).
  * Importances: the published `calc_importance` in float64, and a per-sample backward loop.
  * SSD, LF-SSD, ASSD: the published `calc_importance` + `modify_weight` run on the same
    reduced-precision model: the published code keeps importances in the parameters' dtype, as the
    package does (docs/METHODS.md §2.1), so float64 is not the reference there.
  * DEL: the mask against float64 localization, and the fine-tuning against a float64 transcription
    of masked SGD with momentum and the cosine schedule (docs/METHODS.md §3).
Bounds (measured errors in brackets): JiT f16 0.03 (0.007), bf16 0.2 (0.06); importances against
float64 f16 0.01 (0.004), bf16 0.04 (0.024), against the published code in the same dtype 0.005
(0.0024); SSD family 0.01 (3e-4); DEL fine-tuning f16 0.02 (0.004), bf16 0.1 (0.03).
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
import oracles
import published
from jit_unlearn.data import digits
from jit_unlearn.models import MLP, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

HALF = [torch.float16, torch.bfloat16]
FORGET_CLASS = 5


@pytest.fixture(scope="module")
def trained():
    """An MLP 64-32-10 trained on 600 digits (60 full-batch Adam steps), in eval mode, and the data."""
    x, y = digits().tensors
    x, y = x[:600], y[:600]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MLP(64, (32,), 10)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def _finite_and_typed(model, dtype):
    return all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------- JiT


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 0.03), (torch.bfloat16, 0.2)])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_jit_reduced_precision(backend, arch, dtype, bound):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = MLP(64, (32, 32), 10, dropout=0.2) if arch == "mlp" else SmallCNN(1, 10, width=8, dropout=0.2)
    shape = (64,) if arch == "mlp" else (1, 8, 8)
    x = torch.rand(40, *shape, generator=torch.Generator().manual_seed(1))  # float32 data, cast by jit
    model = base.to(dtype).train()
    ref = copy.deepcopy(model).double()
    before = oracles.state(ref)
    losses = oracles.jit_default(ref, x.double().split(16), sigma=0.3, lr=0.05, n=5, seed=11)
    want = oracles.state(ref)
    errors = {}
    for lr in (0.05, 0.0, 0.1):
        run = copy.deepcopy(model)
        report = ju.jit(run, x, sigma=0.3, lr=lr, num_samples=5, batch_size=16, seed=11, progress=False)
        assert _finite_and_typed(run, dtype)
        errors[lr] = oracles.update_error(before, oracles.state(run), want)
        if lr == 0.05:
            oracles.assert_update_close(before, oracles.state(run), want, rel=bound)
            # the loss is computed in float32 from reduced-precision outputs
            assert report.mean_loss == pytest.approx(sum(losses) / len(losses), rel=0.02)
    assert errors[0.05] <= bound < min(errors[0.0], errors[0.1])  # the bound tells a wrong lr apart


# ---------------------------------------------------------------- importances


def _relative_error(got, want) -> float:
    err = math.sqrt(sum(float((got[n].double() - want[n].double()).pow(2).sum()) for n in want))
    return err / math.sqrt(sum(float(want[n].double().pow(2).sum()) for n in want))


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("kind", ["fisher", "output_norm"])
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 0.01), (torch.bfloat16, 0.04)])
def test_importances_reduced_precision(backend, trained, dtype, bound, kind, per_sample):
    base, x, y = trained
    x, y = x[:200], y[:200]
    model = copy.deepcopy(base).to(dtype)
    imp = ju.importances(
        model,
        DataLoader(TensorDataset(x.to(dtype), y), batch_size=64),
        kind=kind,
        per_sample=per_sample,
        progress=False,
    )
    assert all(imp[n].dtype == dtype and not imp.invalid for n in imp)
    ref = copy.deepcopy(model).double().eval()
    if per_sample:
        want = oracles.per_sample_importances(ref, x.double(), y, kind)
    else:
        want = published.calc_importance(ref, DataLoader(TensorDataset(x.double(), y), batch_size=64), kind != "fisher")
    assert _relative_error(imp, want) <= bound
    # the published code on the reduced-precision model agrees to rounding (it rounds g * g to the
    # dtype before adding; the op adds in float32 and rounds once)
    if not per_sample:
        same = published.calc_importance(
            copy.deepcopy(model), DataLoader(TensorDataset(x.to(dtype), y), batch_size=64), kind != "fisher"
        )
        assert _relative_error(imp, same) <= 0.005


# ---------------------------------------------------------------- SSD, LF-SSD, ASSD


def _published_run(model, method, forget, full, alpha):
    """The published procedure on `model` as it is (its dtype); ASSD's alpha from numpy's percentile."""
    label_free = method == "lf_ssd"
    model.eval()
    f = published.calc_importance(model, forget, label_free)
    d = published.calc_importance(model, full, label_free)
    if method == "assd":
        ratios = np.concatenate([(f[n].double() / d[n].double()).numpy().ravel() for n in f])
        ratios = ratios[np.isfinite(ratios)]
        alpha = float(np.percentile(ratios, 100 - np.log(1 + 100 * len(forget.dataset) / len(full.dataset))))
    published.modify_weight(model, d, f, alpha, 1.0)
    return alpha


@pytest.mark.parametrize("method", ["ssd", "lf_ssd", "assd"])
@pytest.mark.parametrize("dtype", HALF)
def test_ssd_family_reduced_precision(backend, trained, dtype, method):
    base, x, y = trained
    keep = y == FORGET_CLASS
    model = copy.deepcopy(base).to(dtype)
    forget = DataLoader(TensorDataset(x[keep].to(dtype), y[keep]), batch_size=32)
    full = DataLoader(TensorDataset(x.to(dtype), y), batch_size=64)
    ref = copy.deepcopy(model)
    before = oracles.state(ref)
    alpha = _published_run(ref, method, forget, full, 10.0)
    want = oracles.state(ref)
    ours = copy.deepcopy(model)
    if method == "assd":
        report = ju.assd(ours, forget, full, progress=False)
        assert report.alpha == pytest.approx(alpha, rel=0.02)
    else:
        report = getattr(ju, method)(ours, forget, full, alpha=alpha, progress=False)
    assert _finite_and_typed(ours, dtype) and report.total_selected > 0
    oracles.assert_update_close(before, oracles.state(ours), want, rel=0.01)
    # the bound tells a wrong alpha apart: twice the alpha (the same importances kind)
    wrong = copy.deepcopy(model)
    (ju.lf_ssd if method == "lf_ssd" else ju.ssd)(wrong, forget, full, alpha=2 * report.alpha, progress=False)
    assert oracles.update_error(before, oracles.state(wrong), want) > 0.01


# ---------------------------------------------------------------- DEL


def _masked_sgd(model, mask, retain, *, lr, epochs, momentum, head):
    """float64 masked fine-tuning (docs/METHODS.md §3): SGD with momentum, the cosine schedule to
    0.01 lr over every step, gradients zeroed outside the mask (the head trains fully)."""
    params = dict(model.named_parameters())
    total, step, buffers = epochs * len(retain), 0, {}
    model.train()
    for _ in range(epochs):
        for xb, yb in retain:
            grads = torch.autograd.grad(F.cross_entropy(model(xb.double()), yb), list(params.values()))
            lr_t = 0.01 * lr + 0.5 * 0.99 * lr * (1 + math.cos(math.pi * step / total))
            with torch.no_grad():
                for (n, p), g in zip(params.items(), grads):
                    g = g if n in head else g * mask[n]
                    buffers[n] = g if n not in buffers else momentum * buffers[n] + g
                    p -= lr_t * buffers[n]
            step += 1


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 0.02), (torch.bfloat16, 0.1)])
def test_del_reduced_precision(backend, trained, dtype, bound):
    base, x, y = trained
    keep = y == FORGET_CLASS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        fresh = MLP(64, (32,), 10).state_dict()
    init = {k: v.to(dtype) for k, v in fresh.items()}
    forget = DataLoader(TensorDataset(x[keep].to(dtype), y[keep]), batch_size=64)
    retain = DataLoader(TensorDataset(x[~keep].to(dtype), y[~keep]), batch_size=64)
    errors, mask = {}, None
    for lr in (0.05, 0.1):
        model = copy.deepcopy(base).to(dtype)
        report = ju.del_unlearn(model, forget, retain, init=init, budget=0.3, lr=lr, epochs=2, progress=False)
        assert _finite_and_typed(model, dtype) and report.head == "3"
        if mask is None:
            mask = report.mask
            ref = copy.deepcopy(base).to(dtype).double()
            exact = ju.localize(
                ref, DataLoader(TensorDataset(x[keep].double(), y[keep]), batch_size=64), budget=0.3, progress=False
            )
            agree = sum(int((exact[n] == mask[n]).sum()) for n in mask) / mask.numel()
            assert agree >= 0.97  # rounding moves the cut by a few entries at most
            with torch.no_grad():  # the reset: the init values, rounded to the model's dtype
                for n, p in ref.named_parameters():
                    p[mask[n]] = init[n].double()[mask[n]]
            reset = oracles.state(ref)
            retain64 = DataLoader(TensorDataset(x[~keep].double(), y[~keep]), batch_size=64)
            _masked_sgd(ref, mask, retain64, lr=0.05, epochs=2, momentum=0.9, head={"3.weight", "3.bias"})
            want = oracles.state(ref)
        errors[lr] = oracles.update_error(reset, oracles.state(model), want)
    assert errors[0.05] <= bound < errors[0.1]  # the fine-tuning part of the update, and a wrong lr told apart
