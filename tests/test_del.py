"""Tests for DEL: localization against a transcription of docs/METHODS.md §3, masked fine-tuning,
the reset, argument checks, and real forgetting on bundled MNIST."""

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
from bitwise import assert_bitwise_equal, state_bits
from del_nets import ConvNet, with_bn_statistics
from interrupts import InterruptingBatches
from jit_unlearn.data import digits, mnist
from jit_unlearn.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyConvNet(ConvNet):
    """4 channels (< 10, so h = max(1, 0) = 1), then 24 channels (h = 2), then a 10-way head."""

    def __init__(self):
        super().__init__(4, 24)


# h per [C_out, -1] parameter, worked out by hand from h = max(1, int(f * C_out)), capped at the row
# length (conv1 rows: 9, conv2 rows: 36, fc rows: 24); None = plain row mean.
HAND_H = {
    0.1: {"conv1.weight": 1, "conv2.weight": 2, "fc.weight": 1},
    0.5: {"conv1.weight": 2, "conv2.weight": 12, "fc.weight": 5},
    None: {"conv1.weight": 9, "conv2.weight": 36, "fc.weight": 24},
}


def make_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return with_bn_statistics(TinyConvNet().to(dtype))


def digit_images(n, offset=0, dtype=torch.float32):
    x, y = digits(image=True).tensors
    return x[offset : offset + n].to(dtype), y[offset : offset + n]


def batches_of(x, y, size):
    return DataLoader(TensorDataset(x, y), batch_size=size)


def reference_scores(model, batches, criterion, granularity, h_table):
    """§3 written out plainly: backward of L_b = -CE_b per batch into .grad, signed sum S, per-row
    Python loop for the channel score.  Returns (name, shape) pairs and every element's score."""
    named = list(model.named_parameters())
    sums = {n: torch.zeros_like(p) for n, p in named}
    was_training = model.training
    model.eval()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        (-F.cross_entropy(model(x), y)).backward()
        for n, p in named:
            sums[n] += p.grad
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    flat = []
    for n, p in named:
        s = (p.detach() * sums[n]).abs() if criterion == "weighted_grad" else sums[n].abs()
        if granularity == "channel" and p.dim() >= 2:
            rows = s.reshape(p.shape[0], -1)
            h = h_table[n]
            row_scores = [torch.sort(r, descending=True).values[:h].double().mean() for r in rows]
            s = torch.stack(row_scores)[:, None].expand(rows.shape)
        flat.append(s.double().reshape(-1))
    return [(n, p.shape) for n, p in named], torch.cat(flat).numpy()


def reference_select(shapes, flat, budget):
    """One global ranking of every element: score descending, then flat index ascending."""
    k = int(budget * flat.size)
    chosen = np.lexsort((np.arange(flat.size), -flat))[:k]
    selected = np.zeros(flat.size, dtype=bool)
    selected[chosen] = True
    out, start = {}, 0
    for n, shape in shapes:
        size = math.prod(shape)
        out[n] = torch.from_numpy(selected[start : start + size].reshape(shape))
        start += size
    return out


def reference_mask(model, batches, criterion, granularity, budget, h_table):
    return reference_select(*reference_scores(model, batches, criterion, granularity, h_table), budget)


# ---------------------------------------------------------------- localization


@pytest.mark.parametrize("criterion", ["weighted_grad", "grad"])
@pytest.mark.parametrize("granularity", ["channel", "parameter"])
@pytest.mark.parametrize("budget,top_fraction", [(0.3, 0.1), (0.05, 0.1), (0.3, 0.5), (0.6, None), (1.0, 0.1)])
def test_localize_matches_transcription(criterion, granularity, budget, top_fraction):
    net = make_net()
    x, y = digit_images(96)
    batches = batches_of(x, y, 32)
    before = state_bits(net)
    mask = ju.localize(
        net,
        batches,
        criterion=criterion,
        granularity=granularity,
        budget=budget,
        top_fraction=top_fraction,
        progress=False,
    )
    assert_bitwise_equal(before, state_bits(net))
    expected = reference_mask(net, batches, criterion, granularity, budget, HAND_H[top_fraction])
    total = sum(p.numel() for p in net.parameters())
    assert list(mask) == [n for n, _ in net.named_parameters()]
    assert mask.count() == int(budget * total) and mask.numel() == total
    for n, m in mask.items():
        assert m.dtype == torch.bool
        assert torch.equal(m, expected[n]), n


