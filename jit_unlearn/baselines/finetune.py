"""Fine-tuning on the retain set: the cheapest baseline, and the floor every method should beat."""

from __future__ import annotations

import time

from torch import nn

from .. import _checks as checks
from ._common import BaselineReport, LoopSettings, run


def finetune(
    model: nn.Module,
    forget,
    retain,
    *,
    lr: float = 0.02,
    epochs: int = 5,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
) -> BaselineReport:
    """Train `model` in place on the retain set alone with cross-entropy, hoping it drifts away
    from what only the forget set taught it ("catastrophic forgetting" as unlearning).

    Source: the fine-tuning baseline of Golatkar et al. 2020 ("Eternal Sunshine of the Spotless
    Net"), with the settings of the SSD paper's code (Foster et al. 2024): 5 epochs on the retain
    set at lr 0.02.  Changed: the schedule is the package's fine-tuning loop (SGD with
    momentum, cosine decay to 0.01·lr over all steps) instead of a one-cycle schedule.

    Args:
        model: classifier returning [B, K] logits; modified in place (train mode during training,
            each module's mode restored afterwards).
        forget: not read (may be None); accepted so that every method is called the same way.
        retain: (x, y) batches, y int64 [B]: a DataLoader (used as is) or a Dataset / tensors,
            batched by `batch_size` and shuffled with `seed`.
        lr, epochs, batch_size, momentum, weight_decay: the SGD loop's settings.
        seed: fixes the shuffling.
        progress: show a progress bar per epoch.
    Returns:
        BaselineReport("finetune", epochs, steps, final_loss, seconds).
    Every argument is checked before the model changes; on any failure (KeyboardInterrupt
    included, or a diverging loss) the model is restored bitwise.
    """
    start = time.perf_counter()
    checks.module(model, "model")
    checks.boolean(progress, "progress")
    loop = LoopSettings(lr, epochs, batch_size, momentum, weight_decay, seed, progress)
    return run("finetune", model, None, retain, "finetune", loop, start=start)
