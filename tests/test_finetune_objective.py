"""The fine-tuning loop's hooks used by the baselines: mask=None (every parameter trains) and
FinetuneObjective (a loss callable per step, forget passes), with the mask still respected."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
from jit_unlearn.data import digits
from jit_unlearn.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")


def net(seed=0):
    torch.manual_seed(seed)
    return MLP(64, (16,), 10)


def rows(n, offset=0):
    x, y = digits().tensors
    return TensorDataset(x[offset : offset + n], y[offset : offset + n])


def ce(model, x, y, xf, yf):
    return F.cross_entropy(model(x), y)


def test_objective_checks_its_fields():
    with pytest.raises(TypeError, match="step_loss"):
        ju.FinetuneObjective(3)
    with pytest.raises(TypeError, match="forget_pass_loss"):
        ju.FinetuneObjective(ce, forget_pass_loss="ascend")
    with pytest.raises(TypeError, match="pair_forget"):
        ju.FinetuneObjective(ce, pair_forget=1)
    with pytest.raises(ValueError, match="forget_pass_epochs"):
        ju.FinetuneObjective(ce, forget_pass_epochs=-1)
    with pytest.raises(TypeError, match="name"):
        ju.FinetuneObjective(ce, name=None)


def test_objective_needs_forget_when_it_uses_it():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="forget"):
        ju.masked_finetune(
            model,
            None,
            rows(32),
            objective=ju.FinetuneObjective(ce, pair_forget=True),
            lr=0.1,
            epochs=1,
            progress=False,
        )
    unsized = (b for b in DataLoader(rows(16, 100), batch_size=8))
    passes = ju.FinetuneObjective(ce, forget_pass_loss=lambda m, x, y: -F.cross_entropy(m(x), y), forget_pass_epochs=1)
    with pytest.raises(TypeError, match="forget"):
        ju.masked_finetune(model, None, rows(32), forget=unsized, objective=passes, lr=0.1, epochs=1, progress=False)
    with pytest.raises(TypeError, match="mask"):
        ju.masked_finetune(model, {}, rows(32), lr=0.1, epochs=1, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_calls_steps_and_report():
    calls = []

    def step_loss(model, x, y, xf, yf):
        calls.append(("step", x.shape[0], None if xf is None else xf.shape[0]))
        return F.cross_entropy(model(x), y)

    def pass_loss(model, xf, yf):
        calls.append(("pass", xf.shape[0]))
        return -F.cross_entropy(model(xf), yf)

    objective = ju.FinetuneObjective(step_loss, forget_pass_loss=pass_loss, forget_pass_epochs=5, name="probe")
    report = ju.masked_finetune(
        net(),
        None,
        DataLoader(rows(40), batch_size=16),
        forget=DataLoader(rows(12, 100), batch_size=8),
        objective=objective,
        lr=0.01,
        epochs=2,
        progress=False,
    )
    epoch = [("pass", 8), ("pass", 4), ("step", 16, None), ("step", 16, None), ("step", 8, None)]
    assert calls == epoch * 2  # forget_pass_epochs is clipped to epochs
    assert (report.objective, report.steps, report.epochs) == ("probe", 10, 2)
    assert report.trainable == sum(p.numel() for p in net().parameters())

    calls.clear()
    paired = ju.FinetuneObjective(step_loss, pair_forget=True)
    ju.masked_finetune(
        net(),
        None,
        DataLoader(rows(40), batch_size=16),
        forget=DataLoader(rows(12, 100), batch_size=8),
        objective=paired,
        lr=0.01,
        epochs=1,
        progress=False,
    )
    assert calls == [("step", 16, 8), ("step", 16, 4), ("step", 8, 8)]  # forget batches cycled


def test_custom_objective_respects_the_mask():
    model = net()
    mask = ju.Mask(
        {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.3 for n, p in model.named_parameters()}
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = ju.FinetuneObjective(
        ce, forget_pass_loss=lambda m, x, y: -F.cross_entropy(m(x), y), forget_pass_epochs=1
    )
    ju.masked_finetune(
        model,
        mask,
        rows(64),
        forget=rows(16, 100),
        objective=objective,
        lr=0.1,
        epochs=2,
        weight_decay=0.01,
        batch_size=16,
        progress=False,
    )
    for n, p in model.named_parameters():
        assert torch.equal(p.detach()[~mask[n]], before[n][~mask[n]]), n
        assert bool((p.detach() != before[n])[mask[n]].any()), n


def test_no_mask_equals_a_full_mask():
    a, b = net(), net()
    full = ju.Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in b.named_parameters()})
    for model, mask in ((a, None), (b, full)):
        ju.masked_finetune(
            model,
            mask,
            rows(64),
            forget=rows(16, 100),
            objective="neggrad_plus",
            lr=0.05,
            epochs=2,
            weight_decay=0.01,
            batch_size=16,
            progress=False,
        )
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n


def test_reference_mode_takes_neither_hook():
    model = net()
    mask = ju.Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match="mask"):
        ju.masked_finetune(model, None, rows(32), lr=0.1, epochs=1, mode="reference", progress=False)
    with pytest.raises(ValueError, match="objective"):
        ju.masked_finetune(
            model,
            mask,
            rows(32),
            objective=ju.FinetuneObjective(ce),
            lr=0.1,
            epochs=1,
            mode="reference",
            progress=False,
        )
