// Per-element maths of perturb (noise -> add -> clamp -> squared difference), shared by CPU and CUDA.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace jit_unlearn {

// The summation order of in_norm, shared by the CPU and CUDA kernels so that they agree bitwise: the flat
// output [N * B * D] is cut into spans at row ends and at every multiple of kNormSpan elements; within a
// span, element i of the whole blocks of kNormLanes adds to lane i % kNormLanes, the remaining elements
// to lane 0, and the lanes are summed in order; a row sums its spans in order from 0, then the square root.
// (The CPU kernel draws its noise in chunks of kNormSpan / 4 Philox groups, the CUDA kernel gives each
// chunk one block; the span boundaries are theirs.)
constexpr int64_t kNormSpan = 1024;
constexpr int kNormLanes = 8;

// A row's in_norm from its sum of squares: sqrt, correctly rounded in both backends.
HOST_DEVICE_INLINE float perturb_norm(float sq_sum) { return sqrtf(sq_sum); }
HOST_DEVICE_INLINE double perturb_norm(double sq_sum) { return sqrt(sq_sum); }

// torch.maximum(v, lo) then torch.minimum(., hi): a NaN in v, lo or hi gives NaN; on equal values
// (+0 against -0) the bound is returned, as the vectorised torch kernels do.
template <typename opmath_t>
HOST_DEVICE_INLINE opmath_t perturb_clamp(opmath_t v, opmath_t lo, opmath_t hi) {
  v = (v > lo || v != v) ? v : lo;
  return (v < hi || v != v) ? v : hi;
}

// One element of x_tilde and its contribution to the squared input distance.
template <typename scalar_t, typename opmath_t>
struct PerturbedElement {
  scalar_t value;    // x_tilde, rounded to x's dtype
  opmath_t sq_diff;  // (x_tilde - x)^2 in opmath, from the rounded x_tilde
};

// x_tilde = x + sigma * z in opmath (float for float/half/bfloat16, double for double with z widened),
// clamped to [lo, hi] when kClamp, then rounded to scalar_t.
template <bool kClamp, typename scalar_t, typename opmath_t>
HOST_DEVICE_INLINE PerturbedElement<scalar_t, opmath_t> perturb_element(scalar_t x, float z, opmath_t sigma,
                                                                        opmath_t lo, opmath_t hi) {
  const opmath_t xo = static_cast<opmath_t>(x);
  opmath_t noisy = xo + sigma * static_cast<opmath_t>(z);
  if (kClamp) {
    noisy = perturb_clamp(noisy, lo, hi);
  }
  const scalar_t stored = static_cast<scalar_t>(noisy);
  const opmath_t d = static_cast<opmath_t>(stored) - xo;
  return {stored, d * d};
}

}  // namespace jit_unlearn
