// CPU kernel of stiefel_kernels::cayley_fp_step(k, g, h, lr, iters, tol) -> (C, E): the whole
// r x r step of cayley_fp (the retraction's coefficients and the orthonormality correction
// folded into them) for a batch of factors, one factor per task. Schema, default kernel (the
// torch formulation in stiefel_kernels/gram.py) and fake kernel: stiefel_kernels/ops.py.
//
// The math is gram._cayley_fp_coefficients and gram._correction_or_none, line for line
// (docs/design.md, "Gram-form derivations" and "Orthonormality correction"):
//   sg = sym(G); a = sg - (K sg - G)/2; A = a - a^T; P11 = A K + G^T; P12 = A G + H;
//   step = min(lr, 1/||W_1||_F), ||W_1||_F^2 = -(tr(P11 P11) - 2 tr(P12 K) + tr(G G));
//   iteration 1: C = I + (step/2)(2 P11 + step (P11 sg - P12)), E = -(step/2)(2K + step (K sg - G));
//   further iterations: U = I + C; C <- I + (step/2)(P11 U + P12 E); E <- -(step/2)(K U + G E);
//   M = sym(C^T (K C + 2 G E) + E^T (H E)); where ||M - I||_F > tol, (C, E) <- (C, E) S with
//   S = Z c^(-1/2) from the coupled Newton-Schulz iteration on M / c
//   (smallmat.newton_schulz_inv_sqrt), as many steps as gram.correction_iters_for gives for
//   this factor's drift.
// Differences: the torch formulation on the CPU takes the correction's step count from the
// largest drift of the batch, this kernel from each factor's own (both reach the dtype's
// rounding target), and this kernel sums tr((M_1 N)^2) and ||M - I||_F^2 in float64; the tests
// compare the two at the tolerance policy's bounds. The step-count table below mirrors
// gram._CORRECTION_STEPS (tests/test_cayley_fp_step.py compares them).
//
// Why: on the CPU the torch formulation spends about as long in ~40 element-wise ops and their
// allocations over (F, r, r) temporaries as in its products, and the temporaries (2.4 MB each
// at 144 factors of r = 64) are handed back to the system by glibc after every step and taken
// again in page faults (~2,000-3,700 per step). Here every factor's temporaries live in a
// per-thread workspace of a few r x r matrices, in L1/L2; the only allocations are the outputs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "out_checks.h"
#include "small_matmul.h"

namespace stiefel_kernels {
namespace {

using small_matmul::Item;

// gram._CORRECTION_STEPS: the fewest Newton-Schulz steps that bring the correction's residual
// below the dtype's target for every drift up to the bound (tests/test_gram_small_step.py)
int correction_steps(double drift, bool is_double) {
  static const double kBound64[] = {1e-4, 1e-2, 0.1};
  static const int kSteps64[] = {2, 3, 4};
  static const double kBound32[] = {3e-5, 5e-3, 0.05, 0.1};
  static const int kSteps32[] = {1, 2, 3, 4};
  if (is_double) {
    for (int i = 0; i < 3; ++i)
      if (drift <= kBound64[i]) return kSteps64[i];
  } else {
    for (int i = 0; i < 4; ++i)
      if (drift <= kBound32[i]) return kSteps32[i];
  }
  return 5;  // gram.CORRECTION_ITERS
}

// The next factor's inputs (K, G, H: rows of r elements, rs apart) and outputs (C, E:
// contiguous) prefetched in equal parts after the products of this factor's step (r = 64 in
// float32: 1280 lines, ~100 per product): pass 1 wrote the Gram matrices long before (GPT-2's
// 144 x 64 x 64: 7 MB, out of cache by then), and C, E are written where nothing has been for a
// step. 144 factors of r = 64 from a cold cache, same-run A/B: 6.4-6.75 -> 6.1-6.3 ms.
template <typename S>
struct NextFactor {
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(S));  // elements per line
  const S* in[3] = {nullptr, nullptr, nullptr};
  S* out[2] = {nullptr, nullptr};
  int64_t rs = 0, r = 0;
  int64_t seg = 0, pos = 0;  // segments 0 .. 3r-1: the input rows; 3r, 3r + 1: C, E
  int64_t quota = 0;

