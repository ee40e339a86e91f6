"""The CPU kernels' instruction-set variants (csrc/cpu/cpu_isa.h) give bitwise the same results.

Each variant runs in a subprocess with ATEN_CPU_CAPABILITY capping the level (ATen caps it further
to what the CPU has, so on a machine without AVX-512 two runs use the AVX2 copy); every output of
perturb and of the Lipschitz forward and backward must match the baseline copy bit for bit."""

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import subprocess_env
from jit_unlearn import _backend, torch_ops

CAPABILITIES = ("default", "avx2", "avx512")

pytestmark = pytest.mark.skipif(not _backend.has_kernel("cpu"), reason="compiled CPU kernels not built")

_CHILD = """
import sys
import torch
import jit_unlearn  # registers the ops
torch.set_num_threads(2)
results = {"capability": torch.backends.cpu.get_cpu_capability()}
gen = torch.Generator().manual_seed(0)


def values(*shape, low=-4.0, high=4.0):
    # Multiples of 2^-16 drawn as integers: torch's own randn differs between capabilities.
    return torch.randint(int(low * 2**16), int(high * 2**16), shape, generator=gen).double() / 2**16


# Rows of 3 * 11 * 7 = 231 elements: Philox groups straddle rows, chunks straddle rows and tasks.
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    x = values(37, 3, 11, 7).to(dtype)
    for clamp in (True, False):
        results[f"perturb_{dtype}_{clamp}"] = torch.ops.jit_unlearn.perturb(x, 5, 0.4, 2**40 + 3, 9, clamp)
    # 19 logits: a full 8-lane block and a masked one, past the register form of the gradient
    # sums; 10, 16 and 3: rows in that form (one or two blocks, or only a masked one).
    for k in (19, 10, 16, 3):
        out = values(33, k).to(dtype)
        pert = values(6, 33, k).to(dtype)
        op = torch.float64 if dtype == torch.float64 else torch.float32
        in_norm = values(6, 33, low=0.1, high=2.0).to(op)
        in_norm[0, 0] = 0.0
        in_norm[1, 3] = float("nan")
        in_norm[2, 20] = -1.0
        pert[3, 5:25] = out[5:25]  # zero output distances: coefficient 0
        grad = values(6, 33, low=0.0, high=1.0).to(op)
        lib = torch.ops.jit_unlearn
        results[f"ratio_{dtype}_{k}"] = lib.lipschitz_ratio(out, pert, in_norm)
        results[f"backward_{dtype}_{k}"] = lib._lipschitz_ratio_backward(grad, out, pert, in_norm, True)
        results[f"backward_out_{dtype}_{k}"] = lib._lipschitz_ratio_backward(grad, out, pert, in_norm, False)
        results[f"ratio_and_grad_{dtype}_{k}"] = lib._lipschitz_ratio_and_grad(grad, out, pert, in_norm)
# the clamp's NaN and signed-zero cases: a NaN input makes the batch range NaN; -0 against +0 bounds
special = values(9, 40).float()
special[2, 7] = float("nan")
results["perturb_nan"] = torch.ops.jit_unlearn.perturb(special, 3, 0.5, 11, 0, True)
zeros = torch.zeros(8, 37)
zeros[::2] = -0.0
results["perturb_zeros"] = torch.ops.jit_unlearn.perturb(zeros, 3, 0.5, 11, 0, True)
torch.save(results, sys.argv[1])
"""


def _run_variant(capability: str, path: str) -> dict:
    env = subprocess_env(ATEN_CPU_CAPABILITY=capability)
    env.pop("JIT_UNLEARN_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD), path], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return torch.load(path, weights_only=True)


_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape, NaN positions and bits elsewhere (so the sign of zero counts; which NaN
    an instruction returns is the hardware's and the compiler's operand order, not ours)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    keep = ~a.isnan()
    return torch.equal(a[keep].view(_BITS[a.dtype]), b[keep].view(_BITS[b.dtype]))


def _flat(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


def test_isa_variants_agree_bitwise(tmp_path):
    runs = {cap: _run_variant(cap, str(tmp_path / f"{cap}.pt")) for cap in CAPABILITIES}
    base = runs["default"]
    assert base["capability"] == "DEFAULT"  # the baseline copy really ran
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert runs["avx2"]["capability"] == "AVX2"  # and so did an upper one
    for cap, got in runs.items():
        assert got.keys() == base.keys()
        for key in base:
            if key == "capability":
                continue
            for a, b in zip(_flat(got[key]), _flat(base[key])):
                assert _same_bits(a, b), f"{key} differs between ATEN_CPU_CAPABILITY={cap} and default"
    # and the noise is the pure-PyTorch tier's, whichever copy drew it
    x = torch.randint(-4 * 2**16, 4 * 2**16, (37, 3, 11, 7), generator=torch.Generator().manual_seed(0))
    x = (x.double() / 2**16).float()
    want = torch_ops.perturb(x, 5, 0.4, 2**40 + 3, 9, True)
    assert torch.equal(base["perturb_torch.float32_True"][0], want[0])


def test_perturb_same_for_every_thread_count():
    # Tasks start at different rows with 1, 2 and 3 threads; x_tilde and in_norm must not change.
    x = torch.randn(50, 231, generator=torch.Generator().manual_seed(1))
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(torch.ops.jit_unlearn.perturb(x, 7, 0.3, 4, 2, True))
    finally:
        torch.set_num_threads(saved)
    for x_tilde, in_norm in results[1:]:
        assert torch.equal(x_tilde, results[0][0]) and torch.equal(in_norm, results[0][1])
