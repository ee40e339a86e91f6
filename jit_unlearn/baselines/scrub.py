"""SCRUB: a student that stays close to the original model on retain data and moves away from it on forget data."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import FinetuneObjective
from .. import _checks as checks
from .._utils import check_logits
from ._common import BaselineReport, LoopSettings, forget_batches, frozen_copy, kl_to_teacher, run


def scrub(
    model: nn.Module,
    forget,
    retain,
    *,
    lr: float = 0.02,
    epochs: int = 5,
    max_epochs: int = 2,
    temperature: float = 4.0,
    alpha: float = 0.001,
    gamma: float = 0.99,
    batch_size: int = 128,
    forget_batch_size: int = 32,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
) -> BaselineReport:
    """SCRUB's max-min steps on `model` (the student, in place) against a frozen copy of it (the
    teacher T, taken before training).

    With d(x) = τ²·KL(softmax(T(x)/τ) ‖ softmax(S(x)/τ)) (batch mean), every epoch e runs, when
    e < `max_epochs`, a max pass: one step per forget batch descending −d(x_f) (ascending the
    divergence), then a min pass: one step per retain batch descending
        γ·CE(S(x_r), y_r) + α·d(x_r).
    Both passes share one SGD optimizer state and one learning-rate schedule.

    Source: Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning" (NeurIPS), Algorithm 1,
    with the settings of its published notebooks: 3 epochs, max steps in the first 2, τ = 4,
    α = 0.001, γ = 0.99, SGD lr 5e-4 (with step decays), momentum 0.9, weight decay 5e-4, retain
    batch 128.  Changed: lr 0.02 with a cosine decay to 0.01·lr (a small model on little data takes
    few steps); 5 epochs, so that the min passes repair the retain accuracy after the last max pass;
    forget batch 32, so that a small forget set still gives several max steps per pass.  The ascent
    is unbounded: on larger data sets (more max steps per pass) lower lr or max_epochs, or raise
    forget_batch_size; a run that diverges is undone (the model restored) and raises.

    Args:
        model: classifier returning [B, K] logits; modified in place.
        forget, retain: (x, y) batches, y int64 [B]: DataLoaders (used as is) or Datasets /
            tensors; retain batched by `batch_size` and shuffled with `seed`, forget batched by
            `forget_batch_size` and shuffled with seed + 1.
        max_epochs: epochs that begin with a max pass (clipped to `epochs`), >= 0.
        temperature: τ > 0.  alpha, gamma: weights of the retain divergence and cross-entropy, >= 0.
        lr, epochs, batch_size, momentum, weight_decay: the SGD loop's settings.
        seed: fixes the shuffling.
        progress: show a progress bar per epoch.
    Returns:
        BaselineReport("scrub", epochs, steps, final_loss (of the min steps), seconds).
    Every argument is checked before the model changes; on any failure the model is restored bitwise.
    """
    start = time.perf_counter()
    checks.module(model, "model")
    checks.boolean(progress, "progress")
    tau = checks.real(temperature, "temperature", low=0.0, low_open=True)
    alpha = checks.real(alpha, "alpha", low=0.0)
    gamma = checks.real(gamma, "gamma", low=0.0)
    checks.integer(max_epochs, "max_epochs", low=0)
    checks.integer(forget_batch_size, "forget_batch_size", low=1)
    checks.integer(seed, "seed", low=0)
    forget_part = forget_batches(forget, forget_batch_size, seed)
    teacher = frozen_copy(model)

    def divergence(student_logits, x):
        with torch.no_grad():
            target = teacher(x)
        return kl_to_teacher(student_logits, target, tau) * (tau * tau)

    def min_loss(student, x, y, xf, yf):
        out = check_logits(student(x), x.shape[0])
        return gamma * F.cross_entropy(out, y) + alpha * divergence(out, x)

    def max_loss(student, xf, yf):
        return -divergence(check_logits(student(xf), xf.shape[0]), xf)

    objective = FinetuneObjective(min_loss, forget_pass_loss=max_loss, forget_pass_epochs=max_epochs, name="scrub")
    loop = LoopSettings(lr, epochs, batch_size, momentum, weight_decay, seed, progress)
    return run("scrub", model, forget_part, retain, objective, loop, start=start)
