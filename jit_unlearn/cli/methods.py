"""The methods a config can name: the unlearning methods and the comparison baselines, how each is
called by an experiment, and the dry validation of their parameter values before any training.

Dry validation calls each configured method, with the config's parameters, on a throwaway copy of
the untrained model and on stand-in data sets of the real sizes whose first read stops the call.
Every method checks its arguments before it reads data, so a bad value (a negative `sigma`, a
`budget` above 1, an unknown `criterion`) is reported before the original model is trained.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import key_error, one_line

__all__ = [
    "METHODS",
    "BASELINES",
    "RESERVED",
    "MethodSpec",
    "method_function",
    "accepts",
    "parse_methods",
    "call_method",
    "validate_methods",
    "check_float_range",
    "StandIn",
]

# Method name in a config -> (module, function, label in tables and plots).
METHODS = {
    "jit": ("jit_unlearn.methods.jit", "jit", "JiT"),
    "ssd": ("jit_unlearn.methods.ssd", "ssd", "SSD"),
    "lf_ssd": ("jit_unlearn.methods.ssd", "lf_ssd", "LF-SSD"),
    "assd": ("jit_unlearn.methods.ssd", "assd", "ASSD"),
    "del": ("jit_unlearn.methods.deletion", "del_unlearn", "DEL"),
    "finetune": ("jit_unlearn.baselines", "finetune", "Finetune"),
    "neggrad_plus": ("jit_unlearn.baselines", "neggrad_plus", "NegGrad+"),
    "random_label": ("jit_unlearn.baselines", "random_label", "RandLabel"),
    "bad_teacher": ("jit_unlearn.baselines", "bad_teacher", "BadTeacher"),
    "scrub": ("jit_unlearn.baselines", "scrub", "SCRUB"),
}
# The comparison baselines of the literature (jit_unlearn.baselines): rows of kind "comparison".
BASELINES = ("finetune", "neggrad_plus", "random_label", "bad_teacher", "scrub")
# Arguments the experiment passes itself; a config may not set them.
RESERVED = ("model", "forget", "full", "retain", "init", "incompetent", "progress")


@dataclass
class MethodSpec:
    """One [[methods]] entry: the method, its label, its keyword arguments, and where it sits in the config."""

    name: str
    label: str
    params: dict
    where: str  # config path, for messages


def method_function(name: str, where: str) -> Callable:
    """The function of config method `name` (a key of METHODS); `where` names it in errors."""
    module, attr, _ = METHODS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise key_error(where, f"jit_unlearn.{attr} is not available in this installation ({exc})") from None


def accepts(fn: Callable, key: str) -> bool:
    """Whether `fn` takes a keyword argument `key`."""
    params = inspect.signature(fn).parameters
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def parse_methods(cfg: Mapping) -> list[MethodSpec]:
    """The [[methods]] entries of a config: names, labels and parameter NAMES checked (values are
    checked by `validate_methods`).  Raises UserError naming the entry or key."""
    if "methods" not in cfg:
        raise key_error("methods", "missing (a list of {name = ..., <parameters>} tables is required)")
    entries = cfg["methods"]
    if not isinstance(entries, list) or not entries:
        raise key_error("methods", 'expected a non-empty list of tables, e.g. [[methods]] name = "jit"')
    specs, labels = [], set()
    for i, entry in enumerate(entries):
        where = f"methods[{i}]"
        if not isinstance(entry, Mapping):
            raise key_error(where, f"expected a table, got {type(entry).__name__}")
        name = entry.get("name")
        if "name" not in entry:
            raise key_error(f"{where}.name", f"missing (one of {list(METHODS)} is required)")
        if not isinstance(name, str) or name not in METHODS:
            raise key_error(f"{where}.name", f"expected one of {list(METHODS)}, got {name!r}")
        label = entry.get("label", METHODS[name][2])
        if not isinstance(label, str):
            raise key_error(f"{where}.label", f"expected a string, got {label!r}")
        fn = method_function(name, where + ".name")
        params = {k: v for k, v in entry.items() if k not in ("name", "label")}
        for key in params:
            if key in RESERVED and accepts(fn, key):
                raise key_error(f"{where}.{key}", "is set by the experiment itself; a config cannot set it")
            if key in RESERVED or not accepts(fn, key):
                accepted = [p for p in inspect.signature(fn).parameters if p not in RESERVED]
                raise key_error(
                    f"{where}.{key}", f"not a parameter of jit_unlearn.{fn.__name__}; expected some of {accepted}"
                )
        if label in labels:
            raise key_error(where + ".label", f"duplicate label {label!r}; give each method entry its own label")
        labels.add(label)
        specs.append(MethodSpec(name, label, params, where))
    return specs


def call_method(
    spec: MethodSpec, model: nn.Module, *, forget, retain, train, factory, incompetent, seed, progress, precision=None
):
    """Run one configured method on `model` (in place) the way an experiment does: JiT on the forget
    samples (already on the model's device), SSD/LF-SSD/ASSD on forget and the whole training set,
    DEL on forget and retain with `factory` as the fresh initialisation, the baselines on forget and
    retain (bad teaching with `incompetent` as its teacher).  The config's parameters are passed as
    they are, `seed` and `progress` where the method takes them, and `precision` (--precision, when
    not None) to every method that takes it and does not set its own.  Returns the method's report."""
    fn = method_function(spec.name, spec.where + ".name")
    kwargs = dict(spec.params)
    if accepts(fn, "seed"):
        kwargs.setdefault("seed", seed)
    if accepts(fn, "progress"):
        kwargs["progress"] = progress
    if precision is not None and accepts(fn, "precision"):
        kwargs.setdefault("precision", precision)
    if spec.name == "jit":
        args = (forget,)
    elif spec.name in ("ssd", "lf_ssd", "assd"):
        args = (forget, train)
    else:
        args = (forget, retain)
        if spec.name == "del":
            kwargs["init"] = factory
        elif spec.name == "bad_teacher":
            kwargs["incompetent"] = incompetent
    return fn(model, *args, **kwargs)


def check_float_range(value, key: str, dtype: torch.dtype) -> None:
    """A finite float config value must fit `dtype` (the model's parameters), or the method computes
    with inf: raises UserError naming `key` otherwise."""
    if not dtype.is_floating_point or isinstance(value, bool) or not isinstance(value, float):
        return
    top = torch.finfo(dtype).max
    if math.isfinite(value) and abs(value) > top:
        raise key_error(key, f"{value!r} overflows the model's {str(dtype).replace('torch.', '')} (largest {top:.4g})")


class _Validated(BaseException):
    """Raised by a stand-in data set when a method first reads it: its argument checks have passed.
    A BaseException, so that no method's error handling can take it for a data error."""


class StandIn(Dataset):
    """The data of a dry validation: a stand-in for a data set of `size` samples that stops the
    method's call at its first read."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        raise _Validated


def validate_methods(
    specs: list[MethodSpec], model: nn.Module, splits, factory, *, seed: int, precision: str | None = None
) -> None:
    """Check every configured method's parameter values before anything is trained.

    Each float parameter must fit the model's dtype; then each method is called on a copy of `model`
    (the untrained original; it is not changed) with the config's parameters and stand-ins of the
    forget, retain and training sets of the real sizes, and stops at its first read of them.  The
    global RNG state is left as it was.  Raises UserError naming the method entry and the argument."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for spec in specs:
        for key, value in spec.params.items():
            check_float_range(value, f"{spec.where}.{key}", dtype)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    stand_in = {
        "forget": StandIn(len(splits.forget)),
        "retain": StandIn(len(splits.retain)),
        "train": StandIn(len(splits.train)),
    }
    for spec in specs:
        scratch = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                call_method(
                    spec,
                    scratch,
                    **stand_in,
                    factory=factory,
                    incompetent=scratch,
                    seed=seed,
                    progress=False,
                    precision=precision,
                )
            except _Validated:
                pass
            except (TypeError, ValueError, ArithmeticError, RuntimeError) as exc:
                raise key_error(spec.where, one_line(f"{spec.label}: {exc}")) from None
        del scratch
