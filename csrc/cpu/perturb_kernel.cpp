// CPU kernel of jit_unlearn::perturb: Philox noise, add, clamp and per-sample norms in one pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/perturb_checks.h"
#include "common/perturb_utils.h"
#include "common/rng_utils.h"
#include "cpu/avx512_perturb.h"
#include "cpu/cpu_isa.h"

namespace jit_unlearn {
namespace {

// Philox groups drawn per chunk: 1,024 normals (4 KiB of words and 4 KiB of normals on the stack).  The
// chunks are the spans of in_norm's summation order (common/perturb_utils.h).
constexpr uint64_t kGroupsPerChunk = kNormSpan / 4;
// Independent partial sums of a span, so the squared-difference reduction vectorises.
constexpr int64_t kLanes = kNormLanes;

// The Philox words of groups [first, first + count) as four planes: w[k * kGroupsPerChunk + i] is
// word k of group first + i.  Portable form; the compiler vectorises it across groups.
C10_ALWAYS_INLINE void philox_words_portable(uint64_t first, int64_t count, uint64_t seed, uint64_t offset,
                                             uint32_t* __restrict__ w) {
  for (int64_t i = 0; i < count; ++i) {
    const PhiloxWords r = philox4x32_10(first + static_cast<uint64_t>(i), seed, offset);
    w[i] = r.r0;
    w[kGroupsPerChunk + i] = r.r1;
    w[2 * kGroupsPerChunk + i] = r.r2;
    w[3 * kGroupsPerChunk + i] = r.r3;
  }
}

// The end of a span: elements [i, len) (fewer than kLanes) into lane 0, then the lanes summed in order.
template <bool kClamp, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE opmath_t perturb_span_tail(const scalar_t* __restrict__ x, const float* __restrict__ z, int64_t i,
                                             int64_t len, opmath_t sigma, opmath_t lo, opmath_t hi,
                                             scalar_t* __restrict__ out, opmath_t* partial) {
  for (; i < len; ++i) {
    const auto e = perturb_element<kClamp>(x[i], z[i], sigma, lo, hi);
    out[i] = e.value;
    partial[0] += e.sq_diff;
  }
  opmath_t total = 0;
  for (int64_t k = 0; k < kLanes; ++k) {
    total += partial[k];
  }
  return total;
}

// The normals of Philox groups [first, first + count) into z[0 .. 4 count), count <= kGroupsPerChunk:
// the words, then their Box-Muller transform (philox_normal4's arithmetic, group by group).
template <CpuIsa kIsa>
C10_ALWAYS_INLINE void philox_normals(uint64_t first, int64_t count, uint64_t seed, uint64_t offset,
                                      float* __restrict__ z) {
  alignas(64) uint32_t w[4 * kGroupsPerChunk];
#ifdef JIT_UNLEARN_X86_ISA
  if constexpr (kIsa == CpuIsa::kAvx512) {
    avx512::philox_words<kGroupsPerChunk>(first, count, seed, offset, w);
    avx512::box_muller<kGroupsPerChunk>(w, count, z);
    return;
  }
#endif
  philox_words_portable(first, count, seed, offset, w);
  for (int64_t i = 0; i < count; ++i) {
    const float rad01 = sqrtf(neg2log_uniform(w[i]));
    const float rad23 = sqrtf(neg2log_uniform(w[2 * kGroupsPerChunk + i]));
    float c01, s01, c23, s23;
    sincos_2pi_uniform(w[kGroupsPerChunk + i], c01, s01);
    sincos_2pi_uniform(w[3 * kGroupsPerChunk + i], c23, s23);
    z[4 * i] = rad01 * c01;
    z[4 * i + 1] = rad01 * s01;
    z[4 * i + 2] = rad23 * c23;
    z[4 * i + 3] = rad23 * s23;
  }
}

// x_tilde[i] for i < len from x[i] and z[i]; returns sum_i (x_tilde[i] - x[i])^2 in opmath: element i
// goes to lane i % kLanes of the whole blocks of kLanes, the rest to lane 0, then the lanes are summed
// in order (the order the CUDA kernel reproduces).
template <CpuIsa kIsa, bool kClamp, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE opmath_t perturb_span(const scalar_t* __restrict__ x, const float* __restrict__ z, int64_t len,
                                        opmath_t sigma, opmath_t lo, opmath_t hi, scalar_t* __restrict__ out) {
#ifdef JIT_UNLEARN_X86_ISA
  if constexpr (kIsa == CpuIsa::kAvx512 && std::is_same_v<scalar_t, float>) {
    static_assert(kLanes == 8, "avx512::perturb_span_lanes sums into 8 lanes");
    float lanes[kLanes];
    const int64_t i = avx512::perturb_span_lanes<kClamp>(x, z, len, sigma, lo, hi, out, lanes);
    return perturb_span_tail<kClamp>(x, z, i, len, sigma, lo, hi, out, lanes);
  }
#endif
  opmath_t partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const auto e = perturb_element<kClamp>(x[i + k], z[i + k], sigma, lo, hi);
      out[i + k] = e.value;
      partial[k] += e.sq_diff;
    }
  }
  return perturb_span_tail<kClamp>(x, z, i, len, sigma, lo, hi, out, partial);
}

// The operands of one call.  Row r = n B + b of the flattened [N, B] output covers flat noise
// elements [r D, (r + 1) D) and reads x row b.
template <typename scalar_t, typename opmath_t>
struct PerturbArgs {
  const scalar_t* x;
  scalar_t* out;
  opmath_t* in_norm;
  int64_t batch, row_numel;
  opmath_t sigma, lo, hi;
  uint64_t seed, offset;
};

