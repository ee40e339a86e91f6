// CPU kernel of masked_reset_: a loop over the tensors, each walked by a vectorised at::parallel_for kernel.
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/tensor_list_args.h"
#include "cpu/cpu_isa.h"

namespace jit_unlearn {
namespace {

constexpr int64_t kGrainSize = 32768;

// p[i] = m[i] != 0 ? v[i] : p[i] for i in [begin, end).
template <typename scalar_t>
struct ResetRange {
  using Signature = void(scalar_t*, const scalar_t*, const uint8_t*, int64_t, int64_t);
  static constexpr CpuIsa kMaxIsa = CpuIsa::kAvx512;

  template <CpuIsa kIsa>
  static C10_ALWAYS_INLINE void run(scalar_t* __restrict__ p, const scalar_t* __restrict__ v,
                                    const uint8_t* __restrict__ m, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // Both values are loaded unconditionally so that the select vectorises as a blend.
      const scalar_t reset = v[i];
      const scalar_t kept = p[i];
      p[i] = m[i] != 0 ? reset : kept;
    }
  }
};

template <typename scalar_t>
void reset_tensor(const at::Tensor& param, const at::Tensor& init, const at::Tensor& mask) {
  scalar_t* p = param.data_ptr<scalar_t>();
  const scalar_t* v = init.const_data_ptr<scalar_t>();
  // Read as bytes, any nonzero byte meaning true: a byte compare vectorises where a bool load may not,
  // and a bool view of other bytes (values > 1) reads the same on every backend.
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const auto range = isa_copy<ResetRange<scalar_t>>();
  at::parallel_for(0, param.numel(), kGrainSize, [&](int64_t begin, int64_t end) { range(p, v, m, begin, end); });
}

// params[i] = masks[i] ? init[i] : params[i].  masks[i] are bool; init[i] is converted to params[i]'s dtype.
// Every operand is checked and prepared before the first tensor is written.
void masked_reset_cpu(at::TensorList params, at::TensorList init, at::TensorList masks) {
  check_masked_reset_args(params, init, masks, at::kCPU);
  std::vector<std::pair<at::Tensor, at::Tensor>> prepared(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() != 0) {
      prepared[i] = {match_layout(init[i], params[i], params[i].scalar_type()),
                     match_layout(masks[i], params[i], at::kBool)};
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    if (param.numel() == 0) {
      continue;
    }
    const auto& [v, m] = prepared[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "masked_reset_cpu",
                                    [&] { reset_tensor<scalar_t>(param, v, m); });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CPU, m) { m.impl("masked_reset_", &masked_reset_cpu); }

}  // namespace jit_unlearn
