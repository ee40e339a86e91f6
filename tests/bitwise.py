"""Bitwise comparison of model states, shared by the tests that promise results equal to the last bit
(or a model left exactly as it was): -0.0 differs from 0.0, and a NaN equals the same NaN."""

import torch
from torch import nn


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor's values, flat."""
    return t.detach().contiguous().view(-1).view(torch.uint8)


def state_bits(model: nn.Module) -> dict:
    """A copy of the model's state_dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a, b) -> None:
    """The two states (state dicts, or modules whose state_dict is read) have the same keys, and each
    entry the same dtype and bytes."""
    a = a.state_dict() if isinstance(a, nn.Module) else a
    b = b.state_dict() if isinstance(b, nn.Module) else b
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])), k
