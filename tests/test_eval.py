"""Metrics of jit_unlearn.eval against independent transcriptions: accuracy, entropy MIA, loss MIA, evaluate."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from conftest import requires_cuda
from jit_unlearn import data, models
from jit_unlearn.eval import Recipe, Splits, accuracy, entropy_mia, evaluate, full_class, loss_mia, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_setup():
    """A BatchNorm CNN trained on a small digits subset, so retain is fitted and test is not."""
    ds = data.digits(image=True)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(ds), generator=g).tolist()
    retain, forget, test = Subset(ds, perm[:150]), Subset(ds, perm[150:210]), Subset(ds, perm[210:330])
    torch.manual_seed(0)
    model = models.SmallCNN(in_channels=1, num_classes=10, width=8)
    train(
        model,
        torch.utils.data.ConcatDataset([retain, Subset(ds, perm[150:180])]),
        Recipe(epochs=25, lr=0.05, batch_size=16),
    )
    return model.eval(), retain, forget, test


@pytest.fixture(scope="module")
def published_value(digits_setup):
    return _published_entropy_mia(*digits_setup)


# ---------------------------------------------------------------- transcriptions of the published code


def _collect_prob_one_at_a_time(model, ds):
    loader = DataLoader(ds, batch_size=1, shuffle=False)
    prob = []
    with torch.no_grad():
        for x, _ in loader:
            prob.append(F.softmax(model(x), dim=-1).data)
    return torch.cat(prob)


def _published_entropy(p):
    return -torch.where(p > 0, p * p.log(), p.new([0.0])).sum(dim=-1)


def _multinomial_balanced_lr_predict(x_train, y_train, x_eval):
    """Two-class softmax regression, one weight row and intercept per class, L2 penalty 1/2 ||W||^2
    on the rows (C = 1), balanced sample weights n / (2 n_c): the published attack's classifier."""
    x_train, x_eval = x_train.astype(np.float64), x_eval.astype(np.float64)
    y = y_train.astype(int)
    w_class = len(y) / (2 * np.bincount(y, minlength=2))
    sw = w_class[y]

    def objective(theta):
        W, b = theta[:2].reshape(2, 1), theta[2:]
        z = x_train @ W.T + b
        lse = logsumexp(z, axis=1)
        loss = np.sum(sw * (lse - z[np.arange(len(y)), y])) + 0.5 * np.sum(W**2)
        p = np.exp(z - lse[:, None])
        p[np.arange(len(y)), y] -= 1.0
        g = sw[:, None] * p
        return loss, np.concatenate([(g.T @ x_train).ravel() + W.ravel(), g.sum(0)])

    res = minimize(
        objective, np.zeros(4), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000}
    )
    W, b = res.x[:2].reshape(2, 1), res.x[2:]
    return np.argmax(x_eval @ W.T + b, axis=1)


def _published_entropy_mia(model, retain, forget, test):
    r = _collect_prob_one_at_a_time(model, retain)
    f = _collect_prob_one_at_a_time(model, forget)
    t = _collect_prob_one_at_a_time(model, test)
    x_r = torch.cat([_published_entropy(r), _published_entropy(t)]).cpu().numpy().reshape(-1, 1)
    y_r = np.concatenate([np.ones(len(r)), np.zeros(len(t))])
    x_f = _published_entropy(f).cpu().numpy().reshape(-1, 1)
    return _multinomial_balanced_lr_predict(x_r, y_r, x_f).mean()


def _kit_losses_one_at_a_time(model, ds):
    out = []
    with torch.no_grad():
        for i in range(len(ds)):
            x, y = ds[i]
            out.append(F.cross_entropy(model(x.unsqueeze(0)), torch.as_tensor([y])).item())
    return np.array(out)


