"""Distributed importances, SSD and JiT under torchrun (2 ranks, gloo, CPU) against one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import conftest
import dist_worker as W
from conftest import subprocess_env

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

ROOT = Path(conftest.ROOT)
LAUNCH_TIMEOUT_S = 90


def _launch(scenario: str, out_dir: Path) -> tuple[int, str]:
    """Run the worker on 2 ranks; returns (exit code, stdout + stderr).  The whole process group is
    killed if it outlives LAUNCH_TIMEOUT_S, so a hang fails the test instead of the test run."""
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={W.WORLD}",
        str(ROOT / "tests" / "dist_worker.py"),
        scenario,
        str(out_dir),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {scenario!r} did not finish within {LAUNCH_TIMEOUT_S} s:\n{output[-4000:]}")
    return proc.returncode, output


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The 'compare' results of both ranks."""
    out_dir = tmp_path_factory.mktemp("dist")
    code, output = _launch("compare", out_dir)
    assert code == 0, f"torchrun compare failed ({code}):\n{output[-6000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(W.WORLD)]


def _close(a, b, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _ids(loader) -> list[list[int]]:
    return [b[0].tolist() for b in loader]


def _index_data():
    return TensorDataset(torch.arange(W.NUM_SAMPLES))


# -- helpers -----------------------------------------------------------------------------------------


def test_shard_batches_partitions_the_loader(ranks):
    every = _ids(DataLoader(_index_data(), batch_size=W.BATCH))
    for r, res in enumerate(ranks):
        assert res["shard_seq"] == every[r :: W.WORLD]
        assert res["shard_list"] == [[i] for i in range(5)][r :: W.WORLD]
        assert res["dist_sampler_kept"] is True
    assert sorted(i for res in ranks for b in res["shard_seq"] for i in b) == list(range(W.NUM_SAMPLES))


def test_shuffled_loader_is_split_as_rank0_draws_it(ranks):
    # rank r's loader draws from a generator seeded 100 + r: the split follows rank 0's order,
    # exactly what iterating rank 0's loader in one process yields
    every = _ids(
        DataLoader(_index_data(), batch_size=W.BATCH, shuffle=True, generator=torch.Generator().manual_seed(100))
    )
    for r, res in enumerate(ranks):
        assert res["shard_shuffled"] == every[r :: W.WORLD]
        assert res["same_shuffled"] == every


def test_global_rng_shuffle_follows_rank0_and_advances_like_one_process(ranks):
    torch.manual_seed(5)
    every = _ids(DataLoader(_index_data(), batch_size=W.BATCH, shuffle=True))
    for r, res in enumerate(ranks):
        assert res["shard_global_rng"] == every[r :: W.WORLD]
        torch.manual_seed(5 + r)
        _ids(DataLoader(_index_data(), batch_size=W.BATCH, shuffle=True))
        assert torch.equal(res["after_global_rng"], torch.rand(3))


def test_row_slices_match_tensor_split(ranks):
    for r, res in enumerate(ranks):
        for n, (start, stop) in enumerate(res["row_slices"]):
            assert torch.arange(n)[start:stop].tolist() == torch.tensor_split(torch.arange(n), W.WORLD)[r].tolist()


def test_all_reduce_sum_and_count(ranks):
    expected = [
        torch.full((3,), 3.0),
        torch.arange(6.0).view(2, 3).t() * 3,
        torch.tensor([3]),
        torch.full((2,), 2.0, dtype=torch.float64),
    ]
    for res in ranks:
        for got, want in zip(res["reduced"], expected):
            assert got.dtype == want.dtype
            assert torch.equal(got, want)
        assert res["count"] == 3
        assert res["counts"] == [1, 20]


def test_check_same_model(ranks):
    for res in ranks:
        assert res["same_model_ok"]
        assert "rank 1" in res["diff_model_error"] and "'fc.bias'" in res["diff_model_error"]
        assert "rank 1" in res["arch_error"] and "names, shapes" in res["arch_error"]


def test_wrapped_and_sharded_models_are_refused(ranks):
    for res in ranks:
        assert "model.module" in res["ddp_error"]
        assert res["ddp_unchanged"]
        assert "sharded" in res["dtensor_error"]


# -- importances and SSD -------------------------------------------------------------------------------


def _check_importances(got: dict, imp) -> None:
    assert got["num_samples"] == imp.num_samples and got["num_batches"] == imp.num_batches
    assert got["tensors"].keys() == set(imp.keys())
    for name, t in imp.items():
        _close(got["tensors"][name], t)


@pytest.mark.parametrize("kind", ["fisher", "output_norm"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_importances_equal_single_process(ranks, kind, per_sample):
    import jit_unlearn

    x, y = W.make_data()
    imp = jit_unlearn.importances(W.make_model(), W.loader(x, y), kind=kind, per_sample=per_sample, progress=False)
    assert imp.num_batches == 5 and imp.num_samples == W.NUM_SAMPLES
    for res in ranks:
        _check_importances(res[f"imp_{kind}_{int(per_sample)}"], imp)


def test_importances_of_shuffled_loader_and_distributed_sampler(ranks):
    import jit_unlearn

    x, y = W.make_data()
    shuffled = jit_unlearn.importances(W.make_model(), W.loader(x, y, seed=100), progress=False)
    per_sample = jit_unlearn.importances(W.make_model(), W.loader(x, y), per_sample=True, progress=False)
    one_batch = jit_unlearn.importances(W.make_model(), x[:11], kind="output_norm", progress=False)
    for res in ranks:
        _check_importances(res["imp_shuffled"], shuffled)
        _check_importances(res["imp_one_batch"], one_batch)
        # a DistributedSampler loader is used as it is: each rank reads its 19 samples
        got = res["imp_dist_sampler"]
        assert got["num_samples"] == W.NUM_SAMPLES
        for name, t in per_sample.items():
            _close(got["tensors"][name], t)


@pytest.mark.parametrize("method", ["ssd", "lf_ssd", "assd"])
def test_ssd_family_equal_single_process(ranks, method):
    import jit_unlearn

    x, y = W.make_data()
    xf, yf = W.forget_split(x, y)
    model = W.make_model()
    getattr(jit_unlearn, method)(model, W.loader(xf, yf), W.loader(x, y), progress=False)
    for res in ranks:
        for name, t in model.state_dict().items():
            _close(res[method][name], t)


# -- JiT -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_jit_default_equals_one_process_on_the_global_batch(ranks, reduction):
    import jit_unlearn

    x, y = W.make_data()
    xf, yf = W.forget_split(x, y)
    model = W.make_model()
    report = jit_unlearn.jit(model, W.loader(xf, yf, batch_size=W.FORGET_BATCH), reduction=reduction, **W.JIT_ARGS)
    for res in ranks:
        steps, samples, mean_loss = res[f"jit_{reduction}_report"]
        assert (steps, samples) == (report.steps, report.samples) == (3, W.NUM_FORGET)
        assert mean_loss == pytest.approx(report.mean_loss, rel=1e-5)
        for name, t in model.state_dict().items():
            _close(res[f"jit_{reduction}"][name], t)


def test_jit_shuffled_forget_loader_follows_rank0(ranks):
    import jit_unlearn

    x, y = W.make_data()
    xf, yf = W.forget_split(x, y)
    model = W.make_model()
    jit_unlearn.jit(model, W.loader(xf, yf, batch_size=W.FORGET_BATCH, seed=100), **W.JIT_ARGS)
    for res in ranks:
        for name, t in model.state_dict().items():
            _close(res["jit_shuffled"][name], t)


def test_jit_presharded_loader(ranks):
    """DistributedSampler loader: step t sums the ranks' losses on their own batches (noise stream
    t * world + r, clamp to the rank's batch range), divided by the global batch size."""
    from jit_unlearn import ops

    x, _ = W.make_data()
    xf = x[:8]
    model = W.make_model().eval()
    sgd = torch.optim.SGD(model.parameters(), lr=W.JIT_ARGS["lr"])
    n, sigma, seed = W.JIT_ARGS["num_samples"], W.JIT_ARGS["sigma"], W.JIT_ARGS["seed"]
    local = [xf[r :: W.WORLD] for r in range(W.WORLD)]  # DistributedSampler(shuffle=False) interleaves
    for step in range(2):
        sgd.zero_grad()
        total = 0.0
        for r in range(W.WORLD):
            xb = local[r][2 * step : 2 * step + 2]
            x_tilde, in_norm = ops.perturb(xb, n, sigma, seed, step * W.WORLD + r, True)
            out = model(xb)
            with torch.no_grad():
                out2 = model(x_tilde.flatten(0, 1)).view(n, xb.shape[0], -1)
            ratio = torch.linalg.vector_norm(out.unsqueeze(0) - out2, dim=2) / in_norm
            total = total + ratio.sum() / n
        (total / 4).backward()
        sgd.step()
    for res in ranks:
        for name, t in model.state_dict().items():
            _close(res["jit_presharded"][name], t)


# -- failures end the job ----------------------------------------------------------------------------


def test_failing_rank_ends_the_job(tmp_path):
    code, output = _launch("raise", tmp_path)
    assert code != 0
    assert "rank 1 fails on purpose" in output
    assert "ChildFailedError" in output or "FAILED" in output


def test_stuck_rank_times_out(tmp_path):
    """Rank 1 never joins a collective: rank 0 gives up after the process-group timeout, and
    torchrun stops rank 1, well before the launch timeout."""
    code, output = _launch("hang", tmp_path)
    assert code != 0
    assert "timed out" in output.lower() or "timeout" in output.lower()
