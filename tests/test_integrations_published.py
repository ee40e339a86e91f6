"""The drop-ins for the published SSD and JiT code (jit_unlearn.integrations.published) against the
independent transcriptions in tests/published.py: bitwise results, the published call conventions,
and clear errors that leave the model unchanged."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import published
from jit_unlearn.integrations.published import LabelFreeParameterPerturber, Lipschitz, ParameterPerturber
from jit_unlearn.models import MLP, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

SSD_PARAMS = {
    "lower_bound": 1,
    "exponent": 1,
    "magnitude_diff": None,
    "min_layer": -1,
    "max_layer": -1,
    "forget_threshold": 1,
    "dampening_constant": 1,
    "selection_weighting": 10,
}
JIT_PARAMS = {
    "lower_bound": 1,
    "exponent": 1,
    "min_layer": -1,
    "max_layer": -1,
    "dampening_constant": 1,
    "selection_weighting": 10,
    "n_epochs": 1,
    "n_samples": 4,
    "learning_rate": 0.05,
    "use_quad_weight": False,
    "ewc_lambda": 1,
    "lipschitz_weighting": 0.3,
}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(64, (32, 32), 10, dropout=0.2)


def _cnn(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(1, 10, width=8, dropout=0.2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _triples(shape, n=44, batch_size=12, seed=1, lo=0):
    """A loader of (x, index, y) batches, as the published datasets yield them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, torch.arange(lo, lo + n), y), batch_size=batch_size)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, other):
    sa = model.state_dict()
    for k, v in (other.state_dict() if isinstance(other, nn.Module) else other).items():
        assert torch.equal(sa[k], v), k


def _ssd_params(**changes):
    return {**SSD_PARAMS, **changes}


def _jit_params(**changes):
    return {**JIT_PARAMS, **changes}


# ---------------------------------------------------------------- ParameterPerturber


@pytest.mark.parametrize("label_free", [False, True])
@pytest.mark.parametrize("make,shape", [(_mlp, (64,)), (_cnn, (1, 8, 8))], ids=["mlp", "cnn_bn"])
def test_calc_importance_bitwise_equals_published(make, shape, label_free):
    model = make().eval()
    loader = _triples(shape, n=44, batch_size=12)  # a partial last batch weighs as a full one
    pdr = ParameterPerturber(
        model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", SSD_PARAMS, label_free=label_free
    )
    grads = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    ours = pdr.calc_importance(loader)
    theirs = published.calc_importance(copy.deepcopy(model), loader, label_free=label_free)
    assert isinstance(ours, dict) and list(ours) == list(theirs)
    for n in theirs:
        assert torch.equal(ours[n], theirs[n]), n
        assert ours[n].abs().sum() > 0, n
    for n, p in model.named_parameters():  # the caller's gradients are left as they were
        assert torch.equal(p.grad, grads[n]), n


@pytest.mark.parametrize("alpha,lam,exponent", [(2.7, 1.0, 1.0), (0.3, 0.7, 1.0), (1.3, 2.0, 2.0)])
def test_modify_weight_equals_published(alpha, lam, exponent):
    """Bitwise for exponent 1 (every published script's value).  For other exponents the compiled
    kernel's pow can differ from torch.pow in the last bit, so those compare to 1 ulp."""
    model = _cnn().eval()
    reference = copy.deepcopy(model)
    forget, full = _triples((1, 8, 8), n=12, batch_size=4), _triples((1, 8, 8), n=40, batch_size=8, seed=2)
    params = _ssd_params(selection_weighting=alpha, dampening_constant=lam, exponent=exponent)
    pdr = ParameterPerturber(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", params)
    f, d = pdr.calc_importance(forget), pdr.calc_importance(full)
    assert pdr.modify_weight(d, f) is None
    published.modify_weight(reference, dict(d), dict(f), alpha, lam, exponent)
    if exponent == 1.0:
        _assert_same(model, reference)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1.2e-7, atol=0.0)
    changed = sum(int((p != q).sum()) for p, q in zip(model.parameters(), _cnn().parameters()))
    assert changed > 0


@pytest.mark.parametrize("label_free", [False, True])
def test_published_strategy_end_to_end(label_free):
    """The published strategy function's sequence: perturber, model.eval(), forget and full
    importances, modify_weight; bitwise the transcription's result."""
    model, reference = _mlp(), _mlp()
    forget, full = _triples((64,), n=20, batch_size=8), _triples((64,), n=60, batch_size=16, seed=3)
    cls = LabelFreeParameterPerturber if label_free else ParameterPerturber
    pdr = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", _ssd_params(selection_weighting=1.5))
    model = model.eval()
    pdr.modify_weight(pdr.calc_importance(full), pdr.calc_importance(forget))
    published.ssd(reference, forget, full, alpha=1.5, lam=1.0, label_free=label_free)
    _assert_same(model, reference)


