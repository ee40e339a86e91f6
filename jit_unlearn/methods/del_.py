"""DEL (Deletion by Example Localization): localize the parameters most critical to the forget set,
reset them to a fresh initialisation, and fine-tune only them on the retain set."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .. import ops
from .._utils import (as_batches, batch_input, batch_labels, check_logits, first_batch, model_device,
                      module_mode, params_finite, progress as _progress, restore_on_failure)

__all__ = ["Mask", "localize", "del_unlearn", "masked_finetune", "DELReport", "FinetuneReport"]

CRITERIA = ("weighted_grad", "grad", "random")
GRANULARITIES = ("channel", "parameter")
OBJECTIVES = ("finetune", "neggrad_plus", "relabel")
_MASK_FORMAT = "jit_unlearn.Mask"


class Mask(Mapping):
    """Boolean selection per parameter: name -> torch.bool tensor of that parameter's shape.

    True marks an entry that DEL resets and fine-tunes.  Names absent from the mask select nothing."""

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks: expected a mapping name -> bool tensor, got {type(masks).__name__}")
        self._masks: dict[str, torch.Tensor] = {}
        for name, m in masks.items():
            if not isinstance(name, str):
                raise TypeError(f"masks: keys must be parameter names (str), got {type(name).__name__}")
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                kind = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
                raise TypeError(f"masks[{name!r}]: expected a torch.bool tensor, got {kind}")
            self._masks[name] = m.detach()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return (f"Mask({len(self)} tensors, {self.count()}/{self.numel()} entries selected, "
                f"fraction {self.fraction():.4f})")

    def _names(self, name: str | None) -> list[str]:
        if name is None:
            return list(self._masks)
        if name not in self._masks:
            raise KeyError(f"name: {name!r} is not in the mask")
        return [name]

    def count(self, name: str | None = None) -> int:
        """Selected entries in one tensor, or in all of them when name is None."""
        return sum(int(self._masks[n].sum()) for n in self._names(name))

    def numel(self, name: str | None = None) -> int:
        """Entries in one tensor, or in all of them when name is None."""
        return sum(self._masks[n].numel() for n in self._names(name))

    def fraction(self, name: str | None = None) -> float:
        """Selected fraction of one tensor, or of all tensors together when name is None."""
        total = self.numel(name)
        return self.count(name) / total if total else 0.0

    def layer_fractions(self) -> dict[str, float]:
        """Selected fraction of every tensor, by name."""
        return {n: self.fraction(n) for n in self._masks}

    def to(self, device: torch.device | str) -> Mask:
        return Mask({n: m.to(device) for n, m in self._masks.items()})

    def check(self, model: nn.Module) -> None:
        """Raise ValueError unless every name is a parameter of `model` with the same shape."""
        params = dict(model.named_parameters())
        unknown = [n for n in self._masks if n not in params]
        if unknown:
            raise ValueError(f"mask: names that are not parameters of the model: {unknown[:5]}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        for n, m in self._masks.items():
            if m.shape != params[n].shape:
                raise ValueError(f"mask[{n!r}]: shape {tuple(m.shape)} differs from the parameter's "
                                 f"{tuple(params[n].shape)}")

    def save(self, path) -> None:
        torch.save({"format": _MASK_FORMAT, "version": 1,
                    "masks": {n: m.cpu() for n, m in self._masks.items()}}, path)

    @classmethod
    def load(cls, path, map_location: torch.device | str = "cpu") -> Mask:
        """Read a file written by `save` (tensors only; loaded with weights_only=True)."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _MASK_FORMAT or not isinstance(blob.get("masks"), dict):
            raise ValueError(f"path: {path!s} is not a file written by Mask.save")
        return cls(blob["masks"])


@dataclass
class FinetuneReport:
    objective: str
    epochs: int
    steps: int
    trainable: int            # entries that were allowed to change (mask | head)
    final_loss: float | None  # mean training loss over the last epoch
    seconds: float


@dataclass
class DELReport:
    mask: Mask
    fraction: float                        # selected fraction of all scored parameters
    layer_fractions: dict[str, float]
    masked: int                            # selected entries
    total: int                             # scored entries (all trainable floating parameters)
    head: str | None                       # module trained fully, if any
    epochs: int
    steps: int
    final_loss: float | None
    seconds_localize: float
    seconds_reset: float
    seconds_finetune: float
    seconds: float = field(init=False)

    def __post_init__(self):
        self.seconds = self.seconds_localize + self.seconds_reset + self.seconds_finetune


