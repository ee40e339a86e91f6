"""Tests for SSD, LF-SSD and ASSD: the dampening rule against the published per-tensor formula, whole
runs against an independent transcription of the published procedure, the importance cache,
argument checks, and real forgetting on the digits data."""

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
import published
from jit_unlearn.data import digits
from jit_unlearn.importance import Importances, importances
from jit_unlearn.models import MLP, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_cnn(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(width=4, num_classes=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _data(n=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------- dampening rule


def _random_imps(model, seed):
    g = torch.Generator().manual_seed(seed)
    f, d = {}, {}
    for n, p in model.named_parameters():
        f[n] = torch.rand(p.shape, generator=g, dtype=p.dtype) ** 4
        d[n] = torch.rand(p.shape, generator=g, dtype=p.dtype) ** 4 * 0.2
        zero = torch.rand(p.shape, generator=g) < 0.1
        d[n][zero] = 0.0  # I_D = 0 < I_f: selected and zeroed
        f[n][torch.rand(p.shape, generator=g) < 0.1] = 0.0  # I_f = 0: never selected
    return f, d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha,lam,exponent", [(10.0, 1.0, 1.0), (2.0, 0.5, 1.0), (0.5, 3.0, 2.0)])
def test_dampen_bitwise_equals_published_formula(dtype, alpha, lam, exponent, backend):
    model = _bn_cnn().to(dtype)
    f, d = _random_imps(model, 1)
    expected = copy.deepcopy(model)
    published.modify_weight(expected, d, f, alpha, lam, exponent)
    selected = ju.dampen_(model, f, d, alpha=alpha, lam=lam, exponent=exponent)
    for (n, p), q in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), n
        assert selected[n] == int((f[n] > d[n] * alpha).sum())
    assert sum(selected.values()) > 0


def test_dampen_fractional_exponent_close():
    model = _bn_cnn()
    f, d = _random_imps(model, 2)
    expected = copy.deepcopy(model)
    published.modify_weight(expected, d, f, 3.0, 1.0, 0.5)
    ju.dampen_(model, f, d, alpha=3.0, exponent=0.5)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-7, atol=0)


def test_dampen_never_writes_nan_or_inf():
    model = _bn_cnn()
    g = torch.Generator().manual_seed(3)
    values = torch.tensor([0.0, 1e-45, 1e-30, 1.0, 1e30, 3.4e38])
    f, d = {}, {}
    for n, p in model.named_parameters():
        f[n] = values[torch.randint(0, 6, p.shape, generator=g)]
        d[n] = values[torch.randint(0, 6, p.shape, generator=g)]
    for alpha, lam, exponent in [(1e-3, 1e6, 1.0), (10.0, 1.0, -2.0), (1e-30, 1e30, 3.0), (1.0, 0.0, 0.0)]:
        ju.dampen_(model, f, d, alpha=alpha, lam=lam, exponent=exponent)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # all-zero full importances: every element with I_f > 0 is zeroed, finite
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    counts = ju.dampen_(model, ones, zeros, alpha=10.0)
    assert all(int(torch.count_nonzero(p)) == 0 for p in model.parameters())
    assert counts == {n: p.numel() for n, p in model.named_parameters()}
    # all-zero forget importances: nothing moves
    before = _state(model)
    assert sum(ju.dampen_(model, zeros, ones, alpha=10.0).values()) == 0
    _assert_same_state(model, before)


def test_dampen_refuses_bad_importances_without_change():
    model = _bn_cnn()
    f, d = _random_imps(model, 4)
    before = _state(model)
    for bad_value in (float("nan"), float("inf"), -1.0):
        bad = dict(f)
        bad["fc.weight"] = f["fc.weight"].clone()
        bad["fc.weight"][0, 0] = bad_value
        with pytest.raises(ValueError, match=r"imp_forget: holds NaN, inf or negative values in \['fc.weight'\]"):
            ju.dampen_(model, bad, d, alpha=10.0)
    with pytest.raises(ValueError, match="alpha: must be > 0"):
        ju.dampen_(model, f, d, alpha=0.0)
    with pytest.raises(ValueError, match="lam: must be >= 0"):
        ju.dampen_(model, f, d, alpha=1.0, lam=-1.0)
    with pytest.raises(ValueError, match="alpha: must be finite"):
        ju.dampen_(model, f, d, alpha=float("nan"))
    other = {n: t for n, t in d.items() if n != "fc.bias"}
    with pytest.raises(ValueError, match=r"imp_full: made for another model \(missing parameters \['fc.bias'\]"):
        ju.dampen_(model, f, other, alpha=10.0)
    with pytest.raises(ValueError, match="imp_full: kind 'output_norm' differs"):
        ju.dampen_(model, Importances(f, kind="fisher"), Importances(d, kind="output_norm"), alpha=10.0)
    _assert_same_state(model, before)


# ---------------------------------------------------------------- whole runs against the transcription


@pytest.mark.parametrize("alpha,lam", [(10.0, 1.0), (1.5, 0.7)])
def test_ssd_bn_cnn_bitwise_equals_published(alpha, lam, backend):
    x, y = _data()
    forget_idx = y == 1
    model = _bn_cnn()
    model.train()  # SSD switches to eval itself and restores the flags
    reference = copy.deepcopy(model)
    forget = DataLoader(TensorDataset(x[forget_idx], y[forget_idx]), batch_size=4)
    full = DataLoader(TensorDataset(x, y), batch_size=16)
    counted = copy.deepcopy(model).eval()  # the selection counted independently, from the transcription
    f, d = published.calc_importance(counted, forget), published.calc_importance(counted, full)
    expected = {n: int((f[n] > d[n].mul(alpha)).sum()) for n in f}
    report = ju.ssd(model, forget, full, alpha=alpha, lam=lam, progress=False)
    published.ssd(reference, forget, full, alpha, lam)
    assert model.training
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n
    for (n, b), c in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), n
    assert report.alpha == alpha and report.lam == lam and report.method == "ssd"
    assert report.selected == expected and report.total_selected == sum(expected.values()) > 0
    assert report.total_elements == sum(p.numel() for p in model.parameters())


