// Host-side argument checks and output allocation of perturb, shared by both backends.
#pragma once

#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

namespace jit_unlearn {

// x [B, ...] in float32/float64/float16/bfloat16, num_samples >= 0, sigma finite and >= 0.
// Errors name the argument.
inline void check_perturb_args(const at::Tensor& x, int64_t num_samples, double sigma) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "perturb: x: expected float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(x.dim() >= 1, "perturb: x: expected a batch [B, ...] with at least 1 dimension, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(num_samples >= 0, "perturb: num_samples: must be >= 0, got ", num_samples);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma >= 0.0, "perturb: sigma: must be finite and >= 0, got ", sigma);
}

// Empty outputs: x_tilde [N, *x.shape] in x's dtype and in_norm [N, B] in the opmath dtype (float64
// for float64 x, float32 otherwise), both contiguous.  in_norm is zero-filled when `zero_norm`.
inline std::tuple<at::Tensor, at::Tensor> perturb_outputs(const at::Tensor& x, int64_t num_samples,
                                                           bool zero_norm) {
  std::vector<int64_t> shape{num_samples};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor x_tilde = at::empty(shape, x.options());
  const auto norm_options = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor in_norm = zero_norm ? at::zeros({num_samples, x.size(0)}, norm_options)
                                 : at::empty({num_samples, x.size(0)}, norm_options);
  return {x_tilde, in_norm};
}

}  // namespace jit_unlearn
