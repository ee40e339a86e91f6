"""DEL benchmarks: localization on a ResNet-18-shaped model against a per-row Python loop, and DEL
end to end against a copy-restore masked fine-tune and plain retraining.

Run: python -m pytest benchmarks/bench_del.py --benchmark-only --benchmark-min-rounds=3
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
from jit_unlearn.data import mnist
from jit_unlearn.methods.deletion.localize import mask_from_scores
from jit_unlearn.models import ResNet18, SmallCNN

BUDGET, TOP_FRACTION = 0.3, 0.1


def loop_mask(names, scores, budget=BUDGET, top_fraction=TOP_FRACTION):
    """Baseline: the same §3 scoring with one Python iteration per row, then one stable sort of
    every element for the global ranking."""
    flat = []
    for s in scores:
        if s.dim() >= 2:
            rows = s.reshape(s.shape[0], -1)
            h = min(max(1, int(top_fraction * rows.shape[0])), rows.shape[1])
            out = torch.empty_like(rows)
            for i in range(rows.shape[0]):
                out[i] = rows[i].topk(h).values.mean()
            flat.append(out.reshape(-1))
        else:
            flat.append(s.reshape(-1))
    flat = torch.cat(flat)
    k = int(budget * flat.numel())
    selected = torch.zeros(flat.numel(), dtype=torch.bool)
    selected[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return dict(zip(names, (m.view(s.shape) for m, s in zip(selected.split([s.numel() for s in scores]), scores))))


def loop_localize(model, x, y):
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(-F.cross_entropy(model(x), y), [p for _, p in named])
    scores = [(p.detach() * g).abs() for (_, p), g in zip(named, grads)]
    return loop_mask([n for n, _ in named], scores)


@pytest.fixture(scope="module")
def resnet_case():
    torch.manual_seed(0)
    model = ResNet18(num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    names = [n for n, _ in model.named_parameters()]
    scores = [torch.rand(p.shape) for p in model.parameters()]
    ours = mask_from_scores(names, scores, "channel", BUDGET, TOP_FRACTION)
    ref = loop_mask(names, scores)
    assert all(torch.equal(ours[n], ref[n]) for n in names)
    return model, x, y, names, scores


def test_score_rank_vectorised(benchmark, resnet_case):
    _, _, _, names, scores = resnet_case
    benchmark.group = "del: channel scoring + global budget, ResNet-18 (11.2 M params)"
    benchmark(mask_from_scores, names, scores, "channel", BUDGET, TOP_FRACTION)


def test_score_rank_loop(benchmark, resnet_case):
    _, _, _, names, scores = resnet_case
    benchmark.group = "del: channel scoring + global budget, ResNet-18 (11.2 M params)"
    benchmark(loop_mask, names, scores)


def test_localize_vectorised(benchmark, resnet_case):
    model, x, y, _, _ = resnet_case
    benchmark.group = "del: localize, ResNet-18, 8 forget samples 3x32x32"
    benchmark(ju.localize, model, TensorDataset(x, y), progress=False)


def test_localize_loop(benchmark, resnet_case):
    model, x, y, _, _ = resnet_case
    benchmark.group = "del: localize, ResNet-18, 8 forget samples 3x32x32"
    benchmark(loop_localize, model, x, y)


# ---------------------------------------------------------------- end to end

EPOCHS, LR, BATCH = 3, 0.015, 128


def make_mnist_case():
    """A SmallCNN trained one epoch on 2000 MNIST images; its state, forget (200) and retain sets."""
    x, y = mnist().tensors
    x, y = x[:2000], y[:2000]
    forget = torch.zeros(len(y), dtype=torch.bool)
    forget[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:200]] = True
    torch.manual_seed(0)
    trained = SmallCNN()
    opt = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
    for xb, yb in DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True):
        opt.zero_grad()
        F.cross_entropy(trained(xb), yb).backward()
        opt.step()
    return trained.state_dict(), TensorDataset(x[forget], y[forget]), TensorDataset(x[~forget], y[~forget])


@pytest.fixture(scope="module")
def mnist_case():
    return make_mnist_case()


def _fresh(state):
    model = SmallCNN()
    model.load_state_dict(state)
    return model


def copy_restore_del(model, forget, retain):
    """Baseline masked fine-tune: torch.optim.SGD on every parameter, gradients multiplied by the
    mask, and the unmasked entries copied back from a saved copy after every step."""
    mask = ju.localize(model, forget, progress=False)
    fresh = SmallCNN().state_dict()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.where(mask[n], fresh[n], p))
    keep = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: mask[n] | n.startswith("fc.") for n in mask}
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loader = DataLoader(retain, batch_size=BATCH, shuffle=True)
    total, step = EPOCHS * len(loader), 0
    model.train()
    for _ in range(EPOCHS):
        for xb, yb in loader:
            for group in opt.param_groups:
                group["lr"] = 0.01 * LR + 0.5 * 0.99 * LR * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            for n, p in model.named_parameters():
                p.grad.mul_(masks[n])
            opt.step()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(torch.where(masks[n], p, keep[n]))
            step += 1


def retrain(retain):
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loader = DataLoader(retain, batch_size=BATCH, shuffle=True)
    model.train()
    for _ in range(EPOCHS):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()


E2E = f"del: end to end, SmallCNN, MNIST 1800 retain / 200 forget, {EPOCHS} epochs"


def test_del_end_to_end(benchmark, mnist_case):
    state, forget, retain = mnist_case
    benchmark.group = E2E
    benchmark.pedantic(
        lambda m: ju.del_unlearn(
            m, forget, retain, init=SmallCNN, lr=LR, epochs=EPOCHS, batch_size=BATCH, progress=False
        ),
        setup=lambda: ((_fresh(state),), {}),
        rounds=3,
        iterations=1,
    )


def test_del_copy_restore_baseline(benchmark, mnist_case):
    state, forget, retain = mnist_case
    benchmark.group = E2E
    benchmark.pedantic(
        lambda m: copy_restore_del(m, forget, retain), setup=lambda: ((_fresh(state),), {}), rounds=3, iterations=1
    )


def test_retrain_same_epochs(benchmark, mnist_case):
    _, _, retain = mnist_case
    benchmark.group = E2E
    benchmark.pedantic(retrain, args=(retain,), rounds=3, iterations=1)
