"""Tests for jit_unlearn.baselines: each one against a plain transcription of its update written
here (torch.optim.SGD and explicit losses), argument checks, restore on failure, and real forgetting
on the bundled digits with default arguments."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bitwise import assert_bitwise_equal, state_bits
from interrupts import InterruptingBatches
from jit_unlearn import baselines
from jit_unlearn.data import digits
from jit_unlearn.eval import Recipe, evaluate, full_class, train
from jit_unlearn.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")

BASELINES = ["finetune", "neggrad_plus", "random_label", "bad_teacher", "scrub"]


def small_net(seed=0, dtype=torch.float64, dropout=0.0):
    torch.manual_seed(seed)
    return MLP(64, (24,), 10, dropout=dropout).to(dtype)


def digit_rows(n, offset=0, dtype=torch.float64):
    x, y = digits().tensors
    return x[offset : offset + n].to(dtype), y[offset : offset + n]


def loader(x, y, size):
    return DataLoader(TensorDataset(x, y), batch_size=size)


def cosine(lr, step, total):
    eta_min = 0.01 * lr
    return eta_min + 0.5 * (lr - eta_min) * (1 + math.cos(math.pi * step / total))


def sgd_transcription(model, steps, *, lr, momentum, weight_decay):
    """Plain torch.optim.SGD over `steps` (a list of zero-argument closures returning the loss of
    the current model), learning rate set per step by the cosine schedule, model in train mode."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    for i, loss_fn in enumerate(steps):
        for group in opt.param_groups:
            group["lr"] = cosine(lr, i, len(steps))
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    model.eval()
    return model


def kl_batchmean(student, teacher, tau):
    p_t = torch.softmax(teacher / tau, dim=1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(student / tau, dim=1))).sum(dim=1).mean()


def assert_close_params(a, b):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-11, msg=name)


# ---------------------------------------------------------------- transcriptions

HP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}


def test_finetune_is_plain_sgd_on_retain():
    xr, yr = digit_rows(96)
    net, ref = small_net(), small_net()
    report = baselines.finetune(net, None, loader(xr, yr, 32), epochs=2, progress=False, **HP)
    steps = [lambda x=x, y=y: F.cross_entropy(ref(x), y) for _ in range(2) for x, y in loader(xr, yr, 32)]
    sgd_transcription(ref, steps, **HP)
    assert_close_params(net, ref)
    assert (report.method, report.epochs, report.steps) == ("finetune", 2, 6)
    assert math.isfinite(report.final_loss) and report.seconds > 0


def test_neggrad_plus_transcription():
    xr, yr = digit_rows(96)
    xf, yf = digit_rows(40, offset=200)
    net, ref = small_net(), small_net()
    baselines.neggrad_plus(net, loader(xf, yf, 16), loader(xr, yr, 32), epochs=2, beta=0.2, progress=False, **HP)
    forget_batches = list(loader(xf, yf, 16))  # 16, 16, 8, cycled: one per retain step
    steps = []
    for i, (x, y) in enumerate([b for _ in range(2) for b in loader(xr, yr, 32)]):
        fx, fy = forget_batches[i % 3]
        steps.append(lambda x=x, y=y, fx=fx, fy=fy: F.cross_entropy(ref(x), y) - 0.2 * F.cross_entropy(ref(fx), fy))
    sgd_transcription(ref, steps, **HP)
    assert_close_params(net, ref)


def test_random_label_transcription():
    xr, yr = digit_rows(96)
    xf, yf = digit_rows(32, offset=200)
    net, ref = small_net(), small_net()
    baselines.random_label(net, loader(xf, yf, 32), loader(xr, yr, 32), epochs=2, seed=5, progress=False, **HP)
    rng = torch.Generator().manual_seed(5)  # the label draws: U{1..9} added mod 10, one draw per step
    steps = []
    for x, y in [b for _ in range(2) for b in loader(xr, yr, 32)]:
        wrong = (yf + torch.randint(1, 10, yf.shape, generator=rng)) % 10
        assert not bool((wrong == yf).any())
        steps.append(lambda x=x, y=y, w=wrong: F.cross_entropy(ref(x), y) + F.cross_entropy(ref(xf), w))
    sgd_transcription(ref, steps, **HP)
    assert_close_params(net, ref)


def test_bad_teacher_transcription():
    xr, yr = digit_rows(96)
    xf, yf = digit_rows(24, offset=200)
    net, ref = small_net(), small_net()
    competent, incompetent = small_net(), small_net(seed=7)
    report = baselines.bad_teacher(
        net,
        loader(xf, yf, 8),
        loader(xr, yr, 32),
        incompetent=incompetent,
        temperature=2.0,
        retain_fraction=1.0,
        epochs=2,
        progress=False,
        **HP,
    )
    steps = []
    forget_batches = list(loader(xf, yf, 8))
    for i, (x, _) in enumerate([b for _ in range(2) for b in loader(xr, yr, 32)]):
        fx = forget_batches[i % 3]
        with torch.no_grad():
            target = torch.cat([competent.eval()(x), incompetent.eval()(fx[0])])
        steps.append(lambda x=x, fx=fx[0], t=target: kl_batchmean(ref(torch.cat([x, fx])), t, 2.0))
    sgd_transcription(ref, steps, **HP)
    assert_close_params(net, ref)
    assert report.steps == 6
    assert_bitwise_equal(state_bits(incompetent), state_bits(small_net(seed=7)))  # the teacher given is not moved


