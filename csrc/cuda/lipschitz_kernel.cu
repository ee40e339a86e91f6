// CUDA kernels of lipschitz_ratio and _lipschitz_ratio_backward (8 lanes per row, then per-(b, k) sums),
// bitwise the CPU kernels: the same summation orders and the shared per-element maths (--fmad=false).
#include <algorithm>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/lipschitz_checks.h"
#include "common/lipschitz_utils.h"

namespace jit_unlearn {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
// kLipschitzLanes (8) lanes per (n, b) row, so a warp works on 4 rows: with K = 10 logits a whole warp
// on one row would leave 22 of its 32 lanes idle.  The 8 lanes also give the CPU kernel's summation
// order (common/lipschitz_utils.h), so the ratios and coefficients are bitwise the CPU's.
constexpr int kRowLanes = kLipschitzLanes;
constexpr int kRowsPerWarp = kWarpSize / kRowLanes;
constexpr int kRowsPerBlock = kThreads / kRowLanes;
static_assert(kWarpSize % kRowLanes == 0, "rows do not straddle warps");
// Grid-stride loops cover the rest; this keeps every launch within the 1-D grid limit.
constexpr int64_t kMaxBlocks = 65535;

// The pairwise tree over a row's 8 lanes, as the CPU adds them: lane l + 4 into l, then l + 2, then 1
// (the xor partners give lanes >= the width the same sums; IEEE addition is commutative).
template <typename acc_t>
__device__ __forceinline__ acc_t row_lanes_sum(acc_t v) {
  static_assert(kRowLanes == 8, "three butterfly steps");
  for (int width = kRowLanes / 2; width > 0; width /= 2) v += __shfl_xor_sync(0xffffffffu, v, width, kRowLanes);
  return v;
}

// kRowLanes lanes per (n, b) row: lane l sums the squared differences of elements k = l, l + 8, ... in
// order, then row_lanes_sum.  Writes the ratio (kCoef = false) or the backward coefficient
// grad / (num * in_norm) (kCoef = true) of each row, and with kCoef also the ratio into `ratio` unless it
// is null (_lipschitz_ratio_and_grad).  The loop over row groups is warp-uniform, so every lane reaches
// the shuffles; lanes past the last row compute nothing and write nothing.
template <typename scalar_t, typename acc_t, bool kCoef>
__global__ void lipschitz_row_kernel(const scalar_t* __restrict__ out, const scalar_t* __restrict__ out_perturbed,
                                     const acc_t* __restrict__ in_norm, const acc_t* __restrict__ grad,
                                     acc_t* __restrict__ result, acc_t* __restrict__ ratio, int64_t rows, int64_t B,
                                     int64_t K) {
  const int lane = threadIdx.x % kRowLanes;
  const int64_t warp_rows = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarpSize * kRowsPerWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t first = warp_rows; first < rows; first += stride) {
    const int64_t row = first + (threadIdx.x % kWarpSize) / kRowLanes;
    const bool active = row < rows;
    acc_t sq = acc_t(0);
    if (active) {
      const scalar_t* a = out + (row % B) * K;
      const scalar_t* p = out_perturbed + row * K;
      for (int64_t k = lane; k < K; k += kRowLanes) {
        sq = lipschitz_sq_diff_accumulate<acc_t>(sq, static_cast<acc_t>(a[k]), static_cast<acc_t>(p[k]));
      }
    }
    sq = row_lanes_sum(sq);
    if (active && lane == 0) {
      if constexpr (kCoef) {
        result[row] = lipschitz_backward_coef<acc_t>(grad[row], sq, in_norm[row]);
        if (ratio != nullptr) ratio[row] = lipschitz_ratio_value<acc_t>(sq, in_norm[row]);
      } else {
        result[row] = lipschitz_ratio_value<acc_t>(sq, in_norm[row]);
      }
    }
  }
}

// One thread per (b, k): grad_out[b, k] = sum_n term_nbk in n order from 0 (the CPU's order),
// grad_out_perturbed[n, b, k] = -term_nbk (skipped when grad_perturbed is null).  Consecutive threads
// read consecutive k: coalesced.
template <typename scalar_t, typename acc_t>
__global__ void lipschitz_grad_kernel(const scalar_t* __restrict__ out, const scalar_t* __restrict__ out_perturbed,
                                      const acc_t* __restrict__ coef, scalar_t* __restrict__ grad_out,
                                      scalar_t* __restrict__ grad_perturbed, int64_t N, int64_t B, int64_t K) {
  const int64_t BK = B * K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < BK; i += stride) {
    const int64_t b = i / K;
    const acc_t o = static_cast<acc_t>(out[i]);
    acc_t acc = acc_t(0);
    for (int64_t n = 0; n < N; ++n) {
      const acc_t t = lipschitz_grad_term<acc_t>(o, static_cast<acc_t>(out_perturbed[n * BK + i]), coef[n * B + b]);
      acc += t;
      if (grad_perturbed != nullptr) grad_perturbed[n * BK + i] = static_cast<scalar_t>(-t);
    }
    grad_out[i] = static_cast<scalar_t>(acc);
  }
}

at::ScalarType opmath_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

unsigned int blocks_for(int64_t work_items, int64_t per_block) {
  return static_cast<unsigned int>(std::min<int64_t>((work_items + per_block - 1) / per_block, kMaxBlocks));
}

