"""Random labels: train on the forget set relabelled with random wrong classes, mixed with retain data."""

from __future__ import annotations

import time

from torch import nn

from .. import _checks as checks
from ._common import BaselineReport, LoopSettings, run


def random_label(
    model: nn.Module,
    forget,
    retain,
    *,
    lr: float = 0.02,
    epochs: int = 3,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
) -> BaselineReport:
    """Fine-tune `model` in place on  CE(retain batch) + CE(forget batch with random wrong labels),
    one forget batch (cycled) per retain step; a forget sample of label y gets y + U{1..K−1} mod K,
    redrawn at every step.

    Source: Graves et al. 2021, "Amnesiac Machine Learning" (AAAI): relabel the sensitive data with
    randomly chosen incorrect labels and train on it briefly; mixed with the retain data as in the
    "amnesiac" baseline of the SSD paper's code (3 epochs).  Changed: the forget term is a separate
    batch-mean cross-entropy added to the retain one (the published baseline shuffles the relabelled
    forget samples into the retain batches, where they weigh by their share of the samples); SGD
    with momentum and a cosine decay to 0.01·lr instead of Adam at 1e-4.

    Args:
        model: classifier returning [B, K] logits; modified in place.
        forget, retain: (x, y) batches, y int64 [B]: DataLoaders (used as is) or Datasets /
            tensors batched by `batch_size` (retain shuffled with `seed`, forget with seed + 1).
        lr, epochs, batch_size, momentum, weight_decay: the SGD loop's settings.
        seed: fixes the shuffling and the random labels.
        progress: show a progress bar per epoch.
    Returns:
        BaselineReport("random_label", epochs, steps, final_loss, seconds).
    Every argument is checked before the model changes; on any failure the model is restored bitwise.
    """
    start = time.perf_counter()
    checks.module(model, "model")
    checks.boolean(progress, "progress")
    loop = LoopSettings(lr, epochs, batch_size, momentum, weight_decay, seed, progress)
    return run("random_label", model, forget, retain, "relabel", loop, start=start)