def _kit_loss_mia(forget_losses, test_losses, n_splits, seed):
    n = min(len(forget_losses), len(test_losses))
    rng = np.random.default_rng(seed)
    if len(forget_losses) > n:
        forget_losses = forget_losses[rng.permutation(len(forget_losses))[:n]]
    if len(test_losses) > n:
        test_losses = test_losses[rng.permutation(len(test_losses))[:n]]
    x = np.concatenate([test_losses, forget_losses]).reshape(-1, 1)
    y = np.array([0] * n + [1] * n)
    scores = []
    for tr, te in StratifiedShuffleSplit(n_splits=n_splits, random_state=seed).split(x, y):
        clf = LogisticRegression().fit(x[tr], y[tr])
        scores.append(np.mean(clf.predict(x[te]) == y[te]))
    return float(np.mean(scores))


# ---------------------------------------------------------------- accuracy


def test_accuracy_is_weighted_by_samples_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    buffers = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        model.eval()
        expected = (model(x).argmax(1) == y).sum().item() / 50
        model.train()
    # batches of 7: the last one holds 1 sample and must weigh 1/50, not 1/8 of the result
    got = accuracy(model, DataLoader(TensorDataset(x, y), batch_size=7))
    assert got == pytest.approx(expected, abs=1e-12)
    assert accuracy(model, TensorDataset(x, y), batch_size=3) == pytest.approx(expected, abs=1e-12)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_accuracy_hand_computed():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    y = torch.tensor([0, 0, 0, 1, 1])  # predictions 0, 1, 0, 1, 0 -> 3 of 5 right
    assert accuracy(model, DataLoader(TensorDataset(x, y), batch_size=2)) == pytest.approx(0.6)


def test_accuracy_rejects_unlabelled_and_empty():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="labels"):
        accuracy(model, torch.randn(4, 2))
    with pytest.raises(ValueError, match="empty"):
        accuracy(model, TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))


# ---------------------------------------------------------------- entropy MIA


def test_entropy_mia_equals_published_one_at_a_time(digits_setup, published_value):
    model, retain, forget, test = digits_setup
    expected = published_value
    got = entropy_mia(model, retain, forget, test)
    assert 0.0 < expected < 1.0  # a non-degenerate attack, so the comparison means something
    assert got == expected
    # DataLoaders of any batch size and bare input tensors give the same value
    xs = [torch.stack([s[0] for s in d]) for d in (retain, forget, test)]
    assert entropy_mia(model, *[DataLoader(d, batch_size=13) for d in (retain, forget, test)]) == expected
    assert entropy_mia(model, *xs) == expected


def test_entropy_mia_uses_eval_mode_and_restores_it(digits_setup, published_value):
    model, retain, forget, test = digits_setup
    expected = published_value
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        assert entropy_mia(model, retain, forget, test) == expected
        assert model.training
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        model.eval()


def test_entropy_mia_member_signal():
    """A model that is confident on retain and forget and uncertain on test: every forget sample is
    predicted member; after making it uncertain on forget, none is."""

    class Table(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):  # x [B, 1]: a per-sample confidence; logits [B, 3]
            return torch.stack([x[:, 0] * self.scale, torch.zeros_like(x[:, 0]), torch.zeros_like(x[:, 0])], 1)

    g = torch.Generator().manual_seed(0)
    retain = 8 + torch.rand(40, 1, generator=g)
    test = torch.rand(30, 1, generator=g)
    assert entropy_mia(Table(1.0), retain, 8 + torch.rand(20, 1, generator=g), test) == 1.0
    assert entropy_mia(Table(1.0), retain, torch.rand(20, 1, generator=g), test) == 0.0


# ---------------------------------------------------------------- loss MIA


@pytest.mark.parametrize("sizes", [(60, 40), (40, 60), (50, 50)])
def test_loss_mia_equals_challenge_kit(digits_setup, sizes):
    model, retain, _, test = digits_setup
    forget = Subset(retain, list(range(sizes[0])))
    test = Subset(test, list(range(sizes[1])))
    expected = _kit_loss_mia(_kit_losses_one_at_a_time(model, forget), _kit_losses_one_at_a_time(model, test), 10, 3)
    got = loss_mia(model, forget, test, seed=3)
    assert got == pytest.approx(expected, abs=1e-12)


