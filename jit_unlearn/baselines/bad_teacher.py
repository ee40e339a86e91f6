"""Bad teaching: distil the competent model on retain data and a randomly initialised one on forget data."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .. import FinetuneObjective
from .. import _checks as checks
from ..methods.deletion.finetune import check_finetune_args
from ._common import (
    BaselineReport,
    LoopSettings,
    check_teacher_outputs,
    count,
    forget_batches,
    frozen_copy,
    incompetent_teacher,
    kl_to_teacher,
    random_subset,
    run,
)


def bad_teacher(
    model: nn.Module,
    forget,
    retain,
    *,
    incompetent=None,
    temperature: float = 1.0,
    retain_fraction: float = 0.3,
    lr: float = 0.1,
    epochs: int = 1,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> BaselineReport:
    """Train `model` (the student, in place) to match the original model on retain samples and an
    incompetent, randomly initialised teacher on forget samples.

    Each step takes a retain batch x_r and a forget batch x_f and descends
        Σ_{x ∈ x_r} KL(softmax(T_c(x)/τ) ‖ softmax(S(x)/τ)) + Σ_{x ∈ x_f} KL(softmax(T_i(x)/τ) ‖ softmax(S(x)/τ))
    divided by |x_r| + |x_f|, with T_c a frozen copy of the model taken before training, T_i the
    incompetent teacher, S the student, τ = `temperature`; the student sees x_r and x_f in one
    forward.  The forget batch size is ceil(|forget| / retain steps per epoch), so every epoch
    visits each forget and each (subsampled) retain sample once, the mix of the published method.

    Source: Chundawat et al. 2023, "Can Bad Teaching Induce Forgetting? Unlearning in Deep Networks
    Using an Incompetent Teacher" (AAAI): 1 epoch over the forget set plus a random 30 % of the retain
    set, τ = 1, batch 256, Adam at lr 1e-4.  Changed: SGD with momentum and a cosine decay to
    0.01·lr (the package's loop) at a learning rate for small models; the KL is averaged over
    samples, not over samples × classes as the published code's `F.kl_div(reduction="mean")`
    (a factor K folded into the learning rate); batch 128.

    Args:
        model: classifier returning [B, K] logits; modified in place.
        forget, retain: (x, y) batches (labels are not used by the loss): DataLoaders (used as is)
            or Datasets / tensors; retain batched by `batch_size` and shuffled with `seed`.
        incompetent: the bad teacher: None (a copy of the model re-initialised by each module's
            `reset_parameters`, seeded with `seed`), an nn.Module of the same output shape, or a
            zero-argument factory (called under a seeded, forked RNG).
        temperature: τ > 0.
        retain_fraction: share of the retain set used, in (0, 1]: a seeded random subset drawn once
            (Datasets and tensors only; pass 1.0 with a DataLoader).
        lr, epochs, batch_size, momentum, weight_decay: the SGD loop's settings.
        seed: fixes the subset, the shuffling and the default incompetent teacher.
        progress: show a progress bar per epoch.
    Returns:
        BaselineReport("bad_teacher", epochs, steps, final_loss, seconds).
    Every argument is checked before the model changes; on any failure the model is restored bitwise.
    """
    start = time.perf_counter()
    checks.module(model, "model")
    checks.boolean(progress, "progress")
    tau = checks.real(temperature, "temperature", low=0.0, low_open=True)
    fraction = checks.real(retain_fraction, "retain_fraction", low=0.0, high=1.0, low_open=True)
    checks.integer(seed, "seed", low=0)
    checks.integer(batch_size, "batch_size", low=1)
    # The loop's settings too, before the teachers read the first forget batch.
    check_finetune_args(lr, epochs, momentum, weight_decay, 0.0, seed, "finetune", model)
    retain_part = random_subset(retain, fraction, seed, "retain")
    n_retain, n_forget = count(retain_part), count(forget)
    forget_size = batch_size
    if n_retain and n_forget:
        forget_size = math.ceil(n_forget / math.ceil(n_retain / batch_size))
    forget_part = forget_batches(forget, forget_size, seed)
    competent = frozen_copy(model)
    bad = incompetent_teacher(model, incompetent, seed)
    check_teacher_outputs(model, {"incompetent": bad}, forget_part)

    def step_loss(student, x, y, xf, yf):
        with torch.no_grad():
            target = torch.cat([competent(x), bad(xf)])
        return kl_to_teacher(student(torch.cat([x, xf])), target, tau)

    objective = FinetuneObjective(step_loss, pair_forget=True, name="bad_teacher")
    loop = LoopSettings(lr, epochs, batch_size, momentum, weight_decay, seed, progress)
    return run("bad_teacher", model, forget_part, retain_part, objective, loop, start=start)
