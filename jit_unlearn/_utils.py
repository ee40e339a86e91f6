"""Helpers shared by every method: reading batches out of any data source, restoring a model on
failure, switching train/eval mode temporarily, and progress bars."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import _checks as checks

DEFAULT_BATCH_SIZE = 128


def as_batches(
    data,
    batch_size: int | None = None,
    *,
    name: str = "data",
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterable:
    """An iterable of batches from a DataLoader (used as is), a Dataset, or a tensor.

    A tensor is one sample per row: it is split into batches of `batch_size` (default: the whole
    tensor is one batch when batch_size is None and it has at most DEFAULT_BATCH_SIZE rows, else
    DEFAULT_BATCH_SIZE).  A Dataset is wrapped in a DataLoader with `batch_size` (default 128).
    """
    checks.optional_integer(batch_size, "batch_size", low=1)
    if isinstance(data, torch.Tensor):
        _check_rows(data, name)
        bs = batch_size or DEFAULT_BATCH_SIZE
        return DataLoader(TensorDataset(data), batch_size=bs, shuffle=shuffle, generator=generator)
    if isinstance(data, DataLoader):
        if batch_size is not None:
            raise ValueError(f"batch_size: cannot re-batch a DataLoader ({name}); set its batch_size instead")
        return data
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if len(data) == 0:
            raise ValueError(f"{name}: the dataset is empty")
        return DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE, shuffle=shuffle, generator=generator)
    if isinstance(data, Iterable):
        return data
    raise TypeError(f"{name}: expected a DataLoader, Dataset or tensor, got {type(data).__name__}")


def iter_batches(batches: Iterable) -> Iterator:
    """Iterate `batches`.  A plain DataLoader over a TensorDataset (sequential sampler, automatic
    batching, the default collate function, no pinning) yields the batches it would collate, cut
    from the tensors as row slices (copied, as collation copies) instead of gathered sample by
    sample and stacked; anything else is iterated as it is."""
    if not _plain_tensor_loader(batches):
        return iter(batches)
    tensors, size = batches.dataset.tensors, batches.batch_size
    rows = tensors[0].shape[0]
    stop = rows - rows % size if batches.drop_last else rows
    return ([t[i : i + size].clone() for t in tensors] for i in range(0, stop, size))


def _plain_tensor_loader(batches) -> bool:
    from torch.utils.data import BatchSampler, SequentialSampler
    from torch.utils.data._utils.collate import default_collate

    return (
        type(batches) is DataLoader
        and type(batches.dataset) is TensorDataset
        and batches.batch_size is not None
        and type(batches.sampler) is SequentialSampler
        and type(batches.batch_sampler) is BatchSampler
        and batches.collate_fn is default_collate
        and not batches.pin_memory
    )


def split_rows(data, batch_size: int | None = None, *, name: str = "data") -> tuple[torch.Tensor, ...]:
    """The batches a DataLoader over a tensor (or a one-tensor TensorDataset) of samples would yield,
    in order and without shuffling, as views of its rows: no per-sample gathering.  Checks as
    `as_batches` does."""
    checks.optional_integer(batch_size, "batch_size", low=1)
    tensor = data.tensors[0] if isinstance(data, TensorDataset) else data
    if isinstance(data, TensorDataset) and len(data) == 0:
        raise ValueError(f"{name}: the dataset is empty")
    _check_rows(tensor, name)
    return tensor.split(batch_size or DEFAULT_BATCH_SIZE)


def _check_rows(data: torch.Tensor, name: str) -> None:
    if data.dim() < 1 or data.shape[0] == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(data.shape)})")


def batch_input(batch, *, name: str = "data") -> torch.Tensor:
    """The model input of a batch: the batch itself if it is a tensor, else its first element."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x", "image", "images", "pixel_values"):
            if key in batch:
                return batch[key]
    raise TypeError(f"{name}: cannot find the input tensor in a batch of type {type(batch).__name__}")


