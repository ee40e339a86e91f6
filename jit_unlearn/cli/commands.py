"""The `jit-unlearn` command line: `demo` and `run CONFIG`.

A subcommand is one function `(args) -> exit status` plus one `register(Command(...))` call; `main`
builds the parser from the registry.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from .._checks import PRECISIONS
from .config import DEFAULT_TEST_FRACTION, Experiment, parse_config, read_config
from .errors import UserError, one_line
from .experiment import run_experiment
from .methods import BASELINES

__all__ = [
    "Command",
    "COMMANDS",
    "register",
    "main",
    "demo_experiment",
    "EXIT_USER_ERROR",
    "CONFIG_EXAMPLE",
    "CONFIG_EXAMPLE_MNIST",
]

EXIT_USER_ERROR = 2

# The demo: one MNIST digit forgotten with every method (settings and how they were chosen:
# docs/TUNING.md, "The demo").
DEMO_FORGET_CLASS = 3
DEMO_TEST_FRACTION = DEFAULT_TEST_FRACTION
DEMO_MODEL = {"name": "convnet", "kwargs": {"width": 16, "hidden": 128, "num_classes": 10}}
DEMO_RECIPE = {"epochs": 5, "lr": 0.05, "batch_size": 32, "optimizer": "sgd", "momentum": 0.9, "label_smoothing": 0.1}
DEMO_METHODS = [
    {"name": "jit", "sigma": 1.0, "lr": 3e-3, "num_samples": 25, "batch_size": 128},
    {"name": "ssd", "alpha": 8.0, "lam": 1.0, "batch_size": 64},
    {"name": "lf_ssd", "alpha": 5.0, "lam": 1.0, "batch_size": 64},
    {"name": "assd", "batch_size": 64},
    {"name": "del", "budget": 0.1, "lr": 0.1, "epochs": 3, "batch_size": 128},
    # The comparison baselines (jit_unlearn.baselines), with settings measured to work on this
    # model (docs/BASELINES.md §4): NegGrad+'s and SCRUB's defaults collapse or diverge on it.
    {"name": "finetune"},
    {"name": "neggrad_plus", "epochs": 1, "beta": 0.03},
    {"name": "random_label"},
    {"name": "bad_teacher"},
    {"name": "scrub", "lr": 0.005, "max_epochs": 1},
]
# --fast: a stratified 1,200-image subset, a narrow net, small method budgets and no comparison
# baselines; it checks the pipeline, not the forgetting.
FAST_SUBSET = 1200
FAST_MODEL = {"name": "convnet", "kwargs": {"width": 8, "hidden": 32, "num_classes": 10}}
FAST_RECIPE = {**DEMO_RECIPE, "epochs": 3}
FAST_OVERRIDES = {"jit": {"num_samples": 4}, "del": {"epochs": 1}}


# The epilog of `run --help`: a config that runs offline on the bundled MNIST (the demo's
# settings for three of its methods), then every key of a config.
CONFIG_EXAMPLE_MNIST = """example 1, runs offline on the bundled MNIST (save it as mnist3.toml, then
`jit-unlearn run mnist3.toml`; about a minute on 2 CPU cores):

  seed = 0
  out = "runs/mnist_digit3"

  [dataset]
  name = "mnist"                # the bundled 10,000 MNIST images; test_fraction = 0.2 held out

  [model]
  name = "convnet"
  kwargs = { width = 16, hidden = 128, num_classes = 10 }

  [train]
  epochs = 5
  lr = 0.05
  batch_size = 32
  label_smoothing = 0.1

  [scenario]
  kind = "full_class"
  class = 3

  [[methods]]
  name = "jit"
  sigma = 1.0
  lr = 3e-3
  batch_size = 128

  [[methods]]
  name = "ssd"
  alpha = 8.0
  batch_size = 64

  [[methods]]
  name = "bad_teacher"          # a comparison baseline, with its default settings
"""

CONFIG_EXAMPLE = """example 2, every key (CIFAR-10 from a folder you have; TOML, the same keys work in JSON):

  seed = 0                      # splits, training, methods, MIA folds
  device = "auto"               # cpu | cuda | cuda:N | auto
  out = "runs/cifar10_class0"   # results.json, results.png, original.pt
  retrain = true                # also train the retrain-from-scratch baseline

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
  name = "jit"                  # jit | ssd | lf_ssd | assd | del, or a comparison baseline:
                                # finetune | neggrad_plus | random_label | bad_teacher | scrub
  sigma = 0.5
  lr = 3e-4

  [[methods]]
  name = "ssd"
  alpha = 10.0
"""


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, a function that adds its own arguments to its parser
    (the common --device/--seed/--out/--quiet are there already), and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    epilog: str | None = None
    common: bool = True  # whether the common --device/--seed/--out/--quiet arguments apply


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add a subcommand to `jit-unlearn` (listed in registration order)."""
    if command.name in COMMANDS:
        raise ValueError(f"command: {command.name!r} is registered already")
    COMMANDS[command.name] = command
    return command


