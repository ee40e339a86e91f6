"""SUPREME's JiT loop (supreme-unlearning 0.1.5), as `jit_unlearn.integrations.supreme.jit` runs it:
the model in train mode for f(x), the perturbed outputs from an eval-mode twin synced at the start of
each batch, gradients zeroed every batch (docs/METHODS.md §1 holds the maths)."""

from __future__ import annotations

import copy

import torch

from .._safety import BatchChecks
from .._utils import batch_input


class EvalTwin:
    """An eval-mode copy of a module that shares its parameters and owns copies of its buffers;
    `sync()` copies the persistent buffers (what `load_state_dict` would load) from the original."""

    def __init__(self, module: torch.nn.Module):
        shared = {id(p): p for p in module.parameters()}
        self.module = copy.deepcopy(module, memo=shared).eval()
        persistent = set(module.state_dict(keep_vars=True))
        mine = dict(self.module.named_buffers())
        self.pairs = [(mine[n], b) for n, b in module.named_buffers() if n in persistent and n in mine]

    def sync(self) -> None:
        with torch.no_grad():
            for dst, src in self.pairs:
                dst.copy_(src)


def _noisy(x: torch.Tensor, sigma: float, device) -> torch.Tensor:
    """SUPREME's Gaussian perturbation: x + randn * sigma + mean (mean 0), clamped to [min(x), max(x)];
    the noise comes from the global CPU generator in x's shape and is then moved to `device`."""
    hi, lo = x.max(), x.min()
    return torch.clamp(x + torch.randn(x.size()).to(device) * sigma + 0.0, min=lo, max=hi)


def supreme_jit_epoch(
    fabric, wrapped, twin: EvalTwin, sgd, loader, n_samples: int, sigma: float, device, data: BatchChecks
):
    """One pass of SUPREME's JiT loop; returns (sum of batch losses as a tensor, batches).  `data`: the
    checks of the batches' inputs (BatchChecks)."""
    wrapped.train()
    loss_sum, batches = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in loader:
        x = data.inputs(batch_input(batch, name=data.name), batches)
        image = x.unsqueeze(0) if x.dim() == 3 else x
        sgd.zero_grad()
        twin.sync()
        out = wrapped(image)
        rows = image.size(0)
        flat = image.reshape(rows, -1)
        loss = torch.tensor(0.0, device=device)
        for _ in range(n_samples):
            x2 = _noisy(x.clone(), sigma, device)
            image2 = x2.unsqueeze(0) if x2.dim() == 3 else x2
            with torch.no_grad():
                out2 = twin.module(image2)
            in_norm = torch.linalg.vector_norm(flat - image2.reshape(image2.size(0), -1), dim=1)
            out_norm = torch.linalg.vector_norm(out - out2, dim=1)
            loss += (out_norm / in_norm).sum().abs()
        loss /= n_samples
        fabric.backward(loss)
        sgd.step()
        loss_sum += loss.detach()
        batches += 1
    return loss_sum, batches
