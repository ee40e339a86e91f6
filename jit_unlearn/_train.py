"""A small supervised training loop (cross-entropy, SGD or Adam) shared by the retrain baseline and the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import _checks as checks
from ._safety import BatchChecks
from ._utils import batch_input, batch_labels, check_logits, model_device, module_mode, progress

_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a model is trained: `epochs` passes over the data in seeded shuffled order, batches of
    `batch_size`, SGD (with `momentum`) or Adam at rate `lr`, decayed by a cosine schedule to 0 over
    all steps (or kept constant), L2 `weight_decay`, cross-entropy with `label_smoothing`.  `seed`
    fixes the shuffling, the dropout noise and, in `retrain`, the model's initialisation."""

    epochs: int = 3
    lr: float = 0.05
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self):
        # A recipe is usually a config section: every bad value is a ValueError naming its key.
        try:
            checks.integer(self.epochs, "epochs", low=0)
            checks.integer(self.batch_size, "batch_size", low=1)
            checks.integer(self.seed, "seed")
            for key in ("lr", "momentum", "weight_decay"):
                checks.real(getattr(self, key), key, low=0)
            checks.real(self.label_smoothing, "label_smoothing", low=0, high=1, high_open=True)
            checks.choice(self.optimizer, "optimizer", _OPTIMIZERS)
            checks.choice(self.schedule, "schedule", _SCHEDULES)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def from_mapping(cls, values: Mapping, **defaults) -> Recipe:
        """A recipe from a dict (e.g. a config section); unknown keys raise ValueError naming the key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                raise ValueError(f"{key}: unknown recipe key; expected some of {sorted(fields)}")
        return cls(**{**defaults, **values})


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def train(model: nn.Module, data, recipe: Recipe, *, show_progress: bool = False, desc: str = "train") -> nn.Module:
    """Train `model` in place on a labelled Dataset (items `(x, ..., y)`, y int64 class indices) with
    cross-entropy, following `recipe`; batches move to the model's device.  The model is in train
    mode while training; each module's own mode is restored afterwards.  Returns the model."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe: expected a Recipe, got {type(recipe).__name__}")
    checks.model(model)
    if len(data) == 0:
        raise ValueError("data: the training set is empty")
    device = model_device(model)
    generator = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(data, batch_size=recipe.batch_size, shuffle=True, generator=generator)
    steps = recipe.epochs * len(loader)
    if steps == 0:
        return model
    optimizer = _optimizer(model, recipe)
    scheduler = None
    if recipe.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    data_checks = BatchChecks("data")

    def batches():
        for _ in range(recipe.epochs):
            yield from loader

    with module_mode(model, True), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        bar = progress(batches(), enabled=show_progress, desc=desc, total=steps)
        for i, batch in enumerate(bar):
            x = data_checks.inputs(batch_input(batch, name="data"), i % len(loader)).to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            out = check_logits(model(x), x.shape[0])
            y = data_checks.labels(batch_labels(batch, name="data"), i % len(loader), x.shape[0], out.shape[1])
            loss = loss_fn(out, y.to(device, non_blocking=True))
            if not torch.isfinite(loss):
                data_checks.verify()
                raise FloatingPointError(f"{desc}: the training loss became {loss.item()}; lower the learning rate")
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        if show_progress:
            bar.close()
    optimizer.zero_grad(set_to_none=True)
    return model
