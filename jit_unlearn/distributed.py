"""Data-parallel helpers on torch.distributed (gloo on CPU, nccl on GPU) for importances and JiT.

Nothing here starts a process group: the caller does, typically under `torchrun`, e.g.

    import datetime, os, torch, torch.distributed as dist
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5))   # "gloo" on CPU

Always pass `timeout=` (to `init_process_group`, or to `dist.new_group` for a group given as
`group=`): a collective that waits for a rank which died or hangs then raises after `timeout`
(gloo raises in the waiting call; nccl's watchdog tears the process down, the default
TORCH_NCCL_ASYNC_ERROR_HANDLING=3) and torchrun stops the remaining ranks, so the job fails
instead of waiting forever.  With nccl every rank must select its own GPU before the first
collective (`torch.cuda.set_device`), since small control tensors are placed on the current device.

When no process group is initialised, or it has one rank, every helper is the identity / a no-op,
so the methods call them unconditionally.  All helpers are collectives when active: every rank of
the group must call them in the same order.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "is_active",
    "world_size",
    "rank",
    "uses_distributed_sampler",
    "shard_batches",
    "same_batches",
    "row_slice",
    "all_reduce_sum_",
    "all_reduce_count",
    "all_reduce_grads_",
    "check_same_model",
    "BatchSplit",
]

# Tensors summed by one all-reduce are packed into flat buffers of at most this many bytes, so the
# temporary copy stays bounded on large models while small models need a single collective.
BUCKET_BYTES = 64 << 20
# Checksums are sums of 31-bit residues of the parameters' bit patterns, taken in pieces of this many
# elements so no int64 sum can overflow and the temporaries stay small.
_CHECKSUM_PRIME = 2147483629  # the largest prime below 2^31
_CHECKSUM_PIECE = 1 << 24


def is_active(group=None) -> bool:
    """True when torch.distributed is available, initialised, and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    """Number of ranks in the group (1 when not distributed)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank in the group (0 when not distributed)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _control_device(group=None) -> torch.device:
    """Where small control tensors (counts, checksums) go: the current GPU for a nccl-only group,
    the CPU otherwise (gloo, mpi, or a mixed "cpu:gloo,cuda:nccl" group)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def uses_distributed_sampler(data) -> bool:
    """True when `data` is a DataLoader whose sampler already gives each rank its own share: a
    DistributedSampler, or any sampler with a `num_replicas` attribute above 1."""
    if not isinstance(data, DataLoader):
        return False
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return True
        replicas = getattr(sampler, "num_replicas", None)
        if isinstance(replicas, int) and replicas > 1:
            return True
    return False


def _map_style(loader) -> bool:
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)


def _units(loader: DataLoader):
    """What a map-style loader draws per batch: index lists (batch_sampler) or single indices."""
    return loader.batch_sampler if loader.batch_sampler is not None else loader.sampler


def _deterministic(loader: DataLoader) -> bool:
    """The loader's batches are fixed by the dataset alone (torch's own sequential sampling), so
    every rank already agrees on them without communication."""
    if loader.batch_sampler is None:
        return type(loader.sampler) is SequentialSampler
    return type(loader.batch_sampler) is BatchSampler and type(loader.batch_sampler.sampler) is SequentialSampler


def _rebuild(loader: DataLoader, units, generator: torch.Generator | None = None) -> DataLoader:
    """A loader over the same dataset, collate function and worker settings that draws `units`
    (a list of index lists, or of indices when the loader does not batch automatically).
    `generator` (default: the loader's) only seeds the workers now that the order is fixed."""
    kwargs = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator if generator is None else generator,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
        in_order=getattr(loader, "in_order", True),
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=units, **kwargs)
    return DataLoader(loader.dataset, batch_size=None, sampler=units, **kwargs)


def _rank0_units(loader: DataLoader, group=None) -> tuple[list, torch.Generator]:
    """Rank 0's draw of the loader's batches (index lists), sent to every rank, and a generator for
    the rebuilt loader.

    Iterating a DataLoader first draws a worker base seed from its generator (the global one when
    it has none), then the sampler draws the order.  The same happens here, on every rank, so the
    order and every generator's state afterwards are what iterating the loader in one process
    gives; the rebuilt loader gets a generator in the pre-draw state for its own base seed."""
    source = loader.generator
    before = torch.Generator()
    before.set_state(torch.get_rng_state() if source is None else source.get_state())
    torch.empty((), dtype=torch.int64).random_(generator=source)
    units = [list(u) if isinstance(u, (list, tuple)) else u for u in _units(loader)]
    box = [units]
    dist.broadcast_object_list(
        box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group, device=_control_device(group)
    )
    return box[0], before


class _Strided:
    """Every `step`-th item of an iterable, starting at `start`; has a length when the source does."""

    def __init__(self, source: Iterable, start: int, step: int):
        self.source, self.start, self.step = source, start, step

    def __iter__(self):
        for i, item in enumerate(self.source):
            if i % self.step == self.start:
                yield item

    def __len__(self) -> int:
        return len(range(self.start, len(self.source), self.step))