@pytest.mark.parametrize("top_fraction", [0.1, 0.5, None])
def test_localize_budget_sweep(top_fraction):
    # Many budgets move the cut through every layer, so a wrong h or row score shows up somewhere.
    net = make_net(3)
    x, y = digit_images(64, offset=200)
    batches = batches_of(x, y, 32)
    shapes, flat = reference_scores(net, batches, "weighted_grad", "channel", HAND_H[top_fraction])
    for budget in np.linspace(0.01, 0.99, 50):
        mask = ju.localize(net, batches, budget=float(budget), top_fraction=top_fraction, progress=False)
        expected = reference_select(shapes, flat, float(budget))
        assert all(torch.equal(mask[n], expected[n]) for n in mask), budget


def test_channel_rows_are_whole_except_at_the_boundary():
    net = make_net()
    x, y = digit_images(64)
    mask = ju.localize(net, TensorDataset(x, y), budget=0.3, progress=False)
    partial = 0
    for n, p in net.named_parameters():
        if p.dim() >= 2:
            per_row = mask[n].reshape(p.shape[0], -1).sum(1)
            row_len = p[0].numel()
            partial += int(((per_row > 0) & (per_row < row_len)).sum())
    assert partial <= 1


def test_small_layers_can_be_selected():
    # conv1 has 4 output channels: int(0.1 * 4) = 0, which max(1, .) turns into 1 (scores stay finite).
    net = make_net()
    x, y = digit_images(64)
    with torch.no_grad():
        net.conv1.weight.mul_(1e3)  # make conv1 dominate the weighted scores
    mask = ju.localize(net, batches_of(x, y, 64), budget=0.02, progress=False)
    assert mask.count("conv1.weight") > 0


def test_ties_break_to_the_lower_index():
    net = make_net()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()  # every weighted score is |0 * S| = 0: a single tie
    x, y = digit_images(32)
    total = sum(p.numel() for p in net.parameters())
    for granularity in ("channel", "parameter"):
        for budget in (0.3, 0.77):
            mask = ju.localize(net, batches_of(x, y, 32), granularity=granularity, budget=budget, progress=False)
            flat = torch.cat([m.reshape(-1) for m in mask.values()])
            k = int(budget * total)
            assert torch.equal(flat, torch.arange(total) < k)


