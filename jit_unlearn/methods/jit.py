"""JiT: zero-shot Lipschitz unlearning (ALGORITHMS.md section 1), in its reference and default modes."""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .. import _backend, distributed, reference
from .._utils import (ModelState, as_batches, batch_input, check_logits, module_mode, restore_on_failure,
                      split_rows)
from .._utils import progress as _progress

__all__ = ["jit", "JiTReport"]

# Input elements per no-grad forward when max_batch_elems is None.  On CPU, cache-sized chunks run
# convolutions faster (measured, one thread: a CIFAR ResNet-18 takes 1.33 s for 128 samples in chunks
# of 16 vs 1.85 s in one batch; an MNIST CNN 0.73 s vs 1.74 s for 3,200 samples in chunks of 128);
# MLPs do not care.  On GPUs, large chunks fill the device; 2^22 elements of CIFAR input (1,365
# samples) keep a ResNet-18 chunk near 1 GiB of activations.
DEFAULT_MAX_BATCH_ELEMS = {"cpu": 1 << 17, "cuda": 1 << 22}


def default_max_batch_elems(device: torch.device) -> int:
    """The default `max_batch_elems` of jit on `device`."""
    return DEFAULT_MAX_BATCH_ELEMS.get(torch.device(device).type, 1 << 22)


_MODES = ("default", "reference")
_REDUCTIONS = ("sum", "mean")


@dataclass
class JiTReport:
    """What a `jit` call did: optimizer steps (one per forget batch), forget samples seen, wall
    seconds, the mean of the per-step losses, the op tier that ran ("cuda", "cpu" or "torch"),
    and the mode."""

    steps: int
    samples: int
    seconds: float
    mean_loss: float
    backend: str
    mode: str


