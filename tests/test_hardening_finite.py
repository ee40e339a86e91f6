"""Never a non-finite parameter: every method checks the parameters and buffers after its last step
(restoring the model and raising FloatingPointError), data holding NaN/inf is named as such before
anything is blamed on the learning rate, and a learning rate the parameters' dtype cannot hold is
refused up front."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
from jit_unlearn import _safety, ops
from jit_unlearn.methods.deletion import Mask

pytestmark = pytest.mark.usefixtures("one_thread")


class _Linear(nn.Module):
    """f(x) = W x: the Lipschitz loss has gradient rows of norm <= 1 per sample and perturbation,
    so the SGD step is about lr * B."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter((torch.randn(3, 4) * 0.1).to(dtype))

    def forward(self, x):
        return x @ self.w.t()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _same(model, saved):
    return all(torch.equal(model.state_dict(keep_vars=True)[k].detach(), v) for k, v in saved.items())


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


_X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
_Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


@pytest.mark.parametrize("dtype,lr", [(torch.float16, 6e4), (torch.float32, 3e38)])
def test_reference_mode_last_sgd_step_overflow_raises_and_restores(dtype, lr):
    # the gradients are finite (checked per step); the step lr * grad is not representable
    model = _Linear(dtype)
    saved = _snapshot(model)
    x = torch.rand(8, 4).to(dtype)
    with pytest.raises(FloatingPointError, match=r"non-finite values.*\['w'\]"):
        ju.jit(model, x, sigma=0.5, lr=lr, num_samples=2, mode="reference", progress=False)
    assert _same(model, saved)


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_jit_float16_lr_beyond_the_dtype_is_refused_up_front(mode):
    model = _Linear(torch.float16)
    with pytest.raises(ValueError, match=r"lr: 100000 overflows the parameters' dtype torch.float16"):
        ju.jit(model, torch.rand(4, 4).half(), sigma=0.5, lr=1e5, num_samples=2, mode=mode, progress=False)


@pytest.mark.parametrize("call", ["del", "masked_finetune"])
def test_del_lr_beyond_the_dtype_is_refused_up_front(call):
    model = _mlp().half()
    data = TensorDataset(_X.half(), _Y)
    with pytest.raises(ValueError, match="lr: .* overflows the parameters' dtype torch.float16"):
        if call == "del":
            ju.del_unlearn(model, data, data, init=model.state_dict(), lr=1e6, epochs=1, progress=False)
        else:
            ju.masked_finetune(model, Mask({}), data, lr=1e6, epochs=1, progress=False)


