"""The per-sample (SSD-Det) pass of the importances: vectorised per-sample gradients (torch.func),
with nn.Linear weights reduced from outer products instead of per-sample gradient tensors."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from .. import distributed
from .._precision import Precision
from .._safety import BatchChecks
from .._utils import batch_input, batch_labels, check_logits, iter_batches, model_device
from .._utils import progress as progress_bar
from .batch_pass import batch_loss, num_batches

# Default cap on per-sample gradient elements held at once (chunk size * trainable parameters):
# 2^25 float32 values = 128 MiB.
DEFAULT_MAX_BATCH_ELEMS = 2**25


def _sample_loss(out: torch.Tensor, y: torch.Tensor | None, kind: str) -> torch.Tensor:
    """`batch_loss` of one sample's logits out [1, K] inside vmap.  Cross-entropy is written as
    logsumexp(out) - out[y], which has native batching rules (F.cross_entropy's goes through a
    Python decomposition under vmap, a fixed cost per call)."""
    if kind == "fisher":
        return (torch.logsumexp(out[0], 0) - out[0].gather(0, y.view(1))).squeeze(0)
    return batch_loss(out, None, kind)


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
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) is torch.nn.Linear
        and m.weight.requires_grad
        and all(owners[id(p)] == 1 for p in m._parameters.values() if p is not None)
    }


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


def per_sample_pass(
    model,
    batches,
    acc: dict[str, torch.Tensor],
    kind: str,
    show: bool,
    max_elems: int,
    name: str,
    data: BatchChecks,
    precision: Precision | None = None,
) -> tuple[int, int]:
    """Add sum_i acc(g_i) over single samples into `acc`; returns (batches, samples).

    nn.Linear weights are not differentiated per sample: their gradient for sample i is the outer
    product d_i a_i^T, so sum_i g_i^2 = (d^2)^T (a^2) and sum_i |g_i| = |d|^T |a| (one matmul per
    chunk instead of a [chunk, out, in] tensor).  A model that is a stack of Linear layers and
    per-sample leaves (`_linear_stack`) gets every d_i from one batched backward pass of the summed
    per-sample losses; any other model gets its per-sample gradients from vmap(grad(...)), reduced
    over the chunk.  Under a graded `precision` (bfloat16) the stack's passes run under autocast
    and the products are formed in the accumulators' dtype; the vmap pass runs in the model's dtype.
    `data` checks each batch's inputs and labels (the labels' range once the first chunk has shown
    the number of classes)."""
    square = kind == "fisher"
    device = model_device(model)
    linears = _factorable_linears(model)
    stack = _linear_stack(model, linears)
    taps = None
    plan = None
    pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # checked batches not yet run
    pending_rows = 0

    def run(x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Add the per-sample terms of the rows of x (labels y) into `acc`, `plan.chunk` rows at a time."""
        nonlocal plan, taps
        start = 0
        while start < x.shape[0]:
            stop = start + plan.chunk
            try:
                grads, deltas, inputs = plan(x[start:stop], None if y is None else y[start:stop])
            except _Unfactorable as exc:
                if taps is None:  # the stack met an input it cannot factor: vmap from here on
                    taps = _LinearTaps(linears)
                    plan = _PerSamplePlan(model, taps, kind, max_elems, num_classes=plan.num_classes)
                else:
                    factored = plan.factored - {exc.name}
                    plan = _PerSamplePlan(model, taps, kind, max_elems, factored=factored, num_classes=plan.num_classes)
                continue
            for pname, g in grads.items():
                acc[pname].add_((g * g if square else g.abs()).sum(0))
            for mname, d in deltas.items():
                weight = acc[_param_name(mname, "weight")]
                a = inputs[mname]
                if d.dtype != weight.dtype:  # reduced-precision passes: products in the accumulators' dtype
                    d, a = d.to(weight.dtype), a.to(weight.dtype)
                d, a = (d * d, a * a) if square else (d.abs(), a.abs())
                weight.addmm_(d.t(), a)
                bias = linears[mname].bias
                if bias is not None and bias.requires_grad:
                    acc[_param_name(mname, "bias")].add_(d.sum(0))
            start = stop

    def flush() -> None:
        nonlocal pending_rows
        if not pending:
            return
        xs, ys = zip(*pending)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        y = None if ys[0] is None else (ys[0] if len(ys) == 1 else torch.cat(ys))
        pending.clear()
        pending_rows = 0
        run(x, y)

    try:
        batches_seen = num_samples = 0
        if stack is not None:
            plan = _StackPlan(stack, kind, max_elems, precision)
        else:
            taps = _LinearTaps(linears)
            plan = _PerSamplePlan(model, taps, kind, max_elems)
        for batch in progress_bar(
            iter_batches(batches), enabled=show, desc=f"per-sample importances ({name})", total=num_batches(batches)
        ):
            x = data.inputs(batch_input(batch, name=name), batches_seen)
            y = batch_labels(batch, name=name) if square else None
            known = plan.num_classes  # K, once a chunk has run; before that the range is checked per chunk
            if y is not None:
                y = data.labels(y, batches_seen, x.shape[0], known).to(device, non_blocking=True)
            x = x.to(device, non_blocking=True)
            if known is None:  # the first batch runs alone: its logits show K, which checks the labels
                for begin in range(0, x.shape[0], plan.chunk):
                    end = min(begin + plan.chunk, x.shape[0])
                    run(x[begin:end], None if y is None else y[begin:end])
                    if y is not None:
                        data.labels(y[begin:end], batches_seen, end - begin, plan.num_classes)
            else:
                # The sums over samples do not depend on how the samples are batched: consecutive
                # small batches (already checked) run together, up to `plan.chunk` rows at a time.
                pending.append((x, y))
                pending_rows += x.shape[0]
                if pending_rows >= plan.chunk:
                    flush()
            batches_seen += 1
            num_samples += x.shape[0]
        flush()
    finally:
        if taps is not None:
            taps.remove()
    if batches_seen == 0 and not distributed.is_active():  # a rank's share may be empty
        raise ValueError(f"{name}: yields no batches (empty)")
    return batches_seen, num_samples


