"""Scenario splits (disjoint, covering, seeded), labels, the training loop and the retrain baseline."""

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from jit_unlearn import data, models
from jit_unlearn.eval import (
    Recipe,
    Relabeled,
    Splits,
    accuracy,
    dataset_labels,
    full_class,
    random_subset,
    retrain,
    sub_class,
    train,
    train_test_split,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(n=200, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return TensorDataset(torch.randn(n, 3, generator=g) + y[:, None].float(), y[torch.randperm(n, generator=g)])


def _base_indices(subset: Subset) -> list[int]:
    """Indices of a (possibly nested) Subset in its innermost dataset."""
    idx = list(subset.indices)
    ds = subset.dataset
    while isinstance(ds, Subset):
        idx = [ds.indices[i] for i in idx]
        ds = ds.dataset
    return idx


def _items_labels(ds) -> list[int]:
    return [int(ds[i][-1]) for i in range(len(ds))]


class _PlainDataset(Dataset):
    def __init__(self, y):
        self.y = y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.full((2,), float(i)), self.y[i]


def test_dataset_labels_of_every_wrapper():
    ds = _toy()
    sub = Subset(ds, [5, 1, 7])
    assert dataset_labels(sub).tolist() == _items_labels(sub)
    cat = torch.utils.data.ConcatDataset([sub, ds])
    assert dataset_labels(cat).tolist() == _items_labels(cat)
    plain = _PlainDataset([3, 1, 4, 1, 5])
    assert dataset_labels(plain).tolist() == [3, 1, 4, 1, 5]
    rel = Relabeled(plain, torch.tensor([0, 0, 1, 1, 2]))
    assert dataset_labels(Subset(rel, [4, 2])).tolist() == [2, 1] == _items_labels(Subset(rel, [4, 2]))
    with pytest.raises(ValueError, match="no labels"):
        dataset_labels(TensorDataset(torch.zeros(3, 2)))


def test_train_test_split_is_stratified_disjoint_covering_and_seeded():
    ds = _toy(n=203, classes=4)
    tr, te = train_test_split(ds, 0.25, seed=1)
    a, b = set(_base_indices(tr)), set(_base_indices(te))
    assert not a & b and a | b == set(range(len(ds)))
    labels = dataset_labels(ds)
    for c in range(4):
        n_c = int((labels == c).sum())
        assert int((dataset_labels(te) == c).sum()) == round(0.25 * n_c)
    again = train_test_split(ds, 0.25, seed=1)[1]
    other = train_test_split(ds, 0.25, seed=2)[1]
    assert _base_indices(again) == _base_indices(te) and _base_indices(other) != _base_indices(te)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(ds, 1.0)


def test_full_class_with_a_given_test_set():
    train_ds, test_ds = _toy(seed=0), _toy(n=60, seed=1)
    s = full_class(train_ds, 2, test_ds)
    assert s.test is test_ds and s.forgotten_classes == (2,)
    f, r = _base_indices(s.forget), _base_indices(s.retain)
    assert not set(f) & set(r) and sorted(f + r) == list(range(len(train_ds)))
    assert set(_items_labels(s.forget)) == {2} and 2 not in _items_labels(s.retain)
    assert s.test_keep.tolist() == [y != 2 for y in _items_labels(test_ds)]
    assert len(s.train) == len(train_ds)


def test_full_class_holds_out_its_own_test_set():
    ds = _toy(n=250)
    s = full_class(ds, [0, 3], test_fraction=0.2, seed=4)
    f, r, t = map(set, (_base_indices(s.forget), _base_indices(s.retain), _base_indices(s.test)))
    assert not (f & r or f & t or r & t) and f | r | t == set(range(len(ds)))
    assert len(t) == 50
    assert set(_items_labels(s.forget)) == {0, 3} and not {0, 3} & set(_items_labels(s.retain))
    assert s.test_keep.tolist() == [y not in (0, 3) for y in _items_labels(s.test)]
    with pytest.raises(ValueError, match="cls"):
        full_class(ds, 7)
    with pytest.raises(TypeError, match="cls"):
        full_class(ds, 1.5)


def test_sub_class_forgets_a_fine_class_and_yields_coarse_labels():
    fine = torch.arange(100) % 10
    ds = TensorDataset(torch.randn(100, 2), fine)
    coarse_of = [f // 5 for f in range(10)]  # two super-classes
    test_ds = TensorDataset(torch.randn(30, 2), torch.arange(30) % 10)
    for mapping in (coarse_of, {f: c for f, c in enumerate(coarse_of)}, lambda f: f // 5):
        s = sub_class(ds, 7, mapping, test_ds)
        f, r = _base_indices(s.forget), _base_indices(s.retain)
        assert not set(f) & set(r) and sorted(f + r) == list(range(100))
        assert all(int(fine[i]) == 7 for i in f) and all(int(fine[i]) != 7 for i in r)
        assert set(_items_labels(s.forget)) == {1}
        assert _items_labels(s.retain) == [coarse_of[int(fine[i])] for i in r]
        assert _items_labels(s.test) == [coarse_of[i % 10] for i in range(30)]
        assert s.test_keep.tolist() == [i % 10 != 7 for i in range(30)]
        assert s.forgotten_classes == (7,)
    with pytest.raises(ValueError, match="coarse_of"):
        sub_class(ds, 7, [0, 1])


def test_random_subset_count_disjoint_covering_seeded():
    ds = _toy(n=300)
    s = random_subset(ds, 0.1, seed=3, test_ds=_toy(n=20))
    f, r = _base_indices(s.forget), _base_indices(s.retain)
    assert len(f) == 30 and not set(f) & set(r) and sorted(f + r) == list(range(300))
    assert s.forgotten_classes == () and s.test_keep is None
    assert _base_indices(random_subset(ds, 0.1, seed=3, test_ds=ds).forget) == f
    assert _base_indices(random_subset(ds, 0.1, seed=4, test_ds=ds).forget) != f
    own = random_subset(ds, 0.5, seed=0)
    parts = [set(_base_indices(x)) for x in (own.forget, own.retain, own.test)]
    assert sum(map(len, parts)) == 300 and set.union(*parts) == set(range(300))
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ValueError, match="fraction"):
            random_subset(ds, bad)


def test_splits_summary():
    s = full_class(_toy(), 1, _toy(n=40))
    assert s.summary() == {"forget": 40, "retain": 160, "test": 40, "forgotten_classes": [1]}
    assert isinstance(s, Splits)


def test_recipe_validation():
    assert Recipe.from_mapping({"epochs": 2}, seed=5) == Recipe(epochs=2, seed=5)
    for bad, key in (
        ({"epochs": -1}, "epochs"),
        ({"lr": float("nan")}, "lr"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"batch_size": 0}, "batch_size"),
        ({"epoch": 3}, "epoch"),
        ({"seed": 1.5}, "seed"),
    ):
        with pytest.raises(ValueError, match=f"^{key}:"):
            Recipe.from_mapping(bad)


def test_train_learns_and_keeps_global_rng():
    ds = data.digits()
    tr, te = train_test_split(ds, 0.3, seed=0)
    torch.manual_seed(0)
    nets = {opt: models.MLP(64, (64,), 10, dropout=0.1) for opt in ("sgd", "adam")}
    state = torch.get_rng_state()
    for opt, m in nets.items():
        train(m, tr, Recipe(epochs=4, lr=0.05 if opt == "sgd" else 3e-3, batch_size=32, optimizer=opt))
        assert accuracy(m, te) > 0.9
        assert m.training  # train() restores the caller's mode
    assert torch.equal(torch.get_rng_state(), state)


def test_retrain_is_reproducible_and_trained_on_retain_only():
    ds = data.digits()
    s = full_class(ds, 4, seed=0)
    recipe = {"epochs": 4, "lr": 0.05, "batch_size": 32, "seed": 7}
    a = retrain(lambda: models.MLP(64, (64,), 10), s.retain, recipe)
    b = retrain(lambda: models.MLP(64, (64,), 10), s.retain, Recipe(**recipe))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert accuracy(a, s.retain) > 0.9
    assert accuracy(a, s.forget) < 0.05  # class 4 was never seen, so it is never predicted correctly
    with pytest.raises(TypeError, match="model_factory"):
        retrain(models.MLP(64, (64,), 10), s.retain, recipe)
    with pytest.raises(ValueError, match="lr"):
        retrain(lambda: models.MLP(64, (64,), 10), s.retain, {"lr": -1.0})
    with pytest.raises(TypeError, match="nn.Module"):
        retrain(lambda: 3, s.retain, recipe)
