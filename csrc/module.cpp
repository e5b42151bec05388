// The Python extension module stiefel_kernels._C and the backend-independent part of the ops:
// their schemas and argument checks. Importing the module runs the static registrations of this
// file (schemas) and of the backend files (kernels), after which the ops are reachable as
// torch.ops.stiefel_kernels.<name>.
#include <pybind11/pybind11.h>

#include <c10/util/Exception.h>
#include <torch/library.h>

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

TORCH_LIBRARY(stiefel_kernels, m) {
  m.def("inv_sqrt_spd(Tensor m) -> (Tensor, Tensor)");
  m.def("cholesky_upper_inverse(Tensor m) -> (Tensor, Tensor)");
  m.def("solve(Tensor a, Tensor b) -> (Tensor, Tensor)");
}

#ifndef STIEFEL_WITH_CUDA
#define STIEFEL_WITH_CUDA 0
#endif

PYBIND11_MODULE(_C, mod) {
  mod.doc() =
      "stiefel_kernels._C: native batched small-matrix ops of the retraction's r x r step.\n\n"
      "Importing this module registers the operators\n"
      "  torch.ops.stiefel_kernels.inv_sqrt_spd(m) -> (M^(-1/2), info)\n"
      "  torch.ops.stiefel_kernels.cholesky_upper_inverse(m) -> (R^(-1), info), R^T R = M\n"
      "  torch.ops.stiefel_kernels.solve(a, b) -> (A^(-1) B, info)\n"
      "for float32/float64 batches (..., k, k), with CPU kernels (hand-written, computed in\n"
      "float64) and, when built with CUDA, CUDA kernels. info is int32 of the batch shape:\n"
      "0 = ok; >0 = factorization failed (see each op); -1 = non-finite input;\n"
      "-2 = no convergence. Entries whose info is nonzero are filled with NaN.";
  mod.attr("with_cuda") = pybind11::bool_(STIEFEL_WITH_CUDA != 0);
  mod.attr("ops") = pybind11::make_tuple("inv_sqrt_spd", "cholesky_upper_inverse", "solve");
}