def _check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def _check_real(value, name: str, *, low: float, high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    bad = not math.isfinite(value) or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}: must be in {lo}{low}, {high if high is not None else 'inf'}{hi}, got {value}")
    return value


def _check_int(value, name: str, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    return value


def _loader(data, batch_size, name: str, *, shuffle: bool = False, seed: int = 0):
    """Batches of `data`; a DataLoader is used as is (batch_size applies to tensors and Datasets).
    Loaders built here own a seeded generator, so they never draw from the global RNG."""
    if data is None:
        raise ValueError(f"{name}: is required")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(data, DataLoader):
        batch_size = None
    return as_batches(data, batch_size, name=name, shuffle=shuffle, generator=generator)


def _check_labelled(batches, name: str) -> None:
    """The data yields at least one batch, and batches carry labels (checked before any change).
    A one-shot iterator is not peeked at (that would lose its first batch)."""
    if isinstance(batches, Iterator):
        return
    try:
        if len(batches) == 0:
            raise ValueError(f"{name}: yields no batches (empty)")
    except TypeError:
        pass
    batch_labels(first_batch(batches, name=name), name=name)


def _scored_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    if not named:
        raise ValueError("model: has no trainable floating-point parameters to localize")
    return named


def _score_dtype(params) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _element_scores(model: nn.Module, params: list[nn.Parameter], forget, criterion: str, seed: int,
                    batch_size, show: bool) -> list[torch.Tensor]:
    """Per-element scores, one tensor per parameter (§3 step 1, or the saliency / random controls)."""
    dtype = _score_dtype(params)
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.rand(p.shape, generator=g, dtype=dtype).to(p.device) for p in params]
    batches = _loader(forget, batch_size, "forget")
    device = model_device(model)
    acc = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in params]
    seen = 0
    with module_mode(model, False), torch.enable_grad():
        for batch in _progress(batches, enabled=show, desc="DEL localize"):
            x = batch_input(batch, name="forget").to(device)
            y = batch_labels(batch, name="forget").to(device)
            loss = F.cross_entropy(check_logits(model(x), x.shape[0]), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g)
            seen += 1
    if seen == 0:
        raise ValueError("forget: yields no batches (empty)")
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
        sizes = torch.cat([torch.full((v.numel(),), size, dtype=torch.int64, device=values.device)
                           for v, size in groups])
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


def localize(model: nn.Module, forget, *, criterion: str = "weighted_grad", granularity: str = "channel",
             budget: float = 0.3, top_fraction: float | None = 0.1, seed: int = 0, batch_size: int | None = None,
             progress: bool = True) -> Mask:
    """Select the ⌊budget·P⌋ parameter entries most critical to the forget set (ALGORITHMS.md §3).

    Args:
        model: classifier returning [B, K] logits.  Its trainable floating parameters (P entries in
            all) are scored; the model is not modified (scoring runs in eval mode, grads are not stored).
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
    Returns:
        Mask with a torch.bool tensor per scored parameter, on the parameter's device.
    """
    _check_choice(criterion, "criterion", CRITERIA)
    _check_choice(granularity, "granularity", GRANULARITIES)
    budget = _check_real(budget, "budget", low=0.0, high=1.0, low_open=True)
    if top_fraction is not None:
        top_fraction = _check_real(top_fraction, "top_fraction", low=0.0, high=1.0, low_open=True)
    _check_int(seed, "seed", low=0)
    named = _scored_parameters(model)
    scores = _element_scores(model, [p for _, p in named], forget, criterion, seed, batch_size, progress)
    return _mask_from_scores([n for n, _ in named], scores, granularity, budget, top_fraction)


def _mask_from_scores(names: list[str], scores: list[torch.Tensor], granularity: str, budget: float,
                      top_fraction: float | None) -> Mask:
    """§3 steps 2-3 on per-element scores (one tensor per parameter, in parameter order)."""
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


def _head_names(model: nn.Module, head) -> list[str]:
    """Parameter names of the named head module(s)."""
    if head is None:
        return []
    heads = [head] if isinstance(head, str) else list(head)
    names = []
    for h in heads:
        if not isinstance(h, str):
            raise TypeError(f"head: expected a module name (str) or a list of them, got {type(h).__name__}")
        try:
            module = model.get_submodule(h)
        except AttributeError:
            raise ValueError(f"head: the model has no submodule {h!r}") from None
        names += [f"{h}.{n}" if h else n for n, _ in module.named_parameters()]
    return names