class _Slow:
    """Batches of a DataLoader, each handed out after `delay` seconds."""

    def __init__(self, loader, delay):
        self.loader, self.delay = loader, delay

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def test_report_times_each_phase(monkeypatch):
    # known delays in each phase: the importance passes wait 0.05 s per batch (5 batches), the
    # dampening 0.1 s;
    # each phase's time covers its delay, and the total lies within the caller's own clock
    x, y = _data(seed=13)
    forget = _Slow(DataLoader(TensorDataset(x[y == 1], y[y == 1]), batch_size=8), 0.05)
    full = _Slow(DataLoader(TensorDataset(x, y), batch_size=16), 0.05)
    real = ju.ops.ssd_dampen_

    def slow_dampen(*args):
        time.sleep(0.1)
        return real(*args)

    monkeypatch.setattr(ju.ops, "ssd_dampen_", slow_dampen)
    start = time.perf_counter()
    report = ju.ssd(_bn_cnn(9), forget, full, progress=False)
    elapsed = time.perf_counter() - start
    assert len(forget) + len(full) == 5 and report.importance_seconds >= 0.05 * 5
    assert report.dampen_seconds >= 0.1
    assert report.importance_seconds + report.dampen_seconds <= report.seconds <= elapsed


def test_lf_ssd_on_unlabeled_tensors_bitwise_equals_published():
    x, y = _data(seed=5)
    model = _bn_cnn(1)
    reference = copy.deepcopy(model)
    x_forget = x[y == 2]
    report = ju.lf_ssd(model, x_forget, x, alpha=1.5, batch_size=8, progress=False)
    published.ssd(
        reference,
        DataLoader(TensorDataset(x_forget), batch_size=8),
        DataLoader(TensorDataset(x), batch_size=8),
        1.5,
        1.0,
        label_free=True,
    )
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n
    assert report.forget_importances.kind == "output_norm" and report.total_selected > 0


def test_per_sample_ssd_matches_published_with_batches_of_one():
    x, y = _data(n=20, seed=6)
    model = _bn_cnn(2).double()
    reference = copy.deepcopy(model)
    forget_idx = y == 0
    xd = x.double()
    ju.ssd(
        model,
        TensorDataset(xd[forget_idx], y[forget_idx]),
        TensorDataset(xd, y),
        alpha=3.0,
        per_sample=True,
        batch_size=7,
        progress=False,
    )
    # with batches of one sample, the published batch average is the per-sample average
    published.ssd(
        reference,
        DataLoader(TensorDataset(xd[forget_idx], y[forget_idx]), batch_size=1),
        DataLoader(TensorDataset(xd, y), batch_size=1),
        3.0,
        1.0,
    )
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- ASSD


