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
#include "cpu/cpu_isa.h"

#ifdef JIT_UNLEARN_X86_ISA
#include <immintrin.h>
#endif

namespace jit_unlearn {
namespace {

// Philox groups drawn per chunk: 1,024 normals (4 KiB of words and 4 KiB of normals on the stack).
constexpr uint64_t kGroupsPerChunk = 256;
// Independent partial sums of a row, so the squared-difference reduction vectorises.
constexpr int64_t kLanes = 8;

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

#ifdef JIT_UNLEARN_X86_ISA
// GCC 12 reports false "may be used uninitialized" warnings from inside its AVX-512 intrinsics
// (their unused pass-through operands) wherever they are inlined: from here to the end of the file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// philox4x32_10 (common/rng_utils.h) on 16 groups per vector, 4 vectors interleaved to hide the
// multiply latency.  Computes whole blocks of 64 groups: count is rounded up, so w must hold that
// many (kGroupsPerChunk is a multiple of 64).
constexpr int64_t kAvx512Block = 64;

JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE void mul_hi_lo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                        // 64-bit products of lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // ... and of lanes 1, 3, ...
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

JIT_UNLEARN_TARGET_AVX512 void philox_words_avx512(uint64_t first, int64_t count, uint64_t seed, uint64_t offset,
                                                  uint32_t* __restrict__ w) {
  constexpr int kVectors = kAvx512Block / 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i offset_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m512i offset_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < count; i += kAvx512Block) {
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
      _mm512_storeu_si512(at + kGroupsPerChunk, c1[v]);
      _mm512_storeu_si512(at + 2 * kGroupsPerChunk, c2[v]);
      _mm512_storeu_si512(at + 3 * kGroupsPerChunk, c3[v]);
    }
  }
}

// The Box-Muller transform of common/rng_utils.h (neg2log_uniform, sincos_2pi_uniform) on 16 words
// per vector, operation for operation: every multiply, add, division and square root is its own
// correctly rounded instruction (no FMA, as -ffp-contract=off gives the scalar code), conversions
// are exact, and the selects are mask blends, so each lane is bitwise the scalar result.
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

JIT_UNLEARN_TARGET_AVX512 C10_ALWAYS_INLINE __m512 neg2log_uniform16(__m512i r) {
  const __m512 u = mul(odd_uniform_bits(_mm512_srli_epi32(r, 9)), splat(kTwoPowMinus24));
  const __m512i bits = _mm512_castps_si512(u);
  const __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xFF)),
                                     _mm512_set1_epi32(127));
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

