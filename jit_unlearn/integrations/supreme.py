"""SUPREME's unlearning-method call sites (supreme-unlearning 0.1.5), computed by jit_unlearn.

Same names, signatures and semantics as `supreme.methods.unlearning_methods.<name>.<name>`:

    jit(fabric, num_gpus, wandb_logging_flag, model, forget_train_dataloader, n_epochs=1, n_samples=10,
        learning_rate=0.001, jit_weighting=0.1, **kwargs)
    ssd | lfssd | assd | ssd_det | lfssd_det(fabric, num_gpus, wandb_logging_flag, model,
        forget_train_dataloader, full_train_dataloader, dampening_constant, selection_weighting, **kwargs)

Batches are SUPREME's (x, index, y) triples.  `fabric` is a lightning Fabric or any object with the
members used here: `setup`, `backward`, `all_reduce`, `barrier`, `print`, `device`, `global_rank`.
Neither SUPREME, Lightning nor wandb is imported (wandb's config is updated only when the caller
has imported it).  Each function returns the model as SUPREME's does.  As every jit_unlearn method
(`_safety.protected`), it checks its arguments before anything changes, and if it fails
(KeyboardInterrupt included) it leaves the parameters, buffers, the caller's `.grad` and the
train/eval flags bitwise as they were; a run that would write NaN or inf into the parameters or
buffers raises FloatingPointError instead.

Agreement with SUPREME (one process; docs/METHODS.md §1-2 hold the maths):
- ssd, lfssd: bitwise (`jit_unlearn.ssd` / `lf_ssd`: the published batch-average importances).
- assd: bitwise; alpha is SUPREME's (numpy percentile of the finite ratios at 100 - ln(1 + 100 n_f/n),
  n_f and n the loaders' dataset sizes, rounded to float32; 99 when no ratio is finite), lambda is
  `dampening_constant`.
- ssd_det, lfssd_det: float tolerance (vectorised per-sample gradients instead of one backward
  pass per sample).
- jit: bitwise; SUPREME's JiT differs from the published one (gradients zeroed every batch, the
  perturbed outputs taken from an eval-mode copy of the model synced at the start of each batch,
  the model in train mode, `n_epochs` passes), and that is what runs.  The eval-mode copy shares
  the parameters instead of reloading them every batch.  `jit_unlearn_mode="default"` in kwargs
  runs jit_unlearn's fast default JiT instead (eval mode, counter-based noise, fused ops; seed from
  kwargs["seed"], default 0), which is not SUPREME's result.
The SSD family computes on the unwrapped module, in the parameters' dtype (a Fabric precision
plugin's autocast is not applied; SUPREME's forward passes go through the Fabric module).  Under
torch.distributed its importances are summed over every rank's batches and divided by their total
count (one process's batch average over all the data), where SUPREME averages each rank's average
of squared DDP-averaged gradients.  jit runs SUPREME's loop through the Fabric module as SUPREME
does.  Only the single-process case is tested.

Registration: SUPREME resolves methods by name, and its CLI accepts only its own method names (the
`-method` choices are fixed before plugins load).  Installed jit_unlearn declares a `supreme.plugins`
entry point that routes the names listed in the environment variable JIT_UNLEARN_SUPREME
(comma-separated, or "all") to these functions; in a script, call `register()`.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader

import jit_unlearn

from .. import _checks as checks
from .._safety import BatchChecks, protected
from .._utils import batch_input
from ._common import trainable, unwrap
from ._supreme_jit import EvalTwin, supreme_jit_epoch

__all__ = ["jit", "ssd", "lfssd", "assd", "ssd_det", "lfssd_det", "register", "plugin_setup", "METHODS", "ENV_VAR"]

METHODS = ("jit", "ssd", "lfssd", "assd", "ssd_det", "lfssd_det")
ENV_VAR = "JIT_UNLEARN_SUPREME"
_FABRIC_MEMBERS = ("setup", "backward", "all_reduce", "barrier", "print", "device", "global_rank")


def _check_fabric(fabric) -> None:
    missing = [m for m in _FABRIC_MEMBERS if not hasattr(fabric, m)]
    if missing:
        raise TypeError(
            f"fabric: lacks {missing}; pass a lightning Fabric or an object with {', '.join(_FABRIC_MEMBERS)}"
        )


def _check_loader(loader, name: str):
    if loader is None or not hasattr(loader, "__iter__"):
        raise TypeError(f"{name}: expected a DataLoader of (x, index, y) batches, got {type(loader).__name__}")
    return loader


def _plain_loader(loader):
    """The DataLoader inside lightning's Fabric loader wrapper, so that jit_unlearn reads it directly
    (its fast path for tensor datasets then applies); anything else as it is.

    The wrapper only sets its sampler's epoch (a sampler with `set_epoch`: then it is kept), counts
    its iterations (counted here as if it had been read) and moves batches to the device (the
    importance pass moves them to the model's device itself)."""
    inner = getattr(loader, "_dataloader", None)
    count = getattr(loader, "_num_iter_calls", None)
    if not isinstance(inner, DataLoader) or isinstance(count, bool) or not isinstance(count, int):
        return loader
    if any(callable(getattr(getattr(inner, attr, None), "set_epoch", None)) for attr in ("sampler", "batch_sampler")):
        return loader
    loader._num_iter_calls = count + 1
    return inner


def _log_config(fabric, enabled: bool, config: dict) -> None:
    """SUPREME's wandb.config.update on rank 0, when the caller's process has wandb imported."""
    wandb = sys.modules.get("wandb")
    if enabled and fabric.global_rank == 0 and wandb is not None and getattr(wandb, "config", None) is not None:
        wandb.config.update(config)


# ---------------------------------------------------------------- SSD family


def _placed(fabric, model, kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """SUPREME's placement of a parameter-surgery method's model: set up with Fabric under "ddp"
    (the default), else moved to fabric.device unwrapped.  Returns (what to return, what to compute on)."""
    raw = unwrap(checks.model(model))
    if kwargs.get("distributed_strategy_name", "ddp") != "ddp":
        placed = raw.to(fabric.device)
    else:
        placed = fabric.setup(raw)
        if isinstance(placed, (tuple, list)):  # a stand-in that always returns a tuple
            placed = placed[0]
    return placed, unwrap(placed)


def _supreme_assd_alpha(fabric, imp_f, imp_d, n_forget: int, n_full: int) -> float:
    """ASSD's threshold as SUPREME computes it: numpy's percentile of the finite ratios I_f / I_D at
    100 - ln(1 + (n_forget / n_full) * 100), passed through a float32 tensor; 99.0 when no ratio
    is finite."""
    pieces = []
    with torch.no_grad():
        for name in imp_f:
            ratio = imp_f[name].div(imp_d[name])
            ratio = ratio[torch.isfinite(ratio)]
            if ratio.numel():
                pieces.append(ratio.reshape(-1).cpu().numpy())
    if not pieces:
        fabric.print("assd: no finite importance ratio; alpha falls back to 99.0 as in SUPREME")
        return 99.0
    percentile = 100 - np.log(1 + (n_forget / n_full) * 100)
    threshold = float(np.nanpercentile(np.concatenate(pieces), percentile))
    return torch.tensor([threshold], dtype=torch.float32).item()


def _dataset_size(loader, name: str) -> int:
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name}: assd needs a DataLoader with a sized .dataset (SUPREME reads len(loader.dataset))")
    return len(dataset)


def _assd_dampen(fabric, net: torch.nn.Module, forget, full, lam: float, sizes: tuple[int, int]) -> None:
    """SUPREME's assd on `net`: Fisher importances on both loaders, its adaptive alpha, one dampening."""
    imp_f = jit_unlearn.importances(net, forget, kind="fisher", progress=False, name="forget_train_dataloader")
    imp_d = jit_unlearn.importances(net, full, kind="fisher", progress=False, name="full_train_dataloader")
    for imp, name in ((imp_f, "forget_train_dataloader"), (imp_d, "full_train_dataloader")):
        if imp.invalid:
            raise ValueError(f"{name}: importances hold NaN or inf in {imp.invalid[:3]}; nothing was changed")
    alpha = _supreme_assd_alpha(fabric, imp_f, imp_d, *sizes)
    fabric.print(f"assd: adaptive selection_weighting (alpha) {alpha:.6f}")
    named = list(net.named_parameters())
    params, forget_imp, full_imp = [p for _, p in named], [imp_f[n] for n, _ in named], [imp_d[n] for n, _ in named]
    with torch.no_grad():
        jit_unlearn.ops.ssd_dampen_(params, forget_imp, full_imp, alpha, lam, 1.0)


def _ssd_method(name: str, *, kind: str, per_sample: bool, doc: str):
    """SUPREME's parameter-surgery method `name`, with its signature: `jit_unlearn.ssd` / `lf_ssd` with
    the importances of `kind` (per sample or not), or SUPREME's assd (name "assd")."""

    def method(
        fabric,
        num_gpus: int,
        wandb_logging_flag: bool,
        model: torch.nn.Module,
        forget_train_dataloader,
        full_train_dataloader,
        dampening_constant: float,
        selection_weighting: float,
        **kwargs,
    ) -> torch.nn.Module:
        _check_fabric(fabric)
        lam = checks.real(dampening_constant, "dampening_constant", low=0.0)
        alpha = checks.real(selection_weighting, "selection_weighting", low=0.0, low_open=name != "assd")
        forget = _check_loader(forget_train_dataloader, "forget_train_dataloader")
        full = _check_loader(full_train_dataloader, "full_train_dataloader")
        if name == "assd":
            sizes = (_dataset_size(forget, "forget_train_dataloader"), _dataset_size(full, "full_train_dataloader"))
        placed, net = _placed(fabric, model, kwargs)
        forget, full = _plain_loader(forget), _plain_loader(full)
        _log_config(
            fabric,
            wandb_logging_flag,
            {
                "optimizer": "SGD",
                "learning_rate": 0.1,
                "dampening_constant": lam,
                ("selection_weighting_initial" if name == "assd" else "selection_weighting"): alpha,
                "lower_bound": 1,
                "exponent": 1,
                "backend": "jit_unlearn",
            },
        )
        fabric.barrier()

        def body(snapshot) -> torch.nn.Module:
            placed.eval()
            if name == "assd":
                _assd_dampen(fabric, net, forget, full, lam, sizes)
            else:
                run = jit_unlearn.lf_ssd if kind == "output_norm" else jit_unlearn.ssd
                run(net, forget, full, alpha=alpha, lam=lam, per_sample=per_sample, progress=False)
            return placed

        return protected(net, body, method=name)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return method


ssd = _ssd_method(
    "ssd",
    kind="fisher",
    per_sample=False,
    doc="""SUPREME's `ssd`: Selective Synaptic Dampening with lambda = dampening_constant and alpha =
    selection_weighting (> 0); importances are batch averages of squared cross-entropy gradients on
    the forget and the full training loaders, model in eval mode.  Returns the (Fabric-set-up) model.""",
)
lfssd = _ssd_method(
    "lfssd",
    kind="output_norm",
    per_sample=False,
    doc="SUPREME's `lfssd`: `ssd` with the label-free importances (|gradient| of mean_i ||f(x_i)||^2).",
)
ssd_det = _ssd_method(
    "ssd_det",
    kind="fisher",
    per_sample=True,
    doc="SUPREME's `ssd_det`: `ssd` with per-sample importances (1/n) sum_i g_i^2, independent of batching.",
)
lfssd_det = _ssd_method(
    "lfssd_det",
    kind="output_norm",
    per_sample=True,
    doc="SUPREME's `lfssd_det`: `lfssd` with per-sample importances (1/n) sum_i |g_i|.",
)
assd = _ssd_method(
    "assd",
    kind="fisher",
    per_sample=False,
    doc="""SUPREME's `assd`: SSD with alpha chosen from the importances (see the module docstring);
    `selection_weighting` is only the logged initial value, lambda is `dampening_constant`.""",
)


# ---------------------------------------------------------------- JiT


def jit(
    fabric,
    num_gpus: int,
    wandb_logging_flag: bool,
    model: torch.nn.Module,
    forget_train_dataloader,
    n_epochs: int = 1,
    n_samples: int = 10,
    learning_rate: float = 0.001,
    jit_weighting: float = 0.1,
    **kwargs,
) -> torch.nn.Module:
    """SUPREME's `jit` (zero-shot Lipschitz unlearning) for `n_epochs` passes over the forget loader.

    Per batch x: gradients zeroed; f(x) with the model in train mode; N = n_samples perturbed
    copies clamp(x + jit_weighting * randn, min(x), max(x)) (torch.randn, global CPU generator) go
    through an eval-mode copy of the model as it was at the start of the batch; loss =
    (1/N) sum_n |sum_i ||f(x_i) - f'(x~_ni)|| / ||x_i - x~_ni|| |; fabric.backward; one SGD step
    with learning_rate.  The model is left in train mode.  Returns the Fabric-set-up model.
    A batch holding NaN or inf raises ValueError naming it; a run that would write inf or NaN into
    the parameters raises FloatingPointError; either way the model is restored.
    """
    _check_fabric(fabric)
    checks.integer(n_epochs, "n_epochs", low=0)
    checks.integer(n_samples, "n_samples", low=1)
    lr = checks.real(learning_rate, "learning_rate", low=0.0)
    sigma = checks.real(jit_weighting, "jit_weighting", low=0.0, low_open=True)
    loader = _check_loader(forget_train_dataloader, "forget_train_dataloader")
    mode = checks.choice(kwargs.get("jit_unlearn_mode", "supreme"), "jit_unlearn_mode", ("supreme", "default"))
    seed = checks.integer(kwargs.get("seed", 0), "seed") if mode == "default" else 0
    raw = unwrap(checks.model(model))
    if not trainable(raw):
        raise ValueError("model: has no trainable parameters")
    sgd = torch.optim.SGD(raw.parameters(), lr=lr)
    wrapped, sgd = fabric.setup(raw, sgd)
    net, device = unwrap(wrapped), fabric.device

    def body(snapshot) -> torch.nn.Module:
        if mode == "default":
            for epoch in range(n_epochs):
                inputs = (batch_input(b, name="forget_train_dataloader") for b in loader)
                jit_unlearn.jit(
                    net, inputs, sigma=sigma, lr=lr, num_samples=n_samples, seed=seed + epoch, progress=False
                )
            return wrapped
        twin = EvalTwin(net)
        data = BatchChecks("forget_train_dataloader")
        for epoch in range(n_epochs):
            loss_sum, batches = supreme_jit_epoch(fabric, wrapped, twin, sgd, loader, n_samples, sigma, device, data)
            data.verify()
            totals = torch.stack([loss_sum, torch.tensor(float(batches), dtype=torch.float64, device=device)])
            reduced = fabric.all_reduce(totals)
            total_loss, total_batches = (totals if reduced is None else reduced).tolist()
            fabric.print(f"JIT epoch {epoch + 1}/{n_epochs}: mean loss {total_loss / max(total_batches, 1):.6f}")
        return wrapped

    return protected(net, body, method="jit", hint="a smaller learning_rate or a larger jit_weighting may help")


# ---------------------------------------------------------------- registration with SUPREME


def _names(methods) -> list[str]:
    names = list(METHODS) if methods in (None, "all") else list(methods)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown names {unknown}; choose from {list(METHODS)}")
    return names


def register(methods=None) -> list[str]:
    """Route SUPREME's methods of these names to this module, through its runtime registry
    (`supreme.register_unlearning_method`), for the current process.

    Args:
        methods: an iterable of names from METHODS, or None / "all" for every one.
    Returns:
        the names registered.
    """
    names = _names(methods)
    try:
        import supreme
    except ImportError as exc:
        raise ImportError("register: SUPREME is not installed (pip install supreme-unlearning)") from exc
    for name in names:
        supreme.register_unlearning_method(name, f"{__name__}:{name}")
    return names


def plugin_setup() -> None:
    """The `supreme.plugins` entry point: registers the methods listed in the environment variable
    JIT_UNLEARN_SUPREME ("all", or names separated by commas); nothing when it is unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return
    try:
        names = _names("all" if value == "all" else [v.strip() for v in value.split(",") if v.strip()])
    except ValueError as exc:
        raise ValueError(f"{ENV_VAR}={value!r}: {exc}") from None
    register(names)
