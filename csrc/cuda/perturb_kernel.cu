// CUDA kernel of jit_unlearn::perturb: Philox noise, add, clamp and per-sample norms.  Bitwise the CPU
// kernel, x_tilde and in_norm alike: the shared per-element maths (--fmad=false) and the shared summation
// order of in_norm (common/perturb_utils.h), with no float atomics.
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
#include "cuda/vec_utils.cuh"

namespace jit_unlearn {
namespace {

// One block per chunk of kNormSpan flat elements, one Philox group (4 elements) per thread.
constexpr int kThreads = static_cast<int>(kNormSpan / 4);
constexpr int kBlocksPerSm = 8;
// Spans per chunk up to which each (span, lane) pair gets its own thread.
constexpr int kPairSpans = kThreads / kNormLanes;
static_assert(kThreads == 256 && kNormLanes == 8, "the launch shape below");

// Per chunk, read by every thread: chunk start modulo x.numel(), first row, number of spans.
struct ChunkInfo {
  int64_t x_start;
  int64_t first_row;
  int span_count;
};

// x_tilde, then in_norm in the summation order of common/perturb_utils.h, bitwise as the CPU kernel; no
// float atomics, so the result is the same on every run.  A block takes chunks c = blockIdx.x, +gridDim.x,
// ... (block-uniform loop).  For chunk c, covering flat elements [c kNormSpan, + n):
//   1. thread t draws Philox group c kNormSpan / 4 + t and writes x_tilde for its 4 elements (one vector
//      load of x and one vector store when aligned: vec_x, vec_out), keeping the squared differences in
//      shared memory;
//   2. the chunk's spans (the pieces of the rows that meet it) are summed: a thread per (span, lane) when
//      there are at most kPairSpans spans, else (rows under ~33 elements) a thread per span;
//   3. a row that lies in this chunk alone gets in_norm = sqrt(0 + span) here; a row that crosses chunk
//      boundaries leaves its span total in span_sums[c + row] (unique: rows and chunks both increase), and
//      perturb_rows_kernel adds them in order.
// Divisions are 64-bit once per chunk (thread 0), never per group; x indices advance with a wrap.
template <bool kClamp, typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kThreads)
    perturb_chunks_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, opmath_t* __restrict__ in_norm,
                          opmath_t* __restrict__ span_sums, const scalar_t* __restrict__ lo_ptr,
                          const scalar_t* __restrict__ hi_ptr, int64_t x_numel, int64_t row_numel, int64_t total,
                          int64_t chunks, opmath_t sigma, uint64_t seed, uint64_t offset, bool vec_x, bool vec_out) {
  __shared__ opmath_t sq[kNormSpan];
  __shared__ opmath_t lane_sums[kThreads];
  __shared__ ChunkInfo info;
  const opmath_t lo = kClamp ? static_cast<opmath_t>(*lo_ptr) : opmath_t(0);
  const opmath_t hi = kClamp ? static_cast<opmath_t>(*hi_ptr) : opmath_t(0);
  const int t = threadIdx.x;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int64_t first = c * kNormSpan;
    const int n = static_cast<int>(total - first < kNormSpan ? total - first : kNormSpan);
    if (t == 0) {
      info.x_start = first % x_numel;
      info.first_row = first / row_numel;
      info.span_count = static_cast<int>((first + n - 1) / row_numel - info.first_row + 1);
    }
    __syncthreads();

    // 1. noise, x_tilde, squared differences
    const int e0 = 4 * t;
    if (e0 < n) {
      float z[4];
      philox_normal4(static_cast<uint64_t>(first / 4 + t), seed, offset, z);
      int64_t xi = info.x_start + e0;  // < 2 x_numel when x_numel >= kNormSpan
      xi = x_numel >= kNormSpan ? (xi >= x_numel ? xi - x_numel : xi)
                                : static_cast<int64_t>(static_cast<uint32_t>(xi) % static_cast<uint32_t>(x_numel));
      cuda::Vec4<scalar_t> xs;
      if (vec_x && e0 + 3 < n) {
        xs = cuda::load4(x + xi);  // x_numel % 4 == 0: the 4 elements do not wrap
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (e0 + k < n) {
            xs.v[k] = x[xi];
            xi = xi + 1 == x_numel ? 0 : xi + 1;
          }
        }
      }
      cuda::Vec4<scalar_t> values;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (e0 + k < n) {
          const auto e = perturb_element<kClamp>(xs.v[k], z[k], sigma, lo, hi);
          values.v[k] = e.value;
          sq[e0 + k] = e.sq_diff;
        }
      }
      if (vec_out && e0 + 3 < n) {
        cuda::store4(out + first + e0, values);
      } else {
        for (int k = 0; e0 + k < n && k < 4; ++k) out[first + e0 + k] = values.v[k];
      }
    }
    __syncthreads();

    // 2. and 3. span sums
    const int64_t first_row = info.first_row;
    const int span_count = info.span_count;
    // Span s is row first_row + s's part of the chunk, [begin, end) relative to `first`.
    const auto span_begin = [&](int s) { return s == 0 ? 0 : static_cast<int>((first_row + s) * row_numel - first); };
    const auto span_end = [&](int s) {
      const int64_t row_end = (first_row + s + 1) * row_numel - first;
      return static_cast<int>(row_end < n ? row_end : n);
    };
    const auto finish = [&](int s, opmath_t span_total) {
      const int64_t row = first_row + s;
      const bool alone = row * row_numel >= first && (row + 1) * row_numel <= first + kNormSpan;
      if (alone) {
        in_norm[row] = perturb_norm(opmath_t(0) + span_total);
      } else {
        span_sums[c + row] = span_total;
      }
    };
    if (span_count <= kPairSpans) {
      const int s = t / kNormLanes;
      const int lane = t % kNormLanes;
      opmath_t lane_sum = 0;
      if (s < span_count) {
        const int begin = span_begin(s), end = span_end(s);
        const int whole = begin + (end - begin) / kNormLanes * kNormLanes;
        for (int j = begin + lane; j < whole; j += kNormLanes) lane_sum += sq[j];
        if (lane == 0) {
          for (int j = whole; j < end; ++j) lane_sum += sq[j];
        }
      }
      lane_sums[t] = lane_sum;
      __syncthreads();
      if (t < span_count) {
        opmath_t span_total = 0;
        for (int l = 0; l < kNormLanes; ++l) span_total += lane_sums[t * kNormLanes + l];
        finish(t, span_total);
      }
    } else {
      for (int s = t; s < span_count; s += kThreads) {
        const int begin = span_begin(s), end = span_end(s);
        const int whole = begin + (end - begin) / kNormLanes * kNormLanes;
        opmath_t lanes[kNormLanes] = {};
        for (int j = begin; j < whole; j += kNormLanes) {
#pragma unroll
          for (int l = 0; l < kNormLanes; ++l) lanes[l] += sq[j + l];
        }
        for (int j = whole; j < end; ++j) lanes[0] += sq[j];
        opmath_t span_total = 0;
#pragma unroll
        for (int l = 0; l < kNormLanes; ++l) span_total += lanes[l];
        finish(s, span_total);
      }
    }
    __syncthreads();  // sq, lane_sums and info are reused by the next chunk
  }
}

