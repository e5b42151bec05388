// CPU kernel of stiefel_kernels::small_bmm(a, b, add, alpha) -> add + alpha * (a @ b): the
// batched r x r products of the retraction's small step (stiefel_kernels/gram.py). Schema,
// default kernel (torch.baddbmm) and fake kernel: stiefel_kernels/ops.py.
//
// Why a kernel of our own: torch's CPU bmm goes to MKL, which on this project's AMD (Zen-5
// class, AVX-512) VM runs its AVX2 path: 95-114 GFLOP/s on one core where the core's AVX-512
// FMAs reach 266 (bench/results/cpu-small-bmm-*.md). At r = 64 the step is 15 such products per
// factor (docs/design.md, "Gram-form derivations"), the largest part of a GPT-2-shaped step.
//
// One batch item per task of at::parallel_for: B packed into a zero-padded row-major scratch
// (k x npad, npad a multiple of the vector width) so every load is a whole vector; register
// tiles of 4 rows x up to 4 vectors (16 accumulators; per k: 4 broadcasts of A, 4 loads of B,
// 16 FMAs); A read through its strides (a transposed view costs nothing); the epilogue writes
// add + alpha * acc in the output's row-major layout. Sums run over k in order, one FMA per
// term: the result does not depend on the thread count (one item is one task), but it is not
// MKL's rounding (tests compare with float64 math at the dtype's tolerance).
//
// Vectorization as in fused_step_cpu.cpp: GCC vector extensions of 64 bytes in functions
// compiled for x86-64-v4 / v3 / baseline (target_clones), picked at load time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace stiefel_kernels {
namespace {

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(STIEFEL_NO_TARGET_CLONES)
#define SB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SB_CLONES
#endif
#define SB_INLINE C10_ALWAYS_INLINE

template <typename S>
struct Vec;
template <>
struct Vec<float> {
  typedef float T __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct Vec<double> {
  typedef double T __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

template <typename S>
struct Item {
  const S* a;      // (m, k) through (sa_r, sa_c)
  int64_t sa_r, sa_c;
  const S* b;      // (k, n) through (sb_r, sb_c)
  int64_t sb_r, sb_c;
  const S* add;    // (m, n) through (sd_r, sd_c), or nullptr
  int64_t sd_r, sd_c;
  S* out;          // (m, n) row-major
  int64_t m, k, n;
  S alpha;
};

// rows [i0, i0 + MR) x vectors [j0, j0 + NV W) of acc = A @ Bp, then out = add + alpha * acc
template <typename S, int MR, int NV>
SB_INLINE void tile(const Item<S>& it, const S* bp, int64_t npad, int64_t i0, int64_t j0, S* cp) {
  using V = typename Vec<S>::T;
  constexpr int W = Vec<S>::W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  const S* arow[MR];
  for (int i = 0; i < MR; ++i) arow[i] = it.a + (i0 + i) * it.sa_r;
  for (int64_t kk = 0; kk < it.k; ++kk) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], bp + kk * npad + j0 + v * W, sizeof(V));
    for (int i = 0; i < MR; ++i) {
      const S s = arow[i][kk * it.sa_c];
      V av = V{} + s;
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) std::memcpy(cp + (i0 + i) * npad + j0 + v * W, &acc[i][v], sizeof(V));
}

template <typename S, int MR>
SB_INLINE void row_block(const Item<S>& it, const S* bp, int64_t npad, int64_t i0, S* cp) {
  constexpr int W = Vec<S>::W;
  int64_t j0 = 0;
  for (; j0 + 4 * W <= npad; j0 += 4 * W) tile<S, MR, 4>(it, bp, npad, i0, j0, cp);
  switch ((npad - j0) / W) {
    case 3: tile<S, MR, 3>(it, bp, npad, i0, j0, cp); break;
    case 2: tile<S, MR, 2>(it, bp, npad, i0, j0, cp); break;
    case 1: tile<S, MR, 1>(it, bp, npad, i0, j0, cp); break;
    default: break;
  }
}

template <typename S>
SB_INLINE void item_impl(const Item<S>& it, std::vector<S>& scratch) {
  constexpr int W = Vec<S>::W;
  const int64_t npad = (it.n + W - 1) / W * W;
  scratch.assign(static_cast<size_t>((it.k + it.m) * npad), S(0));
  S* bp = scratch.data();
  S* cp = bp + it.k * npad;
  for (int64_t kk = 0; kk < it.k; ++kk)
    for (int64_t j = 0; j < it.n; ++j) bp[kk * npad + j] = it.b[kk * it.sb_r + j * it.sb_c];
  int64_t i0 = 0;
  for (; i0 + 4 <= it.m; i0 += 4) row_block<S, 4>(it, bp, npad, i0, cp);
  for (; i0 < it.m; ++i0) row_block<S, 1>(it, bp, npad, i0, cp);
  for (int64_t i = 0; i < it.m; ++i) {
    S* o = it.out + i * it.n;
    const S* c = cp + i * npad;
    if (it.add != nullptr) {
      const S* d = it.add + i * it.sd_r;
      for (int64_t j = 0; j < it.n; ++j) o[j] = d[j * it.sd_c] + it.alpha * c[j];
    } else {
      for (int64_t j = 0; j < it.n; ++j) o[j] = it.alpha * c[j];
    }
  }
}

SB_CLONES void item_f32(const Item<float>& it, std::vector<float>& scratch) { item_impl(it, scratch); }
SB_CLONES void item_f64(const Item<double>& it, std::vector<double>& scratch) { item_impl(it, scratch); }
SB_INLINE void run_item(const Item<float>& it, std::vector<float>& s) { item_f32(it, s); }
SB_INLINE void run_item(const Item<double>& it, std::vector<double>& s) { item_f64(it, s); }

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
      run_item(it, scratch);
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
                    add->size(2) == b.size(2),
                "stiefel_kernels::small_bmm: add must have shape (", a.size(0), ", ", a.size(1), ", ",
                b.size(2), "), got ", add->sizes());
    TORCH_CHECK(add->scalar_type() == a.scalar_type() && add->device().is_cpu(),
                "stiefel_kernels::small_bmm: add must be a CPU tensor of the operands' dtype, got ",
                add->scalar_type(), " on ", add->device());
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
