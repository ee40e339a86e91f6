// Host-side operand checks shared by every op and both backends: the supported dtypes, element
// alignment, and memory overlap between what an op writes and what it reads.  jit_unlearn/ops.py
// applies the same rules (and gives the same messages) on the pure-PyTorch tier.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

namespace jit_unlearn {

// The four floating dtypes the kernels compute in.  at::isFloatingType also admits the Float8 and
// Float4 types, which no kernel dispatches: such a tensor must fail the checks, not the dispatch.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// "name" or "name[index]" (index < 0: a single tensor).
inline std::string operand_name(const char* name, int64_t index) {
  return index < 0 ? std::string(name) : c10::str(name, "[", index, "]");
}

inline void check_supported_float(const at::Tensor& t, const char* name, int64_t index) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), operand_name(name, index),
                   ": expected float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// The data pointer is a multiple of the element size.  Tensors made by torch always are; a tensor over
// foreign memory (torch.frombuffer with an odd offset) may not be, and no kernel, scalar or vector, may
// access such memory element by element (a CUDA load faults).  Read operands that are not get an
// aligned copy (contiguous_aligned, match_layout); written ones are rejected (check_aligned_output).
inline bool element_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % t.element_size() == 0;
}

inline void check_aligned_output(const at::Tensor& t, const char* name, int64_t index) {
  TORCH_CHECK_VALUE(t.numel() == 0 || element_aligned(t), operand_name(name, index), ": its data pointer ",
                    t.const_data_ptr(), " is not a multiple of its element size (", t.element_size(),
                    " bytes); a tensor the op writes must be element-aligned");
}

// `t` itself when it is contiguous and element-aligned (the usual case), else an aligned contiguous copy.
inline at::Tensor contiguous_aligned(const at::Tensor& t) {
  if (t.is_contiguous() && (t.numel() == 0 || element_aligned(t))) {
    return t;
  }
  return at::empty(t.sizes(), t.options()).copy_(t);
}

// A written operand must not hold one memory location in several elements (an expanded tensor).
inline void check_no_internal_overlap(const at::Tensor& t, const char* name, int64_t index) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, operand_name(name, index),
                    ": has internal overlap (several elements share memory, e.g. an expanded tensor); "
                    "an operand the op writes must not");
}

// The operands of one call, each marked written or read.  check() rejects any pair that shares memory
// when at least one of the two is written: the kernels read every operand while writing others, and
// CUDA blocks run in no fixed order, so an overlap would make the result depend on the schedule.
//
// "Shares memory" is decided on byte extents: [first byte, one past the last byte) of each non-empty
// operand.  For dense tensors (every written operand is dense) that is exactly their memory; a strided
// read operand is taken as its whole hull, so a view interleaved with a written tensor without sharing
// an element is still refused.  at::get_overlap_status words the error (the same memory, or a partial
// overlap).  Sorting by first byte makes the check O(T log T) for T operands.
class OverlapCheck {
 public:
  void add(const at::Tensor& t, const char* name, int64_t index, bool written) {
    if (t.numel() == 0) {
      return;
    }
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    int64_t last = 0;  // element offset of the last element (torch strides are >= 0)
    for (int64_t d = 0; d < t.dim(); ++d) {
      last += (t.size(d) - 1) * t.stride(d);
    }
    const uintptr_t end = begin + static_cast<uintptr_t>((last + 1) * t.element_size());
    entries_.push_back({begin, end, &t, name, index, written, entries_.size()});
  }

  void add(at::TensorList list, const char* name, bool written) {
    for (size_t i = 0; i < list.size(); ++i) {
      add(list[i], name, static_cast<int64_t>(i), written);
    }
  }

  // Throws ValueError naming the first overlapping pair (in order of first byte, then of addition).
  void check(const char* op) const {
    std::vector<const Entry*> sorted;
    sorted.reserve(entries_.size());
    for (const Entry& e : entries_) {
      sorted.push_back(&e);
    }
    std::sort(sorted.begin(), sorted.end(), [](const Entry* a, const Entry* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->order < b->order;
    });
    std::vector<const Entry*> active;  // entries that reach past the current first byte
    for (const Entry* s : sorted) {
      active.erase(std::remove_if(active.begin(), active.end(), [&](const Entry* a) { return a->end <= s->begin; }),
                   active.end());
      for (const Entry* a : active) {
        if (a->written || s->written) {
          const Entry* first = a->order < s->order ? a : s;
          const Entry* second = a->order < s->order ? s : a;
          const bool same = at::get_overlap_status(*first->tensor, *second->tensor) == at::MemOverlapStatus::Full;
          TORCH_CHECK_VALUE(false, op, ": ", operand_name(first->name, first->index), " and ",
                            operand_name(second->name, second->index), same ? " are the same memory" : " share memory",
                            "; an operand the op writes must not overlap any other operand of the call");
        }
      }
      active.push_back(s);
    }
  }

 private:
  struct Entry {
    uintptr_t begin, end;
    const at::Tensor* tensor;
    const char* name;
    int64_t index;
    bool written;
    size_t order;
  };
  std::vector<Entry> entries_;
};

}  // namespace jit_unlearn
