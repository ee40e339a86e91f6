"""The `precision` and `compile` arguments: checks, what "auto" picks, the private reduced-precision copy,
the caller's model left in its dtype and layout, reduced passes close to float32, compile on fresh
weights, and the per-sample pass of Linear stacks against a per-sample backward loop."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jit_unlearn as ju
import oracles
from conftest import requires_cuda
from jit_unlearn import _forward_copy, _precision
from jit_unlearn.importance import per_sample as per_sample_module
from jit_unlearn.models import MLP, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits_images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(1, width=8).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _calls(model, x, y, precision):
    """Every method on `model` with `precision` (one call each on a copy)."""
    init = functools.partial(SmallCNN, 1, width=8)
    mask = ju.localize(copy.deepcopy(model), TensorDataset(x, y), progress=False)
    return {
        "jit": lambda m: ju.jit(
            m, x, sigma=0.5, lr=1e-3, num_samples=3, batch_size=32, precision=precision, progress=False
        ),
        "importances": lambda m: ju.importances(m, TensorDataset(x, y), precision=precision, progress=False),
        "ssd": lambda m: ju.ssd(m, TensorDataset(x, y), TensorDataset(x, y), precision=precision, progress=False),
        "lf_ssd": lambda m: ju.lf_ssd(m, x, x, precision=precision, progress=False),
        "assd": lambda m: ju.assd(m, TensorDataset(x, y), TensorDataset(x, y), precision=precision, progress=False),
        "localize": lambda m: ju.localize(m, TensorDataset(x, y), precision=precision, progress=False),
        "masked_finetune": lambda m: ju.masked_finetune(
            m, mask, TensorDataset(x, y), lr=0.01, epochs=1, precision=precision, progress=False
        ),
        "del_unlearn": lambda m: ju.del_unlearn(
            m, TensorDataset(x, y), TensorDataset(x, y), init=init, epochs=1, precision=precision, progress=False
        ),
    }


METHODS = ["jit", "importances", "ssd", "lf_ssd", "assd", "localize", "masked_finetune", "del_unlearn"]


# ---------------------------------------------------------------- checks


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "precision, error, message",
    [
        ("float16", ValueError, "precision: 'float16' runs on CUDA only"),
        ("half", ValueError, "precision: expected one of"),
        (None, ValueError, "precision: expected one of"),
    ],
)
def test_bad_precision_is_refused_before_any_change(method, precision, error, message):
    x, y = _digits_images()
    model = _cnn()
    before = _state(model)
    with pytest.raises(error, match=message):
        _calls(model, x, y, precision)[method](model)
    assert _same(model, before)


@pytest.mark.parametrize("method", ["jit", "importances", "ssd", "localize", "del_unlearn"])
def test_reduced_precision_needs_a_float32_model(method):
    x, y = _digits_images()
    model = _cnn().double()
    before = _state(model)
    with pytest.raises(ValueError, match="precision: 'bfloat16' runs the passes of a float32 model"):
        _calls(model, x.double(), y, "bfloat16")[method](model)
    assert _same(model, before)
    if method == "jit":  # "auto" on a float64 model is float32 (nothing to reduce)
        assert _calls(model, x.double(), y, "auto")["jit"](model).precision == "float32"


def test_jit_reference_mode_takes_no_reduced_precision_or_compile():
    x, _ = _digits_images()
    model = _cnn().train()
    with pytest.raises(ValueError, match="precision: mode='reference'"):
        ju.jit(model, x, sigma=0.5, lr=1e-3, mode="reference", precision="bfloat16", progress=False)
    with pytest.raises(ValueError, match="compile: mode='reference'"):
        ju.jit(model, x, sigma=0.5, lr=1e-3, mode="reference", compile=True, progress=False)
    with pytest.raises(TypeError, match="compile: expected a bool"):
        ju.jit(model, x, sigma=0.5, lr=1e-3, compile=1, progress=False)
    report = ju.jit(model, x, sigma=0.5, lr=1e-3, num_samples=2, mode="reference", precision="auto", progress=False)
    assert report.precision == "float32"


@pytest.mark.parametrize("method", ["localize", "masked_finetune", "del_unlearn", "objective"])
def test_published_modes_and_objectives_take_no_reduced_precision(method):
    """DEL's reference mode (the published code) and a FinetuneObjective (the baselines' losses run
    the model themselves) keep the model's dtype: an explicit reduced precision is refused, naming
    `precision`, before anything changes; "auto" runs them in float32."""
    x, y = _digits_images()
    model = _cnn().train()
    data = TensorDataset(x, y)
    mask = ju.localize(copy.deepcopy(model), data, progress=False)
    init = functools.partial(SmallCNN, 1, width=8)
    objective = ju.FinetuneObjective(lambda m, x, y, xf, yf: F.cross_entropy(m(x), y), name="plain")

    def call(precision):
        if method == "localize":
            return ju.localize(model, data, mode="reference", precision=precision, progress=False)
        if method == "masked_finetune":
            return ju.masked_finetune(
                model, mask, data, lr=0.01, epochs=1, mode="reference", precision=precision, progress=False
            )
        if method == "del_unlearn":
            return ju.del_unlearn(
                model, data, data, init=init, epochs=1, mode="reference", precision=precision, progress=False
            )
        return ju.masked_finetune(model, None, data, objective=objective, lr=0.01, epochs=1, precision=precision,
                                  progress=False)  # fmt: skip

    before = _state(model)
    with pytest.raises(ValueError, match=r"^precision: .*runs the model in its own dtype"):
        call("bfloat16")
    assert _same(model, before)
    result = call("auto")
    if method == "del_unlearn":
        assert result.precision == "float32"
    assert result is not None


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split())
    except OSError:
        pass
    return None


def test_fast_bf16_detection_and_backend_info():
    flags = _cpu_flags()
    if flags is not None and torch.backends.mkldnn.is_available():
        expected = bool(flags & {"amx_bf16", "avx512_bf16"})
        assert _precision.fast_bf16("cpu") is expected
    info = ju.backend_info()
    assert info["fast_bf16"]["cpu"] is _precision.fast_bf16("cpu")
    assert info["fast_bf16_features"]["cpu"] == list(_precision.fast_bf16_features("cpu"))
    assert (info["fast_bf16"]["cuda"] is None) == (not torch.cuda.is_available())
    assert _precision.describe("bfloat16", "cpu") == "bfloat16"


@pytest.mark.parametrize("fast", [True, False])
def test_auto_picks_bfloat16_only_where_fast(monkeypatch, fast):
    monkeypatch.setattr(_precision, "fast_bf16", lambda device="cpu": fast)
    model = _cnn()
    prec = _precision.resolve("auto", model)
    assert prec.name == ("bfloat16" if fast else "float32") and prec.requested == "auto"
    assert prec.channels_last is fast and prec.head == ("fc" if fast else None)
    x, _ = _digits_images(32)
    report = ju.jit(model, x, sigma=0.5, lr=1e-3, num_samples=2, precision="auto", progress=False)
    assert report.precision == prec.name
    mlp = MLP(64, (16,), 10)
    assert _precision.resolve("bfloat16", mlp).channels_last is False  # no convolution: no layout change


# ---------------------------------------------------------------- the private copy, the caller's model


def test_forward_copy_is_private_reduced_and_follows_sync():
    model = _cnn()
    prec = _precision.resolve("bfloat16", model)
    fwd = _forward_copy.ForwardCopy(model, prec)
    assert fwd.is_copy and fwd.module is not model
    conv = fwd.module.features[0].weight
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    assert fwd.module.fc.weight.dtype == torch.float32  # the head stays float32
    assert not any(p.requires_grad for p in fwd.module.parameters())
    x, _ = _digits_images(16)
    with torch.no_grad():
        ref = model(x)
        out = fwd(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    with torch.no_grad():  # the model moves on; the copy follows after sync only
        for p in model.parameters():
            p.mul_(0.5)
        stale = fwd(x)
        fwd.sync()
        fresh = fwd(x)
        ref2 = model(x)
    torch.testing.assert_close(fresh, ref2, rtol=0.05, atol=0.05)
    assert not torch.allclose(stale, ref2, rtol=0.05, atol=0.05)
    assert model.features[0].weight.dtype == torch.float32 and model.features[0].weight.is_contiguous()


class _Uncopyable(nn.Module):
    """A conv net holding a lock: copy.deepcopy refuses it."""

    def __init__(self):
        super().__init__()
        import threading

        self.net = _cnn()
        self.lock = threading.Lock()

    def forward(self, x):
        return self.net(x)


def test_forward_copy_of_an_uncopyable_model_runs_the_model_under_autocast():
    model = _Uncopyable().eval()
    fwd = _forward_copy.ForwardCopy(model, _precision.resolve("bfloat16", model))
    assert fwd.module is model and not fwd.is_copy
    x, _ = _digits_images(16)
    with torch.no_grad():
        ref = model(x)
        out = fwd(x)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    before = _state(model)
    report = ju.jit(model, x, sigma=0.5, lr=0.0, num_samples=2, precision="bfloat16", progress=False)
    assert report.precision == "bfloat16" and _same(model, before)  # lr 0: nothing moves


class _ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x)
        return self.fc((self.bn(h) + h).mean((2, 3)))


def test_conv_bn_pairs():
    from jit_unlearn.models import ResNet18

    assert _forward_copy.conv_bn_pairs(_cnn()) == [("features.0", "features.1"), ("features.4", "features.5")]
    assert len(_forward_copy.conv_bn_pairs(ResNet18(10).eval())) == 20  # stem, 2 per block, 3 shortcuts
    assert _forward_copy.conv_bn_pairs(_cnn().train()) == []  # batch statistics are not a fixed map
    assert _forward_copy.conv_bn_pairs(_ConvUsedTwice().eval()) == []
    assert _forward_copy.conv_bn_pairs(_Uncopyable().eval()) == [("net.features.0", "net.features.1"),
                                                                 ("net.features.4", "net.features.5")]  # fmt: skip


def test_folded_copy_equals_the_model_in_float32(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module: module)  # compile=True: a float32 private copy
    model = _cnn()
    with torch.no_grad():  # batch norms that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    fwd = _forward_copy.ForwardCopy(model, _precision.resolve("float32", model), compile=True)
    assert fwd.is_copy and fwd.folded == 2
    assert isinstance(fwd.module.features[1], nn.Identity) and isinstance(model.features[1], nn.BatchNorm2d)
    x, _ = _digits_images(16)
    with torch.no_grad():
        torch.testing.assert_close(fwd(x), model(x), rtol=1e-5, atol=1e-5)
        for t in [*model.parameters(), *model.buffers()]:  # a step changes weights and statistics
            if t.is_floating_point():
                t.mul_(1.1).add_(0.01)
        fwd.sync()
        torch.testing.assert_close(fwd(x), model(x), rtol=1e-5, atol=1e-5)
    assert model.features[0].bias is None  # the caller's convolution got no bias


def test_forward_copy_float32_is_the_model_itself():
    model = _cnn()
    fwd = _forward_copy.ForwardCopy(model, _precision.resolve("float32", model))
    assert fwd.module is model and not fwd.is_copy


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("method", METHODS)
def test_callers_model_keeps_dtype_layout_hooks_and_modes(method, layout):
    x, y = _digits_images()
    model = _cnn().to(memory_format=layout)
    model.features[1].train()  # a module in another mode than the rest
    strides = {n: p.stride() for n, p in model.named_parameters()}
    _calls(model, x, y, "bfloat16")[method](model)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.stride() == strides[n], n
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.features[1].training and not model.features[0].training
    assert not torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------- reduced passes: close to float32, not equal


# (device, precision): bfloat16 on CPU here; on a CUDA device both reduced precisions.
REDUCED = [
    ("cpu", "bfloat16"),
    pytest.param("cuda", "bfloat16", marks=requires_cuda),
    pytest.param("cuda", "float16", marks=requires_cuda),
]


@pytest.mark.parametrize("device,precision", REDUCED)
def test_reduced_importances_are_close_to_float32(device, precision):
    """bfloat16 graded passes move the importances a little; float16 leaves graded passes in float32,
    so its importances are float32's exactly."""
    x, y = _digits_images(128)
    model = _cnn().to(device)
    data = TensorDataset(x.to(device), y.to(device))
    for kind in ("fisher", "output_norm"):
        a = ju.importances(model, data, kind=kind, batch_size=32, progress=False)
        b = ju.importances(model, data, kind=kind, batch_size=32, precision=precision, progress=False)
        assert b.kind == kind and all(b[n].dtype == torch.float32 and b[n].device == a[n].device for n in b)
        if precision == "float16":
            assert all(torch.equal(a[n], b[n]) for n in a), kind
            continue
        rel = torch.cat([((b[n] - a[n]).abs() / a[n].abs().clamp_min(1e-12)).flatten() for n in a])
        assert rel.median() < 0.02, kind
        assert any(not torch.equal(a[n], b[n]) for n in a), kind


