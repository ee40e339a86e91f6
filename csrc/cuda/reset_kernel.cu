// CUDA kernel of masked_reset_: one multi-tensor-apply launch per parameter dtype covers many tensors.
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/tensor_list_args.h"
#include "cuda/multi_tensor_apply.cuh"

namespace jit_unlearn {
namespace {

// The tensor lists of one launch.
constexpr int kParamIdx = 0;
constexpr int kInitIdx = 1;
constexpr int kMaskIdx = 2;
constexpr int kResetDepth = 3;

// p = mask != 0 ? v : p on one chunk.  The mask is read as bytes, any nonzero byte meaning true, as the
// CPU kernel reads it (a bool load of a byte > 1 is undefined on the device).  4 elements per thread
// with vector accesses when p, v (4 elements) and the mask (4 bytes) are aligned; a group of 4 with no
// mask byte set touches neither p nor v.
template <typename scalar_t>
struct ResetFunctor {
  __device__ void operator()(const cuda::TensorListMetadata<kResetDepth>& meta) const {
    const cuda::ChunkRange range = cuda::block_chunk(meta);
    scalar_t* p = static_cast<scalar_t*>(meta.addresses[kParamIdx][range.slot]) + range.start;
    const scalar_t* v = static_cast<const scalar_t*>(meta.addresses[kInitIdx][range.slot]) + range.start;
    const uint8_t* m = static_cast<const uint8_t*>(meta.addresses[kMaskIdx][range.slot]) + range.start;
    int vector_end = 0;
    if (cuda::aligned4(p) && cuda::aligned4(v) && cuda::aligned4(m)) {
      vector_end = range.length / 4 * 4;
      for (int i = 4 * threadIdx.x; i < vector_end; i += 4 * blockDim.x) {
        const cuda::Vec4<uint8_t> mv = cuda::load4(m + i);
        if ((mv.v[0] | mv.v[1] | mv.v[2] | mv.v[3]) == 0) {
          continue;
        }
        cuda::Vec4<scalar_t> pv = cuda::load4(p + i);
        const cuda::Vec4<scalar_t> vv = cuda::load4(v + i);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (mv.v[k] != 0) pv.v[k] = vv.v[k];
        }
        cuda::store4(p + i, pv);
      }
    }
    for (int i = vector_end + threadIdx.x; i < range.length; i += blockDim.x) {
      if (m[i] != 0) {
        p[i] = v[i];
      }
    }
  }
};

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
      std::vector<at::Tensor> tuple(kResetDepth);
      tuple[kParamIdx] = param;
      tuple[kInitIdx] = match_layout(init[i], param, param.scalar_type());
      tuple[kMaskIdx] = match_layout(masks[i], param, at::kBool);
      cuda::add_to_group(groups, tuple, static_cast<int64_t>(i));
    }
  }
  for (const cuda::TensorGroup& group : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtypes[kParamIdx], "masked_reset_cuda", [&] {
      cuda::multi_tensor_apply<kResetDepth>(group.lists, group.list_index, ResetFunctor<scalar_t>());
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CUDA, m) { m.impl("masked_reset_", &masked_reset_cuda); }

}  // namespace jit_unlearn
