"""Plain transcriptions of the published code, written from docs/METHODS.md: SSD / LF-SSD (calc_importance,
modify_weight), the JiT reference loop (Lipschitz.modify_weight), SUPREME's JiT variant and per-sample importances;
the independent oracles that tests and benchmarks compare against."""

import copy

import torch
from torch import nn


def calc_importance(model, loader, label_free=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    imps = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for batch in loader:
        x = batch[0]
        opt.zero_grad()
        out = model(x)
        loss = torch.norm(out, p="fro", dim=1).pow(2).mean() if label_free else nn.CrossEntropyLoss()(out, batch[-1])
        loss.backward()
        for (_, p), (_, imp) in zip(model.named_parameters(), imps.items()):
            if p.grad is not None:
                imp.data += p.grad.data.clone().abs() if label_free else p.grad.data.clone().pow(2)
    for imp in imps.values():
        imp.data /= float(len(loader))
    return imps


def modify_weight(model, original, forget, alpha, lam, exponent=1.0, lower_bound=1.0):
    with torch.no_grad():
        for (_, p), (_, oimp), (_, fimp) in zip(model.named_parameters(), original.items(), forget.items()):
            locations = torch.where(fimp > oimp.mul(alpha))
            weight = ((oimp.mul(lam)).div(fimp)).pow(exponent)
            update = weight[locations]
            update[torch.where(update > lower_bound)] = lower_bound
            p[locations] = p[locations].mul(update)


def ssd(model, forget_loader, full_loader, alpha=10.0, lam=1.0, label_free=False):
    model.eval()
    sample = calc_importance(model, forget_loader, label_free)
    original = calc_importance(model, full_loader, label_free)
    modify_weight(model, original, sample, alpha, lam)
    model.zero_grad(set_to_none=True)


def _lipschitz_loss(model, perturbed_model, x, sigma, n):
    """One batch's JiT loss as the published loop orders the arithmetic: f(x) from `model`; per
    perturbation, clamp(x + sigma * randn(x.size()), min(x), max(x)) through `perturbed_model` without
    gradients; the ratio sum made absolute and added into a float32 scalar, divided by n.  A 3-dim x
    is one sample (a batch dimension is added)."""
    image = x.unsqueeze(0) if x.dim() == 3 else x
    out = model(image)
    total = torch.tensor(0.0)
    for _ in range(n):
        top, bottom = x.max(), x.min()
        moved = torch.clamp(x.clone() + torch.randn(x.size()) * sigma + 0.0, min=bottom, max=top)
        moved = moved.unsqueeze(0) if moved.dim() == 3 else moved
        with torch.no_grad():
            out_moved = perturbed_model(moved)
        rows = image.size(0)
        num = torch.linalg.vector_norm(out - out_moved, dim=1)
        den = torch.linalg.vector_norm(image.view(rows, -1) - moved.view(rows, -1), dim=1)
        total += (num / den).sum().abs()
    return total / n


def lipschitz_modify_weight(model, loader, sigma, lr, n):
    """docs/METHODS.md §1, reference semantics, as the JiT repository's Lipschitz.modify_weight
    orders the arithmetic: plain SGD over every parameter, gradients cleared once before the first
    batch and then summed across batches; per batch the ratio sums of the N perturbations are made
    absolute and added into a float32 scalar, which is divided by N before backward.  Reads
    (x, _, y) batches; a 3-dim x is one sample."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    sgd.zero_grad()
    for x, _, _ in loader:
        _lipschitz_loss(model, model, x, sigma, n).backward()
        sgd.step()


def supreme_jit(model, loader, sigma, lr, n, epochs=1):
    """SUPREME 0.1.5's JiT, from its documented differences to the reference: gradients cleared at
    every batch; the model in train mode for f(x); the perturbed outputs from a separate eval-mode
    copy whose state is reloaded from the model before each batch; `epochs` passes.  Arithmetic
    ordered as in `lipschitz_modify_weight`."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    frozen = copy.deepcopy(model).eval()
    for _ in range(epochs):
        model.train()
        for x, _, _ in loader:
            sgd.zero_grad()
            frozen.load_state_dict(model.state_dict())
            _lipschitz_loss(model, frozen, x, sigma, n).backward()
            sgd.step()


def per_sample_importance(model, loader, label_free=False):
    """docs/METHODS.md §2, per-sample variant, one backward pass per sample: (1/n) sum_i g_i^2
    (|g_i| when label_free), model in eval mode."""
    model.eval()
    imps = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    count = 0
    for batch in loader:
        x = batch[0]
        for i in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            out = model(x[i : i + 1])
            loss = out.pow(2).sum() if label_free else nn.functional.cross_entropy(out, batch[-1][i : i + 1])
            loss.backward()
            for k, p in model.named_parameters():
                if p.grad is not None:
                    imps[k] += p.grad.abs() if label_free else p.grad.pow(2)
            count += 1
    for imp in imps.values():
        imp /= float(count)
    model.zero_grad(set_to_none=True)
    return imps