  void start(const S* k, const S* g, const S* h, int64_t row_stride, S* c, S* e, int64_t rank, int64_t calls) {
    in[0] = k;
    in[1] = g;
    in[2] = h;
    out[0] = c;
    out[1] = e;
    rs = row_stride;
    r = rank;
    seg = 0;
    pos = 0;
    const int64_t lines = 3 * r * ((r + kLine - 1) / kLine) + 2 * ((r * r + kLine - 1) / kLine);
    quota = (lines + calls - 1) / calls;
  }
  SK_INLINE void step() {
    for (int64_t n = quota; n > 0 && seg < 3 * r + 2; --n) {
      const bool input = seg < 3 * r;
      const int64_t len = input ? r : r * r;
      if (input) __builtin_prefetch(in[seg / r] + (seg % r) * rs + pos, 0, 3);
      else __builtin_prefetch(out[seg - 3 * r] + pos, 1, 3);
      pos += kLine;
      if (pos >= len) {
        ++seg;
        pos = 0;
      }
    }
  }
};

template <typename S>
struct Work {
  std::vector<S> mats;  // kMats r x r matrices
  std::vector<S> pack;  // small_matmul's packing scratch
  int64_t rr = 0;
  NextFactor<S> next;   // stepped at every product (mm)
  static constexpr int kMats = 19;
  void size_for(int64_t r) {
    rr = r * r;
    if (mats.size() < static_cast<size_t>(kMats * rr)) mats.resize(static_cast<size_t>(kMats * rr));
  }
  S* m(int i) { return mats.data() + i * rr; }
};

// out = add + alpha * (a @ b), all r x r; at: a is read transposed
template <typename S>
SK_INLINE void mm(S* out, const S* a, const S* b, int64_t r, Work<S>& w, const S* add = nullptr,
                  S alpha = S(1), bool at = false) {
  Item<S> it{a, at ? 1 : r, at ? r : 1, b, r, 1, add, r, 1, out, r, r, r, alpha};
  small_matmul::run(it, w.pack);
  w.next.step();
}

template <typename S>
SK_INLINE void add_diag(S* m, int64_t r, S v) {
  for (int64_t i = 0; i < r; ++i) m[i * r + i] += v;
}

// One butterfly stage of a W x W in-register transpose: rows i and i + H (i & H == 0) exchange
// their lanes in blocks of H; after the stages H = W/2, ..., 1 row i holds column i.
template <typename S>
struct MaskOf;
template <>
struct MaskOf<float> {
  typedef int32_t T __attribute__((vector_size(64)));
};
template <>
struct MaskOf<double> {
  typedef int64_t T __attribute__((vector_size(64)));
};
template <typename S, int H>
SK_INLINE void transpose_stage(vec<S>* v) {
  constexpr int W = VecOf<S>::W;
  using M = typename MaskOf<S>::T;
  M lo, hi;
  for (int l = 0; l < W; ++l) {
    const int s = l / (2 * H), o = l % (2 * H);
    lo[l] = o < H ? s * 2 * H + o : W + s * 2 * H + o - H;
    hi[l] = o < H ? s * 2 * H + H + o : W + s * 2 * H + o;
  }
  for (int i = 0; i < W; ++i) {
    if (i & H) continue;
    const vec<S> a = v[i], b = v[i + H];
    v[i] = __builtin_shuffle(a, b, lo);
    v[i + H] = __builtin_shuffle(a, b, hi);
  }
}

// dst = src^T, both r x r row-major (not overlapping). The scalar loop reads a column per row
// (~2 us at r = 64); whole W x W blocks go through registers instead.
template <typename S>
SK_INLINE void transpose(S* __restrict dst, const S* __restrict src, int64_t r) {
  constexpr int W = VecOf<S>::W;
  if (r % W != 0) {
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) dst[i * r + j] = src[j * r + i];
    return;
  }
  for (int64_t bi = 0; bi < r; bi += W) {
    for (int64_t bj = 0; bj < r; bj += W) {
      vec<S> v[W];
      for (int i = 0; i < W; ++i) v[i] = vload(src + (bi + i) * r + bj);
      if constexpr (W == 16) transpose_stage<S, 8>(v);
      transpose_stage<S, 4>(v);
      transpose_stage<S, 2>(v);
      transpose_stage<S, 1>(v);
      for (int i = 0; i < W; ++i) vstore(dst + (bj + i) * r + bi, v[i]);
    }
  }
}

