"""`jit-unlearn demo` (forget one digit of bundled MNIST with every method) and `jit-unlearn run CONFIG`.

Demo setup: the bundled 10,000 MNIST images split 8,000 train / 2,000 test (seeded, stratified),
digit 3 forgotten (808 train images).  Model: `models.ConvNet` at width 16 (conv5x5 16 - ReLU -
maxpool - conv5x5 32 - ReLU - maxpool - Linear 512-128 - ReLU - Linear 10; no BatchNorm, no global
pooling), trained (original and retrain baseline alike) with SGD lr 0.05, momentum 0.9, batch 32,
5 epochs, cosine schedule, label smoothing 0.1: about 99 % test accuracy.  Method hyper-parameters,
chosen so that each one takes forget accuracy from 100 % to at most a few percent (the retrained
model: 0 %) while the test accuracy on the other nine digits stays within about a point of the
original (99.3 %):

    JiT     sigma 1.0, lr 3e-3, N = 25 perturbations, forget batch 128 (default mode, summed loss);
            lr 2e-3 leaves ~6 % forget accuracy, 5e-3 costs ~1.2 points; sigma 0.3 needs lr 1e-3,
            sigma 2.0 lr 1e-2 (and loses ~2 points)
    SSD     alpha 8, lambda 1, batch 64      (alpha 10, the ResNet value, keeps ~17 % here;
            alpha 5 costs ~1.6 points)
    LF-SSD  alpha 5, lambda 1, batch 64      (alpha 10 forgets nothing)
    ASSD    batch 64 (alpha from the percentile rule; the importances depend on the batch size,
            and at batch 128 it keeps ~6 % forget accuracy)
    DEL     budget 0.1, lr 0.1, 3 epochs of masked fine-tuning, batch 128 (budget 0.3 costs ~1.4 points)

Label smoothing matters for JiT: without it, every sigma (0.3-2) and lr that forgets the digit
costs the other digits 4.5-7.5 points.  So does the training recipe: after 3 epochs at batch 64
(98.8 %) no JiT setting forgets within 2.5 points.
`models.SmallCNN` (BatchNorm, global average pooling) is not used: JiT cannot forget one class on
it selectively (forget and other-class accuracy fall together at every sigma and lr tried).
`--fast` trains a width-8 ConvNet on a 1,200-image subset with smaller method budgets; it checks
the pipeline, not the forgetting.  `run` takes any model.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ._train import Recipe, train
from ._utils import module_mode

EXIT_USER_ERROR = 2

# Method name in a config -> (public function of jit_unlearn, label in tables and plots).
METHODS = {
    "jit": ("jit", "JiT"),
    "ssd": ("ssd", "SSD"),
    "lf_ssd": ("lf_ssd", "LF-SSD"),
    "assd": ("assd", "ASSD"),
    "del": ("del_unlearn", "DEL"),
}
SCENARIOS = ("full_class", "sub_class", "random")
DATASETS = ("mnist", "digits", "synthetic_cifar", "cifar10", "cifar100")

DEMO_FORGET_CLASS = 3
DEMO_TEST_FRACTION = 0.2
DEMO_MODEL = {"name": "convnet", "kwargs": {"width": 16, "hidden": 128, "num_classes": 10}}
DEMO_RECIPE = {"epochs": 5, "lr": 0.05, "batch_size": 32, "optimizer": "sgd", "momentum": 0.9, "label_smoothing": 0.1}
DEMO_METHODS = [
    {"name": "jit", "sigma": 1.0, "lr": 3e-3, "num_samples": 25, "batch_size": 128},
    {"name": "ssd", "alpha": 8.0, "lam": 1.0, "batch_size": 64},
    {"name": "lf_ssd", "alpha": 5.0, "lam": 1.0, "batch_size": 64},
    {"name": "assd", "batch_size": 64},
    {"name": "del", "budget": 0.1, "lr": 0.1, "epochs": 3, "batch_size": 128},
]
# --fast: a stratified 1,200-image subset, a narrow net, small method budgets; for tests.
FAST_SUBSET = 1200
FAST_MODEL = {"name": "convnet", "kwargs": {"width": 8, "hidden": 32, "num_classes": 10}}
FAST_RECIPE = {**DEMO_RECIPE, "epochs": 3}
FAST_OVERRIDES = {"jit": {"num_samples": 4}, "del": {"epochs": 1}}


CONFIG_EXAMPLE = """example config (TOML; the same keys work in JSON):

  seed = 0                      # splits, training, methods, MIA folds
  device = "auto"               # cpu | cuda | cuda:N | auto
  out = "runs/cifar10_class0"   # results.json, results.png, original.pt
  retrain = true                # also train the retrain-from-scratch reference

  [dataset]
  name = "cifar10"              # mnist | digits | synthetic_cifar | cifar10 | cifar100
  root = "/data"                # cifar: the folder holding cifar-10-batches-py / cifar-100-python
  # kwargs = { ... }            # passed to jit_unlearn.data.load; test_fraction = 0.2 for the
                                # one-split sets (mnist, digits, synthetic_cifar)
  [model]
  name = "resnet18"             # mlp | small_cnn | convnet | resnet18
  kwargs = { num_classes = 10 }
  checkpoint = "resnet18.pt"    # a state_dict, loaded with weights_only=True; omit to train one

  [train]                       # the recipe for the original (no checkpoint) and the retrain
  epochs = 30
  lr = 0.1
  batch_size = 128              # optimizer = "sgd" | "adam", momentum, weight_decay,
                                # schedule = "cosine" | "constant", label_smoothing, seed
  [scenario]
  kind = "full_class"           # full_class: class = 0 (or a list) | random: fraction = 0.1 |
  class = 0                     # sub_class: fine_class = 69, coarse_of = [...] (cifar100: optional)

  [[methods]]                   # any number; every key but name/label is a keyword argument
  name = "jit"                  # jit | ssd | lf_ssd | assd | del
  sigma = 0.5
  lr = 3e-4

  [[methods]]
  name = "ssd"
  alpha = 10.0
