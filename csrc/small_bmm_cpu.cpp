// CPU kernel of stiefel_kernels::small_bmm(a, b, add, alpha) -> add + alpha * (a @ b): the
// batched r x r products of the retraction's small step (stiefel_kernels/gram.py). Schema,
// default kernel (torch.baddbmm) and fake kernel: stiefel_kernels/ops.py.
//
// Why a kernel of our own: torch's CPU bmm goes to MKL, which on this project's AMD (Zen-5
// class, AVX-512) VM runs its AVX2 path: 95-114 GFLOP/s on one core where the core's AVX-512
// FMAs reach 266 (bench/results/cpu-small-bmm-2026-11-26.md). The torch formulation of the
// small step (gram.py: the other retractions' orthonormality correction, and cayley_fp where
// the native cayley_fp_step is not built) runs its r x r products through this op.
//
// One batch item per task of at::parallel_for; the product itself (packing, register tiles, the
// epilogue add + alpha * acc) is small_matmul.h's. Sums run over k in order, one FMA per term:
// the result does not depend on the thread count (one item is one task), but it is not MKL's
// rounding (tests compare with float64 math at the dtype's tolerance).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "small_matmul.h"

namespace stiefel_kernels {
namespace small_matmul {

// the out-of-line, per-ISA instances declared in small_matmul.h
SK_CLONES void matmul_f32(const Item<float>& it, std::vector<float>& scratch) { matmul(it, scratch); }
SK_CLONES void matmul_f64(const Item<double>& it, std::vector<double>& scratch) { matmul(it, scratch); }

}  // namespace small_matmul

namespace {

using small_matmul::Item;

template <typename S>
void run(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& add, double alpha,
         at::Tensor& out) {
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  const S* ap = a.data_ptr<S>();
  const S* bp = b.data_ptr<S>();
  const S* dp = add ? add->data_ptr<S>() : nullptr;
  S* op = out.data_ptr<S>();
  // one item per task; a few items per task where they are tiny
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, m * n * k / 64));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<S> scratch;
    for (int64_t t = begin; t < end; ++t) {
      Item<S> it{ap + t * a.stride(0), a.stride(1), a.stride(2),
                 bp + t * b.stride(0), b.stride(1), b.stride(2),
                 dp ? dp + t * add->stride(0) : nullptr, add ? add->stride(1) : 0,
                 add ? add->stride(2) : 0, op + t * m * n, m, k, n, static_cast<S>(alpha)};
      small_matmul::run(it, scratch);
    }
  });
}

at::Tensor small_bmm_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& add,
                         double alpha) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, "stiefel_kernels::small_bmm: expected 3-dim a (B, m, k) and b "
              "(B, k, n), got shapes ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(1), "stiefel_kernels::small_bmm: shapes ",
              a.sizes(), " and ", b.sizes(), " do not multiply");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              "stiefel_kernels::small_bmm: expected float32 or float64 operands of one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "stiefel_kernels::small_bmm: CPU tensors expected");
  if (add) {
    TORCH_CHECK(add->dim() == 3 && add->size(0) == a.size(0) && add->size(1) == a.size(1) &&
                    add->size(2) == b.size(2) && add->scalar_type() == a.scalar_type(),
                "stiefel_kernels::small_bmm: add must have shape (", a.size(0), ", ", a.size(1), ", ",
                b.size(2), ") and dtype ", a.scalar_type(), ", got ", add->sizes(), ", ", add->scalar_type());
    TORCH_CHECK(add->device().is_cpu(), "stiefel_kernels::small_bmm: CPU tensors expected");
  }
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  if (out.numel() == 0) return out;
  if (a.size(2) == 0) {  // empty sums
    if (add) return out.copy_(*add);
    return out.zero_();
  }
  if (a.scalar_type() == at::kFloat) {
    run<float>(a, b, add, alpha, out);
  } else {
    run<double>(a, b, add, alpha, out);
  }
  return out;
}

}  // namespace
}  // namespace stiefel_kernels

TORCH_LIBRARY_IMPL(stiefel_kernels, CPU, m) {
  m.impl("small_bmm", &stiefel_kernels::small_bmm_cpu);
}
