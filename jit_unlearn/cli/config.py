"""Reading and validating experiment configs (TOML or JSON) into an `Experiment`.

Each config table is a validated section, as `Recipe` is for [train]: a frozen dataclass that checks
its fields when built, is made from the table by `from_table` (unknown keys rejected), and reads as
the mapping of the keys the config gave.  Every mistake becomes a one-line `UserError` naming the
config key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .. import _checks as checks
from .._train import Recipe
from .errors import UserError, key_error
from .methods import METHODS, RESERVED, MethodSpec, accepts, method_function, parse_methods  # noqa: F401 (re-exported)

SCENARIOS = ("full_class", "sub_class", "random")
DATASETS = ("mnist", "digits", "synthetic_cifar", "cifar10", "cifar100")
MODELS = ("mlp", "small_cnn", "convnet", "resnet18")
DEFAULT_TEST_FRACTION = 0.2


def _section_error(section: str, exc: Exception) -> UserError:
    """A section's "key: message" error as the UserError of "section.key"."""
    key, _, message = str(exc).partition(": ")
    return key_error(f"{section}.{key}" if section else key, message)


def read_config(path: str) -> dict:
    """The config file at `path` as a dict: JSON when it ends with .json or starts with "{", else TOML."""
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
                    raise UserError(
                        f"{path}: reading TOML needs Python >= 3.11 or the tomli package; use a JSON config instead"
                    ) from None
            cfg = tomllib.loads(raw.decode("utf-8"))
    except UserError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if is_json else "TOML"
        raise UserError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: the top level must be a table/object, got {type(cfg).__name__}")
    return cfg


# ---- helpers of the sections: each raises ValueError("key: message")


def _unknown_keys(table: Mapping, allowed: Sequence[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ValueError(f"{key}: unknown key; expected some of {sorted(allowed)}")


def _required(table: Mapping, key: str, what: str):
    if key not in table:
        raise ValueError(f"{key}: missing ({what} is required)")
    return table[key]


def _typed(value, key: str, types: type | tuple[type, ...], what: str):
    """`value` when it is of `types` (a bool only when bool is named), else ValueError."""
    allowed = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise ValueError(f"{key}: expected {what}, got {value!r}")
    return value


def _table(cfg: Mapping, key: str, *, required: bool = True) -> dict:
    if key not in cfg:
        if required:
            raise ValueError(f"{key}: missing (a table is required)")
        return {}
    value = cfg[key]
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: expected a table, got {type(value).__name__}")
    return dict(value)


def _int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in value)


class _Section(Mapping):
    """A validated config table that reads as the mapping of its config keys (see `keys_given`)."""

    def __post_init__(self):
        try:
            self.validate()
        except TypeError as exc:  # a config value of the wrong type is a ValueError naming its key
            raise ValueError(str(exc)) from None

    def validate(self) -> None:
        """Check every field; raise ValueError("key: message")."""

    def keys_given(self) -> tuple[str, ...]:
        """The config keys this section holds (every field by default)."""
        return tuple(f.name for f in dataclasses.fields(self))

    def _field(self, key: str) -> str:
        return key

    def __getitem__(self, key: str):
        if key not in self.keys_given():
            raise KeyError(key)
        return getattr(self, self._field(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_given())

    def __len__(self) -> int:
        return len(self.keys_given())


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSection(_Section):
    """[dataset]: a bundled or on-disk data set (`jit_unlearn.data.load(name, **kwargs)`), with the test
    fraction held out of one-split sets."""

    name: str
    root: str | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)
    test_fraction: float = DEFAULT_TEST_FRACTION

    def validate(self) -> None:
        _typed(self.name, "name", str, f"one of {list(DATASETS)}")
        checks.choice(self.name, "name", DATASETS)
        if self.name.startswith("cifar") and self.root is None:
            raise ValueError("root: missing (a folder path is required)")
        if self.root is not None:
            _typed(self.root, "root", str, "a folder path")
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"kwargs: expected a table, got {type(self.kwargs).__name__}")
        _typed(self.test_fraction, "test_fraction", (int, float), "a number in (0, 1)")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: expected a number in (0, 1), got {self.test_fraction!r}")

    @classmethod
    def from_table(cls, table: Mapping) -> DatasetSection:
        """The section of a [dataset] table; ValueError("key: message") on a bad key."""
        _unknown_keys(table, ("name", "root", "kwargs", "test_fraction"))
        name = _required(table, "name", f"one of {list(DATASETS)}")
        section = cls(
            name, table.get("root"), table.get("kwargs", {}), table.get("test_fraction", DEFAULT_TEST_FRACTION)
        )
        return dataclasses.replace(section, kwargs=dict(section.kwargs), test_fraction=float(section.test_fraction))


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSection(_Section):
    """[model]: a `jit_unlearn.models.build(name, **kwargs)` network, optionally loaded from a checkpoint."""

    name: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    checkpoint: str | None = None

    def validate(self) -> None:
        _typed(self.name, "name", str, f"one of {list(MODELS)}")
        checks.choice(self.name, "name", MODELS)
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"kwargs: expected a table, got {type(self.kwargs).__name__}")
        if self.checkpoint is not None:
            _typed(self.checkpoint, "checkpoint", str, "a file path")
            if not os.path.isfile(self.checkpoint):
                raise ValueError(f"checkpoint: no such file: {self.checkpoint}")

    @classmethod
    def from_table(cls, table: Mapping) -> ModelSection:
        """The section of a [model] table; ValueError("key: message") on a bad key."""
        _unknown_keys(table, ("name", "kwargs", "checkpoint"))
        name = _required(table, "name", f"one of {list(MODELS)}")
        section = cls(name, table.get("kwargs", {}), table.get("checkpoint"))
        return dataclasses.replace(section, kwargs=dict(section.kwargs))


