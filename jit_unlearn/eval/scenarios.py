"""Unlearning scenarios (full-class, sub-class, random subset) as forget/retain/test splits; the retrain baseline."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from .. import _checks as checks
from .._train import Recipe, train
from .._utils import batch_labels


@dataclasses.dataclass
class Splits:
    """The three sets of an unlearning experiment.

    `forget` and `retain` partition the training set (disjoint, covering); `test` is held out.
    `forgotten_classes` lists the class labels removed entirely (full-class: the class; sub-class: the
    fine class, whose coarse label still exists).  `test_keep` is a bool tensor [len(test)] marking
    the test samples outside the forgotten classes (None when nothing is removed class-wise)."""

    forget: Dataset
    retain: Dataset
    test: Dataset
    forgotten_classes: tuple[int, ...] = ()
    test_keep: torch.Tensor | None = None

    @property
    def train(self) -> Dataset:
        """retain ∪ forget, the original training set (what SSD calls the full set)."""
        return torch.utils.data.ConcatDataset([self.retain, self.forget])

    def summary(self) -> dict:
        return {
            "forget": len(self.forget),
            "retain": len(self.retain),
            "test": len(self.test),
            "forgotten_classes": list(self.forgotten_classes),
        }


class Relabeled(Dataset):
    """`base` with its labels replaced: item i is (input of base[i], labels[i]).  Used by `sub_class`
    to train on coarse labels while the split itself is made on fine ones."""

    def __init__(self, base: Dataset, labels: torch.Tensor):
        if len(labels) != len(base):
            raise ValueError(f"labels: expected {len(base)} labels, got {len(labels)}")
        self.base, self.labels = base, labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return x, self.labels[i]


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """The label of every item of a labelled Dataset (the last element of each item), int64 [len(ds)].

    Read without touching the inputs for TensorDataset, Subset, ConcatDataset and Relabeled;
    other datasets are indexed item by item."""
    if isinstance(ds, TensorDataset):
        if len(ds.tensors) < 2:
            raise ValueError("dataset: items carry no labels; expected (x, y) or (x, ..., y) items")
        return ds.tensors[-1].long()
    if isinstance(ds, Relabeled):
        return ds.labels.long()
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, torch.utils.data.ConcatDataset):
        return torch.cat([dataset_labels(d) for d in ds.datasets])
    return torch.as_tensor([_item_label(ds[i]) for i in range(len(ds))], dtype=torch.long)


def _item_label(item) -> int:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return int(item[-1])
    if isinstance(item, Mapping):
        return int(batch_labels(item, name="dataset"))
    raise ValueError("dataset: items carry no labels; expected (x, y) or (x, ..., y) items")


def _check_dataset(ds, name: str) -> None:
    if not isinstance(ds, Dataset) and not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise TypeError(f"{name}: expected a map-style Dataset, got {type(ds).__name__}")
    if len(ds) == 0:
        raise ValueError(f"{name}: the dataset is empty")


def _subset(ds: Dataset, mask: torch.Tensor) -> Subset:
    return Subset(ds, torch.nonzero(mask).flatten().tolist())


def train_test_split(ds: Dataset, test_fraction: float = 0.2, seed: int = 0) -> tuple[Subset, Subset]:
    """Split a labelled Dataset into seeded, class-stratified train and test Subsets (each class
    contributes round(test_fraction * its count) test samples).  For data sets shipped as one split,
    such as the bundled MNIST test set."""
    _check_dataset(ds, "ds")
    test_fraction = checks.real(test_fraction, "test_fraction", low=0, high=1, low_open=True, high_open=True)
    labels = dataset_labels(ds)
    g = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        is_test[idx[: int(round(test_fraction * len(idx)))]] = True
    return _subset(ds, ~is_test), _subset(ds, is_test)


def _with_test(ds, test_ds, test_fraction, seed):
    _check_dataset(ds, "train_ds")
    if test_ds is None:
        return train_test_split(ds, test_fraction, seed)
    _check_dataset(test_ds, "test_ds")
    return ds, test_ds


def full_class(
    train_ds: Dataset,
    cls: int | Sequence[int],
    test_ds: Dataset | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Splits:
    """Forget every training sample of class `cls` (an int, or several classes).

    When `test_ds` is None, a seeded stratified `test_fraction` of `train_ds` is held out as the
    test set first (see `train_test_split`)."""
    classes = (cls,) if isinstance(cls, int) else tuple(cls) if isinstance(cls, (list, tuple, range)) else ()
    if not classes or any(isinstance(c, bool) or not isinstance(c, int) for c in classes):
        raise TypeError(f"cls: expected an int class label or a sequence of them, got {cls!r}")
    train_ds, test_ds = _with_test(train_ds, test_ds, test_fraction, seed)
    labels = dataset_labels(train_ds)
    missing = [c for c in classes if not bool((labels == c).any())]
    if missing:
        raise ValueError(f"cls: class(es) {missing} have no training samples")
    forget = torch.isin(labels, torch.tensor(classes))
    keep = ~torch.isin(dataset_labels(test_ds), torch.tensor(classes))
    return Splits(_subset(train_ds, forget), _subset(train_ds, ~forget), test_ds, classes, keep)


def _coarse_table(coarse_of, fine_labels: torch.Tensor) -> torch.Tensor:
    top = int(fine_labels.max()) + 1 if len(fine_labels) else 0
    if callable(coarse_of):
        table = [int(coarse_of(f)) for f in range(top)]
    elif isinstance(coarse_of, Mapping):
        absent = [f for f in torch.unique(fine_labels).tolist() if f not in coarse_of]
        if absent:
            raise ValueError(f"coarse_of: no coarse label for fine class(es) {absent}")
        table = [int(coarse_of.get(f, -1)) for f in range(top)]
    else:
        table = [int(c) for c in coarse_of]
        if len(table) < top:
            raise ValueError(f"coarse_of: has {len(table)} entries, but fine labels go up to {top - 1}")
    return torch.tensor(table, dtype=torch.long)


def sub_class(
    ds: Dataset, fine_cls: int, coarse_of, test_ds: Dataset | None = None, *, test_fraction: float = 0.2, seed: int = 0
) -> Splits:
    """Forget one fine class while the model predicts coarse labels (e.g. CIFAR-100 "rocket" inside
    the "vehicles 2" super-class).

    `ds` (and `test_ds`) yield (x, fine_label); `coarse_of` maps fine -> coarse label (a sequence
    indexed by fine label, a dict, or a function).  The returned splits yield (x, coarse_label)."""
    checks.integer(fine_cls, "fine_cls")
    ds, test_ds = _with_test(ds, test_ds, test_fraction, seed)
    fine, test_fine = dataset_labels(ds), dataset_labels(test_ds)
    if not bool((fine == fine_cls).any()):
        raise ValueError(f"fine_cls: class {fine_cls} has no training samples")
    table = _coarse_table(coarse_of, torch.cat([fine, test_fine]))
    train_rel, test_rel = Relabeled(ds, table[fine]), Relabeled(test_ds, table[test_fine])
    forget = fine == fine_cls
    return Splits(_subset(train_rel, forget), _subset(train_rel, ~forget), test_rel, (fine_cls,), test_fine != fine_cls)


def random_subset(
    ds: Dataset, fraction: float, seed: int = 0, test_ds: Dataset | None = None, *, test_fraction: float = 0.2
) -> Splits:
    """Forget a seeded uniformly random `fraction` of the training samples (round(fraction * n),
    at least 1).  No class is removed, so `forgotten_classes` is empty."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: expected a number in (0, 1), got {fraction!r}")
    ds, test_ds = _with_test(ds, test_ds, test_fraction, seed)
    n = len(ds)
    g = torch.Generator().manual_seed(seed + 1)  # not the train/test split's stream
    chosen = torch.randperm(n, generator=g)[: max(1, int(round(fraction * n)))]
    forget = torch.zeros(n, dtype=torch.bool)
    forget[chosen] = True
    if bool(forget.all()):
        raise ValueError(f"fraction: {fraction} leaves no retain samples out of {n}")
    return Splits(_subset(ds, forget), _subset(ds, ~forget), test_ds)


def _recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_mapping(recipe)
    raise TypeError(f"recipe: expected a Recipe or a dict, got {type(recipe).__name__}")


def retrain(
    model_factory: Callable[[], nn.Module],
    retain: Dataset,
    recipe: Recipe | Mapping,
    *,
    device: torch.device | str | None = None,
    show_progress: bool = False,
) -> nn.Module:
    """The gold-standard baseline: a model trained from scratch on `retain` only, with the original
    training recipe (a `Recipe` or a dict of its fields: epochs, lr, batch_size, optimizer, seed, ...).

    `model_factory` builds a freshly initialised model; it is called under
    `torch.manual_seed(recipe.seed)` (the global RNG state is restored after), so the initialisation
    is reproducible.  Returns the trained model, moved to `device` when given."""
    recipe = _recipe(recipe)
    _check_dataset(retain, "retain")
    if isinstance(model_factory, nn.Module) or not callable(model_factory):
        raise TypeError(
            "model_factory: expected a zero-argument callable that builds a fresh model, "
            f"got {type(model_factory).__name__}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory: must return an nn.Module, returned {type(model).__name__}")
    if device is not None:
        model = model.to(device)
    return train(model, retain, recipe, show_progress=show_progress, desc="retrain")