def _broken_kernel(monkeypatch, name):
    """Make ops.<name> also write a NaN into its first target (a faulty kernel)."""
    real = getattr(ops, name)

    def broken(targets, *args, **kwargs):
        out = real(targets, *args, **kwargs)
        with torch.no_grad():
            targets[0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(ops, name, broken)


@pytest.mark.parametrize("method", ["ssd", "lf_ssd", "assd"])
def test_ssd_family_checks_the_parameters_after_dampening(method, monkeypatch):
    _broken_kernel(monkeypatch, "ssd_dampen_")
    model = _mlp()
    saved = _snapshot(model)
    forget = TensorDataset(_X[:4], _Y[:4]) if method != "lf_ssd" else _X[:4]
    full = TensorDataset(_X, _Y) if method != "lf_ssd" else _X
    kwargs = {} if method == "assd" else {"alpha": 0.5}
    with pytest.raises(FloatingPointError, match=rf"{method}: the run wrote non-finite values"):
        getattr(ju, method)(model, forget, full, progress=False, **kwargs)
    assert _same(model, saved)


def test_del_checks_the_parameters_after_the_reset(monkeypatch):
    _broken_kernel(monkeypatch, "masked_reset_")
    model = _mlp()
    saved = _snapshot(model)
    data = TensorDataset(_X, _Y)
    with pytest.raises(FloatingPointError, match="del_unlearn: the run wrote non-finite values"):
        ju.del_unlearn(model, data, data, init=_mlp(1).state_dict(), epochs=0, progress=False)
    assert _same(model, saved)


def test_masked_finetune_checks_the_buffers_too():
    # finite but huge inputs: the BatchNorm running variance overflows float32 while the trained
    # parameters (the head) stay finite; the buffers must not keep an inf either
    model = _mlp()
    saved = _snapshot(model)
    retain = TensorDataset(torch.randn(8, 4) * 3e30, _Y)
    with pytest.raises(FloatingPointError, match=r"masked_finetune: .*non-finite values .*\['1.running_var'\]"):
        ju.masked_finetune(model, Mask({}), retain, lr=0.1, epochs=1, batch_size=8, head="3", progress=False)
    assert _same(model, saved)


def test_previously_non_finite_values_are_not_blamed_on_the_run():
    # a buffer that holds -inf by design (a mask) stays as it is; only newly non-finite values count
    model = _mlp()
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    report = ju.jit(model, _X, sigma=0.5, lr=0.01, num_samples=2, progress=False)
    assert report.changed and torch.isneginf(model.mask[1])


def _nan_batches(where: int, n_batches: int = 3):
    xs = [torch.randn(4, 4, generator=torch.Generator().manual_seed(i)) for i in range(n_batches)]
    xs[where][1, 2] = float("nan")
    return xs


@pytest.mark.parametrize("mode", ["default", "reference"])
@pytest.mark.parametrize("as_loader", [False, True])
def test_jit_names_a_forget_batch_with_nan(mode, as_loader):
    xs = _nan_batches(2)
    forget = DataLoader(TensorDataset(torch.cat(xs)), batch_size=4) if as_loader else torch.cat(xs)
    model = _mlp()
    saved = _snapshot(model)
    with pytest.raises(ValueError, match=r"forget: batch 2 \(counting from 0\) holds NaN or inf"):
        ju.jit(model, forget, sigma=0.5, lr=0.01, num_samples=2, batch_size=None if as_loader else 4, mode=mode,
               progress=False)  # fmt: skip
    assert _same(model, saved)


@pytest.mark.parametrize("bad", ["forget", "full"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_ssd_names_the_data_with_inf(bad, per_sample):
    x = torch.cat(_nan_batches(1))
    x[x.isnan()] = float("inf")
    y = torch.arange(12) % 3
    clean = TensorDataset(torch.randn(12, 4), y)
    forget = TensorDataset(x, y) if bad == "forget" else clean
    full = TensorDataset(x, y) if bad == "full" else clean
    model = _mlp()
    saved = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{bad}: batch 1 \(counting from 0\) holds NaN or inf"):
        ju.ssd(model, forget, full, alpha=0.5, batch_size=4, per_sample=per_sample, progress=False)
    assert _same(model, saved)


@pytest.mark.parametrize("mode", ["default", "reference"])
@pytest.mark.parametrize("bad", ["forget", "retain"])
def test_del_names_the_data_with_nan(bad, mode):
    x = torch.cat(_nan_batches(0))
    y = torch.arange(12) % 3
    clean = TensorDataset(torch.randn(12, 4), y)
    forget = TensorDataset(x, y) if bad == "forget" else clean
    retain = DataLoader(TensorDataset(x, y), batch_size=4) if bad == "retain" else clean
    model = _mlp()
    saved = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{bad}: batch 0 \(counting from 0\) holds NaN or inf"):
        ju.del_unlearn(model, forget, retain, init=_mlp(1).state_dict(), epochs=1, batch_size=4, mode=mode,
                       progress=False)  # fmt: skip
    assert _same(model, saved)


def test_eval_names_the_data_with_nan():
    x = torch.cat(_nan_batches(1))
    with pytest.raises(ValueError, match=r"loader: batch 1 \(counting from 0\) holds NaN or inf"):
        ju.eval.accuracy(_mlp(), DataLoader(TensorDataset(x, torch.arange(12) % 3), batch_size=4))


def test_deferred_checks_name_the_first_bad_batch_after_one_sync():
    # the path taken on GPUs, forced on the CPU: nothing raises until verify()
    checks = _safety.BatchChecks("forget", defer=True)
    checks.inputs(torch.ones(2), 0)
    checks.inputs(torch.tensor([1.0, float("inf")]), 1)
    y = checks.labels(torch.tensor([0, 5]), 2, 2, num_classes=3)
    assert y.tolist() == [0, 2]  # clamped into range until verified
    checks.inputs(torch.tensor([float("nan")]), 3)
    with pytest.raises(ValueError, match=r"forget: batch 1 \(counting from 0\) holds NaN or inf"):
        checks.verify()
    checks.labels(torch.tensor([0, -100]), 4, 2, num_classes=3)
    with pytest.raises(ValueError, match=r"forget: batch 4 .* labels outside \[0, 3\)"):
        checks.verify()
    checks.verify()  # nothing pending


def test_snapshot_finds_only_newly_non_finite_values():
    model = _mlp()
    model.register_buffer("mask", torch.tensor([float("inf"), 0.0]))
    snap = _safety.Snapshot(model)
    assert snap.newly_non_finite() == []
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
        model.mask[1] = float("-inf")
        model[1].running_var[2] = float("inf")
    assert sorted(snap.newly_non_finite()) == ["0.weight", "1.running_var", "mask"]
    snap.restore()
    assert snap.newly_non_finite() == [] and not snap.changed()


@pytest.mark.parametrize("name", ["finetune", "neggrad_plus", "random_label", "bad_teacher", "scrub"])
def test_baselines_check_parameters_and_buffers_after_the_last_step(name, monkeypatch):
    # the last SGD step of the loop writes a NaN (a faulty step): the baseline raises, the model comes back
    from jit_unlearn import baselines
    from jit_unlearn.methods.deletion import finetune as loop

    real = loop.run_finetune

    def last_step_broken(model, *args, **kwargs):
        report = real(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("inf")
        return report

    monkeypatch.setattr(loop, "run_finetune", last_step_broken)
    model = _mlp()
    saved = _snapshot(model)
    data = TensorDataset(_X, _Y)
    with pytest.raises(FloatingPointError, match=rf"{name}: the run wrote non-finite values .*\['0.weight'\]"):
        getattr(baselines, name)(model, data, data, epochs=1, batch_size=4, progress=False)
    assert _same(model, saved)


def test_baselines_name_data_with_nan():
    from jit_unlearn import baselines

    x = torch.cat(_nan_batches(1))
    y = torch.arange(12) % 3
    model = _mlp()
    saved = _snapshot(model)
    with pytest.raises(ValueError, match=r"retain: batch 1 \(counting from 0\) holds NaN or inf"):
        baselines.finetune(model, None, DataLoader(TensorDataset(x, y), batch_size=4), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"forget: batch 1 \(counting from 0\) holds NaN or inf"):
        baselines.scrub(model, DataLoader(TensorDataset(x, y), batch_size=4), TensorDataset(torch.randn(12, 4), y),
                        epochs=1, batch_size=4, progress=False)  # fmt: skip
    assert _same(model, saved)


@pytest.mark.parametrize("name", ["supreme_assd", "published"])
def test_drop_ins_check_the_parameters_after_dampening(name, monkeypatch):
    from jit_unlearn.integrations import published, supreme
    from stand_in_fabric import StandInFabric

    _broken_kernel(monkeypatch, "ssd_dampen_")
    model = _mlp()
    saved = _snapshot(model)
    forget = DataLoader(TensorDataset(_X[:4], torch.arange(4), _Y[:4]), batch_size=4)
    full = DataLoader(TensorDataset(_X, torch.arange(8), _Y), batch_size=4)
    if name == "published":
        params = {"lower_bound": 1, "exponent": 1, "dampening_constant": 1, "selection_weighting": 0.5}
        imp = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) for n, p in model.named_parameters()}
        with pytest.raises(FloatingPointError, match="modify_weight: the run wrote non-finite values"):
            published.ParameterPerturber(model, None, "cpu", params).modify_weight(
                imp, {n: 4 * t for n, t in imp.items()}
            )
    else:
        with pytest.raises(FloatingPointError, match="assd: the run wrote non-finite values"):
            supreme.assd(StandInFabric(), 1, False, model, forget, full, 1.0, 0.5)
    assert _same(model, saved)


def test_supreme_jit_names_a_forget_batch_with_nan():
    from jit_unlearn.integrations import supreme
    from stand_in_fabric import StandInFabric

    x = torch.cat(_nan_batches(2))
    loader = DataLoader(TensorDataset(x, torch.arange(12), torch.arange(12) % 3), batch_size=4)
    model = _mlp()
    saved = _snapshot(model)
    with pytest.raises(ValueError, match=r"forget_train_dataloader: batch 2 \(counting from 0\) holds NaN or inf"):
        supreme.jit(StandInFabric(), 1, False, model, loader, n_samples=2, learning_rate=0.01)
    assert _same(model, saved)
