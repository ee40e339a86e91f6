"""What keeps a JiT run safe in both modes: one-sync inf/NaN checks, and a caller's optimizer put back
when the run fails."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch

_FUSED_CHECK_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


def all_finite(
    tensors: Iterable[torch.Tensor | None], found: torch.Tensor | None = None, one: torch.Tensor | None = None
) -> bool:
    """True when no element of `tensors` (None entries skipped) is inf or NaN; one host sync.
    `found` / `one`: float32 [1] buffers on the tensors' device to reuse (found must be 0)."""
    tensors = [t.detach() for t in tensors if t is not None and t.numel() > 0]
    if not tensors:
        return True
    device = tensors[0].device
    if all(t.device == device and t.dtype in _FUSED_CHECK_DTYPES for t in tensors):
        # One fused pass over every tensor: torch's foreach inf/NaN check (the AMP grad-scaler's),
        # with the scale 1.0, which leaves every value bitwise as it was.  A device or dtype that
        # kernel does not cover (e.g. bfloat16 on some backends) takes the generic path below.
        found = torch.zeros(1, dtype=torch.float32, device=device) if found is None else found
        one = torch.ones(1, dtype=torch.float32, device=device) if one is None else one
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
            return not bool(found.item())
        except (RuntimeError, NotImplementedError):
            pass
    # max |t| is inf or NaN exactly when some element is (amax propagates NaN)
    maxima = [t.abs().amax().to(device, torch.float32) for t in tensors]
    return bool(torch.isfinite(torch.stack(maxima)).all())


def non_finite_grads(step: int) -> FloatingPointError:
    """The error of a step (0-based) whose gradients hold inf or NaN."""
    return FloatingPointError(
        f"jit: non-finite gradients in step {step + 1} (forget batch {step + 1}); "
        "the model was restored.  A smaller lr or a larger sigma may help"
    )


def check_finite_grads(params: Iterable[torch.Tensor], step: int) -> None:
    """Raise `non_finite_grads(step)` when a parameter's gradient holds inf or NaN."""
    if not all_finite([p.grad for p in params]):
        raise non_finite_grads(step)


@contextlib.contextmanager
def restore_optimizer_on_failure(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Put a caller's optimizer state (momentum, Adam moments, step counts) back if the body raises."""
    if optimizer is None:
        yield
        return
    saved = copy.deepcopy(optimizer.state_dict())
    try:
        yield
    except BaseException:
        optimizer.load_state_dict(saved)
        raise
