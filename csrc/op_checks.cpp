// Argument checks and argument preparation shared by every backend of the batched small-matrix ops (declared in
// smallmat.h): the CPU and CUDA kernels reject the same inputs with the same messages, and so do
// the default and fake kernels in stiefel_kernels/ops.py.
#include <ATen/ExpandUtils.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include "smallmat.h"

namespace stiefel_kernels {

void check_square_batch(const at::Tensor& m, const char* op) {
  TORCH_CHECK(m.dim() >= 2, "stiefel_kernels::", op,
              ": expected a (..., k, k) tensor with at least 2 dims, got shape ", m.sizes());
  TORCH_CHECK(m.size(-1) == m.size(-2), "stiefel_kernels::", op,
              ": expected square matrices in the last two dims, got shape ", m.sizes());
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble,
              "stiefel_kernels::", op, ": expected float32 or float64, got ", m.scalar_type());
}

void check_solve_args(const at::Tensor& a, const at::Tensor& b) {
  check_square_batch(a, "solve");
  TORCH_CHECK(b.dim() >= 2, "stiefel_kernels::solve: expected b of shape (..., k, m) with at least "
              "2 dims, got shape ", b.sizes());
  TORCH_CHECK(b.size(-2) == a.size(-1), "stiefel_kernels::solve: a is ", a.sizes(),
              " so b must have ", a.size(-1), " rows (dim -2), got shape ", b.sizes());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "stiefel_kernels::solve: a and b must have the "
              "same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "stiefel_kernels::solve: a and b must be on the same "
              "device, got ", a.device(), " and ", b.device());
}

SolveOperands broadcast_solve_operands(const at::Tensor& a, const at::Tensor& b) {
  const int64_t k = a.size(-1);
  const int64_t n = b.size(-1);
  std::vector<int64_t> batch_shape = at::infer_size(a.sizes().slice(0, a.dim() - 2),
                                                    b.sizes().slice(0, b.dim() - 2));
  std::vector<int64_t> a_shape(batch_shape), b_shape(batch_shape);
  a_shape.insert(a_shape.end(), {k, k});
  b_shape.insert(b_shape.end(), {k, n});
  const int64_t batch = c10::multiply_integers(batch_shape);
  return {a.expand(a_shape).contiguous(), b.expand(b_shape).contiguous(), std::move(batch_shape),
          batch};
}

}  // namespace stiefel_kernels
