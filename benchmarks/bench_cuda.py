"""GPU benchmarks (skipped without a CUDA device and the CUDA kernels), each next to its floor:

- JiT on a CIFAR-shaped ResNet-18 (512 forget samples, batch 128, N = 25) against its batched floor
  (the model alone: the N*B no-grad forwards, a forward with grad, a backward, an SGD step; see
  bench_jit.py); target: default <= 1.05 x floor.  A paired group alternates the two round by round.
- ssd_dampen_ on ResNet-18's parameter list against a device-to-device copy of it; target: >= 70 %
  of the copy's bandwidth counting 3 reads + 1 write against 1 read + 1 write (extra_info).
- accumulate_importance_ against torch._foreach_addcmul_; perturb (x [128, 3, 32, 32], N = 25)
  against randn + add + clamp + norm; the fused Lipschitz loss and gradient against the pure-PyTorch tier.
- jit (float32, bfloat16, float16) and ssd end to end (float32, bfloat16) on the same ResNet-18.

    python -m pytest benchmarks/bench_cuda.py --benchmark-only --benchmark-json=bench-cuda.json
    python benchmarks/ratios.py bench-cuda.json
"""

import copy
import statistics
import time
import warnings

import pytest
import torch
from bench_jit import _floor  # the floor's definition, shared with the CPU benchmarks
from torch.utils.data import TensorDataset

from jit_unlearn import _backend, jit, ops, ssd
from jit_unlearn.models import ResNet18

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and _backend.has_kernel("cuda")), reason="needs a CUDA device and CUDA kernels"
    ),
]

FORGET, BATCH, N, SIGMA, LR = 512, 128, 25, 0.5, 3e-4
ROUNDS = 10


def _synced(fn):
    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return result

    return run


def _pedantic(benchmark, fn, setup=None, rounds=ROUNDS):
    benchmark.pedantic(_synced(fn), setup=setup, rounds=rounds, iterations=1, warmup_rounds=2)


# ---------------------------------------------------------------- JiT vs its batched floor


