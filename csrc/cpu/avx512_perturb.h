// The AVX-512 intrinsics of the perturb CPU kernel: Philox4x32-10 on 16 counters per vector, the
// Box-Muller transform on 16 words per vector, and x + sigma z (clamped) with its squared differences.
// Each is the scalar code of common/rng_utils.h and common/perturb_utils.h operation for operation, so
// every lane is bitwise the scalar result.  Used only by the kAvx512 copy (cpu/cpu_isa.h).
#pragma once

#include "cpu/cpu_isa.h"

#ifdef JIT_UNLEARN_X86_ISA

#include <cstddef>
#include <cstdint>

#include <c10/macros/Macros.h>
#include <immintrin.h>

#include "common/rng_utils.h"
// GCC 12 reports false "may be used uninitialized" warnings from inside its AVX-512 intrinsics (their
// unused pass-through operands) wherever they are inlined.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace jit_unlearn::avx512 {

// Groups per block of philox_words: 4 vectors of 16, interleaved to hide the multiply latency.
constexpr int64_t kPhiloxBlock = 64;

JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE void mul_hi_lo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                        // 64-bit products of lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // ... and of lanes 1, 3, ...
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// philox4x32_10 of groups [first, first + count) as four planes: w[k * kPlane + i] is word k of group
// first + i.  Computes whole blocks of kPhiloxBlock groups (count is rounded up), so each plane must
// hold that many; kPlane is a multiple of kPhiloxBlock.
template <int64_t kPlane>
JIT_UNLEARN_TARGET_AVX512 inline void philox_words(uint64_t first, int64_t count, uint64_t seed, uint64_t offset,
                                                   uint32_t* __restrict__ w) {
  static_assert(kPlane % kPhiloxBlock == 0, "planes hold whole blocks");
  constexpr int kVectors = kPhiloxBlock / 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i offset_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m512i offset_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < count; i += kPhiloxBlock) {
    __m512i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      // Counter words 0, 1 are the 64-bit group index g + lane, with the carry into the high word.
      const uint64_t g = first + static_cast<uint64_t>(i + 16 * v);
      const __m512i g_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g)));
      const __m512i g_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
      c0[v] = _mm512_add_epi32(g_lo, lane);
      c1[v] = _mm512_mask_add_epi32(g_hi, _mm512_cmplt_epu32_mask(c0[v], g_lo), g_hi, one);
      c2[v] = offset_lo;
      c3[v] = offset_hi;
    }
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
      const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < kVectors; ++v) {
        __m512i hi0, lo0, hi1, lo1;
        mul_hi_lo(c0[v], m0, hi0, lo0);
        mul_hi_lo(c2[v], m1, hi1, lo1);
        c0[v] = _mm512_ternarylogic_epi32(hi1, c1[v], key0, 0x96);  // hi1 ^ c1 ^ k0
        c1[v] = lo1;
        c2[v] = _mm512_ternarylogic_epi32(hi0, c3[v], key1, 0x96);  // hi0 ^ c3 ^ k1
        c3[v] = lo0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int v = 0; v < kVectors; ++v) {
      uint32_t* at = w + i + 16 * v;
      _mm512_storeu_si512(at, c0[v]);
      _mm512_storeu_si512(at + kPlane, c1[v]);
      _mm512_storeu_si512(at + 2 * kPlane, c2[v]);
      _mm512_storeu_si512(at + 3 * kPlane, c3[v]);
    }
  }
}

// The entry points above and below are plain inline functions, not always-inline ones: they are called
// from kernel templates compiled for the baseline too (under `if constexpr`), and the flatten of the
// AVX-512 copy (cpu/cpu_isa.h) inlines them there.

// Every multiply, add, division and square root below is its own correctly rounded instruction (no
// FMA, as -ffp-contract=off gives the scalar code), conversions are exact, and the selects are mask
// blends.
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 splat(float v) { return _mm512_set1_ps(v); }

// Horner's rule from the highest coefficient down: p = c[0], then p = p x + c[k], each step rounded.
template <size_t kN>
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 horner16(__m512 x, const float (&c)[kN]) {
  __m512 p = splat(c[0]);
  for (size_t k = 1; k < kN; ++k) p = add(mul(p, x), splat(c[k]));
  return p;
}

// The coefficients of rng_utils.h's polynomials, highest first.
constexpr float kLogPoly[] = {kLogC4, kLogC3, kLogC2, kLogC1, kLogC0};
constexpr float kSinPoly[] = {kSinC4, kSinC3, kSinC2, kSinC1, kSinC0};
constexpr float kCosPoly[] = {kCosC5, kCosC4, kCosC3, kCosC2, kCosC1, kCosC0};

