"""Shared test configuration and helpers (import them with `from conftest import ...`)."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def expected_tier(device_type: str) -> str:
    """The tier the public ops must run on `device_type` in this process, worked out from the build
    and the environment: "torch" under JIT_UNLEARN_BACKEND=torch or without compiled kernels for the
    device, else the device type ("cpu" or "cuda")."""
    from jit_unlearn import _backend

    forced_torch = os.environ.get("JIT_UNLEARN_BACKEND", "").strip().lower() == "torch"
    return "torch" if forced_torch or not _backend.has_kernel(device_type) else device_type


def subprocess_env(root: str = ROOT, **extra: str) -> dict:
    """The environment of a child interpreter that imports jit_unlearn from `root` (this checkout by
    default): `root` first on PYTHONPATH, plus the `extra` variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def pytest_collection_modifyitems(items):
    """Mark `cuda` (select with `-m cuda`) every test whose name or skip reason mentions CUDA."""
    for item in items:
        reasons = " ".join(str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))
        if "cuda" in f"{item.name} {reasons}".lower():
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=["compiled", "torch"])
def backend(request):
    """Run a test once per tier: the compiled kernels (skipped if not built) and pure PyTorch."""
    from jit_unlearn import _backend

    if request.param == "compiled" and not _backend.has_kernel("cpu"):
        pytest.skip("compiled CPU kernels not built")
    _backend.force_backend(request.param)
    yield request.param
    _backend.force_backend(None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: no OpenMP fork/join per op, and sums in a
    fixed order."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
