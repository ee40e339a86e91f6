// Multi-tensor apply: one kernel launch walks fixed-size chunks of many tensors; the tensor addresses and
// the block -> (tensor, chunk) map travel by value as a kernel argument.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/vec_utils.cuh"

namespace jit_unlearn::cuda {

constexpr int kChunkSize = 65536;  // elements per block
constexpr int kBlockThreads = 512;
constexpr int kMaxBlocksPerLaunch = 320;

// The kernel-parameter space this library targets: the classic 4 KiB that every CUDA version and
// architecture accepts (CUDA 12.1+ allows 32 KiB on Volta and newer; not relied on).  A launch passes
// the metadata, the functor and the functor's arguments by value; multi_tensor_apply static_asserts their
// total for every instantiation, and kArgsReserve bytes of the 4 KiB are kept for functor and arguments.
constexpr size_t kKernelParamLimit = 4096;
constexpr size_t kArgsReserve = 128;
// block_to_tensor and block_to_chunk.
constexpr size_t kMetadataBlockBytes = kMaxBlocksPerLaunch * (sizeof(unsigned char) + sizeof(int));

// Tensors per launch for a list depth (number of tensor lists walked together): each tensor costs an
// address per list, its numel and its list_index.
constexpr int max_tensors_for_depth(int depth) {
  return static_cast<int>((kKernelParamLimit - kArgsReserve - kMetadataBlockBytes) /
                          (depth * sizeof(void*) + 2 * sizeof(int64_t)));
}

template <int kDepth>
struct TensorListMetadata {
  static constexpr int kMaxTensors = max_tensors_for_depth(kDepth);
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t list_index[kMaxTensors];  // position of the tensor in the caller's list (for per-tensor outputs)
  unsigned char block_to_tensor[kMaxBlocksPerLaunch];
  int block_to_chunk[kMaxBlocksPerLaunch];
};

template <int kDepth>
constexpr bool metadata_fits = sizeof(TensorListMetadata<kDepth>) + kArgsReserve <= kKernelParamLimit &&
                               TensorListMetadata<kDepth>::kMaxTensors >= 1 &&
                               TensorListMetadata<kDepth>::kMaxTensors <= 255;  // slots are unsigned char
static_assert(metadata_fits<1> && metadata_fits<2> && metadata_fits<3> && metadata_fits<4> && metadata_fits<5>,
              "tensor-list metadata of every depth must leave kArgsReserve bytes of the 4 KiB kernel-parameter space");

// Bytes of kernel parameters of types Ts, laid out in order with their alignments (as the CUDA ABI does).
template <typename... Ts>
constexpr size_t kernel_param_bytes() {
  size_t bytes = 0;
  ((bytes = (bytes + alignof(Ts) - 1) / alignof(Ts) * alignof(Ts) + sizeof(Ts)), ...);
  return bytes;
}

// Where one block works: slot of its tensor in the metadata, first element of its chunk, and the chunk length.
struct ChunkRange {
  int slot;
  int64_t start;
  int length;
};

template <int kDepth>
__device__ __forceinline__ ChunkRange block_chunk(const TensorListMetadata<kDepth>& meta) {
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t remaining = meta.numel[slot] - start;
  return {slot, start, static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize)};
}

