"""JiT's default mode (docs/METHODS.md §1): eval mode, fused noise, one chunked no-grad forward of all
N*B perturbed samples, and the fused Lipschitz loss with its gradient."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ... import _backend
from ..._forward_copy import ForwardCopy
from ..._precision import Precision, graded_forward
from ..._safety import BatchChecks, all_finite
from ..._utils import ModelState, check_logits, module_mode
from ...distributed import BatchSplit
from ...torch_ops import opmath_dtype
from .safety import non_finite_grads

# Input elements per no-grad forward when max_batch_elems is None: cache-sized chunks on CPU,
# large ones that fill a GPU (how they were chosen: docs/TUNING.md).
DEFAULT_MAX_BATCH_ELEMS = {"cpu": 1 << 17, "cuda": 1 << 22}


def default_max_batch_elems(device: torch.device | str) -> int:
    """The default `max_batch_elems` of jit on `device`."""
    return DEFAULT_MAX_BATCH_ELEMS.get(torch.device(device).type, 1 << 22)


@dataclass(frozen=True)
class DefaultSettings:
    """The arguments of one default-mode run, checked by `jit`.

    optimizer: stepped instead of plain SGD with `lr` when given.  max_batch_elems: input elements
    per no-grad forward of the perturbed samples.  precision: what the model's passes run in (None:
    the model's dtype).  compile: compile the perturbed-pass copy of the model."""

    sigma: float
    lr: float
    num_samples: int
    seed: int
    reduction: str
    max_batch_elems: int
    optimizer: torch.optim.Optimizer | None = None
    precision: Precision | None = None
    compile: bool = False


class StepKernels:
    """The op tier of one default-mode run on `device`, chosen once through `_backend.kernel`, and the
    buffers its steps reuse (perturbed inputs, loss seeds, finite-check flags).  The run builds the
    ops' arguments itself (shapes and dtypes valid by construction), so it calls the kernels without
    the public wrappers' checks."""

    def __init__(self, device: torch.device):
        self._perturb_out = _backend.kernel("_perturb_out", device)
        self.ratio_and_grad = _backend.kernel("_lipschitz_ratio_and_grad", device)
        self.tier = _backend.backend_name(device)
        self.device = device
        self._x_tilde = self._in_norm = None
        self._views = {}
        self._seeds = {}
        self._found = self._one = None

    def perturb(self, x: torch.Tensor, num_samples: int, sigma: float, seed: int, offset: int):
        """`ops.perturb(x, num_samples, sigma, seed, offset, clamp=True)` written into buffers kept
        for the whole run (one allocation instead of one per step; a step's x_tilde is consumed by
        its own forward before the next step overwrites it).  Returns contiguous views."""
        key = (x.shape, x.dtype)
        views = self._views.get(key)
        if views is None:
            shape = (num_samples, *x.shape)
            numel, rows = math.prod(shape), num_samples * x.shape[0]
            op_dtype = opmath_dtype(x.dtype)
            if self._x_tilde is None or self._x_tilde.numel() < numel or self._x_tilde.dtype != x.dtype:
                self._x_tilde = x.new_empty(numel)
                self._views.clear()
            if self._in_norm is None or self._in_norm.numel() < rows or self._in_norm.dtype != op_dtype:
                self._in_norm = x.new_empty(rows, dtype=op_dtype)
                self._views.clear()
            views = self._views[key] = (
                self._x_tilde[:numel].view(shape),
                self._in_norm[:rows].view(num_samples, x.shape[0]),
            )
        x_tilde, in_norm = views
        self._perturb_out(x, num_samples, sigma, seed, offset, True, x_tilde, in_norm)
        return x_tilde, in_norm

    def loss_seed(self, in_norm: torch.Tensor, num_samples: int, mean_rows: int | None) -> torch.Tensor:
        """d loss / d ratio [N, rows] (expanded, in the ratios' dtype: in_norm's) for loss =
        sum(ratio) / N (/ mean_rows), computed as autograd propagates it through the two
        divisions: on the compiled tier the gradient is bitwise that of `loss.backward()` through
        the differentiable op.  Cached per shape."""
        key = (tuple(in_norm.shape), mean_rows)
        if key not in self._seeds:
            seed = torch.ones((), dtype=in_norm.dtype, device=in_norm.device)
            if mean_rows is not None:
                seed = seed / mean_rows
            self._seeds[key] = (seed / num_samples).expand(in_norm.shape)
        return self._seeds[key]

    def all_finite(self, tensors) -> bool:
        """`safety.all_finite`, reusing the fused check's flag buffers across steps."""
        if self._found is None:
            self._found = torch.zeros(1, dtype=torch.float32, device=self.device)
            self._one = torch.ones(1, dtype=torch.float32, device=self.device)
        return all_finite(tensors, found=self._found, one=self._one)