"""


class UserError(Exception):
    """A mistake in the command line or the config: reported as one line, exit code 2."""


def _key_error(key: str, message: str) -> UserError:
    return UserError(f"config key '{key}': {message}")


# ---------------------------------------------------------------- config reading and validation

def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"CONFIG: no such file: {path}")
    with open(path, "rb") as fh:
        raw = fh.read()
    is_json = path.lower().endswith(".json") or raw.lstrip()[:1] == b"{"
    try:
        if is_json:
            cfg = json.loads(raw.decode("utf-8"))
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ModuleNotFoundError:
                    raise UserError(f"{path}: reading TOML needs Python >= 3.11 or the tomli package; "
                                    "use a JSON config instead") from None
            cfg = tomllib.loads(raw.decode("utf-8"))
    except UserError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if is_json else "TOML"
        raise UserError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: the top level must be a table/object, got {type(cfg).__name__}")
    return cfg


def _table(cfg: Mapping, key: str, prefix: str = "", *, required: bool = True) -> dict:
    full = prefix + key
    if key not in cfg:
        if required:
            raise _key_error(full, "missing (a table is required)")
        return {}
    value = cfg[key]
    if not isinstance(value, Mapping):
        raise _key_error(full, f"expected a table, got {type(value).__name__}")
    return dict(value)


def _no_unknown(section: Mapping, allowed: Sequence[str], prefix: str) -> None:
    for key in section:
        if key not in allowed:
            raise _key_error(prefix + key, f"unknown key; expected some of {sorted(allowed)}")


def _typed(section: Mapping, key: str, types, what: str, prefix: str, default=None, *, required=False):
    if key not in section:
        if required:
            raise _key_error(prefix + key, f"missing ({what} is required)")
        return default
    value = section[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _key_error(prefix + key, f"expected {what}, got {value!r}")
    if not isinstance(value, types):
        raise _key_error(prefix + key, f"expected {what}, got {value!r}")
    return value


def _choice(section: Mapping, key: str, choices: Sequence[str], prefix: str, *, required=True, default=None):
    value = _typed(section, key, str, f"one of {list(choices)}", prefix, default, required=required)
    if value is not None and value not in choices:
        raise _key_error(prefix + key, f"expected one of {list(choices)}, got {value!r}")
    return value


@dataclasses.dataclass
class MethodSpec:
    name: str
    label: str
    params: dict
    where: str  # config path, for messages


@dataclasses.dataclass
class Experiment:
    dataset: dict
    model: dict
    recipe: Recipe
    scenario: dict
    methods: list[MethodSpec]
    retrain: bool
    device: torch.device
    seed: int
    out: str
    quiet: bool


def _method_function(name: str, where: str):
    import jit_unlearn

    attr = METHODS[name][0]
    try:
        return getattr(jit_unlearn, attr)
    except (ImportError, AttributeError) as exc:
        raise _key_error(where, f"jit_unlearn.{attr} is not available in this installation ({exc})") from None


def _accepts(fn, key: str) -> bool:
    params = inspect.signature(fn).parameters
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _parse_methods(cfg: Mapping) -> list[MethodSpec]:
    if "methods" not in cfg:
        raise _key_error("methods", "missing (a list of {name = ..., <parameters>} tables is required)")
    entries = cfg["methods"]
    if not isinstance(entries, list) or not entries:
        raise _key_error("methods", "expected a non-empty list of tables, e.g. [[methods]] name = \"jit\"")
    specs, labels = [], set()
    for i, entry in enumerate(entries):
        where = f"methods[{i}]"
        if not isinstance(entry, Mapping):
            raise _key_error(where, f"expected a table, got {type(entry).__name__}")
        name = _choice(entry, "name", list(METHODS), where + ".")
        fn = _method_function(name, where + ".name")
        label = _typed(entry, "label", str, "a string", where + ".", METHODS[name][1])
        params = {k: v for k, v in entry.items() if k not in ("name", "label")}
        reserved = {"model", "forget", "full", "retain", "init", "progress"}
        for key in params:
            if key in reserved or not _accepts(fn, key):
                accepted = [p for p in inspect.signature(fn).parameters if p not in reserved]
                raise _key_error(f"{where}.{key}", f"not a parameter of jit_unlearn.{fn.__name__}; "
                                 f"expected some of {accepted}")
        if label in labels:
            raise _key_error(where + ".label", f"duplicate label {label!r}; give each method entry its own label")
        labels.add(label)
        specs.append(MethodSpec(name, label, params, where))
    return specs


def _device(value: str | None) -> torch.device:
    if value in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UserError(f"device: not a torch device: {value!r} (e.g. cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {value!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device: {value!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return device


def parse_config(cfg: Mapping, *, device=None, seed=None, out=None, quiet=False) -> Experiment:
    """Validate a config dict (from TOML or JSON) into an Experiment; command-line values override
    the config's `device`, `seed` and `out`.  Raises UserError naming the offending key."""
    _no_unknown(cfg, ("dataset", "model", "train", "scenario", "methods", "retrain", "device", "seed", "out"), "")
    dataset = _table(cfg, "dataset")
    _no_unknown(dataset, ("name", "root", "kwargs", "test_fraction"), "dataset.")
    name = _choice(dataset, "name", DATASETS, "dataset.")
    if name.startswith("cifar"):
        _typed(dataset, "root", str, "a folder path", "dataset.", required=True)
    kwargs = _table(dataset, "kwargs", "dataset.", required=False)
    tf = _typed(dataset, "test_fraction", (int, float), "a number in (0, 1)", "dataset.", DEMO_TEST_FRACTION)
    if not 0.0 < tf < 1.0:
        raise _key_error("dataset.test_fraction", f"expected a number in (0, 1), got {tf!r}")
    dataset = {"name": name, "root": dataset.get("root"), "kwargs": kwargs, "test_fraction": float(tf)}

    model = _table(cfg, "model")
    _no_unknown(model, ("name", "kwargs", "checkpoint"), "model.")
    model = {"name": _choice(model, "name", ("mlp", "small_cnn", "convnet", "resnet18"), "model."),
             "kwargs": _table(model, "kwargs", "model.", required=False),
             "checkpoint": _typed(model, "checkpoint", str, "a file path", "model.")}
    if model["checkpoint"] is not None and not os.path.isfile(model["checkpoint"]):
        raise _key_error("model.checkpoint", f"no such file: {model['checkpoint']}")

    if seed is None:
        seed = _typed(cfg, "seed", int, "an int", "", 0)
    recipe_cfg = _table(cfg, "train", required=False)
    try:
        recipe = Recipe.from_mapping(recipe_cfg, seed=seed)
    except (TypeError, ValueError) as exc:
        key, _, message = str(exc).partition(": ")
        raise _key_error(f"train.{key}", message) from None

    scenario = _table(cfg, "scenario")
    kind = _choice(scenario, "kind", SCENARIOS, "scenario.")
    allowed = {"full_class": ("kind", "class"), "sub_class": ("kind", "fine_class", "coarse_of"),
               "random": ("kind", "fraction")}[kind]
    _no_unknown(scenario, allowed, "scenario.")
    if kind == "full_class":
        cls = _typed(scenario, "class", (int, list), "a class label (int) or a list of them", "scenario.",
                     required=True)
        if isinstance(cls, list) and (not cls or any(isinstance(c, bool) or not isinstance(c, int) for c in cls)):
            raise _key_error("scenario.class", f"expected a class label (int) or a non-empty list of them, got {cls!r}")
    elif kind == "sub_class":
        _typed(scenario, "fine_class", int, "a fine class label (int)", "scenario.", required=True)
        if "coarse_of" in scenario:
            co = scenario["coarse_of"]
            if not isinstance(co, list) or any(isinstance(c, bool) or not isinstance(c, int) for c in co):
                raise _key_error("scenario.coarse_of", "expected a list of ints: the coarse label of each fine label")
        elif name != "cifar100":
            raise _key_error("scenario.coarse_of", f"missing; needed for sub_class on {name} "
                             "(only cifar100 carries its own coarse labels)")
    else:
        fr = _typed(scenario, "fraction", (int, float), "a number in (0, 1)", "scenario.", required=True)
        if not 0.0 < fr < 1.0:
            raise _key_error("scenario.fraction", f"expected a number in (0, 1), got {fr!r}")

    methods = _parse_methods(cfg)
    do_retrain = _typed(cfg, "retrain", bool, "true or false", "", True)
    dev = device if device is not None else _typed(cfg, "device", str, "a device name", "", "auto")
    out = out if out is not None else _typed(cfg, "out", str, "a folder path", "", "jit_unlearn_run")
    return Experiment(dataset, model, recipe, dict(scenario), methods, do_retrain, _device(dev), seed, out, quiet)


