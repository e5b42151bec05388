// The Python extension module stiefel_kernels._C and the schemas of its ops (the argument checks
// every backend shares are in op_checks.cpp). Importing the module runs the static registrations
// of this file (schemas) and of the backend files (kernels), after which the ops are reachable as
// torch.ops.stiefel_kernels.<name>.
#include <pybind11/pybind11.h>

#include <torch/library.h>

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
