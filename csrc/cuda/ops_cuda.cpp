// CUDA kernels of the batched small-matrix ops (schemas and default kernels in
// stiefel_kernels/ops.py, launchers in smallmat_cuda.cu), registered by register_cuda_kernels().
// Built into stiefel_kernels._C only with a CUDA build of torch.
//
// Written against torch's device-generic headers alone (no c10/cuda, no CUDA headers): the
// stream comes through the device guard interface as a native handle. So this file also compiles
// against a CPU-only torch, which is how CI checks it on machines without a GPU
// (tests/test_cuda_build.py).
//
// Each op validates like the CPU kernel (same messages), allocates its outputs and a float64
// workspace through torch's caching allocator (reused from call to call, capture-safe), and
// launches on the current stream. No host synchronization: info stays on the device.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <memory>

#include "cuda/smallmat_cuda.h"
#include "smallmat.h"

namespace stiefel_kernels {
namespace {

void* current_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle();
}

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cuda(), "stiefel_kernels::", op, ": CUDA kernel got a tensor on ",
              t.device());
}

void check_size(int64_t k, const char* op, const char* what) {
  TORCH_CHECK(k <= cuda::kMaxK, "stiefel_kernels::", op, ": the CUDA kernel takes ", what,
              " <= ", cuda::kMaxK, ", got ", k, " (use torch.linalg for larger matrices)");
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "stiefel_kernels::", op, ": CUDA kernel launch failed: ",
              cuda::cuda_error_string(err));
}

at::Tensor new_info(const at::Tensor& like, at::IntArrayRef batch_shape) {
  return at::empty(batch_shape, like.options().dtype(at::kInt));
}

at::Tensor new_workspace(const at::Tensor& like, const cuda::LaunchPlan& plan) {
  return at::empty({plan.workspace_doubles}, like.options().dtype(at::kDouble));
}

// Shared body of the two (k, k) -> (k, k) ops.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> square_op(const at::Tensor& m_in, const char* op,
                                             cuda::SmallmatOp kind, Launch launch) {
  check_square_batch(m_in, op);
  check_cuda(m_in, op);
  const int64_t k = m_in.size(-1);
  check_size(k, op, "k");
  const c10::DeviceGuard guard(m_in.device());
  const at::Tensor m = m_in.contiguous();
  const int64_t batch = c10::multiply_integers(m.sizes().slice(0, m.dim() - 2));
  at::Tensor out = at::empty(m.sizes(), m.options());
  at::Tensor info = new_info(m, m.sizes().slice(0, m.dim() - 2));
  if (batch == 0) return {out, info};
  if (k == 0) return {out, info.zero_()};
  const cuda::LaunchPlan plan = cuda::launch_plan(kind, batch, k, 0);
  at::Tensor ws = new_workspace(m, plan);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "stiefel_kernels_square_op_cuda", [&] {
    check_launch(launch(m.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                        info.data_ptr<int32_t>(), batch, static_cast<int>(k),
                        ws.data_ptr<double>(), plan, current_stream(m.device())),
                 op);
  });
  return {out, info};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> inv_sqrt_spd_cuda(const at::Tensor& m) {
  return square_op(m, "inv_sqrt_spd", cuda::SmallmatOp::kInvSqrtSpd, [](auto... args) {
    return cuda::launch_inv_sqrt_spd(args...);
  });
}

std::tuple<at::Tensor, at::Tensor> cholesky_upper_inverse_cuda(const at::Tensor& m) {
  return square_op(m, "cholesky_upper_inverse", cuda::SmallmatOp::kCholeskyUpperInverse,
                   [](auto... args) { return cuda::launch_cholesky_upper_inverse(args...); });
}

std::tuple<at::Tensor, at::Tensor> solve_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_solve_args(a_in, b_in);
  check_cuda(a_in, "solve");
  const int64_t k = a_in.size(-1);
  const int64_t n = b_in.size(-1);
  check_size(k, "solve", "k");
  check_size(n, "solve", "the number of right-hand sides");
  const c10::DeviceGuard guard(a_in.device());
  const SolveOperands operands = broadcast_solve_operands(a_in, b_in);
  const at::Tensor& a = operands.a;
  const at::Tensor& b = operands.b;
  const int64_t batch = operands.batch;
  at::Tensor out = at::empty(b.sizes(), b.options());
  at::Tensor info = new_info(a, operands.batch_shape);
  if (batch == 0) return {out, info};
  if (k == 0 || n == 0) return {out, info.zero_()};
  const cuda::LaunchPlan plan = cuda::launch_plan(cuda::SmallmatOp::kSolve, batch, k, n);
  at::Tensor ws = new_workspace(a, plan);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "solve", [&] {
    check_launch(cuda::launch_solve(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                    out.data_ptr<scalar_t>(), info.data_ptr<int32_t>(), batch,
                                    static_cast<int>(k), static_cast<int>(n),
                                    ws.data_ptr<double>(), plan, current_stream(a.device())),
                 "solve");
  });
  return {out, info};
}

}  // namespace stiefel_kernels

namespace stiefel_kernels {

// On request, not at load (TORCH_LIBRARY_IMPL would be): the CUDA kernels override the default
// torch.linalg kernels only once a user (or the GPU checks) asks, until a GPU has measured them.
// Idempotent; unregister_cuda_kernels() takes them back (the tests of the native ops enable them
// for their own duration only).
namespace {
std::unique_ptr<torch::Library>& cuda_library() {
  static std::unique_ptr<torch::Library> lib;
  return lib;
}
}  // namespace

void register_cuda_kernels() {
  auto& lib = cuda_library();
  if (lib) return;
  lib = std::make_unique<torch::Library>(torch::Library::IMPL, "stiefel_kernels",
                                         c10::DispatchKey::CUDA, __FILE__, __LINE__);
  lib->impl("inv_sqrt_spd", &inv_sqrt_spd_cuda);
  lib->impl("cholesky_upper_inverse", &cholesky_upper_inverse_cuda);
  lib->impl("solve", &solve_cuda);
}

// Destroying the library object removes its registrations: the defaults run again on CUDA.
void unregister_cuda_kernels() { cuda_library().reset(); }

}  // namespace stiefel_kernels
