// The one instruction-set dispatch of the CPU kernels: the x86-64 levels a kernel is compiled for,
// and the copy that runs on this machine.
//
// A kernel is a class with
//   using Signature = R(Args...);                       // the work function's type
//   static constexpr CpuIsa kMaxIsa = CpuIsa::kAvx512;  // the highest level worth a copy
//   template <CpuIsa kIsa> static C10_ALWAYS_INLINE R run(Args...);
// IsaCopies<Kernel> compiles `run` once per level: the baseline copy, an x86-64-v3 (AVX2) copy and an
// x86-64-v4 (AVX-512) copy, each `flatten`ed so that everything `run` calls is compiled for that level
// too.  isa_copy<Kernel>() returns the copy for this machine: cpu_isa(), the level ATen picked for its
// own kernels (cpuinfo, capped by the ATEN_CPU_CAPABILITY environment variable), capped at kMaxIsa.
// Inside `run`, `if constexpr (kIsa == ...)` selects intrinsics (cpu/avx512_perturb.h and friends).
//
// Every copy gives bitwise the same results: -ffp-contract=off keeps FMA contraction out of all of
// them, and each loop's lane structure (its summation order) is fixed in the source.
//
// Vector accesses to caller memory use the unaligned forms (loadu/storeu, masked loads/stores), so no
// copy needs more than element alignment, which the argument checks guarantee
// (common/operand_checks.h).  Aligned forms are used only on the kernels' own alignas(64) stack buffers.
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

// ATen's capability, read once.  kBase off x86-64.
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

template <typename Kernel, typename Signature = typename Kernel::Signature>
struct IsaCopies;

template <typename Kernel, typename R, typename... Args>
struct IsaCopies<Kernel, R(Args...)> {
  using Fn = R (*)(Args...);

  __attribute__((flatten)) static R base(Args... args) { return Kernel::template run<CpuIsa::kBase>(args...); }
#ifdef JIT_UNLEARN_X86_ISA
  JIT_UNLEARN_TARGET_AVX2 __attribute__((flatten)) static R avx2(Args... args) {
    return Kernel::template run<CpuIsa::kAvx2>(args...);
  }
  JIT_UNLEARN_TARGET_AVX512 __attribute__((flatten)) static R avx512(Args... args) {
    return Kernel::template run<CpuIsa::kAvx512>(args...);
  }
#endif
};

// The copy of Kernel::run for this machine.  Pick it once per call, outside the parallel loop.
template <typename Kernel>
typename IsaCopies<Kernel>::Fn isa_copy() {
#ifdef JIT_UNLEARN_X86_ISA
  // Copies above kMaxIsa are not even instantiated.
  const CpuIsa isa = cpu_isa();
  if constexpr (Kernel::kMaxIsa >= CpuIsa::kAvx512) {
    if (isa == CpuIsa::kAvx512) return &IsaCopies<Kernel>::avx512;
  }
  if constexpr (Kernel::kMaxIsa >= CpuIsa::kAvx2) {
    if (isa >= CpuIsa::kAvx2) return &IsaCopies<Kernel>::avx2;
  }
#endif
  return &IsaCopies<Kernel>::base;
}

}  // namespace jit_unlearn