// Sums in float64 over x < n of f(x), in kLanes interleaved partial sums added in a fixed order
// at the end (a fixed order that the compiler can keep in vector registers).
template <typename F>
SK_INLINE double lane_sum(int64_t n, F&& f) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {};
  int64_t x = 0;
  for (; x + kLanes <= n; x += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f(x + l);
  for (int l = 0; x < n; ++x, ++l) acc[l] += f(x);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// one factor: k, g, h read through (rs, cs); c, e written contiguous
template <typename S>
SK_INLINE void factor_step(const S* k_in, const S* g_in, const S* h_in, int64_t rs, int64_t cs, S lr,
                           int64_t iters, double tol, int64_t r, S* c_out, S* e_out, Work<S>& w) {
  const int64_t rr = r * r;
  S* GT = w.m(0);
  S* T0 = w.m(1);
  S* T4 = w.m(2);
  S* sg = w.m(3);
  S* ksg = w.m(4);
  S* A = w.m(5);
  S* P11 = w.m(6);
  S* P12 = w.m(7);
  S* C = w.m(8);
  S* E = w.m(9);
  S* T1 = w.m(10);
  S* T2 = w.m(11);
  S* T3 = w.m(12);
  S* M = w.m(13);
  S* Y = w.m(14);
  S* Z = w.m(15);
  // K, G, H in place when they are row-major (the views of pass 1's output), else gathered
  const S *K = k_in, *G = g_in, *H = h_in;
  if (cs != 1 || rs != r) {
    S* k = w.m(16);
    S* g = w.m(17);
    S* h = w.m(18);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) {
        k[i * r + j] = k_in[i * rs + j * cs];
        g[i * r + j] = g_in[i * rs + j * cs];
        h[i * r + j] = h_in[i * rs + j * cs];
      }
    K = k;
    G = g;
    H = h;
  }
  transpose(GT, G, r);
  for (int64_t x = 0; x < rr; ++x) sg[x] = (G[x] + GT[x]) * S(0.5);
  mm(ksg, K, sg, r, w);
  S* a = T1;
  for (int64_t x = 0; x < rr; ++x) a[x] = S(-0.5) * (ksg[x] - G[x]) + sg[x];
  transpose(T2, a, r);
  for (int64_t x = 0; x < rr; ++x) A[x] = a[x] - T2[x];
  mm(P11, A, K, r, w, GT);  // P11 = A K + G^T
  mm(P12, A, G, r, w, H);
  // ||W_1||_F^2 = -tr((M_1 N)^2) = -(sum P11 o P11^T - 2 sum P12 o K^T + sum G o G^T)
  transpose(T0, P11, r);
  transpose(T4, K, r);
  const double tr = lane_sum(rr, [&](int64_t x) {
    return static_cast<double>(P11[x]) * T0[x] - 2.0 * static_cast<double>(P12[x]) * T4[x] +
           static_cast<double>(G[x]) * GT[x];
  });
  const S w_norm = static_cast<S>(std::sqrt(std::max(-tr, 0.0)));
  // a NaN anywhere in the blocks makes the step NaN, as torch's clamp_min / minimum do (std::max
  // and std::min would drop it)
  const S step = std::isnan(tr) ? std::numeric_limits<S>::quiet_NaN()
                                : std::min(lr, S(1) / std::max(w_norm, std::numeric_limits<S>::min()));
  const S half = S(0.5) * step;
  // iteration 1 from U = [2I + step sg; -step I]
  mm(T1, P11, sg, r, w);
  for (int64_t x = 0; x < rr; ++x) C[x] = ((T1[x] - P12[x]) * step + S(2) * P11[x]) * half;
  add_diag(C, r, S(1));
  for (int64_t x = 0; x < rr; ++x) E[x] = ((ksg[x] - G[x]) * step + S(2) * K[x]) * (-half);
  for (int64_t it = 1; it < iters; ++it) {
    for (int64_t x = 0; x < rr; ++x) T1[x] = C[x];  // U = I + C
    add_diag(T1, r, S(1));
    mm(T2, P11, T1, r, w);
    mm(T3, P12, E, r, w, T2);  // P11 U + P12 E
    mm(T2, K, T1, r, w);
    mm(Y, G, E, r, w, T2);     // K U + G E
    for (int64_t x = 0; x < rr; ++x) {
      E[x] = Y[x] * (-half);
      C[x] = T3[x] * half;
    }
    add_diag(C, r, S(1));
  }
  // the correction: M = sym(C^T (K C + 2 G E) + E^T (H E))
  mm(T1, K, C, r, w);
  mm(T2, G, E, r, w, T1, S(2));  // inner
  mm(T3, H, E, r, w);
  mm(T1, C, T2, r, w, static_cast<const S*>(nullptr), S(1), /*at=*/true);
  mm(Y, E, T3, r, w, T1, S(1), /*at=*/true);
  transpose(T2, Y, r);
  for (int64_t x = 0; x < rr; ++x) M[x] = (Y[x] + T2[x]) * S(0.5);
  // M - I (the diagonal's difference in S: exact for the diagonals in [0.5, 2] of any point near
  // the manifold), its squares summed in float64
  std::memcpy(T0, M, sizeof(S) * rr);
  add_diag(T0, r, S(-1));
  const double drift2 = lane_sum(rr, [&](int64_t x) {
    const double d = static_cast<double>(T0[x]);
    return d * d;
  });
  const S drift = static_cast<S>(std::sqrt(drift2));
  if (!(static_cast<double>(drift) > tol)) {  // no correction (also for a NaN drift, as torch's)
    std::memcpy(c_out, C, sizeof(S) * rr);
    std::memcpy(e_out, E, sizeof(S) * rr);
    return;
  }
  // coupled Newton-Schulz on M / scale (smallmat.newton_schulz_inv_sqrt). The largest absolute
  // row sum, each summed in column order: M is symmetric bit for bit (sym() adds the same two
  // numbers for M[i, j] and M[j, i]), so row i's sum is column i's, and the column sums run
  // down the rows as vectors (the same additions in the same order; a row at a time is one
  // chain of dependent adds, ~0.4 ms over 144 factors of r = 64).
  S* colsum = T1;
  for (int64_t j = 0; j < r; ++j) colsum[j] = std::abs(M[j]);
  for (int64_t i = 1; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) colsum[j] += std::abs(M[i * r + j]);
  S row_max = S(0);
  for (int64_t j = 0; j < r; ++j) row_max = std::max(row_max, colsum[j]);
  const S scale = std::min(row_max, S(1) + drift);
  for (int64_t x = 0; x < rr; ++x) Y[x] = M[x] / scale;
  const int steps = correction_steps(static_cast<double>(drift), sizeof(S) == sizeof(double));
  bool z_is_eye = true;
  for (int s = 0; s < steps; ++s) {
    S* t = T1;
    if (z_is_eye) {
      for (int64_t x = 0; x < rr; ++x) t[x] = Y[x] * S(-0.5);
    } else {
      mm(t, Z, Y, r, w, static_cast<const S*>(nullptr), S(-0.5));
    }
    add_diag(t, r, S(1.5));
    if (z_is_eye) {
      std::memcpy(Z, t, sizeof(S) * rr);
      z_is_eye = false;
    } else {
      mm(T2, t, Z, r, w);
      std::memcpy(Z, T2, sizeof(S) * rr);
    }
    if (s + 1 < steps) {
      mm(T2, Y, t, r, w);
      std::memcpy(Y, T2, sizeof(S) * rr);
    }
  }
  const S inv_sqrt = S(1) / std::sqrt(scale);
  for (int64_t x = 0; x < rr; ++x) Z[x] *= inv_sqrt;
  mm(c_out, C, Z, r, w);
  mm(e_out, E, Z, r, w);
}

