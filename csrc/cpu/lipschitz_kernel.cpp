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

#ifdef JIT_UNLEARN_X86_ISA
// row_sq_distance<float, float> below with the 8 lanes in one AVX register: the blocks of 8 are
// added in order, the remainder as a masked block (its missing lanes add +0, which leaves a
// lane's sum unchanged: the sums are never -0), then the same pairwise tree.  Bitwise the loop's
// result, without its scalar remainder and tree.
JIT_UNLEARN_TARGET_AVX2 float row_sq_distance_avx2(const float* __restrict__ a, const float* __restrict__ b,
                                                   int64_t K) {
  static_assert(kLanes == 8, "one 8-lane register");
  __m256 lanes = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k));
    lanes = _mm256_add_ps(lanes, _mm256_mul_ps(d, d));
  }
  if (k < K) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(K - k)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 d = _mm256_sub_ps(_mm256_maskload_ps(a + k, mask), _mm256_maskload_ps(b + k, mask));
    lanes = _mm256_add_ps(lanes, _mm256_mul_ps(d, d));
  }
  // lanes[l] += lanes[l + 4], then lanes[l] += lanes[l + 2], then lanes[0] += lanes[1].
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}
#endif

#ifdef JIT_UNLEARN_X86_ISA
// Rows up to this many logits keep their gradient sums in registers (grad_row_avx2).
constexpr int64_t kRegisterRowMax = 16;

// The sums over n of backward_rows below for one b, float32, 8 values of k per register (the last
// block masked): acc[k] = sum_n (out[b, k] - out_perturbed[n, b, k]) * coefs[n] in n order, as the
// loop adds them.
JIT_UNLEARN_TARGET_AVX2 void grad_row_avx2(const LipschitzArgs<float, float>& a, int64_t b,
                                           const float* __restrict__ coefs) {
  const int64_t N = a.N, B = a.B, K = a.K;
  const float* ob = a.out + b * K;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(K - k, 8))),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 o = _mm256_maskload_ps(ob + k, mask);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t n = 0; n < N; ++n) {
      const int64_t at = (n * B + b) * K + k;
      const __m256 t = _mm256_mul_ps(_mm256_sub_ps(o, _mm256_maskload_ps(a.out_perturbed + at, mask)),
                                     _mm256_set1_ps(coefs[n]));
      acc = _mm256_add_ps(acc, t);
    }
    _mm256_maskstore_ps(a.grad_out + b * K + k, mask, acc);
  }
}
#endif

// sum_k (a[k] - b[k])^2 in acc_t.  kAvx2: the caller is compiled for AVX2 (float takes the
// register form above).
template <bool kAvx2, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE acc_t row_sq_distance(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                        int64_t K) {
#ifdef JIT_UNLEARN_X86_ISA
  if constexpr (kAvx2 && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    return row_sq_distance_avx2(a, b, K);
  }
#endif
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
template <bool kAvx2, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void forward_rows(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const int64_t B = a.B, K = a.K;
  // Row n * B + b pairs out_perturbed[n, b] with out[b]; b wraps instead of a division per row.
  for (int64_t row = begin, b = begin % B; row < end; ++row) {
    a.ratio[row] = row_sq_distance<kAvx2, scalar_t, acc_t>(a.out + b * K, a.out_perturbed + row * K, K);
    if (++b == B) b = 0;
  }
  // A separate pass, so the sqrt and division latencies of consecutive rows overlap.
  for (int64_t row = begin; row < end; ++row) a.ratio[row] = lipschitz_ratio_value<acc_t>(a.ratio[row], a.in_norm[row]);
}

// Backward for b in [begin, end): each b owns the row grad_out[b, :], summed over n in order.
// acc [K] and coefs [N] are the task's scratch.
template <bool kAvx2, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void backward_rows(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end,
                                     acc_t* __restrict__ acc, acc_t* __restrict__ coefs) {
  const int64_t N = a.N, B = a.B, K = a.K;
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* __restrict__ ob = a.out + b * K;
    // All N coefficients of b first (their sqrt/division latencies overlap), then the sums over n;
    // the N rows out_perturbed[:, b] (N * K elements) stay in cache between the two passes.
    for (int64_t n = 0; n < N; ++n) coefs[n] = row_sq_distance<kAvx2, scalar_t, acc_t>(ob, a.out_perturbed + (n * B + b) * K, K);
    if (a.ratio != nullptr) {  // the forward's ratios too (_lipschitz_ratio_and_grad)
      for (int64_t n = 0; n < N; ++n) a.ratio[n * B + b] = lipschitz_ratio_value<acc_t>(coefs[n], a.in_norm[n * B + b]);
    }
    for (int64_t n = 0; n < N; ++n) {
      coefs[n] = lipschitz_backward_coef<acc_t>(a.grad[n * B + b], coefs[n], a.in_norm[n * B + b]);
    }
#ifdef JIT_UNLEARN_X86_ISA
    if constexpr (kAvx2 && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      // Wider rows, and the perturbed outputs' gradient (masked stores are slow), take the loop.
      if (K <= kRegisterRowMax && a.grad_perturbed == nullptr) {
        grad_row_avx2(a, b, coefs);
        continue;
      }
    }
#endif
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
  forward_rows<false>(a, begin, end);
}

template <typename scalar_t, typename acc_t>
void backward_rows_base(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end, acc_t* acc,
                        acc_t* coefs) {
  backward_rows<false>(a, begin, end, acc, coefs);
}

#ifdef JIT_UNLEARN_X86_ISA
template <typename scalar_t, typename acc_t>
JIT_UNLEARN_TARGET_AVX2 void forward_rows_avx2(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin,
                                                       int64_t end) {
  forward_rows<true>(a, begin, end);
}

template <typename scalar_t, typename acc_t>
JIT_UNLEARN_TARGET_AVX2 void backward_rows_avx2(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin,
                                                        int64_t end, acc_t* acc, acc_t* coefs) {
  backward_rows<true>(a, begin, end, acc, coefs);
}
#endif

// AVX2 and AVX-512 machines both run the AVX2 copy.
bool use_avx2() { return cpu_isa() != CpuIsa::kBase; }

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
    auto* rows = &forward_rows_base<scalar_t, acc_t>;
#ifdef JIT_UNLEARN_X86_ISA
    if (use_avx2()) rows = &forward_rows_avx2<scalar_t, acc_t>;
#endif
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
    auto* rows = &backward_rows_base<scalar_t, acc_t>;
#ifdef JIT_UNLEARN_X86_ISA
    if (use_avx2()) rows = &backward_rows_avx2<scalar_t, acc_t>;
#endif
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(N * K, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(K), coefs(N);
      rows(args, begin, end, acc.data(), coefs.data());
    });
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