// Rows [begin, end).  The noise of the whole range is drawn in chunks of kGroupsPerChunk Philox
// groups that cross row boundaries (short rows still fill whole vectors).  Chunks start at fixed
// multiples of kGroupsPerChunk groups, so how a row splits into spans, and so the order of its
// norm's sum, does not depend on which task runs it: the result is the same for every thread count.
template <bool kClamp, typename scalar_t, typename opmath_t>
struct PerturbRows {
  using Signature = void(const PerturbArgs<scalar_t, opmath_t>&, int64_t, int64_t);
  static constexpr CpuIsa kMaxIsa = CpuIsa::kAvx512;

  template <CpuIsa kIsa>
  static C10_ALWAYS_INLINE void run(const PerturbArgs<scalar_t, opmath_t>& a, int64_t begin, int64_t end) {
    alignas(64) float z[4 * kGroupsPerChunk];
    const uint64_t numel = static_cast<uint64_t>(a.row_numel);
    const uint64_t flat_end = static_cast<uint64_t>(end) * numel;
    const uint64_t last_group = (flat_end + 3) / 4;  // one past the last group needed
    uint64_t j = static_cast<uint64_t>(begin) * numel;
    int64_t row = begin;
    int64_t x_row = begin % a.batch;  // row % batch, advanced with the row
    uint64_t col = 0;
    opmath_t sq_sum = 0;
    while (j < flat_end) {
      const uint64_t group = j / 4;
      const uint64_t chunk_end = std::min<uint64_t>((group / kGroupsPerChunk + 1) * kGroupsPerChunk, last_group);
      philox_normals<kIsa>(group, static_cast<int64_t>(chunk_end - group), a.seed, a.offset, z);
      const uint64_t stop = std::min<uint64_t>(flat_end, 4 * chunk_end);
      while (j < stop) {
        const uint64_t len = std::min<uint64_t>(stop - j, numel - col);
        const int64_t at = static_cast<int64_t>(col);
        sq_sum +=
            perturb_span<kIsa, kClamp>(a.x + x_row * a.row_numel + at, z + (j - 4 * group), static_cast<int64_t>(len),
                                       a.sigma, a.lo, a.hi, a.out + row * a.row_numel + at);
        j += len;
        col += len;
        if (col == numel) {
          a.in_norm[row] = perturb_norm(sq_sum);
          sq_sum = 0;
          col = 0;
          ++row;
          if (++x_row == a.batch) x_row = 0;
        }
      }
    }
  }
};

// Fills x_tilde and in_norm (contiguous, checked) from x.
void perturb_into_cpu(const at::Tensor& x_in, int64_t num_samples, double sigma, int64_t seed, int64_t offset,
                      bool clamp, at::Tensor& x_tilde, at::Tensor& in_norm) {
  const at::Tensor x = contiguous_aligned(x_in);
  const int64_t batch = x.size(0);
  const int64_t rows = num_samples * batch;
  const int64_t row_numel = batch > 0 ? x.numel() / batch : 0;
  if (rows == 0) return;
  if (row_numel == 0) {  // samples with no elements: in_norm 0, no noise to draw
    in_norm.zero_();
    return;
  }
  const bool do_clamp = clamp && x.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "perturb_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    opmath_t lo = 0, hi = 0;
    if (do_clamp) {
      const auto [lo_t, hi_t] = at::aminmax(x);
      lo = lo_t.item<opmath_t>();
      hi = hi_t.item<opmath_t>();
    }
    const PerturbArgs<scalar_t, opmath_t> args{x.const_data_ptr<scalar_t>(),
                                               x_tilde.mutable_data_ptr<scalar_t>(),
                                               in_norm.mutable_data_ptr<opmath_t>(),
                                               batch,
                                               row_numel,
                                               static_cast<opmath_t>(sigma),
                                               lo,
                                               hi,
                                               static_cast<uint64_t>(seed),
                                               static_cast<uint64_t>(offset)};
    const auto rows_fn = do_clamp ? isa_copy<PerturbRows<true, scalar_t, opmath_t>>()
                                  : isa_copy<PerturbRows<false, scalar_t, opmath_t>>();
    // About 16 K elements per task.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(row_numel, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { rows_fn(args, begin, end); });
  });
}

std::tuple<at::Tensor, at::Tensor> perturb_cpu(const at::Tensor& x, int64_t num_samples, double sigma, int64_t seed,
                                               int64_t offset, bool clamp) {
  check_perturb_args(x, num_samples, sigma);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "perturb: x: expected a CPU tensor, got device ", x.device());
  auto [x_tilde, in_norm] = perturb_outputs(x, num_samples);
  perturb_into_cpu(x, num_samples, sigma, seed, offset, clamp, x_tilde, in_norm);
  return {x_tilde, in_norm};
}

void perturb_out_cpu(const at::Tensor& x, int64_t num_samples, double sigma, int64_t seed, int64_t offset, bool clamp,
                     at::Tensor x_tilde, at::Tensor in_norm) {
  check_perturb_args(x, num_samples, sigma);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "_perturb_out: x: expected a CPU tensor, got device ", x.device());
  check_perturb_out(x, num_samples, x_tilde, in_norm);
  perturb_into_cpu(x, num_samples, sigma, seed, offset, clamp, x_tilde, in_norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CPU, m) {
  m.impl("perturb", &perturb_cpu);
  m.impl("_perturb_out", &perturb_out_cpu);
}

}  // namespace jit_unlearn
