"""jit_unlearn.jit against literal transcriptions of docs/METHODS.md §1, plus forgetting and safety.

The default mode is checked against `oracles.jit_default`, a float64 composition from plain PyTorch
whose noise comes from an independent Philox / Box-Muller transcription (not from torch_ops), so the
check holds on the pure-PyTorch tier too.  Reduced precision: test_precision.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn
import oracles
from conftest import expected_tier
from jit_unlearn import _backend, jit
from jit_unlearn.data import digits, mnist
from jit_unlearn.models import MLP, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, saved):
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


def _assert_state_close(a, b, rtol=1e-5, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)


def _flags(model):
    return [m.training for m in model.modules()]


def _mlp(seed=0, dropout=0.2):
    torch.manual_seed(seed)
    return MLP(64, (32, 32), 10, dropout=dropout)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(1, 10, width=8, dropout=0.2)


def _forget(shape, n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g)


def _published_loop(model, loader, sigma, lr, n, reduction="sum"):
    """docs/METHODS.md §1, reference mode, written out literally ("mean" divides the loss by B)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    for batch in loader:
        x = batch[0]
        out = model(x)
        k_sum = torch.tensor(0.0)
        for _ in range(n):
            lo, hi = x.min(), x.max()
            x2 = torch.clamp(x + torch.randn(x.size()) * sigma, min=lo, max=hi)
            with torch.no_grad():
                out2 = model(x2)
            num = torch.linalg.vector_norm(out - out2, dim=1)
            den = torch.linalg.vector_norm(x.reshape(x.shape[0], -1) - x2.reshape(x2.shape[0], -1), dim=1)
            k_sum = k_sum + (num / den).sum()
        loss = k_sum / n
        if reduction == "mean":
            loss = loss / x.shape[0]
        loss.backward()
        opt.step()


def _tier(backend: str) -> str:
    return "cpu" if backend == "compiled" else "torch"


def _oracle(model, x, batch_size, **kwargs):
    """The float64 oracle run on a copy of `model`: (state before, state after, losses)."""
    ref = copy.deepcopy(model).double()
    before = oracles.state(ref)
    losses = oracles.jit_default(ref, x.double().split(batch_size), **kwargs)
    return before, oracles.state(ref), losses


def test_oracle_generator_is_philox4x32_10():
    # Random123 known answers: the oracle's noise comes from the published generator, not from ours
    mask = 0xFFFFFFFF
    assert [int(w) for w in oracles.philox4x32_10((0, 0, 0, 0), (0, 0))] == [
        0x6627E8D5,
        0xE169C58D,
        0xBC57AC4C,
        0x9B00DBD8,
    ]
    assert [int(w) for w in oracles.philox4x32_10((mask,) * 4, (mask, mask))] == [
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    ]
    z = oracles.normal(200_000, 3, 1)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


# ---------------------------------------------------------------- reference mode


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("make,shape", [(_mlp, (64,)), (_cnn, (1, 8, 8))], ids=["mlp", "cnn_bn_dropout"])
def test_reference_matches_literal_transcription(make, shape, reduction):
    ours, theirs = make().train(), make().train()
    data = TensorDataset(_forget(shape), torch.zeros(40, dtype=torch.int64))
    lr = 0.05 if reduction == "sum" else 0.05 * 16  # comparable steps
    torch.manual_seed(123)
    report = jit(
        ours,
        data,
        sigma=0.3,
        lr=lr,
        num_samples=4,
        batch_size=16,
        mode="reference",
        reduction=reduction,
        progress=False,
    )
    torch.manual_seed(123)
    _published_loop(theirs, DataLoader(data, batch_size=16), sigma=0.3, lr=lr, n=4, reduction=reduction)
    assert any(not torch.equal(p, q) for p, q in zip(ours.parameters(), make().parameters()))  # it moved
    _assert_state_close(ours, theirs)  # parameters and BatchNorm running statistics
    assert (report.steps, report.samples, report.mode, report.backend) == (3, 40, "reference", "torch")
    # gradients accumulate across batches and are left in .grad, as in the published code
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_reference_reads_triples_keeps_modes_and_clears_stale_grads():
    ours, theirs = _cnn(), _cnn()
    for m in (ours, theirs):
        m.train()
        m.features[1].eval()  # one BatchNorm in eval mode: the caller's mixed flags stay as they are
        for p in m.parameters():
            p.grad = torch.full_like(p, 7.0)  # stale gradients must not leak into the first step
    x = _forget((1, 8, 8), n=24)
    triples = DataLoader(TensorDataset(x, torch.zeros(24), torch.ones(24, dtype=torch.int64)), batch_size=8)
    flags = _flags(ours)
    torch.manual_seed(5)
    jit(ours, triples, sigma=0.2, lr=0.1, num_samples=3, mode="reference", progress=False)
    theirs.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    _published_loop(theirs, DataLoader(TensorDataset(x), batch_size=8), sigma=0.2, lr=0.1, n=3)
    assert _flags(ours) == flags
    _assert_state_close(ours, theirs)


