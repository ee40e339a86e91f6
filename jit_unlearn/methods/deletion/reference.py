"""DEL's reference mode: the published scoring, ranking, reset and fine-tuning loop, operation for
operation (docs/METHODS.md §3.2).  The default mode's versions are in localize.py, finetune.py (with
sgd_loop.py) and unlearn.py; docs/METHODS.md §3.3 lists every difference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import _checks as checks
from ..._safety import BatchChecks
from ..._utils import (
    batch_input,
    batch_labels,
    check_logits,
    model_device,
    module_mode,
    params_finite,
    seeded_batches,
)
from ..._utils import progress as _progress
from .mask import Mask

__all__ = [
    "check_mode",
    "reference_scores",
    "reference_mask",
    "reference_reset_",
    "reference_batches",
    "run_reference_finetune",
]

MODES = ("default", "reference")


def check_mode(mode: str, *, criterion: str = "weighted_grad", objective: str = "finetune") -> None:
    """`mode` is a known mode, and the reference mode is asked only for what the published code does."""
    checks.choice(mode, "mode", MODES)
    if mode == "reference" and criterion == "random":
        raise ValueError("criterion: 'random' has no published form; use mode='default'")
    if mode == "reference" and objective != "finetune":
        raise ValueError(f"objective: mode='reference' runs the published 'finetune' loop only, got {objective!r}")


def reference_scores(
    model: nn.Module, params: list[nn.Parameter], batches, criterion: str, show: bool
) -> list[torch.Tensor]:
    """|S| per parameter, S added batch by batch as θ ⊙ ∇θ(−CE_b) ("weighted_grad") or ∇θ(−CE_b)
    ("grad"), in each parameter's own dtype, starting from zero (docs/METHODS.md §3.2)."""
    device = model_device(model)
    acc = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params]
    seen = 0
    data = BatchChecks("forget")
    with module_mode(model, False), torch.enable_grad():
        for batch in _progress(batches, enabled=show, desc="DEL localize"):
            x = data.inputs(batch_input(batch, name="forget"), seen).to(device)
            out = check_logits(model(x), x.shape[0])
            y = data.labels(batch_labels(batch, name="forget"), seen, x.shape[0], out.shape[1]).to(device)
            loss = -F.cross_entropy(out, y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for a, p, g in zip(acc, params, grads):
                    if g is not None:
                        a.add_(p.detach() * g if criterion == "weighted_grad" else g)
            seen += 1
    if seen == 0:
        raise ValueError("forget: yields no batches (empty)")
    data.verify()
    return [a.abs_() for a in acc]


def reference_mask(
    names: list[str], scores: list[torch.Tensor], granularity: str, budget: float, top_fraction: float | None
) -> Mask:
    """The published channel scores and global ranking: rows of [C_out, -1] take the mean of their
    `torch.topk` (sorted) top-h entries, h = max(1, int(top_fraction·C_out)) capped at the row length
    (the row mean when top_fraction is None), every entry of the row takes it, and the first
    int(budget·P) positions of `torch.argsort` of the negated flat scores are selected."""
    flat = []
    for s in scores:
        if granularity == "channel" and s.dim() >= 2:
            rows = s.reshape(s.shape[0], -1)
            if top_fraction is None:
                row_scores = rows.mean(dim=1)
            else:
                h = min(max(1, int(top_fraction * rows.shape[0])), rows.shape[1])
                row_scores = torch.topk(rows, h, dim=1).values.mean(dim=1)
            s = row_scores[:, None].expand(rows.shape)
        flat.append(s.reshape(-1))
    negated = -torch.cat(flat)
    if not bool(torch.isfinite(negated).all()):
        raise RuntimeError("localize: the scores are not finite (the forget-set gradients overflowed or are NaN)")
    k = int(negated.numel() * budget)
    chosen = torch.zeros(negated.numel(), dtype=torch.bool, device=negated.device)
    chosen[torch.argsort(negated)[:k]] = True
    return Mask({n: m.view(s.shape) for n, s, m in zip(names, scores, chosen.split([s.numel() for s in scores]))})


def reference_reset_(targets: list[torch.Tensor], values: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """θ ← θ·(1 − m) + θ_init·m with m the 0/1 mask, the published blend.  Every new value is formed
    and checked finite before the first is written."""
    new = []
    with torch.no_grad():
        for p, v, m in zip(targets, values, masks):
            w = m.to(device=p.device, dtype=p.dtype)
            new.append(p * (1 - w) + v * w)
        if not params_finite(new):
            raise ValueError(
                "init: the reset θ·(1 − mask) + init·mask has non-finite values (init or the model holds "
                "NaN or inf); the model was not changed"
            )
        for p, t in zip(targets, new):
            p.copy_(t)


def reference_batches(data, batch_size: int, name: str, *, shuffle: bool = False, seed: int = 0):
    """`seeded_batches` without reading a batch ahead: only the length is checked."""
    batches = seeded_batches(data, batch_size, name, shuffle=shuffle, seed=seed)
    try:
        size = len(batches)
    except TypeError:
        if shuffle:
            raise TypeError(
                f"{name}: must have a length (a DataLoader, Dataset or tensor) to run several epochs"
            ) from None
        return batches
    if size == 0:
        raise ValueError(f"{name}: yields no batches (empty)")
    return batches


def run_reference_finetune(
    model: nn.Module,
    mask: Mask,
    retain_batches,
    forget_batches,
    *,
    lr: float,
    epochs: int,
    momentum: float,
    weight_decay: float,
    head_names: list[str],
    show: bool,
) -> tuple[int, int, float | None]:
    """The published fine-tuning loop: torch.optim.SGD(momentum, weight_decay) over every trainable
    parameter, each gradient multiplied by its mask (the head's by 1) before the step, and
    CosineAnnealingLR(T_max=epochs, eta_min=0.01·lr) stepped after each epoch.  Each epoch opens the
    forget loader (when given) before the retain loader and reads one forget batch after each retain
    batch until it runs out, as the published loop does; the forget batches are not used.  The
    caller's `.grad` tensors are put back afterwards.  Returns (steps, trainable entries, mean loss of
    the last epoch or None without steps)."""
    device = model_device(model)
    head = set(head_names)
    params, masks = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        params.append(p)
        if name in head:
            masks.append(None)
        elif name in mask:
            masks.append(mask[name].to(p.device))
        else:
            masks.append(torch.zeros((), dtype=torch.bool, device=p.device))
    trainable = sum(p.numel() if m is None else int(m.sum()) for p, m in zip(params, masks))
    steps_per_epoch = len(retain_batches)
    if not params or epochs * steps_per_epoch == 0:
        return 0, trainable, None
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.01 * lr)
    saved_grads = [p.grad for p in params]
    step, final_loss = 0, None
    data = BatchChecks("retain")
    try:
        with module_mode(model, True):
            for _ in _progress(range(epochs), enabled=show, desc="DEL finetune"):
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                forget_iter = iter(forget_batches) if forget_batches is not None else None
                for i, batch in enumerate(retain_batches):
                    if forget_iter is not None and next(forget_iter, None) is None:
                        forget_iter = None
                    x = data.inputs(batch_input(batch, name="retain"), i).to(device)
                    out = check_logits(model(x), x.shape[0])
                    y = data.labels(batch_labels(batch, name="retain"), i, x.shape[0], out.shape[1]).to(device)
                    loss = F.cross_entropy(out, y)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for p, g, m in zip(params, grads, masks):
                        p.grad = g if g is None or m is None else g * m
                    optimizer.step()
                    loss_sum += loss.detach()
                    step += 1
                schedule.step()
                final_loss = float(loss_sum) / steps_per_epoch
                data.verify()
                if not math.isfinite(final_loss) or not params_finite(params):
                    raise RuntimeError(
                        f"masked_finetune: training diverged (loss {final_loss}); lower lr. The model was restored."
                    )
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
    checks.sync(device)
    return step, trainable, final_loss
