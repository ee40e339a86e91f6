"""What only the drop-in call sites need: unwrapping framework wrappers, the trainable parameters, the
parameters an optimizer holds, and the value check of importance dicts keyed as their callers key
them.  Argument checks are `_checks`; the snapshot, restore and final NaN/inf check are
`_safety.protected`, as for every method."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..importance.container import _invalid_names


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel or Fabric wrapper (one level, through `.module`),
    else the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of `model` that require gradients."""
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_params(opt) -> set[int]:
    """ids of the parameters a torch.optim.Optimizer holds; TypeError naming `opt` otherwise."""
    groups = getattr(opt, "param_groups", None)
    if not isinstance(groups, list):
        raise TypeError(f"opt: expected a torch.optim.Optimizer, got {type(opt).__name__}")
    return {id(p) for g in groups for p in g["params"]}


def check_importance_values(tensors: Mapping, name: str) -> None:
    """ValueError naming `name[key]` for the first tensor holding a NaN, an inf or a negative value
    (one host sync for all of them; the keys may be anything the caller's dict holds)."""
    bad = _invalid_names(tensors)
    if bad:
        raise ValueError(f"{name}[{bad[0]!r}]: holds NaN, inf or negative values; refusing to dampen with it")