// ratio [N, B] in opmath dtype = ||out_b - out_perturbed_nb||_2 / in_norm_nb (0 where in_norm_nb <= 0).
at::Tensor lipschitz_ratio_cuda(const at::Tensor& out, const at::Tensor& out_perturbed, const at::Tensor& in_norm) {
  check_lipschitz_args("lipschitz_ratio", out, out_perturbed, in_norm, at::kCUDA);
  const c10::cuda::CUDAGuard device_guard(out.device());
  const int64_t N = out_perturbed.size(0), B = out.size(0), K = out.size(1);
  const auto acc_type = opmath_scalar_type(out.scalar_type());
  const at::Tensor o = contiguous_aligned(out);
  const at::Tensor p = contiguous_aligned(out_perturbed);
  const at::Tensor den = contiguous_aligned(in_norm.to(acc_type));
  at::Tensor ratio = at::empty({N, B}, out.options().dtype(acc_type));
  const int64_t rows = N * B;
  if (rows == 0) return ratio;
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lipschitz_ratio_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lipschitz_row_kernel<scalar_t, acc_t, false><<<blocks_for(rows, kRowsPerBlock), kThreads, 0, stream>>>(
        o.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), den.const_data_ptr<acc_t>(), nullptr,
        ratio.mutable_data_ptr<acc_t>(), nullptr, rows, B, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ratio;
}

// The backward of both ops: (grad_out [B, K] in out.dtype, grad_out_perturbed [N, B, K] in
// out_perturbed.dtype or [0], ratio [N, B] in opmath when with_ratio, else undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const char* op, const at::Tensor& grad,
                                                             const at::Tensor& out, const at::Tensor& out_perturbed,
                                                             const at::Tensor& in_norm, bool compute_perturbed_grad,
                                                             bool with_ratio) {
  check_lipschitz_args(op, out, out_perturbed, in_norm, at::kCUDA);
  check_lipschitz_grad(op, grad, out, out_perturbed);
  const c10::cuda::CUDAGuard device_guard(out.device());
  const int64_t N = out_perturbed.size(0), B = out.size(0), K = out.size(1);
  const auto acc_type = opmath_scalar_type(out.scalar_type());
  const at::Tensor o = contiguous_aligned(out);
  const at::Tensor p = contiguous_aligned(out_perturbed);
  const at::Tensor den = contiguous_aligned(in_norm.to(acc_type));
  const at::Tensor g = contiguous_aligned(grad.to(acc_type));
  at::Tensor grad_out = at::empty({B, K}, out.options());
  at::Tensor grad_pert =
      compute_perturbed_grad ? at::empty({N, B, K}, out_perturbed.options()) : at::empty({0}, out_perturbed.options());
  at::Tensor ratio = with_ratio ? at::empty({N, B}, out.options().dtype(acc_type)) : at::Tensor();
  const int64_t rows = N * B;
  if (grad_out.numel() == 0 && rows == 0) return {grad_out, grad_pert, ratio};
  at::Tensor coef = at::empty({N, B}, out.options().dtype(acc_type));
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lipschitz_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (rows > 0) {
      lipschitz_row_kernel<scalar_t, acc_t, true><<<blocks_for(rows, kRowsPerBlock), kThreads, 0, stream>>>(
          o.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), den.const_data_ptr<acc_t>(),
          g.const_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>(),
          with_ratio ? ratio.mutable_data_ptr<acc_t>() : nullptr, rows, B, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grad_out.numel() > 0) {
      lipschitz_grad_kernel<scalar_t, acc_t><<<blocks_for(B * K, kThreads), kThreads, 0, stream>>>(
          o.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), coef.const_data_ptr<acc_t>(),
          grad_out.mutable_data_ptr<scalar_t>(),
          compute_perturbed_grad ? grad_pert.mutable_data_ptr<scalar_t>() : nullptr, N, B, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_out, grad_pert, ratio};
}

std::tuple<at::Tensor, at::Tensor> lipschitz_ratio_backward_cuda(const at::Tensor& grad, const at::Tensor& out,
                                                                 const at::Tensor& out_perturbed,
                                                                 const at::Tensor& in_norm,
                                                                 bool compute_perturbed_grad) {
  auto [grad_out, grad_pert, unused] =
      backward_cuda("_lipschitz_ratio_backward", grad, out, out_perturbed, in_norm, compute_perturbed_grad, false);
  return {grad_out, grad_pert};
}

// (ratio [N, B] in opmath, grad_out [B, K] in out.dtype) in one pass over out_perturbed's rows.
std::tuple<at::Tensor, at::Tensor> lipschitz_ratio_and_grad_cuda(const at::Tensor& grad, const at::Tensor& out,
                                                                 const at::Tensor& out_perturbed,
                                                                 const at::Tensor& in_norm) {
  auto [grad_out, unused, ratio] =
      backward_cuda("_lipschitz_ratio_and_grad", grad, out, out_perturbed, in_norm, false, true);
  return {ratio, grad_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CUDA, m) {
  m.impl("lipschitz_ratio", &lipschitz_ratio_cuda);
  m.impl("_lipschitz_ratio_backward", &lipschitz_ratio_backward_cuda);
  m.impl("_lipschitz_ratio_and_grad", &lipschitz_ratio_and_grad_cuda);
}

}  // namespace jit_unlearn
