"""Parameter importances for selective synaptic dampening (docs/METHODS.md §2): the published batch
pass (`batch_pass`), the per-sample SSD-Det pass (`per_sample`) and the checked on-disk container
(`container`)."""

from __future__ import annotations

import torch

from .. import _checks as checks
from .. import _precision, distributed
from .._safety import BatchChecks
from .._utils import as_batches, module_mode
from .batch_pass import batch_pass
from .container import KINDS, Importances, model_fingerprint, weights_digest
from .per_sample import DEFAULT_MAX_BATCH_ELEMS, per_sample_pass

__all__ = ["Importances", "importances", "model_fingerprint", "weights_digest", "KINDS", "DEFAULT_MAX_BATCH_ELEMS"]


def importances(
    model: torch.nn.Module,
    loader,
    *,
    kind: str = "fisher",
    per_sample: bool = False,
    progress: bool = True,
    max_batch_elems: int | None = None,
    batch_size: int | None = None,
    name: str = "loader",
    precision: str = "float32",
) -> Importances:
    """Importances of every parameter of `model` on the data in `loader`, model in eval mode.

    Args:
        model: classifier returning [B, K] logits (or an output holding them as `.logits`); its
            train/eval flags are restored afterwards and its `.grad` fields are left untouched.
        loader: a DataLoader (read in its own order), a Dataset, a tensor of inputs, or an
            iterator of batches; batches are (x, y) / (x, ..., y) tuples, dicts, or bare input
            tensors.  `batch_size` batches a Dataset or tensor (see `_utils.as_batches`).
        kind: "fisher": gradient g_b of the batch-mean cross-entropy, accumulating g_b * g_b (needs
            labels).  "output_norm" (LF-SSD): gradient of mean_i ||f(x_i)||^2, accumulating |g_b|;
            labels are never read.
        per_sample: False: the published batch average I = (1/|L|) sum_b acc(g_b) over the |L|
            batches (depends on batching).  True (SSD-Det): I = (1/n) sum_i acc(g_i) over single
            samples, with vectorised per-sample gradients (`torch.func`), independent of batching.
        progress: show a progress bar.
        max_batch_elems: per-sample mode only; cap on per-sample gradient elements held at once
            (default 2^25), which sets the chunk size.
        name: what error messages call the data.
        precision: "float32" (the model's dtype; the default), "bfloat16", "float16" (CUDA only)
            or "auto" (bfloat16 where the hardware runs it fast).  bfloat16 runs each forward and
            backward under autocast (channels_last inputs for conv nets); the gradients, their
            accumulation and the result stay float32 (docs/METHODS.md §7).  float16 changes
            nothing here (a graded pass).  Needs a float32 model unless "float32" or "auto".
    Returns:
        Importances with one tensor per named parameter (its shape and dtype, on its device);
        parameters that get no gradient (frozen or unused) have zero importance.  Its `weights`
        records `weights_digest(model)`, so a saved copy is refused by a model with other weights.
    Under torch.distributed (e.g. torchrun), each rank reads its share of the batches
    (`distributed.shard_batches`), and every rank gets the result over all of them
    (docs/DISTRIBUTED.md).
    """
    checks.choice(kind, "kind", KINDS)
    checks.boolean(per_sample, "per_sample")
    checks.optional_integer(max_batch_elems, "max_batch_elems", low=1)
    checks.model(model)
    prec = _precision.resolve(precision, model)
    batches = distributed.shard_batches(as_batches(loader, batch_size, name=name))
    named = list(model.named_parameters())
    if not any(p.requires_grad for _, p in named):
        raise ValueError("model: has no parameter that requires grad")
    acc = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in named}
    distributed.check_same_model(model)
    data = BatchChecks(name)
    weights = weights_digest(model)
    with module_mode(model, False), torch.enable_grad():
        if per_sample:
            budget = max_batch_elems or DEFAULT_MAX_BATCH_ELEMS
            num_batches, num_samples = per_sample_pass(model, batches, acc, kind, progress, budget, name, data, prec)
        else:
            num_batches, num_samples = batch_pass(model, batches, acc, kind, progress, name, data, prec)
    data.verify()
    if distributed.is_active():  # each rank read its share of the batches: sum the sums and counts
        distributed.all_reduce_sum_(list(acc.values()))
        num_batches, num_samples = distributed.all_reduce_count([num_batches, num_samples])
        if num_batches == 0:
            raise ValueError(f"{name}: yields no batches (empty)")
    divisor = float(num_samples if per_sample else num_batches)
    torch._foreach_div_(list(acc.values()), divisor)  # true division by the count, as the published code does
    return Importances(
        acc, kind=kind, per_sample=per_sample, num_samples=num_samples, num_batches=num_batches, weights=weights
    )
