// Host-side argument checks and operand preparation of the multi-tensor in-place ops, shared by the CPU
// and CUDA entry points (errors name the argument; everything is checked before anything is written).
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "common/importance_utils.h"
#include "common/operand_checks.h"

namespace jit_unlearn {

// `list` must hold as many tensors as `ref`.
inline void check_list_length(at::TensorList ref, const char* ref_name, at::TensorList list, const char* name) {
  TORCH_CHECK_VALUE(list.size() == ref.size(), name, ": expected ", ref.size(), " tensors (as many as ", ref_name,
                    "), got ", list.size());
}

inline void check_floating(const at::Tensor& t, const char* name, size_t i) {
  check_supported_float(t, name, static_cast<int64_t>(i));
}

// list[i] must be on the device of the whole call (that of ref_list[0]) and have ref_list[i]'s shape.
inline void check_like(const at::Tensor& t, const char* name, size_t i, at::TensorList ref_list, const char* ref_name) {
  const at::Device device = ref_list[0].device();
  TORCH_CHECK_VALUE(t.device() == device, name, "[", i, "]: expected device ", device, " (as ", ref_name, "[0]), got ",
                    t.device());
  TORCH_CHECK_VALUE(t.sizes() == ref_list[i].sizes(), name, "[", i, "]: expected shape ", ref_list[i].sizes(), " (as ",
                    ref_name, "[", i, "]), got ", t.sizes());
}

// In-place operands are walked as flat memory: contiguous (or at least non-overlapping and dense, e.g.
// channels_last), never a strided view, and element-aligned.
inline void check_inplace_layout(const at::Tensor& t, const char* name, size_t i) {
  const auto index = static_cast<int64_t>(i);
  check_no_internal_overlap(t, name, index);
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), name, "[", i,
                    "]: must be contiguous (an in-place operand is written as flat memory), got strides ", t.strides());
  check_aligned_output(t, name, index);
}

inline void check_finite(double value, const char* name, bool non_negative) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, ": must be finite, got ", value);
  TORCH_CHECK_VALUE(!non_negative || value >= 0.0, name, ": must be >= 0, got ", value);
}

// The device every tensor of the call must be on; it must be of `device_type` (the kernel's backend).
inline void check_call_device(at::TensorList list, const char* name, at::DeviceType device_type) {
  if (!list.empty()) {
    TORCH_CHECK_VALUE(list[0].device().type() == device_type, name, "[0]: expected a ",
                      c10::DeviceTypeName(device_type), " tensor, got device ", list[0].device());
  }
}

inline ImportanceMode parse_importance_mode(c10::string_view importance_mode) {
  TORCH_CHECK_VALUE(importance_mode == "square" || importance_mode == "abs",
                    "importance_mode: expected 'square' or 'abs', got '", importance_mode, "'");
  return importance_mode == "square" ? ImportanceMode::kSquare : ImportanceMode::kAbs;
}

inline void check_accumulate_importance_args(at::TensorList acc, at::TensorList grads, double scale,
                                             at::DeviceType device_type) {
  check_list_length(acc, "acc", grads, "grads");
  check_finite(scale, "scale", false);
  check_call_device(acc, "acc", device_type);
  for (size_t i = 0; i < acc.size(); ++i) {
    check_floating(acc[i], "acc", i);
    check_floating(grads[i], "grads", i);
    check_like(acc[i], "acc", i, acc, "acc");
    check_like(grads[i], "grads", i, acc, "acc");
    check_inplace_layout(acc[i], "acc", i);
  }
  OverlapCheck overlap;
  overlap.add(acc, "acc", true);
  overlap.add(grads, "grads", false);
  overlap.check("accumulate_importance_");
}

inline void check_ssd_dampen_args(at::TensorList params, at::TensorList imp_forget, at::TensorList imp_full,
                                  double alpha, double lam, double exponent, at::DeviceType device_type) {
  check_list_length(params, "params", imp_forget, "imp_forget");
  check_list_length(params, "params", imp_full, "imp_full");
  check_finite(alpha, "alpha", true);
  check_finite(lam, "lam", true);
  check_finite(exponent, "exponent", false);
  check_call_device(params, "params", device_type);
  for (size_t i = 0; i < params.size(); ++i) {
    check_floating(params[i], "params", i);
    check_floating(imp_forget[i], "imp_forget", i);
    check_floating(imp_full[i], "imp_full", i);
    check_like(params[i], "params", i, params, "params");
    check_like(imp_forget[i], "imp_forget", i, params, "params");
    check_like(imp_full[i], "imp_full", i, params, "params");
    check_inplace_layout(params[i], "params", i);
  }
  OverlapCheck overlap;
  overlap.add(params, "params", true);
  overlap.add(imp_forget, "imp_forget", false);
  overlap.add(imp_full, "imp_full", false);
  overlap.check("ssd_dampen_");
}

inline void check_masked_reset_args(at::TensorList params, at::TensorList init, at::TensorList masks,
                                    at::DeviceType device_type) {
  check_list_length(params, "params", init, "init");
  check_list_length(params, "params", masks, "masks");
  check_call_device(params, "params", device_type);
  for (size_t i = 0; i < params.size(); ++i) {
    check_floating(params[i], "params", i);
    check_floating(init[i], "init", i);
    TORCH_CHECK_TYPE(masks[i].scalar_type() == at::kBool, "masks[", i, "]: expected a bool tensor, got ",
                     masks[i].scalar_type());
    check_like(params[i], "params", i, params, "params");
    check_like(init[i], "init", i, params, "params");
    check_like(masks[i], "masks", i, params, "params");
    check_inplace_layout(params[i], "params", i);
  }
  OverlapCheck overlap;
  overlap.add(params, "params", true);
  overlap.add(init, "init", false);
  overlap.add(masks, "masks", false);
  overlap.check("masked_reset_");
}

// `src` in dtype `dtype` with the memory layout of `ref`, so that both are walked as flat arrays with the
// same index; `src` itself when it already is and is element-aligned (the usual case: no copy).
inline at::Tensor match_layout(const at::Tensor& src, const at::Tensor& ref, at::ScalarType dtype) {
  const bool same_layout = (src.is_contiguous() && ref.is_contiguous()) ||
                           (src.strides() == ref.strides() && src.is_non_overlapping_and_dense());
  if (same_layout && src.scalar_type() == dtype && (src.numel() == 0 || element_aligned(src))) {
    return src;
  }
  at::Tensor out = at::empty_like(ref, ref.options().dtype(dtype), at::MemoryFormat::Preserve);
  out.copy_(src);
  return out;
}

// The dtype the two importances of one parameter are read in: their own when they agree, else both are
// converted to the parameter's opmath dtype (the dtype the rule computes in anyway).
inline at::ScalarType ssd_importance_dtype(const at::Tensor& param, const at::Tensor& imp_forget,
                                           const at::Tensor& imp_full) {
  return imp_forget.scalar_type() == imp_full.scalar_type() ? imp_forget.scalar_type()
                                                            : at::toOpMathType(param.scalar_type());
}

}  // namespace jit_unlearn