// Sum of `value` over the block (kBlockThreads threads); the result is valid in thread 0.
__device__ __forceinline__ int block_reduce_sum(int value) {
  __shared__ int warp_sums[kBlockThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  value = 0;
  if (warp == 0) {
    value = lane < kBlockThreads / 32 ? warp_sums[lane] : 0;
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

template <typename Metadata, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_apply_kernel(const Metadata meta, Functor functor, Args... args) {
  functor(meta, args...);
}

// Runs `functor(meta, args...)` on one block per chunk of every tensor.  lists[k][t] is tensor t of list k;
// all tensors are on the current CUDA device, dense, with the same element order within a tuple t, and
// have one dtype per list.  list_index[t] is tuple t's position in the caller's list.  A new launch starts
// only when the metadata is full (kMaxTensors tensors or kMaxBlocksPerLaunch chunks).
template <int kDepth, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, const std::vector<int64_t>& list_index,
                        Functor functor, Args... args) {
  using Metadata = TensorListMetadata<kDepth>;
  static_assert(kernel_param_bytes<Functor, Args...>() <= kArgsReserve,
                "functor and arguments must fit in the reserve next to the metadata");
  static_assert(kernel_param_bytes<Metadata, Functor, Args...>() <= kKernelParamLimit,
                "metadata, functor and arguments must fit in the 4 KiB kernel-parameter space");
  TORCH_INTERNAL_ASSERT(lists.size() == kDepth);
  const size_t num_tensors = list_index.size();
  for (size_t t = 0; t < num_tensors; ++t) {  // before the first launch: no partial writes
    const int64_t numel = lists[0][t].numel();
    TORCH_CHECK((numel + kChunkSize - 1) / kChunkSize <= std::numeric_limits<int>::max(),
                "multi_tensor_apply: tensor too large (", numel, " elements)");
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Metadata meta{};
  int tensors_in_meta = 0;
  int blocks_in_meta = 0;
  for (size_t t = 0; t < num_tensors; ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) {
      continue;
    }
    int slot = tensors_in_meta++;
    for (int k = 0; k < kDepth; ++k) {
      meta.addresses[k][slot] = lists[k][t].data_ptr();
    }
    meta.numel[slot] = numel;
    meta.list_index[slot] = list_index[t];
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      meta.block_to_tensor[blocks_in_meta] = static_cast<unsigned char>(slot);
      meta.block_to_chunk[blocks_in_meta] = static_cast<int>(chunk);
      ++blocks_in_meta;
      const bool last_chunk = chunk == chunks - 1;
      const bool blocks_full = blocks_in_meta == kMaxBlocksPerLaunch;
      const bool tensors_full = tensors_in_meta == Metadata::kMaxTensors && last_chunk;
      if (!blocks_full && !tensors_full) {
        continue;
      }
      multi_tensor_apply_kernel<<<blocks_in_meta, kBlockThreads, 0, stream>>>(meta, functor, args...);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      blocks_in_meta = 0;
      if (last_chunk) {
        tensors_in_meta = 0;
      } else {
        // The current tensor continues in the next launch, as its slot 0.
        for (int k = 0; k < kDepth; ++k) {
          meta.addresses[k][0] = meta.addresses[k][slot];
        }
        meta.numel[0] = meta.numel[slot];
        meta.list_index[0] = meta.list_index[slot];
        slot = 0;
        tensors_in_meta = 1;
      }
    }
  }
  if (blocks_in_meta > 0) {
    multi_tensor_apply_kernel<<<blocks_in_meta, kBlockThreads, 0, stream>>>(meta, functor, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// One group of tensor tuples that share their dtypes, as multi_tensor_apply takes them.
struct TensorGroup {
  std::vector<at::ScalarType> dtypes;          // dtype of each list within the group
  std::vector<std::vector<at::Tensor>> lists;  // lists[k][t]
  std::vector<int64_t> list_index;             // position of tuple t in the caller's lists
};

// Adds tuple `tensors` (one tensor per list, caller position `index`) to the group of its dtypes.
inline void add_to_group(std::vector<TensorGroup>& groups, const std::vector<at::Tensor>& tensors, int64_t index) {
  std::vector<at::ScalarType> dtypes;
  for (const at::Tensor& t : tensors) {
    dtypes.push_back(t.scalar_type());
  }
  TensorGroup* group = nullptr;
  for (TensorGroup& g : groups) {
    if (g.dtypes == dtypes) {
      group = &g;
      break;
    }
  }
  if (group == nullptr) {
    groups.push_back({dtypes, std::vector<std::vector<at::Tensor>>(tensors.size()), {}});
    group = &groups.back();
  }
  for (size_t k = 0; k < tensors.size(); ++k) {
    group->lists[k].push_back(tensors[k]);
  }
  group->list_index.push_back(index);
}

}  // namespace jit_unlearn::cuda
