// CUDA kernel of ssd_dampen_: one multi-tensor-apply launch per dtype group covers many tensors; per-tensor
// selected counts are block-reduced and added atomically into an int64 [T] device tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/dampen_utils.h"
#include "common/tensor_list_args.h"
#include "cuda/multi_tensor_apply.cuh"

namespace jit_unlearn {
namespace {

template <bool kApplyExponent, typename param_t, typename imp_t>
struct DampenFunctor {
  using opmath_t = at::opmath_type<param_t>;

  __device__ void operator()(const cuda::TensorListMetadata<3>& meta, opmath_t alpha, opmath_t lam, opmath_t exponent,
                             int64_t* counts) const {
    const cuda::ChunkRange range = cuda::block_chunk(meta);
    param_t* theta = static_cast<param_t*>(meta.addresses[0][range.slot]) + range.start;
    const imp_t* f = static_cast<const imp_t*>(meta.addresses[1][range.slot]) + range.start;
    const imp_t* d = static_cast<const imp_t*>(meta.addresses[2][range.slot]) + range.start;
    int count = 0;
    for (int i = threadIdx.x; i < range.length; i += blockDim.x) {
      const opmath_t fi = static_cast<opmath_t>(f[i]);
      const opmath_t di = static_cast<opmath_t>(d[i]);
      if (ssd_selected(fi, di, alpha)) {
        theta[i] = static_cast<param_t>(
            ssd_dampened<kApplyExponent>(static_cast<opmath_t>(theta[i]), fi, di, lam, exponent));
        ++count;
      }
    }
    count = cuda::block_reduce_sum(count);
    if (threadIdx.x == 0 && count > 0) {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + meta.list_index[range.slot]),
                static_cast<unsigned long long>(count));
    }
  }
};

}  // namespace

// CUDA twin of ssd_dampen_cpu (csrc/cpu/dampen_kernel.cpp): same rule, same checks.  Tensors are grouped
// by (param dtype, importance dtype); each group is one multi-tensor-apply pass.
at::Tensor ssd_dampen_cuda(at::TensorList params, at::TensorList imp_forget, at::TensorList imp_full, double alpha,
                           double lam, double exponent) {
  check_ssd_dampen_args(params, imp_forget, imp_full, alpha, lam, exponent, at::kCUDA);
  if (params.empty()) {
    return at::zeros({0}, at::dtype(at::kLong));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor counts = at::zeros({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kLong));
  std::vector<cuda::TensorGroup> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) {
      continue;
    }
    const at::ScalarType imp_dtype = ssd_importance_dtype(params[i], imp_forget[i], imp_full[i]);
    cuda::add_to_group(groups,
                       {params[i], match_layout(imp_forget[i], params[i], imp_dtype),
                        match_layout(imp_full[i], params[i], imp_dtype)},
                       static_cast<int64_t>(i));
  }
  const bool apply_exponent = exponent != 1.0;
  for (const cuda::TensorGroup& group : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtypes[0], "ssd_dampen_cuda", [&] {
      using param_t = scalar_t;
      using opmath_t = at::opmath_type<param_t>;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtypes[1], "ssd_dampen_cuda", [&] {
        const auto alpha_ = static_cast<opmath_t>(alpha);
        const auto lam_ = static_cast<opmath_t>(lam);
        const auto exponent_ = static_cast<opmath_t>(exponent);
        int64_t* counts_ptr = counts.data_ptr<int64_t>();
        if (apply_exponent) {
          cuda::multi_tensor_apply<3>(group.lists, group.list_index, DampenFunctor<true, param_t, scalar_t>(),
                                      alpha_, lam_, exponent_, counts_ptr);
        } else {
          cuda::multi_tensor_apply<3>(group.lists, group.list_index, DampenFunctor<false, param_t, scalar_t>(),
                                      alpha_, lam_, exponent_, counts_ptr);
        }
      });
    });
  }
  return counts;
}

TORCH_LIBRARY_IMPL(jit_unlearn, CUDA, m) {
  m.impl("ssd_dampen_", &ssd_dampen_cuda);
}

}  // namespace jit_unlearn
