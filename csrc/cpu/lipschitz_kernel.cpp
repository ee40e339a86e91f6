// CPU kernels of lipschitz_ratio and _lipschitz_ratio_backward (rows in parallel, lane-split row sums).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/lipschitz_checks.h"
#include "common/lipschitz_utils.h"
#include "cpu/cpu_isa.h"

#ifdef JIT_UNLEARN_X86_ISA
#include <immintrin.h>
#endif

// The loops below are compiled for the baseline ISA and for AVX2 (cpu/cpu_isa.h); both give
// bitwise the same results.

namespace jit_unlearn {
namespace {

// Independent partial sums per row: they break the add-latency chain and let the compiler vectorise
// without reassociating (the summation order is fixed, whatever the instruction set).
constexpr int64_t kLanes = 8;
// Elements of work per parallel task, as at::internal::GRAIN_SIZE.
constexpr int64_t kGrainElements = 32768;

// Contiguous operands of one call.  Forward: ratio = f(out, out_perturbed, in_norm).  Backward:
// grad_out (and grad_perturbed unless null) = f(grad, out, out_perturbed, in_norm).
template <typename scalar_t, typename acc_t>
struct LipschitzArgs {
  const scalar_t* out = nullptr;            // [B, K]
  const scalar_t* out_perturbed = nullptr;  // [N, B, K]
  const acc_t* in_norm = nullptr;           // [N, B]
  const acc_t* grad = nullptr;              // [N, B]
  acc_t* ratio = nullptr;                   // [N, B]
  scalar_t* grad_out = nullptr;             // [B, K]
  scalar_t* grad_perturbed = nullptr;       // [N, B, K] or null
  int64_t N = 0, B = 0, K = 0;
};

// sum_k (a[k] - b[k])^2 in acc_t.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE acc_t row_sq_distance(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                        int64_t K) {
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] = lipschitz_sq_diff_accumulate<acc_t>(lanes[l], static_cast<acc_t>(a[k + l]),
                                                     static_cast<acc_t>(b[k + l]));
    }
  }
  for (int64_t l = 0; k < K; ++k, ++l) {
    lanes[l] = lipschitz_sq_diff_accumulate<acc_t>(lanes[l], static_cast<acc_t>(a[k]), static_cast<acc_t>(b[k]));
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// Forward rows [begin, end) of the flattened [N * B] output.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void forward_rows(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const int64_t B = a.B, K = a.K;
  // Row n * B + b pairs out_perturbed[n, b] with out[b]; b wraps instead of a division per row.
  for (int64_t row = begin, b = begin % B; row < end; ++row) {
    a.ratio[row] = row_sq_distance<scalar_t, acc_t>(a.out + b * K, a.out_perturbed + row * K, K);
    if (++b == B) b = 0;
  }
  // A separate pass, so the sqrt and division latencies of consecutive rows overlap.
  for (int64_t row = begin; row < end; ++row) a.ratio[row] = lipschitz_ratio_value<acc_t>(a.ratio[row], a.in_norm[row]);
}