def test_random_control_is_seeded():
    net = make_net()
    a = ju.localize(net, None, criterion="random", seed=3, progress=False)
    b = ju.localize(net, None, criterion="random", seed=3, progress=False)
    c = ju.localize(net, None, criterion="random", seed=4, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert a.count() == c.count() == int(0.3 * a.numel())


def test_localize_float64():
    net = make_net(dtype=torch.float64)
    x, y = digit_images(32, dtype=torch.float64)
    mask = ju.localize(net, batches_of(x, y, 16), budget=0.25, progress=False)
    expected = reference_mask(net, batches_of(x, y, 16), "weighted_grad", "channel", 0.25, HAND_H[0.1])
    assert all(torch.equal(mask[n], expected[n]) for n in mask)


# ---------------------------------------------------------------- Mask


def test_mask_statistics_and_io(tmp_path):
    m = ju.Mask({"a": torch.tensor([[True, False], [False, False]]), "b": torch.tensor([True, True, False])})
    assert m.count() == 3 and m.count("a") == 1 and m.numel() == 7
    assert m.fraction() == pytest.approx(3 / 7)
    assert m.layer_fractions() == {"a": 0.25, "b": pytest.approx(2 / 3)}
    path = tmp_path / "mask.pt"
    m.save(path)
    back = ju.Mask.load(path)
    assert list(back) == ["a", "b"] and all(torch.equal(back[n], m[n]) for n in m)
    torch.save({"x": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="path"):
        ju.Mask.load(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="masks"):
        ju.Mask({"a": torch.ones(2)})


def test_mask_check_against_model():
    net = make_net()
    good = ju.Mask({"fc.bias": torch.zeros(10, dtype=torch.bool)})
    good.check(net)
    with pytest.raises(ValueError, match="not parameters"):
        ju.Mask({"nope.weight": torch.zeros(3, dtype=torch.bool)}).check(net)
    with pytest.raises(ValueError, match="fc.bias"):
        ju.Mask({"fc.bias": torch.zeros(11, dtype=torch.bool)}).check(net)


# ---------------------------------------------------------------- masked fine-tuning


def unmasked_bits_equal(mask, before, model):
    for n, p in model.named_parameters():
        keep = ~mask[n] if n in mask else torch.ones_like(p, dtype=torch.bool)
        old = before[n].view(-1).view(torch.int32)[keep.view(-1)]
        new = p.detach().reshape(-1).view(torch.int32)[keep.view(-1)]
        if not torch.equal(old, new):
            return False
    return True


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("objective", ["finetune", "neggrad_plus", "relabel"])
def test_masked_finetune_moves_only_masked_entries(weight_decay, objective):
    net = make_net()
    xf, yf = digit_images(48)
    xr, yr = digit_images(192, offset=48)
    mask = ju.localize(net, batches_of(xf, yf, 48), budget=0.3, progress=False)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.eval()
    seen_modes = []
    hook = net.conv1.register_forward_hook(lambda mod, i, o: seen_modes.append(mod.training))
    report = ju.masked_finetune(
        net,
        mask,
        TensorDataset(xr, yr),
        forget=TensorDataset(xf, yf),
        objective=objective,
        lr=0.1,
        epochs=2,
        batch_size=64,
        weight_decay=weight_decay,
        progress=False,
    )
    hook.remove()
    assert report.steps == 6 and report.epochs == 2 and math.isfinite(report.final_loss)
    assert all(seen_modes) and not any(m.training for m in net.modules())
    assert unmasked_bits_equal(mask, before, net)
    moved = sum(int((p.detach() != before[n])[mask[n]].sum()) for n, p in net.named_parameters())
    assert moved > 0.9 * mask.count()


def test_masked_finetune_head_trains_fully():
    net = make_net()
    xr, yr = digit_images(128)
    mask = ju.Mask({n: torch.zeros_like(p, dtype=torch.bool) for n, p in net.named_parameters()})
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ju.masked_finetune(
        net, mask, TensorDataset(xr, yr), lr=0.1, epochs=1, batch_size=64, weight_decay=0.01, head="fc", progress=False
    )
    for n, p in net.named_parameters():
        if n.startswith("fc."):
            assert bool((p.detach() != before[n]).all()), n
        else:
            assert torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_full_mask_matches_plain_sgd(weight_decay):
    # With every entry selected, masked fine-tuning is SGD(momentum, L2) under the cosine schedule.
    xr, yr = digit_images(160)
    loader = DataLoader(TensorDataset(xr, yr), batch_size=32)
    net, ref = make_net(), make_net()
    mask = ju.Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters()})
    lr, epochs, momentum = 0.05, 2, 0.9
    ju.masked_finetune(
        net, mask, loader, lr=lr, epochs=epochs, momentum=momentum, weight_decay=weight_decay, progress=False
    )
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total, step = epochs * len(loader), 0
    ref.train()
    for _ in range(epochs):
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = 0.01 * lr + 0.5 * 0.99 * lr * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
            step += 1
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for a, b in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DEL end to end pieces


def test_reset_takes_values_from_state_dict():
    net, fresh = make_net(0), make_net(7)
    xf, yf = digit_images(40)
    xr, yr = digit_images(100, offset=40)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    report = ju.del_unlearn(
        net,
        TensorDataset(xf, yf),
        TensorDataset(xr, yr),
        init=fresh.state_dict(),
        epochs=0,
        batch_size=20,
        progress=False,
    )
    init = dict(fresh.named_parameters())
    total = sum(p.numel() for p in net.parameters())
    assert (report.total, report.masked, report.mask.count()) == (total, int(0.3 * total), int(0.3 * total))
    assert report.steps == 0 and report.head == "fc"
    for n, p in net.named_parameters():
        m = report.mask[n]
        assert torch.equal(p.detach()[m], init[n].detach()[m]), n
        assert torch.equal(p.detach()[~m], before[n][~m]), n


def test_reset_takes_values_from_factory():
    net = make_net(0)
    xf, yf = digit_images(40)
    xr, yr = digit_images(100, offset=40)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    report = ju.del_unlearn(
        net,
        TensorDataset(xf, yf),
        TensorDataset(xr, yr),
        init=TinyConvNet,
        epochs=0,
        seed=5,
        batch_size=20,
        progress=False,
    )
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.manual_seed(5)
    init = dict(TinyConvNet().named_parameters())
    for n, p in net.named_parameters():
        m = report.mask[n]
        assert torch.equal(p.detach()[m], init[n].detach()[m]), n
        assert torch.equal(p.detach()[~m], before[n][~m]), n


