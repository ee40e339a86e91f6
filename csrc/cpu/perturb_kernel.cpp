// CPU kernel of jit_unlearn::perturb: Philox noise, add, clamp and per-sample norms in one pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/perturb_checks.h"
#include "common/perturb_utils.h"
#include "common/rng_utils.h"

// The hot loops are compiled again for AVX-512 and AVX2 and the clone is picked at load time; the
// results are bitwise the same (-ffp-contract=off: no FMA contraction in any clone).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define JIT_UNLEARN_HOT __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define JIT_UNLEARN_HOT
#endif

namespace jit_unlearn {
namespace {

// Philox groups drawn per step of a row: 256 normals, 1 KiB of stack.
constexpr int64_t kGroupsPerChunk = 64;
// Independent partial sums of a row, so the squared-difference reduction vectorises.
constexpr int64_t kLanes = 8;

// The normals of Philox groups [first, first + count) into z[0 .. 4 count).
JIT_UNLEARN_HOT void philox_normals(uint64_t first, int64_t count, uint64_t seed, uint64_t offset, float* z) {
  for (int64_t i = 0; i < count; ++i) {
    philox_normal4(first + static_cast<uint64_t>(i), seed, offset, z + 4 * i);
  }
}

// x_tilde[i] for i < len from x[i] and z[i]; returns sum_i (x_tilde[i] - x[i])^2 in opmath.
template <bool kClamp, typename scalar_t, typename opmath_t>
JIT_UNLEARN_HOT opmath_t perturb_span(const scalar_t* __restrict__ x, const float* __restrict__ z, int64_t len, opmath_t sigma,
                      opmath_t lo, opmath_t hi, scalar_t* __restrict__ out) {
  opmath_t partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const auto e = perturb_element<kClamp>(x[i + k], z[i + k], sigma, lo, hi);
      out[i + k] = e.value;
      partial[k] += e.sq_diff;
    }
  }
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

// Rows [begin, end) of the flattened [N, B] output; row r = n B + b covers flat noise elements
// [r D, (r + 1) D) and reads x row b.
template <bool kClamp, typename scalar_t, typename opmath_t>
void perturb_rows(const scalar_t* x, scalar_t* out, opmath_t* in_norm, int64_t begin, int64_t end, int64_t batch,
                  int64_t row_numel, opmath_t sigma, opmath_t lo, opmath_t hi, uint64_t seed, uint64_t offset) {
  alignas(64) float z[4 * kGroupsPerChunk];
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x_row = x + (row % batch) * row_numel;
    scalar_t* out_row = out + row * row_numel;
    const uint64_t row_first = static_cast<uint64_t>(row) * static_cast<uint64_t>(row_numel);
    const uint64_t row_last = row_first + static_cast<uint64_t>(row_numel);
    opmath_t sq_sum = 0;
    uint64_t j = row_first;
    while (j < row_last) {
      const uint64_t group = j / 4;
      const int64_t groups = static_cast<int64_t>(
          std::min<uint64_t>(kGroupsPerChunk, (row_last + 3) / 4 - group));
      philox_normals(group, groups, seed, offset, z);
      const uint64_t chunk_last = std::min<uint64_t>(row_last, 4 * (group + groups));
      const int64_t len = static_cast<int64_t>(chunk_last - j);
      const int64_t col = static_cast<int64_t>(j - row_first);
      sq_sum += perturb_span<kClamp>(x_row + col, z + (j - 4 * group), len, sigma, lo, hi, out_row + col);
      j = chunk_last;
    }
    in_norm[row] = std::sqrt(sq_sum);
  }
}

std::tuple<at::Tensor, at::Tensor> perturb_cpu(const at::Tensor& x_in, int64_t num_samples, double sigma,
                                               int64_t seed, int64_t offset, bool clamp) {
  check_perturb_args(x_in, num_samples, sigma);
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "perturb: x: expected a CPU tensor, got device ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  auto [x_tilde, in_norm] = perturb_outputs(x, num_samples, /*zero_norm=*/false);
  const int64_t batch = x.size(0);
  const int64_t rows = num_samples * batch;
  if (rows == 0) {
    return {x_tilde, in_norm};
  }
  const int64_t row_numel = x.numel() / batch;
  const bool do_clamp = clamp && x.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "perturb_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    opmath_t lo = 0, hi = 0;
    if (do_clamp) {
      const auto [lo_t, hi_t] = at::aminmax(x);
      lo = lo_t.item<opmath_t>();
      hi = hi_t.item<opmath_t>();
    }
    const auto sigma_op = static_cast<opmath_t>(sigma);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = x_tilde.mutable_data_ptr<scalar_t>();
    opmath_t* norm_ptr = in_norm.mutable_data_ptr<opmath_t>();
    const auto useed = static_cast<uint64_t>(seed);
    const auto uoffset = static_cast<uint64_t>(offset);
    // About 16 K elements per task.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(row_numel, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      if (do_clamp) {
        perturb_rows<true>(x_ptr, out_ptr, norm_ptr, begin, end, batch, row_numel, sigma_op, lo, hi, useed,
                           uoffset);
      } else {
        perturb_rows<false>(x_ptr, out_ptr, norm_ptr, begin, end, batch, row_numel, sigma_op, lo, hi, useed,
                            uoffset);
      }
    });
  });
  return {x_tilde, in_norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CPU, m) {
  m.impl("perturb", &perturb_cpu);
}

}  // namespace jit_unlearn