def test_scrub_transcription():
    xr, yr = digit_rows(96)
    xf, yf = digit_rows(40, offset=200)
    net, ref, teacher = small_net(), small_net(), small_net().eval()
    tau, alpha, gamma = 4.0, 0.3, 0.9
    report = baselines.scrub(
        net,
        loader(xf, yf, 16),
        loader(xr, yr, 32),
        epochs=3,
        max_epochs=2,
        temperature=tau,
        alpha=alpha,
        gamma=gamma,
        progress=False,
        **HP,
    )
    steps = []
    for epoch in range(3):
        if epoch < 2:  # max pass: ascend the tempered divergence to the teacher on every forget batch
            for fx, _ in loader(xf, yf, 16):
                steps.append(lambda fx=fx: -(tau**2) * kl_batchmean(ref(fx), teacher(fx).detach(), tau))
        for x, y in loader(xr, yr, 32):  # min pass
            steps.append(
                lambda x=x, y=y: (
                    gamma * F.cross_entropy(ref(x), y) + alpha * tau**2 * kl_batchmean(ref(x), teacher(x).detach(), tau)
                )
            )
    sgd_transcription(ref, steps, **HP)
    assert_close_params(net, ref)
    assert (report.method, report.steps) == ("scrub", 3 * 3 + 2 * 3)


def test_bad_teacher_mix_and_subset():
    # Datasets: a seeded 50 % of 90 retain samples (45, in 2 batches of 32), forget batches of
    # ceil(30 / 2) = 15 so that each epoch visits every forget sample once.
    xr, yr = digit_rows(90)
    xf, yf = digit_rows(30, offset=200)
    seen = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if self.training:
                seen.append(x.shape[0])
            return self.inner(x)

    net = Spy(small_net())
    report = baselines.bad_teacher(
        net, TensorDataset(xf, yf), TensorDataset(xr, yr), retain_fraction=0.5, batch_size=32, epochs=1, progress=False
    )
    assert report.steps == 2
    assert seen == [32 + 15, 13 + 15]


# ---------------------------------------------------------------- real forgetting, default arguments


@pytest.fixture(scope="module", params=[3, 1])
def digits_model(request):
    """An MLP trained on 80 % of the bundled digits (the demo's recipe: SGD, label smoothing 0.1),
    and the full-class split forgetting one digit."""
    splits = full_class(digits(), request.param, seed=0)
    torch.manual_seed(0)
    model = MLP(64, (256, 256), 10)
    train(model, splits.train, Recipe(epochs=10, lr=0.05, batch_size=32, label_smoothing=0.1, seed=0))
    original = evaluate(model.eval(), splits, mia=False)
    assert original["forget_acc"] >= 0.95 and original["test_acc_remaining"] >= 0.95
    return splits, model, original


@pytest.mark.parametrize("name", BASELINES)
def test_forgets_with_default_arguments(digits_model, name):
    splits, model, original = digits_model
    model = copy.deepcopy(model)
    report = getattr(baselines, name)(model, splits.forget, splits.retain, progress=False)
    after = evaluate(model, splits, mia=False)
    assert report.method == name and report.steps > 0 and report.seconds > 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert after["test_acc_remaining"] >= original["test_acc_remaining"] - 0.08
    if name != "finetune":
        assert after["forget_acc"] <= original["forget_acc"] / 2


# ---------------------------------------------------------------- arguments and failures


def _sources():
    xr, yr = digit_rows(64)
    xf, yf = digit_rows(16, offset=200)
    return TensorDataset(xf, yf), TensorDataset(xr, yr)