@pytest.mark.parametrize("device,precision", REDUCED)
def test_reduced_jit_step_is_close_to_float32(device, precision):
    x, _ = _digits_images(64)
    base = _cnn().to(device)
    x = x.to(device)
    steps = {}
    for prec in ("float32", precision):
        model = copy.deepcopy(base)
        report = ju.jit(model, x, sigma=0.5, lr=1e-2, num_samples=4, batch_size=32, precision=prec, progress=False)
        assert report.precision == prec
        assert all(p.dtype == torch.float32 for p in model.parameters())
        steps[prec] = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), base.parameters())])
    a, b = steps["float32"], steps[precision]
    assert not torch.equal(a, b)
    cos = F.cosine_similarity(a, b, dim=0)
    assert cos > 0.99 and (b.norm() / a.norm() - 1).abs() < 0.05


# ---------------------------------------------------------------- compile


def test_compile_runs_on_the_current_weights(monkeypatch):
    """compile=True (here through dynamo with the eager backend, which compiles in seconds) gives the
    eager result: the compiled copy is refreshed before every step."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real(module, backend="eager"))
    x, _ = _digits_images(96)
    base = MLP(64, (32,), 10).eval()
    flat = x.view(96, 64)
    results = {}
    for compiled in (False, True):
        model = copy.deepcopy(base)
        ju.jit(model, flat, sigma=0.5, lr=1e-2, num_samples=4, batch_size=32, compile=compiled, progress=False)
        results[compiled] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
    assert not all(torch.equal(a, b) for a, b in zip(results[False], base.parameters()))


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(module):
        def fn(*args):
            raise RuntimeError("no compiler here")

        return fn

    monkeypatch.setattr(torch, "compile", broken)
    x, _ = _digits_images(64)
    base = MLP(64, (32,), 10).eval()
    eager = copy.deepcopy(base)
    ju.jit(eager, x.view(64, 64), sigma=0.5, lr=1e-2, num_samples=2, batch_size=32, progress=False)
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="compile=True: torch.compile failed"):
        ju.jit(model, x.view(64, 64), sigma=0.5, lr=1e-2, num_samples=2, batch_size=32, compile=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), eager.parameters()))


# ---------------------------------------------------------------- per-sample importances of Linear stacks


class _Wrapped(nn.Module):
    """The same layers behind a custom forward: not a stack, so it takes the vmap path."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        return self.seq(x)