def jit(model: nn.Module, forget, *, sigma: float, lr: float, num_samples: int = 25,
        batch_size: int | None = None, mode: str = "default", seed: int = 0, reduction: str = "sum",
        optimizer: torch.optim.Optimizer | None = None, max_batch_elems: int | None = None,
        progress: bool = True) -> JiTReport:
    """Unlearn `forget` from a classifier in place by making it locally Lipschitz around each sample.

    Per forget batch x [B, ...] it draws `num_samples` (N) copies x~ = clamp(x + sigma * xi, min(x),
    max(x)) (min/max over the whole batch), and takes one gradient step on
        loss = (1/N) sum_n sum_i ||f(x_i) - f(x~_ni)||_2 / ||x_i - x~_ni||_2
    (the perturbed outputs are constants).  One pass over the forget set, one step per batch;
    labels are never read.

    Args:
        model: classifier returning logits [B, K]; float32/float64, or bfloat16/float16 with the
            loss computed in float32.  Any train/eval mode; BatchNorm, Dropout and in-place ReLU work.
        forget: DataLoader, Dataset or tensor [M, ...] of forget samples on the model's device.  A
            batch is the input itself when it is a tensor, else its first element (so `x`, `(x, y)`
            and `(x, _, y)` batches work).  Floating inputs are cast to the model's dtype.
        sigma: noise standard deviation, > 0, in the units of the (normalised) input.
        lr: learning rate of the plain SGD step, >= 0 (ignored when `optimizer` is given).
        num_samples: N >= 1 perturbed copies per batch.
        batch_size: batch size for a Dataset or tensor `forget` (default 128; the paper uses 128 for
            full-class and random forgetting, 64 for sub-class); must be None for a DataLoader.
        mode: "default" (the fixed method below) or "reference" (the published code).
        seed: Philox seed of the default mode's noise; batch t uses stream offset t, so a run is
            reproducible and draws the same noise on CPU and GPU.  Unused in reference mode.
        reduction: "sum" over the batch (the paper's; published learning rates assume it) or
            "mean" (divide by B).
        optimizer: default mode only: a torch.optim.Optimizer over (some of) the model's
            parameters, stepped instead of plain SGD; its state is restored if the run fails.
        max_batch_elems: default mode only: input elements per no-grad forward of the N*B
            perturbed samples; more are split into equal chunks.  Default 2^17 on CPU (cache-sized
            chunks are faster there), 2^22 on GPUs.
        progress: show a tqdm bar over the forget batches.

    Modes:
        "default": every step runs with the whole model in eval mode (BatchNorm statistics frozen,
            Dropout off; each module's own flag is restored afterwards), gradients are zeroed each
            step, the noise comes from `ops.perturb`, the N*B perturbed samples go through the model
            in one no-grad forward (chunked), and the loss is `ops.lipschitz_ratio`; pairs whose
            input difference is zero are dropped instead of dividing by zero.  Gradients are
            cleared (None) at the end.
        "reference": the published implementation: the caller's train/eval mode is kept (in train
            mode every perturbed pass updates BatchNorm statistics and Dropout is active); the N
            perturbed passes run one by one, each drawing `torch.randn(x.shape)` from torch's
            global CPU generator and moving it to the model's device (seed it with
            `torch.manual_seed` to reproduce a run); gradients are zeroed once at the start and
            then accumulate, so step t applies the sum of all gradients so far; plain SGD.  As in
            the published code the accumulated gradients are left in `.grad` at the end.  Norms are
            computed in float32 (float64 for float64 models).
    Under torch.distributed (e.g. torchrun), the default mode splits each batch's rows across the
    ranks and sums their gradients, so every rank takes the step that one process would take on
    the global batch.  The reference mode runs whole on every rank (docs/DISTRIBUTED.md).

    Safety: the arguments, the first batch and the first output shape are checked before any
    step; if anything fails (KeyboardInterrupt included) parameters and buffers are restored
    bitwise.  Non-finite values raise FloatingPointError and the model is restored: reference
    mode and a caller's optimizer check every step's gradients (and the optimizer's result); the
    default mode's plain SGD checks the parameters once after the last step (an inf or NaN that
    reaches a parameter stays there, p - lr * g cannot make it finite again), so the steps run
    without a host sync.

    Hyper-parameters (published, as starting points; N = 25 throughout, forget batch 128 for
    full-class and random, 64 for sub-class): VGG-class nets sigma=0.5, lr=3e-4 (full-class),
    sigma=0.01, lr=3e-4 (sub-class, random); ViT sigma=0.8, lr=1.5 (full-class), sigma=1.5,
    lr=0.5 (sub-class), sigma=0.5, lr=0.1 (random).  Measured here (default mode, reduction "sum",
    N=25, MLPs 256-256 wide trained with label smoothing 0.1; tests/test_jit.py), full-class:
    MNIST (normalised, 784 inputs) sigma=0.5, lr=2e-3, batch 128: forget-class accuracy 0.94 -> 0,
    other classes within 0.5 point; scikit-learn digits (8x8 in [0, 1]) sigma=1.0, lr=1.7e-3,
    batch 64: 0.91 -> 0, other classes -2 to -3 points.  Sharper models (no label smoothing) need
    smaller steps and lose more: MNIST at the same setting -2.5 points; digits at lr=6e-4 keeps
    26% forget accuracy and loses 10 points.  With reduction "mean", multiply lr by the batch size.

    Returns:
        JiTReport(steps, samples, seconds, mean_loss, backend, mode).
    """
    start = time.perf_counter()
    _check_args(model, sigma, lr, num_samples, mode, seed, reduction, optimizer, max_batch_elems, progress)
    state = ModelState(model)
    params = [p for p in state.params if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters (requires_grad=True)")
    device, dtype = state.device(), state.dtype()
    if mode == "default" and (isinstance(forget, torch.Tensor) or type(forget) is TensorDataset):
        # The batches a DataLoader would collate, sliced and copied (a model may work in place on its
        # input) instead of gathered sample by sample.  Reference mode keeps the DataLoader:
        # iterating one draws from the global generator.
        slices = split_rows(forget, batch_size, name="forget")
        split = distributed.BatchSplit(slices)  # under torch.distributed: same batches everywhere, rows split
        distributed.check_same_model(model)
        total, it = len(slices), (s.clone() for s in split.batches)
    else:
        batches = as_batches(forget, batch_size, name="forget")
        if mode == "default":
            split = distributed.BatchSplit(batches)
            batches = split.batches
            distributed.check_same_model(model)
        try:
            total = len(batches)
        except TypeError:
            total = None
        it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError("forget: yields no batches (empty)")
    _batch_x(first, device, dtype)  # fail on a bad first batch before anything changes
    stream = _progress(itertools.chain([first], it), enabled=progress, desc="jit", total=total)
    xs = (_batch_x(batch, device, dtype) for batch in stream)

    with torch.enable_grad(), restore_on_failure(model, state), _restore_optimizer_on_failure(optimizer):
        if mode == "reference":
            steps, samples, loss_sum = _run_reference(model, xs, params, float(sigma), float(lr),
                                                      num_samples, reduction)
            backend = "torch"
        else:
            budget = default_max_batch_elems(device) if max_batch_elems is None else max_batch_elems
            step_ops = _StepOps(device)
            steps, samples, loss_sum = _run_default(model, state.modules, xs, params, float(sigma), float(lr),
                                                    num_samples, seed, reduction, optimizer, budget, split, step_ops)
            backend = step_ops.tier
    return JiTReport(steps=steps, samples=samples, seconds=time.perf_counter() - start,
                     mean_loss=float(loss_sum) / steps, backend=backend, mode=mode)


def _run_reference(model, xs, params, sigma, lr, num_samples, reduction):
    """The published loop, operation for operation (ALGORITHMS.md section 1, reference)."""
    sgd = torch.optim.SGD(params, lr=lr)
    sgd.zero_grad()
    steps = samples = 0
    loss_sum = 0.0
    for x in xs:
        b = x.shape[0]
        out = check_logits(model(x), b)
        op = reference.opmath_dtype(out.dtype)
        lo, hi = x.min(), x.max()
        loss = torch.zeros((), dtype=op, device=x.device)
        for _ in range(num_samples):
            noise = torch.randn(x.shape).to(x.device)
            x2 = torch.clamp(x + noise * sigma, lo, hi).to(x.dtype)
            with torch.no_grad():
                out2 = check_logits(model(x2), b)
            in_norm = torch.linalg.vector_norm((x - x2).flatten(1).to(op), dim=1)
            out_norm = torch.linalg.vector_norm((out - out2).to(op), dim=1)
            loss = loss + (out_norm / in_norm).sum()
        loss = loss / num_samples
        if reduction == "mean":
            loss = loss / b
        loss.backward()
        _check_finite_grads(params, steps)
        sgd.step()
        steps, samples = steps + 1, samples + b
        loss_sum += loss.item()
    return steps, samples, loss_sum


def _run_default(model, modules, xs, params, sigma, lr, num_samples, seed, reduction, optimizer, budget, split,
                 step_ops):
    """Eval mode, fused noise, one chunked no-grad forward of all N*B perturbed samples, fused loss.

    Everything that needs no graph (noise, perturbed forwards, the loss and its gradient w.r.t. the
    clean outputs) runs in inference mode on ops resolved once per run, so a step costs few
    dispatcher calls besides the model's own."""
    updated = params if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]
    steps = samples = 0
    ratio_sums, loss_scales = [], []
    with module_mode(model, False, modules):
        for x in xs:
            b = x.shape[0]
            for p in params:
                p.grad = None
            with torch.inference_mode():
                x_tilde, in_norm = step_ops.perturb(x, num_samples, sigma, seed, split.noise_offset(steps))
            x, x_tilde, in_norm = split.local(x, x_tilde, in_norm)  # this rank's rows
            rows, global_rows = x.shape[0], split.global_rows(b)
            mean_rows = global_rows if reduction == "mean" else None  # loss = sum(ratios) / N (/ B)
            if rows:
                with torch.inference_mode():
                    out2 = _chunked_forward(model, x_tilde.reshape(num_samples * rows, *x.shape[1:]), budget)
                out = check_logits(model(x), rows)
                with torch.inference_mode():
                    clean = out.detach()
                    seed_grad = step_ops.loss_seed(in_norm, num_samples, mean_rows)
                    ratio, grad_out = step_ops.ratio_and_grad(seed_grad, clean, out2.view(num_samples, rows, -1),
                                                              in_norm)
                    ratio_sums.append(ratio.sum())
                out.backward(grad_out)
                loss_scales.append(num_samples * (mean_rows or 1))
            # else: this rank's share of a small batch is empty; it adds zero gradients
            split.reduce_grads_(params)  # sum over ranks = the gradient of the global batch
            if optimizer is None:  # plain SGD; the parameters are checked after the last step
                grads = [p.grad for p in params]
                with torch.no_grad():
                    if all(g is not None for g in grads):
                        torch._foreach_add_(params, grads, alpha=-lr)
                    else:  # parameters this step did not reach
                        stepped = [p for p in params if p.grad is not None]
                        torch._foreach_add_(stepped, [p.grad for p in stepped], alpha=-lr)
            else:
                if not step_ops.all_finite([p.grad for p in updated]):
                    raise _non_finite_grads(steps)
                optimizer.step()
                if not step_ops.all_finite(updated):
                    raise FloatingPointError(f"optimizer: step {steps + 1} wrote non-finite values into the "
                                             "parameters; the model was restored")
            steps, samples = steps + 1, samples + b
    for p in params:
        p.grad = None
    sums = torch.stack(ratio_sums).tolist() if ratio_sums else []
    if optimizer is None and not step_ops.all_finite(params):
        bad = next((t for t, v in enumerate(sums) if not math.isfinite(v)), None)
        where = f" (the first non-finite loss: {sums[bad]} in step {bad + 1})" if bad is not None else ""
        raise FloatingPointError(f"jit: the SGD steps wrote non-finite values into the parameters{where}; "
                                 "the model was restored.  A smaller lr or a larger sigma may help")
    loss_sum = sum(v / scale for v, scale in zip(sums, loss_scales))
    samples, loss_total = split.totals(samples, loss_sum)
    return steps, samples, loss_total


