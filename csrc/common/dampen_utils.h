// Per-element SSD dampening rule (docs/METHODS.md §2), shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace jit_unlearn {

// An importance the rule accepts: >= 0 (-0 included), not NaN.  A negative one would give a negative
// factor and flip the parameter's sign; the ops raise on either before writing anything.
template <typename T>
HOST_DEVICE_INLINE bool ssd_importance_valid(T imp) {
  return imp >= T(0);
}

// The error text of an invalid importance, after "imp_forget[i]" or "imp_full[i]" (both backends and
// jit_unlearn/torch_ops.py use it word for word).
#define JIT_UNLEARN_SSD_INVALID_IMPORTANCE \
  ": holds a negative or NaN value; importances must be >= 0 (a negative one would flip the parameter's sign)"

// Selection test I_f > alpha * I_D, in the opmath dtype T.  Any NaN importance gives false (not selected);
// I_D = 0 < I_f is selected.
template <typename T>
HOST_DEVICE_INLINE bool ssd_selected(T imp_forget, T imp_full, T alpha) {
  return imp_forget > alpha * imp_full;
}

// Factor min(((lam * I_D) / I_f)^exponent, 1) of a selected element; kApplyExponent is (exponent != 1).
// The order (lam * I_D) / I_f and the IEEE division match the pure-PyTorch tier bitwise.  The clamp is written
// `w <= 1 ? w : 1` so that the one NaN a selected element with importances >= 0 can produce (I_f = inf
// and lam * I_D = inf) leaves theta unchanged instead of writing NaN.
template <bool kApplyExponent, typename T>
HOST_DEVICE_INLINE T ssd_factor(T imp_forget, T imp_full, T lam, T exponent) {
  T w = (lam * imp_full) / imp_forget;
  if constexpr (kApplyExponent) {
#if defined(__CUDA_ARCH__)
    w = pow(w, exponent);
#else
    w = std::pow(w, exponent);
#endif
  }
  return w <= T(1) ? w : T(1);
}

// New value of theta for a selected element.
template <bool kApplyExponent, typename T>
HOST_DEVICE_INLINE T ssd_dampened(T theta, T imp_forget, T imp_full, T lam, T exponent) {
  return theta * ssd_factor<kApplyExponent>(imp_forget, imp_full, lam, exponent);
}

}  // namespace jit_unlearn
