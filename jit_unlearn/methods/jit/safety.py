"""What keeps a JiT run safe in both modes: the errors of non-finite gradients
(the one-sync check itself is `_safety.all_finite`; the snapshot that restores the model and a caller's
optimizer is `_safety.Snapshot`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..._safety import BatchChecks, all_finite

__all__ = ["all_finite", "non_finite_grads", "check_finite_grads"]


def non_finite_grads(step: int) -> FloatingPointError:
    """The error of a step (0-based) whose gradients hold inf or NaN."""
    return FloatingPointError(
        f"jit: non-finite gradients in step {step + 1} (forget batch {step + 1}); "
        "the model was restored.  A smaller lr or a larger sigma may help"
    )


def check_finite_grads(params: Iterable[torch.Tensor], step: int, data: BatchChecks | None = None) -> None:
    """Raise `non_finite_grads(step)` when a parameter's gradient holds inf or NaN (after `data.verify()`,
    which names a forget batch holding NaN or inf instead)."""
    if not all_finite([p.grad for p in params]):
        if data is not None:
            data.verify()
        raise non_finite_grads(step)
