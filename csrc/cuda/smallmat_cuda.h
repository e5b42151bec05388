// Host interface of the CUDA kernels in smallmat_cuda.cu, free of CUDA and torch headers so that
// the torch glue (ops_cuda.cpp) compiles with any C++ compiler and the kernels with nvcc alone.
//
// Each launcher runs one op on a batch of contiguous row-major matrices on `stream` (a
// cudaStream_t passed as void*), one thread block per matrix in a grid-stride loop, with the
// float64 workspace `ws` of launch_plan(...).workspace_doubles entries. It neither allocates nor
// synchronizes; info[b] is written on the device. The return value is a cudaError_t (0 = success),
// cuda_error_string() names it.
#pragma once

#include <cstdint>

namespace stiefel_kernels {
namespace cuda {

enum class SmallmatOp { kInvSqrtSpd, kCholeskyUpperInverse, kSolve };

struct LaunchPlan {
  int64_t blocks;             // grid size (<= batch)
  int threads;                // block size
  int64_t workspace_doubles;  // float64 workspace for the whole grid
};

// n: right-hand sides of solve (ignored otherwise). batch >= 1, k >= 1.
LaunchPlan launch_plan(SmallmatOp op, int64_t batch, int64_t k, int64_t n);

template <typename T>
int launch_inv_sqrt_spd(const T* m, T* out, int32_t* info, int64_t batch, int k, double* ws,
                        const LaunchPlan& plan, void* stream);
template <typename T>
int launch_cholesky_upper_inverse(const T* m, T* out, int32_t* info, int64_t batch, int k,
                                  double* ws, const LaunchPlan& plan, void* stream);
template <typename T>
int launch_solve(const T* a, const T* b, T* out, int32_t* info, int64_t batch, int k, int n,
                 double* ws, const LaunchPlan& plan, void* stream);

const char* cuda_error_string(int err);

// Largest k (for solve: k and n) the CUDA kernels take; the r x r step needs k <= 512 (2r for
// exact Cayley at r = 256) and larger matrices are better served by torch.linalg.
constexpr int64_t kMaxK = 1024;

}  // namespace cuda
}  // namespace stiefel_kernels
