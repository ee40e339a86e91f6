"""Selective Synaptic Dampening (SSD), its label-free form (LF-SSD) and adaptive-alpha form (ASSD),
docs/METHODS.md §2: dampen the parameters far more important to the forget set than to the
whole training set."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .. import _checks as checks
from .. import _precision, ops
from .._safety import protected
from .._utils import as_batches, model_device
from ..importance import Importances, importances

__all__ = ["SSDReport", "dampen_", "ssd", "lf_ssd", "assd", "assd_alpha"]


@dataclass
class SSDReport:
    """What one SSD-family call did.

    selected maps each parameter name to its number of dampened elements; the importances are kept
    so that `full_importances` can be reused for the next deletion request; precision is what the
    importance passes ran in ("auto" resolved)."""

    method: str
    alpha: float
    lam: float
    exponent: float
    selected: dict[str, int]
    total_selected: int
    total_elements: int
    seconds: float
    importance_seconds: float
    dampen_seconds: float
    forget_importances: Importances = field(repr=False)
    full_importances: Importances = field(repr=False)
    precision: str = "float32"
    changed: bool = True  # whether any parameter changed (False comes with a RuntimeWarning)

    @property
    def selected_fraction(self) -> float:
        return self.total_selected / self.total_elements if self.total_elements else 0.0

    def __str__(self) -> str:
        hp = f"alpha {self.alpha:.4g}, lam {self.lam:.4g}" + (
            f", exponent {self.exponent:.4g}" if self.exponent != 1 else ""
        )
        if self.precision != "float32":
            hp += f", {self.precision} passes"
        times = (
            f"{self.seconds:.3g} s (importances {self.importance_seconds:.3g} s, dampening {self.dampen_seconds:.3g} s)"
        )
        tensors = {n: c for n, c in self.selected.items() if c}
        if not tensors:
            return f"{self.method} ({hp}): selected no parameter element; the model is UNCHANGED; {times}"
        top = sorted(tensors.items(), key=lambda kv: -kv[1])[:3]
        most = ", ".join(f"{n} {c:,}" for n, c in top)
        unchanged = "" if self.changed else "; no selected value changed: the model is UNCHANGED"
        return (
            f"{self.method} ({hp}): dampened {self.total_selected:,} of {self.total_elements:,} elements "
            f"({100 * self.selected_fraction:.3g}%) in {len(tensors)} of {len(self.selected)} tensors "
            f"(most: {most}){unchanged}; {times}"
        )


def _check_hparams(alpha, lam, exponent) -> tuple[float | None, float, float]:
    if alpha is not None:
        alpha = checks.real(alpha, "alpha", low=0, low_open=True)
    return alpha, checks.real(lam, "lam", low=0), checks.real(exponent, "exponent")


def _as_importances(imp, name: str, kind: str = "fisher") -> Importances:
    if isinstance(imp, Importances):
        return imp
    if isinstance(imp, Mapping):
        return Importances(imp, kind=kind)
    raise TypeError(f"{name}: expected Importances or a mapping name -> tensor, got {type(imp).__name__}")


def _checked(model: torch.nn.Module, imp, name: str, kind: str = "fisher") -> Importances:
    imp = _as_importances(imp, name, kind)
    imp.check(model, name=name)
    if imp.invalid:
        raise ValueError(
            f"{name}: holds NaN, inf or negative values in {imp.invalid[:5]}; refusing to dampen with them"
        )
    return imp


def _dampen(model, imp_f: Importances, imp_d: Importances, alpha: float, lam: float, exponent: float) -> dict[str, int]:
    """One ssd_dampen_ call over every parameter (arguments already checked)."""
    names, params, fs, ds = [], [], [], []
    for n, p in model.named_parameters():
        names.append(n)
        params.append(p)
        fs.append(imp_f[n] if imp_f[n].device == p.device else imp_f[n].to(p.device))
        ds.append(imp_d[n] if imp_d[n].device == p.device else imp_d[n].to(p.device))
    if not params:
        return {}
    with torch.no_grad():
        counts = ops.ssd_dampen_(params, fs, ds, alpha, lam, exponent)
    return dict(zip(names, counts.tolist()))


def dampen_(
    model: torch.nn.Module, imp_forget, imp_full, *, alpha: float, lam: float = 1.0, exponent: float = 1.0
) -> dict[str, int]:
    """Dampen `model` in place with one fused `ssd_dampen_` over all its parameters.

    Per element: if I_f > alpha * I_D then theta *= min(((lam * I_D) / I_f) ** exponent, 1).
    Args:
        imp_forget, imp_full: Importances (or mappings name -> tensor) with exactly the model's
            parameter names and shapes, finite and >= 0; moved to the parameters' device if needed.
        alpha: > 0.  lam: >= 0.  exponent: finite.
    Returns:
        the number of dampened elements per parameter name.
    Everything is checked before any parameter changes; no NaN or inf can be written.
    """
    alpha, lam, exponent = _check_hparams(alpha, lam, exponent)
    checks.model(model)
    # a plain mapping takes the kind of the other argument
    kind = next((i.kind for i in (imp_forget, imp_full) if isinstance(i, Importances)), "fisher")
    imp_f = _checked(model, imp_forget, "imp_forget", kind)
    imp_d = _checked(model, imp_full, "imp_full", kind)
    if imp_f.kind != imp_d.kind:
        raise ValueError(f"imp_full: kind {imp_d.kind!r} differs from imp_forget's kind {imp_f.kind!r}")
    return _dampen(model, imp_f, imp_d, alpha, lam, exponent)


def assd_alpha(imp_forget, imp_full, n_forget: int, n_full: int) -> float:
    """ASSD's adaptive alpha: the P-th percentile (linear interpolation, as numpy.percentile) of
    the finite ratios I_f / I_D over every element of every parameter, P = 100 - ln(1 + 100 *
    n_forget / n_full).  Ratios are computed in the importances' dtype (float32 for half types)."""
    checks.integer(n_forget, "n_forget", low=1)
    checks.integer(n_full, "n_full", low=1)
    imp_f, imp_d = _as_importances(imp_forget, "imp_forget"), _as_importances(imp_full, "imp_full")
    if list(imp_f) != list(imp_d) or any(imp_f[n].shape != imp_d[n].shape for n in imp_f):
        raise ValueError("imp_full: names or shapes differ from imp_forget")
    ratios = []
    for n in imp_f:
        f, d = imp_f[n], imp_d[n].to(imp_f[n].device)
        if f.dtype not in (torch.float32, torch.float64):
            f, d = f.float(), d.float()
        r = (f / d).flatten()
        ratios.append(r[torch.isfinite(r)])
    finite = torch.cat(ratios) if ratios else torch.empty(0)
    count = finite.numel()
    if count == 0:
        raise ValueError("imp_forget: no finite ratio I_f / I_D (every importance is zero); cannot choose alpha")
    percentile = 100.0 - math.log(1.0 + 100.0 * n_forget / n_full)
    pos = (count - 1) * (percentile / 100.0)
    lo = int(math.floor(pos))
    hi = min(lo + 1, count - 1)
    a = float(torch.kthvalue(finite, lo + 1).values)
    b = float(torch.kthvalue(finite, hi + 1).values) if hi != lo else a
    t = pos - lo
    # numpy's linear interpolation, evaluated from the nearer end
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