def _last_linear(model: nn.Module) -> str:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError("head: the model has no nn.Linear to train as the classifier head; "
                         "name the head module or pass head_trainable=False")
    return name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(batches) -> Iterator:
    while True:
        yielded = False
        for batch in batches:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("forget: yields no batches (empty)")


def _finetune(model, mask: Mask, retain_batches, forget_batches, *, objective, lr, epochs, momentum,
              weight_decay, beta, seed, head_names, show) -> FinetuneReport:
    """SGD with momentum and cosine annealing (to 0.01·lr over every step) on the masked entries.

    Unmasked entries stay bitwise fixed by construction, at the cost of one `where` per masked tensor
    per step: the L2 term is added to the gradient and the result is zeroed outside the mask before it
    reaches the momentum buffer.  The buffer of an unmasked entry is then exactly 0 forever
    (0·momentum + 0), and p + (−lr)·0 = p + (−0) = p in IEEE arithmetic for every p, so neither weight
    decay nor momentum can move it.  This is cheaper than restoring from a saved copy (no second copy
    of the model, no extra full-tensor pass) and needs no assumption about torch.optim internals."""
    start = time.perf_counter()
    device = model_device(model)
    named = dict(model.named_parameters())
    head = set(head_names)
    train = []  # (param, mask or None for fully trainable)
    for name, p in named.items():
        if not p.requires_grad:
            continue
        if name in head:
            train.append((p, None))
        elif name in mask and bool(mask[name].any()):
            train.append((p, mask[name].to(p.device)))
    trainable = sum(p.numel() if m is None else int(m.sum()) for p, m in train)
    steps_per_epoch = len(retain_batches)
    total_steps = epochs * steps_per_epoch
    if not train or total_steps == 0:
        return FinetuneReport(objective, epochs, 0, trainable, None, time.perf_counter() - start)
    params = [p for p, _ in train]
    buffers: list[torch.Tensor | None] = [None] * len(train)
    eta_min = 0.01 * lr
    rng = torch.Generator().manual_seed(seed)
    forget_iter = _cycle(forget_batches) if objective != "finetune" else None
    step, final_loss = 0, None
    with module_mode(model, True):
        for _ in _progress(range(epochs), enabled=show, desc=f"DEL {objective}"):
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for batch in retain_batches:
                x = batch_input(batch, name="retain").to(device)
                y = batch_labels(batch, name="retain").to(device)
                loss = F.cross_entropy(check_logits(model(x), x.shape[0]), y)
                if forget_iter is not None:
                    fb = next(forget_iter)
                    xf = batch_input(fb, name="forget").to(device)
                    yf = batch_labels(fb, name="forget").to(device)
                    out_f = check_logits(model(xf), xf.shape[0])
                    if objective == "neggrad_plus":
                        loss = loss - beta * F.cross_entropy(out_f, yf)
                    else:
                        k = out_f.shape[1]
                        shift = torch.randint(1, max(k, 2), yf.shape, generator=rng).to(device)
                        loss = loss + F.cross_entropy(out_f, (yf + shift) % k)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                lr_t = eta_min + 0.5 * (lr - eta_min) * (1.0 + math.cos(math.pi * step / total_steps))
                with torch.no_grad():
                    for i, ((p, m), g) in enumerate(zip(train, grads)):
                        if g is None:
                            g = torch.zeros_like(p)
                        if weight_decay:
                            g = g.add(p, alpha=weight_decay)
                        if m is not None:
                            g = torch.where(m, g, 0.0)
                        if buffers[i] is None or momentum == 0:
                            buffers[i] = g  # a fresh tensor: autograd.grad's result or a new one
                        else:
                            buffers[i].mul_(momentum).add_(g)
                        p.add_(buffers[i], alpha=-lr_t)
                loss_sum += loss.detach()
                step += 1
            final_loss = float(loss_sum) / steps_per_epoch
            if not math.isfinite(final_loss) or not params_finite(params):
                raise RuntimeError(f"masked_finetune: training diverged (loss {final_loss}); lower lr. "
                                   "The model was restored.")
    _sync(device)
    return FinetuneReport(objective, epochs, step, trainable, final_loss, time.perf_counter() - start)