def chunked_forward(model: nn.Module | ForwardCopy, x: torch.Tensor, budget: int) -> torch.Tensor:
    """model(x) for x [R, ...] in equal chunks of at most `budget` input elements (at least one row)."""
    rows = max(1, budget // max(1, math.prod(x.shape[1:])))
    if x.shape[0] <= rows:
        return check_logits(model(x), x.shape[0])
    chunks = -(-x.shape[0] // rows)
    rows = -(-x.shape[0] // chunks)
    return torch.cat([check_logits(model(c), c.shape[0]) for c in x.split(rows)])


def _sgd_step_(params: list[torch.Tensor], lr: float) -> None:
    grads = [p.grad for p in params]
    with torch.no_grad():
        if all(g is not None for g in grads):
            torch._foreach_add_(params, grads, alpha=-lr)
        else:  # parameters this step did not reach
            stepped = [p for p in params if p.grad is not None]
            torch._foreach_add_(stepped, [p.grad for p in stepped], alpha=-lr)


def run_default(
    model: nn.Module,
    xs: Iterable[torch.Tensor],
    *,
    state: ModelState,
    params: list[torch.Tensor],
    settings: DefaultSettings,
    split: BatchSplit,
    data: BatchChecks,
    losses: list[float],
) -> tuple[int, int, float, str]:
    """One step per forget batch of `xs`; returns (steps, samples, sum of the losses, tier).

    Everything that needs no graph (noise, perturbed forwards, the loss and its gradient w.r.t. the
    clean outputs) runs in inference mode on kernels chosen once per run, so a step costs few
    dispatcher calls besides the model's own.  `split` spreads each batch's rows over the ranks
    under torch.distributed (the identity otherwise).  `data`: the checks of the forget batches,
    verified before a non-finite error is raised (bad data is named rather than blamed on lr).
    `losses` receives each step's loss.  Plain SGD steps run without a host sync; the caller
    checks the parameters after the last one.

    With a reduced `settings.precision` the perturbed forward runs on a private copy of the model in
    that dtype, refreshed from the model before every step, and (bfloat16) the clean forward and
    backward under autocast; both sets of logits reach the loss in the model's dtype."""
    s = settings
    n = s.num_samples
    prec = s.precision
    kernels = StepKernels(state.device())
    optimizer = s.optimizer
    updated = params if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]
    steps = samples = 0
    ratio_sums, loss_scales = [], []
    with module_mode(model, False, state.modules):
        copied = prec is not None and (prec.reduced or s.compile)
        forward = ForwardCopy(model, prec, compile=s.compile) if copied else model  # made in eval mode
        for x in xs:
            b = x.shape[0]
            for p in params:
                p.grad = None
            with torch.inference_mode():
                x_tilde, in_norm = kernels.perturb(x, n, s.sigma, s.seed, split.noise_offset(steps))
            x, x_tilde, in_norm = split.local(x, x_tilde, in_norm)  # this rank's rows
            rows, global_rows = x.shape[0], split.global_rows(b)
            mean_rows = global_rows if s.reduction == "mean" else None  # loss = sum(ratios) / N (/ B)
            if rows:
                if forward is not model and steps:
                    forward.sync()  # the copy sees the weights of the previous step
                with torch.inference_mode():
                    out2 = chunked_forward(forward, x_tilde.reshape(n * rows, *x.shape[1:]), s.max_batch_elems)
                out = check_logits(graded_forward(model, x, prec), rows)
                with torch.inference_mode():
                    clean = out.detach()
                    seed_grad = kernels.loss_seed(in_norm, n, mean_rows)
                    ratio, grad_out = kernels.ratio_and_grad(seed_grad, clean, out2.view(n, rows, -1), in_norm)
                    ratio_sums.append(ratio.sum())
                out.backward(grad_out)
                loss_scales.append(n * (mean_rows or 1))
            # else: this rank's share of a small batch is empty; it adds zero gradients
            split.reduce_grads_(params)  # sum over ranks = the gradient of the global batch
            if optimizer is None:  # plain SGD; the parameters are checked after the last step
                _sgd_step_(params, s.lr)
            else:
                if not kernels.all_finite([p.grad for p in updated]):
                    data.verify()
                    raise non_finite_grads(steps)
                optimizer.step()
                if not kernels.all_finite(updated):
                    data.verify()
                    raise FloatingPointError(
                        f"optimizer: step {steps + 1} wrote non-finite values into the parameters; "
                        "the model was restored"
                    )
            steps, samples = steps + 1, samples + b
    for p in params:
        p.grad = None
    sums = torch.stack(ratio_sums).tolist() if ratio_sums else []
    losses.extend(v / scale for v, scale in zip(sums, loss_scales))
    loss_sum = sum(losses)
    samples, loss_total = split.totals(samples, loss_sum)
    return steps, samples, loss_total, kernels.tier
