"""Comparisons of a model with another one (the retrained model, an incompetent teacher): ZRF, JS
divergence, activation distance and parameter distance; the average gap of two evaluation rows."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .. import _checks as checks
from .._utils import as_batches, batch_input, check_logits, model_device, module_mode

EVAL_BATCH_SIZE = 512
# The rows' keys that `avg_gap` averages by default: forget / retain / test accuracy and the MIA.
AVG_GAP_KEYS = ("forget_acc", "retain_acc", "test_acc_remaining", "entropy_mia")


def _paired_log_probs(
    model_a: nn.Module, model_b: nn.Module, data, *, names: tuple[str, str], data_name: str, batch_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax of both models' logits [N, K], float64 on the CPU, from one no-grad pass over
    `data` in which each batch goes through both models (each in eval mode on its own device, modes
    restored afterwards), so a shuffling DataLoader still pairs the same samples."""
    checks.module(model_a, names[0])
    checks.module(model_b, names[1])
    if batch_size is None and not isinstance(data, DataLoader):
        batch_size = EVAL_BATCH_SIZE
    # A private generator: iterating a DataLoader otherwise draws its base seed from the global RNG.
    batches = as_batches(data, batch_size, name=data_name, generator=torch.Generator())
    device_a, device_b = model_device(model_a), model_device(model_b)
    outs_a, outs_b = [], []
    with torch.no_grad(), module_mode(model_a, False), module_mode(model_b, False):
        for batch in batches:
            x = batch_input(batch, name=data_name)
            out_a = check_logits(model_a(x.to(device_a)), x.shape[0], name=names[0])
            out_b = check_logits(model_b(x.to(device_b)), x.shape[0], name=names[1])
            if out_a.shape != out_b.shape:
                raise ValueError(
                    f"{names[1]}: returns logits of shape {tuple(out_b.shape)}, {names[0]} {tuple(out_a.shape)}"
                )
            outs_a.append(out_a.detach().to("cpu", torch.float64))
            outs_b.append(out_b.detach().to("cpu", torch.float64))
    if not outs_a:
        raise ValueError(f"{data_name}: yields no batches (empty)")
    logits_a, logits_b = torch.cat(outs_a), torch.cat(outs_b)
    for logits, name in ((logits_a, names[0]), (logits_b, names[1])):
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"{name}: produces non-finite logits on the {data_name} set")
    return F.log_softmax(logits_a, dim=-1), F.log_softmax(logits_b, dim=-1)


def _js_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """JS(p ‖ q) per row in nats, from log-probabilities [N, K] -> [N], clamped to [0, ln 2]
    (rounding can leave a value a few ulps outside)."""
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_(0.0, math.log(2.0))


def js_divergence(model_a: nn.Module, model_b: nn.Module, loader, *, batch_size: int | None = None) -> float:
    """Mean Jensen-Shannon divergence between the two models' softmax outputs over the samples of
    `loader`:  (1/N) Σ_i JS(p_i ‖ q_i),  p_i = softmax(model_a(x_i)), q_i = softmax(model_b(x_i)),
    JS(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = ½ (p + q),  natural logarithm, so each term lies in
    [0, ln 2].  Source: the ZRF of Chundawat et al. 2023 ("Can Bad Teaching Induce Forgetting?").

    Args:
        model_a, model_b: classifiers returning [B, K] logits (same K); each runs in eval mode
            without autograd on its own device, and gets its modes back afterwards.
        loader: a DataLoader (used as is, each batch fed to both models; `batch_size` must then be
            None), or a Dataset / input tensor batched by `batch_size` (default 512).  Labels are
            not read.
    Returns:
        A float in [0, ln 2], computed in float64.
    """
    log_p, log_q = _paired_log_probs(
        model_a, model_b, loader, names=("model_a", "model_b"), data_name="loader", batch_size=batch_size
    )
    return float(_js_rows(log_p, log_q).mean())


def zrf(model: nn.Module, incompetent: nn.Module, forget, *, batch_size: int | None = None) -> float:
    """Zero Retrain Forgetting score:  1 − (1/N_f) Σ_i JS(softmax(model(x_i)) ‖ softmax(incompetent(x_i)))
    over the forget samples x_i (natural logarithm; see `js_divergence`).  1 means the model
    answers on the forget set like the incompetent (randomly initialised) model; lower values mean
    it still differs from it.  The range is [1 − ln 2, 1].

    Source: Chundawat et al. 2023, "Can Bad Teaching Induce Forgetting? Unlearning in Deep Networks
    Using an Incompetent Teacher" (AAAI), the ZRF metric.  Their code takes `F.kl_div` with its
    default element-mean reduction on KL(m ‖ ·), which is not the divergence their paper defines; this
    function computes the paper's definition.

    Args:
        model: the unlearned classifier; incompetent: a randomly initialised model of the same
            architecture (same K).  Both run in eval mode without autograd, modes restored.
        forget: a DataLoader, Dataset or input tensor of forget samples (labels are not read).
    Returns:
        A float in [1 − ln 2, 1].
    """
    log_p, log_q = _paired_log_probs(
        model, incompetent, forget, names=("model", "incompetent"), data_name="forget", batch_size=batch_size
    )
    return 1.0 - float(_js_rows(log_p, log_q).mean())


