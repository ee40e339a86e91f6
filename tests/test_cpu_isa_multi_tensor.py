"""The instruction-set copies (csrc/cpu/cpu_isa.h) of ssd_dampen_, accumulate_importance_ and
masked_reset_ give bitwise the results of the pure-PyTorch tier, each copy run in a subprocess with
ATEN_CPU_CAPABILITY capping the level (as tests/test_cpu_isa.py does for perturb and lipschitz).
Operands start at several element offsets into their buffers, so the vector loops meet every alignment."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from jit_unlearn import _backend, torch_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPABILITIES = ("default", "avx2", "avx512")

pytestmark = pytest.mark.skipif(not _backend.has_kernel("cpu"), reason="compiled CPU kernels not built")

_INPUTS = """
import torch


def inputs():
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (64,), (255,), (257,), (1025,), (3, 5, 7), (70_001,)]

    def values(shape, dtype, low=-4.0, high=4.0):
        return (torch.randint(int(low * 2**12), int(high * 2**12), shape, generator=gen).double() / 2**12).to(dtype)

    def offset(t, k):
        buf = torch.zeros(t.numel() + k, dtype=t.dtype)
        view = buf[k:].view(t.shape)
        view.copy_(t)
        return view

    cases = {}
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for k in (0, 3):
            params = [offset(values(s, dtype), k + i) for i, s in enumerate(shapes)]
            full = [offset(values(s, dtype, 0.0, 1.0), k) for s in shapes]
            forget = [torch.where(torch.rand(s, generator=gen) < frac, d.double() * 4 + 0.25, d.double() * 0.5)
                      .to(dtype) for s, d, frac in zip(shapes, full, (0.01, 0.5) * 4)]
            grads = [offset(values(s, torch.float32), k) for s in shapes]
            masks = [torch.rand(s, generator=gen) < 0.3 for s in shapes]
            cases[f"{dtype}_{k}"] = (params, forget, full, grads, masks)
    return cases
"""

_CHILD = """
import sys
import torch
import jit_unlearn  # registers the ops
torch.set_num_threads(2)
lib = torch.ops.jit_unlearn
results = {"capability": torch.backends.cpu.get_cpu_capability()}
for name, (params, forget, full, grads, masks) in inputs().items():
    for exponent in (1.0, 0.5):
        p = [t.clone() for t in params]
        counts = lib.ssd_dampen_(p, forget, full, 2.0, 0.8, exponent)
        results[f"dampen_{name}_{exponent}"] = p + [counts]
    for mode in ("square", "abs"):
        acc = [t.abs() for t in params]
        lib.accumulate_importance_(acc, grads, mode, 0.5)
        results[f"acc_{name}_{mode}"] = acc
    p = [t.clone() for t in params]
    lib.masked_reset_(p, grads, masks)
    results[f"reset_{name}"] = p
torch.save(results, sys.argv[1])
"""

_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.int64: torch.int64,
}


def _inputs():
    scope = {}
    exec(textwrap.dedent(_INPUTS), scope)
    return scope["inputs"]()


def _run_variant(capability: str, path: str) -> dict:
    env = dict(
        os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), ATEN_CPU_CAPABILITY=capability
    )
    env.pop("JIT_UNLEARN_BACKEND", None)
    code = textwrap.dedent(_INPUTS) + textwrap.dedent(_CHILD)
    proc = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(path, weights_only=True)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits; NaNs by position (none arise from these inputs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and not torch.equal(a.isnan(), b.isnan()):
        return False
    keep = ~a.isnan() if a.is_floating_point() else torch.ones_like(a, dtype=torch.bool)
    return torch.equal(a[keep].view(_BITS[a.dtype]), b[keep].view(_BITS[b.dtype]))


def _expected(inputs) -> dict:
    want = {}
    for name, (params, forget, full, grads, masks) in inputs.items():
        for exponent in (1.0, 0.5):
            p = [t.clone() for t in params]
            counts = torch_ops.ssd_dampen_(p, forget, full, 2.0, 0.8, exponent)
            want[f"dampen_{name}_{exponent}"] = p + [counts]
        for mode in ("square", "abs"):
            acc = [t.abs() for t in params]
            torch_ops.accumulate_importance_(acc, grads, mode, 0.5)
            want[f"acc_{name}_{mode}"] = acc
        p = [t.clone() for t in params]
        torch_ops.masked_reset_(p, grads, masks)
        want[f"reset_{name}"] = p
    return want


def test_isa_copies_match_reference_bitwise(tmp_path):
    runs = {cap: _run_variant(cap, str(tmp_path / f"{cap}.pt")) for cap in CAPABILITIES}
    assert runs["default"]["capability"] == "DEFAULT"  # the baseline copy really ran
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert runs["avx2"]["capability"] == "AVX2"  # and an upper one
    want = _expected(_inputs())
    for cap, got in runs.items():
        assert got.keys() - {"capability"} == want.keys()
        for key, expected in want.items():
            for i, (a, b) in enumerate(zip(got[key], expected)):
                if key.startswith("dampen") and a.dtype == torch.int64:
                    assert torch.equal(a, b), f"{key} counts, ATEN_CPU_CAPABILITY={cap}"
                    continue
                if "0.5" in key and key.startswith("dampen"):
                    # exponent != 1: std::pow in the kernel, torch.pow in the reference (not bitwise);
                    # the copies still agree with each other bit for bit
                    torch.testing.assert_close(a, b, rtol=4 * torch.finfo(a.dtype).eps, atol=0)
                    assert _same_bits(a, runs["default"][key][i]), f"{key}[{i}] at ATEN_CPU_CAPABILITY={cap}"
                    continue
                assert _same_bits(a, b), f"{key}[{i}] differs from the reference at ATEN_CPU_CAPABILITY={cap}"
