"""Comparison metrics of jit_unlearn.eval (zrf, js_divergence, activation_distance, layer_distance,
avg_gap) against transcriptions written here (scipy, explicit per-sample loops) and hand-computed values."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jit_unlearn.eval import activation_distance, avg_gap, js_divergence, layer_distance, zrf
from jit_unlearn.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")


class Constant(nn.Module):
    """Returns the same logits for every sample (one parameter, so it has a device)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float64))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


class Counting(nn.Module):
    """Wraps a model, counting forward calls and recording the training flag seen by each."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.modes = inner, 0, []

    def forward(self, x):
        self.calls += 1
        self.modes.append(self.training)
        return self.inner(x)


def nets(seed_a=0, seed_b=1, dropout=0.0):
    torch.manual_seed(seed_a)
    a = MLP(6, (16,), 5, dropout=dropout)
    torch.manual_seed(seed_b)
    b = MLP(6, (16,), 5, dropout=dropout)
    return a, b


def inputs(n=40, seed=2):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def probs(model, x):
    with torch.no_grad():
        return torch.softmax(model(x).double(), dim=-1).numpy()


def scipy_js_mean(p, q):
    # scipy's jensenshannon is the square root of the JS divergence; natural log by default.
    return float(np.mean([jensenshannon(p[i], q[i]) ** 2 for i in range(len(p))]))


def loop_activation_distance(p, q):
    total = 0.0
    for i in range(len(p)):
        total += math.sqrt(sum((float(p[i, k]) - float(q[i, k])) ** 2 for k in range(p.shape[1])))
    return total / len(p)


# ---------------------------------------------------------------- JS divergence and ZRF


def test_js_divergence_matches_scipy():
    a, b = nets()
    x, y = inputs()
    expected = scipy_js_mean(probs(a, x), probs(b, x))
    assert expected > 1e-3
    assert js_divergence(a, b, TensorDataset(x, y)) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert js_divergence(b, a, x) == pytest.approx(expected, rel=1e-9, abs=1e-12)  # symmetric


def test_zrf_is_one_minus_mean_js():
    a, b = nets()
    x, y = inputs()
    expected = 1.0 - scipy_js_mean(probs(a, x), probs(b, x))
    assert zrf(a, b, TensorDataset(x, y)) == pytest.approx(expected, rel=1e-9)


def test_js_hand_computed():
    # p = softmax(0, 0) = (1/2, 1/2), q = softmax(ln 3, 0) = (3/4, 1/4), m = (5/8, 3/8):
    # KL(p‖m) = ½ ln(4/5) + ½ ln(4/3) = 0.0322692...; KL(q‖m) = ¾ ln(6/5) + ¼ ln(2/3) = 0.0353748...
    p_model, q_model = Constant([0.0, 0.0]), Constant([math.log(3.0), 0.0])
    hand = 0.5 * (0.5 * math.log(0.8) + 0.5 * math.log(4 / 3) + 0.75 * math.log(1.2) + 0.25 * math.log(2 / 3))
    assert hand == pytest.approx(0.0338220, abs=1e-7)
    x = torch.zeros(7, 3)
    assert js_divergence(p_model, q_model, x) == pytest.approx(hand, rel=1e-12)
    assert zrf(p_model, q_model, x) == pytest.approx(1.0 - hand, rel=1e-12)


def test_js_extremes():
    a = Constant([40.0, -40.0])
    b = Constant([-40.0, 40.0])
    x = torch.zeros(5, 1)
    # Disjoint distributions: JS = ln 2 (to e^-80), ZRF = 1 - ln 2, activation distance √2.
    assert js_divergence(a, b, x) == pytest.approx(math.log(2.0), abs=1e-12)
    assert zrf(a, b, x) == pytest.approx(1.0 - math.log(2.0), abs=1e-12)
    assert activation_distance(a, b, x) == pytest.approx(math.sqrt(2.0), abs=1e-12)
    # Identical outputs: 0, and ZRF 1.
    same, _ = nets()
    xs, _ = inputs()
    assert js_divergence(same, same, xs) == pytest.approx(0.0, abs=1e-15)
    assert zrf(same, same, xs) == pytest.approx(1.0, abs=1e-15)
    assert activation_distance(same, same, xs) == 0.0


# ---------------------------------------------------------------- activation distance


def test_activation_distance_matches_loop():
    a, b = nets()
    x, y = inputs()
    expected = loop_activation_distance(probs(a, x), probs(b, x))
    assert expected > 1e-3
    assert activation_distance(a, b, TensorDataset(x, y)) == pytest.approx(expected, rel=1e-12)


def test_activation_distance_hand_computed():
    # (1/2, 1/2) vs (3/4, 1/4): ‖(-1/4, 1/4)‖ = √2 / 4.
    x = torch.zeros(3, 2)
    assert activation_distance(Constant([0.0, 0.0]), Constant([math.log(3.0), 0.0]), x) == pytest.approx(
        math.sqrt(2.0) / 4, rel=1e-12
    )


# ---------------------------------------------------------------- batching, inputs, modes


@pytest.mark.parametrize("metric", [js_divergence, zrf, activation_distance])
def test_batched_and_input_kinds(metric):
    a, b = nets()
    x, y = inputs(n=45)
    reference = metric(a, b, x)
    ca, cb = Counting(a), Counting(b)
    assert metric(ca, cb, x) == pytest.approx(reference, rel=1e-12)
    assert (ca.calls, cb.calls) == (1, 1)  # one batch of 45, never one sample at a time
    ca.calls = cb.calls = 0
    assert metric(ca, cb, TensorDataset(x, y), batch_size=8) == pytest.approx(reference, rel=1e-12)
    assert (ca.calls, cb.calls) == (6, 6)
    # A shuffling DataLoader: each batch goes through both models, so the pairs still match.
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert metric(a, b, loader) == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize("metric", [js_divergence, zrf, activation_distance])
def test_eval_mode_and_modes_restored(metric):
    a, b = nets(dropout=0.5)
    x, _ = inputs()
    ca, cb = Counting(a), Counting(b)
    ca.train()
    cb.eval()
    first = metric(ca, cb, x)
    assert metric(ca, cb, x) == first  # dropout off: deterministic
    assert not any(ca.modes) and not any(cb.modes)
    assert all(m.training for m in ca.modules()) and not any(m.training for m in cb.modules())
    assert all(p.grad is None for p in ca.parameters())


def test_float32_models_float64_result():
    a, b = nets()
    x, _ = inputs()
    expected = scipy_js_mean(probs(a, x), probs(b, x))
    a64, b64 = a.double(), b.double()
    assert js_divergence(a64, b64, x.double()) == pytest.approx(expected, rel=1e-6)


def test_compare_bad_inputs():
    a, b = nets()
    x, _ = inputs()
    with pytest.raises(TypeError, match="model_a"):
        js_divergence("a", b, x)
    with pytest.raises(TypeError, match="incompetent"):
        zrf(a, None, x)
    with pytest.raises(ValueError, match="model_b"):
        activation_distance(a, MLP(6, (16,), 7), x)
    with pytest.raises(ValueError, match="incompetent"):
        zrf(a, MLP(6, (16,), 3), x)
    with pytest.raises(ValueError, match="loader"):
        js_divergence(a, b, torch.zeros(0, 6))
    with pytest.raises(ValueError, match="forget"):
        zrf(a, b, DataLoader(TensorDataset(torch.zeros(0, 6)), batch_size=4))
    with pytest.raises(ValueError, match="batch_size"):
        js_divergence(a, b, x, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        activation_distance(a, b, DataLoader(TensorDataset(x), batch_size=4), batch_size=8)


# ---------------------------------------------------------------- layer distance


def test_layer_distance_matches_loop():
    a, b = nets()
    expected_layers = {}
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        flat_a, flat_b = pa.detach().double().flatten().tolist(), pb.detach().double().flatten().tolist()
        expected_layers[name] = math.sqrt(sum((u - v) ** 2 for u, v in zip(flat_a, flat_b)))
    expected = math.sqrt(sum(d * d for d in expected_layers.values()))
    assert layer_distance(a, b) == pytest.approx(expected, rel=1e-12)
    total, layers = layer_distance(a, b, per_layer=True)
    assert total == pytest.approx(expected, rel=1e-12)
    assert list(layers) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    for name in layers:
        assert layers[name] == pytest.approx(expected_layers[name], rel=1e-12)
    assert layer_distance(a, a) == 0.0


def test_layer_distance_hand_computed():
    a, b = Constant([0.0, 0.0, 0.0]), Constant([3.0, 0.0, -4.0])
    assert layer_distance(a, b) == 5.0
    assert layer_distance(a, b, per_layer=True) == (5.0, {"logits": 5.0})


def test_layer_distance_parameters_only():
    bn_a, bn_b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    bn_b.running_mean.fill_(7.0)  # a buffer, not a parameter
    with torch.no_grad():
        bn_b.weight.fill_(2.0)  # ‖(1, 1, 1)‖ = √3
    assert layer_distance(bn_a, bn_b) == pytest.approx(math.sqrt(3.0), rel=1e-15)


def test_layer_distance_bad_inputs():
    a, _ = nets()
    with pytest.raises(ValueError, match="model_b"):
        layer_distance(a, MLP(6, (16,), 7))
    with pytest.raises(ValueError, match="model_b"):
        layer_distance(a, MLP(6, (16, 16), 5))
    with pytest.raises(TypeError, match="model_b"):
        layer_distance(a, {"1.weight": 0})
    with pytest.raises(TypeError, match="per_layer"):
        layer_distance(a, a, per_layer=1)


# ---------------------------------------------------------------- average gap


def test_avg_gap_hand_computed():
    row = {
        "forget_acc": 0.10,
        "retain_acc": 0.90,
        "test_acc_remaining": 0.85,
        "entropy_mia": 0.30,
        "test_acc": 0.5,
        "loss_mia": None,
        "seconds": 3.0,
    }
    retrain = {
        "forget_acc": 0.0,
        "retain_acc": 0.95,
        "test_acc_remaining": 0.90,
        "entropy_mia": 0.20,
        "test_acc": 0.8,
        "loss_mia": None,
        "seconds": 9.0,
    }
    # |0.1| + |-0.05| + |-0.05| + |0.1| = 0.3, over 4 keys.
    assert avg_gap(row, retrain) == pytest.approx(0.075, abs=1e-15)
    assert avg_gap(row, retrain, keys=["test_acc"]) == pytest.approx(0.3, abs=1e-15)
    assert avg_gap(retrain, row) == avg_gap(row, retrain)
    assert avg_gap(row, row) == 0.0


def test_avg_gap_bad_inputs():
    row = {"forget_acc": 0.1, "retain_acc": 0.9, "test_acc_remaining": 0.8, "entropy_mia": None}
    full = dict(row, entropy_mia=0.2)
    with pytest.raises(ValueError, match=r"row\['entropy_mia'\]"):
        avg_gap(row, full)  # evaluate(mia=False) leaves the MIA None
    with pytest.raises(ValueError, match="retrain_row"):
        avg_gap(full, {"forget_acc": 0.0})
    with pytest.raises(ValueError, match="keys"):
        avg_gap(full, full, keys=[])
    with pytest.raises(ValueError, match="keys"):
        avg_gap(full, full, keys="forget_acc")
    with pytest.raises(TypeError, match="row"):
        avg_gap([0.1], full)
    with pytest.raises(ValueError, match="nan"):
        avg_gap(dict(full, retain_acc=float("nan")), full)