struct Args {
  const void* k;
  const void* g;
  const void* h;
  int64_t s0, rs, cs;  // strides of k, g, h (the same for the three)
  const double* lr;    // one per factor, or one
  bool lr_each;
  int64_t iters;
  double tol;
  int64_t r;
  void* c;
  void* e;
};

template <typename S>
SK_INLINE void run_range(const Args& a, int64_t begin, int64_t end) {
  Work<S> w;
  w.size_for(a.r);
  const S* k = static_cast<const S*>(a.k);
  const S* g = static_cast<const S*>(a.g);
  const S* h = static_cast<const S*>(a.h);
  S* c = static_cast<S*>(a.c);
  S* e = static_cast<S*>(a.e);
  const int64_t rr = a.r * a.r;
  for (int64_t f = begin; f < end; ++f) {
    // every step takes at least 4 iters + 5 products (the iterations and the correction's
    // Gram matrix; its Newton-Schulz steps and fold where it fires): all lines asked for by then
    if (f + 1 < end && a.cs == 1)
      w.next.start(k + (f + 1) * a.s0, g + (f + 1) * a.s0, h + (f + 1) * a.s0, a.rs, c + (f + 1) * rr,
                   e + (f + 1) * rr, a.r, 4 * a.iters + 5);
    else
      w.next.quota = 0;
    const S lr = static_cast<S>(a.lr[a.lr_each ? f : 0]);
    factor_step<S>(k + f * a.s0, g + f * a.s0, h + f * a.s0, a.rs, a.cs, lr, a.iters, a.tol, a.r,
                   c + f * rr, e + f * rr, w);
  }
}

SK_CLONES void range_f32(const Args& a, int64_t begin, int64_t end) { run_range<float>(a, begin, end); }
SK_CLONES void range_f64(const Args& a, int64_t begin, int64_t end) { run_range<double>(a, begin, end); }