def _stack(frozen_first=False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Sequential(nn.Linear(64, 24), nn.ReLU(inplace=True), nn.Dropout(0.5)),
        nn.Linear(24, 16),
        nn.GELU(),
        nn.Linear(16, 10),
    ).double()
    if frozen_first:
        model[1][0].requires_grad_(False)
    return model


@pytest.mark.parametrize("kind", ["fisher", "output_norm"])
@pytest.mark.parametrize("frozen_first", [False, True])
def test_linear_stack_per_sample_equals_backward_loop(kind, frozen_first):
    x, y = _digits_images(40)
    x = x.double()
    model = _stack(frozen_first)
    linears = per_sample_module._factorable_linears(model)
    assert per_sample_module._linear_stack(model, linears) is not None
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    imp = ju.importances(model, loader, kind=kind, per_sample=True, progress=False)
    oracle = oracles.per_sample_importances(model.eval(), x, y, kind)
    for n in oracle:
        torch.testing.assert_close(imp[n], oracle[n], rtol=1e-10, atol=1e-14)
    assert all(imp[n].abs().sum() == 0 for n in ("1.0.weight", "1.0.bias")) is frozen_first
    vmapped = ju.importances(_Wrapped(model), loader, kind=kind, per_sample=True, progress=False)
    assert all(torch.equal(vmapped["seq." + n], imp[n]) for n in oracle)  # bitwise the vmap pass's result
    m32 = copy.deepcopy(model).float()
    loader32 = DataLoader(TensorDataset(x.float(), y), batch_size=16)
    a = ju.importances(m32, loader32, kind=kind, per_sample=True, progress=False)
    b = ju.importances(_Wrapped(m32), loader32, kind=kind, per_sample=True, progress=False)
    assert all(torch.equal(b["seq." + n], a[n]) for n in oracle)
    assert all(isinstance(m, nn.ReLU) and m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_linear_stack_eligibility():
    def stack_of(model):
        return per_sample_module._linear_stack(model, per_sample_module._factorable_linears(model))

    assert stack_of(MLP(8, (4,), 3)) is not None  # a Sequential subclass that keeps Sequential's forward
    assert stack_of(_Wrapped(MLP(8, (4,), 3))) is None  # custom forward
    assert stack_of(nn.Sequential(nn.Flatten(0), nn.Linear(8, 3))) is None  # flattens the batch dimension
    assert stack_of(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))) is None  # trainable non-Linear
    shared = nn.Linear(8, 8)
    assert stack_of(nn.Sequential(shared, nn.ReLU(), shared)) is None  # a module used twice
    hooked = MLP(8, (4,), 3)
    hooked[1].register_forward_hook(lambda *args: None)
    assert stack_of(hooked) is None
    assert stack_of(nn.Sequential(nn.ReLU())) is None  # nothing to factor


