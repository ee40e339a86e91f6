"""DEL's reference mode against a transcription of the published code (tests/published_del.py): masks,
parameters, buffers and the global RNG bitwise; the < 10-channel edge case; how the loaders are read;
and the checks, restore-on-failure and finiteness that hold in both modes."""

import published_del as published
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
from bitwise import assert_bitwise_equal, bits, state_bits
from conftest import requires_cuda
from del_nets import ConvNet, with_bn_statistics
from interrupts import InterruptingBatches
from jit_unlearn.data import digits
from jit_unlearn.methods.deletion.reference import reference_reset_, reference_scores

pytestmark = pytest.mark.usefixtures("one_thread")


class WideNet(ConvNet):
    """At least 10 output channels in every layer: 12, 20 and a 10-way head."""

    def __init__(self):
        super().__init__(12, 20)


class NarrowNet(ConvNet):
    """conv1 has 4 output channels: the published h = int(0.1·4) = 0 scores it NaN."""

    def __init__(self):
        super().__init__(4, 20)


def make(cls=WideNet, seed=0):
    torch.manual_seed(seed)
    return with_bn_statistics(cls())


def data(n, offset=0):
    x, y = digits(image=True).tensors
    return TensorDataset(x[offset : offset + n], y[offset : offset + n])


def loaders():
    """Shuffling loaders that draw from the global RNG, as the published script's do."""
    return (
        DataLoader(data(40), batch_size=16, shuffle=True),
        DataLoader(data(128, offset=40), batch_size=32, shuffle=True),
    )


# ---------------------------------------------------------------- bitwise against the transcription


@pytest.mark.parametrize(
    "criterion,granularity,top_fraction,weight_decay",
    [
        ("weighted_grad", "channel", 0.1, 0.0),
        ("weighted_grad", "channel", 0.1, 5e-4),
        ("weighted_grad", "channel", None, 0.0),
        ("weighted_grad", "parameter", 0.1, 0.01),
        ("grad", "channel", 0.1, 0.0),
        ("grad", "parameter", 0.1, 0.0),
    ],
)
def test_del_reference_is_the_published_code_bitwise(criterion, granularity, top_fraction, weight_decay):
    compare_with_published(criterion, granularity, top_fraction, weight_decay, "cpu")


@requires_cuda
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_del_reference_is_the_published_code_bitwise_cuda(weight_decay):
    # On CUDA torch's SGD takes its foreach path; the reference mode steps the same optimizer.
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        compare_with_published("weighted_grad", "channel", 0.1, weight_decay, "cuda")
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def compare_with_published(criterion, granularity, top_fraction, weight_decay, device):
    ours, theirs, fresh = make().to(device), make().to(device), make(seed=7).to(device)
    options = dict(criterion=criterion, granularity=granularity, top_fraction=top_fraction, budget=0.3)
    torch.manual_seed(123)
    forget, retain = loaders()
    report = ju.del_unlearn(
        ours,
        forget,
        retain,
        init=fresh.state_dict(),
        lr=0.05,
        epochs=3,
        weight_decay=weight_decay,
        mode="reference",
        progress=False,
        **options,
    )
    rng_ours = torch.get_rng_state()
    torch.manual_seed(123)
    forget, retain = loaders()
    masks = published.unlearn(theirs, fresh, forget, retain, lr=0.05, epochs=3, weight_decay=weight_decay, **options)
    assert torch.equal(torch.get_rng_state(), rng_ours)  # the loaders were opened and read alike
    assert report.mask.keys() == masks.keys()
    for name, m in masks.items():
        assert torch.equal(report.mask[name], m.bool()), name
    assert report.masked == int(0.3 * report.total) and report.steps == 12
    assert_bitwise_equal(ours, theirs)


@pytest.mark.parametrize("criterion", ["weighted_grad", "grad"])
def test_reference_scores_add_per_batch_products(criterion):
    ours, theirs = make(), make()
    forget = DataLoader(data(80), batch_size=8)
    params = list(ours.parameters())
    got = reference_scores(ours, params, forget, criterion, False)
    expected = published.scores(theirs, forget, criterion=criterion)
    for (name, _), s in zip(ours.named_parameters(), got):
        assert s.dtype == torch.float32 and torch.equal(bits(s), bits(expected[name])), name
    if criterion == "weighted_grad":
        # θ ⊙ Σ_b ∇L_b (the default's form) is the same sum rounded differently: some entries differ.
        other = make()
        summed = reference_scores(other, list(other.parameters()), forget, "grad", False)
        regrouped = [(g * p.detach()).abs() for g, p in zip(summed, params)]
        torch.testing.assert_close(got, regrouped, rtol=1e-5, atol=1e-7)
        assert any(not torch.equal(a, b) for a, b in zip(got, regrouped))


