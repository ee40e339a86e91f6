"""`jit-unlearn demo` (forget one digit of bundled MNIST with every method) and `jit-unlearn run CONFIG`.

config.py reads and validates configs, experiment.py runs them, report.py writes the table and the
plot, commands.py holds the subcommands and `main`.  How the demo's settings were chosen:
docs/TUNING.md.
"""

from .commands import COMMANDS, CONFIG_EXAMPLE, EXIT_USER_ERROR, Command, demo_experiment, main, register
from .config import Experiment, MethodSpec, UserError, parse_config, read_config
from .experiment import run_experiment
from .report import format_table, write_plot

__all__ = [
    "main",
    "Command",
    "COMMANDS",
    "register",
    "EXIT_USER_ERROR",
    "demo_experiment",
    "CONFIG_EXAMPLE",
    "Experiment",
    "MethodSpec",
    "UserError",
    "parse_config",
    "read_config",
    "run_experiment",
    "format_table",
    "write_plot",
]
