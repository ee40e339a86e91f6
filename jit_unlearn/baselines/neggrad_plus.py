"""NegGrad+: descend on the retain loss while ascending on the forget loss."""

from __future__ import annotations

import time

from torch import nn

from .. import _checks as checks
from ._common import BaselineReport, LoopSettings, run


def neggrad_plus(
    model: nn.Module,
    forget,
    retain,
    *,
    lr: float = 0.02,
    epochs: int = 5,
    beta: float = 0.05,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
) -> BaselineReport:
    """Fine-tune `model` in place on  CE(retain batch) − beta·CE(forget batch),  one forget batch
    (cycled) per retain step.

    Source: Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning" (NeurIPS), the NegGrad+
    baseline: β·CE(retain) − (1 − β)·CE(forget) over retain and forget batches.  Changed: the loss is
    divided by β (so `beta` here is (1 − β)/β of the paper, folded into the learning rate); SGD with
    momentum and a cosine decay to 0.01·lr over all steps; settings for small data sets, about 10
    retain steps per epoch (5 epochs at lr 0.02, like the fine-tuning baseline).  The negated forget
    cross-entropy is unbounded, so `beta` stays small and, on larger data sets, `epochs` should
    shrink with the number of steps per epoch (docs/BASELINES.md gives measured settings); a run
    whose loss diverges is undone (the model restored) and raises.

    Args:
        model: classifier returning [B, K] logits; modified in place.
        forget, retain: (x, y) batches, y int64 [B]: DataLoaders (used as is) or Datasets /
            tensors batched by `batch_size` (retain shuffled with `seed`, forget with seed + 1).
        lr, epochs, batch_size, momentum, weight_decay: the SGD loop's settings.
        beta: weight of the forget ascent term, >= 0.
        seed: fixes the shuffling.
        progress: show a progress bar per epoch.
    Returns:
        BaselineReport("neggrad_plus", epochs, steps, final_loss, seconds).
    Every argument is checked before the model changes; on any failure the model is restored bitwise.
    """
    start = time.perf_counter()
    checks.module(model, "model")
    checks.boolean(progress, "progress")
    loop = LoopSettings(lr, epochs, batch_size, momentum, weight_decay, seed, progress, beta)
    return run("neggrad_plus", model, forget, retain, "neggrad_plus", loop, start=start)