// Backward for b in [begin, end): each b owns the row grad_out[b, :], summed over n in order.
// acc [K] and coefs [N] are the task's scratch.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void backward_rows(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end,
                                     acc_t* __restrict__ acc, acc_t* __restrict__ coefs) {
  const int64_t N = a.N, B = a.B, K = a.K;
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* __restrict__ ob = a.out + b * K;
    // All N coefficients of b first (their sqrt/division latencies overlap), then the sums over n;
    // the N rows out_perturbed[:, b] (N * K elements) stay in cache between the two passes.
    for (int64_t n = 0; n < N; ++n) coefs[n] = row_sq_distance<scalar_t, acc_t>(ob, a.out_perturbed + (n * B + b) * K, K);
    if (a.ratio != nullptr) {  // the forward's ratios too (_lipschitz_ratio_and_grad)
      for (int64_t n = 0; n < N; ++n) a.ratio[n * B + b] = lipschitz_ratio_value<acc_t>(coefs[n], a.in_norm[n * B + b]);
    }
    for (int64_t n = 0; n < N; ++n) {
      coefs[n] = lipschitz_backward_coef<acc_t>(a.grad[n * B + b], coefs[n], a.in_norm[n * B + b]);
    }
    std::fill(acc, acc + K, acc_t(0));
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* __restrict__ pr = a.out_perturbed + (n * B + b) * K;
      const acc_t coef = coefs[n];
      if (a.grad_perturbed != nullptr) {
        scalar_t* __restrict__ gr = a.grad_perturbed + (n * B + b) * K;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t t = lipschitz_grad_term<acc_t>(static_cast<acc_t>(ob[k]), static_cast<acc_t>(pr[k]), coef);
          acc[k] += t;
          gr[k] = static_cast<scalar_t>(-t);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          acc[k] += lipschitz_grad_term<acc_t>(static_cast<acc_t>(ob[k]), static_cast<acc_t>(pr[k]), coef);
        }
      }
    }
    scalar_t* __restrict__ gob = a.grad_out + b * K;
    for (int64_t k = 0; k < K; ++k) gob[k] = static_cast<scalar_t>(acc[k]);
  }
}

template <typename scalar_t, typename acc_t>
void forward_rows_base(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  forward_rows(a, begin, end);
}

template <typename scalar_t, typename acc_t>
void backward_rows_base(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end, acc_t* acc,
                        acc_t* coefs) {
  backward_rows(a, begin, end, acc, coefs);
}

#ifdef JIT_UNLEARN_X86_ISA
template <typename scalar_t, typename acc_t>
JIT_UNLEARN_TARGET_AVX2 void forward_rows_avx2(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin,
                                                       int64_t end) {
  forward_rows(a, begin, end);
}

template <typename scalar_t, typename acc_t>
JIT_UNLEARN_TARGET_AVX2 void backward_rows_avx2(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin,
                                                        int64_t end, acc_t* acc, acc_t* coefs) {
  backward_rows(a, begin, end, acc, coefs);
}
#endif

#ifdef JIT_UNLEARN_X86_ISA
// float32 on AVX-512: the loops above with rows (not k) across the 16 lanes of a vector, so every
// lane does one row's scalar arithmetic in the scalar order (same lane split, same tree) and the
// results are bitwise those of the copies above.  Row offsets are int32 gather indices, so these
// paths run only when every offset fits (kMaxGatherOffset).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
constexpr int64_t kMaxGatherOffset = int64_t{1} << 30;

// row_sq_distance<float, float> of 16 rows: lane r pairs a + ia[r] with b + ib[r] (K elements each).
JIT_UNLEARN_TARGET_AVX512 __m512 row_sq_distance16(const float* a, __m512i ia, const float* b, __m512i ib,
                                                   int64_t K) {
  __m512 lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = _mm512_setzero_ps();
  const int64_t main = K - K % kLanes;
  for (int64_t k = 0; k < K; ++k) {
    const __m512i kk = _mm512_set1_epi32(static_cast<int>(k));
    const __m512 d = _mm512_sub_ps(_mm512_i32gather_ps(_mm512_add_epi32(ia, kk), a, 4),
                                   _mm512_i32gather_ps(_mm512_add_epi32(ib, kk), b, 4));
    const int64_t l = k < main ? k % kLanes : k - main;
    lanes[l] = _mm512_add_ps(lanes[l], _mm512_mul_ps(d, d));
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] = _mm512_add_ps(lanes[l], lanes[l + width]);
  }
  return lanes[0];
}

