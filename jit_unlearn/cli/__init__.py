"""`jit-unlearn demo` (forget one digit of bundled MNIST with every method and baseline),
`jit-unlearn run CONFIG` and `jit-unlearn selfcheck`.

config.py reads and validates configs, methods.py knows the methods and baselines a config can name
(and validates their parameters before training), preflight.py checks the rest before training,
experiment.py runs an experiment, report.py writes the table and the plot, errors.py the one-line
user errors, commands.py holds the subcommands and `main`.  How the demo's settings were chosen:
docs/TUNING.md.
"""

from .commands import (
    COMMANDS,
    CONFIG_EXAMPLE,
    CONFIG_EXAMPLE_MNIST,
    EXIT_USER_ERROR,
    Command,
    demo_experiment,
    main,
    register,
)
from .config import Experiment, parse_config, read_config
from .errors import UserError
from .experiment import run_experiment
from .methods import BASELINES, METHODS, MethodSpec
from .report import format_table, write_plot

__all__ = [
    "main",
    "Command",
    "COMMANDS",
    "register",
    "EXIT_USER_ERROR",
    "demo_experiment",
    "CONFIG_EXAMPLE",
    "CONFIG_EXAMPLE_MNIST",
    "METHODS",
    "BASELINES",
    "Experiment",
    "MethodSpec",
    "UserError",
    "parse_config",
    "read_config",
    "run_experiment",
    "format_table",
    "write_plot",
]