// (2 (r >> 9) + 1) as a float: exact, below 2^24.
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 odd_uniform_bits(__m512i m) {
  return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(m, 1), _mm512_set1_epi32(1)));
}

// neg2log_uniform (common/rng_utils.h) on 16 words.
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 neg2log_uniform16(__m512i r) {
  const __m512 u = mul(odd_uniform_bits(_mm512_srli_epi32(r, 9)), splat(kTwoPowMinus24));
  const __m512i bits = _mm512_castps_si512(u);
  const __m512i e =
      _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xFF)), _mm512_set1_epi32(127));
  const __m512i mantissa = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFF));
  const __mmask16 big = _mm512_cmpgt_epu32_mask(mantissa, _mm512_set1_epi32(0x3504F3));
  const __m512i exponent = _mm512_mask_blend_epi32(big, _mm512_set1_epi32(0x3F800000), _mm512_set1_epi32(0x3F000000));
  const __m512 m = _mm512_castsi512_ps(_mm512_or_si512(mantissa, exponent));
  const __m512 ef = _mm512_cvtepi32_ps(_mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1)));
  const __m512 s = _mm512_div_ps(_mm512_sub_ps(m, splat(1.0f)), add(m, splat(1.0f)));
  const __m512 s2 = mul(s, s);
  const __m512 p = horner16(s2, kLogPoly);
  const __m512 two_s = mul(s, splat(2.0f));
  const __m512 log_m = add(two_s, mul(mul(two_s, s2), p));
  const __m512 log_u = add(mul(ef, splat(kLn2Hi)), add(mul(ef, splat(kLn2Lo)), log_m));
  return mul(log_u, splat(-2.0f));
}

// sincos_2pi_uniform (common/rng_utils.h) on 16 words.
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE void sincos_2pi_uniform16(__m512i r, __m512& cos_out, __m512& sin_out) {
  const __m512i m = _mm512_srli_epi32(r, 9);
  const __m512i quadrant = _mm512_srli_epi32(m, 21);
  const __m512 f = mul(odd_uniform_bits(_mm512_and_si512(m, _mm512_set1_epi32(0x1FFFFF))), splat(kTwoPowMinus22));
  const __m512 t = mul(_mm512_sub_ps(f, splat(0.5f)), splat(kHalfPi));
  const __m512 t2 = mul(t, t);
  const __m512 sin_t = add(t, mul(mul(t, t2), horner16(t2, kSinPoly)));
  const __m512 cos_t = add(splat(1.0f), mul(t2, horner16(t2, kCosPoly)));
  const __m512 cos_a = mul(_mm512_sub_ps(cos_t, sin_t), splat(kInvSqrt2));
  const __m512 sin_a = mul(add(cos_t, sin_t), splat(kInvSqrt2));
  // Quadrants 1 and 3 swap cos and sin; the sign flips of the scalar selects are exact negations.
  const __mmask16 odd = _mm512_test_epi32_mask(quadrant, _mm512_set1_epi32(1));
  const __mmask16 q1 = _mm512_cmpeq_epi32_mask(quadrant, _mm512_set1_epi32(1));
  const __mmask16 q2 = _mm512_cmpeq_epi32_mask(quadrant, _mm512_set1_epi32(2));
  const __mmask16 q3 = _mm512_cmpeq_epi32_mask(quadrant, _mm512_set1_epi32(3));
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i c = _mm512_castps_si512(_mm512_mask_blend_ps(odd, cos_a, sin_a));
  const __m512i s = _mm512_castps_si512(_mm512_mask_blend_ps(odd, sin_a, cos_a));
  cos_out = _mm512_castsi512_ps(_mm512_mask_xor_epi32(c, q1 | q2, c, sign));
  sin_out = _mm512_castsi512_ps(_mm512_mask_xor_epi32(s, q2 | q3, s, sign));
}