# ---------------------------------------------------------------- default mode


@pytest.mark.parametrize("make,shape", [(_mlp, (64,)), (_cnn, (1, 8, 8))], ids=["mlp", "cnn_bn_dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_matches_independent_oracle(make, shape, backend, dtype):
    # float32: the error is about 1e-6 of the update, float64 about 4e-8 (the oracle's noise is
    # float64 Box-Muller, the kernels' float32); a wrong lr (0 or 2x) is an error of 1.0 or more.
    ours = make().to(dtype).train()
    x = _forget(shape).to(dtype)
    flags = _flags(ours)
    bn_stats = {k: v.clone() for k, v in ours.state_dict().items() if "running" in k or "batches" in k}
    before, want, losses = _oracle(ours, x, 16, sigma=0.3, lr=0.05, n=5, seed=11)
    report = jit(ours, x, sigma=0.3, lr=0.05, num_samples=5, batch_size=16, seed=11, progress=False)
    oracles.assert_update_close(before, oracles.state(ours), want, rel=1e-4 if dtype == torch.float32 else 1e-6)
    assert report.mean_loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert _flags(ours) == flags  # the caller's train mode is back
    for k, v in bn_stats.items():  # eval mode during the step: BatchNorm statistics untouched
        assert torch.equal(ours.state_dict()[k], v)
    assert all(p.grad is None for p in ours.parameters())
    assert (report.steps, report.samples, report.mode) == (3, 40, "default")
    assert report.backend == _tier(backend)


def test_compiled_tier_equals_fallback_tier():
    if not _backend.has_kernel("cpu"):
        pytest.skip("compiled CPU kernels not built")
    x = _forget((1, 8, 8))
    models = {}
    try:
        for tier in ("compiled", "torch"):
            _backend.force_backend(tier)
            models[tier] = _cnn()
            jit(models[tier], x, sigma=0.3, lr=0.05, num_samples=5, batch_size=16, seed=3, progress=False)
    finally:
        _backend.force_backend(None)
    _assert_state_close(models["compiled"], models["torch"], rtol=1e-5, atol=1e-6)


def test_reduction_mean_divides_by_batch_size(backend):
    ours = _mlp()
    x = _forget((64,), n=30)
    before, want, _ = _oracle(ours, x, 12, sigma=0.5, lr=0.5, n=3, seed=0, reduction="mean")
    jit(ours, x, sigma=0.5, lr=0.5, num_samples=3, batch_size=12, reduction="mean", progress=False)
    oracles.assert_update_close(before, oracles.state(ours), want, rel=1e-4)
    # one batch: mean with lr * B is the sum with lr
    a, b = _mlp(), _mlp()
    jit(a, x, sigma=0.5, lr=0.01 * 30, num_samples=3, batch_size=30, reduction="mean", progress=False)
    jit(b, x, sigma=0.5, lr=0.01, num_samples=3, batch_size=30, reduction="sum", progress=False)
    _assert_state_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_forward_equals_unchunked():
    whole, chunked = _cnn(), _cnn()
    x = _forget((1, 8, 8))
    r1 = jit(whole, x, sigma=0.3, lr=0.05, num_samples=6, batch_size=16, progress=False)
    # 7 samples of 64 elements per chunk: uneven chunks of the 6 * 16 perturbed samples
    r2 = jit(chunked, x, sigma=0.3, lr=0.05, num_samples=6, batch_size=16, max_batch_elems=7 * 64 + 5, progress=False)
    _assert_state_close(whole, chunked, rtol=1e-4, atol=1e-6)
    assert r1.mean_loss == pytest.approx(r2.mean_loss, rel=1e-5)


def test_default_same_for_tensor_dataset_and_loader():
    x = _forget((64,), n=30)
    runs = {}
    for kind, forget, bs in [
        ("tensor", x, 8),
        ("dataset", TensorDataset(x, torch.zeros(30)), 8),
        ("loader", DataLoader(TensorDataset(x), batch_size=8), None),
    ]:
        runs[kind] = _mlp()
        jit(runs[kind], forget, sigma=0.3, lr=0.05, num_samples=3, batch_size=bs, progress=False)
    for kind in ("dataset", "loader"):
        _assert_state_equal(runs[kind], _state(runs["tensor"]))


def test_default_seed_takes_the_whole_uint64_range(backend):
    """A seed in [2^63, 2^64) means the uint64 whose bits the int64 seed - 2^64 has: the two runs agree."""
    x = _forget((64,), n=16)
    runs = {}
    for seed in (2**63 + 5, 5 - 2**63, 5):
        runs[seed] = _mlp()
        jit(runs[seed], x, sigma=0.3, lr=0.05, num_samples=3, batch_size=8, seed=seed, progress=False)
    _assert_state_equal(runs[2**63 + 5], _state(runs[5 - 2**63]))
    assert not torch.equal(next(runs[5].parameters()), next(runs[2**63 + 5].parameters()))  # the seed matters


def test_default_with_user_optimizer(backend):
    ours = _mlp(dropout=0.0)
    x = _forget((64,), n=32)
    # the same three steps with momentum, from the oracle's gradients
    theirs = copy.deepcopy(ours).double()
    before = oracles.state(theirs)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    oracles.jit_default(theirs, x.double().split(12), sigma=0.4, lr=None, n=3, seed=0, optimizer=ref_opt)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    jit(ours, x, sigma=0.4, lr=123.0, num_samples=3, batch_size=12, optimizer=opt, progress=False)
    oracles.assert_update_close(before, oracles.state(ours), oracles.state(theirs), rel=1e-4)
    assert len(opt.state) == len(list(ours.parameters()))


def test_zero_input_difference_is_guarded():
    model = _mlp()
    saved = _state(model)
    x = torch.full((8, 64), 0.5)  # clamp range is a single value: every perturbation is clamped away
    report = jit(model, x, sigma=1.0, lr=1.0, num_samples=4, progress=False)
    assert report.mean_loss == 0.0
    _assert_state_equal(model, saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["default", "reference"])
def test_cuda_matches_cpu(mode):
    # default: the same Philox noise on both devices; reference: the noise comes from the global CPU
    # generator on both.  No dropout (its mask would come from the CUDA generator).
    cpu = _mlp(dropout=0.0).train()
    gpu = copy.deepcopy(cpu).cuda()
    x = _forget((64,))
    for model, data in ((cpu, x), (gpu, x.cuda())):
        torch.manual_seed(7)
        report = jit(model, data, sigma=0.3, lr=0.05, num_samples=4, batch_size=16, mode=mode, progress=False)
        assert report.steps == 3
        # the tier that ran: reference mode is plain PyTorch; the default mode runs the compiled
        # kernels of the model's device unless they are missing or JIT_UNLEARN_BACKEND=torch
        tier = expected_tier(next(model.parameters()).device.type)
        assert report.backend == ("torch" if mode == "reference" else tier)
    _assert_state_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_public_name_progress_bar_and_lr_zero():
    # lr = 0 takes its steps without moving anything; the loss it reports is the oracle's
    assert jit_unlearn.jit is jit
    model, x = _mlp(), _forget((64,), n=12)
    saved = _state(model)
    ref = copy.deepcopy(model).double().eval()
    want = [float(oracles.jit_loss(ref, xb, 2, 0.1, 0, t, "sum").detach()) for t, xb in enumerate(x.split(5))]
    report = jit(model, x, sigma=0.1, lr=0.0, num_samples=2, batch_size=5, progress=True)
    assert isinstance(report, jit_unlearn.JiTReport)
    assert (report.steps, report.samples, report.seconds > 0) == (3, 12, True)
    assert report.mean_loss == pytest.approx(sum(want) / 3, rel=1e-5) and sum(want) > 0
    _assert_state_equal(model, saved)


# ---------------------------------------------------------------- forgetting on real data


def _train_and_forget(dataset, n_train, in_features, epochs, forget_class, **jit_kwargs):
    """Train an MLP in_features-256-256-10 (AdamW 1e-3, batch 64, label smoothing 0.1) on the first
    n_train samples of a seeded permutation, forget every training sample of one class with jit,
    and return accuracies before/after on the forget class (train and held-out) and the other classes."""
    x, y = dataset.tensors
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:n_train], perm[n_train:]
    torch.manual_seed(0)
    model = MLP(in_features, (256, 256), 10)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.0)
    for _ in range(epochs):
        for idx in tr[torch.randperm(len(tr), generator=g)].split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    def accuracy(idx):
        with torch.no_grad():
            return (model(x[idx]).argmax(1) == y[idx]).float().mean().item()

    forget_tr, forget_te, retain_te = tr[y[tr] == forget_class], te[y[te] == forget_class], te[y[te] != forget_class]
    before = accuracy(forget_tr), accuracy(forget_te), accuracy(retain_te)
    jit(model, TensorDataset(x[forget_tr], y[forget_tr]), num_samples=25, progress=False, **jit_kwargs)
    return before, (accuracy(forget_tr), accuracy(forget_te), accuracy(retain_te))


