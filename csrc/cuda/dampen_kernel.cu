// CUDA kernel of ssd_dampen_ in two multi-tensor-apply passes per dtype group, as the CPU kernel:
//   pass 1 reads both importances once, flags any negative or NaN one (the lowest tuple index wins, by an
//          integer atomicMax on a device word) and stores the selection I_f > alpha * I_D as bits (a warp
//          ballot per 32 elements), with the selected counts block-reduced into counts[list_index];
//   pass 2 returns at once in every block if the flag is set; otherwise it dampens the selected elements,
//          reading theta and the importances only in groups of 4 that hold a selected element.
// All pass-1 launches precede all pass-2 launches on the stream, so nothing is written unless every
// importance of every tensor is valid.  Then one host read of the flag raises the error: a device-to-host
// copy that waits for the kernels (ssd_dampen_ runs once per unlearning, and its caller reads the counts
// anyway).  The counts' integer atomics give the same sums in every order.
#include <cstdint>
#include <vector>

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

// The tensor lists of each pass.
constexpr int kParamIdx = 0;
constexpr int kImpForgetIdx = 1;
constexpr int kImpFullIdx = 2;
constexpr int kBitsIdx = 3;
constexpr int kDampenDepth = 4;
constexpr int kSelectForgetIdx = 0;  // pass 1 does not read params
constexpr int kSelectFullIdx = 1;
constexpr int kSelectBitsIdx = 2;
constexpr int kSelectDepth = 3;

// A warp covers 128 consecutive elements, 4 per lane: element 4 l + k of the group is bit l of word k of
// the group's 4 words.  kChunkSize is a multiple of 128, so a chunk's words start at chunk start / 32.
constexpr int kGroup = 128;
constexpr int kWarps = cuda::kBlockThreads / 32;
static_assert(cuda::kChunkSize % kGroup == 0, "chunks hold whole groups");
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// The error word: 0 when every importance is valid, else kErrorBase - (2 i + which) for the lowest tuple
// index i with an invalid importance (which = 0 for imp_forget, 1 for imp_full).
constexpr unsigned long long kErrorBase = 1ull << 62;

__device__ __forceinline__ void flag_invalid(unsigned long long* error, int64_t list_index, int which) {
  atomicMax(error, kErrorBase - static_cast<unsigned long long>(2 * list_index + which));
}

// The 4 values at i .. i + 3 (those below `length`), with one vector load when `vector`.
template <typename T>
__device__ __forceinline__ cuda::Vec4<T> load_group(const T* p, int i, int length, bool vector) {
  if (vector && i + 3 < length) {
    return cuda::load4(p + i);
  }
  cuda::Vec4<T> out;
#pragma unroll
  for (int k = 0; k < 4; ++k) out.v[k] = i + k < length ? p[i + k] : T(0);
  return out;
}

template <typename param_t, typename imp_t>
struct SelectFunctor {
  using opmath_t = at::opmath_type<param_t>;