def _check_finetune_args(lr, epochs, momentum, weight_decay, beta, seed, objective):
    _check_choice(objective, "objective", OBJECTIVES)
    _check_real(lr, "lr", low=0.0, low_open=True)
    _check_int(epochs, "epochs", low=0)
    _check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
    _check_real(weight_decay, "weight_decay", low=0.0)
    _check_real(beta, "beta", low=0.0)
    _check_int(seed, "seed", low=0)


def _finetune_batches(retain, forget, objective, batch_size, seed):
    retain_batches = _loader(retain, batch_size, "retain", shuffle=True, seed=seed)
    try:
        len(retain_batches)
    except TypeError:
        raise TypeError("retain: must have a length (a DataLoader, Dataset or tensor) to run several epochs") from None
    _check_labelled(retain_batches, "retain")
    forget_batches = None
    if objective != "finetune":
        if forget is None:
            raise ValueError(f"forget: is required for objective={objective!r}")
        forget_batches = _loader(forget, batch_size, "forget", shuffle=True, seed=seed + 1)
        _check_labelled(forget_batches, "forget")
    return retain_batches, forget_batches


def masked_finetune(model: nn.Module, mask: Mask, retain, *, forget=None, objective: str = "finetune",
                    lr: float, epochs: int, batch_size: int = 128, momentum: float = 0.9,
                    weight_decay: float = 0.0, beta: float = 0.1, seed: int = 0, head=None,
                    progress: bool = True) -> FinetuneReport:
    """Train only the masked entries of `model` (plus the `head` module fully), in place.

    Args:
        mask: Mask from `localize` (or built by hand) matching the model's parameter names/shapes.
        retain: (x, y) batches (DataLoader used as is; tensors / Datasets are shuffled with `seed`).
        forget: (x, y) batches, needed by "neggrad_plus" and "relabel" (cycled, one per retain step).
        objective: "finetune": CE(retain); "neggrad_plus": CE(retain) − beta·CE(forget);
            "relabel": CE(retain) + CE(forget with labels y + U{1..K−1} mod K, redrawn each step).
        lr, epochs: SGD learning rate (cosine-annealed to 0.01·lr over epochs·len(retain) steps).
        momentum, weight_decay: SGD momentum (buffer starts at the first gradient) and L2 penalty;
            neither ever moves an unmasked entry: unmasked entries stay bitwise unchanged.
        beta: weight of the forget ascent term of "neggrad_plus" (>= 0; small, since the negated
            forget CE is unbounded).
        head: module name (or list of names) whose parameters train fully; None trains only the mask.
    The model trains in train mode (BatchNorm statistics update) and gets its modes back afterwards;
    on any failure parameters and buffers are restored bitwise.
    Returns:
        FinetuneReport(objective, epochs, steps, trainable entries, final_loss, seconds).
    """
    if not isinstance(mask, Mask):
        raise TypeError(f"mask: expected a jit_unlearn.Mask, got {type(mask).__name__}")
    _check_finetune_args(lr, epochs, momentum, weight_decay, beta, seed, objective)
    _check_int(batch_size, "batch_size", low=1)
    mask.check(model)
    head_names = _head_names(model, head)
    retain_batches, forget_batches = _finetune_batches(retain, forget, objective, batch_size, seed)
    with restore_on_failure(model):
        return _finetune(model, mask, retain_batches, forget_batches, objective=objective, lr=float(lr),
                         epochs=epochs, momentum=float(momentum), weight_decay=float(weight_decay),
                         beta=float(beta), seed=seed, head_names=head_names, show=progress)


