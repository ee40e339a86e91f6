// CPU kernel of ssd_dampen_: a loop over the tensors, each walked by a vectorised at::parallel_for kernel.
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/dampen_utils.h"
#include "common/tensor_list_args.h"
#include "cpu/cpu_isa.h"

namespace jit_unlearn {
namespace {

constexpr int64_t kGrainSize = 32768;
// Elements whose selection test runs as one vectorised pass.
constexpr int64_t kChunk = 256;
// Selected elements whose theta cache line is prefetched ahead of its update.  Selected elements are
// sparse (~1% in practice), so a plain read-modify-write of theta would wait for one cache miss at a
// time; with the prefetches up to kPrefetchAhead misses are in flight.  theta is never otherwise touched.
constexpr int64_t kPrefetchAhead = 16;
constexpr int64_t kRing = 32;  // > kPrefetchAhead, a power of two
// A chunk with at least 1/kDenseFraction of its elements selected is updated in one dense pass.
constexpr int64_t kDenseFraction = 8;
static_assert(kChunk % 8 == 0 && kPrefetchAhead < kRing && (kRing & (kRing - 1)) == 0);

inline void prefetch_for_write(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address, 1, 3);
#else
  (void)address;
#endif
}

template <typename scalar_t, typename imp_t>
struct DampenArgs {
  scalar_t* theta;
  const imp_t* f;
  const imp_t* d;
  at::opmath_type<scalar_t> alpha, lam, exponent;
};

// Dampens [begin, end) of one tensor; returns the number of selected elements.
template <bool kApplyExponent, typename scalar_t, typename imp_t>
struct DampenRange {
  using Args = DampenArgs<scalar_t, imp_t>;
  using Signature = int64_t(const Args&, int64_t, int64_t);
  static constexpr CpuIsa kMaxIsa = CpuIsa::kAvx512;

  template <CpuIsa kIsa>
  static C10_ALWAYS_INLINE int64_t run(const Args& args, int64_t begin, int64_t end) {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* const theta = args.theta;
    const imp_t* const f = args.f;
    const imp_t* const d = args.d;
    const opmath_t alpha = args.alpha, lam = args.lam, exponent = args.exponent;
    alignas(64) uint8_t selected[kChunk];
    int64_t pending[kRing];
    int64_t head = 0;  // next pending element to update
    int64_t tail = 0;  // next free ring slot
    int64_t count = 0;
    const auto update = [&](int64_t i) {
      theta[i] = static_cast<scalar_t>(ssd_dampened<kApplyExponent>(
          static_cast<opmath_t>(theta[i]), static_cast<opmath_t>(f[i]), static_cast<opmath_t>(d[i]), lam, exponent));
    };
    const auto enqueue = [&](int64_t i) {
      prefetch_for_write(theta + i);
      pending[tail++ & (kRing - 1)] = i;
      if (tail - head > kPrefetchAhead) {
        update(pending[head++ & (kRing - 1)]);
      }
    };
    for (int64_t base = begin; base < end; base += kChunk) {
      const int64_t n = std::min(kChunk, end - base);
      int32_t chunk_count = 0;
      for (int64_t j = 0; j < n; ++j) {
        const uint8_t s = ssd_selected(static_cast<opmath_t>(f[base + j]), static_cast<opmath_t>(d[base + j]), alpha);
        selected[j] = s;
        chunk_count += s;
      }
      if (chunk_count == 0) {
        continue;
      }
      count += chunk_count;
      if (chunk_count * kDenseFraction >= n) {
        // Dense chunk: one streaming pass over theta is cheaper than per-element updates.  Unselected
        // elements are rewritten with their own value; their (discarded) factor may be inf or NaN.
        for (int64_t i = base; i < base + n; ++i) {
          const auto fi = static_cast<opmath_t>(f[i]);
          const auto di = static_cast<opmath_t>(d[i]);
          const auto old = static_cast<opmath_t>(theta[i]);
          const opmath_t dampened = ssd_dampened<kApplyExponent>(old, fi, di, lam, exponent);
          theta[i] = static_cast<scalar_t>(ssd_selected(fi, di, alpha) ? dampened : old);
        }
        continue;
      }
      if constexpr (std::endian::native == std::endian::little) {
        const int64_t whole = n - n % 8;
        for (int64_t j = 0; j < whole; j += 8) {
          uint64_t word;
          std::memcpy(&word, selected + j, 8);
          while (word != 0) {
            // Bytes are 0 or 1, so the lowest set bit 8b + 0 marks byte b.
            enqueue(base + j + (std::countr_zero(word) >> 3));
            word &= word - 1;
          }
        }
        for (int64_t j = whole; j < n; ++j) {
          if (selected[j] != 0) {
            enqueue(base + j);
          }
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          if (selected[j] != 0) {
            enqueue(base + j);
          }
        }
      }
    }
    while (head < tail) {
      update(pending[head++ & (kRing - 1)]);
    }
    return count;
  }
};

template <bool kApplyExponent, typename scalar_t, typename imp_t>
int64_t dampen_tensor(const at::Tensor& param, const at::Tensor& imp_forget, const at::Tensor& imp_full,
                      double alpha, double lam, double exponent) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* theta = param.data_ptr<scalar_t>();
  const imp_t* f = imp_forget.const_data_ptr<imp_t>();
  const imp_t* d = imp_full.const_data_ptr<imp_t>();
  const DampenArgs<scalar_t, imp_t> args{theta, f, d, static_cast<opmath_t>(alpha), static_cast<opmath_t>(lam),
                                         static_cast<opmath_t>(exponent)};
  const auto range = isa_copy<DampenRange<kApplyExponent, scalar_t, imp_t>>();
  return at::parallel_reduce(
      int64_t{0}, param.numel(), kGrainSize, int64_t{0},
      [&](int64_t begin, int64_t end, int64_t count) { return count + range(args, begin, end); },
      std::plus<int64_t>());
}

// params[i] *= min(((lam * imp_full[i]) / imp_forget[i])^exponent, 1) where imp_forget[i] > alpha * imp_full[i].
// Returns the selected count per tensor (int64 [T]).  Importances may have any floating dtype; when
// imp_forget[i] and imp_full[i] differ in dtype both are converted to the opmath dtype first.
at::Tensor ssd_dampen_cpu(at::TensorList params, at::TensorList imp_forget, at::TensorList imp_full, double alpha,
                          double lam, double exponent) {
  check_ssd_dampen_args(params, imp_forget, imp_full, alpha, lam, exponent, at::kCPU);

  at::Tensor counts = at::zeros({static_cast<int64_t>(params.size())}, at::dtype(at::kLong));
  int64_t* counts_ptr = counts.data_ptr<int64_t>();
  const bool apply_exponent = exponent != 1.0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    if (param.numel() == 0) {
      continue;
    }
    const at::ScalarType imp_dtype = ssd_importance_dtype(param, imp_forget[i], imp_full[i]);
    const at::Tensor f = match_layout(imp_forget[i], param, imp_dtype);
    const at::Tensor d = match_layout(imp_full[i], param, imp_dtype);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "ssd_dampen_cpu", [&] {
      using param_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, imp_dtype, "ssd_dampen_cpu", [&] {
        counts_ptr[i] = apply_exponent
                            ? dampen_tensor<true, param_t, scalar_t>(param, f, d, alpha, lam, exponent)
                            : dampen_tensor<false, param_t, scalar_t>(param, f, d, alpha, lam, exponent);
      });
    });
  }
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CPU, m) {
  m.impl("ssd_dampen_", &ssd_dampen_cpu);
}

}  // namespace jit_unlearn