// The checks of both ops; k, g, h: (F, r, r).
void check_args(const char* op, const at::Tensor& k, const at::Tensor& g, const at::Tensor& h,
                const at::Tensor& lr, int64_t iters) {
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k.size(2), op, ": expected k of shape (F, r, r), got ",
              k.sizes());
  TORCH_CHECK(g.sizes() == k.sizes() && h.sizes() == k.sizes(), op, ": k, g, h must have one shape, got ",
              k.sizes(), ", ", g.sizes(), ", ", h.sizes());
  TORCH_CHECK(k.scalar_type() == g.scalar_type() && k.scalar_type() == h.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kDouble),
              op, ": expected float32 or float64 k, g, h of one dtype, got ", k.scalar_type(), ", ",
              g.scalar_type(), ", ", h.scalar_type());
  TORCH_CHECK(lr.numel() == 1 || lr.numel() == k.size(0), op, ": lr must have 1 or F = ", k.size(0),
              " elements, got ", lr.numel());
  TORCH_CHECK(iters >= 1, op, ": iters must be >= 1, got ", iters);
}

// C, E into c, e (contiguous (F, r, r), k's dtype).
void run_step(const at::Tensor& k, const at::Tensor& g, const at::Tensor& h, const at::Tensor& lr,
              int64_t iters, double tol, const at::Tensor& c, const at::Tensor& e) {
  const int64_t nf = k.size(0), r = k.size(1);
  if (nf == 0 || r == 0) return;
  // k, g, h: one layout (the views of pass 1's (F, 3, r, r) output), else contiguous copies
  at::Tensor kk = k, gg = g, hh = h;
  if (g.strides() != k.strides() || h.strides() != k.strides()) {
    kk = k.contiguous();
    gg = g.contiguous();
    hh = h.contiguous();
  }
  at::Tensor lr64 = lr.to(at::kDouble).contiguous().reshape({-1});
  Args a{kk.data_ptr(), gg.data_ptr(), hh.data_ptr(), kk.stride(0), kk.stride(1), kk.stride(2),
         lr64.data_ptr<double>(), lr64.numel() > 1, iters, tol, r, c.data_ptr(), e.data_ptr()};
  const bool f64 = k.scalar_type() == at::kDouble;
  at::parallel_for(0, nf, 1, [&](int64_t begin, int64_t end) {
    if (f64) {
      range_f64(a, begin, end);
    } else {
      range_f32(a, begin, end);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cayley_fp_step_cpu(const at::Tensor& k, const at::Tensor& g,
                                                      const at::Tensor& h, const at::Tensor& lr,
                                                      int64_t iters, double tol) {
  check_args("stiefel_kernels::cayley_fp_step", k, g, h, lr, iters);
  at::Tensor c = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor e = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  run_step(k, g, h, lr, iters, tol, c, e);
  return {c, e};
}

// cayley_fp_step into a caller's c, e (an optimizer keeps them per bucket: no 2 x (F, r, r)
// allocation per step).
void cayley_fp_step_into_cpu(const at::Tensor& k, const at::Tensor& g, const at::Tensor& h, const at::Tensor& lr,
                             int64_t iters, double tol, const at::Tensor& c, const at::Tensor& e) {
  const char* op = "stiefel_kernels::cayley_fp_step_into";
  check_args(op, k, g, h, lr, iters);
  for (const at::Tensor* t : {&c, &e}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == k.scalar_type() && t->sizes() == k.sizes() &&
                    t->is_contiguous(),
                op, ": c and e must be contiguous CPU tensors of k's shape ", k.sizes(), " and dtype ",
                k.scalar_type(), ", got ", t->sizes(), ", ", t->scalar_type(),
                t->is_contiguous() ? "" : ", not contiguous", ", on ", t->device());
    for (const at::Tensor* in : {&k, &g, &h, &lr})
      TORCH_CHECK(!may_share_memory(*t, *in), op, ": c and e must not share memory with k, g, h or lr");
  }
  TORCH_CHECK(!may_share_memory(c, e), op, ": c and e must not share memory");
  run_step(k, g, h, lr, iters, tol, c, e);
}

}  // namespace
}  // namespace stiefel_kernels

TORCH_LIBRARY_IMPL(stiefel_kernels, CPU, m) {
  m.impl("cayley_fp_step", &stiefel_kernels::cayley_fp_step_cpu);
  m.impl("cayley_fp_step_into", &stiefel_kernels::cayley_fp_step_into_cpu);
}
