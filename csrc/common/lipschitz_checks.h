// Host-side argument checks of lipschitz_ratio and _lipschitz_ratio_backward, shared by both backends.
#pragma once

#include <ATen/ATen.h>

#include "common/operand_checks.h"

namespace jit_unlearn {

// Shapes out [B, K], out_perturbed [N, B, K], in_norm [N, B]; out and out_perturbed share one of
// the four float dtypes; in_norm is any of them; all on out's device, which is of `device_type` (the
// kernel's backend).  Errors name the argument.
inline void check_lipschitz_args(const char* op, const at::Tensor& out, const at::Tensor& out_perturbed,
                                 const at::Tensor& in_norm, at::DeviceType device_type) {
  TORCH_CHECK_VALUE(out.device().type() == device_type, op, ": out: expected a ", c10::DeviceTypeName(device_type),
                    " tensor, got device ", out.device());
  TORCH_CHECK_VALUE(out.dim() == 2, op, ": out: expected shape [B, K], got ", out.sizes());
  TORCH_CHECK_VALUE(
      out_perturbed.dim() == 3 && out_perturbed.size(1) == out.size(0) && out_perturbed.size(2) == out.size(1), op,
      ": out_perturbed: expected shape [N, ", out.size(0), ", ", out.size(1), "], got ", out_perturbed.sizes());
  TORCH_CHECK_VALUE(in_norm.dim() == 2 && in_norm.size(0) == out_perturbed.size(0) && in_norm.size(1) == out.size(0),
                    op, ": in_norm: expected shape [", out_perturbed.size(0), ", ", out.size(0), "], got ",
                    in_norm.sizes());
  TORCH_CHECK_TYPE(is_supported_float(out.scalar_type()), op,
                   ": out: expected float32, float64, float16 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK_TYPE(out_perturbed.scalar_type() == out.scalar_type(), op, ": out_perturbed: expected dtype ",
                   out.scalar_type(), " (same as out), got ", out_perturbed.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(in_norm.scalar_type()), op,
                   ": in_norm: expected float32, float64, float16 or bfloat16, got ", in_norm.scalar_type());
  TORCH_CHECK_VALUE(out_perturbed.device() == out.device(), op, ": out_perturbed: expected device ", out.device(),
                    " (as out), got ", out_perturbed.device());
  TORCH_CHECK_VALUE(in_norm.device() == out.device(), op, ": in_norm: expected device ", out.device(),
                    " (as out), got ", in_norm.device());
}

// The incoming gradient of the backward: grad [N, B], one of the four float dtypes, on out's device.
inline void check_lipschitz_grad(const char* op, const at::Tensor& grad, const at::Tensor& out,
                                 const at::Tensor& out_perturbed) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == out_perturbed.size(0) && grad.size(1) == out.size(0), op,
                    ": grad: expected shape [", out_perturbed.size(0), ", ", out.size(0), "], got ", grad.sizes());
  TORCH_CHECK_TYPE(is_supported_float(grad.scalar_type()), op,
                   ": grad: expected float32, float64, float16 or bfloat16, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == out.device(), op, ": grad: expected device ", out.device(), " (as out), got ",
                    grad.device());
}

}  // namespace jit_unlearn
