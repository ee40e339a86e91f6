// CPU kernel of ssd_dampen_ in two passes over the tensors, each an at::parallel_for over chunks of
// kChunk elements.  Pass 1 reads both importances once: it checks that they are valid (>= 0, not NaN)
// and stores the selection I_f > alpha * I_D as one bit per element.  Only when every importance of
// every tensor is valid does pass 2 write: it walks the bits and dampens the selected elements, rereading
// the importances only there (or streaming a whole chunk when many of its elements are selected).
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

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

// Elements per chunk: the unit of the selection bits (kChunk / 64 words) and of the dense-or-sparse choice.
constexpr int64_t kChunk = 256;
constexpr int64_t kWordsPerChunk = kChunk / 64;
// Chunks per parallel task (32 K elements, as at::internal::GRAIN_SIZE).
constexpr int64_t kGrainChunks = 128;
// Selected elements whose cache lines (theta, I_f, I_D) are prefetched ahead of their update.  Selected
// elements are sparse (~1% in practice), so plain loads would wait for one cache miss at a time; with the
// prefetches up to kPrefetchAhead elements' misses are in flight.
constexpr int64_t kPrefetchAhead = 16;
constexpr int64_t kRing = 32;  // > kPrefetchAhead, a power of two
// A chunk with at least 1/kDenseFraction of its elements selected is updated in one dense pass.
constexpr int64_t kDenseFraction = 8;
static_assert(kChunk % 64 == 0 && kPrefetchAhead < kRing && (kRing & (kRing - 1)) == 0);

inline void prefetch(const void* address, bool for_write) {
#if defined(__GNUC__) || defined(__clang__)
  if (for_write) {
    __builtin_prefetch(address, 1, 3);
  } else {
    __builtin_prefetch(address, 0, 3);
  }
#else
  (void)address;
  (void)for_write;
#endif
}

// The 8 bytes at `bytes` (each 0 or 1) as 8 bits, byte k to bit k.  The multiply moves byte k's bit from
// position 8k to 56 + k; the partial products land on distinct bits, so nothing carries into the top byte.
inline uint64_t pack8(const uint8_t* bytes) {
  uint64_t word;
  std::memcpy(&word, bytes, 8);
  if constexpr (std::endian::native == std::endian::big) {
    word = __builtin_bswap64(word);
  }
  return (word * 0x0102040810204080ull) >> 56;
}

template <typename scalar_t, typename imp_t>
struct DampenArgs {
  scalar_t* theta;
  const imp_t* f;
  const imp_t* d;
  uint64_t* bits;  // kWordsPerChunk words per chunk; bit j % 64 of word j / 64 is element j of the chunk
  int64_t numel;
  at::opmath_type<scalar_t> alpha, lam, exponent;
};

// What pass 1 found in a range of chunks.
struct SelectResult {
  int64_t count = 0;
  bool bad_forget = false;
  bool bad_full = false;
};

inline SelectResult combine(SelectResult a, const SelectResult& b) {
  a.count += b.count;
  a.bad_forget |= b.bad_forget;
  a.bad_full |= b.bad_full;
  return a;
}

// Pass 1 over chunks [begin, end): selection bits, selected count, validity of both importances.
template <typename scalar_t, typename imp_t>
struct SelectChunks {
  using Args = DampenArgs<scalar_t, imp_t>;
  using Signature = SelectResult(const Args&, int64_t, int64_t);
  static constexpr CpuIsa kMaxIsa = CpuIsa::kAvx512;

