// Four-element vector accesses of the CUDA kernels, behind an alignment check.
//
// A Vec4<T> load or store is one 4 * sizeof(T)-byte access (two for double), legal only at addresses that
// are multiples of that size.  Kernels test the base pointers of every operand with aligned4() (the chunk
// and group offsets they add are multiples of 4 elements) and take a scalar loop otherwise: views that
// start inside a buffer (`buf[1:]`) are valid operands.  Element alignment itself is checked on the host
// (common/operand_checks.h).
#pragma once

#include <cstdint>

namespace jit_unlearn::cuda {

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
__host__ __device__ __forceinline__ bool aligned4(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

template <typename T>
__device__ __forceinline__ Vec4<T> load4(const T* p) {
  return *reinterpret_cast<const Vec4<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const Vec4<T>& value) {
  *reinterpret_cast<Vec4<T>*>(p) = value;
}

}  // namespace jit_unlearn::cuda