// lipschitz_ratio_value on 16 rows: in_norm > 0 ? sqrt(sq) / in_norm : 0 (NaN in_norm gives 0).
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 ratio_value16(__m512 sq, __m512 in_norm) {
  const __mmask16 positive = _mm512_cmp_ps_mask(in_norm, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_maskz_div_ps(positive, _mm512_sqrt_ps(sq), in_norm);
}

// lipschitz_backward_coef on 16 rows: (num > 0 && in_norm > 0) ? grad / (num * in_norm) : 0.
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 backward_coef16(__m512 grad, __m512 sq, __m512 in_norm) {
  const __m512 num = _mm512_sqrt_ps(sq);
  const __mmask16 ok = _mm512_cmp_ps_mask(num, _mm512_setzero_ps(), _CMP_GT_OQ) &
                       _mm512_cmp_ps_mask(in_norm, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_maskz_div_ps(ok, grad, _mm512_mul_ps(num, in_norm));
}

// r K for the lanes r = 0 .. 15: the offsets of 16 consecutive rows of K elements.
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512i row_offsets16(int64_t K) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(K)));
}

// forward_rows<float, float>: 16 rows per step, the rest (and any b wrap inside 16 rows) per row.
JIT_UNLEARN_TARGET_AVX512 void forward_rows_avx512(const LipschitzArgs<float, float>& a, int64_t begin, int64_t end) {
  const int64_t B = a.B, K = a.K;
  int64_t row = begin;
  for (; row + 16 <= end; row += 16) {
    const int64_t b = row % B;
    if (b + 16 > B) {  // the 16 rows wrap around b: the scalar loop for this stretch
      forward_rows(a, row, row + 16);
      continue;
    }
    const __m512 sq = row_sq_distance16(a.out + b * K, row_offsets16(K), a.out_perturbed + row * K,
                                        row_offsets16(K), K);
    _mm512_storeu_ps(a.ratio + row, ratio_value16(sq, _mm512_loadu_ps(a.in_norm + row)));
  }
  if (row < end) forward_rows(a, row, end);
}

// backward_rows<float, float> for b in [begin, end): the N x (end - begin) squared distances 16 b at
// a time (consecutive b of one n are consecutive rows), the ratios and coefficients 16 at a time, then
// grad_out[b, :] (and grad_perturbed) with k across the lanes, summed over n in order.
JIT_UNLEARN_TARGET_AVX512 void backward_rows_avx512(const LipschitzArgs<float, float>& a, int64_t begin,
                                                    int64_t end, float* __restrict__ scratch) {
  const int64_t N = a.N, B = a.B, K = a.K, nb = end - begin;
  for (int64_t n = 0; n < N; ++n) {
    float* __restrict__ sq = scratch + n * nb;
    int64_t b = begin;
    for (; b + 16 <= end; b += 16) {
      _mm512_storeu_ps(sq + (b - begin), row_sq_distance16(a.out + b * K, row_offsets16(K),
                                                           a.out_perturbed + (n * B + b) * K, row_offsets16(K), K));
    }
    for (; b < end; ++b) sq[b - begin] = row_sq_distance<float, float>(a.out + b * K, a.out_perturbed + (n * B + b) * K, K);
    const float* in_norm = a.in_norm + n * B + begin;
    const float* grad = a.grad + n * B + begin;
    float* ratio = a.ratio != nullptr ? a.ratio + n * B + begin : nullptr;
    int64_t i = 0;
    for (; i + 16 <= nb; i += 16) {
      const __m512 s = _mm512_loadu_ps(sq + i), d = _mm512_loadu_ps(in_norm + i);
      if (ratio != nullptr) _mm512_storeu_ps(ratio + i, ratio_value16(s, d));
      _mm512_storeu_ps(sq + i, backward_coef16(_mm512_loadu_ps(grad + i), s, d));
    }
    for (; i < nb; ++i) {
      if (ratio != nullptr) ratio[i] = lipschitz_ratio_value<float>(sq[i], in_norm[i]);
      sq[i] = lipschitz_backward_coef<float>(grad[i], sq[i], in_norm[i]);
    }
  }
  for (int64_t b = begin; b < end; ++b) {
    const float* __restrict__ ob = a.out + b * K;
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const __mmask16 m = K - k0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k0)) - 1u);
      const __m512 o = _mm512_maskz_loadu_ps(m, ob + k0);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t n = 0; n < N; ++n) {
        const int64_t at = (n * B + b) * K + k0;
        const __m512 t = _mm512_mul_ps(_mm512_sub_ps(o, _mm512_maskz_loadu_ps(m, a.out_perturbed + at)),
                                       _mm512_set1_ps(scratch[n * nb + (b - begin)]));
        acc = _mm512_add_ps(acc, t);
        if (a.grad_perturbed != nullptr) {
          _mm512_mask_storeu_ps(a.grad_perturbed + at, m,
                                _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(t),
                                                                     _mm512_set1_epi32(static_cast<int>(0x80000000u)))));
        }
      }
      _mm512_mask_storeu_ps(a.grad_out + b * K + k0, m, acc);
    }
  }
}
#endif

