"""Parameter importances for selective synaptic dampening (ALGORITHMS.md section 2): the published
batch pass, the per-sample (SSD-Det) pass, and a checked on-disk cache."""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from . import _backend, distributed, ops, reference
from ._utils import as_batches, batch_input, batch_labels, check_logits, iter_batches, model_device, module_mode
from ._utils import progress as progress_bar

__all__ = ["Importances", "importances", "model_fingerprint", "KINDS"]

KINDS = ("fisher", "output_norm")
_MODE = {"fisher": "square", "output_norm": "abs"}
_FORMAT = "jit_unlearn.importances"
_VERSION = 1
# Default cap on per-sample gradient elements held at once (chunk size * trainable parameters):
# 2^25 float32 values = 128 MiB.
DEFAULT_MAX_BATCH_ELEMS = 2**25


def _shape_fingerprint(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    h = hashlib.sha256()
    for name, shape in shapes:
        h.update(f"{name}:{'x'.join(map(str, shape))};".encode())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex digest of the model's parameter names and shapes, in `named_parameters` order."""
    return _shape_fingerprint((n, tuple(p.shape)) for n, p in model.named_parameters())


def _invalid_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose tensor holds a NaN, an inf or a negative value (one host sync in all)."""
    names, bounds = [], []
    for name, t in tensors.items():
        if t.numel():
            names.append(name)
            bounds.append(torch.stack(torch.aminmax(t.detach())).double())
    if not names:
        return []
    b = torch.stack([x.to(bounds[0].device) for x in bounds])
    ok = ((b[:, 0] >= 0) & (b[:, 1] < math.inf)).tolist()  # NaN fails both tests
    return [n for n, good in zip(names, ok) if not good]


class Importances(Mapping):
    """Per-parameter importances of one model: a read-only mapping parameter name -> tensor of the
    parameter's shape (same dtype), plus how they were made.

    Attributes:
        kind: "fisher" (squared gradients of the cross-entropy) or "output_norm" (absolute
            gradients of the squared logit norm, label-free).
        per_sample: True for the per-sample (SSD-Det) average, False for the published batch average.
        num_samples: samples seen.  num_batches: batches seen (the divisor of the batch average).
        fingerprint: sha256 of the parameter names and shapes (see `model_fingerprint`).
    Every named parameter of the model has an entry (zeros where no gradient reached it).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, kind: str, per_sample: bool = False,
                 num_samples: int = 0, num_batches: int = 0, _invalid: list[str] | None = None):
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors: expected a mapping name -> tensor, got {type(tensors).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        for key in ("num_samples", "num_batches"):
            value = num_samples if key == "num_samples" else num_batches
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}: expected an int >= 0, got {value!r}")
        store: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"tensors: keys must be parameter names (str), got {type(name).__name__}")
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"tensors[{name!r}]: expected a floating-point tensor")
            store[name] = t.detach()
        self._tensors = store
        self.kind = kind
        self.per_sample = bool(per_sample)
        self.num_samples = num_samples
        self.num_batches = num_batches
        self.fingerprint = _shape_fingerprint((n, tuple(t.shape)) for n, t in store.items())
        # Checked on first use (one read of every tensor), then cached: the mapping is read-only.
        self._invalid = None if _invalid is None else list(_invalid)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self._tensors.values())
        return (f"Importances(kind={self.kind!r}, per_sample={self.per_sample}, tensors={len(self)}, "
                f"elements={numel}, num_samples={self.num_samples}, num_batches={self.num_batches})")

    @property
    def invalid(self) -> list[str]:
        """Names whose importances hold NaN, inf or negative values (dampening refuses them)."""
        if self._invalid is None:
            self._invalid = _invalid_names(self._tensors)
        return list(self._invalid)

    def _meta(self) -> dict:
        return {"kind": self.kind, "per_sample": self.per_sample, "num_samples": self.num_samples,
                "num_batches": self.num_batches}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Importances:
        """A copy on another device and/or dtype (the tensors themselves when nothing changes)."""
        tensors = {n: t.to(device=device, dtype=dtype) for n, t in self._tensors.items()}
        invalid = None if dtype is not None else self._invalid  # a narrower dtype may overflow
        return Importances(tensors, **self._meta(), _invalid=invalid)

    def check(self, model: torch.nn.Module, *, name: str = "importances") -> None:
        """Raise ValueError (naming `name` and the first mismatches) unless these importances have
        exactly the model's parameter names and shapes."""
        expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
        got = {n: tuple(t.shape) for n, t in self._tensors.items()}
        if expected == got:
            return
        missing = [n for n in expected if n not in got]
        extra = [n for n in got if n not in expected]
        shapes = [f"{n!r}: importances {got[n]} vs model {s}" for n, s in expected.items()
                  if n in got and got[n] != s]
        parts = []
        if missing:
            parts.append(f"missing parameters {_head(missing)}")
        if extra:
            parts.append(f"parameters the model does not have {_head(extra)}")
        if shapes:
            parts.append(f"shape mismatch {_head(shapes, quote=False)}")
        raise ValueError(f"{name}: made for another model ({'; '.join(parts)})")

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path`: safetensors when it ends with ".safetensors" (metadata in the header),
        else a `torch.save` file of plain tensors, strings and numbers (loadable with weights_only)."""
        path = os.fspath(path)
        tensors = {n: t.detach().cpu().contiguous() for n, t in self._tensors.items()}
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            meta = {"format": _FORMAT, "version": str(_VERSION), "kind": self.kind,
                    "per_sample": "1" if self.per_sample else "0", "num_samples": str(self.num_samples),
                    "num_batches": str(self.num_batches), "fingerprint": self.fingerprint,
                    "names": json.dumps(list(tensors))}  # safetensors sorts its keys; keep the order
            save_file(tensors, path, metadata=meta)
            return
        torch.save({"format": _FORMAT, "version": _VERSION, **self._meta(), "fingerprint": self.fingerprint,
                    "tensors": tensors}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None,
             map_location: torch.device | str | None = None) -> Importances:
        """Read a file written by `save` (safetensors when `path` ends with ".safetensors", else a
        torch file read with ``weights_only=True``).  With `model`, the names and shapes must match
        it (ValueError otherwise) and the tensors go to the model's device unless `map_location`."""
        path = os.fspath(path)
        if map_location is None:
            map_location = model_device(model) if model is not None else "cpu"
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device=str(torch.device(map_location))) as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"path: {path!r} is not a jit_unlearn importances file (no format tag)")
            try:
                info = {"kind": meta["kind"], "per_sample": meta["per_sample"] == "1",
                        "num_samples": int(meta["num_samples"]), "num_batches": int(meta["num_batches"])}
                version, fingerprint = int(meta["version"]), meta["fingerprint"]
                tensors = {n: tensors[n] for n in json.loads(meta["names"])}
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"path: {path!r} has a malformed importances header ({exc})") from None
        else:
            blob = torch.load(path, map_location=map_location, weights_only=True)
            if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
                raise ValueError(f"path: {path!r} is not a jit_unlearn importances file (no format tag)")
            try:
                info = {k: blob[k] for k in ("kind", "per_sample", "num_samples", "num_batches")}
                version, fingerprint, tensors = blob["version"], blob["fingerprint"], blob["tensors"]
            except KeyError as exc:
                raise ValueError(f"path: {path!r} lacks the field {exc}") from None
        if version != _VERSION:
            raise ValueError(f"path: {path!r} has importances format version {version}, expected {_VERSION}")
        imp = cls(tensors, **info)
        if imp.fingerprint != fingerprint:
            raise ValueError(f"path: {path!r} is corrupt: its tensors do not match its recorded fingerprint")
        if model is not None:
            imp.check(model, name="path")
        return imp


def _head(items: list[str], n: int = 5, quote: bool = True) -> str:
    shown = [repr(s) if quote else s for s in items[:n]]
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(shown) + "]" + more


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return kind


def _loss(out: torch.Tensor, y: torch.Tensor | None, kind: str) -> torch.Tensor:
    if kind == "fisher":
        return F.cross_entropy(out, y)
    # LF-SSD: batch mean of the squared L2 norm of the logits, as torch.norm(out, "fro", dim=1)**2.
    return torch.linalg.vector_norm(out, 2, dim=1).pow(2).mean()


def _sample_loss(out: torch.Tensor, y: torch.Tensor | None, kind: str) -> torch.Tensor:
    """`_loss` of one sample's logits out [1, K] inside vmap.  Cross-entropy is written as
    logsumexp(out) - out[y], which has native batching rules (F.cross_entropy's goes through a
    Python decomposition under vmap, a fixed cost per call)."""
    if kind == "fisher":
        return (torch.logsumexp(out[0], 0) - out[0].gather(0, y.view(1))).squeeze(0)
    return _loss(out, None, kind)


def importances(model: torch.nn.Module, loader, *, kind: str = "fisher", per_sample: bool = False,
                progress: bool = True, max_batch_elems: int | None = None, batch_size: int | None = None,
                name: str = "loader") -> Importances:
    """Importances of every parameter of `model` on the data in `loader`, model in eval mode.

    Args:
        model: classifier returning [B, K] logits; its train/eval flags are restored afterwards and
            its `.grad` fields are left untouched.
        loader: a DataLoader (read in its own order), a Dataset, a tensor of inputs, or an
            iterator of batches; batches are (x, y) / (x, ..., y) tuples, dicts, or bare input
            tensors.  `batch_size` batches a Dataset or tensor (see `_utils.as_batches`).
        kind: "fisher": gradient g_b of the batch-mean cross-entropy, accumulating g_b * g_b (needs
            labels).  "output_norm" (LF-SSD): gradient of mean_i ||f(x_i)||^2, accumulating |g_b|;
            labels are never read.
        per_sample: False: the published batch average I = (1/|L|) sum_b acc(g_b) over the |L|
            batches (depends on batching).  True (SSD-Det): I = (1/n) sum_i acc(g_i) over single
            samples, with vectorised per-sample gradients (`torch.func`), independent of batching.
        progress: show a progress bar.
        max_batch_elems: per-sample mode only; cap on per-sample gradient elements held at once
            (default 2^25), which sets the chunk size.
        name: what error messages call the data.
    Returns:
        Importances with one tensor per named parameter (its shape and dtype, on its device);
        parameters that get no gradient (frozen or unused) have zero importance.
    Under torch.distributed (e.g. torchrun), each rank reads its share of the batches
    (`distributed.shard_batches`), and every rank gets the result over all of them
    (docs/DISTRIBUTED.md).
    """
    kind = _check_kind(kind)
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample: expected a bool, got {type(per_sample).__name__}")
    if max_batch_elems is not None and (isinstance(max_batch_elems, bool) or not isinstance(max_batch_elems, int)
                                        or max_batch_elems < 1):
        raise ValueError(f"max_batch_elems: must be a positive int, got {max_batch_elems!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    batches = distributed.shard_batches(as_batches(loader, batch_size, name=name))
    named = list(model.named_parameters())
    if not any(p.requires_grad for _, p in named):
        raise ValueError("model: has no parameter that requires grad")
    acc = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in named}
    distributed.check_same_model(model)
    with module_mode(model, False), torch.enable_grad():
        if per_sample:
            num_batches, num_samples = _per_sample_pass(model, batches, acc, kind, progress,
                                                        max_batch_elems or DEFAULT_MAX_BATCH_ELEMS, name)
        else:
            num_batches, num_samples = _batch_pass(model, batches, acc, kind, progress, name)
    if distributed.is_active():  # each rank read its share of the batches: sum the sums and counts
        distributed.all_reduce_sum_(list(acc.values()))
        num_batches, num_samples = distributed.all_reduce_count([num_batches, num_samples])
        if num_batches == 0:
            raise ValueError(f"{name}: yields no batches (empty)")
    divisor = float(num_samples if per_sample else num_batches)
    torch._foreach_div_(list(acc.values()), divisor)  # true division by the count, as the published code does
    return Importances(acc, kind=kind, per_sample=per_sample, num_samples=num_samples, num_batches=num_batches)


def _len(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


def _unchecked_accumulate(device: torch.device):
    """The kernel behind ops.accumulate_importance_ for `device`, without the per-call argument
    checks.  A pass calls it only after ops.accumulate_importance_ has checked the same lists on
    the first batch: the accumulators and the parameters' gradients keep their shapes, dtypes and
    devices from batch to batch."""
    if _backend.use_compiled(device):
        return torch.ops.jit_unlearn.accumulate_importance_.default
    return reference.accumulate_importance_


def _batch_pass(model, batches, acc, kind, show, name) -> tuple[int, int]:
    """Accumulate acc(g_b) for every batch; returns (batches, samples)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    acc_list = [acc[n] for n, _ in trainable]
    mode = _MODE[kind]
    device = model_device(model)
    accumulate, checked = _unchecked_accumulate(device), False
    num_batches = num_samples = 0
    # The gradients come from backward(inputs=params) into .grad (on CPU it runs ~9 % faster on a
    # ResNet-18 than autograd.grad); the caller's .grad fields are set aside and put back.
    callers_grads = [p.grad for p in params]
    try:
        for batch in progress_bar(iter_batches(batches), enabled=show, desc=f"importances ({name})",
                                  total=_len(batches)):
            x = batch_input(batch, name=name)
            y = batch_labels(batch, name=name).to(device, non_blocking=True) if kind == "fisher" else None
            x = x.to(device, non_blocking=True)
            for p in params:
                p.grad = None
            out = check_logits(model(x), x.shape[0])
            _loss(out, y, kind).backward(inputs=params)
            grads = [p.grad for p in params]
            if any(g is None for g in grads):  # parameters this batch did not reach keep their sum
                pairs = [(a, g) for a, g in zip(acc_list, grads) if g is not None]
                if pairs:
                    ops.accumulate_importance_([a for a, _ in pairs], [g for _, g in pairs], mode)
            elif checked:
                accumulate(acc_list, grads, mode, 1.0)
            else:
                ops.accumulate_importance_(acc_list, grads, mode)
                checked = True
            num_batches += 1
            num_samples += x.shape[0]
    finally:
        for p, g in zip(params, callers_grads):
            p.grad = g
    if num_batches == 0 and not distributed.is_active():  # a rank's share may be empty
        raise ValueError(f"{name}: yields no batches (empty)")
    return num_batches, num_samples


class _Unfactorable(Exception):
    """A Linear module whose per-sample gradient is not one outer product (called twice per
    sample, or fed more than one row per sample); it goes back to the plain vmap path."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _factorable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """nn.Linear modules with a trainable weight that share no parameter with another module."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    return {name: m for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and m.weight.requires_grad
            and all(owners[id(p)] == 1 for p in m._parameters.values() if p is not None)}


class _LinearTaps:
    """Forward hooks that, while active, record each factored Linear's input a and add a zero
    probe to its output: the gradient w.r.t. the probe is then the per-sample output gradient d,
    and the per-sample weight gradient is the outer product d a^T."""

    def __init__(self, modules: dict[str, torch.nn.Linear]):
        self.modules = modules
        self.probes: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.active = False
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            if not self.active or name not in self.probes:
                return None
            self.calls[name] = self.calls.get(name, 0) + 1
            a = args[0]
            if self.calls[name] > 1 or a.dim() != 2 or a.shape[0] != 1:
                raise _Unfactorable(name)
            self.inputs[name] = a[0]
            return output + self.probes[name]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _param_name(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _per_sample_pass(model, batches, acc, kind, show, max_elems, name) -> tuple[int, int]:
    """Accumulate sum_i acc(g_i) over single samples with vmap(grad); returns (batches, samples).

    nn.Linear weights are not differentiated per sample: their gradient for sample i is the outer
    product d_i a_i^T, so sum_i g_i^2 = (d^2)^T (a^2) and sum_i |g_i| = |d|^T |a| (one matmul per
    chunk instead of a [chunk, out, in] tensor).  Every other parameter gets its per-sample
    gradient from vmap(grad(...)) and is reduced over the chunk."""
    square = kind == "fisher"
    device = model_device(model)
    linears = _factorable_linears(model)
    taps = _LinearTaps(linears)
    try:
        num_batches = num_samples = 0
        plan = _PerSamplePlan(model, taps, kind, max_elems)
        for batch in progress_bar(iter_batches(batches), enabled=show, desc=f"per-sample importances ({name})",
                                  total=_len(batches)):
            x = batch_input(batch, name=name)
            y = batch_labels(batch, name=name).to(device, non_blocking=True) if square else None
            x = x.to(device, non_blocking=True)
            start = 0
            while start < x.shape[0]:
                stop = start + plan.chunk
                try:
                    grads, deltas, inputs = plan(x[start:stop], None if y is None else y[start:stop])
                except _Unfactorable as exc:
                    plan = _PerSamplePlan(model, taps, kind, max_elems, factored=plan.factored - {exc.name})
                    continue
                for pname, g in grads.items():
                    acc[pname].add_((g * g if square else g.abs()).sum(0))
                for mname, d in deltas.items():
                    a = inputs[mname]
                    d, a = (d * d, a * a) if square else (d.abs(), a.abs())
                    acc[_param_name(mname, "weight")].addmm_(d.t(), a)
                    bias = linears[mname].bias
                    if bias is not None and bias.requires_grad:
                        acc[_param_name(mname, "bias")].add_(d.sum(0))
                start = stop
            num_batches += 1
            num_samples += x.shape[0]
    finally:
        taps.remove()
    if num_batches == 0 and not distributed.is_active():  # a rank's share may be empty
        raise ValueError(f"{name}: yields no batches (empty)")
    return num_batches, num_samples


class _PerSamplePlan:
    """One vmap(grad) function: per-sample gradients of the non-factored trainable parameters and
    of the probes of the factored Linear modules, plus those modules' per-sample inputs."""

    def __init__(self, model, taps: _LinearTaps, kind: str, max_elems: int, factored: set[str] | None = None):
        from torch.func import functional_call, grad, vmap

        self.factored = set(taps.modules) if factored is None else set(factored)
        factored_params = {_param_name(m, leaf) for m in self.factored for leaf in ("weight", "bias")}
        named = list(model.named_parameters())
        self.trainable = {n: p.detach() for n, p in named if p.requires_grad and n not in factored_params}
        fixed = {n: p.detach() for n, p in named if not (p.requires_grad and n not in factored_params)}
        fixed.update(dict(model.named_buffers()))
        self.probes = {m: torch.zeros(taps.modules[m].out_features, dtype=taps.modules[m].weight.dtype,
                                      device=taps.modules[m].weight.device) for m in self.factored}
        per_sample = sum(p.numel() for p in self.trainable.values()) + sum(
            taps.modules[m].in_features + taps.modules[m].out_features for m in self.factored)
        self.chunk = max(1, max_elems // max(1, per_sample))

        def sample_loss(params, probes, x, y):
            taps.probes, taps.inputs, taps.calls = probes, {}, {}
            taps.active = True
            try:
                out = functional_call(model, (params, fixed), (x.unsqueeze(0),))
            finally:
                taps.active = False
            # a module this sample never reached contributes nothing (its probe gradient is 0)
            inputs = {m: taps.inputs[m] if m in taps.inputs else out.new_zeros(taps.modules[m].in_features)
                      for m in probes}
            taps.probes, taps.inputs = {}, {}
            return _sample_loss(out, y, kind), inputs

        self.fn = vmap(grad(sample_loss, argnums=(0, 1), has_aux=True),
                       in_dims=(None, None, 0, 0 if kind == "fisher" else None))

    def __call__(self, x, y):
        (grads, deltas), inputs = self.fn(self.trainable, self.probes, x, y)
        return grads, deltas, inputs