def test_modify_weight_pairs_by_position_like_published():
    """Keys are not looked up: the i-th entry goes with the i-th parameter, and the shorter
    sequence ends the pairing, as zip does in the published method."""
    model = _mlp().eval()
    reference = copy.deepcopy(model)
    pdr = ParameterPerturber(model, None, "cpu", _ssd_params(selection_weighting=0.5))
    g = torch.Generator().manual_seed(4)
    imps = [(torch.rand(p.shape, generator=g), torch.rand(p.shape, generator=g)) for p in model.parameters()]
    f = {f"module.{i}": a for i, (a, _) in enumerate(imps)}
    d = {f"other.{i}": b for i, (_, b) in enumerate(imps[:3])}  # only the first three parameters
    pdr.modify_weight(d, f)
    published.modify_weight(reference, d, f, 0.5, 1.0)
    _assert_same(model, reference)
    untouched = list(model.parameters())[3:]
    assert all(torch.equal(p, q) for p, q in zip(untouched, list(_mlp().parameters())[3:]))


def _bad_perturber(model, opt=None, params=None):
    return ParameterPerturber(model, opt, "cpu", _ssd_params() if params is None else params)


@pytest.mark.parametrize(
    "params,exc,name",
    [
        (None, ValueError, "parameters"),
        ([1, 2], TypeError, "parameters"),
        ({k: v for k, v in SSD_PARAMS.items() if k != "selection_weighting"}, ValueError, "selection_weighting"),
    ],
)
def test_bad_parameters_rejected(params, exc, name):
    with pytest.raises(exc, match=name):
        ParameterPerturber(_mlp(), None, "cpu", params)


@pytest.mark.parametrize(
    "changes,name",
    [
        ({"lower_bound": 0.5}, r"parameters\['lower_bound'\]"),
        ({"selection_weighting": -1.0}, r"parameters\['selection_weighting'\]"),
        ({"dampening_constant": float("nan")}, r"parameters\['dampening_constant'\]"),
        ({"exponent": "1"}, r"parameters\['exponent'\]"),
    ],
)
def test_modify_weight_bad_hyperparameters_change_nothing(changes, name):
    model = _mlp().eval()
    saved = _state(model)
    pdr = _bad_perturber(model, params=_ssd_params(**changes))
    imp = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=name):
        pdr.modify_weight(imp, imp)
    _assert_same(model, saved)


@pytest.mark.parametrize("poison", ["nan", "inf", "negative", "shape", "dtype"])
def test_modify_weight_bad_importances_change_nothing(poison):
    model = _mlp().eval()
    saved = _state(model)
    pdr = _bad_perturber(model, params=_ssd_params(selection_weighting=0.1))
    d = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    f = {n: torch.rand(p.shape) * 5 for n, p in model.named_parameters()}
    last = list(f)[-1]  # the bad tensor comes after good ones
    if poison == "shape":
        f[last] = torch.rand(3)
    elif poison == "dtype":
        f[last] = torch.ones(f[last].shape, dtype=torch.int64)
    else:
        f[last][0] = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0}[poison]
    with pytest.raises((ValueError, TypeError), match=rf"forget_importance\[{last!r}\]"):
        pdr.modify_weight(d, f)
    _assert_same(model, saved)


def test_calc_importance_refuses_train_mode_and_partial_optimizer():
    model = _cnn().train()
    loader = _triples((1, 8, 8))
    with pytest.raises(ValueError, match="model: .*train mode"):
        _bad_perturber(model, torch.optim.SGD(model.parameters(), lr=0.1)).calc_importance(loader)
    model.eval()
    partial = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="opt: does not hold every trainable parameter"):
        _bad_perturber(model, partial).calc_importance(loader)
    with pytest.raises(TypeError, match="opt"):
        _bad_perturber(model, opt=object())


def test_calc_importance_refuses_loader_whose_len_differs():
    model = _mlp().eval()

    class Misreporting:
        def __iter__(self):
            return iter(_triples((64,), n=24, batch_size=12))

        def __len__(self):
            return 5

    with pytest.raises(ValueError, match="dataloader: len"):
        _bad_perturber(model).calc_importance(Misreporting())


