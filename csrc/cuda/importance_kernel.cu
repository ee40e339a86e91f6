// CUDA kernel of accumulate_importance_: one multi-tensor-apply launch per dtype group covers many tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/importance_utils.h"
#include "common/tensor_list_args.h"
#include "cuda/multi_tensor_apply.cuh"

namespace jit_unlearn {
namespace {

template <ImportanceMode kMode, typename acc_t, typename grad_t>
struct AccumulateFunctor {
  using opmath_t = at::opmath_type<acc_t>;

  __device__ void operator()(const cuda::TensorListMetadata<2>& meta, opmath_t scale) const {
    const cuda::ChunkRange range = cuda::block_chunk(meta);
    acc_t* a = static_cast<acc_t*>(meta.addresses[0][range.slot]) + range.start;
    const grad_t* g = static_cast<const grad_t*>(meta.addresses[1][range.slot]) + range.start;
    for (int i = threadIdx.x; i < range.length; i += blockDim.x) {
      a[i] = static_cast<acc_t>(
          accumulate_importance<kMode>(static_cast<opmath_t>(a[i]), static_cast<opmath_t>(g[i]), scale));
    }
  }
};

}  // namespace

// CUDA twin of accumulate_importance_cpu (csrc/cpu/importance_kernel.cpp): same update, same checks.
// Tensors are grouped by (acc dtype, grad dtype); each group is one multi-tensor-apply pass.
void accumulate_importance_cuda(at::TensorList acc, at::TensorList grads, c10::string_view importance_mode, double scale) {
  const ImportanceMode mode = parse_importance_mode(importance_mode);
  check_accumulate_importance_args(acc, grads, scale, at::kCUDA);
  if (acc.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(acc[0].device());
  std::vector<cuda::TensorGroup> groups;
  for (size_t i = 0; i < acc.size(); ++i) {
    if (acc[i].numel() != 0) {
      cuda::add_to_group(groups, {acc[i], match_layout(grads[i], acc[i], grads[i].scalar_type())},
                         static_cast<int64_t>(i));
    }
  }
  for (const cuda::TensorGroup& group : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtypes[0], "accumulate_importance_cuda", [&] {
      using acc_t = scalar_t;
      const auto scale_ = static_cast<at::opmath_type<acc_t>>(scale);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtypes[1], "accumulate_importance_cuda", [&] {
        if (mode == ImportanceMode::kSquare) {
          cuda::multi_tensor_apply<2>(group.lists, group.list_index,
                                      AccumulateFunctor<ImportanceMode::kSquare, acc_t, scalar_t>(), scale_);
        } else {
          cuda::multi_tensor_apply<2>(group.lists, group.list_index,
                                      AccumulateFunctor<ImportanceMode::kAbs, acc_t, scalar_t>(), scale_);
        }
      });
    });
  }
}

TORCH_LIBRARY_IMPL(jit_unlearn, CUDA, m) {
  m.impl("accumulate_importance_", &accumulate_importance_cuda);
}

}  // namespace jit_unlearn
