// CUDA kernel of masked_reset_: one multi-tensor-apply launch per parameter dtype covers many tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/tensor_list_args.h"
#include "cuda/multi_tensor_apply.cuh"

namespace jit_unlearn {
namespace {

template <typename scalar_t>
struct ResetFunctor {
  __device__ void operator()(const cuda::TensorListMetadata<3>& meta) const {
    const cuda::ChunkRange range = cuda::block_chunk(meta);
    scalar_t* p = static_cast<scalar_t*>(meta.addresses[0][range.slot]) + range.start;
    const scalar_t* v = static_cast<const scalar_t*>(meta.addresses[1][range.slot]) + range.start;
    const bool* m = static_cast<const bool*>(meta.addresses[2][range.slot]) + range.start;
    for (int i = threadIdx.x; i < range.length; i += blockDim.x) {
      if (m[i]) {
        p[i] = v[i];
      }
    }
  }
};

}  // namespace

// CUDA twin of masked_reset_cpu (csrc/cpu/reset_kernel.cpp): same rule, same checks.  init[i] is converted
// to params[i]'s dtype; tensors are grouped by parameter dtype.
void masked_reset_cuda(at::TensorList params, at::TensorList init, at::TensorList masks) {
  check_masked_reset_args(params, init, masks, at::kCUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<cuda::TensorGroup> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    if (param.numel() != 0) {
      cuda::add_to_group(groups,
                         {param, match_layout(init[i], param, param.scalar_type()),
                          match_layout(masks[i], param, at::kBool)},
                         static_cast<int64_t>(i));
    }
  }
  for (const cuda::TensorGroup& group : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtypes[0], "masked_reset_cuda", [&] {
      cuda::multi_tensor_apply<3>(group.lists, group.list_index, ResetFunctor<scalar_t>());
    });
  }
}

TORCH_LIBRARY_IMPL(jit_unlearn, CUDA, m) {
  m.impl("masked_reset_", &masked_reset_cuda);
}

}  // namespace jit_unlearn