def shard_batches(batches: Iterable, group=None) -> Iterable:
    """This rank's share of `batches`: rank r keeps the batches with index i % world_size == r, so
    the ranks together see exactly the batches one process would, each once.

    - Not distributed, or a DataLoader that already uses a DistributedSampler: returned as is.
    - Map-style DataLoader: a new DataLoader (same dataset, collate function, workers) that loads
      only this rank's batches.  If its sampler is not sequential (shuffling, weighted, custom),
      rank 0's draw of the batches is broadcast first, so all ranks split the same set of batches.
    - Anything else (iterable datasets, lists, generators): every rank iterates all batches and
      keeps its share; the iterable must yield the same batches in the same order on every rank.
    """
    if not is_active(group) or uses_distributed_sampler(batches):
        return batches
    r, w = rank(group), world_size(group)
    if _map_style(batches):
        if _deterministic(batches):
            return _rebuild(batches, _Strided(_units(batches), r, w))
        units, generator = _rank0_units(batches, group)
        return _rebuild(batches, units[r::w], generator)
    return _Strided(batches, r, w)


def same_batches(batches: Iterable, group=None) -> Iterable:
    """`batches` made identical on every rank: a map-style DataLoader with a non-sequential sampler
    is rebuilt to yield rank 0's draw; anything else is returned as is (it must already agree)."""
    if not is_active(group) or not _map_style(batches) or _deterministic(batches) or uses_distributed_sampler(batches):
        return batches
    units, generator = _rank0_units(batches, group)
    return _rebuild(batches, units, generator)


def row_slice(n: int, group=None) -> slice:
    """This rank's contiguous share of n rows, as torch.tensor_split(n rows, world_size) splits
    them (the first n % world_size ranks take one row more; a rank may get none when n < world)."""
    w, r = world_size(group), rank(group)
    q, extra = divmod(n, w)
    start = r * q + min(r, extra)
    return slice(start, start + q + (r < extra))


def all_reduce_sum_(tensors: Sequence[torch.Tensor], group=None) -> None:
    """In place, every tensor becomes its sum over the ranks.

    The tensors are grouped by device and dtype and packed into flat buffers of at most
    BUCKET_BYTES, one all-reduce per buffer (a single collective for a small model).  Any shapes,
    any floating or integer dtype; with nccl they must be on the current GPU."""
    if not is_active(group):
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors: expected torch.Tensor items, got {type(t).__name__}")
        groups.setdefault((t.device, t.dtype), []).append(t)
    for members in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in members:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > BUCKET_BYTES:
                _reduce_bucket(bucket, group)
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            _reduce_bucket(bucket, group)


def _reduce_bucket(bucket: list[torch.Tensor], group) -> None:
    if len(bucket) == 1 and bucket[0].is_contiguous():
        dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=group)
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape))
        offset += n


def all_reduce_count(n, group=None):
    """The sum over ranks of an int, or of each int of a sequence (one collective); returns the
    same structure.  Identity when not distributed."""
    single = isinstance(n, int)
    values = [n] if single else list(n)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise TypeError(f"n: expected an int or a sequence of ints, got {n!r}")
    if is_active(group):
        t = torch.tensor(values, dtype=torch.int64, device=_control_device(group))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        values = [int(v) for v in t.tolist()]
    return values[0] if single else values


def all_reduce_grads_(params: Iterable[torch.Tensor], group=None) -> None:
    """Sum `.grad` of every parameter over the ranks, in place.  A parameter whose gradient is None
    gets zeros first, so all ranks take part with the same tensors."""
    if not is_active(group):
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_sum_(grads, group)


def _bit_words(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensor's bit pattern as non-negative int64 words of at most 32 bits (flat)."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    size = flat.element_size()
    if size == 8:
        bits = flat.view(torch.int64)
        return [bits & 0xFFFFFFFF, (bits >> 32) & 0xFFFFFFFF]
    view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}.get(size)
    if view is None:
        return _bit_words(flat.view(torch.uint8))
    return [flat.view(view).to(torch.int64) & ((1 << (8 * size)) - 1)]


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Two int64 checksums of a tensor's exact bits: sum of the words mod p, and the sum of
    word * (position + 1) mod p; a single changed bit, or two swapped elements, changes them."""
    p = _CHECKSUM_PRIME
    s1 = torch.zeros((), dtype=torch.int64, device=t.device)
    s2 = torch.zeros((), dtype=torch.int64, device=t.device)
    position = 0
    for words in _bit_words(t):
        for piece in words.split(_CHECKSUM_PIECE):
            w = piece % p
            pos = torch.arange(position + 1, position + 1 + piece.numel(), dtype=torch.int64, device=t.device) % p
            s1 = (s1 + w.sum()) % p
            s2 = (s2 + ((w * pos) % p).sum()) % p
            position += piece.numel()
    return torch.stack([s1, s2])


def _check_replicated(model: torch.nn.Module) -> None:
    """The methods work on a plain module replicated on every rank: a DDP wrapper would average
    gradients a second time, and sharded parameters (FSDP, DTensor) are not supported yet."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise TypeError(
            "model: pass the module inside DistributedDataParallel (model.module); "
            "jit_unlearn reduces gradients and importances across ranks itself"
        )
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = ()
    sharded = any(isinstance(p, DTensor) for p in model.parameters()) or any(
        type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()
    )
    if sharded:
        raise NotImplementedError(
            "model: has sharded (FSDP / DTensor) parameters; jit_unlearn needs the "
            "full model on every rank (see docs/DISTRIBUTED.md, sharded models)"
        )