  __device__ void operator()(const cuda::TensorListMetadata<kSelectDepth>& meta, opmath_t alpha, int64_t* counts,
                             unsigned long long* error) const {
    const cuda::ChunkRange range = cuda::block_chunk(meta);
    const imp_t* f = static_cast<const imp_t*>(meta.addresses[kSelectForgetIdx][range.slot]) + range.start;
    const imp_t* d = static_cast<const imp_t*>(meta.addresses[kSelectFullIdx][range.slot]) + range.start;
    uint32_t* bits = static_cast<uint32_t*>(meta.addresses[kSelectBitsIdx][range.slot]) + range.start / 32;
    const bool vector = cuda::aligned4(f) && cuda::aligned4(d);
    const int lane = threadIdx.x % 32;
    bool bad_forget = false, bad_full = false;
    int count = 0;
    // The loop bound is the same for the 32 lanes of a warp, so every lane reaches the ballots.
    for (int group = (threadIdx.x / 32) * kGroup; group < range.length; group += kWarps * kGroup) {
      const int i = group + 4 * lane;
      const cuda::Vec4<imp_t> fv = load_group(f, i, range.length, vector);
      const cuda::Vec4<imp_t> dv = load_group(d, i, range.length, vector);
      uint32_t my_word = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const auto fk = static_cast<opmath_t>(fv.v[k]);
        const auto dk = static_cast<opmath_t>(dv.v[k]);
        bad_forget |= !ssd_importance_valid(fk);  // padding lanes hold 0: valid
        bad_full |= !ssd_importance_valid(dk);
        const uint32_t word = __ballot_sync(kFullMask, i + k < range.length && ssd_selected(fk, dk, alpha));
        my_word = lane == k ? word : my_word;
        count += lane == 0 ? __popc(word) : 0;
      }
      if (lane < 4) {
        bits[group / 32 + lane] = my_word;
      }
    }
    const bool any_forget = __syncthreads_or(bad_forget) != 0;
    const bool any_full = __syncthreads_or(bad_full) != 0;
    count = cuda::block_reduce_sum(count);
    if (threadIdx.x == 0) {
      const int64_t list_index = meta.list_index[range.slot];
      if (any_forget || any_full) {
        flag_invalid(error, list_index, any_forget ? 0 : 1);
      }
      if (count > 0) {
        atomicAdd(reinterpret_cast<unsigned long long*>(counts + list_index), static_cast<unsigned long long>(count));
      }
    }
  }
};

template <bool kApplyExponent, typename param_t, typename imp_t>
struct DampenFunctor {
  using opmath_t = at::opmath_type<param_t>;

  __device__ void operator()(const cuda::TensorListMetadata<kDampenDepth>& meta, opmath_t lam, opmath_t exponent,
                             const unsigned long long* error) const {
    if (*error != 0) {
      return;  // an invalid importance somewhere: write nothing (the host raises)
    }
    const cuda::ChunkRange range = cuda::block_chunk(meta);
    param_t* theta = static_cast<param_t*>(meta.addresses[kParamIdx][range.slot]) + range.start;
    const imp_t* f = static_cast<const imp_t*>(meta.addresses[kImpForgetIdx][range.slot]) + range.start;
    const imp_t* d = static_cast<const imp_t*>(meta.addresses[kImpFullIdx][range.slot]) + range.start;
    const uint32_t* bits = static_cast<const uint32_t*>(meta.addresses[kBitsIdx][range.slot]) + range.start / 32;
    const bool vector = cuda::aligned4(theta) && cuda::aligned4(f) && cuda::aligned4(d);
    const int lane = threadIdx.x % 32;
    for (int group = (threadIdx.x / 32) * kGroup; group < range.length; group += kWarps * kGroup) {
      const int i = group + 4 * lane;
      bool selected[4];
      bool any = false;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        selected[k] = (bits[group / 32 + k] >> lane) & 1u;  // one word for the whole warp: a broadcast
        any |= selected[k];
      }
      if (!any) {
        continue;
      }
      if (vector && i + 3 < range.length) {
        // Unselected lanes are stored back with the bits they were loaded with.
        cuda::Vec4<param_t> tv = cuda::load4(theta + i);
        const cuda::Vec4<imp_t> fv = cuda::load4(f + i);
        const cuda::Vec4<imp_t> dv = cuda::load4(d + i);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (selected[k]) {
            tv.v[k] = static_cast<param_t>(ssd_dampened<kApplyExponent>(static_cast<opmath_t>(tv.v[k]),
                                                                        static_cast<opmath_t>(fv.v[k]),
                                                                        static_cast<opmath_t>(dv.v[k]), lam, exponent));
          }
        }
        cuda::store4(theta + i, tv);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (selected[k]) {  // set only for elements below range.length
            theta[i + k] = static_cast<param_t>(
                ssd_dampened<kApplyExponent>(static_cast<opmath_t>(theta[i + k]), static_cast<opmath_t>(f[i + k]),
                                             static_cast<opmath_t>(d[i + k]), lam, exponent));
          }
        }
      }
    }
  }
};