def test_del_fine_tune_keeps_unmasked_entries_except_head():
    net = make_net()
    xf, yf = digit_images(40)
    xr, yr = digit_images(128, offset=40)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    report = ju.del_unlearn(
        net,
        TensorDataset(xf, yf),
        TensorDataset(xr, yr),
        init=TinyConvNet,
        epochs=2,
        batch_size=64,
        weight_decay=5e-4,
        progress=False,
    )
    assert report.steps == 2 * math.ceil(128 / 64)
    head_free = ju.Mask({n: (m if not n.startswith("fc.") else torch.ones_like(m)) for n, m in report.mask.items()})
    assert unmasked_bits_equal(head_free, before, net)


class _Slow:
    """(x, y) batches of `size`, each handed out after `delay` seconds."""

    def __init__(self, x, y, size, delay):
        self.batches, self.delay = list(zip(x.split(size), y.split(size))), delay

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def test_report_times_each_phase(monkeypatch):
    # known delays in each phase: localization reads 2 batches and fine-tuning 2 epochs of 2, at
    # 0.02 s each; the reset waits 0.1 s.  Each phase's time covers its delay, their sum lies within
    # the caller's own clock.
    net = make_net()
    xf, yf = digit_images(40)
    xr, yr = digit_images(128, offset=40)
    real = ju.ops.masked_reset_

    def slow_reset(*args):
        time.sleep(0.1)
        return real(*args)

    monkeypatch.setattr(ju.ops, "masked_reset_", slow_reset)
    start = time.perf_counter()
    report = ju.del_unlearn(
        net, _Slow(xf, yf, 20, 0.02), _Slow(xr, yr, 64, 0.02), init=TinyConvNet, epochs=2, progress=False
    )
    elapsed = time.perf_counter() - start
    assert report.seconds_localize >= 2 * 0.02
    assert report.seconds_reset >= 0.1
    assert report.seconds_finetune >= 4 * 0.02
    assert 2 * 0.02 + 0.1 + 4 * 0.02 <= report.seconds <= elapsed


# ---------------------------------------------------------------- bad input


def _good_args():
    xf, yf = digit_images(20)
    xr, yr = digit_images(60, offset=20)
    return TensorDataset(xf, yf), TensorDataset(xr, yr)


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        ({"budget": 0.0}, ValueError, "budget"),
        ({"budget": 1.5}, ValueError, "budget"),
        ({"budget": float("nan")}, ValueError, "budget"),
        ({"budget": True}, TypeError, "budget"),
        ({"top_fraction": 0.0}, ValueError, "top_fraction"),
        ({"top_fraction": 1.01}, ValueError, "top_fraction"),
        ({"criterion": "fisher"}, ValueError, "criterion"),
        ({"granularity": "row"}, ValueError, "granularity"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"epochs": 1.5}, TypeError, "epochs"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"head": "classifier"}, ValueError, "head"),
        ({"init": lambda: MLP(64)}, ValueError, "init"),
        ({"init": "weights.pt"}, TypeError, "init"),
    ],
)
def test_del_bad_arguments_leave_model_untouched(kwargs, exc, word):
    net = make_net()
    forget, retain = _good_args()
    before = state_bits(net)
    args = {"init": TinyConvNet, "epochs": 1, "progress": False, **kwargs}
    with pytest.raises(exc, match=word):
        ju.del_unlearn(net, forget, retain, **args)
    assert_bitwise_equal(before, state_bits(net))


def test_del_init_mismatch_and_empty_data():
    net = make_net()
    forget, retain = _good_args()
    before = state_bits(net)
    wrong_shape = {k: v.clone() for k, v in make_net(1).state_dict().items()}
    wrong_shape["fc.weight"] = torch.zeros(10, 25)
    missing = {k: v for k, v in make_net(1).state_dict().items() if k != "conv1.bias"}
    extra = {**make_net(1).state_dict(), "head2.weight": torch.zeros(3)}
    for init, word in [(wrong_shape, "fc.weight"), (missing, "conv1.bias"), (extra, "head2.weight")]:
        with pytest.raises(ValueError, match=word):
            ju.del_unlearn(net, forget, retain, init=init, epochs=1, progress=False)
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="forget"):
        ju.del_unlearn(net, empty, retain, init=TinyConvNet, epochs=1, progress=False)
    with pytest.raises(ValueError, match="retain"):
        ju.del_unlearn(net, forget, DataLoader(empty, batch_size=4), init=TinyConvNet, epochs=1, progress=False)
    with pytest.raises(ValueError, match="retain"):
        ju.del_unlearn(net, forget, torch.zeros(5, 1, 8, 8), init=TinyConvNet, epochs=1, progress=False)
    assert_bitwise_equal(before, state_bits(net))


