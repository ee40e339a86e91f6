"""The Python side of "the ops refuse what they cannot do": a list whose later target cannot be written
is refused before the first one is written, on both tiers; targets that need a temporary (strided
views) and parameters that require grad are written whatever the grad mode, as the compiled kernels
write them, so no copy-back fails half-way."""

from __future__ import annotations

import pytest
import torch

from jit_unlearn import ops, torch_ops

pytestmark = pytest.mark.usefixtures("one_thread")


def _operands(second: torch.Tensor):
    """Two targets (a plain one, then `second`), importances that select every element, masks, grads."""
    first = torch.arange(1.0, 7.0).reshape(2, 3)
    params = [first, second]
    f = [torch.full(p.shape, 10.0) for p in params]
    d = [torch.ones(p.shape) for p in params]
    masks = [torch.ones(p.shape, dtype=torch.bool) for p in params]
    return params, f, d, masks


_CALLS = {
    "ssd_dampen_": lambda params, f, d, masks: ops.ssd_dampen_(params, f, d, 1.0),
    "masked_reset_": lambda params, f, d, masks: ops.masked_reset_(params, [x * 0 for x in d], masks),
    "accumulate_importance_": lambda params, f, d, masks: ops.accumulate_importance_(params, f),
}


def _expanded():
    return torch.ones(3).expand(2, 3)


def _inference():
    with torch.inference_mode():
        return torch.ones(2, 3)


@pytest.mark.parametrize("op", list(_CALLS))
@pytest.mark.parametrize(
    "make,message",
    [
        (_expanded, r"\[1\]: several of its elements share one memory location"),
        (_inference, r"\[1\]: is an inference tensor"),
    ],
)
def test_a_later_target_that_cannot_be_written_is_refused_before_any_write(op, make, message, backend):
    params, f, d, masks = _operands(make())
    first = params[0].clone()
    with pytest.raises(ValueError, match=message):
        _CALLS[op](params, f, d, masks)
    assert torch.equal(params[0], first)  # nothing was written


@pytest.mark.parametrize("op", list(_CALLS))
def test_inference_targets_are_written_inside_inference_mode(op, backend):
    params, f, d, masks = _operands(_inference())
    with torch.inference_mode():
        _CALLS[op](params, f, d, masks)
    assert not torch.equal(params[1], torch.ones(2, 3))


@pytest.mark.parametrize("op", list(_CALLS))
def test_strided_targets_that_require_grad_are_written_on_both_tiers(op, backend):
    # the second target is a strided leaf that requires grad: it goes through a dense temporary and is
    # copied back; with grad mode on, that copy must not fail after the first target was written
    base = torch.arange(1.0, 13.0).reshape(2, 6)
    second = base[:, ::2].clone().requires_grad_(False)
    strided = torch.nn.Parameter(torch.empty(2, 6))
    with torch.no_grad():
        strided[:, ::2] = second
    params, f, d, masks = _operands(strided[:, ::2])
    first = torch.nn.Parameter(params[0].clone())
    params[0] = first
    expected_params, ef, ed, em = _operands(second.clone())
    expected_params[0] = expected_params[0].clone()
    with torch.no_grad():
        _CALLS[op](expected_params, ef, ed, em)
    assert torch.is_grad_enabled()
    _CALLS[op](params, f, d, masks)
    assert torch.equal(first.detach(), expected_params[0]) and torch.equal(strided[:, ::2].detach(), expected_params[1])


@pytest.mark.parametrize("op", ["ssd_dampen_", "masked_reset_", "accumulate_importance_"])
def test_the_torch_tier_writes_parameters_that_require_grad_as_the_kernels_do(op):
    params = [torch.nn.Parameter(torch.arange(1.0, 4.0)), torch.nn.Parameter(torch.arange(4.0, 7.0))]
    f = [torch.full((3,), 10.0), torch.full((3,), 10.0)]
    d = [torch.ones(3), torch.ones(3)]
    if op == "ssd_dampen_":
        torch_ops.ssd_dampen_(params, f, d, 1.0, 1.0, 1.0)
        expected = [torch.arange(1.0, 4.0) * 0.1, torch.arange(4.0, 7.0) * 0.1]
    elif op == "masked_reset_":
        torch_ops.masked_reset_(params, d, [torch.tensor([True, False, True])] * 2)
        expected = [torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 5.0, 1.0])]
    else:
        torch_ops.accumulate_importance_(params, f, "abs", 1.0)
        expected = [torch.arange(11.0, 14.0), torch.arange(14.0, 17.0)]
    assert all(torch.allclose(p.detach(), e) for p, e in zip(params, expected))