def _finite_ratios(f, d):
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.concatenate([(f[n].numpy() / d[n].numpy()).ravel() for n in f])
    return ratios[np.isfinite(ratios)].astype(np.float64)


def test_assd_alpha_against_numpy():
    model = _bn_cnn(3)
    f, d = _random_imps(model, 7)
    d["fc.bias"][:] = 0.0
    f["fc.bias"][0] = 0.0  # 0 / 0 = NaN and x / 0 = inf are left out
    ratios = _finite_ratios(f, d)
    for n_forget, n_full in [(10, 1000), (1, 50000), (300, 400)]:
        percentile = 100 - np.log(1 + 100 * n_forget / n_full)
        expected = np.percentile(ratios, percentile)
        assert ju.assd_alpha(f, d, n_forget, n_full) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="n_forget"):
        ju.assd_alpha(f, d, 0, 10)
    zeros = {n: torch.zeros_like(t) for n, t in f.items()}
    with pytest.raises(ValueError, match="no finite ratio"):
        ju.assd_alpha(zeros, zeros, 1, 10)


def test_assd_runs_ssd_with_the_adaptive_alpha():
    x, y = _data(seed=8)
    model = _bn_cnn(4)
    reference = copy.deepcopy(model)
    forget = DataLoader(TensorDataset(x[y == 3], y[y == 3]), batch_size=5)
    full = DataLoader(TensorDataset(x, y), batch_size=9)
    report = ju.assd(model, forget, full, progress=False)
    reference.eval()
    f = published.calc_importance(reference, forget)
    d = published.calc_importance(reference, full)
    n_forget = int((y == 3).sum())
    alpha = np.percentile(_finite_ratios(f, d), 100 - np.log(1 + 100 * n_forget / 45))
    assert report.alpha == pytest.approx(alpha, rel=1e-6) and report.lam == 1.0
    published.modify_weight(reference, d, f, report.alpha, 1.0)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- importance cache


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cached_full_importances_round_trip(tmp_path, suffix):
    x, y = _data(seed=9)
    base = _bn_cnn(5)
    forget = DataLoader(TensorDataset(x[y == 1], y[y == 1]), batch_size=4)
    full = DataLoader(TensorDataset(x, y), batch_size=16)
    direct = copy.deepcopy(base)
    report = ju.ssd(direct, forget, full, progress=False)
    path = tmp_path / f"full{suffix}"
    report.full_importances.save(path)
    cached = copy.deepcopy(base)
    again = ju.ssd(cached, forget, full_importances=Importances.load(path, cached), progress=False)
    for p, q in zip(direct.parameters(), cached.parameters()):
        assert torch.equal(p, q)
    assert again.selected == report.selected
    assert again.full_importances.num_samples == 45


def test_cache_refusals_leave_model_unchanged(tmp_path):
    x, y = _data(seed=10)
    forget = DataLoader(TensorDataset(x[y == 1], y[y == 1]), batch_size=4)
    full = DataLoader(TensorDataset(x, y), batch_size=16)
    fisher = importances(_bn_cnn(6), full, progress=False)
    other = SmallCNN(width=5, num_classes=4)
    before = _state(other)
    mismatch = r"full_importances: made for another model \(shape mismatch \['features.0.weight'"
    with pytest.raises(ValueError, match=mismatch):
        ju.ssd(other, forget, full_importances=fisher, progress=False)
    _assert_same_state(other, before)
    model = _bn_cnn(6)
    before = _state(model)
    with pytest.raises(ValueError, match="full_importances: kind 'fisher', but lf_ssd needs 'output_norm'"):
        ju.lf_ssd(model, forget, full_importances=fisher, progress=False)
    with pytest.raises(ValueError, match="full_importances: per_sample=False"):
        ju.ssd(model, forget, full_importances=fisher, per_sample=True, progress=False)
    # a cache saved from another training run of the same architecture
    path = tmp_path / "full.pt"
    importances(_bn_cnn(11), full, progress=False).save(path)
    with pytest.raises(ValueError, match="computed on other weights"):
        ju.ssd(model, forget, full_importances=Importances.load(path, model), progress=False)
    _assert_same_state(model, before)