def test_linear_stack_falls_back_when_a_sample_has_several_rows():
    # Linear on [B, T, F] inputs: one sample's weight gradient is a sum of T outer products
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 5)).double()
    x, y = torch.randn(12, 3, 4, dtype=torch.float64), torch.randint(0, 5, (12,))
    imp = ju.importances(model, DataLoader(TensorDataset(x, y), batch_size=5), per_sample=True, progress=False)
    oracle = oracles.per_sample_importances(model.eval(), x, y, "fisher")
    for n in oracle:
        torch.testing.assert_close(imp[n], oracle[n], rtol=1e-10, atol=1e-14)


def test_linear_stack_bfloat16_is_close_to_float32():
    x, y = _digits_images(128)
    model = MLP(64, (64, 64), 10).eval()
    loader = DataLoader(TensorDataset(x.view(128, 64), y), batch_size=64)
    a = ju.importances(model, loader, per_sample=True, progress=False)
    b = ju.importances(model, loader, per_sample=True, precision="bfloat16", progress=False)
    rel = torch.cat([((b[n] - a[n]).abs() / a[n].abs().clamp_min(1e-12)).flatten() for n in a])
    assert rel.median() < 0.02 and not all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- same forgetting (docs/BENCHMARKS.md)


def test_bfloat16_forgets_as_float32_on_digits():
    """Every method, bfloat16 against float32, on one trained digits MLP (benchmarks/forgetting_precision.py,
    setting "digits"): forget / retain / test accuracy and both MIAs within 1 point, and the SSD
    family's selected sets overlapping by >= 99 % (each selection's share in the other, the smaller)."""
    import os
    import sys

    from conftest import ROOT

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import forgetting_precision as fp
    finally:
        sys.path.pop(0)
    rows = fp.compare("digits")
    by = {(r["method"], r["precision"]): r for r in rows}
    assert by[("jit", "float32")]["forget_acc"] < 0.1  # the methods do forget in this setting
    for method in ("jit", "ssd", "lf_ssd", "assd", "del"):
        ref, low = by[(method, "float32")], by[(method, "bfloat16")]
        for key in fp.METRICS:
            assert abs(low[key] - ref[key]) <= 0.01, (method, key, ref[key], low[key])
        assert ref["forget_acc"] < by[("original", "-")]["forget_acc"] - 0.5, method
        if method in ("ssd", "lf_ssd", "assd"):
            assert low["overlap"] >= 0.99 and low["selected"] > 0, (method, low["overlap"])
