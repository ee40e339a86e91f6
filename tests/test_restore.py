"""Restore on failure, for real: every method fails after it has written parameters (or, where the
failure is a refusal, after forwards changed buffers), and the model must come back bitwise:
parameters, buffers (BatchNorm statistics, a buffer the forward itself changes), module flags, and
the caller's optimizer state or `.grad` where the API promises them.  Each test first checks that the
failure did come after a write, so it fails if the restore is removed."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
from jit_unlearn import ops
from jit_unlearn.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(nn.Module):
    """SmallCNN (BatchNorm, dropout) plus a buffer that every forward changes, in eval mode too, and
    a forward that raises `error` on call `fail_at`, recording first whether the parameters had moved."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = SmallCNN(1, 4, width=4, dropout=0.2)
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))
        self.calls, self.fail_at, self.error = 0, None, KeyboardInterrupt
        self.reference, self.moved = None, None

    def arm(self, fail_at: int, error=KeyboardInterrupt) -> None:
        self.calls, self.fail_at, self.error = 0, fail_at, error
        self.reference = snapshot(self)

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            self.moved = params_moved(self, self.reference)
            raise self.error("injected")
        self.seen += x.shape[0]
        return self.net(x)


def _tensors(model):
    named = [("param " + n, p) for n, p in model.named_parameters()]
    return dict(named + [("buffer " + n, b) for n, b in model.named_buffers()])  # non-persistent ones too


def snapshot(model) -> dict:
    return {k: t.detach().clone() for k, t in _tensors(model).items()}


def params_moved(model, saved) -> bool:
    return any(not torch.equal(t, saved[k]) for k, t in _tensors(model).items() if k.startswith("param"))


def assert_restored(model, saved, flags) -> None:
    now = _tensors(model)
    assert now.keys() == saved.keys()
    for k, t in now.items():
        assert t.dtype == saved[k].dtype and torch.equal(
            t.detach().reshape(-1).view(torch.uint8), saved[k].reshape(-1).view(torch.uint8)
        ), k
    assert [m.training for m in model.modules()] == flags


def _model(mixed_modes: bool = True) -> Counting:
    model = Counting()
    model.train()
    if mixed_modes:
        model.net.features[1].eval()  # the caller's mixed flags must come back as they were
    with torch.no_grad():  # a BatchNorm with statistics of its own
        bn = model.net.features[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return model


def _data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _start(model):
    return snapshot(model), [m.training for m in model.modules()]


# ---------------------------------------------------------------- JiT


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("mode,fail_at", [("default", 5), ("reference", 6)])
def test_jit_fails_after_steps(mode, fail_at, error):
    # default: 2 forwards per batch (perturbed copies, clean batch): call 5 is in batch 3, after 2 steps;
    # reference: 1 + 3 forwards per batch: call 6 is in batch 2, after 1 step
    model = _model()
    x, _ = _data()
    saved, flags = _start(model)
    model.arm(fail_at, error)
    with pytest.raises(error, match="injected"):
        ju.jit(model, x, sigma=0.3, lr=0.1, num_samples=3, batch_size=10, mode=mode, progress=False)
    assert model.moved and model.calls == fail_at
    assert_restored(model, saved, flags)


def test_jit_with_optimizer_fails_after_steps():
    model = _model()
    x, _ = _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for p in model.parameters():  # the caller's optimizer holds moments already
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    opt_saved = copy.deepcopy(opt.state_dict())
    saved, flags = _start(model)
    model.arm(5)
    with pytest.raises(KeyboardInterrupt):
        ju.jit(model, x, sigma=0.3, lr=0.1, num_samples=3, batch_size=10, optimizer=opt, progress=False)
    assert model.moved
    assert_restored(model, saved, flags)
    now = opt.state_dict()["state"]
    for i, st in opt_saved["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(now[i][key], st[key]), (i, key)


# ---------------------------------------------------------------- SSD, LF-SSD, ASSD


def _failing_after(monkeypatch, name: str, model, reference, share: float = 1.0):
    """Replace ops.<name> by the real op on the first `share` of its tensors, then a KeyboardInterrupt;
    returns a dict that records whether parameters had moved when it raised."""
    real, seen = getattr(ops, name), {}

    def write_then_fail(targets, *lists, **kwargs):
        k = max(1, int(share * len(targets)))
        real(list(targets[:k]), *[list(lst[:k]) for lst in lists[:2]], *lists[2:], **kwargs)
        seen["moved"] = params_moved(model, reference)
        seen["buffer"] = float(model.seen) if isinstance(model, Counting) else None
        raise KeyboardInterrupt

    monkeypatch.setattr(ops, name, write_then_fail)
    return seen


@pytest.mark.parametrize("share", [1.0, 0.5], ids=["whole", "partial"])
@pytest.mark.parametrize("method", ["ssd", "lf_ssd", "assd"])
def test_ssd_family_fails_after_dampening(monkeypatch, method, share):
    model = _model()
    x, y = _data()
    forget = DataLoader(TensorDataset(x[y == 1], y[y == 1]), batch_size=4)
    full = DataLoader(TensorDataset(x, y), batch_size=16)
    saved, flags = _start(model)
    seen = _failing_after(monkeypatch, "ssd_dampen_", model, saved, share)
    kwargs = {} if method == "assd" else {"alpha": 1.0}  # a low alpha: many elements dampened
    with pytest.raises(KeyboardInterrupt):
        getattr(ju, method)(model, forget, full, progress=False, **kwargs)
    assert seen["moved"] and seen["buffer"] > 0  # dampened, after the importance passes' forwards
    assert_restored(model, saved, flags)


# ---------------------------------------------------------------- DEL


def _del(model, forget, retain, **kwargs):
    args = dict(init=lambda: Counting(seed=7), budget=0.3, lr=0.05, epochs=2, batch_size=8, progress=False)
    return ju.del_unlearn(model, forget, retain, **{**args, **kwargs})


@pytest.mark.parametrize("share", [1.0, 0.5], ids=["whole", "partial"])
def test_del_fails_after_the_reset(monkeypatch, share):
    model = _model()
    x, y = _data()
    saved, flags = _start(model)
    seen = _failing_after(monkeypatch, "masked_reset_", model, saved, share)
    with pytest.raises(KeyboardInterrupt):
        _del(model, TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:]))
    assert seen["moved"]
    assert_restored(model, saved, flags)