# ---------------------------------------------------------------- bad arguments and failures


def test_bad_arguments_leave_model_unchanged():
    x, y = _data(seed=11)
    model = _bn_cnn(7)
    before = _state(model)
    forget = DataLoader(TensorDataset(x[:5], y[:5]), batch_size=4)
    full = DataLoader(TensorDataset(x, y), batch_size=16)
    cases = [
        (dict(alpha=0.0), ValueError, "alpha: must be > 0"),
        (dict(alpha=-1.0), ValueError, "alpha: must be > 0"),
        (dict(lam=-0.5), ValueError, "lam: must be >= 0"),
        (dict(alpha=True), TypeError, "alpha: expected a real number"),
        (dict(per_sample="yes"), TypeError, "per_sample"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ju.ssd(model, forget, full, progress=False, **kwargs)
    with pytest.raises(ValueError, match="forget: yields no batches"):
        ju.ssd(model, iter([]), full, progress=False)
    with pytest.raises(ValueError, match="full: yields no batches"):
        ju.ssd(model, forget, DataLoader(TensorDataset(x[:0], y[:0])), progress=False)
    with pytest.raises(ValueError, match="forget: batches carry no labels"):
        ju.ssd(model, x[:5], full, progress=False)
    with pytest.raises(ValueError, match="full: batches carry no labels"):
        ju.assd(model, forget, x, progress=False)
    with pytest.raises(ValueError, match="full: required unless full_importances"):
        ju.ssd(model, forget, progress=False)
    with pytest.raises(ValueError, match="batch_size: cannot re-batch a DataLoader"):
        ju.ssd(model, forget, full, batch_size=3, progress=False)
    _assert_same_state(model, before)


def test_failure_mid_run_restores_model():
    x, y = _data(seed=12)
    model = _bn_cnn(8)
    before = _state(model)

    def failing():
        yield x[:8], y[:8]
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        ju.ssd(model, DataLoader(TensorDataset(x[:4], y[:4])), failing(), progress=False)
    _assert_same_state(model, before)


def test_overflowing_gradients_are_refused():
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    x = torch.full((4, 2), 1e8)
    before = _state(model)
    with pytest.raises(ValueError, match="forget: importances hold NaN or inf"):
        ju.lf_ssd(model, x, x, progress=False)
    _assert_same_state(model, before)


# ---------------------------------------------------------------- real forgetting on digits


@pytest.fixture(scope="module")
def digits_mlp():
    """MLP(64 -> 64 -> 10) trained full-batch on 1400 digits (150 Adam steps, about a second)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = digits().tensors
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = MLP(64, (64,), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    model.eval()
    torch.set_num_threads(saved)
    return model, (x[train], y[train]), (x[test], y[test])


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# Class 5 of digits, forget = every training sample of it, full = the whole training split,
# batches of 64.  alpha = 10, lam = 1 are the published ResNet defaults and work here for SSD
# and LF-SSD; ASSD chooses its own alpha.
@pytest.mark.parametrize("method", ["ssd", "lf_ssd", "assd"])
def test_full_class_forgetting_on_digits(digits_mlp, method):
    trained, (xtr, ytr), (xte, yte) = digits_mlp
    model = copy.deepcopy(trained)
    cls = 5
    f = ytr == cls
    assert _accuracy(model, xtr[f], ytr[f]) > 0.99
    retain_before = _accuracy(model, xtr[~f], ytr[~f])
    test_before = _accuracy(model, xte[yte != cls], yte[yte != cls])
    forget = DataLoader(TensorDataset(xtr[f], ytr[f]), batch_size=64)
    full = DataLoader(TensorDataset(xtr, ytr), batch_size=64)
    if method == "ssd":
        report = ju.ssd(model, forget, full, alpha=10.0, lam=1.0, progress=False)
    elif method == "lf_ssd":
        report = ju.lf_ssd(model, xtr[f], xtr, alpha=10.0, lam=1.0, batch_size=64, progress=False)
    else:
        report = ju.assd(model, forget, full, progress=False)
    assert _accuracy(model, xtr[f], ytr[f]) <= 0.1, report
    assert _accuracy(model, xtr[~f], ytr[~f]) >= retain_before - 0.03
    assert _accuracy(model, xte[yte != cls], yte[yte != cls]) >= test_before - 0.03
    assert 0 < report.selected_fraction < 0.05