// AVX2 and AVX-512 machines run the AVX2 copy (AVX-512 ones the float32 paths above where they apply).
bool use_avx2() { return cpu_isa() != CpuIsa::kBase; }

#ifdef JIT_UNLEARN_X86_ISA
// float32 takes the AVX-512 paths on AVX-512 machines when its gather offsets fit.
bool use_avx512(int64_t K) { return cpu_isa() == CpuIsa::kAvx512 && 16 * K < kMaxGatherOffset; }
#endif

template <typename scalar_t, typename acc_t>
auto pick_forward_rows(int64_t K) {
  auto* rows = &forward_rows_base<scalar_t, acc_t>;
#ifdef JIT_UNLEARN_X86_ISA
  if (use_avx2()) rows = &forward_rows_avx2<scalar_t, acc_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (use_avx512(K)) rows = &forward_rows_avx512;
  }
#endif
  return rows;
}

// The backward over b in parallel tasks of about kGrainElements elements; each task owns its b.
template <typename scalar_t, typename acc_t>
void backward_parallel(const LipschitzArgs<scalar_t, acc_t>& args) {
  const int64_t N = args.N, B = args.B, K = args.K;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(N * K, 1));
#ifdef JIT_UNLEARN_X86_ISA
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (use_avx512(K)) {
      at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(N * (end - begin));
        backward_rows_avx512(args, begin, end, scratch.data());
      });
      return;
    }
  }
#endif
  auto* rows = &backward_rows_base<scalar_t, acc_t>;
#ifdef JIT_UNLEARN_X86_ISA
  if (use_avx2()) rows = &backward_rows_avx2<scalar_t, acc_t>;
#endif
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(K), coefs(N);
    rows(args, begin, end, acc.data(), coefs.data());
  });
}

at::ScalarType opmath_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

// ratio [N, B] in opmath dtype = ||out_b - out_perturbed_nb||_2 / in_norm_nb (0 where in_norm_nb <= 0).
at::Tensor lipschitz_ratio_cpu(const at::Tensor& out, const at::Tensor& out_perturbed, const at::Tensor& in_norm) {
  check_lipschitz_args("lipschitz_ratio", out, out_perturbed, in_norm);
  const int64_t N = out_perturbed.size(0), B = out.size(0), K = out.size(1);
  const auto acc_type = opmath_scalar_type(out.scalar_type());
  const at::Tensor o = out.contiguous();
  const at::Tensor p = out_perturbed.contiguous();
  const at::Tensor den = in_norm.to(acc_type).contiguous();
  at::Tensor ratio = at::empty({N, B}, out.options().dtype(acc_type));
  if (ratio.numel() == 0) return ratio;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lipschitz_ratio_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LipschitzArgs<scalar_t, acc_t> args{.out = o.const_data_ptr<scalar_t>(),
                                              .out_perturbed = p.const_data_ptr<scalar_t>(),
                                              .in_norm = den.const_data_ptr<acc_t>(),
                                              .ratio = ratio.mutable_data_ptr<acc_t>(),
                                              .N = N,
                                              .B = B,
                                              .K = K};
    auto* rows = pick_forward_rows<scalar_t, acc_t>(K);
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(K, 1));
    at::parallel_for(0, N * B, grain, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  });
  return ratio;
}