def test_forgets_a_digits_class():
    # 1,797 8x8 digits in [0, 1]; class 3 has 144 training samples -> 3 steps.  Measured: forget
    # accuracy 0.91 -> 0.0, other classes 0.972 -> 0.946 (seeds 0-2: drop 2-3 points).
    before, after = _train_and_forget(digits(), 1400, 64, 15, 3, sigma=1.0, lr=1.7e-3, batch_size=64)
    assert before[1] > 0.85 and before[2] > 0.93
    assert after[0] < 0.3 and after[1] < 0.3
    assert after[2] > before[2] - 0.05


def test_forgets_an_mnist_class():
    # the bundled 10,000 MNIST images, normalised; 8,000 for training, class 3 has 806 -> 7 steps.
    # Measured: forget accuracy 0.94 -> 0.0 (training samples 0.995 -> 0.016), other classes 0.966 -> 0.964.
    before, after = _train_and_forget(mnist(), 8000, 784, 5, 3, sigma=0.5, lr=2e-3, batch_size=128)
    assert before[1] > 0.9 and before[2] > 0.94
    assert after[0] < 0.1 and after[1] < 0.1
    assert after[2] > before[2] - 0.02


# ---------------------------------------------------------------- bad arguments, restore on failure


class _ShapeModel(nn.Module):
    """A BatchNorm model (train mode: every forward changes buffers) whose output shape is chosen."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.bn = nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        out = self.fc(self.bn(x))
        if self.kind == "flat":
            return out.sum(1)
        if self.kind == "tuple":
            return out, out
        return out.unsqueeze(2)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(sigma=0.0), ValueError, "sigma"),
        (dict(sigma=-1.0), ValueError, "sigma"),
        (dict(sigma=float("nan")), ValueError, "sigma"),
        (dict(sigma="1"), TypeError, "sigma"),
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=float("inf")), ValueError, "lr"),
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(num_samples=2.0), TypeError, "num_samples"),
        (dict(mode="fast"), ValueError, "mode"),
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(max_batch_elems=0), ValueError, "max_batch_elems"),
        (dict(progress=None), TypeError, "progress"),
        (dict(optimizer="sgd"), TypeError, "optimizer"),
        (dict(optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)), ValueError, "optimizer"),
        (dict(forget=torch.empty(0, 64)), ValueError, "forget"),
        (dict(forget=TensorDataset(torch.empty(0, 64))), ValueError, "forget"),
        (dict(forget=DataLoader(TensorDataset(torch.empty(0, 64)), batch_size=4)), ValueError, "forget"),
        (
            dict(forget=DataLoader(TensorDataset(torch.rand(8, 64)), batch_size=4), batch_size=4),
            ValueError,
            "batch_size",
        ),
        (dict(forget=torch.randint(0, 5, (8, 64))), TypeError, "forget"),
        (dict(forget=torch.rand(8, 64, device="meta")), ValueError, "forget"),
        (dict(forget=42), TypeError, "forget"),
    ],
)
@pytest.mark.parametrize("mode", ["default", "reference"])
def test_bad_arguments_change_nothing(kwargs, exc, name, mode):
    model = _mlp().train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    saved, flags = _state(model), _flags(model)
    args = dict(forget=_forget((64,), n=8), sigma=0.1, lr=0.1, num_samples=2, mode=mode, progress=False)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        jit(model, **args)
    _assert_state_equal(model, saved)
    assert _flags(model) == flags
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_optimizer_rejected_in_reference_mode():
    model = _mlp()
    with pytest.raises(ValueError, match="optimizer"):
        jit(
            model,
            _forget((64,)),
            sigma=0.1,
            lr=0.1,
            mode="reference",
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            progress=False,
        )


def test_model_type_checked():
    with pytest.raises(TypeError, match="model"):
        jit(lambda x: x, _forget((64,)), sigma=0.1, lr=0.1, progress=False)


@pytest.mark.parametrize("kind", ["flat", "tuple", "3d"])
@pytest.mark.parametrize("mode", ["default", "reference"])
def test_non_logit_output_rejected_and_model_restored(kind, mode):
    model = _ShapeModel(kind).train()
    saved = _state(model)
    with pytest.raises((ValueError, TypeError), match="model"):
        jit(model, _forget((64,), n=16), sigma=0.1, lr=0.1, num_samples=2, mode=mode, progress=False)
    _assert_state_equal(model, saved)  # BatchNorm statistics of the failed forward put back too
    assert model.training and model.bn.training


class _FailOnCall(nn.Module):
    """SmallCNN-like model whose k-th forward raises `error`."""

    def __init__(self, k, error):
        super().__init__()
        self.net = _cnn()
        self.k, self.error, self.calls = k, error, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.k:
            raise self.error
        return self.net(x)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["runtime", "interrupt"])
@pytest.mark.parametrize("mode", ["default", "reference"])
def test_failure_mid_run_restores_bitwise(error, mode):
    # default mode: 2 forwards per batch, so call 5 is in the third batch, after two steps;
    # reference mode: 1 + 3 forwards per batch, so call 7 is inside the second batch, after one step
    model = _FailOnCall(5 if mode == "default" else 7, error).train()
    model.net.features[1].eval()
    opt = None
    if mode == "default":  # a caller's optimizer that already holds momentum buffers
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt_saved = copy.deepcopy(opt.state_dict())
    saved, flags = _state(model), _flags(model)
    with pytest.raises(type(error)):
        jit(
            model,
            _forget((1, 8, 8), n=40),
            sigma=0.3,
            lr=0.1,
            num_samples=3,
            batch_size=10,
            mode=mode,
            optimizer=opt,
            progress=False,
        )
    assert model.calls == model.k
    _assert_state_equal(model, saved)
    assert _flags(model) == flags
    if opt is not None:  # momentum buffers put back
        now = opt.state_dict()["state"]
        assert now.keys() == opt_saved["state"].keys()
        for i, st in opt_saved["state"].items():
            assert torch.equal(now[i]["momentum_buffer"], st["momentum_buffer"])
    # the model is still usable and its parameters did change in a run that does not fail
    model.k = -1
    jit(model, _forget((1, 8, 8), n=40), sigma=0.3, lr=0.1, num_samples=3, batch_size=10, mode=mode, progress=False)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_non_finite_gradients_raise_and_restore():
    # reference mode divides by the raw input difference: a constant batch gives 0/0 and NaN gradients
    model = _mlp().train()
    saved = _state(model)
    with pytest.raises(FloatingPointError, match="non-finite"):
        jit(model, torch.full((8, 64), 0.5), sigma=0.5, lr=0.1, num_samples=2, mode="reference", progress=False)
    _assert_state_equal(model, saved)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_finite_check_finds_every_non_finite_and_changes_nothing(dtype, fused, monkeypatch):
    from jit_unlearn.methods.jit.safety import all_finite

    if not fused:  # the generic path, taken where torch's fused check has no kernel

        def unsupported(*args):
            raise NotImplementedError("no kernel")

        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", unsupported)
    tensors = [torch.randn(5, 3).to(dtype), torch.randn(7).to(dtype), torch.tensor([-0.0], dtype=dtype), None]
    before = [t.clone() for t in tensors if t is not None]
    assert all_finite(tensors)
    assert all(
        torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())
        for a, b in zip([t for t in tensors if t is not None], before)
    )
    for bad in (float("inf"), float("-inf"), float("nan")):
        broken = [t.clone() for t in before]
        broken[1][4] = bad
        assert not all_finite(broken)
    assert all_finite([None, torch.empty(0, dtype=dtype)])


@pytest.mark.parametrize("optimizer", [False, True])
def test_default_mode_non_finite_update_raises_and_restores(optimizer):
    # an lr so large that the first SGD step overflows float32: the parameters must come back bitwise
    model = _mlp().eval()
    saved = _state(model)
    opt = torch.optim.SGD(model.parameters(), lr=3e38) if optimizer else None
    with pytest.raises(FloatingPointError, match="non-finite"):
        jit(model, _forget((64,)), sigma=0.3, lr=3e38, num_samples=3, batch_size=16, optimizer=opt, progress=False)
    _assert_state_equal(model, saved)
    assert all(torch.isfinite(p).all() and p.grad is None for p in model.parameters())