// philox_normals' transform of groups [0, count) of the word planes w into z, 16 groups at a time
// (count rounded up: w and z hold whole vectors).  Lane i of the four results is z[4 i .. 4 i + 3];
// the unpacks and 128-bit shuffles interleave them.
JIT_UNLEARN_TARGET_AVX512 void box_muller_avx512(const uint32_t* __restrict__ w, int64_t count, float* __restrict__ z) {
  for (int64_t i = 0; i < count; i += 16) {
    const __m512 rad01 = _mm512_sqrt_ps(neg2log_uniform16(_mm512_load_si512(w + i)));
    const __m512 rad23 = _mm512_sqrt_ps(neg2log_uniform16(_mm512_load_si512(w + 2 * kGroupsPerChunk + i)));
    __m512 c01, s01, c23, s23;
    sincos_2pi_uniform16(_mm512_load_si512(w + kGroupsPerChunk + i), c01, s01);
    sincos_2pi_uniform16(_mm512_load_si512(w + 3 * kGroupsPerChunk + i), c23, s23);
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

// perturb_element's x + sigma z and perturb_clamp on 16 floats: (v > lo || v != v) ? v : lo, then
// (v < hi || v != v) ? v : hi.
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

// perturb_span for float x on 16 elements per vector: lanes of 16 are added to the 8 partial sums
// as two halves in order, so the sum is the scalar loop's.
template <bool kClamp>
JIT_UNLEARN_TARGET_AVX512 float perturb_span_avx512(const float* __restrict__ x,
                                                                    const float* __restrict__ z, int64_t len,
                                                                    float sigma, float lo, float hi,
                                                                    float* __restrict__ out) {
  static_assert(kLanes == 8, "two 8-lane halves per vector");
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
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, partial);
  return perturb_span_tail<kClamp>(x, z, i, len, sigma, lo, hi, out, lanes);
}
#endif

// The normals of Philox groups [first, first + count) into z[0 .. 4 count), count <= kGroupsPerChunk:
// the words, then their Box-Muller transform (philox_normal4's arithmetic, group by group).
template <CpuIsa kIsa>
C10_ALWAYS_INLINE void philox_normals(uint64_t first, int64_t count, uint64_t seed, uint64_t offset,
                                      float* __restrict__ z) {
  alignas(64) uint32_t w[4 * kGroupsPerChunk];
#ifdef JIT_UNLEARN_X86_ISA
  if constexpr (kIsa == CpuIsa::kAvx512) {
    philox_words_avx512(first, count, seed, offset, w);
    box_muller_avx512(w, count, z);
    return;
  } else {
    philox_words_portable(first, count, seed, offset, w);
  }
#else
  philox_words_portable(first, count, seed, offset, w);
#endif
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

// x_tilde[i] for i < len from x[i] and z[i]; returns sum_i (x_tilde[i] - x[i])^2 in opmath.
template <bool kClamp, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE opmath_t perturb_span(const scalar_t* __restrict__ x, const float* __restrict__ z, int64_t len,
                                        opmath_t sigma, opmath_t lo, opmath_t hi, scalar_t* __restrict__ out) {
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
template <CpuIsa kIsa, bool kClamp, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void perturb_rows(const PerturbArgs<scalar_t, opmath_t>& a, int64_t begin, int64_t end) {
  alignas(64) float z[4 * kGroupsPerChunk];
  const uint64_t numel = static_cast<uint64_t>(a.row_numel);
  const uint64_t flat_end = static_cast<uint64_t>(end) * numel;
  const uint64_t last_group = (flat_end + 3) / 4;  // one past the last group needed
  uint64_t j = static_cast<uint64_t>(begin) * numel;
  int64_t row = begin;
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
      const scalar_t* x = a.x + (row % a.batch) * a.row_numel + at;
      scalar_t* out = a.out + row * a.row_numel + at;
#ifdef JIT_UNLEARN_X86_ISA
      if constexpr (kIsa == CpuIsa::kAvx512 && std::is_same_v<scalar_t, float>) {
        sq_sum += perturb_span_avx512<kClamp>(x, z + (j - 4 * group), static_cast<int64_t>(len), a.sigma, a.lo, a.hi, out);
      } else {
        sq_sum += perturb_span<kClamp>(x, z + (j - 4 * group), static_cast<int64_t>(len), a.sigma, a.lo, a.hi, out);
      }
#else
      sq_sum += perturb_span<kClamp>(x, z + (j - 4 * group), static_cast<int64_t>(len), a.sigma, a.lo, a.hi, out);
#endif
      j += len;
      col += len;
      if (col == numel) {
        a.in_norm[row] = std::sqrt(sq_sum);
        sq_sum = 0;
        col = 0;
        ++row;
      }
    }
  }
}

// One compiled copy of perturb_rows per instruction-set level (cpu_isa.h).
template <bool kClamp, typename scalar_t, typename opmath_t>
__attribute__((flatten)) void perturb_rows_base(const PerturbArgs<scalar_t, opmath_t>& a, int64_t begin, int64_t end) {
  perturb_rows<CpuIsa::kBase, kClamp>(a, begin, end);
}

#ifdef JIT_UNLEARN_X86_ISA
template <bool kClamp, typename scalar_t, typename opmath_t>
JIT_UNLEARN_TARGET_AVX2 __attribute__((flatten)) void perturb_rows_avx2(const PerturbArgs<scalar_t, opmath_t>& a, int64_t begin,
                                               int64_t end) {
  perturb_rows<CpuIsa::kAvx2, kClamp>(a, begin, end);
}

template <bool kClamp, typename scalar_t, typename opmath_t>
JIT_UNLEARN_TARGET_AVX512 __attribute__((flatten)) void perturb_rows_avx512(const PerturbArgs<scalar_t, opmath_t>& a, int64_t begin,
                                                   int64_t end) {
  perturb_rows<CpuIsa::kAvx512, kClamp>(a, begin, end);
}
#endif

template <bool kClamp, typename scalar_t, typename opmath_t>
auto pick_perturb_rows() {
  auto rows = &perturb_rows_base<kClamp, scalar_t, opmath_t>;
#ifdef JIT_UNLEARN_X86_ISA
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: rows = &perturb_rows_avx512<kClamp, scalar_t, opmath_t>; break;
    case CpuIsa::kAvx2: rows = &perturb_rows_avx2<kClamp, scalar_t, opmath_t>; break;
    case CpuIsa::kBase: break;
  }
#endif
  return rows;
}

// Fills x_tilde and in_norm (contiguous, checked) from x.
void perturb_into_cpu(const at::Tensor& x_in, int64_t num_samples, double sigma, int64_t seed, int64_t offset,
                      bool clamp, at::Tensor& x_tilde, at::Tensor& in_norm) {
  const at::Tensor x = x_in.contiguous();
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
    const PerturbArgs<scalar_t, opmath_t> args{x.const_data_ptr<scalar_t>(), x_tilde.mutable_data_ptr<scalar_t>(),
                                               in_norm.mutable_data_ptr<opmath_t>(), batch, row_numel,
                                               static_cast<opmath_t>(sigma), lo, hi, static_cast<uint64_t>(seed),
                                               static_cast<uint64_t>(offset)};
    const auto rows_fn = do_clamp ? pick_perturb_rows<true, scalar_t, opmath_t>()
                                  : pick_perturb_rows<false, scalar_t, opmath_t>();
    // About 16 K elements per task.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(row_numel, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { rows_fn(args, begin, end); });
  });
}

std::tuple<at::Tensor, at::Tensor> perturb_cpu(const at::Tensor& x, int64_t num_samples, double sigma,
                                               int64_t seed, int64_t offset, bool clamp) {
  check_perturb_args(x, num_samples, sigma);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "perturb: x: expected a CPU tensor, got device ", x.device());
  auto [x_tilde, in_norm] = perturb_outputs(x, num_samples, /*zero_norm=*/false);
  perturb_into_cpu(x, num_samples, sigma, seed, offset, clamp, x_tilde, in_norm);
  return {x_tilde, in_norm};
}

void perturb_out_cpu(const at::Tensor& x, int64_t num_samples, double sigma, int64_t seed, int64_t offset,
                     bool clamp, at::Tensor x_tilde, at::Tensor in_norm) {
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
