"""The `Importances` container: per-parameter importances of one model, with how they were made, a
fingerprint of the model's parameter names and shapes, a digest of the parameter values they were
computed on, and a checked file format."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping

import torch

from .. import _checks as checks
from .._utils import load_tensors_file, model_device

__all__ = ["Importances", "model_fingerprint", "weights_digest", "KINDS"]

KINDS = ("fisher", "output_norm")
_FORMAT = "jit_unlearn.importances"
# 2: the file records `weights`, the digest of the parameter values (version 1 files did not).
_VERSION = 2
_OTHER_WEIGHTS = (
    "computed on other weights than the model's (the parameter names and shapes match, the values "
    "differ: another training run of the same architecture, or a model changed since); recompute the "
    "importances for this model"
)


def _shape_fingerprint(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    h = hashlib.sha256()
    for name, shape in shapes:
        h.update(f"{name}:{'x'.join(map(str, shape))};".encode())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex digest of the model's parameter names and shapes, in `named_parameters` order."""
    return _shape_fingerprint((n, tuple(p.shape)) for n, p in model.named_parameters())


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 hex digest of the model's parameter values: every parameter's name, dtype, shape and
    bytes, in `named_parameters` order.  Two models with the same architecture but other weights
    (another training run, a fine-tuned or unlearned copy) get different digests.  One read of
    every parameter (copied to the host first when it lives on a GPU)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        h.update(f"{name}:{t.dtype}:{'x'.join(map(str, t.shape))};".encode())
        if t.numel():
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
        weights: `weights_digest` of the model the importances were computed on (set by
            `importances`), or None when unknown (importances built by hand).  `load` with a model
            refuses a file whose digest differs from the model's: the same architecture with other
            weights (say, another training run) is not the model the importances describe.
    Every named parameter of the model has an entry (zeros where no gradient reached it).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        kind: str,
        per_sample: bool = False,
        num_samples: int = 0,
        num_batches: int = 0,
        weights: str | None = None,
        _invalid: list[str] | None = None,
    ):
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors: expected a mapping name -> tensor, got {type(tensors).__name__}")
        checks.choice(kind, "kind", KINDS)
        checks.integer(num_samples, "num_samples", low=0)
        checks.integer(num_batches, "num_batches", low=0)
        if weights is not None and not isinstance(weights, str):
            raise TypeError(f"weights: expected a digest (see weights_digest) or None, got {type(weights).__name__}")
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
        self.weights = weights
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
        return (
            f"Importances(kind={self.kind!r}, per_sample={self.per_sample}, tensors={len(self)}, "
            f"elements={numel}, num_samples={self.num_samples}, num_batches={self.num_batches})"
        )

    @property
    def invalid(self) -> list[str]:
        """Names whose importances hold NaN, inf or negative values (dampening refuses them)."""
        if self._invalid is None:
            self._invalid = _invalid_names(self._tensors)
        return list(self._invalid)

    def _meta(self) -> dict:
        return {
            "kind": self.kind,
            "per_sample": self.per_sample,
            "num_samples": self.num_samples,
            "num_batches": self.num_batches,
            "weights": self.weights,
        }

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
        shapes = [f"{n!r}: importances {got[n]} vs model {s}" for n, s in expected.items() if n in got and got[n] != s]
        parts = []
        if missing:
            parts.append(f"missing parameters {_head(missing)}")
        if extra:
            parts.append(f"parameters the model does not have {_head(extra)}")
        if shapes:
            parts.append(f"shape mismatch {_head(shapes, quote=False)}")
        raise ValueError(f"{name}: made for another model ({'; '.join(parts)})")

    def check_weights(self, model: torch.nn.Module, *, name: str = "importances") -> None:
        """Raise ValueError (naming `name`) unless these importances were computed on the model's
        current parameter values (their `weights` digest equals `weights_digest(model)`).  Importances
        that record no digest (`weights` None) pass."""
        if self.weights is not None and self.weights != weights_digest(model):
            raise ValueError(f"{name}: {_OTHER_WEIGHTS}")

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path`: safetensors when it ends with ".safetensors" (metadata in the header),
        else a `torch.save` file of plain tensors, strings and numbers (loadable with weights_only)."""
        path = os.fspath(path)
        tensors = {n: t.detach().cpu().contiguous() for n, t in self._tensors.items()}
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            meta = {
                "format": _FORMAT,
                "version": str(_VERSION),
                "kind": self.kind,
                "per_sample": "1" if self.per_sample else "0",
                "num_samples": str(self.num_samples),
                "num_batches": str(self.num_batches),
                "weights": self.weights or "",
                "fingerprint": self.fingerprint,
                "names": json.dumps(list(tensors)),
            }  # safetensors sorts its keys; keep the order
            save_file(tensors, path, metadata=meta)
            return
        torch.save(
            {
                "format": _FORMAT,
                "version": _VERSION,
                **self._meta(),
                "fingerprint": self.fingerprint,
                "tensors": tensors,
            },
            path,
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: torch.nn.Module | None = None,
        map_location: torch.device | str | None = None,
        *,
        check_weights: bool = True,
    ) -> Importances:
        """Read a file written by `save` (safetensors when `path` ends with ".safetensors", else a
        torch file read with ``weights_only=True``).

        With `model`, the names and shapes must match it, and (unless `check_weights` is False) the
        file's `weights` digest must equal the model's: importances of the same architecture
        trained another time are refused (ValueError).  Pass check_weights=False only to reuse
        importances on a model that has changed since on purpose (e.g. by an earlier deletion
        request).  The tensors go to the model's device unless `map_location`.  Files of format
        version 1 (no digest) are refused with a request to recompute them."""
        path = os.fspath(path)
        if map_location is None:
            map_location = model_device(model) if model is not None else "cpu"
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            if not os.path.isfile(path):
                raise FileNotFoundError(f"path: no such file: {path!r}")
            try:
                with safe_open(path, framework="pt", device=str(torch.device(map_location))) as fh:
                    meta = fh.metadata() or {}
                    tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            except Exception as exc:  # safetensors raises its own SafetensorError for bad files
                raise ValueError(f"path: {path!r} is not a readable safetensors importances file ({exc})") from None
            if meta.get("format") != _FORMAT:
                raise ValueError(f"path: {path!r} is not a jit_unlearn importances file (no format tag)")
            try:
                info = {
                    "kind": meta["kind"],
                    "per_sample": meta["per_sample"] == "1",
                    "num_samples": int(meta["num_samples"]),
                    "num_batches": int(meta["num_batches"]),
                    "weights": meta.get("weights") or None,
                }
                version, fingerprint = int(meta["version"]), meta["fingerprint"]
                tensors = {n: tensors[n] for n in json.loads(meta["names"])}
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"path: {path!r} has a malformed importances header ({exc})") from None
        else:
            blob = load_tensors_file(path, map_location, what="importances")
            if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
                raise ValueError(f"path: {path!r} is not a jit_unlearn importances file (no format tag)")
            try:
                info = {k: blob[k] for k in ("kind", "per_sample", "num_samples", "num_batches")}
                info["weights"] = blob.get("weights")
                version, fingerprint, tensors = blob["version"], blob["fingerprint"], blob["tensors"]
            except KeyError as exc:
                raise ValueError(f"path: {path!r} lacks the field {exc}") from None
        if version == 1:
            raise ValueError(
                f"path: {path!r} has importances format version 1, which records no digest of the model's "
                f"weights; recompute the importances and save them again (format version {_VERSION})"
            )
        if version != _VERSION:
            raise ValueError(f"path: {path!r} has importances format version {version}, expected {_VERSION}")
        try:
            imp = cls(tensors, **info)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"path: {path!r} holds malformed importances ({exc})") from None
        if imp.fingerprint != fingerprint:
            raise ValueError(f"path: {path!r} is corrupt: its tensors do not match its recorded fingerprint")
        if model is not None:
            imp.check(model, name="path")
            checks.boolean(check_weights, "check_weights")
            if check_weights and imp.weights is not None and imp.weights != weights_digest(model):
                raise ValueError(f"path: {path!r} holds importances {_OTHER_WEIGHTS}")
        return imp


def _head(items: list[str], n: int = 5, quote: bool = True) -> str:
    shown = [repr(s) if quote else s for s in items[:n]]
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(shown) + "]" + more