@pytest.fixture(scope="module")
def jit_case():
    torch.manual_seed(0)
    model = ResNet18(10).cuda().eval()
    forget = torch.randn(FORGET, 3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    batches = list(forget.split(BATCH))
    noisy = [ops.perturb(x, N, SIGMA, 0, t, True)[0] for t, x in enumerate(batches)]
    return model, forget, batches, noisy


def _floor_batched(model, batches, noisy):
    _floor(model, batches, noisy, LR, batched=True)


def _jit_default(model, forget):
    jit(model, forget, sigma=SIGMA, lr=LR, num_samples=N, batch_size=BATCH, progress=False)


@pytest.mark.parametrize("variant", ["default", "floor_batched"])
def test_jit_resnet18(benchmark, jit_case, variant):
    model, forget, batches, noisy = jit_case
    benchmark.group = "jit-cuda-resnet18"

    def setup():
        return (copy.deepcopy(model),), {}

    fn = (lambda m: _jit_default(m, forget)) if variant == "default" else (lambda m: _floor_batched(m, batches, noisy))
    _pedantic(benchmark, fn, setup=setup, rounds=5)


def test_jit_resnet18_paired(benchmark, jit_case):
    """default timed by pytest-benchmark, each round right after a floor round timed here."""
    model, forget, batches, noisy = jit_case
    floor_times = []

    def setup():
        m = copy.deepcopy(model)
        torch.cuda.synchronize()
        start = time.perf_counter()
        _floor_batched(m, batches, noisy)
        torch.cuda.synchronize()
        floor_times.append(time.perf_counter() - start)
        return (copy.deepcopy(model),), {}

    benchmark.group = "jit-cuda-resnet18-paired"
    _pedantic(benchmark, lambda m: _jit_default(m, forget), setup=setup, rounds=5)
    if benchmark.stats is None:  # --benchmark-disable
        return
    default_times = list(benchmark.stats.stats.data)
    floor_times = floor_times[-len(default_times) :]
    ratios = [d / f for d, f in zip(default_times, floor_times)]
    benchmark.extra_info.update(
        floor_min=min(floor_times),
        floor_median=statistics.median(floor_times),
        ratio_of_mins=min(default_times) / min(floor_times),
        ratio_of_medians=statistics.median(default_times) / statistics.median(floor_times),
        median_paired_ratio=statistics.median(ratios),
    )


# ---------------------------------------------------------------- reduced precision (tensor cores)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_jit_resnet18_precision(benchmark, jit_case, precision):
    """jit's default mode in each precision (docs/METHODS.md §7.1); ratios within the group."""
    model, forget, _, _ = jit_case
    benchmark.group = "jit-cuda-resnet18-precision"

    def run(m):
        jit(m, forget, sigma=SIGMA, lr=LR, num_samples=N, batch_size=BATCH, precision=precision, progress=False)

    _pedantic(benchmark, run, setup=lambda: ((copy.deepcopy(model),), {}), rounds=5)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_ssd_resnet18_precision(benchmark, jit_case, precision):
    """ssd end to end (full set: the 512 forget-case images, forget: the first 128) in each precision
    (float16 would change nothing: its graded passes stay float32)."""
    model, images, _, _ = jit_case
    labels = torch.randint(0, 10, (images.shape[0],), generator=torch.Generator().manual_seed(1)).cuda()
    full, part = TensorDataset(images, labels), TensorDataset(images[:BATCH], labels[:BATCH])
    benchmark.group = "ssd-cuda-resnet18-precision"

    def run(m):
        with warnings.catch_warnings():  # random weights: the selection may be empty
            warnings.simplefilter("ignore", RuntimeWarning)
            ssd(m, part, full, batch_size=BATCH, precision=precision, progress=False)

    _pedantic(benchmark, run, setup=lambda: ((copy.deepcopy(model),), {}), rounds=5)


# ---------------------------------------------------------------- multi-tensor ops on ResNet-18 parameters


@pytest.fixture(scope="module")
def resnet_lists():
    torch.manual_seed(0)
    params = [p.detach().cuda() for p in ResNet18(10).parameters()]
    g = torch.Generator().manual_seed(1)
    imp_f = [torch.rand(p.shape, generator=g).cuda() for p in params]
    imp_d = [(torch.rand(p.shape, generator=g) * 0.2).cuda() for p in params]
    return params, imp_f, imp_d


def _bytes(tensors, copies):
    return copies * sum(t.numel() * t.element_size() for t in tensors)


def _bandwidth(benchmark, nbytes):
    if benchmark.stats is not None:
        benchmark.extra_info["GB_per_s_at_min"] = nbytes / benchmark.stats.stats.min / 1e9


def test_ssd_dampen_cuda(benchmark, resnet_lists):
    pristine, f, d = resnet_lists
    params = [p.clone() for p in pristine]
    benchmark.group = "ssd_dampen-cuda-resnet18"

    def restore():  # every round dampens the same values
        torch._foreach_copy_(params, pristine)

    _pedantic(benchmark, lambda: ops.ssd_dampen_(params, f, d, alpha=2.0), setup=restore, rounds=30)
    _bandwidth(benchmark, _bytes(params, 4))


def test_ssd_dampen_cuda_copy_floor(benchmark, resnet_lists):
    pristine, _, _ = resnet_lists
    dst = [torch.empty_like(p) for p in pristine]
    benchmark.group = "ssd_dampen-cuda-resnet18"
    _pedantic(benchmark, lambda: torch._foreach_copy_(dst, pristine), rounds=30)
    _bandwidth(benchmark, _bytes(pristine, 2))


def test_accumulate_importance_cuda(benchmark, resnet_lists):
    grads, _, _ = resnet_lists
    acc = [torch.zeros_like(g) for g in grads]
    benchmark.group = "accumulate_importance-cuda-resnet18"
    _pedantic(benchmark, lambda: ops.accumulate_importance_(acc, grads, "square", 1.0), rounds=30)
    _bandwidth(benchmark, _bytes(grads, 3))


def test_accumulate_importance_cuda_foreach(benchmark, resnet_lists):
    grads, _, _ = resnet_lists
    acc = [torch.zeros_like(g) for g in grads]
    benchmark.group = "accumulate_importance-cuda-resnet18"
    _pedantic(benchmark, lambda: torch._foreach_addcmul_(acc, grads, grads), rounds=30)
    _bandwidth(benchmark, _bytes(grads, 3))


# ---------------------------------------------------------------- perturb and the Lipschitz loss


@pytest.fixture(scope="module")
def images():
    return torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()


def test_perturb_cuda(benchmark, images):
    benchmark.group = "perturb-cuda"
    _pedantic(benchmark, lambda: ops.perturb(images, N, SIGMA, seed=0, offset=0, clamp=True), rounds=30)


def test_perturb_cuda_composition(benchmark, images):
    def composition():
        x_tilde = (images + SIGMA * torch.randn(N, *images.shape, device="cuda")).clamp(images.min(), images.max())
        return x_tilde, (x_tilde - images).flatten(2).norm(dim=2)

    benchmark.group = "perturb-cuda"
    _pedantic(benchmark, composition, rounds=30)


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(BATCH, 10, generator=g)
    pert = out + 0.3 * torch.randn(N, BATCH, 10, generator=g)
    in_norm = 0.5 + torch.rand(N, BATCH, generator=g)
    return out.cuda(), pert.cuda(), in_norm.cuda(), torch.full((N, BATCH), 1.0 / N, device="cuda")


def test_lipschitz_fused_cuda(benchmark, logits):
    out, pert, in_norm, grad = logits
    benchmark.group = "lipschitz-cuda"
    _pedantic(benchmark, lambda: torch.ops.jit_unlearn._lipschitz_ratio_and_grad(grad, out, pert, in_norm), rounds=30)


def test_lipschitz_torch_tier_cuda(benchmark, logits):
    out, pert, in_norm, grad = logits

    def torch_tier():
        _backend.force_backend("torch")
        try:
            return ops.lipschitz_ratio(out, pert, in_norm), ops.lipschitz_ratio_backward(grad, out, pert, in_norm)
        finally:
            _backend.force_backend(None)

    benchmark.group = "lipschitz-cuda"
    _pedantic(benchmark, torch_tier, rounds=30)
