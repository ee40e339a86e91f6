"""Running an `Experiment`: data, splits, the original model (trained or loaded), the retrained
baseline, every method on a fresh copy, evaluation, and the results written to disk."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .. import _checks as checks
from .._train import train
from .._utils import module_mode
from .config import Experiment, MethodSpec, accepts, key_error, method_function
from .report import format_table, write_plot

__all__ = ["run_experiment"]


def _load_data(exp: Experiment):
    """(train set, test set or None, coarse_of or None) for the experiment's dataset."""
    from .. import data as data_mod

    ds = exp.dataset
    name, kwargs = ds.name, dict(ds.kwargs)
    try:
        if name.startswith("cifar"):
            sc = exp.scenario
            wants_coarse = name == "cifar100" and sc.kind == "sub_class" and sc.coarse_of is None
            label = "both" if wants_coarse else kwargs.pop("label", "fine")
            train_ds = data_mod.load(name, root=ds.root, train=True, label=label, **kwargs)
            test_ds = data_mod.load(name, root=ds.root, train=False, label=label, **kwargs)
            coarse_of = None
            if wants_coarse:
                x, coarse, fine = train_ds.tensors
                table = torch.full((int(fine.max()) + 1,), -1, dtype=torch.long)
                table[fine] = coarse
                coarse_of = table.tolist()
                train_ds = TensorDataset(x, fine)
                test_ds = TensorDataset(test_ds.tensors[0], test_ds.tensors[2])
            return train_ds, test_ds, coarse_of
        return data_mod.load(name, **kwargs), None, None
    except FileNotFoundError as exc:
        raise key_error("dataset.root", str(exc).partition(": ")[2] or str(exc)) from None
    except TypeError as exc:
        raise key_error("dataset.kwargs", str(exc)) from None
    except ValueError as exc:
        raise key_error("dataset", str(exc)) from None


def _make_splits(exp: Experiment, train_ds, test_ds, coarse_of):
    from ..eval import scenarios

    sc, seed, tf = exp.scenario, exp.seed, exp.dataset.test_fraction
    try:
        if sc.kind == "full_class":
            return scenarios.full_class(train_ds, sc.class_, test_ds, test_fraction=tf, seed=seed)
        if sc.kind == "sub_class":
            coarse = sc.coarse_of if sc.coarse_of is not None else coarse_of
            return scenarios.sub_class(train_ds, sc.fine_class, coarse, test_ds, test_fraction=tf, seed=seed)
        return scenarios.random_subset(train_ds, sc.fraction, seed, test_ds, test_fraction=tf)
    except (TypeError, ValueError) as exc:
        arg, _, message = str(exc).partition(": ")
        key = {"cls": "class", "fine_cls": "fine_class"}.get(arg, arg)
        raise key_error(f"scenario.{key}", message or str(exc)) from None


def _factory(exp: Experiment):
    from .. import models

    def build() -> nn.Module:
        return models.build(exp.model.name, **exp.model.kwargs)

    try:
        build()
    except (TypeError, ValueError) as exc:
        raise key_error("model.kwargs", str(exc)) from None
    return build