def _init_state(init, model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The init parameters, checked against the model's names and shapes.  A factory runs under a
    forked CPU RNG seeded with `seed`, so the fresh initialisation is reproducible and the caller's
    global RNG state is left alone."""
    if isinstance(init, nn.Module):
        state = init.state_dict()
    elif isinstance(init, Mapping):
        state = init
    elif callable(init):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = init()
        if isinstance(built, nn.Module):
            state = built.state_dict()
        elif isinstance(built, Mapping):
            state = built
        else:
            raise TypeError(f"init: the factory must return an nn.Module or a state_dict, "
                            f"returned {type(built).__name__}")
    else:
        raise TypeError(f"init: expected a state_dict, an nn.Module or a zero-argument factory, "
                        f"got {type(init).__name__}")
    model_state = model.state_dict()
    unexpected = [n for n in state if n not in model_state]
    if unexpected:
        raise ValueError(f"init: names that the model does not have: {unexpected[:5]}")
    out = {}
    for name, p in model.named_parameters():
        if name not in state:
            raise ValueError(f"init: missing parameter {name!r}")
        t = state[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"init[{name!r}]: expected a floating tensor")
        if t.shape != p.shape:
            raise ValueError(f"init[{name!r}]: shape {tuple(t.shape)} differs from the model's {tuple(p.shape)}")
        out[name] = t
    return out


def del_unlearn(model: nn.Module, forget, retain, *, init, budget: float = 0.3, lr: float = 0.015,
                epochs: int = 30, batch_size: int = 128, momentum: float = 0.9, weight_decay: float = 0.0,
                head_trainable: bool = True, head: str | None = None, criterion: str = "weighted_grad",
                granularity: str = "channel", top_fraction: float | None = 0.1, seed: int = 0,
                progress: bool = True) -> DELReport:
    """DEL: localize (§3 steps 1-3), reset the selected entries to `init`, fine-tune them on retain.

    Args:
        model: classifier returning [B, K] logits; modified in place.
        forget, retain: (x, y) batches: DataLoaders (used as is) or tensors / Datasets batched by
            `batch_size` (retain shuffled with `seed`).  y int64 [B].
        init: a freshly initialised copy of the architecture: a state_dict, an nn.Module, or a
            zero-argument factory (run under torch.manual_seed(seed) in a forked RNG).  Its names and
            shapes must match the model's; it is checked before anything changes.
        budget, criterion, granularity, top_fraction: see `localize`.
        lr, epochs, momentum, weight_decay: masked SGD fine-tuning, see `masked_finetune`.
        head_trainable: train the classifier head fully: the module named `head`, by default the last
            nn.Linear of the model.
    Returns:
        DELReport with the mask, its statistics, epochs, steps and seconds per phase.
    On failure (including KeyboardInterrupt) the model is restored bitwise.
    """
    _check_choice(criterion, "criterion", CRITERIA)
    _check_choice(granularity, "granularity", GRANULARITIES)
    _check_real(budget, "budget", low=0.0, high=1.0, low_open=True)
    if top_fraction is not None:
        _check_real(top_fraction, "top_fraction", low=0.0, high=1.0, low_open=True)
    _check_finetune_args(lr, epochs, momentum, weight_decay, 0.0, seed, "finetune")
    _check_int(batch_size, "batch_size", low=1)
    if not isinstance(head_trainable, bool):
        raise TypeError(f"head_trainable: expected a bool, got {type(head_trainable).__name__}")
    state = _init_state(init, model, seed)
    head_name = (head if head is not None else _last_linear(model)) if head_trainable else None
    head_names = _head_names(model, head_name)
    forget_batches = None
    if criterion != "random":
        forget_batches = _loader(forget, batch_size, "forget")
        _check_labelled(forget_batches, "forget")
    retain_batches, _ = _finetune_batches(retain, None, "finetune", batch_size, seed)
    device = model_device(model)
    with restore_on_failure(model):
        t0 = time.perf_counter()
        mask = localize(model, forget_batches, criterion=criterion, granularity=granularity, budget=budget,
                        top_fraction=top_fraction, seed=seed, progress=progress)
        _sync(device)
        t1 = time.perf_counter()
        named = dict(model.named_parameters())
        names = list(mask)
        with torch.no_grad():
            targets = [named[n] for n in names]
            values = [state[n].to(device=p.device, dtype=p.dtype) for n, p in zip(names, targets)]
            if not params_finite(v for v, n in zip(values, names) if bool(mask[n].any())):
                raise ValueError("init: has non-finite values in entries selected for the reset")
            ops.masked_reset_(targets, values, [mask[n] for n in names])
        _sync(device)
        t2 = time.perf_counter()
        fine = _finetune(model, mask, retain_batches, None, objective="finetune", lr=float(lr), epochs=epochs,
                         momentum=float(momentum), weight_decay=float(weight_decay), beta=0.0, seed=seed,
                         head_names=head_names, show=progress)
    return DELReport(mask=mask, fraction=mask.fraction(), layer_fractions=mask.layer_fractions(),
                     masked=mask.count(), total=mask.numel(), head=head_name, epochs=epochs, steps=fine.steps,
                     final_loss=fine.final_loss, seconds_localize=t1 - t0, seconds_reset=t2 - t1,
                     seconds_finetune=fine.seconds)