# ---------------------------------------------------------------- data, model, scenario

def _load_data(exp: Experiment):
    """(train set, test set or None, coarse_of or None) for the experiment's dataset."""
    from . import data as data_mod

    ds = exp.dataset
    name, kwargs = ds["name"], dict(ds["kwargs"])
    try:
        if name.startswith("cifar"):
            sc = exp.scenario
            wants_coarse = name == "cifar100" and sc["kind"] == "sub_class" and "coarse_of" not in sc
            label = "both" if wants_coarse else kwargs.pop("label", "fine")
            train_ds = data_mod.load(name, root=ds["root"], train=True, label=label, **kwargs)
            test_ds = data_mod.load(name, root=ds["root"], train=False, label=label, **kwargs)
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
        raise _key_error("dataset.root", str(exc).partition(": ")[2] or str(exc)) from None
    except TypeError as exc:
        raise _key_error("dataset.kwargs", str(exc)) from None
    except ValueError as exc:
        raise _key_error("dataset", str(exc)) from None


def _make_splits(exp: Experiment, train_ds, test_ds, coarse_of):
    from .eval import scenarios

    sc, seed, tf = exp.scenario, exp.seed, exp.dataset["test_fraction"]
    try:
        if sc["kind"] == "full_class":
            return scenarios.full_class(train_ds, sc["class"], test_ds, test_fraction=tf, seed=seed)
        if sc["kind"] == "sub_class":
            return scenarios.sub_class(train_ds, sc["fine_class"], sc.get("coarse_of", coarse_of), test_ds,
                                       test_fraction=tf, seed=seed)
        return scenarios.random_subset(train_ds, sc["fraction"], seed, test_ds, test_fraction=tf)
    except (TypeError, ValueError) as exc:
        arg, _, message = str(exc).partition(": ")
        key = {"cls": "class", "fine_cls": "fine_class"}.get(arg, arg)
        raise _key_error(f"scenario.{key}", message or str(exc)) from None