def check_same_model(model: torch.nn.Module, group=None, *, buffers: bool = True) -> None:
    """Check that every rank holds bitwise the same parameters (and buffers), raising otherwise.

    Each rank computes a signature (names, shapes, dtypes) and per-tensor checksums of the exact
    bits; two small all-gathers compare them with rank 0.  Every rank raises the same
    RuntimeError naming the first differing rank and tensor, so no rank is left waiting.
    A DistributedDataParallel wrapper raises TypeError (pass `model.module`), sharded (FSDP or
    DTensor) parameters NotImplementedError.  No-op when not distributed.  Cost: one read of
    the parameters.
    """
    if not is_active(group):
        return
    _check_replicated(model)
    named = list(model.named_parameters())
    if buffers:
        named += [(n, b) for n, b in model.named_buffers() if b is not None]
    device = _control_device(group)
    w = world_size(group)
    layout = ";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in named)
    signature = torch.tensor([len(named), zlib.crc32(layout.encode())], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(signature) for _ in range(w)]
    dist.all_gather(gathered, signature, group=group)
    for r, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(
                f"model: rank {r} holds a model with other parameter names, shapes or "
                "dtypes than rank 0; build the same architecture on every rank"
            )
    if not named:
        return
    sums = torch.stack([_checksum(t).to(device) for _, t in named])
    gathered = [torch.empty_like(sums) for _ in range(w)]
    dist.all_gather(gathered, sums, group=group)
    for r, other in enumerate(gathered):
        differs = (other != gathered[0]).any(dim=1)
        if bool(differs.any()):
            name = named[int(differs.nonzero()[0, 0])][0]
            raise RuntimeError(
                f"model: rank {r} holds different values than rank 0 (first in {name!r}); "
                "load the same weights on every rank (or broadcast rank 0's state) "
                "before unlearning"
            )


class BatchSplit:
    """How every rank takes part in one data-parallel step over a global batch (used by JiT).

    Two layouts, chosen from the data:
    - row split (the usual case): every rank iterates the same global batches (see `same_batches`)
      and works on its contiguous share of each batch's rows (`row_slice`); what depends on the
      whole batch (noise, clamp range) is computed on the whole batch, so summing the ranks'
      gradients gives exactly one process's gradient on the global batch.
    - pre-sharded: the DataLoader uses a DistributedSampler, so each rank's batch is its share of
      the global batch already; rows are not split further, and each rank draws its own noise
      stream (offset step * world_size + rank) and clamps to its own batch's range.
    Not distributed: every method is the identity.
    """

    def __init__(self, batches: Iterable, group=None):
        self.group = group
        self.active = is_active(group)
        self.presharded = self.active and uses_distributed_sampler(batches)
        self.batches = same_batches(batches, group) if self.active and not self.presharded else batches

    def noise_offset(self, step: int) -> int:
        """Philox stream offset of a step's noise."""
        if not self.presharded:
            return step
        return step * world_size(self.group) + rank(self.group)

    def local(self, x: torch.Tensor, *per_copy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's rows: x [B, ...] sliced on dim 0, each per-copy tensor [N, B, ...] on dim 1."""
        if not self.active or self.presharded:
            return (x, *per_copy)
        rows = row_slice(x.shape[0], self.group)
        return (x[rows], *(t[:, rows] for t in per_copy))

    def global_rows(self, b: int) -> int:
        """Rows of the global batch, given this rank's batch of b rows before `local`."""
        return all_reduce_count(b, self.group) if self.presharded else b

    def reduce_grads_(self, params: Iterable[torch.Tensor]) -> None:
        """Sum the step's gradients over the ranks (the loss is a sum over the global batch)."""
        if self.active:
            all_reduce_grads_(params, self.group)

    def totals(self, samples: int, loss_sum: float) -> tuple[int, float]:
        """Run totals over all ranks: samples (counted once per global row) and the loss sum."""
        if not self.active:
            return samples, loss_sum
        t = torch.tensor([float(loss_sum)], dtype=torch.float64, device=_control_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        if self.presharded:
            samples = all_reduce_count(samples, self.group)
        return samples, float(t.item())
