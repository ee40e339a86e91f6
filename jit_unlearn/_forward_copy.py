"""The private copy of a model that runs a method's no-grad passes in reduced precision, channels_last
and/or compiled (docs/METHODS.md §7.1), refreshed from the model before every pass that follows a step."""

from __future__ import annotations

import collections
import contextlib
import copy
import warnings

import torch
from torch import nn

from ._precision import Precision, float32_head, model_dtype

__all__ = ["ForwardCopy", "conv_bn_pairs"]


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batch norm) module names where an eval-mode BatchNorm2d with running statistics is
    applied to a Conv2d's output and to nothing else, and each of the two modules is called once
    (read from a `torch.fx` trace; [] when the model does not trace).  Such a batch norm is a
    per-channel affine map that can be folded into the convolution."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow, unsupported ops: no folding
        return []
    modules = dict(model.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_var is None or node.kwargs:
            continue
        if len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        conv_node = node.args[0]
        conv = modules.get(conv_node.target) if conv_node.op == "call_module" else None
        if type(conv) is not nn.Conv2d or len(conv_node.users) != 1:
            continue
        if calls[conv_node.target] == 1 and calls[node.target] == 1:
            pairs.append((conv_node.target, node.target))
    return pairs


class _Fold:
    """A conv + batch-norm pair of the model folded into the copy's convolution:
    W' = W * s, b' = beta - mean * s (+ b * s), s = gamma / sqrt(var + eps), computed in float32."""

    def __init__(self, model: nn.Module, private: nn.Module, conv: str, bn: str):
        self.conv, self.bn = model.get_submodule(conv), model.get_submodule(bn)
        self.target = private.get_submodule(conv)
        if self.target.bias is None:
            self.target.bias = nn.Parameter(self.target.weight.new_zeros(self.target.out_channels), requires_grad=False)
        parent, _, leaf = bn.rpartition(".")
        setattr(private.get_submodule(parent) if parent else private, leaf, nn.Identity())

    def refresh(self) -> None:
        bn, conv = self.bn, self.conv
        dtype = torch.promote_types(conv.weight.dtype, torch.float32)
        scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(dtype)
        shift = -bn.running_mean.to(dtype) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(dtype)
        if conv.bias is not None:
            shift = shift + conv.bias.to(dtype) * scale
        self.target.weight.copy_(conv.weight.to(dtype) * scale.view(-1, 1, 1, 1))
        self.target.bias.copy_(shift)


class ForwardCopy:
    """The model of a method's no-grad passes.

    With precision float32 and compile=False this is the model itself.  Otherwise it is a private
    copy (made once per call: `copy.deepcopy`, in the model's current train/eval modes) with every
    eval-mode BatchNorm2d that follows a Conv2d folded into it (`conv_bn_pairs`), in the reduced
    dtype (the classifier head `precision.head` stays float32), in channels_last for conv nets, and
    compiled with `torch.compile` when asked.  `sync()` copies the model's current parameters and
    buffers into it (folding the pairs again), so steps that change the model are seen by the next
    pass.  Calling it returns the logits in the model's dtype.  A model that cannot be deep-copied
    runs its no-grad passes itself, under autocast."""

    def __init__(self, model: nn.Module, precision: Precision, compile: bool = False):
        self.model = model
        self.precision = precision
        self.out_dtype = model_dtype(model)
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._folds: list[_Fold] = []
        self._autocast = False
        self._input_dtype = None
        self._channels_last = precision.reduced and precision.channels_last
        module = model
        if precision.reduced or compile:
            try:
                module = self._private_copy(model, precision)
            except Exception:  # e.g. a module holding a lock or a file: run on the model itself
                module, self._autocast, self._pairs, self._folds = model, precision.reduced, None, []
        self._eager = module
        self.module = torch.compile(module) if compile else module
        self._compiled = compile

    def _private_copy(self, model: nn.Module, precision: Precision) -> nn.Module:
        private = copy.deepcopy(model)
        for p in private.parameters():
            p.grad = None
            p.requires_grad_(False)
        self._folds = [_Fold(model, private, conv, bn) for conv, bn in conv_bn_pairs(private)]
        folded = {f"{name}." for f in self._folds for name in (_name(model, f.conv), _name(model, f.bn))}
        if precision.dtype is not None:
            private.to(precision.dtype)
            if precision.head:  # the classifier head stays float32 (see Precision)
                head = private.get_submodule(precision.head)
                head.float()
                float32_head(head)
        if self._channels_last:
            private.to(memory_format=torch.channels_last)
        mine = {**dict(private.named_parameters()), **dict(private.named_buffers())}
        dst, src = [], []
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if any(name.startswith(prefix) for prefix in folded):
                continue
            if name not in mine or mine[name].shape != t.shape:
                raise RuntimeError(f"the copy's {name!r} does not pair with the model's")
            dst.append(mine[name])
            src.append(t)
        self._pairs = (dst, src)
        self._input_dtype = precision.dtype
        self.sync()
        return private

    @property
    def is_copy(self) -> bool:
        """Whether the passes run on a private copy (which `sync` must refresh)."""
        return self._pairs is not None

    @property
    def folded(self) -> int:
        """How many batch norms were folded into convolutions in the copy."""
        return len(self._folds)

    def sync(self) -> None:
        """Copy the model's current parameters and buffers into the private copy (a no-op without one)."""
        if self._pairs is None:
            return
        with torch.no_grad():
            if self._pairs[0]:
                torch._foreach_copy_(*self._pairs)
            for fold in self._folds:
                fold.refresh()

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        target = {}
        if self._input_dtype is not None and x.is_floating_point():
            target["dtype"] = self._input_dtype
        if self._channels_last and x.dim() == 4:
            target["memory_format"] = torch.channels_last
        return x.to(**target) if target else x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        context = (
            torch.autocast(self.precision.device_type, dtype=self.precision.dtype)
            if self._autocast
            else contextlib.nullcontext()
        )
        with context:
            if self._compiled:
                try:
                    out = self.module(x)
                except Exception as exc:  # no compiler, an unsupported op, ...: the eager copy runs
                    warnings.warn(f"compile=True: torch.compile failed ({exc}); running eagerly", stacklevel=3)
                    self.module, self._compiled = self._eager, False
                    out = self.module(x)
            else:
                out = self.module(x)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != self.out_dtype:
            out = out.to(self.out_dtype)
        return out


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
