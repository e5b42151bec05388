// Argument checks shared by every backend of the batched small-matrix ops (declared in
// smallmat.h): the CPU and CUDA kernels reject the same inputs with the same messages, and so do
// the fake kernels in stiefel_kernels/_fake_kernels.py.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace stiefel_kernels
