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
from .config import Experiment
from .errors import UserError, key_error, one_line
from .methods import BASELINES, MethodSpec, call_method, validate_methods
from .preflight import check_model_fits, check_recipe, load_checkpoint, prepare_out
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


# What a failing method, training run or evaluation raises for a bad setting (a diverging loss,
# an lr that overflows, a model that cannot take the data): reported as a user error.
_RUN_ERRORS = (TypeError, ValueError, ArithmeticError, RuntimeError)


def _run_method(spec: MethodSpec, model: nn.Module, splits, factory, incompetent, exp: Experiment) -> float:
    """Run one configured method on `model` in place; returns its wall seconds."""
    forget = _on_device(splits.forget, exp.device) if spec.name == "jit" else splits.forget
    start = time.perf_counter()
    try:
        call_method(
            spec,
            model,
            forget=forget,
            retain=splits.retain,
            train=splits.train,
            factory=factory,
            incompetent=incompetent,
            seed=exp.seed,
            progress=not exp.quiet,
            precision=exp.precision,
        )
    except _RUN_ERRORS as exc:
        raise key_error(spec.where, one_line(f"{spec.label}: {exc}")) from None
    checks.sync(exp.device)
    return time.perf_counter() - start


def _row(method: str, seconds: float | None, record: dict, **extra) -> dict:
    """A result row: `seconds` is the method's own time (training time for the original and the
    retrained model), `eval_seconds` the evaluation's (comparisons included)."""
    record = dict(record)
    eval_seconds = record.pop("seconds")
    return {"method": method, "seconds": seconds, **record, "eval_seconds": eval_seconds, **extra}


def _comparisons(model: nn.Module, row: dict, splits, incompetent: nn.Module, retrained, retrain_row) -> dict:
    """ZRF on the forget set against the incompetent model and, with a retrained model, the JS
    divergence and activation distance to it on the forget set, the parameter distance to it and
    the average gap of the row to its row (docs/BASELINES.md §3); None where there is no retrained
    model.  Adds their time to the row's `eval_seconds`."""
    from ..eval import activation_distance, avg_gap, js_divergence, layer_distance, zrf

    start = time.perf_counter()
    values = {"zrf": zrf(model, incompetent, splits.forget)}
    keys = ("js_to_retrain", "activation_distance_to_retrain", "layer_distance_to_retrain", "avg_gap_to_retrain")
    if retrained is None:
        values.update(dict.fromkeys(keys))
    else:
        values["js_to_retrain"] = js_divergence(model, retrained, splits.forget)
        values["activation_distance_to_retrain"] = activation_distance(model, retrained, splits.forget)
        values["layer_distance_to_retrain"] = layer_distance(model, retrained)
        values["avg_gap_to_retrain"] = avg_gap(row, retrain_row)
    row.update(values)
    row["eval_seconds"] += time.perf_counter() - start
    return row


def run_experiment(exp: Experiment, *, train_ds=None, test_ds=None, coarse_of=None, title: str = "run") -> dict:
    """Train (or load) the original model, optionally retrain the baseline, run every method on a
    fresh copy of the original, evaluate all, print the table and write results.json and
    results.png into exp.out.  Returns the results dict.

    Everything that can be checked is checked before any training: the data and the splits, the
    model against the data, the recipe, every method's parameter values (`validate_methods`), the
    output folder and the checkpoint.  A failure at any point raises UserError naming the config
    key, with one line of explanation."""
    from ..eval import evaluate, retrain

    torch.manual_seed(exp.seed)
    if train_ds is None:
        train_ds, test_ds, coarse_of = _load_data(exp)
    splits = _make_splits(exp, train_ds, test_ds, coarse_of)
    factory = _factory(exp)
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
    check_model_fits(original, splits)
    check_recipe(exp.recipe, original)
    validate_methods(exp.methods, original, splits, factory, seed=exp.seed, precision=exp.precision)
    prepare_out(exp.out)
    # The untrained original: a randomly initialised model of the architecture, the incompetent
    # teacher of bad teaching and the reference of ZRF.
    incompetent = copy.deepcopy(original).eval()
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
        load_checkpoint(original, exp.model.checkpoint)
        train_seconds = None
    else:
        announce(f"training the original {exp.model.name} on {len(splits.train)} samples ({exp.recipe.epochs} epochs)")
        start = time.perf_counter()
        try:
            train(original, splits.train, exp.recipe, show_progress=not exp.quiet, desc="train original")
        except _RUN_ERRORS as exc:
            raise key_error("train", one_line(str(exc))) from None
        checks.sync(exp.device)
        train_seconds = time.perf_counter() - start
        torch.save(original.state_dict(), os.path.join(exp.out, "original.pt"))
    original.eval()

    def evaluated(model: nn.Module, key: str) -> dict:
        try:
            return evaluate(model, splits, seed=exp.seed, progress=not exp.quiet)
        except _RUN_ERRORS as exc:
            raise key_error(key, one_line(f"cannot evaluate the model: {exc}")) from None

    rows = [_row("original", train_seconds, evaluated(original, "model"), kind="original")]
    retrained = None
    if exp.retrain:
        announce(f"retraining from scratch on the {len(splits.retain)} retain samples (the baseline)")
        start = time.perf_counter()
        try:
            retrained = retrain(factory, splits.retain, exp.recipe, device=exp.device, show_progress=not exp.quiet)
        except _RUN_ERRORS as exc:
            raise key_error("train", one_line(str(exc))) from None
        checks.sync(exp.device)
        retrained.eval()
        rows.append(_row("retrain", time.perf_counter() - start, evaluated(retrained, "train"), kind="baseline"))
    retrain_row = rows[1] if retrained is not None else None
    for row, model in zip(rows, (original, retrained)):
        _comparisons(model, row, splits, incompetent, retrained, retrain_row)
    for spec in exp.methods:
        announce(f"{spec.label}: unlearning {len(splits.forget)} samples")
        model = copy.deepcopy(original)
        seconds = _run_method(spec, model, splits, factory, incompetent, exp)
        kind = "comparison" if spec.name in BASELINES else "method"
        row = _row(spec.label, seconds, evaluated(model, spec.where), kind=kind, name=spec.name, params=spec.params)
        rows.append(_comparisons(model, row, splits, incompetent, retrained, retrain_row))
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
    try:
        with open(os.path.join(exp.out, "results.json"), "w") as fh:
            json.dump(_plain(results), fh, indent=2)
    except OSError as exc:
        raise UserError(
            one_line(f"output folder {exp.out}: cannot write results.json ({exc.strerror or exc})")
        ) from None
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
