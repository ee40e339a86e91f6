"""DEL's masked fine-tuning: SGD that moves only the masked entries (and a fully trained head), or
every entry without a mask, with the "finetune", "neggrad_plus" and "relabel" objectives or a
FinetuneObjective (a loss callable per step, optional forget passes)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import _checks as checks
from ..._precision import Precision, graded_forward, resolve
from ..._safety import BatchChecks, LabelTap, Snapshot, protected
from ..._utils import (
    batch_input,
    batch_labels,
    check_labelled,
    check_logits,
    counted,
    model_device,
    module_mode,
    params_finite,
    seeded_batches,
)
from ..._utils import progress as _progress
from .mask import Mask
from .objective import FinetuneObjective
from .reference import check_mode, reference_batches, run_reference_finetune

__all__ = ["masked_finetune", "prepare_finetune", "FinetuneReport", "OBJECTIVES"]

OBJECTIVES = ("finetune", "neggrad_plus", "relabel")
DIVERGED_HINT = "training diverged: lower lr"


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


def head_parameter_names(model: nn.Module, head) -> list[str]:
    """Parameter names of the named head module(s)."""
    if head is None:
        return []
    heads = [head] if isinstance(head, str) else list(head)
    names = []
    for h in heads:
        if not isinstance(h, str):
            raise TypeError(f"head: expected a module name (str) or a list of them, got {type(h).__name__}")
        try:
            module = model.get_submodule(h)
        except AttributeError:
            raise ValueError(f"head: the model has no submodule {h!r}") from None
        names += [f"{h}.{n}" if h else n for n, _ in module.named_parameters()]
    return names


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


def check_finetune_args(lr, epochs, momentum, weight_decay, beta, seed, objective, model: nn.Module) -> None:
    """The fine-tuning arguments of `masked_finetune` and `del_unlearn` (the learning rate must fit
    the dtype of the model's parameters)."""
    if not isinstance(objective, FinetuneObjective):
        checks.choice(objective, "objective", OBJECTIVES)
    checks.real(lr, "lr", low=0.0, low_open=True)
    checks.fits_dtype(lr, "lr", {p.dtype for p in model.parameters()})
    checks.integer(epochs, "epochs", low=0)
    checks.real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
    checks.real(weight_decay, "weight_decay", low=0.0)
    checks.real(beta, "beta", low=0.0)
    checks.integer(seed, "seed", low=0)


def finetune_batches(retain, forget, objective, batch_size: int, seed: int):
    """(retain batches, forget batches or None) for a fine-tuning run, seeded and checked for labels."""
    retain_batches = seeded_batches(retain, batch_size, "retain", shuffle=True, seed=seed)
    try:
        len(retain_batches)
    except TypeError:
        raise TypeError("retain: must have a length (a DataLoader, Dataset or tensor) to run several epochs") from None
    check_labelled(retain_batches, "retain")
    forget_batches = None
    custom = objective if isinstance(objective, FinetuneObjective) else None
    if custom.uses_forget if custom is not None else objective != "finetune":
        if forget is None:
            label = custom.name if custom is not None else objective
            raise ValueError(f"forget: is required for objective={label!r}")
        forget_batches = seeded_batches(forget, batch_size, "forget", shuffle=True, seed=seed + 1)
        if custom is not None and custom.pass_epochs > 0:
            try:
                len(forget_batches)
            except TypeError:
                raise TypeError(
                    "forget: must have a length (a DataLoader, Dataset or tensor) for the forget passes"
                ) from None
        check_labelled(forget_batches, "forget")
    return retain_batches, forget_batches


def masked_finetune(
    model: nn.Module,
    mask: Mask | None,
    retain,
    *,
    forget=None,
    objective: str | FinetuneObjective = "finetune",
    lr: float,
    epochs: int,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    beta: float = 0.1,
    seed: int = 0,
    head=None,
    mode: str = "default",
    progress: bool = True,
    precision: str = "float32",
) -> FinetuneReport:
    """Train only the masked entries of `model` (plus the `head` module fully), in place.

    Args:
        mask: Mask from `localize` (or built by hand) matching the model's parameter names/shapes;
            None trains every trainable parameter (plain fine-tuning; default mode only).
        retain: (x, y) batches (DataLoader used as is; tensors / Datasets are shuffled with `seed`).
        forget: (x, y) batches, needed by "neggrad_plus" and "relabel" (cycled, one per retain step)
            and by a FinetuneObjective that reads them (tensors / Datasets shuffled with seed + 1).
        objective: "finetune": CE(retain); "neggrad_plus": CE(retain) − beta·CE(forget);
            "relabel": CE(retain) + CE(forget with labels y + U{1..K−1} mod K, redrawn each step);
            or a FinetuneObjective: a loss callable per step and optional passes over the forget set
            (default mode only).
        lr, epochs: SGD learning rate, cosine-annealed to 0.01·lr over all steps: epochs·len(retain),
            plus the forget-pass steps of a FinetuneObjective.
        momentum, weight_decay: SGD momentum (buffer starts at the first gradient) and L2 penalty;
            neither ever moves an unmasked entry: unmasked entries stay bitwise unchanged.
        beta: weight of the forget ascent term of "neggrad_plus" (>= 0; small, since the negated
            forget CE is unbounded).
        head: module name (or list of names) whose parameters train fully; None trains only the mask.
        mode: "default", or "reference" for the published loop (docs/METHODS.md §3.2; objective
            "finetune" only): torch.optim.SGD with the gradients multiplied by the mask, so weight
            decay > 0 moves unmasked entries too, CosineAnnealingLR(T_max=epochs, eta_min=0.01·lr)
            stepped per epoch, no batch read ahead; a given `forget` loader is opened each epoch and
            read alongside, unused, as the published loop does.  The caller's `.grad` is kept.
        precision: "float32" (the model's dtype; the default), "bfloat16" (forwards and backwards
            under autocast; gradients, momentum and updates stay float32), "float16" (CUDA only;
            changes nothing here) or "auto" (bfloat16 where the hardware runs it fast).  It applies
            to the named objectives in the default mode; "reference" mode and a FinetuneObjective
            run the model as it is, and take only "float32" or "auto" (which then means float32).
    The model trains in train mode (BatchNorm statistics update) and gets its modes back afterwards;
    on any failure parameters and buffers are restored bitwise.
    Returns:
        FinetuneReport(objective, epochs, steps, trainable entries, final_loss, seconds).
    """
    body = prepare_finetune(
        model,
        mask,
        retain,
        forget=forget,
        objective=objective,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        beta=beta,
        seed=seed,
        head=head,
        mode=mode,
        progress=progress,
        precision=precision,
    )
    return protected(model, body, method="masked_finetune", hint=DIVERGED_HINT)


def prepare_finetune(
    model: nn.Module,
    mask: Mask | None,
    retain,
    *,
    forget=None,
    objective: str | FinetuneObjective = "finetune",
    lr: float,
    epochs: int,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    beta: float = 0.1,
    seed: int = 0,
    head=None,
    mode: str = "default",
    progress: bool = True,
    precision: str = "float32",
) -> Callable[[Snapshot], FinetuneReport]:
    """Check the arguments of `masked_finetune` (the same ones) and return the run as a body for
    `_safety.protected`: callers that add to the report (the baselines) build theirs inside the
    same protected call, so that the commit stays the last thing they do."""
    checks.model(model)
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask: expected a jit_unlearn.Mask or None, got {type(mask).__name__}")
    check_finetune_args(lr, epochs, momentum, weight_decay, beta, seed, objective, model)
    checks.integer(batch_size, "batch_size", low=1)
    check_mode(mode, objective=objective)
    if mask is None and mode == "reference":
        raise ValueError("mask: mode='reference' fine-tunes a Mask; pass one (all True for every entry)")
    if mask is not None:
        mask.check(model)
    prec = resolve(precision, model)
    if prec.reduced and (mode == "reference" or isinstance(objective, FinetuneObjective)):
        if precision != "auto":
            what = "mode='reference'" if mode == "reference" else "a FinetuneObjective"
            raise ValueError(f"precision: {what} runs the model in its own dtype; use 'float32' or 'auto'")
        prec = resolve("float32", model)
    head_names = head_parameter_names(model, head)
    if mode == "reference":
        retain_batches = reference_batches(retain, batch_size, "retain", shuffle=True, seed=seed)
        forget_batches = None if forget is None else reference_batches(forget, batch_size, "forget")
    else:
        retain_batches, forget_batches = finetune_batches(retain, forget, objective, batch_size, seed)

    def body(snapshot) -> FinetuneReport:
        if mode == "reference":
            return reference_finetune(
                model,
                mask,
                retain_batches,
                forget_batches,
                lr=float(lr),
                epochs=epochs,
                momentum=float(momentum),
                weight_decay=float(weight_decay),
                head_names=head_names,
                show=progress,
            )
        return run_finetune(
            model,
            mask,
            retain_batches,
            forget_batches,
            objective=objective,
            lr=float(lr),
            epochs=epochs,
            momentum=float(momentum),
            weight_decay=float(weight_decay),
            beta=float(beta),
            seed=seed,
            head_names=head_names,
            show=progress,
            precision=prec,
        )

    return body