// The backward of both ops: (grad_out [B, K] in out.dtype, grad_out_perturbed [N, B, K] in
// out_perturbed.dtype or [0], ratio [N, B] in opmath when with_ratio, else undefined).  Parallel
// over b: each task owns whole rows of grad_out (and the ratios of its b) and walks n inside, so
// no reduction races.
static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const char* op, const at::Tensor& grad,
                                                            const at::Tensor& out, const at::Tensor& out_perturbed,
                                                            const at::Tensor& in_norm, bool compute_perturbed_grad,
                                                            bool with_ratio) {
  check_lipschitz_args(op, out, out_perturbed, in_norm);
  check_lipschitz_grad(op, grad, out, out_perturbed);
  const int64_t N = out_perturbed.size(0), B = out.size(0), K = out.size(1);
  const auto acc_type = opmath_scalar_type(out.scalar_type());
  const at::Tensor o = out.contiguous();
  const at::Tensor p = out_perturbed.contiguous();
  const at::Tensor den = in_norm.to(acc_type).contiguous();
  const at::Tensor g = grad.to(acc_type).contiguous();
  at::Tensor grad_out = at::empty({B, K}, out.options());
  at::Tensor grad_pert = compute_perturbed_grad ? at::empty({N, B, K}, out_perturbed.options())
                                                : at::empty({0}, out_perturbed.options());
  at::Tensor ratio = with_ratio ? at::empty({N, B}, out.options().dtype(acc_type)) : at::Tensor();
  if (B == 0 || (K == 0 && !with_ratio)) return {grad_out, grad_pert, ratio};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lipschitz_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LipschitzArgs<scalar_t, acc_t> args{
        .out = o.const_data_ptr<scalar_t>(),
        .out_perturbed = p.const_data_ptr<scalar_t>(),
        .in_norm = den.const_data_ptr<acc_t>(),
        .grad = g.const_data_ptr<acc_t>(),
        .ratio = with_ratio ? ratio.mutable_data_ptr<acc_t>() : nullptr,
        .grad_out = grad_out.mutable_data_ptr<scalar_t>(),
        .grad_perturbed = compute_perturbed_grad ? grad_pert.mutable_data_ptr<scalar_t>() : nullptr,
        .N = N,
        .B = B,
        .K = K};
    backward_parallel(args);
  });
  return {grad_out, grad_pert, ratio};
}

std::tuple<at::Tensor, at::Tensor> lipschitz_ratio_backward_cpu(const at::Tensor& grad, const at::Tensor& out,
                                                                const at::Tensor& out_perturbed,
                                                                const at::Tensor& in_norm,
                                                                bool compute_perturbed_grad) {
  auto [grad_out, grad_pert, unused] =
      backward_cpu("_lipschitz_ratio_backward", grad, out, out_perturbed, in_norm, compute_perturbed_grad, false);
  return {grad_out, grad_pert};
}

// (ratio [N, B] in opmath, grad_out [B, K] in out.dtype): lipschitz_ratio and the out-gradient of
// _lipschitz_ratio_backward, bitwise as those two ops give them, in one pass.
std::tuple<at::Tensor, at::Tensor> lipschitz_ratio_and_grad_cpu(const at::Tensor& grad, const at::Tensor& out,
                                                                const at::Tensor& out_perturbed,
                                                                const at::Tensor& in_norm) {
  auto [grad_out, unused, ratio] =
      backward_cpu("_lipschitz_ratio_and_grad", grad, out, out_perturbed, in_norm, false, true);
  return {ratio, grad_out};
}

TORCH_LIBRARY_IMPL(jit_unlearn, CPU, m) {
  m.impl("lipschitz_ratio", &lipschitz_ratio_cpu);
  m.impl("_lipschitz_ratio_backward", &lipschitz_ratio_backward_cpu);
  m.impl("_lipschitz_ratio_and_grad", &lipschitz_ratio_and_grad_cpu);
}

}  // namespace jit_unlearn
