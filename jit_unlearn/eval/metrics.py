"""Unlearning metrics: accuracy, entropy MIA, loss MIA, and `evaluate` (one batched forward per split)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import _checks as checks
from .._safety import BatchChecks
from .._utils import as_batches, batch_input, batch_labels, check_logits, model_device, module_mode, progress

EVAL_BATCH_SIZE = 512

# The published entropy attack fits LogisticRegression(multi_class="multinomial") on two classes: a
# softmax with one weight row per class, both under the L2 penalty.  At the optimum the rows are
# opposite, so the penalty on the effective weight w1 - w0 is halved, which is exactly the binary
# logistic regression with C = 2 (scikit-learn >= 1.8 no longer accepts multi_class).
_ENTROPY_MIA_C = 2.0


def _outputs(model: torch.nn.Module, data, *, name: str, labels: bool, batch_size: int | None, show: bool):
    """Logits [N, K] (float32 or wider) and, if asked, labels [N] int64, both on the model's device,
    from one no-grad pass over `data`.  The caller sets eval mode."""
    if isinstance(data, DataLoader):
        batches = data
    else:
        # A private generator: iterating a DataLoader otherwise draws its base seed from the global RNG.
        batches = as_batches(data, batch_size or EVAL_BATCH_SIZE, name=name, generator=torch.Generator())
    checks.model(model)
    device = model_device(model)
    data = BatchChecks(name)
    outs, ys = [], []
    for i, batch in enumerate(progress(batches, enabled=show, desc=f"evaluate ({name})")):
        x = data.inputs(batch_input(batch, name=name), i).to(device, non_blocking=True)
        out = check_logits(model(x), x.shape[0], name="model")
        outs.append(out if out.dtype in (torch.float32, torch.float64) else out.float())
        if labels:
            ys.append(
                data.labels(batch_labels(batch, name=name), i, x.shape[0], out.shape[1]).to(device, non_blocking=True)
            )
    if not outs:
        raise ValueError(f"{name}: yields no batches (empty)")
    data.verify()
    logits = torch.cat(outs)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"model: produces non-finite logits on the {name} set; cannot evaluate it")
    return logits, (torch.cat(ys) if labels else None)


def _forward(model, data, *, name: str, labels: bool = True, batch_size: int | None = None, show: bool = False):
    with torch.no_grad(), module_mode(model, False):
        return _outputs(model, data, name=name, labels=labels, batch_size=batch_size, show=show)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row, 0·log 0 taken as 0: [N, K] -> [N]."""
    p = F.softmax(logits, dim=-1)
    return -torch.where(p > 0, p * p.log(), p.new_zeros(())).sum(dim=-1)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(dim=-1) == labels).sum().item()) / labels.numel()


