"""What the baselines share: the report, frozen teacher copies, the distillation divergence, and
the call into the masked fine-tuning loop with every parameter trainable."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from .._safety import protected
from .._utils import as_batches, batch_input, check_logits, first_batch, model_device, module_mode
from ..methods.deletion.finetune import DIVERGED_HINT, prepare_finetune


@dataclass
class BaselineReport:
    """What a baseline did: `method` (its name), `epochs`, optimizer `steps` (retain steps plus any
    forget-pass steps), `final_loss` (mean training loss over the last epoch's retain steps; None
    when no step ran) and `seconds` (wall time of the whole call, teachers included)."""

    method: str
    epochs: int
    steps: int
    final_loss: float | None
    seconds: float


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with gradients off: a teacher that no step can move."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def incompetent_teacher(model: nn.Module, incompetent, seed: int) -> nn.Module:
    """The randomly initialised teacher of bad teaching, frozen, on the model's device.

    `incompetent`: None re-initialises a copy of `model` (every module's own `reset_parameters`,
    under a forked RNG seeded with `seed`: the CPU's, and the model's CUDA device's); an nn.Module is
    copied; a zero-argument factory is called under the same seeded fork.  The caller's RNG state
    is left alone.  Raises ValueError (naming `incompetent`) when a parameter of
    the model lives in a module without `reset_parameters`, since it would keep its trained value."""
    device = model_device(model)
    forked = [device] if device.type == "cuda" else []  # reset_parameters draws on the parameters' device
    if incompetent is None:
        teacher = copy.deepcopy(model)
        stuck = []
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            for name, module in teacher.named_modules():
                own = list(module.named_parameters(recurse=False))
                if not own:
                    continue
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
                else:
                    stuck += [f"{name}.{n}" if name else n for n, _ in own]
        if stuck:
            raise ValueError(
                f"incompetent: parameters {stuck[:5]} belong to modules without reset_parameters, "
                "so a copy of the model cannot be re-initialised; pass a freshly initialised model "
                "or a factory as incompetent="
            )
    elif isinstance(incompetent, nn.Module):
        teacher = copy.deepcopy(incompetent)
    elif callable(incompetent):
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            teacher = incompetent()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"incompetent: the factory must return an nn.Module, returned {type(teacher).__name__}")
    else:
        raise TypeError(
            f"incompetent: expected None, an nn.Module or a zero-argument factory, got {type(incompetent).__name__}"
        )
    teacher = teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)), summed over classes and averaged over the batch: the
    distillation divergence from the teacher's tempered distribution to the student's.
    [B, K] logits -> scalar."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def forget_batches(forget, batch_size: int, seed: int):
    """The forget set as shuffled batches of `batch_size` (seeded with seed + 1, as the loop shuffles
    it); a DataLoader is used as is."""
    if forget is None:
        raise ValueError("forget: is required")
    if isinstance(forget, DataLoader):
        return forget
    return as_batches(
        forget, batch_size, name="forget", shuffle=True, generator=torch.Generator().manual_seed(seed + 1)
    )


def check_teacher_outputs(model: nn.Module, teachers: dict, batches) -> None:
    """One no-grad eval-mode forward of the model and each teacher on the first batch: the logits
    must have the same [B, K] shape (checked before anything changes)."""
    x = batch_input(first_batch(batches, name="forget"), name="forget").to(model_device(model))
    with torch.no_grad(), module_mode(model, False):
        out = check_logits(model(x), x.shape[0])
        for name, teacher in teachers.items():
            t = check_logits(teacher(x), x.shape[0], name=name)
            if t.shape != out.shape:
                raise ValueError(f"{name}: returns logits of shape {tuple(t.shape)}, the model {tuple(out.shape)}")


def random_subset(data, fraction: float, seed: int, name: str):
    """A seeded random `fraction` (at least one sample, in the original order) of a Dataset or
    tensor, drawn once; the source itself when fraction is 1.  A DataLoader cannot be subsampled."""
    if fraction == 1.0:
        return data
    if isinstance(data, DataLoader):
        raise ValueError(
            f"retain_fraction: a DataLoader {name} is used as is; subsample it yourself and pass "
            "retain_fraction=1.0, or pass a Dataset or tensor"
        )
    n = count(data)
    if not n:
        return data  # empty or unsized: the loop reports it
    g = torch.Generator().manual_seed(seed + 2)  # not the shuffling streams (seed, seed + 1)
    keep = torch.randperm(n, generator=g)[: max(1, int(fraction * n))].sort().values
    if isinstance(data, torch.Tensor):
        return data[keep]
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[keep] for t in data.tensors))
    return Subset(data, keep.tolist())


def count(data) -> int | None:
    """The number of samples of a Dataset or tensor; None for a DataLoader or another iterable."""
    if isinstance(data, torch.Tensor):
        return data.shape[0] if data.dim() >= 1 else 0
    if isinstance(data, DataLoader) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        return None
    return len(data)


@dataclass(frozen=True)
class LoopSettings:
    """The fine-tuning loop's settings that every baseline passes through unchanged."""

    lr: float
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    seed: int
    progress: bool
    beta: float = 0.1


def run(
    method: str,
    model: nn.Module,
    forget,
    retain,
    objective,
    loop: LoopSettings,
    *,
    start: float,
) -> BaselineReport:
    """One run of the masked fine-tuning loop with every parameter trainable (mask=None): its
    arguments are checked before any change, the report is built inside the protected call (the
    commit is the last thing that happens), and the model is restored bitwise on any failure."""
    finetune = prepare_finetune(
        model,
        None,
        retain,
        forget=forget,
        objective=objective,
        lr=loop.lr,
        epochs=loop.epochs,
        batch_size=loop.batch_size,
        momentum=loop.momentum,
        weight_decay=loop.weight_decay,
        beta=loop.beta,
        seed=loop.seed,
        progress=loop.progress,
    )

    def body(snapshot) -> BaselineReport:
        fine = finetune(snapshot)
        return BaselineReport(method, loop.epochs, fine.steps, fine.final_loss, time.perf_counter() - start)

    return protected(model, body, method=method, hint=DIVERGED_HINT)
