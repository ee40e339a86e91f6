"""A plain transcription of the published DEL code, written from docs/METHODS.md §3.2: the oracle that
`del_unlearn(..., mode="reference")` is compared with bitwise.  Scores go through `.backward()` into
`.grad`, the channel scores are written row by row, the ranking is a double `torch.argsort`, the reset
is the arithmetic blend with an int64 0/1 mask, and the fine-tuning loop is torch's SGD with the
gradients multiplied by the mask and a CosineAnnealingLR stepped once per epoch, zipping the retain
loader with a cycled forget loader."""

import itertools

import torch
from torch import nn


def scores(model, forget_loader, *, criterion="weighted_grad"):
    """{name: |S|}: S adds θ·∇θ(−CE_b) (or ∇θ(−CE_b) for "grad") batch by batch, in the parameter dtype."""
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)  # used for zero_grad only
    ce = nn.CrossEntropyLoss()
    totals = {name: 0 for name, _ in model.named_parameters()}
    device = next(model.parameters()).device
    model.eval()
    for inputs, labels in forget_loader:
        inputs, labels = inputs.to(device), labels.to(device)
        negated = -ce(model(inputs), labels)
        sgd.zero_grad()
        negated.backward()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.grad is None:
                    continue
                term = param.data * param.grad.data if criterion == "weighted_grad" else param.grad.data
                totals[name] = totals[name] + term
    sgd.zero_grad()
    return {name: total.abs() for name, total in totals.items()}


def critical_mask(
    model,
    forget_loader,
    *,
    criterion="weighted_grad",
    granularity="channel",
    top_fraction=0.1,
    budget=0.3,
    guard_small_layers=True,
):
    """{name: int64 0/1 tensor}.  guard_small_layers=False keeps the published h = int(0.1·C_out),
    which is 0 below 10 output channels and makes that layer's scores NaN."""
    totals = scores(model, forget_loader, criterion=criterion)
    with torch.no_grad():
        for total in totals.values():
            if granularity != "channel" or total.ndim < 2:
                continue
            per_row = total.view(total.shape[0], -1)
            if top_fraction is None:
                row_score = per_row.mean(dim=1)
            else:
                count = int(top_fraction * len(per_row))
                if guard_small_layers:
                    count = min(max(1, count), per_row.shape[1])
                row_score = torch.topk(per_row, count, dim=1)[0].mean(dim=1)
            for row in range(total.shape[0]):
                total[row] = row_score[row]
    ordered = -torch.cat([t.flatten() for t in totals.values()])
    cutoff = int(len(ordered) * budget)
    rank_of = torch.argsort(torch.argsort(ordered))
    masks, offset = {}, 0
    for name, total in totals.items():
        ranks = rank_of[offset : offset + total.numel()]
        flags = torch.zeros_like(ranks)
        flags[ranks < cutoff] = 1
        masks[name] = flags.reshape(total.shape)
        offset += total.numel()
    return masks


def blend_reset(model, fresh, masks):
    """θ ← θ·(1 − m) + θ_fresh·m for every parameter."""
    with torch.no_grad():
        for (name, param), (_, fresh_param) in zip(model.named_parameters(), fresh.named_parameters()):
            param.data = param.data * (1 - masks[name]) + fresh_param.data * masks[name]


def finetune(model, retain_loader, forget_loader, masks, *, lr, epochs, weight_decay=0.0, head="fc"):
    """The published loop; the head's gradient mask is all ones."""
    grad_masks = dict(masks)
    for name, param in model.named_parameters():
        if name.split(".")[0] == head:
            grad_masks[name] = torch.ones(param.shape, device=param.device)
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=epochs, eta_min=0.01 * lr)
    ce = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for (inputs, labels), _unused in zip(retain_loader, itertools.cycle(forget_loader)):
            inputs, labels = inputs.to(param.device), labels.to(param.device)
            loss = ce(model(inputs), labels)
            sgd.zero_grad()
            loss.backward()
            for name, param in model.named_parameters():
                if param.grad is not None:
                    param.grad *= grad_masks[name]
            sgd.step()
        schedule.step()
    sgd.zero_grad()


def unlearn(model, fresh, forget_loader, retain_loader, *, lr, epochs, weight_decay=0.0, **mask_args):
    """Localize, reset, fine-tune; returns the masks."""
    masks = critical_mask(model, forget_loader, **mask_args)
    blend_reset(model, fresh, masks)
    finetune(model, retain_loader, forget_loader, masks, lr=lr, epochs=epochs, weight_decay=weight_decay)
    return masks
