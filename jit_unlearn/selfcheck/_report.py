"""Check records, tensor comparisons (bitwise and with tolerances) and the plain-text report."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator, Sequence

import torch

from .. import _backend

# Integer views for bit comparisons; NaNs compare by position only (their payloads may differ).
_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}

PASS, FAIL, SKIP, INFO = "pass", "fail", "skip", "info"


@dataclasses.dataclass
class Check:
    """One line of the report: a comparison (pass/fail/skip) or a measurement (info)."""

    section: str
    name: str
    device: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    data: dict = dataclasses.field(default_factory=dict)


class Recorder:
    """Collects checks; `run` turns an exception inside a check into a failed line."""

    def __init__(self, progress: bool):
        self.checks: list[Check] = []
        self.progress = progress

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        if self.progress:
            print(
                f"selfcheck: [{check.section}] {check.name} ({check.device}): {check.status}"
                + (f" - {check.detail}" if check.detail else ""),
                file=sys.stderr,
                flush=True,
            )
        return check

    def run(self, section: str, name: str, device: str, fn: Callable[[], tuple[str, str] | tuple[str, str, dict]]):
        """Run fn() -> (status, detail[, data]) and record it; an exception records a failure."""
        start = time.perf_counter()
        try:
            status, detail, *rest = fn()
            data = rest[0] if rest else {}
        except Exception as exc:  # noqa: BLE001  (a broken op must show up as a failed line, not end the run)
            status, detail, data = FAIL, _error_text(exc), {}
        return self.add(Check(section, name, device, status, detail, time.perf_counter() - start, data))


def _error_text(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno})" if frame else ""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:300] + where


@contextlib.contextmanager
def tier(name: str | None) -> Iterator[None]:
    """Force the op tier ("compiled" or "torch") inside the block; the caller's choice comes back after."""
    saved = getattr(_backend, "_forced", None)
    _backend.force_backend(name)
    try:
        yield
    finally:
        _backend.force_backend(saved)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- comparisons


@dataclasses.dataclass
class Diff:
    """The outcome of comparing two tensors: ok, and a short description."""

    ok: bool
    text: str
    max_abs: float = 0.0
    used: float = 0.0  # the largest |diff| / (atol + rtol * |expected|): 1 is the tolerance's edge


def bitwise(actual: torch.Tensor, expected: torch.Tensor) -> Diff:
    """Same dtype, shape and bits (NaN positions must agree; -0.0 differs from +0.0)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return Diff(
            False, f"dtype/shape {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
        )
    if actual.dtype not in _INT_VIEW:
        ok = torch.equal(actual, expected)
        return Diff(ok, "equal" if ok else "values differ")
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    if not torch.equal(nan_a, nan_e):
        return Diff(False, f"NaN at {int((nan_a != nan_e).sum())} different positions")
    bits_a = actual.contiguous().view(_INT_VIEW[actual.dtype])[~nan_a]
    bits_e = expected.contiguous().view(_INT_VIEW[expected.dtype])[~nan_e]
    bad = int((bits_a != bits_e).sum())
    if bad:
        max_abs = float((actual[~nan_a].double() - expected[~nan_e].double()).abs().max())
        return Diff(
            False, f"{bad} of {bits_a.numel()} elements differ in their bits (max |diff| {max_abs:.3g})", max_abs
        )
    return Diff(True, "bitwise")


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> Diff:
    """|actual - expected| <= atol + rtol * |expected| elementwise, NaN positions equal, same dtype/shape."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return Diff(
            False, f"dtype/shape {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
        )
    a, e = actual.double(), expected.double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        return Diff(False, f"NaN at {int((nan_a != nan_e).sum())} different positions")
    a, e = a[~nan_a], e[~nan_e]
    if a.numel() == 0:
        return Diff(True, "empty", 0.0)
    same_inf = a == e  # equal infinities have a NaN difference
    err = torch.where(same_inf, 0.0, (a - e).abs())
    allowed = atol + rtol * torch.where(torch.isinf(e), 0.0, e.abs())
    bad = int((~(err <= allowed)).sum())
    max_abs, used = float(err.max()), float((err / allowed).max())
    if bad:
        return Diff(
            False,
            f"{bad} of {a.numel()} elements outside rtol {rtol:g}, atol {atol:g} (max |diff| {max_abs:.3g})",
            max_abs,
            used,
        )
    return Diff(True, f"max |diff| {max_abs:.3g} (rtol {rtol:g}, atol {atol:g})", max_abs, used)


