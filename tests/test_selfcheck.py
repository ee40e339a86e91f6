"""Tests of `jit-unlearn selfcheck`: it passes on this install, its JSON and table, its exit status, and
that a deliberately broken compiled op (off by one ulp) makes it fail."""

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import jit_unlearn
from jit_unlearn import _backend
from jit_unlearn.selfcheck import SECTIONS, add_parser, format_report, run_selfcheck, selfcheck
from jit_unlearn.selfcheck._report import bitwise, close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
requires_compiled = pytest.mark.skipif(not _backend.has_kernel("cpu"), reason="compiled CPU kernels not built")
CHECK_KEYS = {"section", "name", "device", "status", "detail", "seconds", "data"}


@pytest.fixture(scope="module")
def cpu_report(one_thread):
    # One thread: on a busy machine OpenMP's fork/join per op dominates the small checks.
    code, text = run_selfcheck("cpu", as_json=True, quick=True)
    return code, text


def test_cpu_selfcheck_passes_with_valid_json(cpu_report):
    code, text = cpu_report
    report = json.loads(text)
    failed = [(c["name"], c["detail"]) for c in report["checks"] + report["timings"] if c["status"] == "fail"]
    assert code == 0, failed
    assert set(report) >= {
        "environment",
        "device",
        "devices",
        "cuda_checked",
        "notes",
        "backend",
        "checks",
        "timings",
        "summary",
        "seconds",
    }
    assert report["device"] == "cpu" and report["devices"] == ["cpu"] and report["cuda_checked"] is False
    assert report["backend"] == jit_unlearn.backend_info()
    assert report["summary"]["ok"] is True and report["summary"]["failed"] == 0
    assert report["environment"]["torch"] == torch.__version__
    for entry in report["checks"] + report["timings"]:
        assert set(entry) == CHECK_KEYS
    sections = {c["section"] for c in report["checks"]}
    assert sections == {"backend", "ops", "methods"}
    statuses = {c["status"] for c in report["checks"]}
    assert statuses <= {"pass", "skip"}
    if _backend.has_kernel("cpu"):  # every op is compared on the compiled tier, and every method runs
        names = {c["name"] for c in report["checks"] if c["status"] == "pass"}
        for op in (
            "perturb",
            "_perturb_out",
            "lipschitz_ratio + backward",
            "_lipschitz_ratio_and_grad",
            "accumulate_importance_",
            "ssd_dampen_",
            "masked_reset_",
        ):
            assert f"{op}: compiled vs torch tier" in names
        for method in ("JiT", "SSD", "DEL"):
            assert f"{method}: pure-PyTorch vs compiled tier" in names


def test_timings_are_measured(cpu_report):
    report = json.loads(cpu_report[1])
    timings = {t["name"]: t for t in report["timings"]}
    assert set(timings) == {"JiT vs its batched floor", "ssd_dampen_ vs parameter copy"}
    jit_t, damp = timings["JiT vs its batched floor"]["data"], timings["ssd_dampen_ vs parameter copy"]["data"]
    assert jit_t["jit_min_s"] > 0 and jit_t["floor_min_s"] > 0
    assert math.isclose(jit_t["ratio_of_mins"], jit_t["jit_min_s"] / jit_t["floor_min_s"])
    assert damp["dampen_min_s"] > 0 and damp["copy_min_s"] > 0
    # 3 tensors read and 1 written against 1 read and 1 written
    assert math.isclose(damp["bandwidth_ratio"], 2 * damp["copy_min_s"] / damp["dampen_min_s"])


