"""The DEL driver (docs/METHODS.md §3): localize, reset the selected entries to a fresh
initialisation, and fine-tune them on the retain set."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ... import _checks as checks
from ... import ops
from ..._precision import resolve
from ..._safety import protected
from ..._utils import check_labelled, counted, model_device, params_finite, seeded_batches
from .finetune import check_finetune_args, finetune_batches, head_parameter_names, reference_finetune, run_finetune
from .localize import CRITERIA, GRANULARITIES, localize
from .mask import Mask
from .reference import check_mode, reference_batches, reference_reset_

__all__ = ["del_unlearn", "DELReport"]


@dataclass
class DELReport:
    """What a `del_unlearn` call did: the mask and its statistics, the fine-tuning run, and the
    seconds of each phase (`seconds` is their sum)."""

    mask: Mask
    fraction: float  # selected fraction of all scored parameters
    layer_fractions: dict[str, float]
    masked: int  # selected entries
    total: int  # scored entries (all trainable floating parameters)
    head: str | None  # module trained fully, if any
    epochs: int
    steps: int
    final_loss: float | None
    seconds_localize: float
    seconds_reset: float
    seconds_finetune: float
    precision: str = "float32"  # what the model's passes ran in ("auto" resolved)
    seconds: float = field(init=False)

    def __post_init__(self):
        self.seconds = self.seconds_localize + self.seconds_reset + self.seconds_finetune

    def __str__(self) -> str:
        head = f", head {self.head!r} trained fully" if self.head else ""
        tensors = sum(1 for f in self.layer_fractions.values() if f > 0)
        loss = "no step taken" if self.final_loss is None else f"final loss {self.final_loss:.4g}"
        if self.precision != "float32":
            loss += f", {self.precision} passes"
        return (
            f"del: reset and fine-tuned {self.masked:,} of {self.total:,} entries ({100 * self.fraction:.3g}%) "
            f"in {tensors} of {len(self.layer_fractions)} tensors{head}; "
            f"{counted(self.epochs, 'epoch')}, {counted(self.steps, 'step')}, {loss}; {self.seconds:.3g} s (localize "
            f"{self.seconds_localize:.3g} s, reset {self.seconds_reset:.3g} s, fine-tune {self.seconds_finetune:.3g} s)"
        )


def _last_linear(model: nn.Module) -> str:
    """Name of the model's last nn.Linear module (the default classifier head)."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError(
            "head: the model has no nn.Linear to train as the classifier head; "
            "name the head module or pass head_trainable=False"
        )
    return name