  template <CpuIsa kIsa>
  static C10_ALWAYS_INLINE SelectResult run(const Args& a, int64_t begin, int64_t end) {
    using opmath_t = at::opmath_type<scalar_t>;
    alignas(64) uint8_t selected[kChunk];
    SelectResult result;
    uint8_t ok_forget = 1, ok_full = 1;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t base = c * kChunk;
      const int64_t n = std::min(kChunk, a.numel - base);
      int32_t count = 0;
      for (int64_t j = 0; j < n; ++j) {
        const auto fj = static_cast<opmath_t>(a.f[base + j]);
        const auto dj = static_cast<opmath_t>(a.d[base + j]);
        ok_forget &= static_cast<uint8_t>(ssd_importance_valid(fj));
        ok_full &= static_cast<uint8_t>(ssd_importance_valid(dj));
        const uint8_t s = ssd_selected(fj, dj, a.alpha);
        selected[j] = s;
        count += s;
      }
      std::fill(selected + n, selected + kChunk, uint8_t{0});
      result.count += count;
      uint64_t* words = a.bits + c * kWordsPerChunk;
      for (int64_t w = 0; w < kWordsPerChunk; ++w) {
        uint64_t word = 0;
        for (int64_t k = 0; k < 8; ++k) {
          word |= pack8(selected + 64 * w + 8 * k) << (8 * k);
        }
        words[w] = word;
      }
    }
    result.bad_forget = ok_forget == 0;
    result.bad_full = ok_full == 0;
    return result;
  }
};

// Pass 2 over chunks [begin, end): dampens the selected elements.
template <bool kApplyExponent, typename scalar_t, typename imp_t>
struct DampenChunks {
  using Args = DampenArgs<scalar_t, imp_t>;
  using Signature = void(const Args&, int64_t, int64_t);
  static constexpr CpuIsa kMaxIsa = CpuIsa::kAvx512;

  template <CpuIsa kIsa>
  static C10_ALWAYS_INLINE void run(const Args& a, int64_t begin, int64_t end) {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* const theta = a.theta;
    const imp_t* const f = a.f;
    const imp_t* const d = a.d;
    int64_t pending[kRing];
    int64_t head = 0;  // next pending element to update
    int64_t tail = 0;  // next free ring slot
    const auto update = [&](int64_t i) {
      theta[i] = static_cast<scalar_t>(ssd_dampened<kApplyExponent>(static_cast<opmath_t>(theta[i]),
                                                                    static_cast<opmath_t>(f[i]),
                                                                    static_cast<opmath_t>(d[i]), a.lam, a.exponent));
    };
    const auto enqueue = [&](int64_t i) {
      prefetch(theta + i, true);
      prefetch(f + i, false);
      prefetch(d + i, false);
      pending[tail++ & (kRing - 1)] = i;
      if (tail - head > kPrefetchAhead) {
        update(pending[head++ & (kRing - 1)]);
      }
    };
    for (int64_t c = begin; c < end; ++c) {
      const int64_t base = c * kChunk;
      const int64_t n = std::min(kChunk, a.numel - base);
      const uint64_t* words = a.bits + c * kWordsPerChunk;
      int64_t count = 0;
      for (int64_t w = 0; w < kWordsPerChunk; ++w) {
        count += std::popcount(words[w]);
      }
      if (count == 0) {
        continue;
      }
      if (count * kDenseFraction >= n) {
        // Dense chunk: one streaming pass over theta is cheaper than per-element updates.  Unselected
        // elements are rewritten with their own value; their (discarded) factor may be inf or NaN.
        for (int64_t i = base; i < base + n; ++i) {
          const auto fi = static_cast<opmath_t>(f[i]);
          const auto di = static_cast<opmath_t>(d[i]);
          const auto old = static_cast<opmath_t>(theta[i]);
          const opmath_t dampened = ssd_dampened<kApplyExponent>(old, fi, di, a.lam, a.exponent);
          theta[i] = static_cast<scalar_t>(ssd_selected(fi, di, a.alpha) ? dampened : old);
        }
        continue;
      }
      for (int64_t w = 0; w < kWordsPerChunk; ++w) {
        for (uint64_t word = words[w]; word != 0; word &= word - 1) {
          enqueue(base + 64 * w + std::countr_zero(word));
        }
      }
    }
    while (head < tail) {
      update(pending[head++ & (kRing - 1)]);
    }
  }
};

// One tensor's operands, prepared before anything is written.
struct DampenOperands {
  size_t index;  // position in the caller's lists
  at::Tensor param, f, d;
  int64_t first_word;  // of its selection bits
};

// Calls fn.template operator()<param_t, imp_t>() for the operands' dtypes.
template <typename Fn>
void dispatch_dampen(const DampenOperands& op, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.param.scalar_type(), "ssd_dampen_cpu", [&] {
    using param_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.f.scalar_type(), "ssd_dampen_cpu",
                                    [&] { fn.template operator()<param_t, scalar_t>(); });
  });
}