class _Stopping:
    """A retain source of (x, y) batches that raises `error` when asked for batch `at` (0-based),
    recording first whether `model`'s parameters had moved from `saved`."""

    def __init__(self, x, y, size, at, model, saved, error=KeyboardInterrupt):
        self.batches = list(zip(x.split(size), y.split(size)))
        self.at, self.error, self.model, self.saved, self.moved = at, error, model, saved, None

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, b in enumerate(self.batches * 10):
            if i == self.at:
                self.moved = params_moved(self.model, self.saved)
                raise self.error("injected")
            yield b


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_del_fails_mid_finetune(error):
    model = _model()
    x, y = _data()
    saved, flags = _start(model)
    retain = _Stopping(x[8:], y[8:], 8, 5, model, saved, error)  # batch 5 of 2 epochs of 4: after 5 steps
    with pytest.raises(error, match="injected"):
        _del(model, TensorDataset(x[:8], y[:8]), retain)
    assert retain.moved
    assert_restored(model, saved, flags)


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_masked_finetune_fails_mid_run(error):
    model = _model(mixed_modes=False).eval()
    x, y = _data()
    mask = ju.Mask(
        {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.5 for n, p in model.named_parameters()}
    )
    saved, flags = _start(model)
    retain = _Stopping(x, y, 8, 4, model, saved, error)
    with pytest.raises(error, match="injected"):
        ju.masked_finetune(model, mask, retain, lr=0.1, epochs=3, progress=False)
    assert retain.moved  # 4 steps were taken (BatchNorm statistics moved too, in train mode)
    assert_restored(model, saved, flags)


def test_masked_finetune_divergence_restores():
    model = _model()
    x, y = _data()
    mask = ju.Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()})
    saved, flags = _start(model)
    with pytest.raises(RuntimeError, match="diverged"):
        ju.masked_finetune(model, mask, TensorDataset(x, y), lr=1e35, epochs=2, batch_size=8, progress=False)
    assert_restored(model, saved, flags)


def test_del_non_finite_init_refused_and_restored():
    model = _model()
    x, y = _data()
    init = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in Counting(7).state_dict().items()
    }
    saved, flags = _start(model)
    with pytest.raises(ValueError, match="init: has non-finite values"):
        _del(model, TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:]), init=init)
    assert model.calls > 0  # localization ran its forwards (and moved the counting buffer) before the refusal
    assert_restored(model, saved, flags)


def _non_finite_scores(model):
    """A BatchNorm with a negative running variance: NaN outputs in eval mode (where localization
    scores), so NaN gradients and scores, from finite data and finite parameters."""
    with torch.no_grad():
        model.net.features[1].running_var.fill_(-1.0)
    return model


def test_del_non_finite_scores_refused_and_restored():
    model = _non_finite_scores(_model())
    x, y = _data()
    saved, flags = _start(model)
    with pytest.raises(RuntimeError, match="scores are not finite"):
        _del(model, TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:]))
    assert model.calls > 0
    assert_restored(model, saved, flags)


def test_localize_non_finite_scores_change_nothing():
    model = _non_finite_scores(Counting()).net.train()  # no counting buffer: localize itself must not write
    x, y = _data()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    saved, flags = _start(model)
    with pytest.raises(RuntimeError, match="scores are not finite"):
        ju.localize(model, TensorDataset(x, y), batch_size=8, progress=False)
    assert_restored(model, saved, flags)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())  # grads not stored


# ---------------------------------------------------------------- importances (.grad is promised)


@pytest.mark.parametrize("per_sample", [False, True])
def test_importances_failure_keeps_grads_and_state(per_sample):
    model = Counting().net.train()
    x, y = _data()
    grads = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    saved, flags = _start(model)

    def batches():
        yield x[:8], y[:8]
        yield x[8:16], y[8:16]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ju.importances(model, batches(), per_sample=per_sample, progress=False)
    assert_restored(model, saved, flags)
    assert all(p.grad is grads[n] and torch.equal(p.grad, torch.full_like(p, 2.0)) for n, p in model.named_parameters())