def activation_distance(model_a: nn.Module, model_b: nn.Module, loader, *, batch_size: int | None = None) -> float:
    """Mean L2 distance between the two models' softmax outputs over the samples of `loader`:
    (1/N) Σ_i ‖softmax(model_a(x_i)) − softmax(model_b(x_i))‖₂.  0 for identical outputs, at most √2.

    Source: Chundawat et al. 2023 ("Can Bad Teaching Induce Forgetting?"), the activation distance
    to the retrained model (their code averages the same per-sample distances).

    Args:
        model_a, model_b: classifiers returning [B, K] logits (same K), run in eval mode without
            autograd, modes restored.
        loader: a DataLoader (each batch fed to both models), Dataset or input tensor.
    Returns:
        A float in [0, √2], computed in float64.
    """
    log_p, log_q = _paired_log_probs(
        model_a, model_b, loader, names=("model_a", "model_b"), data_name="loader", batch_size=batch_size
    )
    return float(torch.linalg.vector_norm(log_p.exp() - log_q.exp(), dim=-1).mean())


def layer_distance(
    model_a: nn.Module, model_b: nn.Module, *, per_layer: bool = False
) -> float | tuple[float, dict[str, float]]:
    """L2 distance between the parameters of two models of the same architecture:
    sqrt(Σ_l ‖θ_a,l − θ_b,l‖²) over every parameter tensor l (buffers such as BatchNorm running
    statistics are not parameters and are left out), computed in float64.

    Source: the layer-wise (weight) distance to the retrained model that unlearning comparisons
    report beside ZRF and the activation distance (the SUPREME toolkit ships one).

    Args:
        model_a, model_b: modules with the same parameter names and shapes (any devices).
        per_layer: also return the distance of each parameter tensor.
    Returns:
        The total distance as a float; with per_layer, (total, {parameter name: ‖θ_a,l − θ_b,l‖₂})
        in `named_parameters()` order.
    """
    checks.module(model_a, "model_a")
    checks.module(model_b, "model_b")
    checks.boolean(per_layer, "per_layer")
    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    if list(params_a) != list(params_b):
        missing = [n for n in params_a if n not in params_b] + [n for n in params_b if n not in params_a]
        raise ValueError(f"model_b: parameter names differ from model_a's (e.g. {missing[:5]})")
    squares = {}
    with torch.no_grad():
        for name, a in params_a.items():
            b = params_b[name]
            if a.shape != b.shape:
                raise ValueError(f"model_b: parameter {name!r} has shape {tuple(b.shape)}, model_a's {tuple(a.shape)}")
            diff = a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64)
            squares[name] = float(diff.pow(2).sum())
    total = math.sqrt(sum(squares.values()))
    if per_layer:
        return total, {name: math.sqrt(s) for name, s in squares.items()}
    return total


def avg_gap(row: Mapping, retrain_row: Mapping, *, keys: Sequence[str] = AVG_GAP_KEYS) -> float:
    """The "Avg. Gap" of Jia et al. 2023 ("Model Sparsity Can Simplify Machine Unlearning"): the mean
    absolute difference between a method's evaluation and the retrained model's,
    (1/|keys|) Σ_k |row[k] − retrain_row[k]|.

    The default keys are those of `evaluate`: "forget_acc", "retain_acc", "test_acc_remaining" (the
    test accuracy outside the forgotten classes; the plain test accuracy when no class is forgotten)
    and "entropy_mia": the paper's forget, retain and test accuracy and MIA efficacy (its forget
    accuracy enters as 1 − accuracy and its MIA counts non-members, which leaves every absolute
    difference unchanged).

    Args:
        row, retrain_row: mappings from metric name to a finite number (e.g. `evaluate` records);
            values in the rows' own units (fractions for `evaluate`).
        keys: the metric names to average, at least one.
    Returns:
        A float >= 0 in the rows' units.
    """
    for value, name in ((row, "row"), (retrain_row, "retrain_row")):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name}: expected a mapping of metric name -> number, got {type(value).__name__}")
    if isinstance(keys, str) or not isinstance(keys, Sequence) or len(keys) == 0:
        raise ValueError(f"keys: expected a non-empty sequence of metric names, got {keys!r}")
    gaps = []
    for key in keys:
        pair = []
        for source, name in ((row, "row"), (retrain_row, "retrain_row")):
            if key not in source:
                raise ValueError(f"{name}: has no {key!r} (keys: {sorted(source)})")
            value = source[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}[{key!r}]: expected a finite number, got {value!r}")
            pair.append(float(value))
        gaps.append(abs(pair[0] - pair[1]))
    return sum(gaps) / len(gaps)
