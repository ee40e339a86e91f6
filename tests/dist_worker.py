"""Worker of tests/test_distributed.py, run by torchrun with gloo on CPU; each rank saves its results.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py SCENARIO OUT_DIR

Scenarios: "compare" (helpers, importances, SSD family and JiT on each rank, saved to
OUT_DIR/rank{r}.pt), "raise" (rank 1 raises mid-run), "hang" (rank 1 stops taking part; the others
time out).  The problem builders below are imported by the test to compute the single-process results.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

WORLD = 2
NUM_CLASSES = 4
# 38 samples in batches of 8: five batches (the last has 6), so rank 0 gets three and rank 1 two.
NUM_SAMPLES, BATCH = 38, 8
# 9 forget samples in batches of 4 (4, 4, 1): the last JiT batch leaves rank 1 with no rows.
NUM_FORGET, FORGET_BATCH = 9, 4
JIT_ARGS = dict(sigma=0.5, lr=0.05, num_samples=3, seed=11, progress=False)
PG_TIMEOUT_S = 30
HANG_TIMEOUT_S = 4


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(NUM_SAMPLES, 1, 8, 8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=g)
    return x, y


def make_model() -> torch.nn.Module:
    """A small BatchNorm CNN with non-trivial running statistics (evaluated in eval mode)."""
    from jit_unlearn.models import SmallCNN

    torch.manual_seed(1)
    model = SmallCNN(in_channels=1, num_classes=NUM_CLASSES, width=4)
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def loader(x, y, *, batch_size=BATCH, seed=None) -> DataLoader:
    """Sequential loader, or a shuffled one drawing from a generator seeded with `seed`."""
    ds = TensorDataset(x, y)
    if seed is None:
        return DataLoader(ds, batch_size=batch_size)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def forget_split(x, y):
    return x[:NUM_FORGET], y[:NUM_FORGET]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def imp_record(imp) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in imp.items()},
        "num_samples": imp.num_samples,
        "num_batches": imp.num_batches,
    }


def _batches_as_lists(batches) -> list[list[int]]:
    return [b[0].tolist() if isinstance(b, (list, tuple)) else b.tolist() for b in batches]


def compare(rank: int) -> dict:
    import jit_unlearn
    from jit_unlearn import distributed as D

    out: dict = {}
    # -- helpers ---------------------------------------------------------------------------------
    idx = TensorDataset(torch.arange(NUM_SAMPLES))
    out["shard_seq"] = _batches_as_lists(D.shard_batches(DataLoader(idx, batch_size=BATCH)))
    out["shard_shuffled"] = _batches_as_lists(
        D.shard_batches(
            DataLoader(idx, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(100 + rank))
        )
    )
    torch.manual_seed(5 + rank)  # ranks disagree; rank 0's draw must win
    out["shard_global_rng"] = _batches_as_lists(D.shard_batches(DataLoader(idx, batch_size=BATCH, shuffle=True)))
    out["after_global_rng"] = torch.rand(3)
    out["shard_list"] = _batches_as_lists(D.shard_batches([torch.tensor([i]) for i in range(5)]))
    dsl = DataLoader(idx, batch_size=BATCH, sampler=DistributedSampler(idx, shuffle=False))
    out["dist_sampler_kept"] = D.shard_batches(dsl) is dsl
    out["same_shuffled"] = _batches_as_lists(
        D.same_batches(
            DataLoader(idx, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(100 + rank))
        )
    )
    out["row_slices"] = [(s.start, s.stop) for s in (D.row_slice(n) for n in range(6))]

    small = [
        torch.full((3,), float(rank + 1)),
        torch.arange(6.0).view(2, 3).t() * (rank + 1),
        torch.tensor([rank + 1], dtype=torch.int64),
        torch.ones(2, dtype=torch.float64),
    ]
    bucket = D.BUCKET_BYTES
    D.BUCKET_BYTES = 16  # force several buckets
    D.all_reduce_sum_(small)
    D.BUCKET_BYTES = bucket
    out["reduced"] = small
    out["count"] = D.all_reduce_count(rank + 1)
    out["counts"] = D.all_reduce_count([rank, 10])

    model = make_model()
    D.check_same_model(model)
    out["same_model_ok"] = True
    bad = make_model()
    if rank == 1:
        with torch.no_grad():
            bad.fc.bias[0] = torch.nextafter(bad.fc.bias[0], torch.tensor(1.0))  # one ulp
    try:
        D.check_same_model(bad)
        out["diff_model_error"] = None
    except RuntimeError as exc:
        out["diff_model_error"] = str(exc)
    other = make_model() if rank == 0 else torch.nn.Sequential(make_model(), torch.nn.Linear(4, 4))
    try:
        D.check_same_model(other)
        out["arch_error"] = None
    except RuntimeError as exc:
        out["arch_error"] = str(exc)

    ddp = torch.nn.parallel.DistributedDataParallel(make_model())
    try:
        jit_unlearn.jit(ddp, torch.rand(4, 1, 8, 8), **JIT_ARGS)
        out["ddp_error"] = None
    except TypeError as exc:
        out["ddp_error"] = str(exc)
    out["ddp_unchanged"] = all(
        torch.equal(a, b) for a, b in zip(state(ddp.module).values(), state(make_model()).values())
    )
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    sharded = torch.nn.Linear(4, 4)
    sharded.weight = torch.nn.Parameter(
        distribute_tensor(sharded.weight.detach(), init_device_mesh("cpu", (WORLD,)), [Shard(0)])
    )
    try:
        D.check_same_model(sharded)
        out["dtensor_error"] = None
    except NotImplementedError as exc:
        out["dtensor_error"] = str(exc)

    # -- importances -----------------------------------------------------------------------------
    x, y = make_data()
    for kind in ("fisher", "output_norm"):
        for per_sample in (False, True):
            imp = jit_unlearn.importances(make_model(), loader(x, y), kind=kind, per_sample=per_sample, progress=False)
            out[f"imp_{kind}_{int(per_sample)}"] = imp_record(imp)
    out["imp_shuffled"] = imp_record(
        jit_unlearn.importances(make_model(), loader(x, y, seed=100 + rank), progress=False)
    )
    ds = TensorDataset(x, y)
    dsl = DataLoader(ds, batch_size=BATCH, sampler=DistributedSampler(ds, shuffle=False))
    out["imp_dist_sampler"] = imp_record(jit_unlearn.importances(make_model(), dsl, per_sample=True, progress=False))
    tensor_input = x[:11]  # a bare tensor of inputs: one batch, so rank 1 has none
    out["imp_one_batch"] = imp_record(
        jit_unlearn.importances(make_model(), tensor_input, kind="output_norm", progress=False)
    )

    # -- SSD family ------------------------------------------------------------------------------
    xf, yf = forget_split(x, y)
    for name in ("ssd", "lf_ssd", "assd"):
        model = make_model()
        getattr(jit_unlearn, name)(model, loader(xf, yf), loader(x, y), progress=False)
        out[name] = state(model)

    # -- JiT -------------------------------------------------------------------------------------
    for reduction in ("sum", "mean"):
        model = make_model()
        report = jit_unlearn.jit(model, loader(xf, yf, batch_size=FORGET_BATCH), reduction=reduction, **JIT_ARGS)
        out[f"jit_{reduction}"] = state(model)
        out[f"jit_{reduction}_report"] = (report.steps, report.samples, report.mean_loss)
    model = make_model()
    jit_unlearn.jit(model, loader(xf, yf, batch_size=FORGET_BATCH, seed=100 + rank), **JIT_ARGS)
    out["jit_shuffled"] = state(model)
    model = make_model()
    fds = TensorDataset(xf[:8])
    jit_unlearn.jit(
        model,
        DataLoader(fds, batch_size=2, sampler=DistributedSampler(fds, shuffle=False)),
        reduction="mean",
        **JIT_ARGS,
    )
    out["jit_presharded"] = state(model)
    return out


def raise_midway(rank: int) -> None:
    import jit_unlearn
    from jit_unlearn import distributed as D

    D.all_reduce_count(1)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    x, y = make_data()
    jit_unlearn.importances(make_model(), loader(x, y), progress=False)


def hang(rank: int) -> None:
    import torch.distributed as dist

    from jit_unlearn import distributed as D

    # a group with a short timeout (the default group keeps a long one, so that a slow start
    # under load cannot fail the rendezvous)
    group = dist.new_group(timeout=datetime.timedelta(seconds=HANG_TIMEOUT_S))
    D.all_reduce_count(1, group)
    if rank == 1:
        time.sleep(600)  # stuck: never joins the next collective
    D.all_reduce_sum_([torch.ones(4)], group)


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def run() -> None:
        import torch.distributed as dist

        scenario, out_dir = sys.argv[1], sys.argv[2]
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        rank = dist.get_rank()
        if scenario == "compare":
            torch.save(compare(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        elif scenario == "raise":
            raise_midway(rank)
        elif scenario == "hang":
            hang(rank)
        else:
            raise ValueError(f"scenario: unknown {scenario!r}")
        dist.destroy_process_group()

    run()


if __name__ == "__main__":
    main()