def _entropy_mia(h_retain: torch.Tensor, h_forget: torch.Tensor, h_test: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([h_retain, h_test]).cpu().numpy().reshape(-1, 1)
    y = np.concatenate([np.ones(len(h_retain)), np.zeros(len(h_test))])
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs", C=_ENTROPY_MIA_C)
    clf.fit(x, y)
    return float(clf.predict(h_forget.cpu().numpy().reshape(-1, 1)).mean())


def _loss_mia(forget_losses: np.ndarray, test_losses: np.ndarray, n_splits: int, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    n = min(len(forget_losses), len(test_losses))
    if n < 10:
        raise ValueError(
            f"forget/test: the loss MIA needs at least 10 samples in each, got "
            f"{len(forget_losses)} and {len(test_losses)}"
        )
    rng = np.random.default_rng(seed)
    if len(forget_losses) > n:
        forget_losses = forget_losses[rng.permutation(len(forget_losses))[:n]]
    if len(test_losses) > n:
        test_losses = test_losses[rng.permutation(len(test_losses))[:n]]
    x = np.concatenate([test_losses, forget_losses]).reshape(-1, 1)
    y = np.array([0] * n + [1] * n)
    cv = StratifiedShuffleSplit(n_splits=n_splits, random_state=seed)
    return float(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy").mean())


def accuracy(model: torch.nn.Module, loader, *, batch_size: int | None = None) -> float:
    """Top-1 accuracy over every sample of `loader` (a DataLoader, or a Dataset batched by
    `batch_size`, default 512, of (x, ..., y) items), weighted by sample count: a partial last batch
    counts by its size.  The model runs in eval mode without autograd on its own device; each
    module's mode is restored afterwards.  Returns a float in [0, 1]."""
    logits, labels = _forward(model, loader, name="loader", batch_size=batch_size)
    return _accuracy(logits, labels)


def entropy_mia(model: torch.nn.Module, retain, forget, test, *, batch_size: int | None = None) -> float:
    """Membership inference from the entropy of the softmax output (the SSD/JiT protocol).

    A logistic regression (scikit-learn, balanced class weights) is fitted on the entropies of
    `retain` (members, 1) against `test` (non-members, 0) and applied to `forget`; the result is the
    fraction of forget samples predicted member, in [0, 1].  Each of the three sets (DataLoader,
    Dataset or input tensor; labels are not read) gets one batched no-grad forward in eval mode,
    which gives the value of the published one-sample-at-a-time procedure."""
    h = [
        _entropy(_forward(model, d, name=n, labels=False, batch_size=batch_size)[0])
        for d, n in ((retain, "retain"), (forget, "forget"), (test, "test"))
    ]
    return _entropy_mia(*h)


def _ce_losses(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(logits, labels, reduction="none").cpu().numpy()


def loss_mia(
    model: torch.nn.Module, forget, test, *, n_splits: int = 10, seed: int = 0, batch_size: int | None = None
) -> float:
    """Membership inference from per-sample cross-entropy (the NeurIPS 2023 unlearning challenge kit).

    The larger of the two loss sets is subsampled (seeded, `np.random.default_rng(seed).permutation`)
    to the size of the smaller; a default scikit-learn LogisticRegression is scored by accuracy over
    `n_splits` stratified shuffle splits (10 % test, `random_state=seed`) of test (0) vs forget (1).
    Returns the mean accuracy: 0.5 means forget and test losses are indistinguishable; compare with
    the retrained model's value."""
    checks.integer(n_splits, "n_splits", low=1)
    _check_seed(seed)
    f_logits, f_labels = _forward(model, forget, name="forget", batch_size=batch_size)
    t_logits, t_labels = _forward(model, test, name="test", batch_size=batch_size)
    return _loss_mia(_ce_losses(f_logits, f_labels), _ce_losses(t_logits, t_labels), n_splits, seed)


def _check_seed(seed) -> int:
    # numpy's default_rng and scikit-learn's random_state take seeds in [0, 2^32)
    return checks.integer(seed, "seed", low=0, high=2**32 - 1)


def _split_sets(splits):
    if isinstance(splits, Mapping):
        get = splits.get
    else:

        def get(key, default=None):
            return getattr(splits, key, default)

    sets = [get(k) for k in ("forget", "retain", "test")]
    if any(s is None for s in sets):
        raise TypeError("splits: expected a Splits (or a mapping) with forget, retain and test sets")
    return sets, get("forgotten_classes", ()) or (), get("test_keep")


def evaluate(
    model: torch.nn.Module,
    splits,
    *,
    forgotten_classes: Sequence[int] | None = None,
    mia: bool = True,
    n_splits: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict:
    """One evaluation record of `model` on a `Splits` (or a mapping with forget/retain/test).

    One batched no-grad forward per split (eval mode, the model's device, modes restored) feeds every
    metric.  Returns a dict of floats:
    `forget_acc`, `retain_acc`, `test_acc`; `test_acc_remaining`, the test accuracy over samples
    outside the forgotten classes (`forgotten_classes` if given, else the splits' own; equal to
    `test_acc` when no class is forgotten); `entropy_mia` and `loss_mia` (see those functions;
    skipped, None, when `mia` is False); `seconds`, the wall time of the evaluation.  `progress`
    shows a tqdm bar per split."""
    start = time.perf_counter()
    checks.integer(n_splits, "n_splits", low=1)
    _check_seed(seed)
    (forget, retain, test), own_classes, test_keep = _split_sets(splits)
    show = progress
    f_logits, f_labels = _forward(model, forget, name="forget", batch_size=batch_size, show=show)
    r_logits, r_labels = _forward(model, retain, name="retain", batch_size=batch_size, show=show)
    t_logits, t_labels = _forward(model, test, name="test", batch_size=batch_size, show=show)
    if forgotten_classes is not None:
        classes = torch.as_tensor(list(forgotten_classes), dtype=torch.long, device=t_labels.device)
        keep = ~torch.isin(t_labels, classes)
    elif test_keep is not None:
        keep = torch.as_tensor(test_keep, dtype=torch.bool).to(t_labels.device)
        if keep.shape != t_labels.shape:
            raise ValueError(f"splits: test_keep has shape {tuple(keep.shape)}, the test set {len(t_labels)} samples")
    elif own_classes:
        keep = ~torch.isin(t_labels, torch.as_tensor(list(own_classes), device=t_labels.device))
    else:
        keep = None
    if keep is not None:
        t_logits_kept, t_labels_kept = t_logits[keep], t_labels[keep]
    else:
        t_logits_kept, t_labels_kept = t_logits, t_labels
    record = {
        "forget_acc": _accuracy(f_logits, f_labels),
        "retain_acc": _accuracy(r_logits, r_labels),
        "test_acc": _accuracy(t_logits, t_labels),
        "test_acc_remaining": _accuracy(t_logits_kept, t_labels_kept),
        "entropy_mia": None,
        "loss_mia": None,
    }
    if mia:
        record["entropy_mia"] = _entropy_mia(_entropy(r_logits), _entropy(f_logits), _entropy(t_logits))
        record["loss_mia"] = _loss_mia(_ce_losses(f_logits, f_labels), _ce_losses(t_logits, t_labels), n_splits, seed)
    record["seconds"] = time.perf_counter() - start
    return record
