"""The loops of DEL's masked fine-tuning: `run_finetune` (the default mode: masked SGD with momentum
and a per-step cosine schedule, the named objectives or a FinetuneObjective) and `reference_finetune`
(the published loop), each returning a FinetuneReport."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import _checks as checks
from ..._precision import Precision, graded_forward
from ..._safety import BatchChecks, LabelTap
from ..._utils import batch_input, batch_labels, check_logits, counted, model_device, module_mode, params_finite
from ..._utils import progress as _progress
from .mask import Mask
from .objective import FinetuneObjective
from .reference import run_reference_finetune

__all__ = ["FinetuneReport", "run_finetune", "reference_finetune"]


@dataclass
class FinetuneReport:
    """What a masked fine-tuning run did: objective, epochs, optimizer steps, the entries allowed to
    change, the mean loss of the last epoch (None without steps) and wall seconds."""

    objective: str
    epochs: int
    steps: int
    trainable: int  # entries that were allowed to change (mask | head)
    final_loss: float | None  # mean training loss over the last epoch
    seconds: float

    def __str__(self) -> str:
        loss = "no step taken" if self.final_loss is None else f"final loss {self.final_loss:.4g}"
        entries = counted(self.trainable, "trainable entry", "trainable entries")
        return (
            f"masked fine-tuning ({self.objective}): {entries}, "
            f"{counted(self.epochs, 'epoch')}, {counted(self.steps, 'step')}, {loss}; {self.seconds:.3g} s"
        )


def _cycle(batches) -> Iterator:
    """(index within a pass, batch) of the batches again and again (the forget set of the ascent
    objectives is cycled)."""
    while True:
        yielded = False
        for i, batch in enumerate(batches):
            yielded = True
            yield i, batch
        if not yielded:
            raise ValueError("forget: yields no batches (empty)")


def _xy(batch, data: BatchChecks, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's inputs (checked for NaN/inf) and labels (shape and dtype checked; the range is
    checked once the logits show K), both on `device`."""
    x = data.inputs(batch_input(batch, name=data.name), index)
    y = data.labels(batch_labels(batch, name=data.name), index, x.shape[0], None)
    return x.to(device), y.to(device)