_SCENARIO_KEYS = {
    "full_class": ("kind", "class"),
    "sub_class": ("kind", "fine_class", "coarse_of"),
    "random": ("kind", "fraction"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class ScenarioSection(_Section):
    """[scenario]: what to forget: every sample of class `class` (full_class), one fine class under
    coarse labels (sub_class), or a random `fraction` (random).  Reads as the keys the config gave."""

    kind: str
    class_: int | list[int] | None = None
    fine_class: int | None = None
    coarse_of: list[int] | None = None
    fraction: float | None = None

    def _field(self, key: str) -> str:
        return "class_" if key == "class" else key

    def keys_given(self) -> tuple[str, ...]:
        return tuple(k for k in _SCENARIO_KEYS[self.kind] if getattr(self, self._field(k)) is not None)

    def validate(self) -> None:
        _typed(self.kind, "kind", str, f"one of {list(SCENARIOS)}")
        checks.choice(self.kind, "kind", SCENARIOS)
        if self.kind == "full_class":
            what = "a class label (int) or a list of them"
            cls = _typed(self.class_, "class", (int, list), what)
            if isinstance(cls, list) and (not cls or not _int_list(cls)):
                raise ValueError(f"class: expected a class label (int) or a non-empty list of them, got {cls!r}")
        elif self.kind == "sub_class":
            _typed(self.fine_class, "fine_class", int, "a fine class label (int)")
            if self.coarse_of is not None and not _int_list(self.coarse_of):
                raise ValueError("coarse_of: expected a list of ints: the coarse label of each fine label")
        else:
            _typed(self.fraction, "fraction", (int, float), "a number in (0, 1)")
            if not 0.0 < self.fraction < 1.0:
                raise ValueError(f"fraction: expected a number in (0, 1), got {self.fraction!r}")

    @classmethod
    def from_table(cls, table: Mapping, *, dataset: str) -> ScenarioSection:
        """The section of a [scenario] table for data set `dataset`; ValueError("key: message")."""
        kind = _required(table, "kind", f"one of {list(SCENARIOS)}")
        _typed(kind, "kind", str, f"one of {list(SCENARIOS)}")
        checks.choice(kind, "kind", SCENARIOS)
        _unknown_keys(table, _SCENARIO_KEYS[kind])
        if kind == "full_class":
            _required(table, "class", "a class label (int) or a list of them")
        elif kind == "sub_class":
            _required(table, "fine_class", "a fine class label (int)")
            if "coarse_of" not in table and dataset != "cifar100":
                raise ValueError(
                    f"coarse_of: missing; needed for sub_class on {dataset} "
                    "(only cifar100 carries its own coarse labels)"
                )
        else:
            _required(table, "fraction", "a number in (0, 1)")
        return cls(kind, table.get("class"), table.get("fine_class"), table.get("coarse_of"), table.get("fraction"))


@dataclasses.dataclass
class Experiment:
    """A validated experiment: what `run_experiment` runs."""

    dataset: DatasetSection
    model: ModelSection
    recipe: Recipe
    scenario: ScenarioSection
    methods: list[MethodSpec]
    retrain: bool
    device: torch.device
    seed: int
    out: str
    quiet: bool
    precision: str | None = None  # --precision: for every method that does not set its own


def _top_level(cfg: Mapping, key: str, types, what: str, default):
    try:
        return _typed(cfg[key], key, types, what) if key in cfg else default
    except ValueError as exc:
        raise _section_error("", exc) from None


def _section(cfg: Mapping, key: str, build: Callable[[dict], object], *, required: bool = True):
    """build(table) for the config table `key`, every error a UserError naming its config key."""
    try:
        table = _table(cfg, key, required=required)
    except ValueError as exc:
        raise _section_error("", exc) from None
    try:
        return build(table)
    except (TypeError, ValueError) as exc:
        raise _section_error(key, exc) from None


def parse_config(cfg: Mapping, *, device=None, seed=None, out=None, quiet=False, precision=None) -> Experiment:
    """Validate a config dict (from TOML or JSON) into an Experiment; command-line values override
    the config's `device`, `seed` and `out`; `precision` (--precision) is passed to every method
    that does not set its own.  Raises UserError naming the offending key."""
    try:
        _unknown_keys(cfg, ("dataset", "model", "train", "scenario", "methods", "retrain", "device", "seed", "out"))
    except ValueError as exc:
        raise _section_error("", exc) from None
    dataset = _section(cfg, "dataset", DatasetSection.from_table)
    model = _section(cfg, "model", ModelSection.from_table)
    if seed is None:
        seed = _top_level(cfg, "seed", int, "an int", 0)
        if seed < 0:
            raise key_error("seed", f"expected an int >= 0, got {seed}")
    recipe = _section(cfg, "train", lambda table: Recipe.from_mapping(table, seed=seed), required=False)
    scenario = _section(cfg, "scenario", lambda table: ScenarioSection.from_table(table, dataset=dataset.name))
    methods = parse_methods(cfg)
    do_retrain = _top_level(cfg, "retrain", bool, "true or false", True)
    dev = device if device is not None else _top_level(cfg, "device", str, "a device name", "auto")
    out_key = "--out" if out is not None else "config key 'out'"
    out = out if out is not None else _top_level(cfg, "out", str, "a folder path", "jit_unlearn_run")
    check_out(out, out_key)
    dev = experiment_device(dev)
    if precision is not None:
        try:
            checks.precision(precision, dev, "--precision")
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return Experiment(dataset, model, recipe, scenario, methods, do_retrain, dev, seed, out, quiet, precision)


def experiment_device(value) -> torch.device:
    """The device an experiment runs on: an existing device that holds data (not "meta").  Raises
    UserError ("device: ...") otherwise."""
    try:
        dev = checks.device(value)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if dev.type == "meta":
        raise UserError(
            "device: 'meta' holds no data, so nothing can be trained or evaluated on it; use cpu, cuda, cuda:N or auto"
        )
    if dev.type not in ("cpu", "cuda"):
        backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise UserError(f"device: {str(value)!r} is not available here; use cpu, cuda, cuda:N or auto")
    return dev


def check_out(out: str, key: str) -> None:
    """The output folder `out` must be a folder or not exist yet; `key` names it ("--out" or the
    config key) in the UserError otherwise."""
    if not out:
        raise UserError(f"{key}: expected a folder path, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{key}: {out} is a file, not a folder; name a folder for results.json and results.png")