def test_localize_reference_matches_transcription_on_datasets():
    ours, theirs = make(), make()
    mask = ju.localize(ours, data(50), batch_size=16, budget=0.2, mode="reference", progress=False)
    expected = published.critical_mask(theirs, DataLoader(data(50), batch_size=16), budget=0.2)
    for name, m in expected.items():
        assert torch.equal(mask[name], m.bool()), name
    assert all(p.grad is None for p in ours.parameters())


def test_masked_finetune_reference_matches_transcription():
    ours, theirs = make(), make()
    forget, retain = loaders()
    mask = ju.localize(ours, forget, mode="reference", progress=False)
    torch.manual_seed(5)
    forget, retain = loaders()
    report = ju.masked_finetune(
        ours,
        mask,
        retain,
        forget=forget,
        lr=0.1,
        epochs=2,
        weight_decay=1e-3,
        head="fc",
        mode="reference",
        progress=False,
    )
    torch.manual_seed(5)
    forget, retain = loaders()
    published.finetune(
        theirs, retain, forget, {n: m.long() for n, m in mask.items()}, lr=0.1, epochs=2, weight_decay=1e-3
    )
    assert report.steps == 8 and report.objective == "finetune"
    assert_bitwise_equal(ours, theirs)
    # A retain loader with its own generator does not see the forget loader: forget=None runs the same.
    ours, theirs = make(), make()
    retain = DataLoader(data(128, offset=40), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(3))
    ju.masked_finetune(ours, mask, retain, lr=0.1, epochs=2, head="fc", mode="reference", progress=False)
    retain.generator.manual_seed(3)
    published.finetune(theirs, retain, loaders()[0], {n: m.long() for n, m in mask.items()}, lr=0.1, epochs=2)
    assert_bitwise_equal(ours, theirs)


# ---------------------------------------------------------------- documented edge case: < 10 channels


def test_layers_under_ten_channels_take_h_one_in_reference_mode():
    ours, guarded, published_exact = make(NarrowNet), make(NarrowNet), make(NarrowNet)
    forget = DataLoader(data(48), batch_size=16)
    mask = ju.localize(ours, forget, budget=0.5, mode="reference", progress=False)
    with_guard = published.critical_mask(guarded, forget, budget=0.5)
    exact = published.critical_mask(published_exact, forget, budget=0.5, guard_small_layers=False)
    for name, m in with_guard.items():
        assert torch.equal(mask[name], m.bool()), name
    # The published h = 0 makes conv1's scores NaN: it is never selected.  With h = max(1, 0) = 1 its
    # rows compete for the budget like any other.
    assert not exact["conv1.weight"].any()
    assert mask["conv1.weight"].any()
    assert int(sum(m.sum() for m in exact.values())) == int(sum(m.sum() for m in mask.values()))


# ---------------------------------------------------------------- what the reference mode does differently


class CountingLoader(DataLoader):
    """A DataLoader that counts how often it is opened."""

    opened = 0

    def __iter__(self):
        self.opened += 1
        return super().__iter__()


def test_loaders_are_opened_like_the_published_loop():
    epochs = 3
    for mode, forget_opens, retain_opens in [("reference", 1 + epochs, epochs), ("default", 2, 1 + epochs)]:
        forget = CountingLoader(data(40), batch_size=16)
        retain = CountingLoader(data(96, offset=40), batch_size=32, shuffle=True)
        ju.del_unlearn(make(), forget, retain, init=WideNet, epochs=epochs, mode=mode, progress=False)
        assert (forget.opened, retain.opened) == (forget_opens, retain_opens), mode


@pytest.mark.parametrize("mode", ["reference", "default"])
def test_weight_decay_moves_unmasked_entries_only_in_reference_mode(mode):
    net = make()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    report = ju.del_unlearn(
        net, data(40), data(96, offset=40), init=WideNet, epochs=1, weight_decay=0.05, mode=mode, progress=False
    )
    moved = 0
    for n, p in net.named_parameters():
        if not n.startswith("fc."):
            keep = ~report.mask[n]
            moved += int((p.detach()[keep] != before[n][keep]).sum())
    assert (moved > 0) == (mode == "reference")


