// CUDA kernel of jit_unlearn::perturb: Philox noise, add, clamp and per-sample norms in one pass.
// x_tilde is bitwise the CPU result (shared maths, --fmad=false); in_norm sums in another order.
#include <algorithm>
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/perturb_checks.h"
#include "common/perturb_utils.h"
#include "common/rng_utils.h"

namespace jit_unlearn {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// x_tilde's four elements of one Philox group, stored with one aligned vector access.
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Packed4 {
  scalar_t v[4];
};

// One thread per Philox group g (flat elements 4g .. 4g+3 of x_tilde [N, B, D]), grid-stride.  Each
// thread sums its squared differences per row (row = flat / D); a warp whose lanes all end in one
// row adds one warp-reduced value to sq_sums[row], otherwise each lane adds its own.  The loop bound
// is warp-uniform, so every lane reaches the shuffles.
template <bool kClamp, typename scalar_t, typename opmath_t>
__global__ void perturb_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                               opmath_t* __restrict__ sq_sums, const scalar_t* __restrict__ lo_ptr,
                               const scalar_t* __restrict__ hi_ptr, int64_t x_numel, int64_t row_numel,
                               int64_t total, int64_t groups, opmath_t sigma, uint64_t seed, uint64_t offset) {
  const opmath_t lo = kClamp ? static_cast<opmath_t>(*lo_ptr) : opmath_t(0);
  const opmath_t hi = kClamp ? static_cast<opmath_t>(*hi_ptr) : opmath_t(0);
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t warp_first = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x - lane);
  for (int64_t base = warp_first; base < groups; base += stride) {
    const int64_t g = base + lane;
    const bool active = g < groups;
    int64_t row = 0;
    opmath_t partial = 0;
    if (active) {
      float z[4];
      philox_normal4(static_cast<uint64_t>(g), seed, offset, z);
      const int64_t first = 4 * g;
      row = first / row_numel;
      int64_t col = first - row * row_numel;
      int64_t xi = first % x_numel;
      Packed4<scalar_t> values;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (first + k < total) {
          if (col == row_numel) {
            atomicAdd(sq_sums + row, partial);
            partial = 0;
            ++row;
            col = 0;
            xi = xi == x_numel ? 0 : xi;
          }
          const auto e = perturb_element<kClamp>(x[xi], z[k], sigma, lo, hi);
          values.v[k] = e.value;
          partial += e.sq_diff;
          ++col;
          ++xi;
        }
      }
      if (first + 3 < total) {
        *reinterpret_cast<Packed4<scalar_t>*>(out + first) = values;
      } else {
        for (int k = 0; first + k < total; ++k) {
          out[first + k] = values.v[k];
        }
      }
    }
    // Lane 0 is active (base < groups); inactive lanes join its row with a zero partial.
    const int64_t row0 = __shfl_sync(kFullMask, row, 0);
    if (!active) {
      row = row0;
    }
    if (__all_sync(kFullMask, row == row0)) {
#pragma unroll
      for (int delta = 16; delta > 0; delta >>= 1) {
        partial += __shfl_down_sync(kFullMask, partial, delta);
      }
      if (lane == 0) {
        atomicAdd(sq_sums + row0, partial);
      }
    } else if (active) {
      atomicAdd(sq_sums + row, partial);
    }
  }
}

// Fills x_tilde and in_norm (contiguous, checked) from x; in_norm first holds the squared sums
// (atomicAdd targets, zeroed here), then their square roots.
void perturb_into_cuda(const at::Tensor& x_in, int64_t num_samples, double sigma, int64_t seed, int64_t offset,
                       bool clamp, at::Tensor& x_tilde, at::Tensor& in_norm) {
  const at::Tensor x = contiguous_aligned(x_in);
  in_norm.zero_();
  const int64_t batch = x.size(0);
  const int64_t x_numel = x.numel();
  const int64_t total = num_samples * x_numel;
  if (total == 0) {
    return;
  }
  const int64_t row_numel = x_numel / batch;
  const int64_t groups = (total + 3) / 4;
  // Whole-tensor range for the clamp, read by the kernel from device memory (no host sync).
  at::Tensor lo, hi;
  if (clamp) {
    std::tie(lo, hi) = at::aminmax(x);
  }
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks_needed = (groups + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, static_cast<int64_t>(sm_count) * kBlocksPerSm));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "perturb_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto sigma_op = static_cast<opmath_t>(sigma);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = x_tilde.mutable_data_ptr<scalar_t>();
    opmath_t* sq_ptr = in_norm.mutable_data_ptr<opmath_t>();
    const auto useed = static_cast<uint64_t>(seed);
    const auto uoffset = static_cast<uint64_t>(offset);
    if (clamp) {
      perturb_kernel<true, scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
          x_ptr, out_ptr, sq_ptr, lo.const_data_ptr<scalar_t>(), hi.const_data_ptr<scalar_t>(), x_numel, row_numel,
          total, groups, sigma_op, useed, uoffset);
    } else {
      perturb_kernel<false, scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
          x_ptr, out_ptr, sq_ptr, nullptr, nullptr, x_numel, row_numel, total, groups, sigma_op, useed, uoffset);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  in_norm.sqrt_();
}

std::tuple<at::Tensor, at::Tensor> perturb_cuda(const at::Tensor& x, int64_t num_samples, double sigma,
                                                int64_t seed, int64_t offset, bool clamp) {
  check_perturb_args(x, num_samples, sigma);
  TORCH_CHECK_VALUE(x.is_cuda(), "perturb: x: expected a CUDA tensor, got device ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto [x_tilde, in_norm] = perturb_outputs(x, num_samples, /*zero_norm=*/false);
  perturb_into_cuda(x, num_samples, sigma, seed, offset, clamp, x_tilde, in_norm);
  return {x_tilde, in_norm};
}

void perturb_out_cuda(const at::Tensor& x, int64_t num_samples, double sigma, int64_t seed, int64_t offset,
                      bool clamp, at::Tensor x_tilde, at::Tensor in_norm) {
  check_perturb_args(x, num_samples, sigma);
  TORCH_CHECK_VALUE(x.is_cuda(), "_perturb_out: x: expected a CUDA tensor, got device ", x.device());
  check_perturb_out(x, num_samples, x_tilde, in_norm);
  const c10::cuda::CUDAGuard device_guard(x.device());
  perturb_into_cuda(x, num_samples, sigma, seed, offset, clamp, x_tilde, in_norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CUDA, m) {
  m.impl("perturb", &perturb_cuda);
  m.impl("_perturb_out", &perturb_out_cuda);
}

}  // namespace jit_unlearn