// CUDA twin of ssd_dampen_cpu (csrc/cpu/dampen_kernel.cpp): same rule, same checks, same errors.  Tensors
// are grouped by (param dtype, importance dtype); each group is one multi-tensor-apply launch per pass.
at::Tensor ssd_dampen_cuda(at::TensorList params, at::TensorList imp_forget, at::TensorList imp_full, double alpha,
                           double lam, double exponent) {
  check_ssd_dampen_args(params, imp_forget, imp_full, alpha, lam, exponent, at::kCUDA);
  if (params.empty()) {
    return at::zeros({0}, at::dtype(at::kLong));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto options = params[0].options();
  at::Tensor counts = at::zeros({static_cast<int64_t>(params.size())}, options.dtype(at::kLong));
  at::Tensor error = at::zeros({1}, options.dtype(at::kLong));

  // Selection bits: 4 words per group of 128 elements, one buffer cut into per-tensor views.
  std::vector<int64_t> first_word(params.size(), 0);
  int64_t words = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    first_word[i] = words;
    words += (params[i].numel() + kGroup - 1) / kGroup * 4;
  }
  const at::Tensor bits = at::empty({words}, options.dtype(at::kInt));

  std::vector<cuda::TensorGroup> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) {
      continue;
    }
    const at::ScalarType imp_dtype = ssd_importance_dtype(params[i], imp_forget[i], imp_full[i]);
    std::vector<at::Tensor> tuple(kDampenDepth);
    tuple[kParamIdx] = params[i];
    tuple[kImpForgetIdx] = match_layout(imp_forget[i], params[i], imp_dtype);
    tuple[kImpFullIdx] = match_layout(imp_full[i], params[i], imp_dtype);
    tuple[kBitsIdx] = bits.narrow(0, first_word[i], (numel + kGroup - 1) / kGroup * 4);
    cuda::add_to_group(groups, tuple, static_cast<int64_t>(i));
  }
  int64_t* counts_ptr = counts.data_ptr<int64_t>();
  auto* error_ptr = reinterpret_cast<unsigned long long*>(error.data_ptr<int64_t>());
  const auto dispatch = [&](const cuda::TensorGroup& group, const auto& fn) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtypes[kParamIdx], "ssd_dampen_cuda", [&] {
      using param_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtypes[kImpForgetIdx], "ssd_dampen_cuda",
                                      [&] { fn.template operator()<param_t, scalar_t>(); });
    });
  };
  for (const cuda::TensorGroup& group : groups) {
    const std::vector<std::vector<at::Tensor>> select_lists{group.lists[kImpForgetIdx], group.lists[kImpFullIdx],
                                                            group.lists[kBitsIdx]};
    dispatch(group, [&]<typename param_t, typename imp_t>() {
      cuda::multi_tensor_apply<kSelectDepth>(select_lists, group.list_index, SelectFunctor<param_t, imp_t>(),
                                             static_cast<at::opmath_type<param_t>>(alpha), counts_ptr, error_ptr);
    });
  }
  const bool apply_exponent = exponent != 1.0;
  for (const cuda::TensorGroup& group : groups) {
    dispatch(group, [&]<typename param_t, typename imp_t>() {
      using opmath_t = at::opmath_type<param_t>;
      const auto lam_ = static_cast<opmath_t>(lam);
      const auto exponent_ = static_cast<opmath_t>(exponent);
      if (apply_exponent) {
        cuda::multi_tensor_apply<kDampenDepth>(group.lists, group.list_index, DampenFunctor<true, param_t, imp_t>(),
                                               lam_, exponent_, static_cast<const unsigned long long*>(error_ptr));
      } else {
        cuda::multi_tensor_apply<kDampenDepth>(group.lists, group.list_index, DampenFunctor<false, param_t, imp_t>(),
                                               lam_, exponent_, static_cast<const unsigned long long*>(error_ptr));
      }
    });
  }
  const int64_t code = groups.empty() ? 0 : error.item<int64_t>();  // the one host sync
  if (code != 0) {
    const auto which = static_cast<int64_t>(kErrorBase) - code;
    TORCH_CHECK_VALUE(false, "ssd_dampen_: ", which % 2 == 0 ? "imp_forget[" : "imp_full[", which / 2,
                      "]" JIT_UNLEARN_SSD_INVALID_IMPORTANCE);
  }
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CUDA, m) { m.impl("ssd_dampen_", &ssd_dampen_cuda); }

}  // namespace jit_unlearn