class Tally:
    """Accumulates many Diffs of one kind into one status and detail line."""

    def __init__(self, what: str):
        self.what, self.cases, self.failures = what, 0, []
        self.max_abs, self.used, self.identical = 0.0, 0.0, True

    def add(self, diff: Diff, case: str) -> None:
        self.cases += 1
        self.max_abs, self.used = max(self.max_abs, diff.max_abs), max(self.used, diff.used)
        self.identical &= diff.ok and diff.max_abs == 0.0
        if not diff.ok:
            self.failures.append(f"{case}: {diff.text}")

    def summary(self) -> str:
        if self.failures:
            more = f" (+{len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            return (
                f"{self.what} FAILED in {len(self.failures)}/{self.cases} comparisons, first {self.failures[0]}{more}"
            )
        if self.identical:
            return f"{self.what} identical"
        return f"{self.what} within tolerance (max |diff| {self.max_abs:.2g}, {self.used:.0%} of the allowed)"


def verdict(tallies: Sequence[Tally], cases: int) -> tuple[str, str]:
    """(status, detail) for a check made of several tallies over `cases` input cases."""
    ok = all(not t.failures for t in tallies)
    return (PASS if ok else FAIL), "; ".join(t.summary() for t in tallies) + f" [{cases} cases]"


# ---------------------------------------------------------------- report text


def _backend_line(info: dict) -> str:
    yes = {True: "yes", False: "no"}
    active = ", ".join(f"{dev}: {tier or '-'}" for dev, tier in info.get("active", {}).items())
    line = (
        f"extension loaded: {yes[bool(info.get('extension_loaded'))]}; compiled CPU kernels: "
        f"{yes[bool(info.get('compiled_cpu'))]}; compiled CUDA kernels: {yes[bool(info.get('compiled_cuda'))]}; "
        f"CUDA device visible: {yes[bool(info.get('cuda_available'))]}; requested tier: {info.get('requested')}; "
        f"active tiers: {active}"
    )
    if info.get("load_error"):
        line += f"\n  extension load error: {info['load_error']}"
    return line


def _columns(rows: list[list[str]], header: list[str], wrap: int) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[-1],
        "  ".join("-" * w for w in widths) + "  " + "-" * min(wrap, 40),
    ]
    indent = sum(widths) + 2 * len(widths)
    for row in rows:
        chunks = textwrap.wrap(row[-1], wrap, break_on_hyphens=False) or [""]
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + chunks[0])
        lines += [" " * indent + c for c in chunks[1:]]
    return lines


def format_report(report: dict) -> str:
    """The readable form of a selfcheck report (the dict that `--json` prints)."""
    env = report["environment"]
    head = (
        f"jit_unlearn {env['jit_unlearn']} selfcheck: torch {env['torch']}, python {env['python']}, "
        f"{env['threads']} CPU threads, device {report['device']!r} (checked: {', '.join(report['devices'])})"
    )
    out = [head]
    if env.get("cuda_device"):
        out.append(f"GPU: {env['cuda_device']}, torch built for CUDA {env['torch_cuda']}")
    out.append(f"backend: {_backend_line(report['backend'])}")
    out += [f"note: {note}" for note in report["notes"]]
    out.append("")
    rows = [[c["section"], c["name"], c["device"], c["status"], c["detail"]] for c in report["checks"]]
    out += _columns(rows, ["section", "check", "device", "result", "detail"], 100)
    if report["timings"]:
        out.append("")
        rows = [[t["name"], t["device"], t["status"], t["detail"]] for t in report["timings"]]
        out += _columns(rows, ["timing", "device", "result", "detail"], 110)
    s = report["summary"]
    out += [
        "",
        f"result: {'OK' if s['ok'] else 'FAILED'}: {s['passed']} passed, {s['failed']} failed, "
        f"{s['skipped']} skipped in {report['seconds']:.1f} s"
        + ("" if report["cuda_checked"] else "; CUDA not checked"),
    ]
    return "\n".join(out)
