// Shared declarations of the batched small-matrix ops of stiefel_kernels.
//
// The schemas and the default (torch.linalg) kernels live in stiefel_kernels/ops.py; the CPU
// kernels (ops_cpu.cpp) override them at load with TORCH_LIBRARY_IMPL, the CUDA kernels
// (cuda/ops_cuda.cpp) on request (register_cuda_kernels). Every kernel validates its arguments
// with the checks below, so that all of them (and the fake kernels in ops.py) reject the same
// inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace stiefel_kernels {

// Argument checks (op_checks.cpp); TORCH_CHECK with a message naming the op.
void check_square_batch(const at::Tensor& m, const char* op);
void check_solve_args(const at::Tensor& a, const at::Tensor& b);

// solve's operands with their batch dims broadcast like torch.linalg.solve, made contiguous:
// a (batch_shape..., k, k), b (batch_shape..., k, n); batch = prod(batch_shape).
struct SolveOperands {
  at::Tensor a;
  at::Tensor b;
  std::vector<int64_t> batch_shape;
  int64_t batch;
};
SolveOperands broadcast_solve_operands(const at::Tensor& a, const at::Tensor& b);

// CPU kernels (ops_cpu.cpp).
std::tuple<at::Tensor, at::Tensor> inv_sqrt_spd_cpu(const at::Tensor& m);
std::tuple<at::Tensor, at::Tensor> cholesky_upper_inverse_cpu(const at::Tensor& m);
std::tuple<at::Tensor, at::Tensor> solve_cpu(const at::Tensor& a, const at::Tensor& b);

// Registers / removes the CUDA kernels (cuda/ops_cuda.cpp; only in a CUDA build). Idempotent.
void register_cuda_kernels();
void unregister_cuda_kernels();

// info codes shared by all ops (besides the op-specific positive codes).
constexpr int32_t kInfoNonFinite = -1;     // a NaN or Inf in the input
constexpr int32_t kInfoNoConvergence = -2; // iterative method hit its iteration cap

}  // namespace stiefel_kernels
