// Per-element importance update acc + scale * g^2 ("square") or acc + scale * |g| ("abs"), CPU and CUDA.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace jit_unlearn {

enum class ImportanceMode { kSquare, kAbs };

// The accumulated quantity of one gradient element, in the opmath dtype T.
template <ImportanceMode kMode, typename T>
HOST_DEVICE_INLINE T importance_term(T g) {
  if constexpr (kMode == ImportanceMode::kSquare) {
    return g * g;
  } else {
#if defined(__CUDA_ARCH__)
    return fabs(g);
#else
    return std::fabs(g);  // clears the sign bit: |-0| = +0, as torch.abs
#endif
  }
}

// acc + scale * term(g), rounded once per operation in T.  Multiplying by scale == 1 is exact, so
// scale == 1 gives bitwise acc + g * g (the published `imp += grad.pow(2)`).
template <ImportanceMode kMode, typename T>
HOST_DEVICE_INLINE T accumulate_importance(T acc, T g, T scale) {
  return acc + scale * importance_term<kMode>(g);
}

}  // namespace jit_unlearn
