"""Tests for jit_unlearn.importances: hand-computed values, the published batch semantics, per-sample
gradients against a per-sample backward loop, and the on-disk cache."""

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
import oracles
import published
from jit_unlearn.importance import Importances, importances, model_fingerprint, weights_digest
from jit_unlearn.models import MLP, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


def _line(w: float, b: float) -> nn.Linear:
    m = nn.Linear(1, 1).double()
    with torch.no_grad():
        m.weight.fill_(w)
        m.bias.fill_(b)
    return m


def _loader(x, y=None, batch_size=2):
    data = TensorDataset(x) if y is None else TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size)


# ---------------------------------------------------------------- hand computation


def test_output_norm_by_hand_batch_and_per_sample():
    # f(x) = w x + b with w = 0.5, b = -1; loss = mean_i f(x_i)^2, so dL/dw = mean 2 r x, dL/db = mean 2 r.
    # Batches [1, 2] and [3]: residuals -0.5, 0 | 0.5.  Batch 1: dw = -0.5, db = -0.5; batch 2: dw = 3, db = 1.
    model = _line(0.5, -1.0)
    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    imp = importances(model, _loader(x), kind="output_norm", progress=False)
    assert imp["weight"].item() == pytest.approx((0.5 + 3.0) / 2, abs=1e-15)
    assert imp["bias"].item() == pytest.approx((0.5 + 1.0) / 2, abs=1e-15)
    assert (imp.kind, imp.per_sample, imp.num_samples, imp.num_batches) == ("output_norm", False, 3, 2)
    # per sample: g_w = 2 r x = -1, 0, 3; g_b = 2 r = -1, 0, 1
    ps = importances(model, _loader(x), kind="output_norm", per_sample=True, progress=False)
    assert ps["weight"].item() == pytest.approx(4.0 / 3, abs=1e-15)
    assert ps["bias"].item() == pytest.approx(2.0 / 3, abs=1e-15)
    assert (ps.per_sample, ps.num_samples, ps.num_batches) == (True, 3, 2)


@pytest.mark.parametrize("per_sample", [False, True])
def test_fisher_by_hand(per_sample):
    # Logits z = W x + b with W = 0, b = 0: softmax = (1/2, 1/2), dCE/dz = (p - onehot(y)).
    # y = 0 -> dz = (-1/2, 1/2); y = 1 -> dz = (1/2, -1/2); dW = dz x, db = dz.
    model = nn.Linear(1, 2).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    imp = importances(model, _loader(x, y), per_sample=per_sample, progress=False)
    if per_sample:  # samples: dW = +-(0.5, 1, 1.5), db = +-0.5
        w, b = (0.25 + 1.0 + 2.25) / 3, 0.25
    else:  # batch 1 mean: dW = (0.25, -0.25), db = 0; batch 2: dW = (-1.5, 1.5), db = (-0.5, 0.5)
        w, b = (0.0625 + 2.25) / 2, 0.25 / 2
    torch.testing.assert_close(imp["weight"], torch.full((2, 1), w, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(imp["bias"], torch.full((2,), b, dtype=torch.float64), rtol=0, atol=1e-15)


# ---------------------------------------------------------------- published batch semantics


@pytest.mark.parametrize("kind", ["fisher", "output_norm"])
def test_batch_pass_equals_published_bitwise(kind, backend):
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x, y = torch.randn(37, 1, 8, 8), torch.randint(0, 10, (37,))  # partial last batch weighs as much
    loader = _loader(x, y, batch_size=16)
    expected = published.calc_importance(model, loader, label_free=kind == "output_norm")
    model.zero_grad(set_to_none=True)
    imp = importances(model, loader, kind=kind, progress=False)
    assert list(imp) == list(expected)
    for n in expected:
        assert torch.equal(imp[n], expected[n]), n
    assert imp.num_batches == 3 and imp.num_samples == 37


def test_eval_mode_buffers_and_grads_untouched():
    torch.manual_seed(1)
    model = SmallCNN(width=4)
    model.train()
    model.fc.eval()  # a module-level mix that must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sentinel = torch.full_like(model.fc.bias, 7.0)
    model.fc.bias.grad = sentinel
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    for per_sample in (False, True):
        importances(model, _loader(x, y, 4), per_sample=per_sample, progress=False)
    assert model.training and model.features.training and not model.fc.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics were not updated
    assert model.fc.bias.grad is sentinel and model.fc.weight.grad is None


def test_parameters_without_gradient_get_zero():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 3)
            self.frozen = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.frozen(torch.relu(self.body(x)))

    torch.manual_seed(0)
    model = TwoHeads()
    model.frozen.requires_grad_(False)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for per_sample in (False, True):
        imp = importances(model, _loader(x, y, 4), per_sample=per_sample, progress=False)
        assert list(imp) == [n for n, _ in model.named_parameters()]
        for n in ("frozen.weight", "frozen.bias", "unused.weight", "unused.bias"):
            assert torch.count_nonzero(imp[n]) == 0, n
        assert torch.count_nonzero(imp["body.weight"]) > 0


def test_label_free_never_reads_labels():
    torch.manual_seed(0)
    model = MLP(8, (5,), 3)
    x = torch.randn(9, 8)
    bare = importances(model, x, kind="output_norm", batch_size=4, progress=False)
    odd_labels = ((x[i : i + 4], ["not", "a", "label"]) for i in range(0, 9, 4))
    tupled = importances(model, odd_labels, kind="output_norm", progress=False)
    for n in bare:
        assert torch.equal(bare[n], tupled[n])
    assert bare.num_batches == 3 and bare.num_samples == 9


# ---------------------------------------------------------------- per-sample (SSD-Det)


class _Awkward(nn.Module):
    """Linear layers the outer-product shortcut cannot take: one called twice, one fed [1, T, d]
    per sample, one never called."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 3)
        self.never = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h)) + torch.tanh(self.b(0.5 * h))
        return self.c(h.view(h.shape[0], 1, 5)).squeeze(1)


class _ConvZoo(nn.Module):
    """BatchNorm1d on [B, C] and [B, C, L], BatchNorm2d and Linear layers between convolutions of
    many kinds: strided, dilated, asymmetrically padded with bias, grouped, reflect-padded, and
    one called twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=(2, 1), dilation=(1, 2), bias=True)
        self.bn2d = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.twice = nn.Conv2d(4, 4, 1)
        self.reflect = nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect")
        self.bn1d_seq = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, 5)
        self.bn1d = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.bn2d(self.c1(x)))
        h = torch.tanh(self.grouped(h))
        h = self.twice(torch.tanh(self.twice(h)))
        h = self.reflect(h).flatten(2)  # [B, 3, L]
        h = torch.tanh(self.bn1d_seq(h)).mean(2)
        return self.head(torch.tanh(self.bn1d(self.fc(h))))


