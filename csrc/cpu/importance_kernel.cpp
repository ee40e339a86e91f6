// CPU kernel of accumulate_importance_: a loop over the tensors, each walked by a vectorised at::parallel_for kernel.
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/importance_utils.h"
#include "common/tensor_list_args.h"
#include "cpu/cpu_isa.h"

namespace jit_unlearn {
namespace {

constexpr int64_t kGrainSize = 32768;

// acc[i] = acc[i] + scale * term(grad[i]) for i in [begin, end).
template <ImportanceMode kMode, typename acc_t, typename grad_t>
struct AccumulateRange {
  using opmath_t = at::opmath_type<acc_t>;
  using Signature = void(acc_t*, const grad_t*, opmath_t, int64_t, int64_t);
  static constexpr CpuIsa kMaxIsa = CpuIsa::kAvx512;

  template <CpuIsa kIsa>
  static C10_ALWAYS_INLINE void run(acc_t* __restrict__ a, const grad_t* __restrict__ g, opmath_t scale, int64_t begin,
                                    int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      a[i] = static_cast<acc_t>(
          accumulate_importance<kMode>(static_cast<opmath_t>(a[i]), static_cast<opmath_t>(g[i]), scale));
    }
  }
};

template <ImportanceMode kMode, typename acc_t, typename grad_t>
void accumulate_tensor(const at::Tensor& acc, const at::Tensor& grad, double scale) {
  using opmath_t = at::opmath_type<acc_t>;
  acc_t* a = acc.data_ptr<acc_t>();
  const grad_t* g = grad.const_data_ptr<grad_t>();
  const opmath_t scale_ = static_cast<opmath_t>(scale);
  const auto range = isa_copy<AccumulateRange<kMode, acc_t, grad_t>>();
  at::parallel_for(0, acc.numel(), kGrainSize, [&](int64_t begin, int64_t end) { range(a, g, scale_, begin, end); });
}

// acc[i] += scale * grads[i]^2 ("square") or scale * |grads[i]| ("abs"), in acc[i]'s opmath dtype.
// acc[i] and grads[i] may have different float dtypes.  Every operand is checked and prepared before
// the first tensor is written.
void accumulate_importance_cpu(at::TensorList acc, at::TensorList grads, c10::string_view importance_mode,
                               double scale) {
  const ImportanceMode mode = parse_importance_mode(importance_mode);
  check_accumulate_importance_args(acc, grads, scale, at::kCPU);
  std::vector<at::Tensor> prepared(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) {
    if (acc[i].numel() != 0) {
      prepared[i] = match_layout(grads[i], acc[i], grads[i].scalar_type());
    }
  }
  for (size_t i = 0; i < acc.size(); ++i) {
    if (acc[i].numel() == 0) {
      continue;
    }
    const at::Tensor& grad = prepared[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc[i].scalar_type(), "accumulate_importance_cpu", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "accumulate_importance_cpu", [&] {
        if (mode == ImportanceMode::kSquare) {
          accumulate_tensor<ImportanceMode::kSquare, acc_t, scalar_t>(acc[i], grad, scale);
        } else {
          accumulate_tensor<ImportanceMode::kAbs, acc_t, scalar_t>(acc[i], grad, scale);
        }
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CPU, m) { m.impl("accumulate_importance_", &accumulate_importance_cpu); }

}  // namespace jit_unlearn
