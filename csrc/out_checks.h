// The output-buffer check of the `_into` ops (stiefel_adamw_pass1_into in fused_step_cpu.cpp,
// cayley_fp_step_into in cayley_step_cpu.cpp): an output that shares memory with an input would
// be read after it is written, a silent wrong answer, so they refuse it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

namespace stiefel_kernels {

// Whether a and b may share memory: one storage and intersecting address spans (from the lowest
// to the highest byte each view can reach, so that interleaved views count as sharing).
// at::get_overlap_status answers "too hard" for any view that is not dense (pass 1's K, G, H are
// strided views of one buffer), which is why this one exists.
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  auto span = [](const at::Tensor& t) {
    int64_t lo = 0, hi = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t ext = (t.size(d) - 1) * t.stride(d);
      if (ext < 0) lo += ext;
      else hi += ext;
    }
    const int64_t item = static_cast<int64_t>(t.element_size());
    const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::make_pair(base + static_cast<uintptr_t>(lo * item),  // may wrap: compared below
                          base + static_cast<uintptr_t>((hi + 1) * item));
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

}  // namespace stiefel_kernels
