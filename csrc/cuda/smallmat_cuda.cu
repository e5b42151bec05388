// CUDA kernels of the batched small-matrix ops: one thread block per matrix, the block-cooperative
// arithmetic of smallmat_block.cuh (shared with the CPU emulation test), a grid-stride loop over
// the batch so that the workspace stays bounded.
//
// Needs only the CUDA runtime (no torch, no cuSOLVER): CI compiles this file with nvcc on
// machines whose torch is CPU-only (tests/test_cuda_build.py), and a CUDA build of torch links it
// into stiefel_kernels._C through ops_cuda.cpp.
//
// Nothing here allocates, synchronizes or reads device memory on the host: each matrix's status
// goes to info[b] on the device, so the op is CUDA-graph capturable and never stalls the stream.
//
// Launch configuration (launch_plan): NOT yet tuned on a GPU (this project's GPU measurement of
// issue 5 is pending); the block size grows with the k^2 work of one barrier phase.
#include <cuda_runtime.h>

#include <algorithm>

#include "smallmat_block.cuh"
#include "smallmat_cuda.h"

namespace stiefel_kernels {
namespace cuda {
namespace {

struct CudaBlock {
  __device__ int tid() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
};

// Block-shared reduction scratch: blockDim.x doubles, then blockDim.x ints.
__host__ __device__ constexpr size_t shared_bytes(int threads) {
  return static_cast<size_t>(threads) * (sizeof(double) + sizeof(int));
}

template <typename T>
__global__ void inv_sqrt_spd_kernel(const T* m, T* out, int32_t* info, int64_t batch, int k,
                                    double* ws, int64_t ws_per_block) {
  extern __shared__ double smem[];
  block::inv_sqrt_spd_batch(CudaBlock{}, m, out, info, batch, k, blockIdx.x, gridDim.x,
                            ws + blockIdx.x * ws_per_block, smem);
}

template <typename T>
__global__ void cholesky_upper_inverse_kernel(const T* m, T* out, int32_t* info, int64_t batch,
                                              int k, double* ws, int64_t ws_per_block) {
  extern __shared__ double smem[];
  block::cholesky_upper_inverse_batch(CudaBlock{}, m, out, info, batch, k, blockIdx.x, gridDim.x,
                                      ws + blockIdx.x * ws_per_block, smem);
}

template <typename T>
__global__ void solve_kernel(const T* a, const T* b, T* out, int32_t* info, int64_t batch, int k,
                             int n, double* ws, int64_t ws_per_block) {
  extern __shared__ double smem[];
  int* redi = reinterpret_cast<int*>(smem + blockDim.x);
  block::solve_batch(CudaBlock{}, a, b, out, info, batch, k, n, blockIdx.x, gridDim.x,
                     ws + blockIdx.x * ws_per_block, smem, redi);
}

// The grid's workspace stays under this many bytes; beyond it blocks take several matrices each.
constexpr int64_t kWorkspaceBudgetBytes = int64_t{256} << 20;

int64_t workspace_per_block(SmallmatOp op, int64_t k, int64_t n) {
  switch (op) {
    case SmallmatOp::kInvSqrtSpd:
      return block::inv_sqrt_spd_workspace_doubles(static_cast<int>(k));
    case SmallmatOp::kCholeskyUpperInverse:
      return block::cholesky_upper_inverse_workspace_doubles(static_cast<int>(k));
    case SmallmatOp::kSolve:
      return block::solve_workspace_doubles(static_cast<int>(k), static_cast<int>(n));
  }
  return 0;
}

int threads_for(int64_t k) {
  int t = 32;
  while (t < 256 && int64_t{t} * 8 < k * k) t <<= 1;
  return t;
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace

LaunchPlan launch_plan(SmallmatOp op, int64_t batch, int64_t k, int64_t n) {
  const int64_t per = std::max<int64_t>(1, workspace_per_block(op, k, n));
  const int64_t fit = std::max<int64_t>(1, kWorkspaceBudgetBytes / (per * int64_t{sizeof(double)}));
  const int64_t blocks = std::max<int64_t>(1, std::min(batch, fit));
  return LaunchPlan{blocks, threads_for(k), blocks * per};
}

template <typename T>
int launch_inv_sqrt_spd(const T* m, T* out, int32_t* info, int64_t batch, int k, double* ws,
                        const LaunchPlan& plan, void* stream) {
  const int64_t per = workspace_per_block(SmallmatOp::kInvSqrtSpd, k, 0);
  inv_sqrt_spd_kernel<T><<<static_cast<unsigned>(plan.blocks), plan.threads,
                           shared_bytes(plan.threads), as_stream(stream)>>>(m, out, info, batch,
                                                                             k, ws, per);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_cholesky_upper_inverse(const T* m, T* out, int32_t* info, int64_t batch, int k,
                                  double* ws, const LaunchPlan& plan, void* stream) {
  const int64_t per = workspace_per_block(SmallmatOp::kCholeskyUpperInverse, k, 0);
  cholesky_upper_inverse_kernel<T><<<static_cast<unsigned>(plan.blocks), plan.threads,
                                     shared_bytes(plan.threads), as_stream(stream)>>>(
      m, out, info, batch, k, ws, per);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_solve(const T* a, const T* b, T* out, int32_t* info, int64_t batch, int k, int n,
                 double* ws, const LaunchPlan& plan, void* stream) {
  const int64_t per = workspace_per_block(SmallmatOp::kSolve, k, n);
  solve_kernel<T><<<static_cast<unsigned>(plan.blocks), plan.threads, shared_bytes(plan.threads),
                    as_stream(stream)>>>(a, b, out, info, batch, k, n, ws, per);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

#define STIEFEL_INSTANTIATE(T)                                                                   \
  template int launch_inv_sqrt_spd<T>(const T*, T*, int32_t*, int64_t, int, double*,             \
                                      const LaunchPlan&, void*);                                 \
  template int launch_cholesky_upper_inverse<T>(const T*, T*, int32_t*, int64_t, int, double*,   \
                                                const LaunchPlan&, void*);                       \
  template int launch_solve<T>(const T*, const T*, T*, int32_t*, int64_t, int, int, double*,     \
                               const LaunchPlan&, void*);
STIEFEL_INSTANTIATE(float)
STIEFEL_INSTANTIATE(double)
#undef STIEFEL_INSTANTIATE

}  // namespace cuda
}  // namespace stiefel_kernels