def _unlearn(
    method: str,
    model,
    forget,
    full,
    *,
    kind: str,
    alpha,
    lam,
    exponent,
    full_importances,
    per_sample,
    batch_size,
    progress,
    max_batch_elems,
    precision,
) -> SSDReport:
    alpha, lam, exponent = _check_hparams(alpha, lam, exponent)
    checks.model(model)
    checks.boolean(per_sample, "per_sample")
    prec = _precision.resolve(precision, model)
    if full_importances is not None:
        if isinstance(full_importances, Importances):  # a plain mapping records neither
            if full_importances.kind != kind:
                raise ValueError(f"full_importances: kind {full_importances.kind!r}, but {method} needs {kind!r}")
            if full_importances.per_sample != per_sample:
                raise ValueError(
                    f"full_importances: per_sample={full_importances.per_sample}, but this call "
                    f"has per_sample={per_sample}"
                )
        elif alpha is None:
            raise ValueError(
                "full_importances: assd needs the sample count |D| that Importances records, got a plain mapping"
            )
        full_importances = _checked(model, full_importances, "full_importances", kind)
    elif full is None:
        raise ValueError("full: required unless full_importances is given")
    forget_batches = as_batches(forget, batch_size, name="forget")
    full_batches = as_batches(full, batch_size, name="full") if full_importances is None else None
    device = model_device(model)
    opts = {
        "kind": kind,
        "per_sample": per_sample,
        "progress": progress,
        "max_batch_elems": max_batch_elems,
        "precision": prec.name,
    }

    def body(snapshot) -> SSDReport:
        start = time.perf_counter()
        imp_f = importances(model, forget_batches, name="forget", **opts)
        imp_d = (
            full_importances if full_importances is not None else importances(model, full_batches, name="full", **opts)
        )
        for imp, name in ((imp_f, "forget"), (imp_d, "full")):
            if imp.invalid:
                raise ValueError(
                    f"{name}: importances hold NaN or inf in {imp.invalid[:5]} "
                    f"(the model's gradients overflowed); nothing was changed"
                )
        a = assd_alpha(imp_f, imp_d, imp_f.num_samples, imp_d.num_samples) if alpha is None else alpha
        checks.sync(device)
        mid = time.perf_counter()
        selected = _dampen(model, imp_f, imp_d, a, lam, exponent)
        total_selected = sum(selected.values())
        changed = total_selected > 0 and snapshot.changed()
        if not changed:
            why = (
                f"no parameter element has I_f > alpha * I_D (alpha={a:.4g})"
                if total_selected == 0
                else f"the {total_selected} selected elements keep their values (factor min(lam * I_D / I_f, 1) = 1 "
                f"with lam={lam:.4g}, or the values are 0)"
            )
            warnings.warn(f"{method}: {why}; the model is unchanged", RuntimeWarning, stacklevel=5)
        end = time.perf_counter()
        return SSDReport(
            method=method,
            alpha=a,
            lam=lam,
            exponent=exponent,
            selected=selected,
            total_selected=total_selected,
            total_elements=sum(p.numel() for p in model.parameters()),
            seconds=end - start,
            importance_seconds=mid - start,
            dampen_seconds=end - mid,
            forget_importances=imp_f,
            full_importances=imp_d,
            precision=prec.name,
            changed=changed,
        )

    return protected(model, body, method=method)