// The Box-Muller transform of philox_normal4 (common/rng_utils.h) for groups [0, count) of the word
// planes w (plane stride kPlane) into z[0 .. 4 count), 16 groups at a time (count rounded up: w and z
// hold whole vectors; both are the caller's alignas(64) buffers).  Lane i of the four results is
// z[4 i .. 4 i + 3]; the unpacks and 128-bit shuffles interleave them.
template <int64_t kPlane>
JIT_UNLEARN_TARGET_AVX512 inline void box_muller(const uint32_t* __restrict__ w, int64_t count, float* __restrict__ z) {
  for (int64_t i = 0; i < count; i += 16) {
    const __m512 rad01 = _mm512_sqrt_ps(neg2log_uniform16(_mm512_load_si512(w + i)));
    const __m512 rad23 = _mm512_sqrt_ps(neg2log_uniform16(_mm512_load_si512(w + 2 * kPlane + i)));
    __m512 c01, s01, c23, s23;
    sincos_2pi_uniform16(_mm512_load_si512(w + kPlane + i), c01, s01);
    sincos_2pi_uniform16(_mm512_load_si512(w + 3 * kPlane + i), c23, s23);
    const __m512 a = mul(rad01, c01), b = mul(rad01, s01), c = mul(rad23, c23), d = mul(rad23, s23);
    // Per 128-bit lane j: ab_lo = a4j b4j a4j+1 b4j+1, ab_hi = a4j+2 b4j+2 a4j+3 b4j+3 (and c, d).
    const __m512 ab_lo = _mm512_unpacklo_ps(a, b), ab_hi = _mm512_unpackhi_ps(a, b);
    const __m512 cd_lo = _mm512_unpacklo_ps(c, d), cd_hi = _mm512_unpackhi_ps(c, d);
    // g_k holds group 4 j + k of lane j as (a, b, c, d).
    const __m512 g0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab_lo), _mm512_castps_pd(cd_lo)));
    const __m512 g1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab_lo), _mm512_castps_pd(cd_lo)));
    const __m512 g2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab_hi), _mm512_castps_pd(cd_hi)));
    const __m512 g3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab_hi), _mm512_castps_pd(cd_hi)));
    // A 4x4 transpose of 128-bit lanes puts groups 4 q .. 4 q + 3 into output vector q.
    const __m512 t0 = _mm512_shuffle_f32x4(g0, g1, 0x44), t1 = _mm512_shuffle_f32x4(g0, g1, 0xEE);
    const __m512 t2 = _mm512_shuffle_f32x4(g2, g3, 0x44), t3 = _mm512_shuffle_f32x4(g2, g3, 0xEE);
    float* out = z + 4 * i;
    _mm512_store_ps(out, _mm512_shuffle_f32x4(t0, t2, 0x88));
    _mm512_store_ps(out + 16, _mm512_shuffle_f32x4(t0, t2, 0xDD));
    _mm512_store_ps(out + 32, _mm512_shuffle_f32x4(t1, t3, 0x88));
    _mm512_store_ps(out + 48, _mm512_shuffle_f32x4(t1, t3, 0xDD));
  }
}

// perturb_element's x + sigma z and perturb_clamp (common/perturb_utils.h) on 16 floats:
// (v > lo || v != v) ? v : lo, then (v < hi || v != v) ? v : hi.
template <bool kClamp>
JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 perturb16(__m512 x, __m512 z, __m512 sigma, __m512 lo, __m512 hi) {
  __m512 v = add(x, mul(sigma, z));
  if constexpr (kClamp) {
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, lo, _CMP_GT_OQ) | nan, lo, v);
    v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, hi, _CMP_LT_OQ) | nan, hi, v);
  }
  return v;
}

// The vector part of a float32 span: x_tilde[i] = perturb(x[i], z[i]) for i < n, n = len rounded down to
// a multiple of 8, with (x_tilde[i] - x[i])^2 added to lanes[i % 8] in order of i (16-element vectors
// are added as two 8-lane halves, first the low one), exactly as the scalar 8-lane loop adds them.
// x, z and out may have any float alignment (unaligned and masked accesses).  Returns n.
template <bool kClamp>
JIT_UNLEARN_TARGET_AVX512 inline int64_t perturb_span_lanes(const float* __restrict__ x, const float* __restrict__ z,
                                                            int64_t len, float sigma, float lo, float hi,
                                                            float* __restrict__ out, float lanes[8]) {
  __m256 partial = _mm256_setzero_ps();
  const __m512 vsigma = splat(sigma), vlo = splat(lo), vhi = splat(hi);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    const __m512 v = perturb16<kClamp>(xv, _mm512_loadu_ps(z + i), vsigma, vlo, vhi);
    _mm512_storeu_ps(out + i, v);
    const __m512 d = _mm512_sub_ps(v, xv);
    const __m512 sq = mul(d, d);
    partial = _mm256_add_ps(partial, _mm512_castps512_ps256(sq));
    partial = _mm256_add_ps(partial, _mm512_extractf32x8_ps(sq, 1));
  }
  if (i + 8 <= len) {
    const __mmask16 low = 0xFF;
    const __m512 xv = _mm512_maskz_loadu_ps(low, x + i);
    const __m512 v = perturb16<kClamp>(xv, _mm512_maskz_loadu_ps(low, z + i), vsigma, vlo, vhi);
    _mm512_mask_storeu_ps(out + i, low, v);
    const __m512 d = _mm512_sub_ps(v, xv);
    partial = _mm256_add_ps(partial, _mm512_castps512_ps256(mul(d, d)));
    i += 8;
  }
  _mm256_storeu_ps(lanes, partial);
  return i;
}

}  // namespace jit_unlearn::avx512

#endif  // JIT_UNLEARN_X86_ISA