def test_table_says_when_the_gpu_is_not_checked(cpu_report):
    report = json.loads(cpu_report[1])
    table = format_report(report)
    assert "CUDA not checked" in table
    assert "result: OK" in table
    for check in report["checks"]:
        assert check["name"] in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_module_entry_point_fails_when_a_missing_gpu_is_asked_for():
    result = subprocess.run(
        [sys.executable, "-m", "jit_unlearn.selfcheck", "--device", "cuda", "--only", "backend"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "CUDA not checked" in result.stdout and "result: FAILED" in result.stdout
    assert "torch.cuda.is_available() is False" in result.stdout
    assert "selfcheck: [backend] CUDA device (cuda): fail" in result.stderr  # progress lines go to stderr


def test_add_parser_wires_a_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="jit-unlearn")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["selfcheck", "--device", "cpu", "--json", "--only", "backend", "--quiet"])
    assert args.only == [] and args.json and args.device == "cpu" and not args.quick
    assert parser.parse_args(["selfcheck"]).only == list(SECTIONS)
    assert parser.parse_args(["selfcheck", "--only", "timings,ops"]).only == ["timings", "ops"]
    assert args.func(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert captured.err == ""  # --quiet
    assert report["sections"] == [] and not report["timings"]
    assert {c["section"] for c in report["checks"]} == {"backend"}
    assert report["notes"] == ["CUDA not checked (--device cpu)."]


@pytest.mark.parametrize("argv", [["selfcheck", "--device", "tpu"], ["selfcheck", "--only", "ops,speed"]])
def test_bad_arguments_exit_2(argv):
    parser = argparse.ArgumentParser(prog="jit-unlearn")
    add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2


def test_bad_python_arguments_name_the_argument():
    with pytest.raises(ValueError, match="device"):
        selfcheck("gpu")
    with pytest.raises(ValueError, match="sections"):
        selfcheck("cpu", sections=("ops", "speed"))
    assert set(SECTIONS) == {"ops", "methods", "timings"}


# ---------------------------------------------------------------- a broken compiled op is caught


def _next_up(t: torch.Tensor) -> None:
    """Move the first element of t one ulp up, in place."""
    flat = t.view(-1)
    flat[:1] = torch.nextafter(flat[:1], torch.full_like(flat[:1], math.inf))


@contextlib.contextmanager
def _broken(op: str):
    """Wrap the CPU kernel of torch.ops.jit_unlearn.<op> (at the AutogradCPU key, so the real kernel
    still runs underneath) with a change of one ulp in its first output element."""
    lib = torch.library.Library("jit_unlearn", "IMPL")
    packet = getattr(torch.ops.jit_unlearn, op).default

    def perturb(*args):
        with torch._C._AutoDispatchBelowAutograd():
            x_tilde, in_norm = packet(*args)
        if x_tilde.numel():
            _next_up(x_tilde)
        return x_tilde, in_norm

    def accumulate(acc, grads, mode, scale):
        with torch._C._AutoDispatchBelowAutograd():
            packet(acc, grads, mode, scale)
        big = [a for a in acc if a.numel()]
        if big:
            _next_up(big[-1])

    lib.impl(op, {"perturb": perturb, "accumulate_importance_": accumulate}[op], "AutogradCPU")
    try:
        yield
    finally:
        lib._destroy()


@requires_compiled
@pytest.mark.parametrize(
    "op,expect", [("perturb", {"perturb", "_perturb_out"}), ("accumulate_importance_", {"accumulate_importance_"})]
)
def test_one_ulp_off_compiled_op_fails(one_thread, op, expect):
    x = torch.randn(6, 5)
    good = jit_unlearn.ops.perturb(x, 3, 0.5, seed=1)
    jit_unlearn.force_backend("torch")  # the user's choice of tier must survive the check
    try:
        with _broken(op):
            bad = torch.ops.jit_unlearn.perturb(x, 3, 0.5, 1, 0, True)
            assert torch.equal(bad[0], good[0]) == (op != "perturb")  # the override is in place
            code, text = run_selfcheck("cpu", as_json=True, sections=("ops",), quick=True)
        assert _backend.backend_name("cpu") == "torch"
    finally:
        jit_unlearn.force_backend(None)
    assert torch.equal(torch.ops.jit_unlearn.perturb(x, 3, 0.5, 1, 0, True)[0], good[0])  # and gone again
    report = json.loads(text)
    assert code == 1 and report["summary"]["ok"] is False
    failed = {c["name"].split(":")[0] for c in report["checks"] if c["status"] == "fail"}
    assert failed == expect
    detail = next(c["detail"] for c in report["checks"] if c["name"].startswith(f"{op}:"))
    assert "FAILED" in detail and "differ in their bits" in detail
    assert "result: FAILED" in format_report(report)


# ---------------------------------------------------------------- the comparisons themselves


def test_bitwise_comparison():
    a = torch.tensor([1.0, -0.0, float("nan"), 3.0])
    assert bitwise(a, a.clone()).ok
    assert not bitwise(a, torch.tensor([1.0, 0.0, float("nan"), 3.0])).ok  # -0.0 vs +0.0
    assert not bitwise(a, torch.tensor([1.0, -0.0, 2.0, 3.0])).ok  # NaN position
    b = a.clone()
    _next_up(b)
    diff = bitwise(b, a)
    assert not diff.ok and "1 of 3 elements" in diff.text and diff.max_abs == pytest.approx(2**-23)
    assert not bitwise(a.double(), a).ok  # dtype
    assert bitwise(torch.tensor([1, 2]), torch.tensor([1, 2])).ok  # integer counts


def test_tolerance_comparison():
    want = torch.tensor([1.0, 100.0, 0.0, float("inf")], dtype=torch.float64)
    got = want + torch.tensor([1e-6, 1e-4, 5e-7, 0.0], dtype=torch.float64)
    diff = close(got, want, rtol=1e-6, atol=1e-6)
    # allowed: 2e-6, 1.01e-4, 1e-6, 0 (equal infinities)
    assert diff.ok and diff.max_abs == pytest.approx(1e-4) and diff.used == pytest.approx(1e-4 / 1.01e-4)
    assert not close(got, want, rtol=0.0, atol=1e-6).ok
    assert not close(got.float(), want, rtol=1.0, atol=1.0).ok  # dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_selfcheck_passes():
    code, text = run_selfcheck("cuda", as_json=True, quick=True)
    report = json.loads(text)
    failed = [
        (c["name"], c["device"], c["detail"]) for c in report["checks"] + report["timings"] if c["status"] == "fail"
    ]
    assert code == 0, failed
    assert report["cuda_checked"] and "cuda" in report["devices"]
    names = {(c["name"], c["device"]) for c in report["checks"] if c["status"] == "pass"}
    assert ("perturb: CUDA vs CPU kernels", "cuda") in names
    assert ("JiT: CUDA vs CPU", "cuda") in names


def test_cli_selfcheck_command(capsys):
    """`jit-unlearn selfcheck --only backend --json` goes through the CLI's command registry."""
    from jit_unlearn import cli

    code = cli.main(["selfcheck", "--device", "cpu", "--only", "backend", "--json", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["summary"]["ok"] is True
    assert report["backend"]["compiled_cpu"] == jit_unlearn.backend_info()["compiled_cpu"]
