"""JiT's reference mode: the published implementation, operation for operation (docs/METHODS.md §1)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..._safety import BatchChecks
from ..._utils import check_logits
from ...torch_ops import opmath_dtype
from .safety import check_finite_grads


def run_reference(
    model: nn.Module,
    xs: Iterable[torch.Tensor],
    params: list[torch.Tensor],
    *,
    sigma: float,
    lr: float,
    num_samples: int,
    reduction: str,
    data: BatchChecks,
) -> tuple[int, int, float]:
    """The published loop over the forget batches `xs`; returns (steps, samples, sum of the losses).

    The caller's train/eval mode is kept; the N perturbed passes run one by one, each drawing
    `torch.randn(x.shape)` on the CPU from torch's global generator; gradients are zeroed once at
    the start and then accumulate, so step t applies the sum of all gradients so far (plain SGD);
    norms are taken in the opmath dtype of the outputs.  `data`: the checks of the forget batches,
    verified before a non-finite error is raised.  The caller checks the parameters after the last
    step (an SGD step can overflow although its gradient is finite)."""
    sgd = torch.optim.SGD(params, lr=lr)
    sgd.zero_grad()
    steps = samples = 0
    loss_sum = 0.0
    for x in xs:
        b = x.shape[0]
        out = check_logits(model(x), b)
        op = opmath_dtype(out.dtype)
        lo, hi = x.min(), x.max()
        loss = torch.zeros((), dtype=op, device=x.device)
        for _ in range(num_samples):
            noise = torch.randn(x.shape).to(x.device)
            x2 = torch.clamp(x + noise * sigma, lo, hi).to(x.dtype)
            with torch.no_grad():
                out2 = check_logits(model(x2), b)
            in_norm = torch.linalg.vector_norm((x - x2).flatten(1).to(op), dim=1)
            out_norm = torch.linalg.vector_norm((out - out2).to(op), dim=1)
            loss = loss + (out_norm / in_norm).sum()
        loss = loss / num_samples
        if reduction == "mean":
            loss = loss / b
        loss.backward()
        check_finite_grads(params, steps, data)
        sgd.step()
        steps, samples = steps + 1, samples + b
        loss_sum += loss.item()
    return steps, samples, loss_sum
