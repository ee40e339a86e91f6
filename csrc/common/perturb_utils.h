// Per-element maths of perturb (noise -> add -> clamp -> squared difference), shared by CPU and CUDA.
#pragma once

#include "common/macros.h"

namespace jit_unlearn {

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
  scalar_t value;   // x_tilde, rounded to x's dtype
  opmath_t sq_diff; // (x_tilde - x)^2 in opmath, from the rounded x_tilde
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