def demo_experiment(
    *, device=None, seed=None, out=None, quiet=False, fast=False, forget_class=DEMO_FORGET_CLASS, precision=None
) -> Experiment:
    """The demo's Experiment: bundled MNIST, `forget_class` forgotten by every method (in `precision`
    when given; the demo command passes "auto")."""
    methods = []
    for entry in DEMO_METHODS:
        entry = dict(entry)
        if fast and entry["name"] in BASELINES:
            continue
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
    return parse_config(cfg, device=device, seed=seed, out=out or "jit_unlearn_demo", quiet=quiet, precision=precision)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fast", action="store_true", help="a tiny subset and budgets, no comparison baselines (seconds; for tests)"
    )
    parser.add_argument("--forget-class", type=int, default=DEMO_FORGET_CLASS, help="the digit to forget (default 3)")


def _demo(args: argparse.Namespace) -> int:
    from .. import data as data_mod
    from ..eval import train_test_split

    if not 0 <= args.forget_class <= 9:
        raise UserError(f"--forget-class: expected a digit 0-9, got {args.forget_class}")
    exp = demo_experiment(
        device=args.device,
        seed=args.seed,
        out=args.out,
        quiet=args.quiet,
        fast=args.fast,
        forget_class=args.forget_class,
        precision=args.precision or "auto",
    )
    ds: Dataset = data_mod.mnist()
    if args.fast:
        _, ds = train_test_split(ds, FAST_SUBSET / len(ds), seed=exp.seed)
    title = f"MNIST, forget digit {args.forget_class}" + (" (fast)" if args.fast else "")
    run_experiment(exp, train_ds=ds, title=title)
    return 0


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="path to the .toml or .json experiment file")


def _run(args: argparse.Namespace) -> int:
    cfg = read_config(args.config)
    exp = parse_config(
        cfg, device=args.device, seed=args.seed, out=args.out, quiet=args.quiet, precision=args.precision
    )
    run_experiment(exp, title=os.path.splitext(os.path.basename(args.config))[0])
    return 0


register(
    Command(
        "demo",
        "unlearn one MNIST digit with every method, vs retraining",
        _demo_arguments,
        _demo,
        description="Train a small CNN on bundled MNIST and a retrained baseline, unlearn one digit with JiT, SSD, "
        "LF-SSD, ASSD and DEL and with the comparison baselines (fine-tuning, NegGrad+, random labels, bad "
        "teaching, SCRUB), and compare (hyper-parameters tuned for digit 3; see docs/TUNING.md).",
    )
)
register(
    Command(
        "run",
        "run an experiment described by a TOML or JSON file",
        _run_arguments,
        _run,
        description="Run a TOML/JSON experiment: dataset, model, train, scenario, methods (unlearning methods and "
        "comparison baselines). Every value is checked before anything is trained.",
        epilog=CONFIG_EXAMPLE_MNIST + "\n" + CONFIG_EXAMPLE,
    )
)


def _selfcheck_arguments(parser: argparse.ArgumentParser) -> None:
    from .. import selfcheck

    selfcheck.add_arguments(parser)


def _selfcheck(args: argparse.Namespace) -> int:
    from .. import selfcheck

    return selfcheck.main(args)


register(
    Command(
        "selfcheck",
        "check this install: tiers, every op against the pure-PyTorch tier, methods, timings",
        _selfcheck_arguments,
        _selfcheck,
        description="Check this install: compiled and active tiers, every op against the pure-PyTorch tier (and "
        "CUDA against CPU), JiT/SSD/DEL on a small model on each device, short timings on a ResNet-18.",
        common=False,
    )
)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's, else auto)")
    common.add_argument("--seed", type=int, default=None, help="seed for splits, training and methods (default 0)")
    common.add_argument("--out", default=None, help="output folder for results.json, results.png, original.pt")
    common.add_argument("--quiet", action="store_true", help="no progress bars or step messages; only the table")
    common.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="what the methods' model passes run in, for every method that does not set its own "
        "(default: each method's own, float32; the demo: auto = bfloat16 where the hardware runs it fast)",
    )
    parser = argparse.ArgumentParser(
        prog="jit-unlearn", description="Machine unlearning: demo, experiments and an install check."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for command in COMMANDS.values():
        formatter = argparse.RawDescriptionHelpFormatter if command.epilog else argparse.HelpFormatter
        child = sub.add_parser(
            command.name,
            parents=[common] if command.common else [],
            help=command.help,
            description=command.description,
            epilog=command.epilog,
            formatter_class=formatter,
        )
        command.add_arguments(child)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jit-unlearn` command; returns the exit status (2 for user errors)."""
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "seed", None) is not None and args.seed < 0:
            raise UserError(f"--seed: expected an int >= 0, got {args.seed}")
        return COMMANDS[args.command].run(args)
    except UserError as exc:
        print(f"error: {one_line(str(exc), limit=10_000)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
