"""The tier machinery: which backend runs, forcing the fallback, working without the extension,
and the build promises (CUDA compiled in when requested, the CMake build registers the ops)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import jit_unlearn
from conftest import ROOT, subprocess_env
from jit_unlearn import _backend, torch_ops

OPS = (
    "perturb",
    "_perturb_out",
    "lipschitz_ratio",
    "_lipschitz_ratio_backward",
    "_lipschitz_ratio_and_grad",
    "accumulate_importance_",
    "ssd_dampen_",
    "masked_reset_",
)


def _run(code: str, env_extra: dict | None = None, root: str = ROOT) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports jit_unlearn from `root`."""
    env = subprocess_env(root)
    env.pop("JIT_UNLEARN_BACKEND", None)
    env.pop("JIT_UNLEARN_LIBRARY", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120, cwd=root
    )


@pytest.fixture
def pure_package(tmp_path):
    """A copy of the package without its compiled library, as `JIT_UNLEARN_NO_EXTENSION=1` installs it;
    returns the folder to put on the path."""
    shutil.copytree(
        os.path.join(ROOT, "jit_unlearn"),
        tmp_path / "jit_unlearn",
        ignore=shutil.ignore_patterns("_C*", "__pycache__", "*.gz"),
    )
    return str(tmp_path)


def _requested_by_environment() -> str:
    value = os.environ.get("JIT_UNLEARN_BACKEND", "auto").strip().lower() or "auto"
    return value if value in ("auto", "compiled", "torch") else "auto"


def test_backend_info_reports_tiers():
    """What backend_info says follows from the build and JIT_UNLEARN_BACKEND (this process may run
    under =torch: the suite's second pass), and the ops run the tier it names."""
    info = jit_unlearn.backend_info()
    assert set(info) >= {"extension_loaded", "compiled_cpu", "compiled_cuda", "cuda_available", "requested", "active"}
    assert info["requested"] == _requested_by_environment()
    want = "torch" if info["requested"] == "torch" or not info["compiled_cpu"] else "cpu"
    assert info["active"]["cpu"] == want
    if not torch.cuda.is_available():
        assert info["active"]["cuda"] is None
    # the tier named is the one that runs: the compiled op, or the pure-PyTorch function
    want_fn = _backend._COMPILED["perturb"] if want == "cpu" else torch_ops.perturb
    assert _backend.kernel("perturb", torch.device("cpu")) is want_fn


def test_auto_tier_in_a_fresh_process():
    """Without JIT_UNLEARN_BACKEND a fresh interpreter runs the compiled CPU kernels when they are built."""
    res = _run('import jit_unlearn; i = jit_unlearn.backend_info(); print(i["requested"], i["active"]["cpu"])')
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["auto", "cpu" if _backend.has_kernel("cpu") else "torch"]


def test_force_backend_torch_and_back():
    jit_unlearn.force_backend("torch")
    try:
        assert _backend.backend_name("cpu") == "torch"
        assert jit_unlearn.backend_info()["requested"] == "torch"
    finally:
        jit_unlearn.force_backend(None)
    with pytest.raises(ValueError, match="backend"):
        jit_unlearn.force_backend("fortran")


