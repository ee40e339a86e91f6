"""Independent oracles for the method tests, written from docs/METHODS.md §1 and §5 and sharing no code
with jit_unlearn: Philox4x32-10 on numpy uint64 words, the Box-Muller transform in float64, JiT's
default mode composed from plain PyTorch, per-sample importances from one backward pass per sample, and
a comparison of two updates relative to their size."""

import math

import numpy as np
import torch
import torch.nn.functional as F

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11): counter = four arrays (or ints) of uint32 words, key = two
    ints.  Returns the four output words as numpy uint64 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = int(key[0]), int(key[1])
    mask = np.uint64(_MASK32)
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2  # < 2^64: no wrap-around
        c0, c1, c2, c3 = (
            ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0)) & mask,
            p1 & mask,
            ((p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1)) & mask,
            p0 & mask,
        )
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def normal(numel: int, seed: int, offset: int) -> torch.Tensor:
    """The first `numel` standard normals of stream (seed, offset), float64, flat (docs/METHODS.md §5):
    element j comes from Philox group j // 4, counter (group low, group high, offset low, offset
    high), key (seed low, seed high); each word r gives u = (2 (r >> 9) + 1) / 2^24, and lanes
    (0, 1), (2, 3) are the Box-Muller pairs sqrt(-2 ln u_a) (cos, sin)(2 pi u_b)."""
    seed, offset = seed & _U64, offset & _U64
    groups = np.arange((numel + 3) // 4, dtype=np.uint64)
    words = philox4x32_10(
        (groups & np.uint64(_MASK32), groups >> np.uint64(32), offset & _MASK32, offset >> 32),
        (seed & _MASK32, seed >> 32),
    )
    u = [((w >> np.uint64(9)).astype(np.float64) * 2 + 1) / 2.0**24 for w in words]
    rad01, rad23 = np.sqrt(-2 * np.log(u[0])), np.sqrt(-2 * np.log(u[2]))
    z = np.stack(
        [
            rad01 * np.cos(2 * math.pi * u[1]),
            rad01 * np.sin(2 * math.pi * u[1]),
            rad23 * np.cos(2 * math.pi * u[3]),
            rad23 * np.sin(2 * math.pi * u[3]),
        ],
        axis=1,
    )
    return torch.from_numpy(z.reshape(-1)[:numel].copy())


def perturb(x: torch.Tensor, n: int, sigma: float, seed: int, offset: int):
    """float64 (x_tilde [n, B, ...], in_norm [n, B]): x + sigma z clamped to [min x, max x] of the batch."""
    x = x.double()
    z = normal(n * x.numel(), seed, offset).view(n, *x.shape)
    x_tilde = torch.clamp(x + sigma * z, x.min(), x.max())
    in_norm = (x_tilde - x).reshape(n, x.shape[0], -1).pow(2).sum(2).sqrt()
    return x_tilde, in_norm


def jit_loss(model, x: torch.Tensor, n: int, sigma: float, seed: int, offset: int, reduction: str) -> torch.Tensor:
    """JiT's default-mode loss of one batch (docs/METHODS.md §1) on a float64 `model`: the mean over
    the n perturbed copies of sum_i ||f(x_i) - f(x~_ni)|| / ||x_i - x~_ni|| (pairs with a zero input
    difference left out), divided by B for reduction "mean"; the perturbed outputs are constants."""
    x = x.double()
    x_tilde, in_norm = perturb(x, n, sigma, seed, offset)
    with torch.no_grad():
        out2 = torch.stack([model(x_tilde[k]) for k in range(n)])
    out = model(x)
    num = (out.unsqueeze(0) - out2).pow(2).sum(2).clamp_min(1e-300).sqrt()  # no 0/0 in the gradient
    valid = in_norm > 0
    ratio = torch.where(valid, num / torch.where(valid, in_norm, 1.0), 0.0)
    loss = ratio.sum() / n
    return loss / x.shape[0] if reduction == "mean" else loss


def jit_default(model, batches, *, sigma, lr, n, seed, reduction="sum", optimizer=None) -> list[float]:
    """JiT's default mode on a float64 copy of the model: eval mode, batch t perturbed with stream
    offset t, one step per batch (plain SGD with `lr`, or `optimizer.step()` over the gradients).
    Returns the per-batch losses."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for t, x in enumerate(batches):
        loss = jit_loss(model, x, n, sigma, seed, t, reduction)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            if optimizer is None:
                for p, g in zip(params, grads):
                    if g is not None:
                        p -= lr * g
            else:
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def state(model) -> dict:
    """Every parameter and buffer of `model`, detached float64 copies."""
    return {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def update_error(before: dict, got: dict, want: dict) -> float:
    """||got - want|| / ||want - before|| over every tensor: the error of an update relative to its size.
    A run that does nothing (or twice too much) gives 1.0."""
    err = math.sqrt(sum(float((got[k].double() - want[k].double()).pow(2).sum()) for k in want))
    size = math.sqrt(sum(float((want[k].double() - before[k].double()).pow(2).sum()) for k in want))
    assert size > 0, "the reference update is zero: nothing to compare"
    return err / size


def assert_update_close(before: dict, got: dict, want: dict, rel: float) -> None:
    """The update before -> got equals before -> want up to `rel` of the update's size, in the norm over
    all tensors and in the largest element."""
    error = update_error(before, got, want)
    assert error <= rel, f"update error {error:.3g} > {rel} of the update's size"
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
    largest = max(float((want[k].double() - before[k].double()).abs().max()) for k in want)
    assert worst <= rel * largest, f"largest element error {worst:.3g} > {rel} * largest change {largest:.3g}"


def per_sample_importances(model, x: torch.Tensor, y: torch.Tensor, kind: str) -> dict:
    """The definition of the per-sample importance (docs/METHODS.md §2.2): the model in eval mode, one
    backward pass per sample of its cross-entropy ("fisher", squared gradients) or squared output norm
    ("output_norm", absolute gradients), averaged over the samples; 0 for frozen parameters and for
    those without a gradient."""
    model.eval()
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])
        loss = F.cross_entropy(out, y[i : i + 1]) if kind == "fisher" else out.pow(2).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                acc[n] += g * g if kind == "fisher" else g.abs()
    return {n: a / x.shape[0] for n, a in acc.items()}
