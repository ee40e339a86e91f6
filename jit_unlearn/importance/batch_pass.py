"""The published batch pass of the importances: one gradient per batch, accumulated by the fused op."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, distributed, ops
from .._precision import Precision, graded_forward
from .._safety import BatchChecks
from .._utils import batch_input, batch_labels, check_logits, iter_batches, model_device
from .._utils import progress as progress_bar

_MODE = {"fisher": "square", "output_norm": "abs"}


def batch_loss(out: torch.Tensor, y: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The loss whose gradient is the importance: mean cross-entropy ("fisher") or the mean squared
    logit norm ("output_norm")."""
    if kind == "fisher":
        return F.cross_entropy(out, y)
    # LF-SSD: batch mean of the squared L2 norm of the logits, as torch.norm(out, "fro", dim=1)**2.
    return torch.linalg.vector_norm(out, 2, dim=1).pow(2).mean()


def num_batches(batches) -> int | None:
    """len(batches), or None for an iterable without a length."""
    try:
        return len(batches)
    except TypeError:
        return None


def batch_pass(
    model,
    batches,
    acc: dict[str, torch.Tensor],
    kind: str,
    show: bool,
    name: str,
    data: BatchChecks,
    precision: Precision | None = None,
) -> tuple[int, int]:
    """Add acc(g_b) of every batch into `acc` (name -> tensor); returns (batches, samples).  `data`
    checks each batch's inputs and labels; the forward and backward run as `precision` says
    (`_precision.graded_forward`).

    The first batch goes through the checked `ops.accumulate_importance_`; later batches call the
    kernel directly, since the accumulators and the gradients keep their shapes, dtypes and devices."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    acc_list = [acc[n] for n, _ in trainable]
    mode = _MODE[kind]
    device = model_device(model)
    accumulate, checked = _backend.kernel("accumulate_importance_", device), False
    batches_seen = num_samples = 0
    # The gradients come from backward(inputs=params) into .grad (faster on CPU than autograd.grad:
    # docs/TUNING.md); the caller's .grad fields are set aside and put back.
    callers_grads = [p.grad for p in params]
    try:
        for batch in progress_bar(
            iter_batches(batches), enabled=show, desc=f"importances ({name})", total=num_batches(batches)
        ):
            x = data.inputs(batch_input(batch, name=name), batches_seen)
            y = batch_labels(batch, name=name) if kind == "fisher" else None
            x = x.to(device, non_blocking=True)
            for p in params:
                p.grad = None
            out = check_logits(graded_forward(model, x, precision), x.shape[0])
            if y is not None:
                y = data.labels(y, batches_seen, x.shape[0], out.shape[1]).to(device, non_blocking=True)
            batch_loss(out, y, kind).backward(inputs=params)
            grads = [p.grad for p in params]
            if any(g is None for g in grads):  # parameters this batch did not reach keep their sum
                pairs = [(a, g) for a, g in zip(acc_list, grads) if g is not None]
                if pairs:
                    ops.accumulate_importance_([a for a, _ in pairs], [g for _, g in pairs], mode)
            elif checked:
                accumulate(acc_list, grads, mode, 1.0)
            else:
                ops.accumulate_importance_(acc_list, grads, mode)
                checked = True
            batches_seen += 1
            num_samples += x.shape[0]
    finally:
        for p, g in zip(params, callers_grads):
            p.grad = g
    if batches_seen == 0 and not distributed.is_active():  # a rank's share may be empty
        raise ValueError(f"{name}: yields no batches (empty)")
    return batches_seen, num_samples