def _factory(exp: Experiment):
    from . import models

    def build() -> nn.Module:
        return models.build(exp.model["name"], **exp.model["kwargs"])

    try:
        build()
    except (TypeError, ValueError) as exc:
        raise _key_error("model.kwargs", str(exc)) from None
    return build


def _check_model_fits(model: nn.Module, splits) -> None:
    from .eval import dataset_labels

    x = splits.retain[0][0].unsqueeze(0).to(next(model.parameters()).device)
    try:
        with torch.no_grad(), module_mode(model, False):
            out = model(x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _key_error("model", f"{_model_name(model)} does not accept this dataset's inputs of shape "
                         f"{list(x.shape[1:])}: {first}") from None
    classes = int(torch.cat([dataset_labels(splits.retain), dataset_labels(splits.forget)]).max()) + 1
    if out.dim() != 2 or out.shape[1] < classes:
        raise _key_error("model.kwargs", f"the model outputs {list(out.shape[1:])} logits per sample, "
                         f"but the labels need {classes} classes (set num_classes)")


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def _load_checkpoint(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or unsafe file is the user's to fix
        raise _key_error("model.checkpoint", f"cannot load {path} with weights_only=True: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise _key_error("model.checkpoint", f"{path} holds a {type(state).__name__}, expected a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise _key_error("model.checkpoint", f"does not fit model {_model_name(model)}: "
                         f"{' '.join(str(exc).split())[:300]}") from None


# ---------------------------------------------------------------- running

def _say(exp: Experiment, message: str) -> None:
    if not exp.quiet:
        print(message, file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    fn = _method_function(spec.name, spec.where + ".name")
    kwargs = dict(spec.params)
    if _accepts(fn, "seed"):
        kwargs.setdefault("seed", exp.seed)
    if _accepts(fn, "progress"):
        kwargs["progress"] = not exp.quiet
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
        raise _key_error(spec.where, f"{spec.label}: {exc}") from None


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
    from .eval import evaluate, retrain

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
    _say(exp, f"{title}: {exp.dataset['name']}, {summary['retain']} retain / {summary['forget']} forget / "
              f"{summary['test']} test samples, {exp.scenario['kind']} scenario, device {exp.device}")
    if exp.model["checkpoint"]:
        announce(f"loading the original {exp.model['name']} from {exp.model['checkpoint']}")
        _load_checkpoint(original, exp.model["checkpoint"])
        train_seconds = None
    else:
        announce(f"training the original {exp.model['name']} on {len(splits.train)} samples "
                 f"({exp.recipe.epochs} epochs)")
        start = time.perf_counter()
        train(original, splits.train, exp.recipe, show_progress=not exp.quiet, desc="train original")
        _sync(exp.device)
        train_seconds = time.perf_counter() - start
        torch.save(original.state_dict(), os.path.join(exp.out, "original.pt"))
    original.eval()

    def evaluated(model):
        return evaluate(model, splits, seed=exp.seed, progress=not exp.quiet)

    rows = [_row("original", train_seconds, evaluated(original), kind="original")]
    if exp.retrain:
        announce(f"retraining from scratch on the {len(splits.retain)} retain samples (the reference)")
        start = time.perf_counter()
        baseline = retrain(factory, splits.retain, exp.recipe, device=exp.device, show_progress=not exp.quiet)
        _sync(exp.device)
        rows.append(_row("retrain", time.perf_counter() - start, evaluated(baseline.eval()), kind="reference"))
        del baseline
    for spec in exp.methods:
        announce(f"{spec.label}: unlearning {len(splits.forget)} samples")
        model = copy.deepcopy(original)
        forget_on_device = _on_device(splits.forget, exp.device) if spec.name == "jit" else None
        start = time.perf_counter()
        _run_method(spec, model, splits, factory, exp, forget_on_device)
        _sync(exp.device)
        seconds = time.perf_counter() - start
        rows.append(_row(spec.label, seconds, evaluated(model), kind="method", name=spec.name,
                         params=dict(spec.params)))
        del model
    announce("writing results")
    results = {
        "title": title,
        "dataset": exp.dataset["name"],
        "model": exp.model,
        "recipe": dataclasses.asdict(exp.recipe),
        "scenario": {**exp.scenario, **summary},
        "device": str(exp.device),
        "seed": exp.seed,
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

    from ._backend import backend_info

    try:
        backend = backend_info()
    except Exception as exc:  # informational only
        backend = f"unavailable ({exc})"
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "backend": backend}


COLUMNS = [("method", "method", "{}"), ("seconds", "seconds", "{:.1f}"), ("forget_acc", "forget acc", "{:.1%}"),
           ("retain_acc", "retain acc", "{:.1%}"), ("test_acc", "test acc", "{:.1%}"),
           ("test_acc_remaining", "test acc (other classes)", "{:.1%}"), ("entropy_mia", "entropy MIA", "{:.1%}"),
           ("loss_mia", "loss MIA", "{:.1%}")]


def format_table(rows: Sequence[Mapping]) -> str:
    """A plain-text table of result rows (accuracies and MIAs in percent, seconds of the method)."""
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        line = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            line.append("-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_plot(rows: Sequence[Mapping], path: str, *, title: str = "") -> str | None:
    """Bar charts of forget / other-class test accuracy / entropy MIA per row, and method seconds.
    Returns None on success, or a note when matplotlib is not installed (nothing is written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    names = [r["method"] for r in rows]
    metrics = [("forget_acc", "forget acc"), ("test_acc_remaining", "test acc, other classes"),
               ("entropy_mia", "entropy MIA"), ("loss_mia", "loss MIA")]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        values = [100 * (r.get(key) if r.get(key) is not None else float("nan")) for r in rows]
        ax.bar([i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))], values, width, label=label)
    reference = next((r for r in rows if r.get("kind") == "reference"), None)
    if reference is not None:
        ax.axhline(100 * reference["forget_acc"], color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(metrics), fontsize=8, frameon=False)
    ax.set_title(title or "unlearning results")
    timed = [r for r in rows if r.get("kind") != "original" and r.get("seconds") is not None]
    seconds = [r["seconds"] for r in timed]
    bars = ax_t.barh([r["method"] for r in timed], seconds,
                     color=["gray" if r.get("kind") == "reference" else "C0" for r in timed])
    ax_t.bar_label(bars, labels=[f"{s:.1f} s" for s in seconds], padding=3, fontsize=8)
    ax_t.set_xlim(0, 1.25 * max(seconds, default=1.0))
    ax_t.invert_yaxis()
    ax_t.set_xlabel("seconds (retrain: training from scratch)")
    ax_t.set_title("time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- commands

def demo_experiment(*, device=None, seed=None, out=None, quiet=False, fast=False, forget_class=DEMO_FORGET_CLASS):
    methods = []
    for entry in DEMO_METHODS:
        entry = dict(entry)
        if fast:
            entry.update(FAST_OVERRIDES.get(entry["name"], {}))
        methods.append(entry)
    cfg = {
        "dataset": {"name": "mnist", "test_fraction": DEMO_TEST_FRACTION},
        "model": FAST_MODEL if fast else DEMO_MODEL,
        "train": FAST_RECIPE if fast else DEMO_RECIPE,
        "scenario": {"kind": "full_class", "class": forget_class},
        "methods": methods,
    }
    return parse_config(cfg, device=device, seed=seed, out=out or "jit_unlearn_demo", quiet=quiet)


def _demo(args) -> int:
    from . import data as data_mod
    from .eval import train_test_split

    if not 0 <= args.forget_class <= 9:
        raise UserError(f"--forget-class: expected a digit 0-9, got {args.forget_class}")
    exp = demo_experiment(device=args.device, seed=args.seed, out=args.out, quiet=args.quiet, fast=args.fast,
                          forget_class=args.forget_class)
    ds: Dataset = data_mod.mnist()
    if args.fast:
        _, ds = train_test_split(ds, FAST_SUBSET / len(ds), seed=exp.seed)
    title = f"MNIST, forget digit {args.forget_class}" + (" (fast)" if args.fast else "")
    run_experiment(exp, train_ds=ds, title=title)
    return 0


def _run(args) -> int:
    cfg = _read_config(args.config)
    exp = parse_config(cfg, device=args.device, seed=args.seed, out=args.out, quiet=args.quiet)
    run_experiment(exp, title=os.path.splitext(os.path.basename(args.config))[0])
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's, else auto)")
    common.add_argument("--seed", type=int, default=None, help="seed for splits, training and methods (default 0)")
    common.add_argument("--out", default=None, help="output folder for results.json, results.png, original.pt")
    common.add_argument("--quiet", action="store_true", help="no progress bars or step messages; only the table")
    parser = argparse.ArgumentParser(prog="jit-unlearn", description="Machine unlearning: demo and experiments.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,run}")
    demo = sub.add_parser("demo", parents=[common], help="unlearn one MNIST digit with every method, vs retraining",
                          description="Train a small CNN on bundled MNIST and a retrained baseline, unlearn one "
                                      "digit with JiT, SSD, LF-SSD, ASSD and DEL, and compare (hyper-parameters "
                                      "tuned for digit 3; see the jit_unlearn.cli module docstring).")
    demo.add_argument("--fast", action="store_true", help="a tiny subset and budgets (seconds; for tests)")
    demo.add_argument("--forget-class", type=int, default=DEMO_FORGET_CLASS, help="the digit to forget (default 3)")
    run = sub.add_parser("run", parents=[common], help="run an experiment described by a TOML or JSON file",
                         description="Run a TOML/JSON experiment: dataset, model, train, scenario, methods.",
                         epilog=CONFIG_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", help="path to the .toml or .json experiment file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jit-unlearn` command; returns the exit status (2 for user errors)."""
    args = _parser().parse_args(argv)
    try:
        if args.seed is not None and args.seed < 0:
            raise UserError(f"--seed: expected an int >= 0, got {args.seed}")
        return _demo(args) if args.command == "demo" else _run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
