"""`jit-unlearn selfcheck`: check an install of jit_unlearn on this machine.

It reports which op tiers are compiled and active, compares every op on the compiled tier with the
pure-PyTorch tier (bitwise where the two promise the same bits, else within stated tolerances) and,
when a GPU is visible, the CUDA kernels with the CPU kernels; runs JiT, SSD and DEL on a small trained
MLP on every checked device and compares the results across tiers and devices; and times JiT against
its batched floor and SSD dampening against a parameter copy on a CIFAR-shaped ResNet-18.

    python -m jit_unlearn.selfcheck [--device auto|cpu|cuda] [--json] [--quick] [--only SECTION] [--quiet]

Exit status: 0 when every check passes (where no GPU is visible the report says "CUDA not checked"
and the CPU checks decide), 1 when a check fails (or `--device cuda` finds no GPU or no CUDA
kernels), 2 for bad arguments.  Timings are measurements, not checks.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence

import torch

from ._report import FAIL, PASS, SKIP, Check, Recorder, format_report

__all__ = ["SECTIONS", "add_arguments", "add_parser", "format_report", "main", "run_selfcheck", "selfcheck"]

SECTIONS = ("ops", "methods", "timings")
DEVICES = ("auto", "cpu", "cuda")


def _environment() -> dict:
    from .. import __version__

    env = {
        "jit_unlearn": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cuda_device": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["cuda_device"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return env


def _finite(value):
    """The report with non-finite floats as None, so that it is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def selfcheck(
    device: str = "auto", *, quick: bool = False, sections: Sequence[str] = SECTIONS, progress: bool = False
) -> dict:
    """Run the checks and return the report as a dict (what `--json` prints).

    Args:
        device: "auto" (the CPU, plus CUDA when a GPU is visible), "cpu", or "cuda" (the CPU as the
            reference plus CUDA; a missing GPU or missing CUDA kernels fail).
        quick: smaller workloads and fewer rounds (the checks stay the same).
        sections: any of "ops", "methods", "timings" (none: the backend section alone, which always runs).
        progress: print one line per check to stderr as it finishes.
    Returns:
        dict with keys environment, device, devices, cuda_checked, notes, backend, checks (list of
        {section, name, device, status, detail, seconds, data}), timings (same form), summary
        ({passed, failed, skipped, ok}) and seconds.
    """
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"sections: unknown {unknown}; expected some of {SECTIONS}")
    from . import _methods, _ops, _timings

    start = time.perf_counter()
    rec = Recorder(progress)
    notes = []
    devices = ["cpu"]
    if device == "cpu":
        notes.append("CUDA not checked (--device cpu).")
    elif torch.cuda.is_available():
        devices.append("cuda")
    else:
        notes.append(
            "CUDA not checked: torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})."
        )
        if device == "cuda":
            rec.add(
                Check("backend", "CUDA device", "cuda", FAIL, "--device cuda, but torch.cuda.is_available() is False")
            )
    info = _ops.check_backend(rec, devices, device)
    runners = {"ops": _ops.check_ops, "methods": _methods.check_methods, "timings": _timings.run_timings}
    for section in SECTIONS:
        if section in sections:
            try:
                runners[section](rec, devices, quick)
            except Exception as exc:  # noqa: BLE001  (a section that cannot even start is one failed line)
                rec.add(Check(section, f"{section} section", ",".join(devices), FAIL, f"{type(exc).__name__}: {exc}"))
    checks = [vars(c) for c in rec.checks if c.section != "timings"]
    timings = [vars(c) for c in rec.checks if c.section == "timings"]
    everything = checks + timings
    summary = {
        "passed": sum(c["status"] == PASS for c in everything),
        "failed": sum(c["status"] == FAIL for c in everything),
        "skipped": sum(c["status"] == SKIP for c in everything),
    }
    summary["ok"] = summary["failed"] == 0
    return _finite(
        {
            "environment": _environment(),
            "device": device,
            "devices": devices,
            "cuda_checked": "cuda" in devices,
            "notes": notes,
            "backend": info,
            "sections": list(sections),
            "quick": quick,
            "checks": checks,
            "timings": timings,
            "summary": summary,
            "seconds": time.perf_counter() - start,
        }
    )


def run_selfcheck(
    device: str = "auto",
    *,
    as_json: bool = False,
    quick: bool = False,
    sections: Sequence[str] = SECTIONS,
    progress: bool = False,
) -> tuple[int, str]:
    """Run `selfcheck` and return (exit status, text): the readable report, or JSON when `as_json`.
    The status is 0 when every check passed, 1 when one failed."""
    report = selfcheck(device, quick=quick, sections=sections, progress=progress)
    text = json.dumps(report, indent=2, allow_nan=False) if as_json else format_report(report)
    return (0 if report["summary"]["ok"] else 1), text


def _sections(value: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in ("backend", *SECTIONS)]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of backend, {', '.join(SECTIONS)}, got {value!r}"
        )
    return [s for s in names if s != "backend"]  # the backend section always runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: the CPU, plus CUDA when a GPU is visible (default); cpu; cuda: CUDA against "
        "the CPU, failing when there is no GPU",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="smaller workloads and fewer timing rounds")
    parser.add_argument(
        "--only",
        type=_sections,
        default=list(SECTIONS),
        metavar="SECTIONS",
        help=f"comma-separated sections to run: {', '.join(SECTIONS)} (default: all; the backend "
        "section always runs, `--only backend` runs it alone)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


_DESCRIPTION = (
    "Check this install: compiled and active tiers, every op against the pure-PyTorch tier (and CUDA "
    "against CPU), JiT/SSD/DEL on a small model on each device, short timings on a ResNet-18."
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `selfcheck` command to an argparse subparsers object; run it with `main(args)`."""
    parser = subparsers.add_parser(
        "selfcheck", help="check this install (ops, methods, timings)", description=_DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run the command with parsed arguments (from `add_parser`) or an argv list; print the report
    to stdout and return the exit status."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m jit_unlearn.selfcheck", description=_DESCRIPTION)
        add_arguments(parser)
        args = parser.parse_args(args)
    code, text = run_selfcheck(
        args.device, as_json=args.json, quick=args.quick, sections=args.only, progress=not args.quiet
    )
    print(text, flush=True)
    return code
