"""Drop-ins for the published research code, with its class names, constructor arguments, methods and
return values, computed by jit_unlearn:

- `ParameterPerturber`: the SSD repository's `ssd.ParameterPerturber` (`calc_importance`,
  `modify_weight`); `label_free=True` (or `LabelFreeParameterPerturber`) is the LF-SSD variant its
  README describes (loss `mean_i ||f(x_i)||^2`, importance `|g|`).
- `Lipschitz`: the JiT repository's `lipschitz.Lipschitz` (`modify_weight(forget_dl)`, and its
  label-free `calc_importance`).

Swap the import and keep the call sites (docs/METHODS.md §1 and §2 hold the maths):

    from jit_unlearn.integrations.published import ParameterPerturber   # was: from ssd import ...
    from jit_unlearn.integrations.published import Lipschitz            # was: from lipschitz import ...

Results are bitwise those of the published code: importances come from `jit_unlearn.importances`,
dampening from `jit_unlearn.ops.ssd_dampen_`, and the Lipschitz loop from
`jit_unlearn.jit(mode="reference")`.  (One exception: an `exponent` other than 1, which no
published script uses, may differ in the last bit where the compiled kernel's pow and torch.pow
round differently.)  Where the published code would silently compute something
else than that (a model in train mode during `calc_importance`, an optimizer that does not hold
every trainable parameter, `lower_bound != 1`) the drop-in raises ValueError instead.  It prints
nothing, and it refuses NaN, inf or negative importances instead of writing NaN into parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import jit_unlearn

from .. import _checks as checks
from .._safety import protected
from .._utils import batch_input
from ._common import check_importance_values, optimizer_params, trainable

__all__ = ["ParameterPerturber", "LabelFreeParameterPerturber", "Lipschitz"]

_DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Keys the published constructors read; the ones this package uses are checked, the rest are kept
# as attributes so code that reads them keeps working.
_SSD_KEYS = (
    "lower_bound",
    "exponent",
    "magnitude_diff",
    "min_layer",
    "max_layer",
    "forget_threshold",
    "dampening_constant",
    "selection_weighting",
)
_SSD_USED = ("lower_bound", "exponent", "dampening_constant", "selection_weighting")
_JIT_KEYS = (
    "lower_bound",
    "exponent",
    "min_layer",
    "max_layer",
    "dampening_constant",
    "selection_weighting",
    "n_epochs",
    "n_samples",
    "learning_rate",
    "use_quad_weight",
    "ewc_lambda",
    "lipschitz_weighting",
)
_JIT_USED = ("n_samples", "learning_rate", "lipschitz_weighting")


def _read_parameters(parameters, keys: tuple[str, ...], used: tuple[str, ...]) -> dict:
    if parameters is None:
        raise ValueError(f"parameters: a dict with the keys {list(used)} is required")
    if not isinstance(parameters, Mapping):
        raise TypeError(f"parameters: expected a dict, got {type(parameters).__name__}")
    missing = [k for k in used if k not in parameters]
    if missing:
        raise ValueError(f"parameters: missing the keys {missing}")
    return {k: parameters.get(k) for k in keys}


def _check_calc_importance(model: torch.nn.Module, opt) -> None:
    """The published calc_importance runs the model in whatever mode it is in and zeroes only the
    gradients `opt` holds; jit_unlearn.importances runs in eval mode with fresh gradients.  The two
    agree exactly when the model is in eval mode and `opt` holds every trainable parameter."""
    training = [name or "(root)" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"model: modules {training[:3]} are in train mode; call model.eval() before "
            "calc_importance (the published scripts do), since train-mode BatchNorm and Dropout "
            "would change the importances"
        )
    if opt is not None:
        held = optimizer_params(opt)
        if any(id(p) not in held for p in trainable(model)):
            raise ValueError(
                "opt: does not hold every trainable parameter of the model; the published "
                "calc_importance would then sum the other parameters' gradients across batches. "
                "Pass an optimizer over model.parameters()"
            )


def _importances(model: torch.nn.Module, opt, dataloader, kind: str) -> dict[str, torch.Tensor]:
    _check_calc_importance(model, opt)
    imp = jit_unlearn.importances(model, dataloader, kind=kind, progress=False, name="dataloader")
    try:
        expected = len(dataloader)
    except TypeError:  # no length: nothing to disagree with
        expected = imp.num_batches
    if expected != imp.num_batches:
        raise ValueError(
            f"dataloader: len() is {expected} but it yielded {imp.num_batches} batches; the published "
            "code divides by len(dataloader)"
        )
    return dict(imp)


class ParameterPerturber:
    """Selective Synaptic Dampening with the published `ParameterPerturber` interface.

    Args:
        model: the classifier to unlearn from (changed in place by `modify_weight`).
        opt: an optimizer over the model's parameters (the published code only calls its
            `zero_grad`); it must hold every trainable parameter.  None is accepted.
        device: where batches are moved before the forward pass (the published default: "cuda"
            when available, else "cpu").
        parameters: dict with the published keys; read are "selection_weighting" (alpha, >= 0),
            "dampening_constant" (lambda, >= 0), "exponent" (finite) and "lower_bound" (must be 1,
            the only value the published scripts use).  All keys become attributes as published.
        label_free: LF-SSD importances (loss mean_i ||f(x_i)||^2, accumulating |g|).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        opt,
        device=_DEFAULT_DEVICE,
        parameters: dict | None = None,
        *,
        label_free: bool = False,
    ):
        self.model = checks.module(model)
        self.opt = opt
        self.device = device
        self.alpha = None
        self.xmin = None
        self.label_free = checks.boolean(label_free, "label_free")
        for key, value in _read_parameters(parameters, _SSD_KEYS, _SSD_USED).items():
            setattr(self, key, value)
        if opt is not None:
            optimizer_params(opt)  # type check

    def calc_importance(self, dataloader) -> dict[str, torch.Tensor]:
        """Importances of every named parameter on `dataloader`, as the published method computes
        them: I = (1/len(dataloader)) sum_b g_b^2 (|g_b| when label-free), g_b the gradient of the
        batch-mean loss (cross-entropy, or the squared logit norm when label-free).

        Args:
            dataloader: yields (x, index, y) batches as the published datasets do ((x, y) works
                too; label-free needs only x).  The model must be in eval mode.
        Returns:
            dict parameter name -> tensor of the parameter's shape; `.grad` fields are left as
            they were.
        """
        return _importances(self.model, self.opt, dataloader, "output_norm" if self.label_free else "fisher")

    def modify_weight(
        self, original_importance: Mapping[str, torch.Tensor], forget_importance: Mapping[str, torch.Tensor]
    ) -> None:
        """Dampen the model in place: where I_f > alpha * I_D, theta *= min(((lambda * I_D) / I_f)^exponent, 1).

        As published, the two dicts are paired with `model.named_parameters()` by position (the
        shorter sequence ends the pairing); each tensor must have its parameter's shape and hold
        finite values >= 0.  Everything is checked before any parameter changes; if the dampening
        fails or is interrupted (KeyboardInterrupt included), the model is restored bitwise.
        """
        alpha = checks.real(self.selection_weighting, "parameters['selection_weighting']", low=0.0)
        lam = checks.real(self.dampening_constant, "parameters['dampening_constant']", low=0.0)
        exponent = checks.real(self.exponent, "parameters['exponent']")
        if checks.real(self.lower_bound, "parameters['lower_bound']") != 1.0:
            raise ValueError(
                f"parameters['lower_bound']: only 1 is supported (factors capped at 1), got {self.lower_bound}"
            )
        params, fs, ds = [], {}, {}
        for arg, given in (("original_importance", original_importance), ("forget_importance", forget_importance)):
            if not isinstance(given, Mapping):
                raise TypeError(f"{arg}: expected a dict name -> tensor, got {type(given).__name__}")
        for (name, p), (okey, o), (fkey, f) in zip(
            self.model.named_parameters(), original_importance.items(), forget_importance.items()
        ):
            for arg, key, t in (("original_importance", okey, o), ("forget_importance", fkey, f)):
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    raise TypeError(f"{arg}[{key!r}]: expected a floating-point tensor")
                if t.shape != p.shape:
                    raise ValueError(
                        f"{arg}[{key!r}]: shape {tuple(t.shape)} differs from parameter {name!r} {tuple(p.shape)}"
                    )
            params.append(p)
            ds[okey] = o.detach().to(p.device)
            fs[fkey] = f.detach().to(p.device)
        check_importance_values(ds, "original_importance")
        check_importance_values(fs, "forget_importance")

        def dampen(snapshot) -> None:
            with torch.no_grad():
                jit_unlearn.ops.ssd_dampen_(params, list(fs.values()), list(ds.values()), alpha, lam, exponent)

        return protected(self.model, dampen, method="modify_weight")


