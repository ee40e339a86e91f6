"""`Mask`: which entries of which parameters DEL resets and fine-tunes, with a weights_only file format."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..._utils import load_tensors_file

__all__ = ["Mask"]

_MASK_FORMAT = "jit_unlearn.Mask"
_MASK_VERSION = 1


class Mask(Mapping):
    """Boolean selection per parameter: name -> torch.bool tensor of that parameter's shape.

    True marks an entry that DEL resets and fine-tunes.  Names absent from the mask select nothing."""

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks: expected a mapping name -> bool tensor, got {type(masks).__name__}")
        self._masks: dict[str, torch.Tensor] = {}
        for name, m in masks.items():
            if not isinstance(name, str):
                raise TypeError(f"masks: keys must be parameter names (str), got {type(name).__name__}")
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                kind = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
                raise TypeError(f"masks[{name!r}]: expected a torch.bool tensor, got {kind}")
            self._masks[name] = m.detach()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return (
            f"Mask({len(self)} tensors, {self.count()}/{self.numel()} entries selected, fraction {self.fraction():.4f})"
        )

    def _names(self, name: str | None) -> list[str]:
        if name is None:
            return list(self._masks)
        if name not in self._masks:
            raise KeyError(f"name: {name!r} is not in the mask")
        return [name]

    def count(self, name: str | None = None) -> int:
        """Selected entries in one tensor, or in all of them when name is None."""
        return sum(int(self._masks[n].sum()) for n in self._names(name))

    def numel(self, name: str | None = None) -> int:
        """Entries in one tensor, or in all of them when name is None."""
        return sum(self._masks[n].numel() for n in self._names(name))

    def fraction(self, name: str | None = None) -> float:
        """Selected fraction of one tensor, or of all tensors together when name is None."""
        total = self.numel(name)
        return self.count(name) / total if total else 0.0

    def layer_fractions(self) -> dict[str, float]:
        """Selected fraction of every tensor, by name."""
        return {n: self.fraction(n) for n in self._masks}

    def to(self, device: torch.device | str) -> Mask:
        """A copy with every tensor on `device`."""
        return Mask({n: m.to(device) for n, m in self._masks.items()})

    def check(self, model: nn.Module) -> None:
        """Raise ValueError unless every name is a parameter of `model` with the same shape."""
        params = dict(model.named_parameters())
        unknown = [n for n in self._masks if n not in params]
        if unknown:
            raise ValueError(
                f"mask: names that are not parameters of the model: {unknown[:5]}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )
        for n, m in self._masks.items():
            if m.shape != params[n].shape:
                raise ValueError(
                    f"mask[{n!r}]: shape {tuple(m.shape)} differs from the parameter's {tuple(params[n].shape)}"
                )

    def save(self, path) -> None:
        """Write the masks (on the CPU) to `path` with torch.save, in a format `load` checks."""
        masks = {n: m.cpu() for n, m in self._masks.items()}
        torch.save({"format": _MASK_FORMAT, "version": _MASK_VERSION, "masks": masks}, path)

    @classmethod
    def load(cls, path, map_location: torch.device | str = "cpu") -> Mask:
        """Read a file written by `save` (tensors only; loaded with weights_only=True).

        Raises:
            FileNotFoundError: no such file.  ValueError (naming the path): not a readable torch
            file, not a mask file, another format version, or malformed masks."""
        blob = load_tensors_file(path, map_location, what="mask")
        if not isinstance(blob, dict) or blob.get("format") != _MASK_FORMAT or not isinstance(blob.get("masks"), dict):
            raise ValueError(f"path: {os.fspath(path)!r} is not a file written by Mask.save")
        if blob.get("version") != _MASK_VERSION:
            raise ValueError(
                f"path: {os.fspath(path)!r} has mask format version {blob.get('version')!r}, expected {_MASK_VERSION}"
            )
        try:
            return cls(blob["masks"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"path: {os.fspath(path)!r} holds malformed masks ({exc})") from None