def _check_model_fits(model: nn.Module, splits) -> None:
    from ..eval import dataset_labels

    x = splits.retain[0][0].unsqueeze(0).to(next(model.parameters()).device)
    try:
        with torch.no_grad(), module_mode(model, False):
            out = model(x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise key_error(
            "model", f"{_model_name(model)} does not accept this dataset's inputs of shape {list(x.shape[1:])}: {first}"
        ) from None
    classes = int(torch.cat([dataset_labels(splits.retain), dataset_labels(splits.forget)]).max()) + 1
    if out.dim() != 2 or out.shape[1] < classes:
        raise key_error(
            "model.kwargs",
            f"the model outputs {list(out.shape[1:])} logits per sample, "
            f"but the labels need {classes} classes (set num_classes)",
        )


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def _load_checkpoint(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or unsafe file is the user's to fix
        raise key_error(
            "model.checkpoint",
            f"cannot load {path} with weights_only=True: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise key_error("model.checkpoint", f"{path} holds a {type(state).__name__}, expected a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise key_error(
            "model.checkpoint", f"does not fit model {_model_name(model)}: {' '.join(str(exc).split())[:300]}"
        ) from None


def _say(exp: Experiment, message: str) -> None:
    if not exp.quiet:
        print(message, file=sys.stderr, flush=True)


def _on_device(ds: Dataset, device: torch.device) -> Dataset:
    """`ds` as a TensorDataset of (x, y) on `device` (itself on the CPU): JiT wants its forget
    samples where the model is; the other methods move each batch themselves."""
    if device.type == "cpu":
        return ds
    xs, ys = [], []
    for x, *_, y in torch.utils.data.DataLoader(ds, batch_size=1024):
        xs.append(x)
        ys.append(y)
    return TensorDataset(torch.cat(xs).to(device), torch.cat(ys).to(device))


def _run_method(spec: MethodSpec, model: nn.Module, splits, factory, exp: Experiment, forget_on_device):
    fn = method_function(spec.name, spec.where + ".name")
    kwargs = dict(spec.params)
    if accepts(fn, "seed"):
        kwargs.setdefault("seed", exp.seed)
    if accepts(fn, "progress"):
        kwargs["progress"] = not exp.quiet
    if exp.precision is not None and accepts(fn, "precision"):
        kwargs.setdefault("precision", exp.precision)
    if spec.name == "jit":
        args = (forget_on_device,)
    elif spec.name == "del":
        args = (splits.forget, splits.retain)
        kwargs["init"] = factory
    else:
        args = (splits.forget, splits.train)
    try:
        return fn(model, *args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise key_error(spec.where, f"{spec.label}: {exc}") from None


def _row(method: str, seconds: float | None, record: dict, **extra) -> dict:
    """A result row: `seconds` is the method's own time (training time for the original and the
    retrained model), `eval_seconds` the evaluation's."""
    record = dict(record)
    eval_seconds = record.pop("seconds")
    return {"method": method, "seconds": seconds, **record, "eval_seconds": eval_seconds, **extra}


def run_experiment(exp: Experiment, *, train_ds=None, test_ds=None, coarse_of=None, title: str = "run") -> dict:
    """Train (or load) the original model, optionally retrain the baseline, run every method on a
    fresh copy of the original, evaluate all, print the table and write results.json and
    results.png into exp.out.  Returns the results dict."""
    from ..eval import evaluate, retrain

    torch.manual_seed(exp.seed)
    if train_ds is None:
        train_ds, test_ds, coarse_of = _load_data(exp)
    splits = _make_splits(exp, train_ds, test_ds, coarse_of)
    factory = _factory(exp)
    os.makedirs(exp.out, exist_ok=True)
    steps = 2 + int(exp.retrain) + len(exp.methods)
    step = 0

    def announce(text: str) -> None:
        nonlocal step
        step += 1
        _say(exp, f"[{step}/{steps}] {text}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(exp.seed)
        original = factory()
    original = original.to(exp.device)
    _check_model_fits(original, splits)
    summary = splits.summary()
    _say(
        exp,
        f"{title}: {exp.dataset.name}, {summary['retain']} retain / {summary['forget']} forget / "
        f"{summary['test']} test samples, {exp.scenario.kind} scenario, device {exp.device}",
    )
    if exp.precision is not None:
        from .._precision import describe

        _say(exp, f"precision: {describe(exp.precision, exp.device)}")
    if exp.model.checkpoint:
        announce(f"loading the original {exp.model.name} from {exp.model.checkpoint}")
        _load_checkpoint(original, exp.model.checkpoint)
        train_seconds = None
    else:
        announce(f"training the original {exp.model.name} on {len(splits.train)} samples ({exp.recipe.epochs} epochs)")
        start = time.perf_counter()
        train(original, splits.train, exp.recipe, show_progress=not exp.quiet, desc="train original")
        checks.sync(exp.device)
        train_seconds = time.perf_counter() - start
        torch.save(original.state_dict(), os.path.join(exp.out, "original.pt"))
    original.eval()

    def evaluated(model):
        return evaluate(model, splits, seed=exp.seed, progress=not exp.quiet)

    rows = [_row("original", train_seconds, evaluated(original), kind="original")]
    if exp.retrain:
        announce(f"retraining from scratch on the {len(splits.retain)} retain samples (the baseline)")
        start = time.perf_counter()
        baseline = retrain(factory, splits.retain, exp.recipe, device=exp.device, show_progress=not exp.quiet)
        checks.sync(exp.device)
        rows.append(_row("retrain", time.perf_counter() - start, evaluated(baseline.eval()), kind="baseline"))
        del baseline
    for spec in exp.methods:
        announce(f"{spec.label}: unlearning {len(splits.forget)} samples")
        model = copy.deepcopy(original)
        forget_on_device = _on_device(splits.forget, exp.device) if spec.name == "jit" else None
        start = time.perf_counter()
        _run_method(spec, model, splits, factory, exp, forget_on_device)
        checks.sync(exp.device)
        seconds = time.perf_counter() - start
        rows.append(
            _row(spec.label, seconds, evaluated(model), kind="method", name=spec.name, params=dict(spec.params))
        )
        del model
    announce("writing results")
    results = {
        "title": title,
        "dataset": exp.dataset.name,
        "model": exp.model,
        "recipe": dataclasses.asdict(exp.recipe),
        "scenario": {**exp.scenario, **summary},
        "device": str(exp.device),
        "seed": exp.seed,
        "precision": exp.precision,
        "environment": _environment(),
        "rows": rows,
    }
    print(format_table(rows), flush=True)
    plot_note = write_plot(rows, os.path.join(exp.out, "results.png"), title=title)
    results["plot"] = plot_note or "results.png"
    with open(os.path.join(exp.out, "results.json"), "w") as fh:
        json.dump(_plain(results), fh, indent=2)
    if plot_note:
        print(f"note: {plot_note}", file=sys.stderr)
    _say(exp, f"wrote {os.path.join(exp.out, 'results.json')}" + ("" if plot_note else " and results.png"))
    return results


def _plain(value):
    """`value` with NaN/inf as null and tensors as lists, so results.json is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _environment() -> dict:
    import platform

    from .._backend import backend_info

    try:
        backend = backend_info()
    except Exception as exc:  # informational only
        backend = f"unavailable ({exc})"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backend": backend,
    }
