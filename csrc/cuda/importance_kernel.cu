// CUDA kernel of accumulate_importance_: one multi-tensor-apply launch per dtype group covers many tensors.
#include <vector>

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

// The tensor lists of one launch.
constexpr int kAccIdx = 0;
constexpr int kGradIdx = 1;
constexpr int kAccumulateDepth = 2;

// acc = acc + scale * term(grad) on one chunk: 4 elements per thread with vector accesses when both
// operands are 16-byte (4-element) aligned, element by element otherwise.  Each element is written by
// exactly one thread, as the host checks guarantee (no operand overlaps acc).
template <ImportanceMode kMode, typename acc_t, typename grad_t>
struct AccumulateFunctor {
  using opmath_t = at::opmath_type<acc_t>;

  __device__ static acc_t update(acc_t a, grad_t g, opmath_t scale) {
    return static_cast<acc_t>(accumulate_importance<kMode>(static_cast<opmath_t>(a), static_cast<opmath_t>(g), scale));
  }

  __device__ void operator()(const cuda::TensorListMetadata<kAccumulateDepth>& meta, opmath_t scale) const {
    const cuda::ChunkRange range = cuda::block_chunk(meta);
    acc_t* a = static_cast<acc_t*>(meta.addresses[kAccIdx][range.slot]) + range.start;
    const grad_t* g = static_cast<const grad_t*>(meta.addresses[kGradIdx][range.slot]) + range.start;
    int vector_end = 0;
    if (cuda::aligned4(a) && cuda::aligned4(g)) {
      vector_end = range.length / 4 * 4;
      for (int i = 4 * threadIdx.x; i < vector_end; i += 4 * blockDim.x) {
        cuda::Vec4<acc_t> av = cuda::load4(a + i);
        const cuda::Vec4<grad_t> gv = cuda::load4(g + i);
#pragma unroll
        for (int k = 0; k < 4; ++k) av.v[k] = update(av.v[k], gv.v[k], scale);
        cuda::store4(a + i, av);
      }
    }
    for (int i = vector_end + threadIdx.x; i < range.length; i += blockDim.x) {
      a[i] = update(a[i], g[i], scale);
    }
  }
};

// CUDA twin of accumulate_importance_cpu (csrc/cpu/importance_kernel.cpp): same update, same checks.
// Tensors are grouped by (acc dtype, grad dtype); each group is one multi-tensor-apply pass.
void accumulate_importance_cuda(at::TensorList acc, at::TensorList grads, c10::string_view importance_mode,
                                double scale) {
  const ImportanceMode mode = parse_importance_mode(importance_mode);
  check_accumulate_importance_args(acc, grads, scale, at::kCUDA);
  if (acc.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(acc[0].device());
  std::vector<cuda::TensorGroup> groups;
  for (size_t i = 0; i < acc.size(); ++i) {
    if (acc[i].numel() != 0) {
      std::vector<at::Tensor> tuple(kAccumulateDepth);
      tuple[kAccIdx] = acc[i];
      tuple[kGradIdx] = match_layout(grads[i], acc[i], grads[i].scalar_type());
      cuda::add_to_group(groups, tuple, static_cast<int64_t>(i));
    }
  }
  for (const cuda::TensorGroup& group : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtypes[kAccIdx], "accumulate_importance_cuda", [&] {
      using acc_t = scalar_t;
      const auto scale_ = static_cast<at::opmath_type<acc_t>>(scale);
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, group.dtypes[kGradIdx], "accumulate_importance_cuda", [&] {
            if (mode == ImportanceMode::kSquare) {
              cuda::multi_tensor_apply<kAccumulateDepth>(
                  group.lists, group.list_index, AccumulateFunctor<ImportanceMode::kSquare, acc_t, scalar_t>(), scale_);
            } else {
              cuda::multi_tensor_apply<kAccumulateDepth>(
                  group.lists, group.list_index, AccumulateFunctor<ImportanceMode::kAbs, acc_t, scalar_t>(), scale_);
            }
          });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CUDA, m) { m.impl("accumulate_importance_", &accumulate_importance_cuda); }

}  // namespace jit_unlearn