class _StepOps:
    """The op tier of one default-mode run on `device`, resolved once.  The run builds the ops'
    arguments itself (shapes and dtypes valid by construction), so it calls them without the
    public wrappers' checks."""

    def __init__(self, device: torch.device):
        if _backend.use_compiled(device):
            lib = torch.ops.jit_unlearn
            self._perturb_out, self.ratio_and_grad = lib._perturb_out.default, lib._lipschitz_ratio_and_grad.default
            self.tier = device.type  # what _backend.backend_name reports
        else:
            self._perturb_out, self.ratio_and_grad = reference.perturb_out, reference.lipschitz_ratio_and_grad
            self.tier = "torch"
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
            op_dtype = reference.opmath_dtype(x.dtype)
            if self._x_tilde is None or self._x_tilde.numel() < numel or self._x_tilde.dtype != x.dtype:
                self._x_tilde = x.new_empty(numel)
                self._views.clear()
            if self._in_norm is None or self._in_norm.numel() < rows or self._in_norm.dtype != op_dtype:
                self._in_norm = x.new_empty(rows, dtype=op_dtype)
                self._views.clear()
            views = self._views[key] = (self._x_tilde[:numel].view(shape),
                                        self._in_norm[:rows].view(num_samples, x.shape[0]))
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
        """`_all_finite`, reusing the fused check's flag buffers across steps."""
        if self._found is None:
            self._found = torch.zeros(1, dtype=torch.float32, device=self.device)
            self._one = torch.ones(1, dtype=torch.float32, device=self.device)
        return _all_finite(tensors, found=self._found, one=self._one)