def test_reference_reset_is_the_published_blend():
    # θ·(1 − m) + θ_init·m, worked out by hand: -0·1 + 5·0 = +0; 2·0 + 0·1 = +0; 3·0 + (-0)·1 = +0;
    # -0·0 + 1·1 = 1; 4·1 + 9·0 = 4.  A select would keep -0 in the first and third entries.
    p = torch.tensor([-0.0, 2.0, 3.0, -0.0, 4.0])
    init = torch.tensor([5.0, 0.0, -0.0, 1.0, 9.0])
    m = torch.tensor([False, True, True, True, False])
    reference_reset_([p], [init], [m])
    assert torch.equal(bits(p), bits(torch.tensor([0.0, 0.0, 0.0, 1.0, 4.0])))


def test_reference_keeps_the_callers_grad():
    net = make()
    grads = [torch.full_like(p, 7.0) for p in net.parameters()]
    for p, g in zip(net.parameters(), grads):
        p.grad = g
    ju.del_unlearn(net, data(40), data(64, offset=40), init=WideNet, epochs=1, mode="reference", progress=False)
    assert all(p.grad is g and bool((g == 7.0).all()) for p, g in zip(net.parameters(), grads))


# ---------------------------------------------------------------- checks, restore and finiteness


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        ({"mode": "published"}, ValueError, "mode"),
        ({"mode": "reference", "criterion": "random"}, ValueError, "criterion"),
        ({"mode": "reference", "budget": 0.0}, ValueError, "budget"),
        ({"mode": "reference", "lr": -1.0}, ValueError, "lr"),
        ({"mode": "reference", "init": lambda: NarrowNet()}, ValueError, "init"),
    ],
)
def test_reference_bad_arguments_leave_model_untouched(kwargs, exc, word):
    net = make()
    before = state_bits(net)
    args = {"init": WideNet, "epochs": 1, "progress": False, **kwargs}
    with pytest.raises(exc, match=word):
        ju.del_unlearn(net, data(20), data(60, offset=20), **args)
    assert_bitwise_equal(before, net)


def test_reference_bad_data_leaves_model_untouched():
    net = make()
    before = state_bits(net)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)), batch_size=4)
    with pytest.raises(ValueError, match="retain"):
        ju.del_unlearn(net, data(20), empty, init=WideNet, epochs=1, mode="reference", progress=False)
    with pytest.raises(ValueError, match="forget"):
        ju.del_unlearn(net, empty, data(60), init=WideNet, epochs=1, mode="reference", progress=False)
    # Batches without labels are not peeked at in reference mode: the error comes from the first
    # fine-tuning step, after the reset, and the model is restored.
    unlabelled = DataLoader(TensorDataset(digits(image=True).tensors[0][:64]), batch_size=32)
    with pytest.raises(ValueError, match="retain"):
        ju.del_unlearn(net, data(20), unlabelled, init=WideNet, epochs=1, mode="reference", progress=False)
    mask = ju.localize(net, data(20), progress=False)
    with pytest.raises(ValueError, match="objective"):
        ju.masked_finetune(
            net,
            mask,
            data(60),
            forget=data(20),
            objective="relabel",
            lr=0.1,
            epochs=1,
            mode="reference",
            progress=False,
        )
    assert_bitwise_equal(before, net)


def test_reference_failures_restore_the_model():
    net = make()
    net.eval()
    before = state_bits(net)
    retain = list(DataLoader(data(96, offset=20), batch_size=32))
    with pytest.raises(KeyboardInterrupt):
        ju.del_unlearn(
            net, data(20), InterruptingBatches(retain, at=4), init=WideNet, epochs=3, mode="reference", progress=False
        )
    assert_bitwise_equal(before, net)
    assert not any(m.training for m in net.modules())
    with pytest.raises(RuntimeError, match="diverged"):
        ju.del_unlearn(net, data(20), data(96), init=WideNet, lr=1e35, epochs=2, mode="reference", progress=False)
    assert_bitwise_equal(before, net)
    for p in net.parameters():
        p.grad = None
    bad_init = WideNet().state_dict()
    bad_init["conv2.weight"][0, 0, 0, 0] = float("inf")  # inf · 0 = NaN in the blend, selected or not
    with pytest.raises(ValueError, match="init"):
        ju.del_unlearn(net, data(20), data(96), init=bad_init, epochs=1, mode="reference", progress=False)
    assert_bitwise_equal(before, net)
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