def run_finetune(
    model,
    mask: Mask | None,
    retain_batches,
    forget_batches,
    *,
    objective,
    lr,
    epochs,
    momentum,
    weight_decay,
    beta,
    seed,
    head_names,
    show,
    precision: Precision | None = None,
) -> FinetuneReport:
    """SGD with momentum and cosine annealing (to 0.01·lr over every step) on the masked entries
    (on every trainable entry when `mask` is None); the named objectives' forwards and backwards
    run as `precision` says (`_precision.graded_forward`), the updates in the parameters' dtype.

    Unmasked entries stay bitwise fixed by construction, at the cost of one `where` per masked tensor
    per step: the L2 term is added to the gradient and the result is zeroed outside the mask before it
    reaches the momentum buffer.  The buffer of an unmasked entry is then exactly 0 forever
    (0·momentum + 0), and p + (−lr)·0 = p + (−0) = p in IEEE arithmetic for every p, so neither weight
    decay nor momentum can move it.  This is cheaper than restoring from a saved copy (no second copy
    of the model, no extra full-tensor pass) and needs no assumption about torch.optim internals.

    `objective` is a name of OBJECTIVES or a FinetuneObjective, whose forget passes count in the
    schedule's steps and share the momentum buffers."""
    start = time.perf_counter()
    custom = objective if isinstance(objective, FinetuneObjective) else None
    label = custom.name if custom is not None else objective
    device = model_device(model)
    named = dict(model.named_parameters())
    head = set(head_names)
    train = []  # (param, mask or None for fully trainable)
    for name, p in named.items():
        if not p.requires_grad:
            continue
        if mask is None or name in head:
            train.append((p, None))
        elif name in mask and bool(mask[name].any()):
            train.append((p, mask[name].to(p.device)))
    trainable = sum(p.numel() if m is None else int(m.sum()) for p, m in train)
    steps_per_epoch = len(retain_batches)
    pass_epochs = min(custom.pass_epochs, epochs) if custom is not None else 0
    total_steps = epochs * steps_per_epoch + (pass_epochs * len(forget_batches) if pass_epochs else 0)
    if not train or total_steps == 0:
        return FinetuneReport(label, epochs, 0, trainable, None, time.perf_counter() - start)
    params = [p for p, _ in train]
    buffers: list[torch.Tensor | None] = [None] * len(train)
    eta_min = 0.01 * lr
    rng = torch.Generator().manual_seed(seed)
    pair = custom.pair_forget if custom is not None else objective != "finetune"
    forget_iter = _cycle(forget_batches) if pair else None
    # a custom loss reads the labels itself: they are checked eagerly, from a hook on the model's forward
    retain_data = BatchChecks("retain", defer=False if custom is not None else None)
    forget_data = BatchChecks("forget", defer=False if custom is not None else None)
    tap = LabelTap(model) if custom is not None else None
    step, final_loss = 0, None

    def sgd_step(loss: torch.Tensor) -> None:
        nonlocal step
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        lr_t = eta_min + 0.5 * (lr - eta_min) * (1.0 + math.cos(math.pi * step / total_steps))
        with torch.no_grad():
            for i, ((p, m), g) in enumerate(zip(train, grads)):
                if g is None:
                    g = torch.zeros_like(p)
                if weight_decay:
                    g = g.add(p, alpha=weight_decay)
                if m is not None:
                    g = torch.where(m, g, 0.0)
                if buffers[i] is None or momentum == 0:
                    buffers[i] = g  # a fresh tensor: autograd.grad's result or a new one
                else:
                    buffers[i].mul_(momentum).add_(g)
                p.add_(buffers[i], alpha=-lr_t)
        step += 1

    def check_finite(loss: float) -> None:
        retain_data.verify()
        forget_data.verify()
        if not math.isfinite(loss) or not params_finite(params):
            raise RuntimeError(f"masked_finetune: training diverged (loss {loss}); lower lr. The model was restored.")

    def labelled(data: BatchChecks, index: int, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _xy(batch, data, index, device)
        if tap is not None:  # checked against the logits when the custom loss runs the model on x
            tap.expect(x, y, data, index)
        return x, y

    def logits_and_labels(data: BatchChecks, index: int, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _xy(batch, data, index, device)
        out = check_logits(graded_forward(model, x, precision), x.shape[0])
        return out, data.labels(y, index, x.shape[0], out.shape[1])

    desc = f"DEL {label}" if mask is not None else label
    try:
        with module_mode(model, True):
            for epoch in _progress(range(epochs), enabled=show, desc=desc):
                if epoch < pass_epochs:
                    pass_sum = torch.zeros((), dtype=torch.float64, device=device)
                    for j, fb in enumerate(forget_batches):
                        loss = custom.forget_pass_loss(model, *labelled(forget_data, j, fb))
                        sgd_step(loss)
                        pass_sum += loss.detach()
                    check_finite(float(pass_sum))
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                for i, batch in enumerate(retain_batches):
                    if custom is not None:
                        x, y = labelled(retain_data, i, batch)
                        xf, yf = labelled(forget_data, *next(forget_iter)) if forget_iter is not None else (None, None)
                        loss = custom.step_loss(model, x, y, xf, yf)
                    else:
                        out, y = logits_and_labels(retain_data, i, batch)
                        loss = F.cross_entropy(out, y)
                        if forget_iter is not None:
                            out_f, yf = logits_and_labels(forget_data, *next(forget_iter))
                            if objective == "neggrad_plus":
                                loss = loss - beta * F.cross_entropy(out_f, yf)
                            else:
                                k = out_f.shape[1]
                                shift = torch.randint(1, max(k, 2), yf.shape, generator=rng).to(device)
                                loss = loss + F.cross_entropy(out_f, (yf + shift) % k)
                    sgd_step(loss)
                    loss_sum += loss.detach()
                final_loss = float(loss_sum) / steps_per_epoch
                check_finite(final_loss)
    finally:
        if tap is not None:
            tap.remove()
    checks.sync(device)
    return FinetuneReport(label, epochs, step, trainable, final_loss, time.perf_counter() - start)


def reference_finetune(model, mask: Mask, retain_batches, forget_batches, **kwargs) -> FinetuneReport:
    """`run_reference_finetune` (the published loop, docs/METHODS.md §3.2) timed into a FinetuneReport."""
    start = time.perf_counter()
    steps, trainable, final_loss = run_reference_finetune(model, mask, retain_batches, forget_batches, **kwargs)
    return FinetuneReport("finetune", kwargs["epochs"], steps, trainable, final_loss, time.perf_counter() - start)