def test_masked_finetune_bad_arguments():
    net = make_net()
    forget, retain = _good_args()
    mask = ju.localize(net, forget, progress=False)
    before = state_bits(net)
    with pytest.raises(ValueError, match="objective"):
        ju.masked_finetune(net, mask, retain, objective="scrub", lr=0.1, epochs=1, progress=False)
    with pytest.raises(ValueError, match="forget"):
        ju.masked_finetune(net, mask, retain, objective="relabel", lr=0.1, epochs=1, progress=False)
    with pytest.raises(TypeError, match="mask"):
        ju.masked_finetune(net, dict(mask), retain, lr=0.1, epochs=1, progress=False)
    with pytest.raises(ValueError, match="mask"):
        ju.masked_finetune(
            net, ju.Mask({"x": torch.ones(1, dtype=torch.bool)}), retain, lr=0.1, epochs=1, progress=False
        )
    with pytest.raises(ValueError, match="beta"):
        ju.masked_finetune(
            net, mask, retain, forget=forget, objective="neggrad_plus", beta=-1.0, lr=0.1, epochs=1, progress=False
        )
    assert_bitwise_equal(before, state_bits(net))


def test_failure_mid_run_restores_model():
    net = make_net()
    net.eval()
    xf, yf = digit_images(20)
    xr, yr = digit_images(96, offset=20)
    before = state_bits(net)
    with pytest.raises(KeyboardInterrupt):
        ju.del_unlearn(
            net,
            TensorDataset(xf, yf),
            InterruptingBatches(list(batches_of(xr, yr, 32)), at=4),
            init=TinyConvNet,
            epochs=3,
            progress=False,
        )
    assert_bitwise_equal(before, state_bits(net))
    assert not any(m.training for m in net.modules())
    with pytest.raises(RuntimeError, match="diverged"):
        ju.del_unlearn(
            net,
            TensorDataset(xf, yf),
            TensorDataset(xr, yr),
            init=TinyConvNet,
            lr=1e35,
            epochs=2,
            batch_size=32,
            progress=False,
        )
    assert_bitwise_equal(before, state_bits(net))


# ---------------------------------------------------------------- real forgetting


def _train(x, y, seed, epochs=30):
    torch.manual_seed(seed)
    model = MLP(784, (128,), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def mnist_split():
    x, y = mnist().tensors
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x = x.flatten(1)
    train, test = perm[:1000], perm[1000:3000]
    original = _train(x[train], y[train], seed=0)
    return x[train], y[train], x[test], y[test], original


@pytest.mark.parametrize("scenario", ["random", "class"])
def test_del_forgets_like_retraining(mnist_split, scenario):
    xtr, ytr, xte, yte, original = mnist_split
    if scenario == "random":
        forget = torch.zeros(len(ytr), dtype=torch.bool)
        forget[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1))[: len(ytr) // 10]] = True
        keep_test = torch.ones(len(yte), dtype=torch.bool)
    else:
        forget, keep_test = ytr == 3, yte != 3
    xf, yf, xr, yr = xtr[forget], ytr[forget], xtr[~forget], ytr[~forget]
    retrained = _train(xr, yr, seed=1)
    model = MLP(784, (128,), 10)
    model.load_state_dict(original.state_dict())
    report = ju.del_unlearn(
        model,
        TensorDataset(xf, yf),
        TensorDataset(xr, yr),
        init=lambda: MLP(784, (128,), 10),
        budget=0.3,
        lr=0.05,
        epochs=10,
        batch_size=128,
        progress=False,
    )
    assert report.head == "3" and report.steps == 10 * math.ceil(len(yr) / 128)
    acc_orig, acc_retr, acc_del = (_accuracy(m, xf, yf) for m in (original, retrained, model))
    assert acc_orig == 1.0
    assert abs(acc_del - acc_retr) < abs(acc_orig - acc_retr)
    if scenario == "random":
        assert acc_del <= acc_orig - 0.02
    else:
        assert acc_retr == 0.0 and acc_del <= 0.05
    test_orig = _accuracy(original, xte[keep_test], yte[keep_test])
    assert abs(_accuracy(model, xte[keep_test], yte[keep_test]) - test_orig) < 0.03