@pytest.mark.parametrize("kind", ["fisher", "output_norm"])
@pytest.mark.parametrize("arch", ["mlp", "bn_cnn", "conv_zoo", "awkward"])
def test_per_sample_equals_backward_loop(arch, kind):
    torch.manual_seed(2)
    if arch == "mlp":
        model, x = MLP(16, (12, 8), 3), torch.randn(23, 16)
    elif arch in ("bn_cnn", "conv_zoo"):
        model, x = (
            (SmallCNN(width=4, num_classes=3), torch.randn(23, 1, 8, 8))
            if arch == "bn_cnn"
            else (_ConvZoo(), torch.randn(23, 2, 9, 7))
        )
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    else:
        model, x = _Awkward(), torch.randn(23, 6)
    model = model.double()
    x = x.double()
    y = torch.randint(0, 3, (23,))
    expected = oracles.per_sample_importances(model, x, y, kind)
    # a small budget forces several chunks per batch
    imp = importances(model, _loader(x, y, 10), kind=kind, per_sample=True, progress=False, max_batch_elems=300)
    for n in expected:
        torch.testing.assert_close(imp[n], expected[n], rtol=1e-10, atol=1e-14, msg=n)
    # and it does not depend on the batching
    other = importances(model, _loader(x, y, 23), kind=kind, per_sample=True, progress=False)
    for n in expected:
        torch.testing.assert_close(other[n], imp[n], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("bad", ["nan", "label"])
def test_per_sample_names_a_late_bad_batch(bad):
    """Small batches run together once the first batch has shown K; each batch is still checked as
    it is read, so a bad one deep in the data is named by its own index."""
    torch.manual_seed(5)
    model = MLP(8, (6,), 3)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    if bad == "nan":
        x[22, 1] = float("nan")
        message = r"loader: batch 5 \(counting from 0\) holds NaN or inf"
    else:
        y[21] = 3
        message = r"loader: batch 5 \(counting from 0\): label 3 is outside \[0, 3\)"
    with pytest.raises(ValueError, match=message):
        importances(model, _loader(x, y, 4), per_sample=True, progress=False)


def test_per_sample_float32_matches_batch_size_one():
    torch.manual_seed(3)
    model = MLP(64, (32,), 10)
    x, y = torch.randn(40, 64), torch.randint(0, 10, (40,))
    ps = importances(model, _loader(x, y, 16), per_sample=True, progress=False)
    ones = importances(model, _loader(x, y, 1), progress=False)  # batch mean over one sample each
    for n in ps:
        torch.testing.assert_close(ps[n], ones[n], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- Importances container and cache


def _small_imp():
    torch.manual_seed(4)
    model = MLP(8, (6,), 3)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    return model, importances(model, _loader(x, y, 5), progress=False)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    model, imp = _small_imp()
    path = tmp_path / f"imp{suffix}"
    imp.save(path)
    back = Importances.load(path, model)
    assert list(back) == list(imp)
    for n in imp:
        assert torch.equal(back[n], imp[n])
    assert (back.kind, back.per_sample, back.num_samples, back.num_batches) == ("fisher", False, 12, 3)
    assert back.fingerprint == imp.fingerprint == model_fingerprint(model)
    assert back.weights == imp.weights == weights_digest(model)
    assert not back.invalid


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_refuses_another_model(tmp_path, suffix):
    _, imp = _small_imp()
    path = tmp_path / f"imp{suffix}"
    imp.save(path)
    mismatch = r"path: made for another model \(shape mismatch \['1\.weight': importances \(6, 8\) vs model \(7, 8\)"
    with pytest.raises(ValueError, match=mismatch):
        Importances.load(path, MLP(8, (7,), 3))
    with pytest.raises(ValueError, match=r"missing parameters \['5\.weight', '5\.bias'\]"):
        Importances.load(path, MLP(8, (6, 6), 3))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_refuses_other_weights(tmp_path, suffix):
    """A cache from another training run of the same architecture (same names and shapes) is refused:
    the file records a digest of the parameter values the importances were computed on."""
    model, imp = _small_imp()
    path = tmp_path / f"imp{suffix}"
    imp.save(path)
    message = r"path: .* holds importances computed on other weights than the model's"
    torch.manual_seed(5)
    with pytest.raises(ValueError, match=message):
        Importances.load(path, MLP(8, (6,), 3))  # another initialisation
    nudged = copy.deepcopy(model)
    with torch.no_grad():  # one element one ulp away
        w = nudged[1].weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    with pytest.raises(ValueError, match=message):
        Importances.load(path, nudged)
    # the same weights in another module object pass; check_weights=False accepts the changed model
    assert Importances.load(path, copy.deepcopy(model)).weights == imp.weights
    back = Importances.load(path, nudged, check_weights=False)
    assert all(torch.equal(back[n], imp[n]) for n in imp)
    with pytest.raises(ValueError, match="cache: computed on other weights"):
        imp.check_weights(nudged, name="cache")
    Importances(dict(imp), kind="fisher").check_weights(nudged)  # no digest recorded: nothing to compare


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_refuses_format_version_1(tmp_path, suffix):
    """Files written before the weights digest existed are refused with a request to recompute them."""
    model, imp = _small_imp()
    path = tmp_path / f"old{suffix}"
    tensors = {n: t.contiguous() for n, t in imp.items()}
    meta = {"kind": "fisher", "per_sample": False, "num_samples": 12, "num_batches": 3}
    if suffix == ".pt":
        blob = {"format": "jit_unlearn.importances", "version": 1, **meta, "fingerprint": imp.fingerprint}
        torch.save({**blob, "tensors": tensors}, path)
    else:
        from safetensors.torch import save_file

        header = {k: str(int(v) if isinstance(v, bool) else v) for k, v in meta.items()}
        header.update(format="jit_unlearn.importances", version="1", fingerprint=imp.fingerprint)
        save_file(tensors, path, metadata={**header, "names": json.dumps(list(tensors))})
    with pytest.raises(ValueError, match="format version 1, which records no digest .* recompute the importances"):
        Importances.load(path, model)


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(MLP(8, (6,), 3).state_dict(), path)
    with pytest.raises(ValueError, match="not a jit_unlearn importances file"):
        Importances.load(path)
    from safetensors.torch import save_file

    path = tmp_path / "state.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a jit_unlearn importances file"):
        Importances.load(path)


def test_check_and_invalid_values():
    model, imp = _small_imp()
    imp.check(model)
    with pytest.raises(ValueError, match=r"cache: made for another model .*parameters the model does not have"):
        imp.check(nn.Sequential(nn.Flatten(), nn.Linear(8, 6)), name="cache")
    bad = dict(imp)
    bad["1.weight"] = imp["1.weight"].clone()
    bad["1.weight"][0, 0] = float("nan")
    bad["3.bias"] = -imp["3.bias"] - 1
    assert Importances(bad, kind="fisher").invalid == ["1.weight", "3.bias"]


def test_bad_arguments():
    model = MLP(8, (6,), 3)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="kind"):
        importances(model, _loader(x, y), kind="hessian", progress=False)
    with pytest.raises(ValueError, match="loader: yields no batches"):
        importances(model, iter([]), progress=False)
    with pytest.raises(ValueError, match="loader: yields no batches"):
        importances(model, _loader(x[:0], y[:0]), per_sample=True, progress=False)
    with pytest.raises(ValueError, match="loader: batches carry no labels"):
        importances(model, x, progress=False)
    with pytest.raises(ValueError, match="max_batch_elems"):
        importances(model, _loader(x, y), per_sample=True, max_batch_elems=0, progress=False)
    with pytest.raises(TypeError, match="per_sample"):
        importances(model, _loader(x, y), per_sample=1, progress=False)
    frozen = MLP(8, (6,), 3).requires_grad_(False)
    with pytest.raises(ValueError, match="model: has no parameter that requires grad"):
        importances(frozen, _loader(x, y), progress=False)


def test_public_names():
    assert ju.importances is importances and ju.Importances is Importances


def test_callers_grads_restored_when_the_pass_fails():
    model = MLP(8, (6,), 3)
    saved = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = saved[n]

    def batches():
        yield torch.randn(4, 8), torch.randint(0, 3, (4,))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        importances(model, batches(), progress=False)
    assert all(p.grad is saved[n] for n, p in model.named_parameters())