def _chunked_forward(model, x, budget):
    """model(x) for x [R, ...] in equal chunks of at most `budget` input elements (at least one row)."""
    rows = max(1, budget // max(1, math.prod(x.shape[1:])))
    if x.shape[0] <= rows:
        return check_logits(model(x), x.shape[0])
    chunks = -(-x.shape[0] // rows)
    rows = -(-x.shape[0] // chunks)
    return torch.cat([check_logits(model(c), c.shape[0]) for c in x.split(rows)])


def _all_finite(tensors, found: torch.Tensor | None = None, one: torch.Tensor | None = None) -> bool:
    """True when no element of `tensors` (None entries skipped) is inf or NaN; one host sync.
    `found` / `one`: float32 [1] buffers on the tensors' device to reuse (found must be 0)."""
    tensors = [t.detach() for t in tensors if t is not None and t.numel() > 0]
    if not tensors:
        return True
    device = tensors[0].device
    if all(t.device == device and t.dtype in _FUSED_CHECK_DTYPES for t in tensors):
        # One fused pass over every tensor: torch's foreach inf/NaN check (the AMP grad-scaler's),
        # with the scale 1.0, which leaves every value bitwise as it was.  A device or dtype that
        # kernel does not cover (e.g. bfloat16 on some backends) takes the generic path below.
        found = torch.zeros(1, dtype=torch.float32, device=device) if found is None else found
        one = torch.ones(1, dtype=torch.float32, device=device) if one is None else one
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
            return not bool(found.item())
        except (RuntimeError, NotImplementedError):
            pass
    # max |t| is inf or NaN exactly when some element is (amax propagates NaN)
    maxima = [t.abs().amax().to(device, torch.float32) for t in tensors]
    return bool(torch.isfinite(torch.stack(maxima)).all())


_FUSED_CHECK_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


def _check_finite_grads(params, step):
    if not _all_finite([p.grad for p in params]):
        raise _non_finite_grads(step)


def _non_finite_grads(step: int) -> FloatingPointError:
    return FloatingPointError(f"jit: non-finite gradients in step {step + 1} (forget batch {step + 1}); "
                              "the model was restored.  A smaller lr or a larger sigma may help")


@contextlib.contextmanager
def _restore_optimizer_on_failure(optimizer) -> Iterator[None]:
    """Put a caller's optimizer state (momentum, Adam moments, step counts) back if the body raises."""
    if optimizer is None:
        yield
        return
    saved = copy.deepcopy(optimizer.state_dict())
    try:
        yield
    except BaseException:
        optimizer.load_state_dict(saved)
        raise


def _batch_x(batch, device, dtype) -> torch.Tensor:
    x = batch_input(batch, name="forget")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"forget: the input of a batch must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"forget: inputs must be floating point to be perturbed, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"forget: a batch must be [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"forget: inputs are on {x.device} but the model is on {device}; "
                         "move the data (or the model) to one device first")
    return x if x.dtype == dtype else x.to(dtype)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_real(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")


def _check_args(model, sigma, lr, num_samples, mode, seed, reduction, optimizer, max_batch_elems, progress):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_real(sigma, "sigma")
    if sigma <= 0:
        raise ValueError(f"sigma: must be > 0, got {sigma}")
    _check_real(lr, "lr")
    if lr < 0:
        raise ValueError(f"lr: must be >= 0, got {lr}")
    if not _is_int(num_samples):
        raise TypeError(f"num_samples: expected an int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    if not _is_int(seed):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: must be in [-2^63, 2^64), got {seed}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if max_batch_elems is not None:
        if not _is_int(max_batch_elems):
            raise TypeError(f"max_batch_elems: expected an int or None, got {type(max_batch_elems).__name__}")
        if max_batch_elems < 1:
            raise ValueError(f"max_batch_elems: must be >= 1, got {max_batch_elems}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {type(progress).__name__}")
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if mode == "reference":
            raise ValueError("optimizer: mode='reference' always takes plain SGD steps with `lr`; "
                             "pass optimizer=None or use mode='default'")
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("optimizer: holds parameters that do not belong to `model`")
