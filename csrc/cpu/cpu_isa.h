// The x86-64 instruction-set levels the CPU kernels are compiled for, and the one used at run time.
//
// A kernel's body is an always-inline template.  Thin wrappers compile it once per level, the upper
// ones under JIT_UNLEARN_TARGET_AVX2 / JIT_UNLEARN_TARGET_AVX512, and cpu_isa() picks one the way
// ATen picks its own kernels (cpuinfo, capped by the ATEN_CPU_CAPABILITY environment variable).
// Every variant gives bitwise the same results: -ffp-contract=off keeps FMA contraction out of all
// of them, and each loop's lane structure (its summation order) is fixed in the source.
#pragma once

#include <string>

#include <ATen/Version.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JIT_UNLEARN_X86_ISA 1
#define JIT_UNLEARN_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define JIT_UNLEARN_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#endif

namespace jit_unlearn {

enum class CpuIsa { kBase, kAvx2, kAvx512 };

// ATen's capability, read once.  kBase off x86-64 or when the extension was built without the
// x86 variants.
inline CpuIsa cpu_isa() {
#ifdef JIT_UNLEARN_X86_ISA
  static const CpuIsa isa = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX512" ? CpuIsa::kAvx512 : capability == "AVX2" ? CpuIsa::kAvx2 : CpuIsa::kBase;
  }();
  return isa;
#else
  return CpuIsa::kBase;
#endif
}

}  // namespace jit_unlearn
