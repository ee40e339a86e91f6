// Philox4x32-10 and its float32 Box-Muller normal transform, shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace jit_unlearn {

// Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// float32 constants of the normal transform; the same literals are in jit_unlearn/torch_ops.py.
// ln 2 = kLn2Hi + kLn2Lo, and e * kLn2Hi is exact for |e| < 2^7.
constexpr float kLn2Hi = 6.93138123e-01f;
constexpr float kLn2Lo = 9.05800061e-06f;
constexpr float kSqrt2 = 1.41421354e00f;
constexpr float kInvSqrt2 = 7.07106769e-01f;
constexpr float kHalfPi = 1.57079637e00f;
// log(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = (m - 1) / (m + 1), |s| <= 0.1716.
constexpr float kLogC0 = 3.33333343e-01f;
constexpr float kLogC1 = 2.00000003e-01f;
constexpr float kLogC2 = 1.42857149e-01f;
constexpr float kLogC3 = 1.11111112e-01f;
constexpr float kLogC4 = 9.09090936e-02f;
// Taylor coefficients of sin and cos on |t| <= pi/4.
constexpr float kSinC0 = -1.66666672e-01f;
constexpr float kSinC1 = 8.33333377e-03f;
constexpr float kSinC2 = -1.98412701e-04f;
constexpr float kSinC3 = 2.75573188e-06f;
constexpr float kSinC4 = -2.50521079e-08f;
constexpr float kCosC0 = -5.00000000e-01f;
constexpr float kCosC1 = 4.16666679e-02f;
constexpr float kCosC2 = -1.38888892e-03f;
constexpr float kCosC3 = 2.48015876e-05f;
constexpr float kCosC4 = -2.75573188e-07f;
constexpr float kCosC5 = 2.08767570e-09f;
constexpr float kTwoPowMinus24 = 5.9604644775390625e-08f;
constexpr float kTwoPowMinus22 = 2.384185791015625e-07f;

HOST_DEVICE_INLINE uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

HOST_DEVICE_INLINE float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// The four output words of one Philox block.
struct PhiloxWords {
  uint32_t r0, r1, r2, r3;
};

// Philox4x32-10 on counter (group_lo, group_hi, offset_lo, offset_hi) with key (seed_lo, seed_hi).
HOST_DEVICE_INLINE PhiloxWords philox4x32_10(uint64_t group, uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(group);
  uint32_t c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset);
  uint32_t c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32);
    const uint32_t lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32);
    const uint32_t lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {c0, c1, c2, c3};
}

// -2 log(u) for u = (2 (r >> 9) + 1) 2^-24 in (0, 1), in float32.
HOST_DEVICE_INLINE float neg2log_uniform(uint32_t r) {
  // (2 (r >> 9) + 1) < 2^24: the int conversion and the power-of-two scaling are exact.
  const float u = static_cast<float>(static_cast<int32_t>((r >> 9) * 2u + 1u)) * kTwoPowMinus24;
  const uint32_t bits = float_as_bits(u);
  const int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 127;
  // m = mantissa in [1, 2); where m > kSqrt2 (an integer compare of the bits: both are positive
  // floats of one binade, kSqrt2 = 0x3FB504F3), use m / 2 in [0.5, 1) and e + 1 instead.  Integer
  // selects, so the loop of philox normals vectorises without speculating float operations.
  const uint32_t mantissa = bits & 0x7FFFFFu;
  const bool big = mantissa > 0x3504F3u;
  const float m = bits_as_float(mantissa | (big ? 0x3F000000u : 0x3F800000u));
  const float ef = static_cast<float>(e + (big ? 1 : 0));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = kLogC4;
  p = p * s2 + kLogC3;
  p = p * s2 + kLogC2;
  p = p * s2 + kLogC1;
  p = p * s2 + kLogC0;
  const float two_s = s * 2.0f;
  const float log_m = two_s + two_s * s2 * p;
  const float log_u = ef * kLn2Hi + (ef * kLn2Lo + log_m);
  return log_u * -2.0f;
}

// (cos, sin) of 2 pi u for u = (2 (r >> 9) + 1) 2^-24, in float32.  The quadrant is the top two of
// the 23 used bits, so the reduction is exact; the polynomials run on t = (f - 1/2) pi/2, |t| < pi/4.
HOST_DEVICE_INLINE void sincos_2pi_uniform(uint32_t r, float& cos_out, float& sin_out) {
  const uint32_t m = r >> 9;
  const uint32_t quadrant = m >> 21;
  const float f = static_cast<float>(static_cast<int32_t>((m & 0x1FFFFFu) * 2u + 1u)) * kTwoPowMinus22;
  const float t = (f - 0.5f) * kHalfPi;
  const float t2 = t * t;
  float ps = kSinC4;
  ps = ps * t2 + kSinC3;
  ps = ps * t2 + kSinC2;
  ps = ps * t2 + kSinC1;
  ps = ps * t2 + kSinC0;
  const float sin_t = t + t * t2 * ps;
  float pc = kCosC5;
  pc = pc * t2 + kCosC4;
  pc = pc * t2 + kCosC3;
  pc = pc * t2 + kCosC2;
  pc = pc * t2 + kCosC1;
  pc = pc * t2 + kCosC0;
  const float cos_t = 1.0f + t2 * pc;
  // The angle within the quadrant is pi/4 + t.
  const float cos_a = (cos_t - sin_t) * kInvSqrt2;
  const float sin_a = (cos_t + sin_t) * kInvSqrt2;
  cos_out = quadrant == 0 ? cos_a : quadrant == 1 ? -sin_a : quadrant == 2 ? -cos_a : sin_a;
  sin_out = quadrant == 0 ? sin_a : quadrant == 1 ? cos_a : quadrant == 2 ? -sin_a : -cos_a;
}

// The four standard normals of Philox group `group` of stream (seed, offset): flat noise elements
// 4 group .. 4 group + 3.  Lanes 0, 1 are Box-Muller (cos, sin) of words (r0, r1), lanes 2, 3 of (r2, r3).
HOST_DEVICE_INLINE void philox_normal4(uint64_t group, uint64_t seed, uint64_t offset, float z[4]) {
  const PhiloxWords w = philox4x32_10(group, seed, offset);
  const float rad01 = sqrtf(neg2log_uniform(w.r0));
  const float rad23 = sqrtf(neg2log_uniform(w.r2));
  float c01, s01, c23, s23;
  sincos_2pi_uniform(w.r1, c01, s01);
  sincos_2pi_uniform(w.r3, c23, s23);
  z[0] = rad01 * c01;
  z[1] = rad01 * s01;
  z[2] = rad23 * c23;
  z[3] = rad23 * s23;
}

}  // namespace jit_unlearn
