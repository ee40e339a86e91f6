// Host-side argument checks and output allocation of perturb, shared by both backends.
#pragma once

#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#include "common/operand_checks.h"

namespace jit_unlearn {

// x [B, ...] in float32/float64/float16/bfloat16, num_samples >= 0, sigma finite and >= 0.
// Errors name the argument.
inline void check_perturb_args(const at::Tensor& x, int64_t num_samples, double sigma) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()),
                   "perturb: x: expected float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "perturb: x: expected a batch [B, ...] with at least 1 dimension, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(num_samples >= 0, "perturb: num_samples: must be >= 0, got ", num_samples);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma >= 0.0, "perturb: sigma: must be finite and >= 0, got ", sigma);
}

// The caller's outputs of _perturb_out: x_tilde [N, *x.shape] in x's dtype and in_norm [N, B] in
// the opmath dtype, both contiguous, element-aligned and on x's device, sharing no memory with each
// other or with x.  Errors name the argument.
inline void check_perturb_out(const at::Tensor& x, int64_t num_samples, const at::Tensor& x_tilde,
                              const at::Tensor& in_norm) {
  std::vector<int64_t> shape{num_samples};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  const auto norm_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(x_tilde.sizes() == at::IntArrayRef(shape), "_perturb_out: x_tilde: expected shape ",
                    at::IntArrayRef(shape), ", got ", x_tilde.sizes());
  TORCH_CHECK_TYPE(x_tilde.scalar_type() == x.scalar_type(), "_perturb_out: x_tilde: expected dtype ", x.scalar_type(),
                   " (as x), got ", x_tilde.scalar_type());
  TORCH_CHECK_VALUE(in_norm.dim() == 2 && in_norm.size(0) == num_samples && in_norm.size(1) == x.size(0),
                    "_perturb_out: in_norm: expected shape [", num_samples, ", ", x.size(0), "], got ",
                    in_norm.sizes());
  TORCH_CHECK_TYPE(in_norm.scalar_type() == norm_type, "_perturb_out: in_norm: expected dtype ", norm_type, ", got ",
                   in_norm.scalar_type());
  TORCH_CHECK_VALUE(x_tilde.device() == x.device() && in_norm.device() == x.device(),
                    "_perturb_out: x_tilde and in_norm: expected device ", x.device(), ", got ", x_tilde.device(),
                    " and ", in_norm.device());
  TORCH_CHECK_VALUE(x_tilde.is_contiguous() && in_norm.is_contiguous(),
                    "_perturb_out: x_tilde and in_norm: expected contiguous tensors");
  check_aligned_output(x_tilde, "_perturb_out: x_tilde", -1);
  check_aligned_output(in_norm, "_perturb_out: in_norm", -1);
  OverlapCheck overlap;
  overlap.add(x, "x", -1, false);
  overlap.add(x_tilde, "x_tilde", -1, true);
  overlap.add(in_norm, "in_norm", -1, true);
  overlap.check("_perturb_out");
}

// Empty outputs: x_tilde [N, *x.shape] in x's dtype and in_norm [N, B] in the opmath dtype (float64
// for float64 x, float32 otherwise), both contiguous.
inline std::tuple<at::Tensor, at::Tensor> perturb_outputs(const at::Tensor& x, int64_t num_samples) {
  std::vector<int64_t> shape{num_samples};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor x_tilde = at::empty(shape, x.options());
  const auto norm_options = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor in_norm = at::empty({num_samples, x.size(0)}, norm_options);
  return {x_tilde, in_norm};
}

}  // namespace jit_unlearn
