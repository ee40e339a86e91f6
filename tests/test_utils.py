"""Shared helpers: reading batches (the sliced fast path of plain tensor DataLoaders, row splits)."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from jit_unlearn._utils import _plain_tensor_loader, iter_batches, split_rows


def _same_batches(got, want):
    got, want = list(got), list(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("batch_size,drop_last", [(4, False), (4, True), (5, False), (32, False), (1, True)])
def test_plain_tensor_loader_sliced_like_collation(batch_size, drop_last):
    x = torch.randn(10, 3, 2)
    y = torch.arange(10)
    w = torch.rand(10, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, w, y), batch_size=batch_size, drop_last=drop_last)
    assert _plain_tensor_loader(loader)
    _same_batches(iter_batches(loader), loader)


def test_sliced_batches_are_copies():
    # a model working in place on its input must not write into the dataset's tensors
    x = torch.zeros(6, 2)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    for (batch,) in iter_batches(loader):
        batch.add_(1.0)
    assert torch.equal(x, torch.zeros(6, 2))


@pytest.mark.parametrize("make", [
    lambda ds: DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)),
    lambda ds: DataLoader(ds, batch_size=4, collate_fn=lambda b: b),
    lambda ds: DataLoader(ds, batch_size=None),
    lambda ds: DataLoader(torch.utils.data.Subset(ds, [0, 2, 4]), batch_size=2),
    lambda ds: [(torch.ones(2, 3), torch.zeros(2))],
])
def test_other_loaders_iterate_as_they_are(make):
    loader = make(TensorDataset(torch.randn(10, 3), torch.arange(10)))
    assert not _plain_tensor_loader(loader)
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, torch.utils.data.RandomSampler):
        loader.generator.manual_seed(1)
        want = list(loader)
        loader.generator.manual_seed(1)
        got = list(iter_batches(loader))
    else:
        want, got = list(loader), list(iter_batches(loader))
    flat = torch.utils._pytree.tree_leaves
    assert len(flat(got)) == len(flat(want))
    assert all(torch.equal(u, v) for u, v in zip(flat(got), flat(want)))


def test_split_rows_checks_and_splits():
    x = torch.arange(10.0).view(5, 2)
    parts = split_rows(x, 2, name="forget")
    assert [p.shape[0] for p in parts] == [2, 2, 1] and torch.equal(torch.cat(parts), x)
    assert [p.shape[0] for p in split_rows(TensorDataset(x), None)] == [5]
    with pytest.raises(ValueError, match="forget"):
        split_rows(torch.empty(0, 2), 2, name="forget")
    with pytest.raises(ValueError, match="batch_size"):
        split_rows(x, 0)
    with pytest.raises(ValueError, match="empty"):
        split_rows(TensorDataset(torch.empty(0, 2)), 2)
