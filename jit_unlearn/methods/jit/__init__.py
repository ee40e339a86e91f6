"""JiT: zero-shot Lipschitz unlearning (docs/METHODS.md §1).  This module holds the public `jit` and
its checks; the two modes live in `default.py` (the fixed method) and `reference.py` (the published
code), what keeps both safe in `safety.py`."""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ... import _checks as checks
from ... import _precision, distributed
from ..._safety import BatchChecks, protected
from ..._utils import ModelState, as_batches, batch_input, counted, split_rows
from ..._utils import progress as _progress
from .default import DEFAULT_MAX_BATCH_ELEMS, DefaultSettings, default_max_batch_elems, run_default
from .reference import run_reference

__all__ = ["jit", "JiTReport", "default_max_batch_elems", "DEFAULT_MAX_BATCH_ELEMS"]

_MODES = ("default", "reference")
_REDUCTIONS = ("sum", "mean")


@dataclass
class JiTReport:
    """What a `jit` call did: optimizer steps (one per forget batch), forget samples seen, wall
    seconds, the mean of the per-step losses, the op tier that ran ("cuda", "cpu" or "torch"),
    the mode, the precision the model's passes ran in ("auto" resolved), and whether any parameter
    changed (False comes with a RuntimeWarning)."""

    steps: int
    samples: int
    seconds: float
    mean_loss: float
    backend: str
    mode: str
    precision: str = "float32"
    changed: bool = True

    def __str__(self) -> str:
        unchanged = "" if self.changed else "; the model is UNCHANGED"
        reduced = "" if self.precision == "float32" else f", {self.precision} passes"
        return (
            f"jit ({self.mode} mode, {self.backend} ops{reduced}): {counted(self.steps, 'step')} over "
            f"{counted(self.samples, 'forget sample')}, mean loss {self.mean_loss:.4g}, {self.seconds:.3g} s{unchanged}"
        )


