"""DEL's masked fine-tuning: SGD that moves only the masked entries (and a fully trained head), or
every entry without a mask, with the "finetune", "neggrad_plus" and "relabel" objectives or a
FinetuneObjective (a loss callable per step, optional forget passes).  The argument checks and the
public entry points; the loops are in sgd_loop.py."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ... import _checks as checks
from ..._precision import resolve
from ..._safety import Snapshot, protected
from ..._utils import check_labelled, seeded_batches
from .mask import Mask
from .objective import FinetuneObjective
from .reference import check_mode, reference_batches
from .sgd_loop import FinetuneReport, reference_finetune, run_finetune

__all__ = ["masked_finetune", "prepare_finetune", "FinetuneReport", "OBJECTIVES"]

OBJECTIVES = ("finetune", "neggrad_plus", "relabel")
DIVERGED_HINT = "training diverged: lower lr"


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
