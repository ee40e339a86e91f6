// The AVX2 intrinsics of the Lipschitz CPU kernels (float32): a row's squared distance with its 8 lanes
// in one register, and the gradient sums of a short row in registers.  Bitwise the scalar loops of
// cpu/lipschitz_kernel.cpp (same lanes, same order).  Used by the kAvx2 and kAvx512 copies (cpu/cpu_isa.h).
#pragma once

#include "cpu/cpu_isa.h"

#ifdef JIT_UNLEARN_X86_ISA

#include <algorithm>
#include <cstdint>

#include <c10/macros/Macros.h>
#include <immintrin.h>

namespace jit_unlearn::avx2 {

// Lanes k < n of 8 set (n >= 8: all of them), as the mask of _mm256_maskload_ps / _mm256_maskstore_ps.
JIT_UNLEARN_TARGET_AVX2 C10_ALWAYS_INLINE __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// row_sq_distance and grad_row are plain inline functions (the callers' templates are compiled for the
// baseline too); the flatten of the AVX2 copy (cpu/cpu_isa.h) inlines them there.

// sum_k (a[k] - b[k])^2 with element k in lane k % 8: the blocks of 8 are added in order, the remainder
// as a masked block (its missing lanes add +0, which leaves a lane's sum unchanged: the sums are never
// -0), then the pairwise tree lanes[l] += lanes[l + 4], lanes[l] += lanes[l + 2], lanes[0] += lanes[1].
// a and b need only float alignment.
JIT_UNLEARN_TARGET_AVX2 inline float row_sq_distance(const float* __restrict__ a, const float* __restrict__ b,
                                                     int64_t K) {
  __m256 lanes = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k));
    lanes = _mm256_add_ps(lanes, _mm256_mul_ps(d, d));
  }
  if (k < K) {
    const __m256i mask = first_lanes(K - k);
    const __m256 d = _mm256_sub_ps(_mm256_maskload_ps(a + k, mask), _mm256_maskload_ps(b + k, mask));
    lanes = _mm256_add_ps(lanes, _mm256_mul_ps(d, d));
  }
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

// grad_out[k] = sum_n (out[k] - perturbed[n * stride + k]) * coefs[n], summed in n order from +0 (as
// the scalar loop adds them), 8 values of k per register, the last block masked.
JIT_UNLEARN_TARGET_AVX2 inline void grad_row(const float* __restrict__ out, const float* __restrict__ perturbed,
                                             int64_t stride, int64_t N, int64_t K, const float* __restrict__ coefs,
                                             float* __restrict__ grad_out) {
  for (int64_t k = 0; k < K; k += 8) {
    const __m256i mask = first_lanes(K - k);
    const __m256 o = _mm256_maskload_ps(out + k, mask);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t n = 0; n < N; ++n) {
      const __m256 p = _mm256_maskload_ps(perturbed + n * stride + k, mask);
      acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_sub_ps(o, p), _mm256_set1_ps(coefs[n])));
    }
    _mm256_maskstore_ps(grad_out + k, mask, acc);
  }
}

}  // namespace jit_unlearn::avx2

#endif  // JIT_UNLEARN_X86_ISA