BAD = [
    ("finetune", {"lr": -1.0}, ValueError, "lr"),
    ("finetune", {"epochs": 1.5}, TypeError, "epochs"),
    ("finetune", {"progress": "no"}, TypeError, "progress"),
    ("finetune", {"retain": None}, ValueError, "retain"),
    ("neggrad_plus", {"beta": -0.1}, ValueError, "beta"),
    ("neggrad_plus", {"forget": None}, ValueError, "forget"),
    ("neggrad_plus", {"momentum": 1.0}, ValueError, "momentum"),
    ("random_label", {"forget": None}, ValueError, "forget"),
    ("random_label", {"batch_size": 0}, ValueError, "batch_size"),
    ("bad_teacher", {"temperature": 0.0}, ValueError, "temperature"),
    ("bad_teacher", {"retain_fraction": 0.0}, ValueError, "retain_fraction"),
    ("bad_teacher", {"retain_fraction": 1.5}, ValueError, "retain_fraction"),
    ("bad_teacher", {"incompetent": "random"}, TypeError, "incompetent"),
    ("bad_teacher", {"incompetent": lambda: MLP(64, (24,), 7).double()}, ValueError, "incompetent"),
    ("bad_teacher", {"incompetent": lambda: "model"}, TypeError, "incompetent"),
    ("bad_teacher", {"forget": None}, ValueError, "forget"),
    ("bad_teacher", {"seed": -1}, ValueError, "seed"),
    ("bad_teacher", {"weight_decay": float("nan")}, ValueError, "weight_decay"),
    ("scrub", {"max_epochs": -1}, ValueError, "max_epochs"),
    ("scrub", {"alpha": -1.0}, ValueError, "alpha"),
    ("scrub", {"gamma": float("inf")}, ValueError, "gamma"),
    ("scrub", {"forget_batch_size": 0}, ValueError, "forget_batch_size"),
    ("scrub", {"temperature": -2.0}, ValueError, "temperature"),
    ("scrub", {"forget": None}, ValueError, "forget"),
    ("scrub", {"lr": 0}, ValueError, "lr"),
]


@pytest.mark.parametrize("name,change,error,match", BAD)
def test_bad_arguments_name_the_argument_and_leave_the_model(name, change, error, match):
    net = small_net()
    forget, retain = _sources()
    args = {"forget": forget, "retain": retain, **change}
    before = state_bits(net)
    with pytest.raises(error, match=match):
        getattr(baselines, name)(
            net,
            args.pop("forget"),
            args.pop("retain"),
            epochs=args.pop("epochs", 1),
            progress=args.pop("progress", False),
            **args,
        )
    assert_bitwise_equal(before, state_bits(net))


@pytest.mark.parametrize("name", BASELINES)
def test_model_argument_checked(name):
    forget, retain = _sources()
    with pytest.raises(TypeError, match="model"):
        getattr(baselines, name)("model", forget, retain, progress=False)


def test_retain_fraction_needs_a_dataset():
    net = small_net()
    forget, retain = _sources()
    with pytest.raises(ValueError, match="retain_fraction"):
        baselines.bad_teacher(net, forget, DataLoader(retain, batch_size=16), progress=False)
    baselines.bad_teacher(net, forget, DataLoader(retain, batch_size=16), retain_fraction=1.0, progress=False)


def test_default_incompetent_teacher_needs_reset_parameters():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = MLP(64, (24,), 10).double()
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))  # no reset_parameters owns it

        def forward(self, x):
            return self.scale * self.body(x)

    net = Scaled()
    forget, retain = _sources()
    before = state_bits(net)
    with pytest.raises(ValueError, match="incompetent"):
        baselines.bad_teacher(net, forget, retain, progress=False)
    assert_bitwise_equal(before, state_bits(net))
    baselines.bad_teacher(net, forget, retain, incompetent=Scaled, epochs=1, progress=False)


def test_default_incompetent_teacher_is_seeded():
    forget, retain = _sources()
    results = []
    for seed in (0, 0, 1):
        net = small_net()
        rng = torch.get_rng_state()
        baselines.bad_teacher(net, forget, retain, seed=seed, progress=False)
        assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
        results.append(state_bits(net))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert not all(torch.equal(results[0][k], results[2][k]) for k in results[0])


@pytest.mark.parametrize("name", BASELINES)
def test_interrupt_and_divergence_restore_the_model(name):
    net = small_net(dropout=0.2)
    net.eval()
    forget, retain = _sources()
    before = state_bits(net)
    interrupting = InterruptingBatches(list(DataLoader(retain, batch_size=16)), at=3)
    kwargs = {"retain_fraction": 1.0} if name == "bad_teacher" else {}
    with pytest.raises(KeyboardInterrupt):
        getattr(baselines, name)(net, forget, interrupting, epochs=3, progress=False, **kwargs)
    assert_bitwise_equal(before, state_bits(net))
    assert not any(m.training for m in net.modules())
    with pytest.raises(RuntimeError, match="diverged"):
        getattr(baselines, name)(net, forget, retain, lr=1e200, epochs=2, progress=False)
    assert_bitwise_equal(before, state_bits(net))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("name", BASELINES)
def test_float32_model_runs_with_tensors_of_any_source(name):
    xr, yr = digit_rows(64, dtype=torch.float32)
    xf, yf = digit_rows(16, offset=200, dtype=torch.float32)
    net = small_net(dtype=torch.float32)
    report = getattr(baselines, name)(
        net,
        TensorDataset(xf, yf),
        loader(xr, yr, 16),
        epochs=1,
        progress=False,
        **({"retain_fraction": 1.0} if name == "bad_teacher" else {}),
    )
    assert report.steps > 0 and all(bool(torch.isfinite(p).all()) for p in net.parameters())