def jit(
    model: nn.Module,
    forget,
    *,
    sigma: float,
    lr: float,
    num_samples: int = 25,
    batch_size: int | None = None,
    mode: str = "default",
    seed: int = 0,
    reduction: str = "sum",
    optimizer: torch.optim.Optimizer | None = None,
    max_batch_elems: int | None = None,
    precision: str = "float32",
    compile: bool = False,
    progress: bool = True,
) -> JiTReport:
    """Unlearn `forget` from a classifier in place by making it locally Lipschitz around each sample
    (docs/METHODS.md §1).

    Per forget batch x [B, ...] it draws `num_samples` (N) copies x~ = clamp(x + sigma * xi, min(x),
    max(x)) (min/max over the whole batch), and takes one gradient step on
        loss = (1/N) sum_n sum_i ||f(x_i) - f(x~_ni)||_2 / ||x_i - x~_ni||_2
    (the perturbed outputs are constants).  One pass over the forget set, one step per batch;
    labels are never read.  Starting hyper-parameters: docs/TUNING.md.

    Args:
        model: classifier returning logits [B, K] (a tensor, or an output with a `.logits` tensor or
            a "logits" key, as transformers' classifiers return); float32/float64, or
            bfloat16/float16 with the loss computed in float32.  Any train/eval mode; BatchNorm,
            Dropout and in-place ReLU work.
        forget: DataLoader, Dataset or tensor [M, ...] of forget samples on the model's device.  A
            batch is the input itself when it is a tensor, else its first element (so `x`, `(x, y)`
            and `(x, _, y)` batches work).  Floating inputs are cast to the model's dtype.
        sigma: noise standard deviation, > 0, in the units of the (normalised) input.
        lr: learning rate of the plain SGD step, >= 0 (ignored when `optimizer` is given).
        num_samples: N >= 1 perturbed copies per batch.
        batch_size: batch size for a Dataset or tensor `forget` (default 128); must be None for a
            DataLoader.
        mode: "default" (the fixed method) or "reference" (the published code), see Modes.
        seed: Philox seed of the default mode's noise, an int in [-2^63, 2^64); batch t uses stream
            offset t, so a run is reproducible and draws the same noise on CPU and GPU.  Unused in
            reference mode.
        reduction: "sum" over the batch (the paper's; published learning rates assume it) or
            "mean" (divide by B).
        optimizer: default mode only: a torch.optim.Optimizer over (some of) the model's
            parameters, stepped instead of plain SGD; its state is restored if the run fails.
        max_batch_elems: default mode only: input elements per no-grad forward of the N*B
            perturbed samples; more are split into equal chunks.  Default: `default_max_batch_elems`
            of the model's device (2^17 on CPU, 2^22 on GPUs).
        precision: default mode only: "float32" (the model's own dtype; the default), "bfloat16",
            "float16" (CUDA only) or "auto" (bfloat16 where the hardware runs it fast, else
            float32).  A reduced precision runs the N*B perturbed forward on a private copy of the
            model in that dtype (channels_last for conv nets) and, for bfloat16, the clean forward
            and backward under autocast; the loss, its gradient and the SGD step stay float32 on the
            float32 weights (docs/METHODS.md §7).  Reduced precisions need a float32 model.
        compile: default mode only: run the perturbed forward on a `torch.compile`d private copy
            of the model (compiling takes tens of seconds; docs/TUNING.md says when it pays off).
        progress: show a tqdm bar over the forget batches.

    Modes:
        "default": every step runs with the whole model in eval mode (each module's own flag is
            restored afterwards), gradients are zeroed each step, the noise comes from
            `ops.perturb`, the N*B perturbed samples go through the model in one no-grad forward
            (chunked), and the loss is `ops.lipschitz_ratio`; pairs whose input difference is zero
            are dropped instead of dividing by zero.  Gradients are cleared (None) at the end.
        "reference": the published implementation: the caller's train/eval mode is kept; the N
            perturbed passes run one by one, each drawing `torch.randn(x.shape)` from torch's
            global CPU generator (seed it with `torch.manual_seed` to reproduce a run); gradients
            are zeroed once at the start and then accumulate, so step t applies the sum of all
            gradients so far, and are left in `.grad` at the end; plain SGD.  Norms are computed in
            float32 (float64 for float64 models).
    Under torch.distributed (e.g. torchrun), the default mode splits each batch's rows across the
    ranks and sums their gradients, so every rank takes the step that one process would take on
    the global batch.  The reference mode runs whole on every rank (docs/DISTRIBUTED.md).

    Safety: the arguments (lr must fit the parameters' dtype), the first batch and the first output
    shape are checked before any step; if anything fails (KeyboardInterrupt included) parameters,
    buffers, train/eval flags, the caller's `.grad` and a caller's optimizer state are restored
    bitwise.  Reference mode and a caller's optimizer check every step's gradients (and the
    optimizer's result); both modes check every parameter and buffer after the last step
    (FloatingPointError, model restored), so the default mode's plain SGD steps run without a host
    sync.  A forget batch holding NaN or inf raises ValueError naming the batch.  A run that leaves
    every parameter bitwise unchanged warns (RuntimeWarning) and reports changed=False.

    The caller's model keeps its dtype and memory layout whatever `precision` and `compile` say.

    Returns:
        JiTReport(steps, samples, seconds, mean_loss, backend, mode, precision, changed).
    """
    start = time.perf_counter()
    _check_args(model, sigma, lr, num_samples, mode, seed, reduction, optimizer, max_batch_elems, progress)
    checks.boolean(compile, "compile")
    prec = _resolve_precision(model, precision, compile, mode)
    state = ModelState(model)
    params = [p for p in state.params if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters (requires_grad=True)")
    if optimizer is None:
        checks.fits_dtype(lr, "lr", {p.dtype for p in params})
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
    n_copies = num_samples if mode == "default" else 1
    _batch_x(first, device, dtype, n_copies)  # fail on a bad first batch before anything changes
    data = BatchChecks("forget")
    stream = _progress(itertools.chain([first], it), enabled=progress, desc="jit", total=total)
    xs = (data.inputs(_batch_x(batch, device, dtype, n_copies), i) for i, batch in enumerate(stream))
    losses: list[float] = []

    def body(snapshot) -> JiTReport:
        with torch.enable_grad():
            if mode == "reference":
                steps, samples, loss_sum = run_reference(
                    model,
                    xs,
                    params,
                    sigma=float(sigma),
                    lr=float(lr),
                    num_samples=num_samples,
                    reduction=reduction,
                    data=data,
                )
                backend = "torch"
            else:
                settings = DefaultSettings(
                    sigma=float(sigma),
                    lr=float(lr),
                    num_samples=num_samples,
                    seed=checks.seed64(seed, "seed"),
                    reduction=reduction,
                    max_batch_elems=default_max_batch_elems(device) if max_batch_elems is None else max_batch_elems,
                    optimizer=optimizer,
                    precision=prec,
                    compile=compile,
                )
                steps, samples, loss_sum, backend = run_default(
                    model, xs, state=state, params=params, settings=settings, split=split, data=data, losses=losses
                )
        data.verify()
        changed = snapshot.changed()
        if not changed:
            warnings.warn(
                "jit: the model is unchanged: every update was zero or below the parameters' precision "
                "(lr = 0, a sigma too small for the inputs' dtype, or a model whose outputs ignore its input)",
                RuntimeWarning,
                stacklevel=4,
            )
        return JiTReport(
            steps=steps,
            samples=samples,
            seconds=time.perf_counter() - start,
            mean_loss=float(loss_sum) / steps,
            backend=backend,
            mode=mode,
            precision=prec.name,
            changed=changed,
        )

    def hint() -> str:
        bad = next((t for t, v in enumerate(losses) if not math.isfinite(v)), None)
        where = f"the first non-finite loss: {losses[bad]} in step {bad + 1}; " if bad is not None else ""
        return f"{where}a smaller lr or a larger sigma may help"

    return protected(model, body, method="jit", state=state, optimizer=optimizer, hint=hint)


def _resolve_precision(model, precision, compile, mode) -> _precision.Precision:
    """The default mode's precision; the reference mode runs the published code as it is (float32,
    eager), so it takes only "float32" or "auto" (which then means float32) and compile=False."""
    if mode == "reference":
        prec = _precision.resolve(precision, model, plain="mode='reference' (the published code)")
        if compile:
            raise ValueError("compile: mode='reference' runs the published code eagerly; pass compile=False")
        return prec
    return _precision.resolve(precision, model)


def _batch_x(batch, device, dtype, copies: int) -> torch.Tensor:
    x = batch_input(batch, name="forget")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"forget: the input of a batch must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"forget: inputs must be floating point to be perturbed, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"forget: a batch must be [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(
            f"forget: inputs are on {x.device} but the model is on {device}; "
            "move the data (or the model) to one device first"
        )
    checks.element_count((copies, *x.shape), "num_samples", f"{copies} perturbed copies of a batch {tuple(x.shape)}")
    return x if x.dtype == dtype else x.to(dtype)


def _check_args(model, sigma, lr, num_samples, mode, seed, reduction, optimizer, max_batch_elems, progress):
    checks.model(model)
    checks.real(sigma, "sigma", low=0, low_open=True)
    checks.real(lr, "lr", low=0)
    checks.integer(num_samples, "num_samples", low=1)
    checks.choice(mode, "mode", _MODES)
    checks.seed64(seed, "seed")
    checks.choice(reduction, "reduction", _REDUCTIONS)
    checks.optional_integer(max_batch_elems, "max_batch_elems", low=1)
    checks.boolean(progress, "progress")
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if mode == "reference":
            raise ValueError(
                "optimizer: mode='reference' always takes plain SGD steps with `lr`; "
                "pass optimizer=None or use mode='default'"
            )
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("optimizer: holds parameters that do not belong to `model`")