def test_env_variable_forces_fallback():
    res = _run(
        """
        import jit_unlearn, torch
        print(jit_unlearn.backend_info()["active"]["cpu"])
        x_t, n = jit_unlearn.ops.perturb(torch.ones(2, 3), 2, 0.1, seed=1)
        print(tuple(x_t.shape), tuple(n.shape))
    """,
        {"JIT_UNLEARN_BACKEND": "torch"},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["torch", "(2, 2, 3) (2, 2)"]


def test_package_works_without_extension(pure_package):
    """No compiled library next to the package: every op must still run, on the pure-PyTorch tier."""
    res = _run(
        """
        import torch, jit_unlearn
        from jit_unlearn import ops
        info = jit_unlearn.backend_info()
        assert not info["extension_loaded"] and info["active"]["cpu"] == "torch", info
        x_t, n = ops.perturb(torch.randn(3, 4), 5, 0.5, seed=3)
        out = torch.randn(3, 2, requires_grad=True)
        r = ops.lipschitz_ratio(out, torch.randn(5, 3, 2), n)
        r.sum().backward()
        acc = [torch.zeros(4)]
        ops.accumulate_importance_(acc, [torch.full((4,), 2.0)], "square", 1.0)
        p = [torch.ones(3)]
        c = ops.ssd_dampen_(p, [torch.tensor([1.0, 0.0, 4.0])], [torch.tensor([0.5, 1.0, 0.0])], 1.0, 1.0, 1.0)
        ops.masked_reset_(p, [torch.zeros(3)], [torch.tensor([True, False, False])])
        print(acc[0].tolist(), c.tolist(), p[0].tolist(), bool(torch.isfinite(out.grad).all()))
    """,
        root=pure_package,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[4.0, 4.0, 4.0, 4.0] [2] [0.0, 1.0, 0.0] True"


def test_compiled_request_without_kernel_is_actionable(monkeypatch):
    """force_backend("compiled") where no compiled kernel exists raises an error that says what to do:
    on `meta` (no build has kernels there) and on a CPU whose kernels are missing (faked)."""
    message = r"compiled backend was requested but no compiled kernel exists for device '{}'.*Rebuild"
    jit_unlearn.force_backend("compiled")
    try:
        with pytest.raises(RuntimeError, match=message.format("meta")):
            jit_unlearn.ops.perturb(torch.ones(2, 3, device="meta"), 1, 0.1)
        with pytest.raises(RuntimeError, match=message.format("meta")):
            jit_unlearn.ops.accumulate_importance_([torch.zeros(3, device="meta")], [torch.ones(3, device="meta")])
        monkeypatch.setitem(_backend._HAS_KERNEL, "cpu", False)
        with pytest.raises(RuntimeError, match=message.format("cpu")):
            jit_unlearn.ops.perturb(torch.ones(2, 3), 1, 0.1)
        with pytest.raises(RuntimeError, match=message.format("cpu")):
            jit_unlearn.jit(torch.nn.Linear(3, 2), torch.ones(4, 3), sigma=0.1, lr=0.1, progress=False)
        assert jit_unlearn.backend_info()["active"]["cpu"] == "unavailable"
    finally:
        jit_unlearn.force_backend(None)


def test_compiled_request_without_library_names_the_cause(pure_package):
    """JIT_UNLEARN_BACKEND=compiled in a package without its library: the error says no library loaded."""
    res = _run(
        """
        import torch, jit_unlearn
        try:
            jit_unlearn.ops.perturb(torch.ones(2, 3), 1, 0.1)
        except RuntimeError as exc:
            print(exc)
        """,
        {"JIT_UNLEARN_BACKEND": "compiled"},
        root=pure_package,
    )
    assert res.returncode == 0, res.stderr
    assert "no compiled kernel exists for device 'cpu' (no library loaded: no compiled library" in res.stdout


@pytest.mark.skipif(os.environ.get("FORCE_CUDA") != "1", reason="CUDA sources were not requested")
def test_cuda_kernels_compiled_in_when_requested():
    """With FORCE_CUDA=1 the build must contain a CUDA kernel for every op."""
    assert _backend.extension_loaded(), jit_unlearn.backend_info()["load_error"]
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_unlearn::{op}", "CUDA"), op


def test_compiled_cpu_kernels_cover_every_op():
    if not _backend.extension_loaded():
        pytest.skip("extension not built")
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_unlearn::{op}", "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"


CMAKE_LIB = os.environ.get("JIT_UNLEARN_CMAKE_LIB")
CMAKE_LIB = os.path.abspath(CMAKE_LIB) if CMAKE_LIB else None


@pytest.mark.skipif(not CMAKE_LIB, reason="no CMake-built library given")
def test_cmake_build_registers_the_same_ops(pure_package):
    """The library CMake built (path in JIT_UNLEARN_CMAKE_LIB), loaded with `jit_unlearn.load_library`
    into a package without its own, registers every op with a CPU kernel (and a CUDA kernel when
    FORCE_CUDA=1), computes what the pure-PyTorch tier computes, and gets the fakes and autograd of
    the setup.py build: lipschitz_ratio's backward matches autograd through torch_ops, and opcheck
    passes."""
    res = _run(
        f"""
        import os, torch
        import jit_unlearn
        from jit_unlearn import _backend, torch_ops
        assert not jit_unlearn.backend_info()["extension_loaded"]
        jit_unlearn.load_library({CMAKE_LIB!r})
        jit_unlearn.load_library({CMAKE_LIB!r})  # the same file again: nothing happens
        info = jit_unlearn.backend_info()
        assert info["library"] == os.path.realpath({CMAKE_LIB!r}) and info["active"]["cpu"] == "cpu", info
        keys = ["CPU", "CUDA"] if {os.environ.get("FORCE_CUDA") == "1"!r} else ["CPU"]
        for op in {OPS!r}:
            for key in keys:
                assert torch._C._dispatch_has_kernel_for_dispatch_key("jit_unlearn::" + op, key), (op, key)
        x = torch.randn(4, 6)
        a, na = torch.ops.jit_unlearn.perturb(x, 3, 0.5, 7, 1, True)
        b, nb = torch_ops.perturb(x, 3, 0.5, 7, 1, True)
        assert torch.equal(a, b) and torch.allclose(na, nb)

        g = torch.Generator().manual_seed(0)
        out = torch.randn(5, 3, generator=g, requires_grad=True)
        pert = torch.randn(4, 5, 3, generator=g, requires_grad=True)
        norm = torch.rand(4, 5, generator=g) + 0.5
        weights = torch.randn(4, 5, generator=g)
        (torch.ops.jit_unlearn.lipschitz_ratio(out, pert, norm) * weights).sum().backward()
        out_ref, pert_ref = out.detach().clone().requires_grad_(), pert.detach().clone().requires_grad_()
        (torch_ops.lipschitz_ratio(out_ref, pert_ref, norm) * weights).sum().backward()
        torch.testing.assert_close(out.grad, out_ref.grad)
        torch.testing.assert_close(pert.grad, pert_ref.grad)
        torch.library.opcheck(torch.ops.jit_unlearn.lipschitz_ratio.default, (out, pert, norm))
        torch.library.opcheck(torch.ops.jit_unlearn._lipschitz_ratio_backward.default,
                              (weights, out.detach(), pert.detach(), norm, True))
        try:
            jit_unlearn.load_library(torch_ops.__file__)
        except RuntimeError as exc:
            assert "loaded already" in str(exc), exc
        else:
            raise AssertionError("a second library loaded")
        print("ok")
    """,
        root=pure_package,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@pytest.mark.skipif(not CMAKE_LIB, reason="no CMake-built library given")
def test_library_named_in_the_environment_replaces_the_package_one():
    """JIT_UNLEARN_LIBRARY loads another build (here CMake's) at import, in place of the package's own."""
    res = _run(
        """
        import torch, jit_unlearn
        from jit_unlearn import torch_ops
        print(jit_unlearn.backend_info()["library"])
        out = torch.randn(3, 2, requires_grad=True)
        pert, norm = torch.randn(2, 3, 2), torch.rand(2, 3) + 0.5
        jit_unlearn.ops.lipschitz_ratio(out, pert, norm).sum().backward()
        want = torch_ops.lipschitz_ratio_backward(torch.ones(2, 3), out.detach(), pert, norm, False)[0]
        torch.testing.assert_close(out.grad, want)
    """,
        {"JIT_UNLEARN_LIBRARY": CMAKE_LIB},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == os.path.realpath(CMAKE_LIB)
