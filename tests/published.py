"""Plain transcriptions of the published SSD / LF-SSD code (calc_importance, modify_weight), written
from docs/METHODS.md §2: the independent oracle that tests and benchmarks compare against."""

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
