"""A custom objective for the masked fine-tuning loop: a loss callable per step and optional passes
over the forget set (the hook that the distillation baselines use)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ... import _checks as checks

__all__ = ["FinetuneObjective"]


@dataclass(frozen=True)
class FinetuneObjective:
    """A custom objective for `masked_finetune`, given in place of a named one.

    Args:
        step_loss: `step_loss(model, x, y, xf, yf) -> scalar tensor`, the loss of one step on the
            retain batch (x, y) (on the model's device); (xf, yf) is the paired forget batch when
            `pair_forget`, else (None, None).
        pair_forget: draw one forget batch (cycled) for every retain step.
        forget_pass_loss: `forget_pass_loss(model, xf, yf) -> scalar tensor`; in each of the first
            `forget_pass_epochs` epochs (clipped to the run's epochs), one pass over the forget
            batches, one step per batch descending this loss, comes before the retain pass.  Forget
            passes share the optimizer state and the learning-rate schedule with the retain steps.
        forget_pass_epochs: int >= 0.
        name: the label of the report and the progress bar.
    """

    step_loss: Callable[..., torch.Tensor]
    pair_forget: bool = False
    forget_pass_loss: Callable[..., torch.Tensor] | None = None
    forget_pass_epochs: int = 0
    name: str = "custom"

    def __post_init__(self):
        if not callable(self.step_loss):
            raise TypeError(f"step_loss: expected a callable, got {type(self.step_loss).__name__}")
        if self.forget_pass_loss is not None and not callable(self.forget_pass_loss):
            raise TypeError(
                f"forget_pass_loss: expected a callable or None, got {type(self.forget_pass_loss).__name__}"
            )
        checks.boolean(self.pair_forget, "pair_forget")
        checks.integer(self.forget_pass_epochs, "forget_pass_epochs", low=0)
        if not isinstance(self.name, str):
            raise TypeError(f"name: expected a str, got {type(self.name).__name__}")

    @property
    def pass_epochs(self) -> int:
        """Epochs that begin with a forget pass (0 without a forget_pass_loss)."""
        return self.forget_pass_epochs if self.forget_pass_loss is not None else 0

    @property
    def uses_forget(self) -> bool:
        """Whether the objective reads the forget set at all."""
        return self.pair_forget or self.pass_epochs > 0
