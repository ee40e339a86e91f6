"""DEL's localization (docs/METHODS.md §3 steps 1-3): score every parameter entry on the forget set, group
the scores by channel, and select the top budget fraction as a `Mask`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import _checks as checks
from ..._precision import Precision, graded_forward, resolve
from ..._safety import BatchChecks
from ..._utils import batch_input, batch_labels, check_logits, model_device, module_mode, seeded_batches
from ..._utils import progress as _progress
from .mask import Mask
from .reference import check_mode, reference_batches, reference_mask, reference_scores

__all__ = ["localize", "mask_from_scores", "CRITERIA", "GRANULARITIES"]

CRITERIA = ("weighted_grad", "grad", "random")
GRANULARITIES = ("channel", "parameter")


def _scored_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    if not named:
        raise ValueError("model: has no trainable floating-point parameters to localize")
    return named


def _score_dtype(params) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _element_scores(
    model: nn.Module,
    params: list[nn.Parameter],
    forget,
    criterion: str,
    seed: int,
    batch_size,
    show: bool,
    precision: Precision | None = None,
) -> list[torch.Tensor]:
    """Per-element scores, one tensor per parameter (docs/METHODS.md §3 step 1, or the saliency /
    random controls); the forward and backward run as `precision` says."""
    dtype = _score_dtype(params)
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.rand(p.shape, generator=g, dtype=dtype).to(p.device) for p in params]
    batches = seeded_batches(forget, batch_size, "forget")
    device = model_device(model)
    acc = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in params]
    seen = 0
    data = BatchChecks("forget")
    with module_mode(model, False), torch.enable_grad():
        for batch in _progress(batches, enabled=show, desc="DEL localize"):
            x = data.inputs(batch_input(batch, name="forget"), seen).to(device)
            out = check_logits(graded_forward(model, x, precision), x.shape[0])
            y = data.labels(batch_labels(batch, name="forget"), seen, x.shape[0], out.shape[1]).to(device)
            loss = F.cross_entropy(out, y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g)
            seen += 1
    if seen == 0:
        raise ValueError("forget: yields no batches (empty)")
    data.verify()
    # S sums the gradients of L_b = -CE_b; the negation is exact, so |S| and |θ ⊙ S| need no sign.
    if criterion == "weighted_grad":
        return [a.mul_(p.detach()).abs_() for a, p in zip(acc, params)]
    return [a.abs_() for a in acc]


def _groups(scores: list[torch.Tensor], granularity: str, top_fraction: float | None):
    """Run-length form of the ranked scores: per tensor (values, group size).

    "channel": a tensor with >= 2 dims is viewed [C_out, -1]; each row is one group scored by the mean
    of its top-h entries, h = max(1, int(top_fraction * C_out)) capped at the row length (the plain
    row mean when top_fraction is None).  1-D tensors, and every tensor under "parameter", are groups
    of one element.  Groups are contiguous runs of the flattened parameter order."""
    out = []
    for s in scores:
        if granularity == "channel" and s.dim() >= 2:
            rows = s.reshape(s.shape[0], -1)
            if top_fraction is None:
                values = rows.mean(dim=1)
            else:
                h = min(max(1, int(top_fraction * rows.shape[0])), rows.shape[1])
                values = rows.topk(h, dim=1, sorted=False).values.mean(dim=1)
            out.append((values, rows.shape[1]))
        else:
            out.append((s.reshape(-1), 1))
    return out


def _select(groups, k: int) -> list[torch.Tensor]:
    """Global top-k over elements, highest score first, ties broken by the lower flat index.

    Returns per tensor the number of entries selected in each group (0 ... group size).  Every group
    is a contiguous run of flat indices, so ranking groups by (score desc, start index) and filling
    the budget group by group selects exactly the elements an element-level stable sort would."""
    values = torch.cat([v for v, _ in groups])
    if not bool(torch.isfinite(values).all()):
        raise RuntimeError("localize: the scores are not finite (the forget-set gradients overflowed or are NaN)")
    counts = [v.numel() for v, _ in groups]
    if all(size == 1 for _, size in groups):
        picked = _select_elements(values, k).to(torch.int64)
    else:
        sizes = torch.cat(
            [torch.full((v.numel(),), size, dtype=torch.int64, device=values.device) for v, size in groups]
        )
        order = torch.sort(values, descending=True, stable=True).indices
        ranked = sizes[order]
        before = torch.cumsum(ranked, 0) - ranked
        taken = torch.minimum((k - before).clamp_(min=0), ranked)
        picked = torch.empty_like(taken)
        picked[order] = taken
    return list(picked.split(counts))


def _select_elements(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean top-k of a flat tensor in O(P): the k-th largest value by selection, then the ties at
    that value in index order."""
    total = values.numel()
    if k <= 0:
        return torch.zeros(total, dtype=torch.bool, device=values.device)
    if k >= total:
        return torch.ones(total, dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(values, total - k + 1).values
    keep = values > threshold
    need = k - int(keep.sum())
    keep[torch.nonzero(values == threshold).flatten()[:need]] = True
    return keep


def localize(
    model: nn.Module,
    forget,
    *,
    criterion: str = "weighted_grad",
    granularity: str = "channel",
    budget: float = 0.3,
    top_fraction: float | None = 0.1,
    seed: int = 0,
    batch_size: int | None = None,
    mode: str = "default",
    progress: bool = True,
    precision: str = "float32",
) -> Mask:
    """Select the ⌊budget·P⌋ parameter entries most critical to the forget set (docs/METHODS.md §3).

    Args:
        model: classifier returning [B, K] logits (or an output holding them as `.logits`).  Its
            trainable floating parameters (P entries in all) are scored; the model is not modified
            (scoring runs in eval mode, grads are not stored).
        forget: DataLoader / Dataset / tensors yielding (x, y) batches, y int64 [B].  Not read for
            criterion="random" (may be None).
        criterion: "weighted_grad" |θ ⊙ Σ_b ∇θ(−CE_b)| (DEL), "grad" |Σ_b ∇θ CE_b| (SalUn saliency),
            or "random" (uniform scores from `seed`, a control).  CE_b is the batch-mean cross-entropy.
        granularity: "channel" (rows of [C_out, -1] take the mean of their top-h scores,
            h = max(1, int(top_fraction·C_out)); 1-D parameters per element) or "parameter".
        budget: ρ in (0, 1]; exactly int(ρ·P) entries are selected, ties going to the lower index in
            named_parameters() order.
        top_fraction: in (0, 1], or None for the plain row mean (transformer-class models).
        seed: seeds the random criterion.
        batch_size: batch size for tensor / Dataset input (a DataLoader is used as is).
        mode: "default", or "reference" for the published code's scoring and ranking
            (docs/METHODS.md §3.2; "weighted_grad" and "grad" only): scores add θ ⊙ ∇θ(−CE_b) (or
            ∇θ(−CE_b)) batch by batch in the parameter dtype, rows take the mean of their sorted
            `torch.topk`, and the selection is the first int(budget·P) positions of `torch.argsort`
            of the negated flat scores (its own order among ties).  h = max(1, ·) in both modes.
        precision: what the scoring pass runs in: "float32" (the model's dtype; the default),
            "bfloat16" (forward and backward under autocast, channels_last inputs for conv nets;
            gradients and scores stay float32), "float16" (CUDA only; changes nothing here) or
            "auto" (bfloat16 where the hardware runs it fast).  Mode "reference" takes "float32"
            or "auto" (which then means float32).
    Returns:
        Mask with a torch.bool tensor per scored parameter, on the parameter's device.
    """
    checks.choice(criterion, "criterion", CRITERIA)
    checks.choice(granularity, "granularity", GRANULARITIES)
    budget = checks.real(budget, "budget", low=0.0, high=1.0, low_open=True)
    if top_fraction is not None:
        top_fraction = checks.real(top_fraction, "top_fraction", low=0.0, high=1.0, low_open=True)
    checks.integer(seed, "seed", low=0)
    checks.model(model)
    check_mode(mode, criterion=criterion)
    prec = resolve(precision, model, plain="mode='reference' (the published code)" if mode == "reference" else None)
    named = _scored_parameters(model)
    if mode == "reference":
        batches = reference_batches(forget, batch_size, "forget")
        scores = reference_scores(model, [p for _, p in named], batches, criterion, progress)
        return reference_mask([n for n, _ in named], scores, granularity, budget, top_fraction)
    scores = _element_scores(model, [p for _, p in named], forget, criterion, seed, batch_size, progress, prec)
    return mask_from_scores([n for n, _ in named], scores, granularity, budget, top_fraction)


def mask_from_scores(
    names: list[str], scores: list[torch.Tensor], granularity: str, budget: float, top_fraction: float | None
) -> Mask:
    """docs/METHODS.md §3 steps 2-3 on per-element scores (one tensor per parameter, in parameter order)."""
    groups = _groups(scores, granularity, top_fraction)
    picked = _select(groups, int(budget * sum(s.numel() for s in scores)))
    masks = {}
    for name, s, (_, size), n in zip(names, scores, groups, picked):
        if size == 1:
            masks[name] = (n > 0).view(s.shape)
        else:
            row = torch.arange(size, device=n.device)
            masks[name] = (row.unsqueeze(0) < n.unsqueeze(1)).view(s.shape)
    return Mask(masks)