# ---------------------------------------------------------------- Lipschitz


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make,shape", [(_mlp, (64,)), (_cnn, (1, 8, 8))], ids=["mlp_dropout", "cnn_bn_dropout"])
def test_lipschitz_bitwise_equals_published(make, shape, mode):
    model, reference = make(), make()
    getattr(model, mode)()
    getattr(reference, mode)()
    loader = _triples(shape, n=30, batch_size=8)
    jit = Lipschitz(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", JIT_PARAMS)
    torch.manual_seed(11)
    assert jit.modify_weight(loader) is None
    torch.manual_seed(11)
    published.lipschitz_modify_weight(reference, loader, sigma=0.3, lr=0.05, n=4)
    _assert_same(model, reference)  # parameters and BatchNorm statistics
    for p, q in zip(model.parameters(), reference.parameters()):  # gradients summed across batches, as published
        assert torch.equal(p.grad, q.grad)
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]
    assert jit.report.steps == 4 and jit.report.mode == "reference"


def test_lipschitz_draws_the_same_random_stream():
    """After the run, the global generator stands where the published loop leaves it."""
    model, reference = _mlp().eval(), _mlp().eval()
    loader = _triples((64,), n=16, batch_size=8)
    torch.manual_seed(2)
    Lipschitz(model, None, "cpu", JIT_PARAMS).modify_weight(loader)
    ours = torch.randn(4)
    torch.manual_seed(2)
    published.lipschitz_modify_weight(reference, loader, sigma=0.3, lr=0.05, n=4)
    assert torch.equal(ours, torch.randn(4))


def test_lipschitz_three_dim_batches_are_one_sample():
    """A 3-dim x is one sample: the published loop adds a batch dimension of 1."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(4 * 36, 10))

    model, reference = make(), make()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(12, 6, 6, generator=g)
    loader = DataLoader(TensorDataset(x, torch.arange(12), torch.zeros(12, dtype=torch.int64)), batch_size=4)
    torch.manual_seed(1)
    Lipschitz(model, None, "cpu", JIT_PARAMS).modify_weight(loader)
    torch.manual_seed(1)
    published.lipschitz_modify_weight(reference, loader, sigma=0.3, lr=0.05, n=4)
    _assert_same(model, reference)


def test_lipschitz_label_free_importance_bitwise():
    model = _cnn().eval()
    loader = _triples((1, 8, 8), n=20, batch_size=6)
    ours = Lipschitz(model, None, "cpu", JIT_PARAMS).calc_importance(loader)
    theirs = published.calc_importance(copy.deepcopy(model), loader, label_free=True)
    for n in theirs:
        assert torch.equal(ours[n], theirs[n]), n


def test_lipschitz_stale_gradients_outside_opt_refused_inside_cleared():
    model = _mlp().eval()
    loader = _triples((64,), n=16, batch_size=8)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    saved = _state(model)
    partial = torch.optim.SGD(model[-1].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="opt: does not hold the parameters"):
        Lipschitz(model, partial, "cpu", JIT_PARAMS).modify_weight(loader)
    _assert_same(model, saved)
    # an optimizer over every parameter: the stale gradients are cleared first, as published
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    Lipschitz(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", JIT_PARAMS).modify_weight(loader)
    torch.manual_seed(0)
    published.lipschitz_modify_weight(reference, loader, sigma=0.3, lr=0.05, n=4)
    _assert_same(model, reference)


def test_lipschitz_empty_loader_only_zeroes_opt():
    model = _mlp()
    saved = _state(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    empty = DataLoader(TensorDataset(torch.rand(0, 64), torch.arange(0), torch.zeros(0)), batch_size=4)
    Lipschitz(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", JIT_PARAMS).modify_weight(empty)
    _assert_same(model, saved)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "changes,name",
    [
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 2.0}, "n_samples"),
        ({"lipschitz_weighting": 0.0}, "lipschitz_weighting"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("inf")}, "learning_rate"),
    ],
)
def test_lipschitz_bad_parameters_named(changes, name):
    with pytest.raises((ValueError, TypeError), match=rf"parameters\['{name}'\]"):
        Lipschitz(_mlp(), None, "cpu", _jit_params(**changes))


def test_lipschitz_non_finite_run_restores_model():
    model = _mlp().eval()
    with torch.no_grad():
        model[1].weight.mul_(1e20)
        model[4].weight.mul_(1e20)  # the outputs overflow, and so do the gradients
    saved = _state(model)
    with pytest.raises(FloatingPointError):
        Lipschitz(model, None, "cpu", JIT_PARAMS).modify_weight(_triples((64,), n=16, batch_size=8))
    _assert_same(model, saved)
