// The Python extension module stiefel_kernels._C. Importing it runs the static registration of
// the CPU kernels (ops_cpu.cpp; fused_step_cpu.cpp, small_bmm_cpu.cpp and cayley_step_cpu.cpp
// for the CPU-only ops) for the ops whose schemas and default kernels
// stiefel_kernels/ops.py defines (imported first, by stiefel_kernels._native); the CUDA kernels
// are registered by enable_cuda_kernels(). The argument checks every kernel shares are in
// op_checks.cpp.
#include <pybind11/pybind11.h>

#include <torch/library.h>

#include <stdexcept>

#include "smallmat.h"

#ifndef STIEFEL_WITH_CUDA
#define STIEFEL_WITH_CUDA 0
#endif

PYBIND11_MODULE(_C, mod) {
  mod.doc() =
      "stiefel_kernels._C: native batched small-matrix ops of the retraction's r x r step.\n\n"
      "Importing this module registers CPU kernels of the operators\n"
      "  torch.ops.stiefel_kernels.inv_sqrt_spd(m) -> (M^(-1/2), info)\n"
      "  torch.ops.stiefel_kernels.cholesky_upper_inverse(m) -> (R^(-1), info), R^T R = M\n"
      "  torch.ops.stiefel_kernels.solve(a, b) -> (A^(-1) B, info)\n"
      "(schemas and default kernels: stiefel_kernels/ops.py) for float32/float64 batches\n"
      "(..., k, k): hand-written, computed in float64; when built with CUDA,\n"
      "enable_cuda_kernels() adds the CUDA kernels. info is int32 of the batch shape:\n"
      "0 = ok; >0 = factorization failed (see each op); -1 = non-finite input;\n"
      "-2 = no convergence. Entries whose info is nonzero are filled with NaN.\n\n"
      "CPU kernels only (no CUDA kernel; the default kernels of ops.py run elsewhere):\n"
      "  torch.ops.stiefel_kernels.small_bmm(a, b, add, alpha) -> add + alpha * (a @ b)\n"
      "  torch.ops.stiefel_kernels.cayley_fp_step(k, g, h, lr, iters, tol) -> (C, E)\n"
      "  torch.ops.stiefel_kernels.stiefel_adamw_pass1 / stiefel_adamw_pass2 (the fused passes)";
  mod.attr("with_cuda") = pybind11::bool_(STIEFEL_WITH_CUDA != 0);
  mod.def(
      "enable_cuda_kernels",
      []() {
#if STIEFEL_WITH_CUDA
        stiefel_kernels::register_cuda_kernels();
#else
        throw std::runtime_error(
            "stiefel_kernels._C was built without CUDA: there are no CUDA kernels to enable");
#endif
      },
      "Register the CUDA kernels of the ops (they then override the default torch.linalg "
      "kernels on CUDA tensors). Idempotent.");
  mod.def(
      "disable_cuda_kernels",
      []() {
#if STIEFEL_WITH_CUDA
        stiefel_kernels::unregister_cuda_kernels();
#endif
      },
      "Remove the CUDA kernels registered by enable_cuda_kernels (no-op otherwise).");
  mod.attr("ops") = pybind11::make_tuple("inv_sqrt_spd", "cholesky_upper_inverse", "solve");
}
