"""What an experiment checks before it trains anything: the model fits the data, the training
recipe's numbers fit the model's dtype, the checkpoint loads, fits the model and is finite, and the
output folder can be written.  Every failure is a one-line UserError naming the config key."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping

import torch
from torch import nn

from .._train import Recipe
from .._utils import module_mode
from .errors import UserError, key_error, one_line
from .methods import check_float_range

__all__ = ["check_model_fits", "check_recipe", "load_checkpoint", "prepare_out", "first_line"]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def check_model_fits(model: nn.Module, splits) -> None:
    """One no-grad eval-mode forward of a retain sample: the model must take the data's inputs and
    output [1, K] logits with K at least the number of classes of the labels."""
    from ..eval import dataset_labels

    x = splits.retain[0][0].unsqueeze(0).to(next(model.parameters()).device)
    try:
        with torch.no_grad(), module_mode(model, False):
            out = model(x)
    except RuntimeError as exc:
        raise key_error(
            "model",
            one_line(
                f"{_model_name(model)} does not accept this dataset's inputs of shape {list(x.shape[1:])}: "
                f"{first_line(exc)}"
            ),
        ) from None
    classes = int(torch.cat([dataset_labels(splits.retain), dataset_labels(splits.forget)]).max()) + 1
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < classes:
        shape = list(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise key_error(
            "model.kwargs",
            f"the model outputs {shape} logits per sample, but the labels need {classes} classes (set num_classes)",
        )


def check_recipe(recipe: Recipe, model: nn.Module) -> None:
    """The [train] recipe's float settings must fit the model's dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for field in dataclasses.fields(recipe):
        check_float_range(getattr(recipe, field.name), f"train.{field.name}", dtype)


def _names(items: list[str], limit: int = 3, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _misfit(model: nn.Module, state: Mapping) -> str | None:
    """Why `state` does not fit `model`, in one short sentence; None when names and shapes agree."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} is {list(state[k].shape)} in the checkpoint, {list(own[k].shape)} in the model"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) of another shape: {_names(shapes, 2, '; ')}")
    if missing:
        parts.append(f"{len(missing)} model entries missing from the checkpoint: {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint entries the model does not have: {_names(unexpected)}")
    return "; ".join(parts) or None


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state_dict (or {"state_dict": ...}) from `path` with weights_only=True into `model`.
    Raises UserError ("model.checkpoint") when the file cannot be read safely, does not fit the model
    (names and shapes, then the model's own check), or holds NaN or inf; the model is unchanged then."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or unsafe file is the user's to fix
        raise key_error(
            "model.checkpoint", one_line(f"cannot load {path} with weights_only=True: {first_line(exc)}")
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise key_error("model.checkpoint", f"{path} holds a {type(state).__name__}, expected a state_dict")
    hint = " (is [model] name/kwargs the architecture it was saved from?)"
    reason = _misfit(model, state)
    if reason is not None:
        raise key_error("model.checkpoint", one_line(f"{path} does not fit model {_model_name(model)}: {reason}{hint}"))
    bad = [
        k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise key_error("model.checkpoint", one_line(f"{path} holds NaN or inf in {_names(bad)}"))
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise key_error(
            "model.checkpoint", one_line(f"{path} does not fit model {_model_name(model)}: {exc}{hint}")
        ) from None


def prepare_out(out: str) -> None:
    """Create the output folder `out` (and its parents) and make sure a file can be written in it."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise UserError(one_line(f"output folder {out}: cannot write there ({reason})")) from None
