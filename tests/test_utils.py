"""Shared helpers: reading batches (the sliced fast path of plain tensor DataLoaders, row splits), the
one-traversal model state, temporary train/eval modes and restoring a model on failure."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from jit_unlearn._utils import (
    ModelState,
    _plain_tensor_loader,
    iter_batches,
    module_mode,
    restore_on_failure,
    split_rows,
)


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


@pytest.mark.parametrize(
    "make",
    [
        lambda ds: DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)),
        lambda ds: DataLoader(ds, batch_size=4, collate_fn=lambda b: b),
        lambda ds: DataLoader(ds, batch_size=None),
        lambda ds: DataLoader(torch.utils.data.Subset(ds, [0, 2, 4]), batch_size=2),
        lambda ds: [(torch.ones(2, 3), torch.zeros(2))],
    ],
)
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


class _Tied(torch.nn.Module):
    """Shared submodule, tied weight, a None parameter slot, a None buffer and a non-persistent one."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.shared = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
        self.again = self.shared  # the same module twice
        self.head = torch.nn.Linear(4, 4, bias=False)
        self.head.weight = self.shared[0].weight  # tied
        self.register_parameter("unset", None)
        self.register_buffer("nothing", None)
        self.register_buffer("scratch", torch.arange(3.0), persistent=False)

    def forward(self, x):
        return self.head(self.shared(self.bn(self.a(x))))


def test_model_state_matches_module_traversals():
    model = _Tied().double()
    state = ModelState(model)
    assert [id(m) for m in state.modules] == [id(m) for m in model.modules()]
    assert [id(p) for p in state.params] == [id(p) for p in model.parameters()]
    assert [id(b) for b in state.buffers] == [id(b) for b in model.buffers()]
    assert state.device() == torch.device("cpu") and state.dtype() == torch.float64
    empty = ModelState(torch.nn.ReLU())
    assert empty.params == [] and empty.device() == torch.device("cpu") and empty.dtype() == torch.float32


def test_module_mode_sets_and_restores_each_flag():
    model = _Tied()
    model.train()
    model.bn.eval()  # mixed modes must come back as they were
    before = [m.training for m in model.modules()]
    with module_mode(model, False):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError, match="boom"), module_mode(model, True):
        assert all(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before
    model.eval()
    with module_mode(model, False):
        model.a.train()  # the body switching a module is undone as well
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("pass_state", [False, True])
def test_restore_on_failure_puts_back_values_and_flags(error, pass_state):
    torch.manual_seed(0)
    model = _Tied()
    model.train()
    model(torch.randn(5, 3)).sum().backward()
    saved = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    scratch = model.scratch.clone()
    flags = [m.training for m in model.modules()]
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    with pytest.raises(error), restore_on_failure(model, ModelState(model) if pass_state else None):
        with torch.no_grad():
            for t in list(model.parameters()) + [model.bn.running_mean, model.scratch]:
                t.add_(1.0)
        for p in model.parameters():
            p.grad = None
        model.eval()
        raise error()
    for k, v in model.state_dict(keep_vars=True).items():
        assert torch.equal(v, saved[k]), k
    assert torch.equal(model.scratch, scratch)  # non-persistent buffers too
    # the caller's gradients come back: the same tensors, with their values
    assert all(p.grad is g and torch.equal(g, v) for p, (g, v) in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == flags