def batch_labels(batch, *, name: str = "data") -> torch.Tensor:
    """The labels of a batch: the last element of an (x, y) or (x, ..., y) batch."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[-1], torch.Tensor):
        return batch[-1]
    if isinstance(batch, dict):
        for key in ("label", "labels", "y", "target", "targets"):
            if key in batch:
                return batch[key]
    raise ValueError(f"{name}: batches carry no labels; expected (x, y) or (x, ..., y) batches")


def first_batch(batches: Iterable, *, name: str = "data"):
    """The first batch of an iterable, raising a clear error when it yields nothing."""
    for batch in batches:
        return batch
    raise ValueError(f"{name}: yields no batches (empty)")


def seeded_batches(data, batch_size: int | None, name: str, *, shuffle: bool = False, seed: int = 0) -> Iterable:
    """`as_batches` for a required data argument; a DataLoader is used as is (batch_size applies to
    tensors and Datasets), and a loader built here owns a generator seeded with `seed`, so it never
    draws from the global RNG."""
    if data is None:
        raise ValueError(f"{name}: is required")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(data, DataLoader):
        batch_size = None
    return as_batches(data, batch_size, name=name, shuffle=shuffle, generator=generator)


def check_labelled(batches: Iterable, name: str) -> None:
    """The data yields at least one batch, and batches carry labels (checked before any change).
    A one-shot iterator is not peeked at (that would lose its first batch)."""
    if isinstance(batches, Iterator):
        return
    try:
        if len(batches) == 0:
            raise ValueError(f"{name}: yields no batches (empty)")
    except TypeError:
        pass
    batch_labels(first_batch(batches, name=name), name=name)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer); CPU for a stateless model."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def logits_of(output):
    """The logits in a model's output: the output itself when it is a tensor, else `output["logits"]`
    of a mapping that has that key, else `output.logits` of an object that has that attribute (the
    `ModelOutput` of transformers' classifiers, e.g. ViTForImageClassification, is both).  Anything
    else is returned as it is, for `check_logits` to refuse."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output["logits"] if "logits" in output else output
    logits = getattr(output, "logits", None)
    return output if logits is None else logits


def check_logits(out, batch_size: int, *, name: str = "model") -> torch.Tensor:
    """The logits of a model output (`logits_of`), which must be a [B, K] tensor."""
    out = logits_of(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{name}: must return a [B, K] tensor of logits (or an output with a `logits` tensor, as "
            f"transformers' classifiers do), returned {type(out).__name__}"
        )
    if out.dim() != 2 or out.shape[0] != batch_size:
        raise ValueError(
            f"{name}: must return a [B, K] tensor of logits with B={batch_size}, returned shape {tuple(out.shape)}"
        )
    return out


class ModelState:
    """A model's modules, parameters and buffers (each once, in the order of `modules()`,
    `parameters()` and `buffers()`), gathered in one traversal of the module tree."""

    __slots__ = ("modules", "params", "buffers")

    def __init__(self, model: torch.nn.Module):
        self.modules = list(model.modules())
        seen: set[int] = set()
        self.params, self.buffers = [], []
        for attr, out in (("_parameters", self.params), ("_buffers", self.buffers)):
            for m in self.modules:
                for t in getattr(m, attr).values():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        out.append(t)

    def device(self) -> torch.device:
        """The device of the first parameter (else buffer); CPU for a stateless model."""
        for t in itertools.chain(self.params, self.buffers):
            return t.device
        return torch.device("cpu")

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter; float32 if there is none."""
        return next((p.dtype for p in self.params if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def restore_on_failure(model: torch.nn.Module, state: ModelState | None = None) -> Iterator[None]:
    """Snapshot the model (`_safety.Snapshot`); if the body raises anything (KeyboardInterrupt
    included), put back every parameter and buffer value bitwise, each parameter's `.grad`, each
    module's train/eval flag and the grad mode, and re-raise.  Costs one copy of the model's state.
    `state`: the model's ModelState, when the caller has one already.  A method that returns a
    result uses `_safety.protected` instead, which leaves no window between the commit and the return."""
    from ._safety import Snapshot

    snapshot = Snapshot(model, state)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, training: bool | None, modules: list | None = None) -> Iterator[None]:
    """Run the body with every module in train (True) or eval (False) mode, then restore each
    module's own flag.  None leaves the modes untouched.  `modules`: list(model.modules()), when
    the caller has it already.  Only flags that differ are written back."""
    modules = list(model.modules()) if modules is None else modules
    saved = [m.training for m in modules]
    if training is not None and any(flag != training for flag in saved):
        model.train(training)
    try:
        yield
    finally:
        for m, flag in zip(modules, saved):
            if m.training != flag:
                m.training = flag


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun`, plural (`plural`, else noun + "s") unless n is 1, thousands separated:
    "1 step", "1,200 steps"."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def params_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or an inf (one host sync per tensor)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def progress(iterable, *, enabled: bool, desc: str, total: int | None = None, leave: bool = False):
    """tqdm around `iterable` when enabled, else the iterable itself."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)


def load_tensors_file(path, map_location, *, what: str):
    """`torch.load(path, map_location=..., weights_only=True)`, with a ValueError naming the path when
    the file is not one (truncated, corrupt, random bytes, or a pickle holding objects other than
    tensors and plain data, which weights_only loading refuses).  A missing file raises
    FileNotFoundError as usual.  `what`: what the file should be ("importances", "mask")."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # torch's unpickler raises many kinds on random bytes (KeyError, EOFError, ...)
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            first = "it holds objects that a weights_only load refuses, or is corrupt"
        raise ValueError(f"path: {os.fspath(path)!r} is not a readable {what} file ({first})") from None