def _init_state(init, model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The init parameters, checked against the model's names and shapes.  A factory runs under a
    forked CPU RNG seeded with `seed`, so the fresh initialisation is reproducible and the caller's
    global RNG state is left alone."""
    if isinstance(init, nn.Module):
        state = init.state_dict()
    elif isinstance(init, Mapping):
        state = init
    elif callable(init):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = init()
        if isinstance(built, nn.Module):
            state = built.state_dict()
        elif isinstance(built, Mapping):
            state = built
        else:
            raise TypeError(
                f"init: the factory must return an nn.Module or a state_dict, returned {type(built).__name__}"
            )
    else:
        raise TypeError(
            f"init: expected a state_dict, an nn.Module or a zero-argument factory, got {type(init).__name__}"
        )
    model_state = model.state_dict()
    unexpected = [n for n in state if n not in model_state]
    if unexpected:
        raise ValueError(f"init: names that the model does not have: {unexpected[:5]}")
    out = {}
    for name, p in model.named_parameters():
        if name not in state:
            raise ValueError(f"init: missing parameter {name!r}")
        t = state[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"init[{name!r}]: expected a floating tensor")
        if t.is_meta:
            raise ValueError(f"init[{name!r}]: is on the meta device (a shape without values); init needs real values")
        if t.shape != p.shape:
            raise ValueError(f"init[{name!r}]: shape {tuple(t.shape)} differs from the model's {tuple(p.shape)}")
        out[name] = t
    return out


def del_unlearn(
    model: nn.Module,
    forget,
    retain,
    *,
    init,
    budget: float = 0.3,
    lr: float = 0.015,
    epochs: int = 30,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    head_trainable: bool = True,
    head: str | None = None,
    criterion: str = "weighted_grad",
    granularity: str = "channel",
    top_fraction: float | None = 0.1,
    seed: int = 0,
    mode: str = "default",
    progress: bool = True,
    precision: str = "float32",
) -> DELReport:
    """DEL: localize (docs/METHODS.md §3 steps 1-3), reset the selected entries to `init`, fine-tune them on retain.

    Args:
        model: classifier returning [B, K] logits (a tensor, or `.logits` / "logits" of its output); modified in place.
        forget, retain: (x, y) batches: DataLoaders (used as is) or tensors / Datasets batched by
            `batch_size` (retain shuffled with `seed`).  y int64 [B].
        init: a freshly initialised copy of the architecture: a state_dict, an nn.Module, or a
            zero-argument factory (run under torch.manual_seed(seed) in a forked RNG).  Its names and
            shapes must match the model's; it is checked before anything changes.
        budget, criterion, granularity, top_fraction: see `localize`.
        lr, epochs, momentum, weight_decay: masked SGD fine-tuning, see `masked_finetune`.
        head_trainable: train the classifier head fully: the module named `head`, by default the last
            nn.Linear of the model.
        mode: "default" (the fixed method) or "reference" (the published code), see Modes.
        precision: what the scoring and fine-tuning passes run in: "float32" (the model's dtype;
            the default), "bfloat16" (under autocast; gradients and updates stay float32),
            "float16" (CUDA only; changes nothing here: both passes backpropagate) or "auto"
            (bfloat16 where the hardware runs it fast).  Mode "reference" takes "float32" or
            "auto" (which then means float32).
    Returns:
        DELReport with the mask, its statistics, epochs, steps and seconds per phase.

    Modes (docs/METHODS.md §3.2, §3.3):
        "reference": the published code operation for operation: scores add θ ⊙ ∇θ(−CE_b) batch by
            batch in the parameter dtype; the ranking is `torch.argsort` of the negated flat scores
            (ties fall as that sort puts them); the reset is the blend θ·(1 − m) + θ_init·m;
            torch.optim.SGD with masked gradients (weight decay > 0 then moves unmasked entries, the
            published bug); CosineAnnealingLR(T_max=epochs, eta_min=0.01·lr) stepped per epoch; no
            batch read ahead, and each epoch opens the forget loader and reads it alongside the
            retain batches, unused, as the published loop does.  criterion "weighted_grad" or "grad".
            Kept from the default: h = max(1, ·) (the published code scores layers with < 10 output
            channels NaN, never selecting them), h capped at the row length, the checks below.
        "default" differs from it in: (1) the score is θ ⊙ Σ_b ∇θ CE_b, summed in float32 (float64
            for float64 models); (2) ties go to the lower flat index (a stable ranking); (3) the reset
            is a select, which differs from the blend only in the sign of zeros (and where inf·0 would
            give NaN); (4) the cosine schedule is closed-form and stepped per optimizer step; (5) one
            batch of each loader is read before anything changes, and the forget loader is not read
            while fine-tuning; (6) weight decay never moves unmasked entries; (7) gradients come from
            torch.autograd.grad, so `.grad` is not used; (8) criterion "random" is available.
    Both modes check the arguments, the init and the scores before any parameter is written, check
    the loss and the parameters after every epoch, and restore the model bitwise on any failure
    (including KeyboardInterrupt); they never write NaN or inf into the parameters.
    """
    checks.model(model)
    checks.choice(criterion, "criterion", CRITERIA)
    checks.choice(granularity, "granularity", GRANULARITIES)
    checks.real(budget, "budget", low=0.0, high=1.0, low_open=True)
    if top_fraction is not None:
        checks.real(top_fraction, "top_fraction", low=0.0, high=1.0, low_open=True)
    check_finetune_args(lr, epochs, momentum, weight_decay, 0.0, seed, "finetune", model)
    checks.integer(batch_size, "batch_size", low=1)
    checks.boolean(head_trainable, "head_trainable")
    check_mode(mode, criterion=criterion)
    prec = resolve(precision, model, plain="mode='reference' (the published code)" if mode == "reference" else None)
    state = _init_state(init, model, seed)
    head_name = (head if head is not None else _last_linear(model)) if head_trainable else None
    head_names = head_parameter_names(model, head_name)
    forget_batches = None
    if mode == "reference":
        forget_batches = reference_batches(forget, batch_size, "forget")
        retain_batches = reference_batches(retain, batch_size, "retain", shuffle=True, seed=seed)
    else:
        if criterion != "random":
            forget_batches = seeded_batches(forget, batch_size, "forget")
            check_labelled(forget_batches, "forget")
        retain_batches, _ = finetune_batches(retain, None, "finetune", batch_size, seed)
    device = model_device(model)

    def body(snapshot) -> DELReport:
        t0 = time.perf_counter()
        mask = localize(
            model,
            forget_batches,
            criterion=criterion,
            granularity=granularity,
            budget=budget,
            top_fraction=top_fraction,
            seed=seed,
            mode=mode,
            progress=progress,
            precision=prec.name,
        )
        checks.sync(device)
        t1 = time.perf_counter()
        named = dict(model.named_parameters())
        names = list(mask)
        with torch.no_grad():
            targets = [named[n] for n in names]
            values = [state[n].to(device=p.device, dtype=p.dtype) for n, p in zip(names, targets)]
            if mode == "reference":
                reference_reset_(targets, values, [mask[n] for n in names])
            else:
                if not params_finite(v for v, n in zip(values, names) if bool(mask[n].any())):
                    raise ValueError("init: has non-finite values in entries selected for the reset")
                ops.masked_reset_(targets, values, [mask[n] for n in names])
        checks.sync(device)
        t2 = time.perf_counter()
        tune = dict(lr=float(lr), epochs=epochs, momentum=float(momentum), weight_decay=float(weight_decay))
        if mode == "reference":
            fine = reference_finetune(
                model, mask, retain_batches, forget_batches, **tune, head_names=head_names, show=progress
            )
        else:
            fine = run_finetune(
                model,
                mask,
                retain_batches,
                None,
                objective="finetune",
                **tune,
                beta=0.0,
                seed=seed,
                head_names=head_names,
                show=progress,
                precision=prec,
            )
        return DELReport(
            mask=mask,
            fraction=mask.fraction(),
            layer_fractions=mask.layer_fractions(),
            masked=mask.count(),
            total=mask.numel(),
            head=head_name,
            epochs=epochs,
            steps=fine.steps,
            final_loss=fine.final_loss,
            seconds_localize=t1 - t0,
            seconds_reset=t2 - t1,
            seconds_finetune=fine.seconds,
            precision=prec.name,
        )

    return protected(model, body, method="del_unlearn", hint="training diverged: lower lr")