def ssd(
    model: torch.nn.Module,
    forget,
    full=None,
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
    exponent: float = 1.0,
    full_importances=None,
    per_sample: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    max_batch_elems: int | None = None,
    precision: str = "float32",
) -> SSDReport:
    """Selective Synaptic Dampening, in place.

    Computes I_f on `forget` and I_D on `full` (retain + forget) with the Fisher importances of
    `importances` (model in eval mode), then `dampen_`s every parameter.
    Args:
        forget, full: DataLoaders (read in their order), Datasets or tensors of (x, y) batches; a
            Dataset or tensor is batched with `batch_size`.  `full` may be None when
            `full_importances` is given.
        alpha: selection threshold (> 0; 10 for ResNet-class models, 5 for ViT full-class).
        lam: dampening constant (>= 0).  exponent: power of the dampening factor.
        full_importances: precomputed I_D for this model (e.g. `report.full_importances` of an
            earlier call, or `Importances.load`): skips the full-data pass.
        per_sample: SSD-Det per-sample importances instead of the published batch average.
        precision: what the importance passes run in: "float32" (the model's dtype; the default),
            "bfloat16", "float16" (CUDA only; changes nothing here) or "auto" (see `importances`).
            Importances, their accumulation and the dampening stay float32.
    The model may return logits [B, K] as a tensor or in an output's `.logits` / "logits" (transformers'
    classifiers); labels must be integer class indices [B] in [0, K) (ValueError naming the batch
    otherwise, as for inputs holding NaN or inf).
    Returns:
        SSDReport; `changed` is False, with a RuntimeWarning, when no parameter changed (e.g. no
        element selected).  On any error (KeyboardInterrupt included) the model and the caller's
        `.grad` are restored bitwise.
    """
    return _unlearn(
        "ssd",
        model,
        forget,
        full,
        kind="fisher",
        alpha=alpha,
        lam=lam,
        exponent=exponent,
        full_importances=full_importances,
        per_sample=per_sample,
        batch_size=batch_size,
        progress=progress,
        max_batch_elems=max_batch_elems,
        precision=precision,
    )


def lf_ssd(
    model: torch.nn.Module,
    forget,
    full=None,
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
    exponent: float = 1.0,
    full_importances=None,
    per_sample: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    max_batch_elems: int | None = None,
    precision: str = "float32",
) -> SSDReport:
    """Label-free SSD (LF-SSD), in place: as `ssd`, with importances |grad| of the batch-mean squared
    logit norm.  Labels are never read, so loaders of bare input tensors work."""
    return _unlearn(
        "lf_ssd",
        model,
        forget,
        full,
        kind="output_norm",
        alpha=alpha,
        lam=lam,
        exponent=exponent,
        full_importances=full_importances,
        per_sample=per_sample,
        batch_size=batch_size,
        progress=progress,
        max_batch_elems=max_batch_elems,
        precision=precision,
    )


def assd(
    model: torch.nn.Module,
    forget,
    full=None,
    *,
    full_importances=None,
    per_sample: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    max_batch_elems: int | None = None,
    precision: str = "float32",
) -> SSDReport:
    """Adaptive SSD, in place: SSD with lam = 1 and alpha = `assd_alpha` of the two importances, with
    |D_f| and |D| the sample counts the importances were computed on."""
    return _unlearn(
        "assd",
        model,
        forget,
        full,
        kind="fisher",
        alpha=None,
        lam=1.0,
        exponent=1.0,
        full_importances=full_importances,
        per_sample=per_sample,
        batch_size=batch_size,
        progress=progress,
        max_batch_elems=max_batch_elems,
        precision=precision,
    )
