// Per-element maths of lipschitz_ratio and _lipschitz_ratio_backward, shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace jit_unlearn {

// The summation order of a row's squared distance, shared by the CPU and CUDA kernels so that they agree
// bitwise: element k adds to lane k % kLipschitzLanes in order of k, then a pairwise tree over the lanes
// (lane l += lane l + 4, then l += l + 2, then 0 += 1).
constexpr int kLipschitzLanes = 8;

// acc + (out - out_perturbed)^2: one term of the squared output distance of a row.  T is the opmath
// scalar (half/bfloat16 are read as float) or a lane-wise vector type with the same operators.
template <typename T>
HOST_DEVICE_INLINE T lipschitz_sq_diff_accumulate(T acc, T out, T out_perturbed) {
  const T d = out - out_perturbed;
  return acc + d * d;
}

HOST_DEVICE_INLINE float lipschitz_sqrt(float x) { return sqrtf(x); }
HOST_DEVICE_INLINE double lipschitz_sqrt(double x) { return sqrt(x); }

// ratio = sqrt(sq_sum) / in_norm; exactly 0 where in_norm <= 0 (or is NaN).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t lipschitz_ratio_value(acc_t sq_sum, acc_t in_norm) {
  return in_norm > acc_t(0) ? lipschitz_sqrt(sq_sum) / in_norm : acc_t(0);
}

// d ratio / d out_b = (out_b - out_perturbed_nb) * coef with coef = grad / (num * in_norm).
// A zero output distance (num == 0) or a non-positive in_norm gives coef 0, so the gradient there is
// 0, never NaN: the norm's subgradient at 0 is taken as 0, as in torch's vector_norm backward.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t lipschitz_backward_coef(acc_t grad, acc_t sq_sum, acc_t in_norm) {
  const acc_t num = lipschitz_sqrt(sq_sum);
  return (num > acc_t(0) && in_norm > acc_t(0)) ? grad / (num * in_norm) : acc_t(0);
}

// One pair's contribution to grad_out[b, k]; grad_out_perturbed[n, b, k] is its negation.
template <typename T>
HOST_DEVICE_INLINE T lipschitz_grad_term(T out, T out_perturbed, T coef) {
  return (out - out_perturbed) * coef;
}

}  // namespace jit_unlearn