// in_norm of the rows that cross chunk boundaries: 0 + their span totals in order, then the square root.
template <typename opmath_t>
__global__ void perturb_rows_kernel(const opmath_t* __restrict__ span_sums, opmath_t* __restrict__ in_norm,
                                    int64_t rows, int64_t row_numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows; row += stride) {
    const int64_t first_chunk = row * row_numel / kNormSpan;
    const int64_t last_chunk = ((row + 1) * row_numel - 1) / kNormSpan;
    if (first_chunk == last_chunk) {
      continue;  // written by perturb_chunks_kernel
    }
    opmath_t sum = 0;
    for (int64_t c = first_chunk; c <= last_chunk; ++c) sum += span_sums[c + row];
    in_norm[row] = perturb_norm(sum);
  }
}

// Fills x_tilde and in_norm (contiguous, checked) from x: the clamp range (at::aminmax, read by the kernel
// from device memory: no host sync), the chunk kernel, and the row kernel only when some row crosses a
// chunk boundary.
void perturb_into_cuda(const at::Tensor& x_in, int64_t num_samples, double sigma, int64_t seed, int64_t offset,
                       bool clamp, at::Tensor& x_tilde, at::Tensor& in_norm) {
  const at::Tensor x = contiguous_aligned(x_in);
  const int64_t batch = x.size(0);
  const int64_t rows = num_samples * batch;
  if (rows == 0) {
    return;
  }
  const int64_t x_numel = x.numel();
  const int64_t row_numel = x_numel / batch;
  if (row_numel == 0) {  // samples with no elements: in_norm 0, no noise to draw
    in_norm.zero_();
    return;
  }
  const int64_t total = rows * row_numel;
  const int64_t chunks = (total + kNormSpan - 1) / kNormSpan;
  const bool crossing = total > kNormSpan && kNormSpan % row_numel != 0;
  at::Tensor lo, hi;
  if (clamp) {
    std::tie(lo, hi) = at::aminmax(x);
  }
  at::Tensor span_sums;
  if (crossing) {
    span_sums = at::empty({chunks + rows}, in_norm.options());
  }
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>(chunks, static_cast<int64_t>(sm_count) * kBlocksPerSm));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "perturb_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto sigma_op = static_cast<opmath_t>(sigma);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = x_tilde.mutable_data_ptr<scalar_t>();
    opmath_t* norm_ptr = in_norm.mutable_data_ptr<opmath_t>();
    opmath_t* spans_ptr = crossing ? span_sums.mutable_data_ptr<opmath_t>() : nullptr;
    const bool vec_x = x_numel % 4 == 0 && cuda::aligned4(x_ptr);
    const bool vec_out = cuda::aligned4(out_ptr);
    const auto useed = static_cast<uint64_t>(seed);
    const auto uoffset = static_cast<uint64_t>(offset);
    if (clamp) {
      perturb_chunks_kernel<true, scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
          x_ptr, out_ptr, norm_ptr, spans_ptr, lo.const_data_ptr<scalar_t>(), hi.const_data_ptr<scalar_t>(), x_numel,
          row_numel, total, chunks, sigma_op, useed, uoffset, vec_x, vec_out);
    } else {
      perturb_chunks_kernel<false, scalar_t, opmath_t>
          <<<blocks, kThreads, 0, stream>>>(x_ptr, out_ptr, norm_ptr, spans_ptr, nullptr, nullptr, x_numel, row_numel,
                                            total, chunks, sigma_op, useed, uoffset, vec_x, vec_out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (crossing) {
      const int row_blocks = static_cast<int>(
          std::min<int64_t>((rows + kThreads - 1) / kThreads, static_cast<int64_t>(sm_count) * kBlocksPerSm));
      perturb_rows_kernel<opmath_t><<<row_blocks, kThreads, 0, stream>>>(spans_ptr, norm_ptr, rows, row_numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor> perturb_cuda(const at::Tensor& x, int64_t num_samples, double sigma, int64_t seed,
                                                int64_t offset, bool clamp) {
  check_perturb_args(x, num_samples, sigma);
  TORCH_CHECK_VALUE(x.is_cuda(), "perturb: x: expected a CUDA tensor, got device ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto [x_tilde, in_norm] = perturb_outputs(x, num_samples);
  perturb_into_cuda(x, num_samples, sigma, seed, offset, clamp, x_tilde, in_norm);
  return {x_tilde, in_norm};
}

void perturb_out_cuda(const at::Tensor& x, int64_t num_samples, double sigma, int64_t seed, int64_t offset, bool clamp,
                      at::Tensor x_tilde, at::Tensor in_norm) {
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