def test_loss_mia_separable_losses():
    """Forget samples with near-zero loss against test samples with large loss: the attack is exact."""
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-4.0], [4.0]]))
    g = torch.Generator().manual_seed(0)
    forget = TensorDataset(1 + torch.rand(40, 1, generator=g), torch.ones(40, dtype=torch.long))
    test = TensorDataset(1 + torch.rand(70, 1, generator=g), torch.zeros(70, dtype=torch.long))
    assert loss_mia(model, forget, test) == 1.0


def test_loss_mia_arguments(digits_setup):
    model, retain, _, test = digits_setup
    with pytest.raises(ValueError, match="n_splits"):
        loss_mia(model, retain, test, n_splits=0)
    with pytest.raises(ValueError, match="at least 10"):
        loss_mia(model, Subset(retain, [0, 1, 2]), test)


# ---------------------------------------------------------------- evaluate


def test_evaluate_record_matches_the_single_metrics(digits_setup, published_value):
    model, retain, forget, test = digits_setup
    labels_test = torch.tensor([int(test[i][1]) for i in range(len(test))])
    splits = Splits(forget, retain, test, forgotten_classes=(3,), test_keep=labels_test != 3)
    rec = evaluate(model, splits, seed=1)
    assert set(rec) == {
        "forget_acc",
        "retain_acc",
        "test_acc",
        "test_acc_remaining",
        "entropy_mia",
        "loss_mia",
        "seconds",
    }
    assert rec["forget_acc"] == pytest.approx(accuracy(model, forget), abs=1e-12)
    assert rec["retain_acc"] == pytest.approx(accuracy(model, retain), abs=1e-12)
    assert rec["test_acc"] == pytest.approx(accuracy(model, test), abs=1e-12)
    others = Subset(test, torch.nonzero(labels_test != 3).flatten().tolist())
    assert rec["test_acc_remaining"] == pytest.approx(accuracy(model, others), abs=1e-12)
    assert rec["entropy_mia"] == published_value
    assert rec["loss_mia"] == pytest.approx(loss_mia(model, forget, test, seed=1), abs=1e-12)
    assert rec["seconds"] > 0
    # the same from forgotten_classes alone, from a mapping, and with an explicit override
    plain = {"forget": forget, "retain": retain, "test": test, "forgotten_classes": (3,)}
    assert evaluate(model, plain, seed=1, mia=False)["test_acc_remaining"] == rec["test_acc_remaining"]
    five = Subset(test, torch.nonzero(labels_test != 5).flatten().tolist())
    assert evaluate(model, splits, forgotten_classes=[5], mia=False)["test_acc_remaining"] == pytest.approx(
        accuracy(model, five), abs=1e-12
    )
    state = torch.get_rng_state()
    no_classes = evaluate(model, Splits(forget, retain, test), mia=False)
    assert torch.equal(torch.get_rng_state(), state)  # evaluation draws nothing from the global RNG
    assert no_classes["test_acc_remaining"] == no_classes["test_acc"]
    assert no_classes["entropy_mia"] is None and no_classes["loss_mia"] is None


def test_evaluate_on_a_full_class_scenario_and_restores_mode():
    ds = TensorDataset(torch.randn(120, 6), torch.arange(120) % 4)
    splits = full_class(ds, 2, seed=0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = evaluate(model, splits, mia=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x_test = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    y_test = torch.stack([splits.test[i][1] for i in range(len(splits.test))])
    with torch.no_grad():
        model.eval()
        pred = model(x_test).argmax(1)
    keep = y_test != 2
    assert rec["test_acc_remaining"] == pytest.approx((pred[keep] == y_test[keep]).float().mean().item())


def test_evaluate_rejects_non_finite_logits():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    ds = TensorDataset(torch.randn(30, 3), torch.randint(0, 2, (30,)))
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(model, Splits(ds, ds, ds))


@requires_cuda
def test_metrics_on_cuda_match_cpu(digits_setup):
    model, retain, forget, test = digits_setup
    cpu = evaluate(model, Splits(forget, retain, test), seed=0)
    cuda = evaluate(model.cuda(), Splits(forget, retain, test), seed=0)
    model.cpu()
    for key in ("forget_acc", "retain_acc", "test_acc"):
        assert cuda[key] == cpu[key]
    assert abs(cuda["entropy_mia"] - cpu["entropy_mia"]) <= 2 / len(forget)