class LabelFreeParameterPerturber(ParameterPerturber):
    """`ParameterPerturber` with the LF-SSD importances (label_free=True), same arguments."""

    def __init__(self, model: torch.nn.Module, opt, device=_DEFAULT_DEVICE, parameters: dict | None = None):
        super().__init__(model, opt, device, parameters, label_free=True)


class Lipschitz:
    """JiT (zero-shot Lipschitz unlearning) with the published `Lipschitz` interface.

    Args:
        model: the classifier to unlearn from (changed in place by `modify_weight`).
        opt: the caller's optimizer; as published, `modify_weight` zeroes its gradients once and
            steps a plain SGD of its own.  None is accepted.
        device: where batches are moved (published default "cuda" when available, else "cpu").
        parameters: dict with the published keys; read are "lipschitz_weighting" (sigma, > 0),
            "learning_rate" (>= 0) and "n_samples" (N >= 1).  All keys become attributes.
    """

    def __init__(self, model: torch.nn.Module, opt, device=_DEFAULT_DEVICE, parameters: dict | None = None):
        self.model = checks.module(model)
        self.opt = opt
        self.device = device
        self.alpha = None
        self.xmin = None
        for key, value in _read_parameters(parameters, _JIT_KEYS, _JIT_USED).items():
            setattr(self, key, value)
        checks.real(self.lipschitz_weighting, "parameters['lipschitz_weighting']", low=0.0, low_open=True)
        checks.real(self.learning_rate, "parameters['learning_rate']", low=0.0)
        checks.integer(self.n_samples, "parameters['n_samples']", low=1)
        if opt is not None:
            optimizer_params(opt)
        self.report = None

    def calc_importance(self, dataloader) -> dict[str, torch.Tensor]:
        """The published class's label-free importances (see `ParameterPerturber.calc_importance`
        with label_free=True)."""
        return _importances(self.model, self.opt, dataloader, "output_norm")

    def modify_weight(self, forget_dl) -> None:
        """One pass of JiT over `forget_dl`, as published (docs/METHODS.md §1, reference semantics).

        Per batch x (moved to `device`; a 3-dim x is one sample and gets a batch dimension): N
        perturbed copies clamp(x + sigma * randn, min(x), max(x)) drawn with torch.randn from the
        global CPU generator, loss = (1/N) sum_n sum_i ||f(x_i) - f(x~_ni)|| / ||x_i - x~_ni||, one SGD
        step with learning_rate.  Gradients are zeroed once at the start and then accumulate across
        batches; the model's train/eval mode is used as it is.  Seed torch's global generator to
        reproduce a run.  The run's `JiTReport` is kept in `self.report`.
        Non-finite gradients raise FloatingPointError and restore the model.
        """
        params = trainable(self.model)
        if self.opt is not None:
            # The published loop clears only opt's gradients; a stale gradient elsewhere would join step 1.
            held = optimizer_params(self.opt)
            stale = [
                n
                for n, p in self.model.named_parameters()
                if p.requires_grad and id(p) not in held and p.grad is not None
            ]
            if stale:
                raise ValueError(
                    f"opt: does not hold the parameters {stale[:3]}, which carry gradients that the "
                    "published loop would add to its first step; zero them or pass an optimizer "
                    "over model.parameters()"
                )
        it = (self._input(batch) for batch in forget_dl)
        first = next(it, None)
        if first is None:  # the published loop then only zeroes opt's gradients
            if self.opt is not None:
                self.opt.zero_grad()
            return
        if not params:
            raise ValueError("model: has no trainable parameters")

        def batches():
            yield first
            yield from it

        self.report = jit_unlearn.jit(
            self.model,
            batches(),
            sigma=float(self.lipschitz_weighting),
            lr=float(self.learning_rate),
            num_samples=self.n_samples,
            mode="reference",
            progress=False,
        )

    def _input(self, batch) -> torch.Tensor:
        x = batch_input(batch, name="forget_dl").to(self.device)
        return x.unsqueeze(0) if x.dim() == 3 else x