# Leaves that map each sample on its own and hold no parameters (Dropout is the identity in eval mode).
_ELEMENTWISE = (
    nn.Identity, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip


def _linear_stack(model: nn.Module, linears: dict[str, nn.Linear]) -> list[tuple[str, nn.Module]] | None:
    """(name, leaf) in execution order when `model` is nn.Sequential containers (with Sequential's
    own forward) of Linear layers (factorable or frozen), Flatten(start_dim >= 1) and parameter-free
    element-wise leaves,
    every module used once, no hooks, and every trainable parameter the weight or bias of a
    factorable Linear; else None.  Such a model maps each sample on its own, so the gradient of
    the summed per-sample losses w.r.t. a Linear's output is, row by row, the per-sample one."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    if len(names) != len(set(names)) or len(names) != len(list(model.modules())):
        return None
    factored = {id(p) for m in linears.values() for p in m.parameters()}
    if any(p.requires_grad and id(p) not in factored for p in model.parameters()):
        return None
    leaves: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, m: nn.Module) -> bool:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            return all(walk(f"{prefix}.{n}" if prefix else n, c) for n, c in m.named_children())
        frozen = not any(p.requires_grad for p in m.parameters())
        ok = (
            (type(m) is nn.Linear and (prefix in linears or frozen))
            or (type(m) is nn.Flatten and m.start_dim >= 1)
            or (type(m) in _ELEMENTWISE and not list(m.parameters()))
        )
        if ok:
            leaves.append((prefix, m))
        return ok

    if not walk("", model) or not any(n in linears for n, _ in leaves):
        return None
    return leaves


def _out_of_place(m: nn.Module) -> nn.Module:
    if not getattr(m, "inplace", False):
        return m
    m = copy.copy(m)
    m.inplace = False
    return m


class _StackPlan:
    """Per-sample output gradients of every Linear of a `_linear_stack` from one batched forward and
    one backward of the summed per-sample losses (no parameter gradients are formed)."""

    def __init__(self, leaves: list[tuple[str, nn.Module]], kind: str, max_elems: int, precision):
        # in-place activations would overwrite the Linear outputs that autograd.grad is asked about:
        # run shallow copies (these leaves hold no parameters) that work out of place
        self.leaves = [(n, _out_of_place(m)) for n, m in leaves]
        self.kind = kind
        self.precision = precision
        self.num_classes = None  # K, known after the first call
        self.factored = {n for n, m in leaves if type(m) is nn.Linear and any(p.requires_grad for p in m.parameters())}
        per_sample = sum(m.in_features + m.out_features for n, m in leaves if n in self.factored)
        self.chunk = max(1, max_elems // max(1, per_sample))

    def __call__(self, x, y):
        h, inputs, outputs = x, {}, {}
        with torch.enable_grad(), self.precision.autocast() if self.precision else contextlib.nullcontext():
            for name, m in self.leaves:
                if name in self.factored:
                    if h.dim() != 2:  # more than one row per sample: not one outer product
                        raise _Unfactorable(name)
                    inputs[name] = h.detach()
                    h = m(h)
                    outputs[name] = h
                else:
                    h = m(h)
        out = check_logits(h, x.shape[0])
        out = self.precision.logits(out) if self.precision else out
        self.num_classes = out.shape[1]
        if y is not None:  # kept in range until the caller has checked the labels (a CUDA gather would abort)
            y = y.clamp(0, out.shape[1] - 1)
        # the sum over rows of `_sample_loss`, written as it is, so that every row's gradient is
        # formed by the same ops as the vmap pass forms it
        if self.kind == "fisher":
            loss = (torch.logsumexp(out, 1) - out.gather(1, y.view(-1, 1)).squeeze(1)).sum()
        else:
            loss = torch.linalg.vector_norm(out, 2, dim=1).pow(2).sum()
        names = list(outputs)
        deltas = torch.autograd.grad(loss, [outputs[n] for n in names])
        return {}, dict(zip(names, deltas)), inputs


class _PerSamplePlan:
    """One vmap(grad) function: per-sample gradients of the non-factored trainable parameters and
    of the probes of the factored Linear modules, plus those modules' per-sample inputs.  It runs
    in the model's dtype whatever the precision: autocast does not compose with vmap's rules (a
    bfloat16 convolution output meets a float32 batch norm)."""

    def __init__(
        self,
        model,
        taps: _LinearTaps,
        kind: str,
        max_elems: int,
        factored: set[str] | None = None,
        num_classes: int | None = None,
    ):
        from torch.func import functional_call, grad, vmap

        self.num_classes = num_classes  # K, known after the first call

        self.factored = set(taps.modules) if factored is None else set(factored)
        factored_params = {_param_name(m, leaf) for m in self.factored for leaf in ("weight", "bias")}
        named = list(model.named_parameters())
        self.trainable = {n: p.detach() for n, p in named if p.requires_grad and n not in factored_params}
        fixed = {n: p.detach() for n, p in named if not (p.requires_grad and n not in factored_params)}
        fixed.update(dict(model.named_buffers()))
        self.probes = {
            m: torch.zeros(
                taps.modules[m].out_features, dtype=taps.modules[m].weight.dtype, device=taps.modules[m].weight.device
            )
            for m in self.factored
        }
        per_sample = sum(p.numel() for p in self.trainable.values()) + sum(
            taps.modules[m].in_features + taps.modules[m].out_features for m in self.factored
        )
        self.chunk = max(1, max_elems // max(1, per_sample))

        def sample_loss(params, probes, x, y):
            taps.probes, taps.inputs, taps.calls = probes, {}, {}
            taps.active = True
            try:
                out = functional_call(model, (params, fixed), (x.unsqueeze(0),))
            finally:
                taps.active = False
            # a module this sample never reached contributes nothing (its probe gradient is 0)
            inputs = {
                m: taps.inputs[m] if m in taps.inputs else out.new_zeros(taps.modules[m].in_features) for m in probes
            }
            taps.probes, taps.inputs = {}, {}
            out = check_logits(out, 1)
            self.num_classes = out.shape[1]
            if y is not None:  # kept in range until the caller has checked the labels (a CUDA gather would abort)
                y = y.clamp(0, out.shape[1] - 1)
            return _sample_loss(out, y, kind), inputs

        self.fn = vmap(
            grad(sample_loss, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0, 0 if kind == "fisher" else None)
        )

    def __call__(self, x, y):
        (grads, deltas), inputs = self.fn(self.trainable, self.probes, x, y)
        return grads, deltas, inputs