template <typename param_t, typename imp_t>
DampenArgs<param_t, imp_t> dampen_args(const DampenOperands& op, uint64_t* bits, double alpha, double lam,
                                       double exponent) {
  using opmath_t = at::opmath_type<param_t>;
  return {op.param.data_ptr<param_t>(),
          op.f.const_data_ptr<imp_t>(),
          op.d.const_data_ptr<imp_t>(),
          bits + op.first_word,
          op.param.numel(),
          static_cast<opmath_t>(alpha),
          static_cast<opmath_t>(lam),
          static_cast<opmath_t>(exponent)};
}

// params[i] *= min(((lam * imp_full[i]) / imp_forget[i])^exponent, 1) where imp_forget[i] > alpha * imp_full[i].
// Returns the selected count per tensor (int64 [T]).  Importances may have any of the four float dtypes;
// when imp_forget[i] and imp_full[i] differ in dtype both are converted to the opmath dtype first.  A
// negative or NaN importance raises before any parameter is written.
at::Tensor ssd_dampen_cpu(at::TensorList params, at::TensorList imp_forget, at::TensorList imp_full, double alpha,
                          double lam, double exponent) {
  check_ssd_dampen_args(params, imp_forget, imp_full, alpha, lam, exponent, at::kCPU);

  std::vector<DampenOperands> operands;
  int64_t words = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    if (param.numel() == 0) {
      continue;
    }
    const at::ScalarType imp_dtype = ssd_importance_dtype(param, imp_forget[i], imp_full[i]);
    operands.push_back(
        {i, param, match_layout(imp_forget[i], param, imp_dtype), match_layout(imp_full[i], param, imp_dtype), words});
    words += (param.numel() + kChunk - 1) / kChunk * kWordsPerChunk;
  }
  const std::unique_ptr<uint64_t[]> bits(new uint64_t[std::max<int64_t>(words, 1)]);

  at::Tensor counts = at::zeros({static_cast<int64_t>(params.size())}, at::dtype(at::kLong));
  int64_t* counts_ptr = counts.data_ptr<int64_t>();
  for (const DampenOperands& op : operands) {
    dispatch_dampen(op, [&]<typename param_t, typename imp_t>() {
      const auto args = dampen_args<param_t, imp_t>(op, bits.get(), alpha, lam, exponent);
      const auto select = isa_copy<SelectChunks<param_t, imp_t>>();
      const SelectResult found = at::parallel_reduce(
          int64_t{0}, (args.numel + kChunk - 1) / kChunk, kGrainChunks, SelectResult{},
          [&](int64_t begin, int64_t end, SelectResult acc) { return combine(acc, select(args, begin, end)); },
          combine);
      TORCH_CHECK_VALUE(!found.bad_forget, "ssd_dampen_: imp_forget[", op.index,
                        "]" JIT_UNLEARN_SSD_INVALID_IMPORTANCE);
      TORCH_CHECK_VALUE(!found.bad_full, "ssd_dampen_: imp_full[", op.index, "]" JIT_UNLEARN_SSD_INVALID_IMPORTANCE);
      counts_ptr[op.index] = found.count;
    });
  }
  const bool apply_exponent = exponent != 1.0;
  for (const DampenOperands& op : operands) {
    if (counts_ptr[op.index] == 0) {
      continue;
    }
    dispatch_dampen(op, [&]<typename param_t, typename imp_t>() {
      const auto args = dampen_args<param_t, imp_t>(op, bits.get(), alpha, lam, exponent);
      const auto dampen = apply_exponent ? isa_copy<DampenChunks<true, param_t, imp_t>>()
                                         : isa_copy<DampenChunks<false, param_t, imp_t>>();
      at::parallel_for(0, (args.numel + kChunk - 1) / kChunk, kGrainChunks,
                       [&](int64_t begin, int64_t end) { dampen(args, begin, end); });
    });
  }
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CPU, m) { m.impl("ssd_dampen_", &ssd_dampen_cpu); }

}  // namespace jit_unlearn
