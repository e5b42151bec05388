// CPU kernels of the two streaming passes of a Stiefel-AdamW step over a bucket of same-shape
// factors (docs/design.md, "The fast path"); schemas, the default (pure torch) kernels and the
// fake kernels are in stiefel_kernels/ops.py, the Python wrapper in stiefel_kernels/cpu_fused.py.
//
//   stiefel_adamw_pass1(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc, beta1, beta2,
//                       eps, amsgrad, maximize, row_orthonormal) -> grams (P, *batch, 3, r, r)
//     moments in place (bit for bit torch's _foreach_lerp_ / _foreach_mul_ / _foreach_addcmul_ /
//     _foreach_maximum_ where torch runs its AVX2/AVX512 kernels: both use one FMA for lerp and
//     for addcmul), D = (m / bc1) / (sqrt(v) / bc2 + eps) with IEEE (correctly rounded) division
//     and sqrt (torch's CPU sqrt is not correctly rounded, so D may differ from the torch
//     backend's in the last bit), and K = X^T X, G = X^T D, H = D^T D.
//   stiefel_adamw_pass2(params, exp_avgs, exp_avg_sqs, bc, c, e, eps, row_orthonormal)
//     X <- X + (X (C - I) + D E) in place, D recomputed exactly as pass 1 computed it.
//
// Every tensor is read in place through its strides (no stacking, no transposed copies): a
// factor in column form is X (n x r); a stored wide factor (row_orthonormal) is X = A^T. Each
// pass walks (factor, chunk of kChunkRows rows of X) work items with at::parallel_for; an item
// is cut into sub-blocks of rows, whose elementwise part (moments, D; x converted where needed)
// goes into per-thread scratch (float32 for bf16/fp16/fp32 factors, float64 for fp64) in the
// storage orientation, and register-tiled micro-kernels run there:
//   * "tall" (unit stride along r, e.g. a stored n x r factor): outer-product tiles;
//   * "wide" (unit stride along n, e.g. LoRA's A, r x n): dot-product tiles over the long side.
// Float32 parameters laid out as the micro-kernels need them (wide: r a multiple of 4 and whole
// vectors; tall: packed rows, whole groups of 4 rows) are read in place instead of copied.
//
// Speed (issue 13): the elementwise part is bound by the divider (two correctly rounded
// divisions and a square root per element) and by memory, the micro-kernels by the FMA units.
// The work runs in sub-blocks of rows, double-buffered: the elementwise part of sub-block q + 1
// is done next to the register tiles of sub-block q (Producer), and the tiles hand over every few
// inner steps to prefetches of sub-block q + 2 (Prefetcher: a prefetch needs no vector
// register, so these hand-overs spill nothing). Pass 2 does the elementwise slices of q + 1 at
// the ends of q's tiles, where no accumulator is live, so the divider works between the FMAs;
// pass 1 does them whole before the tiles (there the slices gained nothing). Small sub-blocks
// (wide: 4096 elements) keep the tiles' data in L1/L2. 1 thread, same-run A/Bs (2026-11-26)
// against the slices handed over from inside the tiles (which spilled the tile's accumulators,
// 24 vectors in a tall K/G/H tile, at every hand-over) with prefetches inside the slices: GPT-2's
// 144 x 768 x 64 pass 1 12.5-12.9 -> 11.8-11.9 ms, pass 2 8.4-9.1 -> 8.3-8.8 ms (0.1-0.6 ms
// less in each pair); LoRA r = 16, 32 layers (A: 192 x 16 x 4096 and 32 x 16 x 11008) pass 1
// 17.5-19.3 -> 16.1-16.7 ms, pass 2 11.9-13.6 -> 10.4-12.2 ms (1.2-1.5 ms less in each pair).
// Pass 2 with its elementwise part whole before the tiles was slower (GPT-2 8.9-9.5 -> 9.7-9.9
// ms); pass 1 with its slices at the tiles' ends was no faster (tall) or slower (wide, from
// memory). bench/results/cpu-step-targets-2026-11-26d.md has the runs.
// None of this changes any result: the elementwise expressions are the same, and every Gram /
// pass-2 sum is accumulated in the same fixed order.
// Gram sums: products accumulated in the working dtype inside a chunk (a fixed order), chunk
// partials written to a buffer and then added in float64 in chunk order, so the result does not
// depend on the thread count (gram.gram_pass's accuracy contract). K and H are symmetric: only
// their upper tiles are computed, the lower triangle is mirrored.
//
// Vectorization (cpu_vec.h): GCC vector extensions of 64 bytes in functions compiled three times
// (x86-64-v4 / v3 / baseline, picked at load time: target_clones), like ops_cpu.cpp. at::vec is
// not used: in an extension compiled without torch's per-capability flags it is the generic
// array implementation, and its fmadd does not say whether it fuses, which the bit-exact moment
// update needs to control (explicit FMAs there, cpu_vec.h's sfma; no other multiply feeds an add
// in it).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu_vec.h"
#include "out_checks.h"

namespace stiefel_kernels {
namespace {

// rows of X per Gram partial (gram.GRAM_CHUNK_ROWS)
constexpr int64_t kChunkRows = 4096;
// elements of one scratch array of a sub-block: tall 32 KiB float32, wide 16 KiB (LoRA r = 16:
// 256 columns; measured fastest against 2048-16384 elements, again against 2048, 8192 and 16384
// with the schedule described under "Speed": the wide dot-product tiles reduce their lanes once
// per sub-block, which shorter sub-blocks pay for, but four tensors' sub-blocks in flight stay in
// L2)
constexpr int64_t kScratchElems = 8192;
constexpr int64_t kWideScratchElems = 4096;
// How often the micro-kernels hand over to the prefetches of the sub-block after next (see
// Prefetcher): every this many rows (gram_tall; 16 measured the same as 32 and faster than 64) /
// inner steps (apply_tall, apply_wide) / vectors of the dot products (gram_wide).
constexpr int64_t kTallRowsPerSlice = 16;
constexpr int64_t kApplyTallStepsPerSlice = 16;
constexpr int64_t kApplyRowsPerSlice = 4;
constexpr int64_t kWideVecsPerSlice = 8;

// even/odd lanes of the concatenation (a, b), added: lane l < W/2 holds a[2l] + a[2l+1], lane
// W/2 + l holds b[2l] + b[2l+1].
SK_INLINE vec<float> pair_add(const vec<float>& a, const vec<float>& b) {
  typedef int32_t M __attribute__((vector_size(64)));
  const M even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const M odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}
SK_INLINE vec<double> pair_add(const vec<double>& a, const vec<double>& b) {
  typedef int64_t M __attribute__((vector_size(64)));
  const M even = {0, 2, 4, 6, 8, 10, 12, 14};
  const M odd = {1, 3, 5, 7, 9, 11, 13, 15};
  return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}
// Four lanes of S, for the rows of a 4 x 4 tile's sums.
template <typename S>
struct QuadOf;
template <>
struct QuadOf<float> {
  typedef float T __attribute__((vector_size(16)));
};
template <>
struct QuadOf<double> {
  typedef double T __attribute__((vector_size(32)));
};

// Horizontal sums of 16 vectors (the 4 x 4 accumulators of a tile, k = 4a + b), added to out:
// out[a * ld + b] += sum of the lanes of v[4a + b]. The sums by rounds of pair_add (each round
// halves the vectors and the lanes per input; the order is fixed), which leaves lane k of the
// result holding sum k (float: one vector; double: two of 8), so each row of four is added to
// out as one short vector: the same additions as element by element (one each), without
// taking the 16 lanes apart (which made the reductions most of LoRA's pass 1).
template <typename S>
SK_INLINE void reduce16_add(const vec<S>* v, S* out, int64_t ld) {
  constexpr int W = VecOf<S>::W;
  using Q = typename QuadOf<S>::T;
  vec<S> t[16];
  for (int k = 0; k < 16; ++k) t[k] = v[k];
  int count = 16;
  for (int lanes = W; lanes > 1 && count > 1; lanes /= 2) {  // lanes per input vector
    for (int k = 0; k < count / 2; ++k) t[k] = pair_add(t[2 * k], t[2 * k + 1]);
    count /= 2;
  }
  // lanes 4a .. 4a + 3 (float: of t[0]; double: of t[a / 2], from lane 4 (a % 2)), copied out
  // (a lane extract the compiler does in registers; no __builtin_shufflevector, which needs GCC 12)
  const S* lanes = reinterpret_cast<const S*>(t);
  for (int a = 0; a < 4; ++a) {
    Q q, o;
    std::memcpy(&q, W == 16 ? lanes + 4 * a : lanes + (a / 2) * W + 4 * (a % 2), sizeof(Q));
    std::memcpy(&o, out + a * ld, sizeof(Q));
    o += q;
    std::memcpy(out + a * ld, &o, sizeof(Q));
  }
}

// ----------------------------------------------------------------------- element conversions
template <typename P, typename S>
SK_INLINE S load_as(P x) {
  return static_cast<S>(x);
}
template <>
SK_INLINE float load_as<c10::BFloat16, float>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
template <typename P, typename S>
SK_INLINE P store_as(S y) {
  return static_cast<P>(y);
}
template <>
SK_INLINE c10::BFloat16 store_as<c10::BFloat16, float>(float y) {
  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t u;
  std::memcpy(&u, &y, 4);
  const uint16_t b = (y != y) ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(b, c10::BFloat16::from_bits());
}

template <typename P, typename S>
SK_INLINE void convert_in(const P* __restrict src, S* __restrict dst, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = load_as<P, S>(src[j]);
}
template <typename P, typename S>
SK_INLINE void convert_out(const S* __restrict src, P* __restrict dst, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = store_as<P, S>(src[j]);
}

// ----------------------------------------------------------------------- elementwise parts
template <typename S>
struct Hyper {
  S lerp_w;         // torch lerp: weight (< 0.5) or weight - 1 (>= 0.5)
  bool lerp_small;  // weight < 0.5: m + w (g - m), else g + (w - 1) (g - m); one FMA either way
  S beta2;
  S one_minus_beta2;
  S eps;
  bool maximize;
};

// m, v (and v_max) in place, D into d; contiguous runs of len elements.
template <typename P, typename S, bool kAms>
SK_INLINE void moments(const P* __restrict g, S* __restrict m, S* __restrict v, S* __restrict vmax,
                       S* __restrict d, int64_t len, const Hyper<S>& h, S bc1, S bc2) {
  const S w = h.lerp_w, b2 = h.beta2, c2 = h.one_minus_beta2, eps = h.eps;
  const bool small = h.lerp_small, neg = h.maximize;
  for (int64_t j = 0; j < len; ++j) {
    const S g0 = load_as<P, S>(g[j]);
    const S gj = neg ? -g0 : g0;
    const S mo = m[j];
    const S mj = sfma(w, gj - mo, small ? mo : gj);      // torch lerp_ (lerp_vec: fmadd)
    const S vb = v[j] * b2;                               // mul_(beta2)
    const S vj = sfma(c2 * gj, gj, vb);                   // addcmul_(g, g, 1 - beta2)
    m[j] = mj;
    v[j] = vj;
    S vd = vj;
    if constexpr (kAms) {  // torch.maximum: NaN propagates
      const S vm = vmax[j];
      vd = (vm > vj || vm != vm) ? vm : vj;
      vmax[j] = vd;
    }
    d[j] = (mj / bc1) / (std::sqrt(vd) / bc2 + eps);
  }
}

// D only (pass 2), the same expression as in moments().
template <typename S>
SK_INLINE void direction(const S* __restrict m, const S* __restrict v, S* __restrict d, int64_t len,
                         S eps, S bc1, S bc2) {
  for (int64_t j = 0; j < len; ++j) d[j] = (m[j] / bc1) / (std::sqrt(v[j]) / bc2 + eps);
}

// ----------------------------------------------------------------------- Gram micro-kernels
// Tall scratch: x, d are nb x rp row-major (columns >= r are zero). acc* are ra x ra (ra = rp).
// Register tiles of 4 rows (it..it+3) x NV vectors of columns from jt: with kKH, K, G and H
// (tiles reaching the diagonal or above it), else G only (strictly below the diagonal). Every
// accumulator element sums its products over the rows in row order.
template <typename S, int NV, bool kKH, typename F>
SK_INLINE void gram_tall_tile(const S* __restrict x, const S* __restrict d, int64_t nb, int64_t rp,
                              int64_t it, int64_t jt, S* __restrict K, S* __restrict G,
                              S* __restrict H, F&& between) {
  constexpr int W = VecOf<S>::W;
  vec<S> k[4][NV], g[4][NV], h[4][NV];
  for (int a = 0; a < 4; ++a) {
    for (int c = 0; c < NV; ++c) {
      g[a][c] = vload(G + (it + a) * rp + jt + c * W);
      if constexpr (kKH) {
        k[a][c] = vload(K + (it + a) * rp + jt + c * W);
        h[a][c] = vload(H + (it + a) * rp + jt + c * W);
      }
    }
  }
  for (int64_t row = 0; row < nb; ++row) {
    const S* xr = x + row * rp;
    const S* dr = d + row * rp;
    vec<S> xb[NV], db[NV];
    for (int c = 0; c < NV; ++c) {
      db[c] = vload(dr + jt + c * W);
      if constexpr (kKH) xb[c] = vload(xr + jt + c * W);
    }
    for (int a = 0; a < 4; ++a) {
      const S xa = xr[it + a];
      for (int c = 0; c < NV; ++c) {
        if constexpr (kKH) k[a][c] += xa * xb[c];
        g[a][c] += xa * db[c];
      }
      if constexpr (kKH) {
        const S da = dr[it + a];
        for (int c = 0; c < NV; ++c) h[a][c] += da * db[c];
      }
    }
    if ((row & (kTallRowsPerSlice - 1)) == kTallRowsPerSlice - 1) between();
  }
  for (int a = 0; a < 4; ++a) {
    for (int c = 0; c < NV; ++c) {
      vstore(G + (it + a) * rp + jt + c * W, g[a][c]);
      if constexpr (kKH) {
        vstore(K + (it + a) * rp + jt + c * W, k[a][c]);
        vstore(H + (it + a) * rp + jt + c * W, h[a][c]);
      }
    }
  }
}

// Calls of `between` in gram_tall for one sub-block of nb rows (the Prefetcher's hand-overs).
inline int64_t gram_tall_units(int64_t nb, int64_t rp, int W) {
  int64_t tiles = 0;
  for (int64_t it = 0; it < rp; it += 4) {
    const int64_t split = it / W * W;  // columns [0, split): G only; [split, rp): K, G, H
    tiles += (split / W + 3) / 4 + ((rp - split) / W + 1) / 2;
  }
  return tiles * (nb / kTallRowsPerSlice);
}

template <typename S, typename F>
SK_INLINE void gram_tall(const S* __restrict x, const S* __restrict d, int64_t nb, int64_t rp,
                         S* __restrict K, S* __restrict G, S* __restrict H, F&& between) {
  constexpr int W = VecOf<S>::W;
  for (int64_t it = 0; it < rp; it += 4) {
    const int64_t split = it / W * W;
    for (int64_t jt = 0; jt < split; jt += 4 * W) {
      switch (std::min<int64_t>(4, (split - jt) / W)) {
        case 4: gram_tall_tile<S, 4, false>(x, d, nb, rp, it, jt, K, G, H, between); break;
        case 3: gram_tall_tile<S, 3, false>(x, d, nb, rp, it, jt, K, G, H, between); break;
        case 2: gram_tall_tile<S, 2, false>(x, d, nb, rp, it, jt, K, G, H, between); break;
        default: gram_tall_tile<S, 1, false>(x, d, nb, rp, it, jt, K, G, H, between); break;
      }
    }
    for (int64_t jt = split; jt < rp; jt += 2 * W) {
      if (jt + 2 * W <= rp) gram_tall_tile<S, 2, true>(x, d, nb, rp, it, jt, K, G, H, between);
      else gram_tall_tile<S, 1, true>(x, d, nb, rp, it, jt, K, G, H, between);
    }
  }
}

// out[i0 + a, j0 + b] += sum_k u[i0 + a, k] w[j0 + b, k] over len (a multiple of W) columns.
template <typename S, typename F>
SK_INLINE void dot_tile(const S* __restrict u, int64_t su, const S* __restrict w, int64_t sw, int64_t len,
                        int64_t i0, int64_t j0, S* __restrict out, int64_t ra, F&& between) {
  constexpr int W = VecOf<S>::W;
  vec<S> acc[4][4];
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) acc[a][b] = vec<S>{};
  for (int64_t k = 0; k < len; k += W) {
    vec<S> uv[4], wv[4];
    for (int a = 0; a < 4; ++a) uv[a] = vload(u + (i0 + a) * su + k);
    for (int b = 0; b < 4; ++b) wv[b] = vload(w + (j0 + b) * sw + k);
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b) acc[a][b] += uv[a] * wv[b];
    if (((k / W) & (kWideVecsPerSlice - 1)) == kWideVecsPerSlice - 1) between();
  }
  // 16 horizontal sums at once (a fixed pairwise tree): out[i0 + a, j0 + b] += hsum(acc[a][b])
  reduce16_add<S>(&acc[0][0], out + i0 * ra + j0, ra);
}

// Wide scratch: x, d are r4 rows (rows >= r zero) of `stride` columns, the first len in use
// (len a multiple of W, columns past the valid ones zero). acc* are r4 x r4.
template <typename S, typename F>
SK_INLINE void gram_wide(const S* __restrict x, int64_t sx, const S* __restrict d, int64_t r4, int64_t stride,
                         int64_t len, S* __restrict K, S* __restrict G, S* __restrict H, F&& between) {
  for (int64_t i0 = 0; i0 < r4; i0 += 4) {
    for (int64_t j0 = 0; j0 < r4; j0 += 4) {
      if (j0 >= i0) {
        dot_tile(x, sx, x, sx, len, i0, j0, K, r4, between);
        dot_tile(d, stride, d, stride, len, i0, j0, H, r4, between);
      }
      dot_tile(x, sx, d, stride, len, i0, j0, G, r4, between);
    }
  }
}

// ----------------------------------------------------------------------- pass-2 micro-kernels
// Inner steps of apply_tall between hand-overs: 16 where r >= 16, else 4 (so that a tile of a
// small r still hands over at all).
constexpr int64_t apply_tall_interval(int64_t r) {
  return r >= kApplyTallStepsPerSlice ? kApplyTallStepsPerSlice : kApplyRowsPerSlice;
}

// Tall: rows [0, nb) of x, d (rp columns) -> y = x + (x Cm + d E); Cm, E are rp x rp (zero pad).
// Register tiles of 4 rows x NV vectors; each output element sums over i in order, the x term
// before the d term of each i. y may be x (pass 2 writes in place when one tile spans a row):
// no __restrict on those two.
template <typename S, int NV, typename F>
SK_INLINE void apply_tall_tile(const S* x, const S* __restrict d, int64_t row0, int64_t jt,
                               int64_t r, int64_t rp, const S* __restrict cm, const S* __restrict e,
                               S* y, F&& between) {
  constexpr int W = VecOf<S>::W;
  const int64_t mask = apply_tall_interval(r) - 1;
  vec<S> acc[4][NV];
  for (int a = 0; a < 4; ++a)
    for (int c = 0; c < NV; ++c) acc[a][c] = vec<S>{};
  for (int64_t i = 0; i < r; ++i) {
    vec<S> cv[NV], ev[NV];
    for (int c = 0; c < NV; ++c) {
      cv[c] = vload(cm + i * rp + jt + c * W);
      ev[c] = vload(e + i * rp + jt + c * W);
    }
    for (int a = 0; a < 4; ++a) {
      const S xa = x[(row0 + a) * rp + i], da = d[(row0 + a) * rp + i];
      for (int c = 0; c < NV; ++c) {
        acc[a][c] += xa * cv[c];
        acc[a][c] += da * ev[c];
      }
    }
    if ((i & mask) == mask) between();
  }
  for (int a = 0; a < 4; ++a)
    for (int c = 0; c < NV; ++c)
      vstore(y + (row0 + a) * rp + jt + c * W, vload(x + (row0 + a) * rp + jt + c * W) + acc[a][c]);
}

inline int64_t apply_tall_units(int64_t nb, int64_t r, int64_t rp, int W) {
  return (nb + 3) / 4 * ((rp / W + 3) / 4) * (r / apply_tall_interval(r));
}

template <typename S, typename F, typename T>
SK_INLINE void apply_tall(const S* x, const S* __restrict d, int64_t nb, int64_t r,
                          int64_t rp, const S* __restrict cm, const S* __restrict e,
                          S* y, F&& between, T&& tile_end) {
  constexpr int W = VecOf<S>::W;
  for (int64_t row0 = 0; row0 < nb; row0 += 4) {  // scratch has a multiple of 4 rows
    for (int64_t jt = 0; jt < rp; jt += 4 * W) {
      switch (std::min<int64_t>(4, (rp - jt) / W)) {
        case 4: apply_tall_tile<S, 4>(x, d, row0, jt, r, rp, cm, e, y, between); break;
        case 3: apply_tall_tile<S, 3>(x, d, row0, jt, r, rp, cm, e, y, between); break;
        case 2: apply_tall_tile<S, 2>(x, d, row0, jt, r, rp, cm, e, y, between); break;
        default: apply_tall_tile<S, 1>(x, d, row0, jt, r, rp, cm, e, y, between); break;
      }
      tile_end();
    }
  }
}

// Wide: A-rows j of y = x_j + sum_i Cm[i, j] x_i + E[i, j] d_i over len (a multiple of 4W)
// columns; Cm, E are r4 x r4 (zero pad), x, d, y have r4 rows of `stride` columns. Register
// tiles of 4 rows x 4 vectors; each output element sums over i in order (x term, then d term).
template <typename S, typename F, typename T>
SK_INLINE void apply_wide(const S* __restrict x, int64_t sx, const S* __restrict d, int64_t r, int64_t r4,
                          int64_t stride, int64_t len, const S* __restrict cm,
                          const S* __restrict e, S* __restrict y, F&& between, T&& tile_end) {
  constexpr int W = VecOf<S>::W;
  constexpr int NV = 4;
  for (int64_t j0 = 0; j0 < r4; j0 += 4) {
    for (int64_t k = 0; k < len; k += NV * W) {
      vec<S> acc[4][NV];
      for (int b = 0; b < 4; ++b)
        for (int c = 0; c < NV; ++c) acc[b][c] = vec<S>{};
      for (int64_t i = 0; i < r; ++i) {
        vec<S> xv[NV], dv[NV];
        for (int c = 0; c < NV; ++c) {
          xv[c] = vload(x + i * sx + k + c * W);
          dv[c] = vload(d + i * stride + k + c * W);
        }
        for (int b = 0; b < 4; ++b) {
          const S cb = cm[i * r4 + j0 + b], eb = e[i * r4 + j0 + b];
          for (int c = 0; c < NV; ++c) {
            acc[b][c] += cb * xv[c];
            acc[b][c] += eb * dv[c];
          }
        }
        if ((i & (kApplyRowsPerSlice - 1)) == kApplyRowsPerSlice - 1) between();
      }
      for (int b = 0; b < 4; ++b) {
        const S* xr = x + (j0 + b) * sx + k;
        for (int c = 0; c < NV; ++c)
          vstore(y + (j0 + b) * stride + k + c * W, vload(xr + c * W) + acc[b][c]);
      }
      tile_end();
    }
  }
}

// ----------------------------------------------------------------------- bucket description
enum Slot { kP = 0, kG = 1, kM = 2, kV = 3, kVmax = 4, kSlots = 5 };

struct Factor {
  char* ptr[kSlots];  // base of this matrix in each tensor (nullptr: unused slot)
  int64_t ld[kSlots];  // tall: stride between rows of X; wide: stride between rows of A = X^T
  int64_t bc_index;    // which column of bc (the tensor of the list)
};

struct Geometry {
  int64_t n = 0, r = 0;
  bool wide = false;
  int64_t ra = 0;       // accumulator / coefficient dim (tall: rp, wide: r4)
  int64_t rp = 0;       // tall: r rounded up to W
  int64_t r4 = 0;       // wide: r rounded up to 4
  int64_t block = 0;    // rows of X per sub-block (tall: multiple of 4; wide: multiple of 4W)
  int64_t nchunks = 0;
  int64_t scratch = 0;  // elements of each of the x, d, y scratch arrays
};

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

Geometry make_geometry(int64_t n, int64_t r, bool wide, int W) {
  Geometry geo;
  geo.n = n;
  geo.r = r;
  geo.wide = wide;
  geo.nchunks = (n + kChunkRows - 1) / kChunkRows;
  if (!wide) {
    geo.rp = round_up(r, W);
    geo.ra = geo.rp;
    geo.block = std::max<int64_t>(4, (kScratchElems / geo.rp) / 4 * 4);
    geo.scratch = geo.block * geo.rp;
  } else {
    geo.r4 = round_up(r, 4);
    geo.ra = geo.r4;
    geo.block = std::max<int64_t>(
        4 * W, std::min<int64_t>(kChunkRows, kWideScratchElems / geo.r4) / (4 * W) * (4 * W));
    geo.scratch = geo.block * geo.r4;
  }
  return geo;
}

// Offsets (in elements) of the matrices of a (..., a, b) tensor, batch dims in row-major order.
std::vector<int64_t> batch_offsets(const at::Tensor& t) {
  const int64_t nb = t.dim() - 2;
  int64_t count = 1;
  for (int64_t i = 0; i < nb; ++i) count *= t.size(i);
  std::vector<int64_t> out(count, 0);
  for (int64_t idx = 0; idx < count; ++idx) {
    int64_t rem = idx, off = 0;
    for (int64_t dim = nb - 1; dim >= 0; --dim) {
      off += (rem % t.size(dim)) * t.stride(dim);
      rem /= t.size(dim);
    }
    out[idx] = off;
  }
  return out;
}

at::ScalarType working_type(at::ScalarType p) {
  return p == at::kDouble ? at::kDouble : at::kFloat;
}

struct Bucket {
  Geometry geo;
  std::vector<Factor> factors;
  int64_t lists = 0;           // tensors per list (P)
  std::vector<int64_t> batch;  // batch shape of one tensor
  at::ScalarType pdtype;
  at::ScalarType sdtype;
};

// Validates the lists and builds the per-matrix pointers. `slots` are the lists in Slot order
// (an empty list: slot unused).
Bucket describe(const char* op, const std::vector<at::TensorList>& slots, bool row_orthonormal) {
  const at::TensorList params = slots[kP];
  Bucket bk;
  bk.lists = static_cast<int64_t>(params.size());
  if (bk.lists == 0) return bk;
  const at::Tensor& p0 = params[0];
  TORCH_CHECK(p0.dim() >= 2, "stiefel_kernels::", op, ": a Stiefel factor needs at least 2 dims, got shape ",
              p0.sizes());
  bk.pdtype = p0.scalar_type();
  TORCH_CHECK(bk.pdtype == at::kFloat || bk.pdtype == at::kDouble || bk.pdtype == at::kBFloat16 ||
                  bk.pdtype == at::kHalf,
              "stiefel_kernels::", op, ": parameters must be float32, float64, bfloat16 or float16, got ",
              bk.pdtype);
  bk.sdtype = working_type(bk.pdtype);
  const int64_t a = p0.size(-2), b = p0.size(-1);
  const int64_t n = row_orthonormal ? b : a, r = row_orthonormal ? a : b;
  // n < r is allowed: a shard of a factor (FSDP) may hold fewer rows than r, or none
  bk.batch.assign(p0.sizes().begin(), p0.sizes().end() - 2);
  static const char* names[kSlots] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};
  bool wide_ok = true, tall_ok = true;
  for (int s = 0; s < kSlots; ++s) {
    const at::TensorList list = slots[s];
    if (list.empty()) continue;
    TORCH_CHECK(static_cast<int64_t>(list.size()) == bk.lists, "stiefel_kernels::", op, ": ", names[s],
                " has ", list.size(), " tensors, params has ", bk.lists);
    const at::ScalarType want = (s == kP || s == kG) ? bk.pdtype : bk.sdtype;
    for (const at::Tensor& t : list) {
      TORCH_CHECK(t.device().is_cpu(), "stiefel_kernels::", op, ": expected CPU tensors, ", names[s],
                  " has one on ", t.device());
      TORCH_CHECK(t.sizes() == p0.sizes(), "stiefel_kernels::", op, ": every tensor must have the shape ",
                  p0.sizes(), " of params[0], ", names[s], " has one of shape ", t.sizes());
      TORCH_CHECK(t.scalar_type() == want, "stiefel_kernels::", op, ": ", names[s], " must be ", want,
                  " (parameters are ", bk.pdtype, "), got ", t.scalar_type());
      const int64_t sn = row_orthonormal ? t.stride(-1) : t.stride(-2);
      const int64_t sr = row_orthonormal ? t.stride(-2) : t.stride(-1);
      wide_ok = wide_ok && (sn == 1 || n == 1);
      tall_ok = tall_ok && (sr == 1 || r == 1);
    }
  }
  TORCH_CHECK(wide_ok || tall_ok, "stiefel_kernels::", op, ": every tensor must have unit stride along "
              "the same one of its last two dims (the long side for all, or the short side for all)");
  const bool wide = wide_ok;  // unit stride along n: long contiguous runs
  const int W = bk.sdtype == at::kDouble ? VecOf<double>::W : VecOf<float>::W;
  bk.geo = make_geometry(n, r, wide, W);
  if (n == 0 || r == 0) return bk;

  std::vector<std::vector<int64_t>> offsets(kSlots);
  const int64_t per = c10::multiply_integers(bk.batch);
  bk.factors.resize(bk.lists * per);
  for (int64_t t = 0; t < bk.lists; ++t) {
    for (int s = 0; s < kSlots; ++s) {
      if (slots[s].empty()) continue;
      const at::Tensor& ten = slots[s][t];
      const std::vector<int64_t> offs = batch_offsets(ten);
      const int64_t sn = row_orthonormal ? ten.stride(-1) : ten.stride(-2);
      const int64_t sr = row_orthonormal ? ten.stride(-2) : ten.stride(-1);
      for (int64_t j = 0; j < per; ++j) {
        Factor& f = bk.factors[t * per + j];
        f.ptr[s] = static_cast<char*>(ten.data_ptr()) + offs[j] * static_cast<int64_t>(ten.element_size());
        f.ld[s] = wide ? sr : sn;
        f.bc_index = t;
      }
    }
    for (int s = 0; s < kSlots; ++s) {
      if (!slots[s].empty()) continue;
      for (int64_t j = 0; j < per; ++j) {
        bk.factors[t * per + j].ptr[s] = nullptr;
        bk.factors[t * per + j].ld[s] = 0;
      }
    }
  }
  return bk;
}

template <typename S>
Hyper<S> make_hyper(double beta1, double beta2, double eps, bool maximize) {
  Hyper<S> h;
  const S w = static_cast<S>(1.0 - beta1);  // torch: Scalar weight -> opmath
  h.lerp_small = std::abs(w) < S(0.5);
  h.lerp_w = h.lerp_small ? w : w - S(1);
  h.beta2 = static_cast<S>(beta2);
  h.one_minus_beta2 = static_cast<S>(1.0 - beta2);
  h.eps = static_cast<S>(eps);
  h.maximize = maximize;
  return h;
}

// Per-thread scratch of one parallel_for range: two x/d buffers (the sub-block being consumed
// by the micro-kernels and the next one being filled, see Producer), y, the r x r accumulators.
template <typename S>
struct Scratch {
  std::vector<S> buf;
  S *x[2], *d[2], *y, *K, *G, *H, *cm, *e;
  explicit Scratch(const Geometry& geo) {
    const int64_t rr = geo.ra * geo.ra;
    const int64_t pad = 64 / sizeof(S);  // slack so that vector tails never leave the buffer
    buf.assign(5 * (geo.scratch + pad) + 5 * (rr + pad) + pad, S(0));
    S* q = buf.data();
    // 64-byte alignment of every array (vload/vstore are unaligned-safe; this only avoids splits)
    q += (pad - (reinterpret_cast<uintptr_t>(q) / sizeof(S)) % pad) % pad;
    const int64_t big = round_up(geo.scratch + pad, pad), small = round_up(rr + pad, pad);
    x[0] = q; q += big;
    x[1] = q; q += big;
    d[0] = q; q += big;
    d[1] = q; q += big;
    y = q; q += big;
    K = q; q += small;
    G = q; q += small;
    H = q; q += small;
    cm = q; q += small;
    e = q;
  }
};

// ----------------------------------------------------------------------- sub-block pipeline
// Each parallel_for range walks its sub-blocks (rows [b0, b0 + nb) of one item = one factor's
// chunk) in order: the elementwise part of sub-block q + 1 (moments, D, x into scratch) is done
// next to sub-block q's register tiles (double-buffered scratch), and sub-block q + 2 is
// prefetched from inside them (see "Speed" above). The arithmetic of every element and of every
// Gram sum is the same whatever the overlap (same expressions, same order).
struct Blk {
  int64_t item = -1, b0 = 0, nb = 0;
  bool valid() const { return item >= 0; }
};

SK_INLINE Blk first_blk(const Geometry& geo, int64_t begin, int64_t end) {
  Blk b;
  if (begin >= end) return b;
  b.item = begin;
  b.b0 = (begin % geo.nchunks) * kChunkRows;
  b.nb = std::min(geo.block, std::min(geo.n, b.b0 + kChunkRows) - b.b0);
  return b;
}
SK_INLINE Blk next_blk(const Geometry& geo, const Blk& cur, int64_t end) {
  Blk b;
  if (!cur.valid()) return b;
  const int64_t chunk_end = std::min(geo.n, (cur.item % geo.nchunks) * kChunkRows + kChunkRows);
  if (cur.b0 + cur.nb < chunk_end) {
    b.item = cur.item;
    b.b0 = cur.b0 + cur.nb;
    b.nb = std::min(geo.block, chunk_end - b.b0);
    return b;
  }
  return first_blk(geo, cur.item + 1, end);
}

// The elementwise work of one sub-block as `nrun` contiguous runs of `runlen` elements (wide: a
// row of A per run; tall: one run when every tensor is packed, else one row of X per run).
template <typename P, typename S>
struct Runs {
  const P* g = nullptr;
  S* m = nullptr;
  S* v = nullptr;
  S* vmax = nullptr;
  const P* p = nullptr;
  int64_t ldg = 0, ldm = 0, ldv = 0, ldx = 0, ldp = 0;
  int64_t nrun = 0, runlen = 0;
  S* dd = nullptr;  // scratch destinations (dstride apart)
  S* dx = nullptr;
  int64_t dstride = 0;
  int64_t pad_to = 0;  // wide: scratch columns [runlen, pad_to) of each run are zeroed
  // x read in place by the micro-kernels (float32 parameters laid out as the scratch needs them:
  // no padding rows, columns or tail), else converted into dx
  bool direct_x = false;
  const S* x = nullptr;  // what the micro-kernels read: the parameters or dx
  int64_t xstride = 0;
};

template <typename P, typename S>
SK_INLINE Runs<P, S> make_runs(const Geometry& geo, const Factor& f, const Blk& blk, S* dd, S* dx,
                               int64_t pad_multiple) {
  Runs<P, S> R;
  if (!blk.valid()) return R;
  const int64_t r = geo.r;
  int64_t off[kSlots];
  int64_t ld[kSlots];
  if (geo.wide) {
    for (int s = 0; s < kSlots; ++s) { off[s] = blk.b0; ld[s] = f.ld[s]; }
    R.nrun = r;
    R.runlen = blk.nb;
    R.dstride = geo.block;
    R.pad_to = round_up(blk.nb, pad_multiple);
  } else {
    bool flat = geo.rp == r;
    for (int s = 0; s < kSlots; ++s) flat = flat && (f.ptr[s] == nullptr || f.ld[s] == r);
    if (flat) {
      for (int s = 0; s < kSlots; ++s) { off[s] = blk.b0 * r; ld[s] = 0; }
      R.nrun = 1;
      R.runlen = blk.nb * r;
    } else {
      for (int s = 0; s < kSlots; ++s) { off[s] = blk.b0 * f.ld[s]; ld[s] = f.ld[s]; }
      R.nrun = blk.nb;
      R.runlen = r;
    }
    R.dstride = geo.rp;
    R.pad_to = R.runlen;
  }
  if (f.ptr[kG]) R.g = reinterpret_cast<const P*>(f.ptr[kG]) + off[kG];
  R.m = reinterpret_cast<S*>(f.ptr[kM]) + off[kM];
  R.v = reinterpret_cast<S*>(f.ptr[kV]) + off[kV];
  if (f.ptr[kVmax]) R.vmax = reinterpret_cast<S*>(f.ptr[kVmax]) + off[kVmax];
  R.p = reinterpret_cast<const P*>(f.ptr[kP]) + off[kP];
  R.ldg = ld[kG]; R.ldm = ld[kM]; R.ldv = ld[kV]; R.ldx = ld[kVmax]; R.ldp = ld[kP];
  R.dd = dd;
  R.dx = dx;
  R.x = dx;
  R.xstride = R.dstride;
  if constexpr (std::is_same_v<P, S>) {
    if (geo.wide) {
      R.direct_x = r % 4 == 0 && blk.nb % pad_multiple == 0;
      R.xstride = R.direct_x ? f.ld[kP] : R.dstride;
    } else {
      R.direct_x = R.nrun == 1 && blk.nb % 4 == 0;  // packed, whole groups of 4 rows (apply_tall)
    }
    if (R.direct_x) R.x = R.p;
  }
  return R;
}

// Fills one sub-block's scratch run by run in slices (kPass1: moments and D from g, m, v; else D
// from m, v).
template <typename P, typename S, bool kPass1, bool kAms>
struct Producer {
  static constexpr int64_t kPiece = 64;
  Runs<P, S> R;
  const Hyper<S>* h = nullptr;
  S eps = 0, bc1 = 1, bc2 = 1;
  int64_t run = 0, pos = 0;

  bool done() const { return run >= R.nrun; }
  int64_t total() const { return R.nrun * R.runlen; }

  SK_INLINE void step(int64_t budget) {
    while (budget > 0 && run < R.nrun) {
      const int64_t len = std::min(kPiece, R.runlen - pos);
      S* dd = R.dd + run * R.dstride + pos;
      S* dx = R.dx + run * R.dstride + pos;
      const int64_t om = run * R.ldm + pos, ov = run * R.ldv + pos, op = run * R.ldp + pos;
      if constexpr (kPass1) {
        const int64_t og = run * R.ldg + pos, ox = run * R.ldx + pos;
        moments<P, S, kAms>(R.g + og, R.m + om, R.v + ov, kAms ? R.vmax + ox : nullptr, dd, len, *h,
                            bc1, bc2);
      } else {
        direction<S>(R.m + om, R.v + ov, dd, len, eps, bc1, bc2);
      }
      if (!R.direct_x) convert_in<P, S>(R.p + op, dx, len);
      pos += len;
      budget -= len;
      if (pos == R.runlen) {
        if (R.pad_to > R.runlen) {
          std::fill(R.dd + run * R.dstride + R.runlen, R.dd + run * R.dstride + R.pad_to, S(0));
          if (!R.direct_x) std::fill(R.dx + run * R.dstride + R.runlen, R.dx + run * R.dstride + R.pad_to, S(0));
        }
        ++run;
        pos = 0;
      }
    }
  }
};

// Prefetches one sub-block's inputs a line at a time (`step(units)`: `units` lines of each
// array of the working dtype; half a line of a 2-byte parameter or gradient, whose lines are
// then asked for twice), from inside the micro-kernels of the sub-block two before it: a
// prefetch needs no vector register, so these hand-overs spill nothing, and the stream of the
// sub-block after next comes in while the FMA units work.
template <typename P, typename S, bool kPass1, bool kAms>
struct Prefetcher {
  static constexpr int64_t kUnit = 64 / static_cast<int64_t>(sizeof(S));  // elements of S per line
  Runs<P, S> R;
  int64_t run = 0, pos = 0;

  int64_t total() const { return R.nrun * ((R.runlen + kUnit - 1) / kUnit); }

  SK_INLINE void step(int64_t units) {
    for (; units > 0 && run < R.nrun; --units) {
      __builtin_prefetch(R.m + run * R.ldm + pos, kPass1, 3);
      __builtin_prefetch(R.v + run * R.ldv + pos, kPass1, 3);
      __builtin_prefetch(R.p + run * R.ldp + pos, !kPass1, 3);
      if constexpr (kPass1) {
        __builtin_prefetch(R.g + run * R.ldg + pos, 0, 3);
        if constexpr (kAms) __builtin_prefetch(R.vmax + run * R.ldx + pos, 1, 3);
      }
      pos += kUnit;
      if (pos >= R.runlen) {
        ++run;
        pos = 0;
      }
    }
  }
};

// ----------------------------------------------------------------------- pass 1
template <typename S>
struct Pass1Ctx {
  const Bucket* bk;
  Hyper<S> hyp;
  const double* bc;  // (2, P)
  S* partials;       // (F, nchunks, 3, r, r)
};

template <typename S>
SK_INLINE void write_partials(const Pass1Ctx<S>& cx, int64_t item, Scratch<S>& sc) {
  const int64_t r = cx.bk->geo.r, ra = cx.bk->geo.ra;
  S* ok = cx.partials + item * 3 * r * r;
  S* og = ok + r * r;
  S* oh = og + r * r;
  for (int64_t i = 0; i < r; ++i) {
    std::memcpy(og + i * r, sc.G + i * ra, sizeof(S) * r);
    // K, H: their upper triangles were computed; j >= i from row i, j < i mirrored from column i
    std::memcpy(ok + i * r + i, sc.K + i * ra + i, sizeof(S) * (r - i));
    std::memcpy(oh + i * r + i, sc.H + i * ra + i, sizeof(S) * (r - i));
    for (int64_t j = 0; j < i; ++j) {
      ok[i * r + j] = sc.K[j * ra + i];
      oh[i * r + j] = sc.H[j * ra + i];
    }
  }
}

template <typename P, typename S, bool kAms>
SK_INLINE void pass1_range_impl(const Pass1Ctx<S>& cx, int64_t begin, int64_t end, Scratch<S>& sc) {
  const Bucket& bk = *cx.bk;
  const Geometry& geo = bk.geo;
  constexpr int W = VecOf<S>::W;
  const int64_t ra = geo.ra;
  using Prod = Producer<P, S, true, kAms>;
  auto make_prod = [&](const Blk& b, int buf) {
    Prod pr;
    if (!b.valid()) return pr;
    const Factor& f = bk.factors[b.item / geo.nchunks];
    pr.R = make_runs<P, S>(geo, f, b, sc.d[buf], sc.x[buf], W);
    pr.h = &cx.hyp;
    pr.bc1 = static_cast<S>(cx.bc[f.bc_index]);
    pr.bc2 = static_cast<S>(cx.bc[bk.lists + f.bc_index]);
    return pr;
  };
  auto make_pf = [&](const Blk& b) {
    Prefetcher<P, S, true, kAms> pf;
    if (b.valid()) pf.R = make_runs<P, S>(geo, bk.factors[b.item / geo.nchunks], b, nullptr, nullptr, W);
    return pf;
  };
  Blk cur = first_blk(geo, begin, end);
  if (!cur.valid()) return;
  Blk nxt = next_blk(geo, cur, end);
  Blk nn = next_blk(geo, nxt, end);
  int buf = 0;
  make_pf(nxt).step(INT64_MAX);  // the range's first sub-block has no tiles before it
  Prod prev = make_prod(cur, 0);
  prev.step(prev.total());
  std::fill(sc.K, sc.K + ra * ra, S(0));
  std::fill(sc.G, sc.G + ra * ra, S(0));
  std::fill(sc.H, sc.H + ra * ra, S(0));
  while (cur.valid()) {
    // the next sub-block's moments first, then the tiles, which prefetch the one after it
    Prod pr = make_prod(nxt, buf ^ 1);
    pr.step(pr.total());
    auto pf = make_pf(nn);
    const S* x = prev.R.x;
    const int64_t sx = prev.R.xstride;
    const S* d = sc.d[buf];
    if (!geo.wide) {
      const int64_t rp = geo.rp;
      const int64_t units = std::max<int64_t>(1, gram_tall_units(cur.nb, rp, W));
      const int64_t quota = (pf.total() + units - 1) / units;
      gram_tall<S>(x, d, cur.nb, rp, sc.K, sc.G, sc.H, [&]() __attribute__((always_inline)) { pf.step(quota); });
    } else {
      const int64_t t4 = geo.r4 / 4, len = round_up(cur.nb, W);
      const int64_t units = std::max<int64_t>(1, (t4 * (t4 + 1) + t4 * t4) * (len / W / kWideVecsPerSlice));
      const int64_t quota = (pf.total() + units - 1) / units;
      gram_wide<S>(x, sx, d, geo.r4, geo.block, len, sc.K, sc.G, sc.H,
                   [&]() __attribute__((always_inline)) { pf.step(quota); });
    }
    pf.step(pf.total());  // whatever prefetches the hand-overs left
    prev = pr;
    if (!nxt.valid() || nxt.item != cur.item) {
      write_partials(cx, cur.item, sc);
      std::fill(sc.K, sc.K + ra * ra, S(0));
      std::fill(sc.G, sc.G + ra * ra, S(0));
      std::fill(sc.H, sc.H + ra * ra, S(0));
    }
    cur = nxt;
    nxt = nn;
    nn = next_blk(geo, nn, end);
    buf ^= 1;
  }
}

#define SK_PASS1_ITEM(NAME, P, S, AMS)                                                         \
  SK_CLONES void NAME(const Pass1Ctx<S>& cx, int64_t begin, int64_t end, Scratch<S>& sc) {   \
    pass1_range_impl<P, S, AMS>(cx, begin, end, sc);                                         \
  }
SK_PASS1_ITEM(pass1_f32, float, float, false)
SK_PASS1_ITEM(pass1_f32_ams, float, float, true)
SK_PASS1_ITEM(pass1_f64, double, double, false)
SK_PASS1_ITEM(pass1_f64_ams, double, double, true)
SK_PASS1_ITEM(pass1_bf16, c10::BFloat16, float, false)
SK_PASS1_ITEM(pass1_bf16_ams, c10::BFloat16, float, true)
SK_PASS1_ITEM(pass1_f16, c10::Half, float, false)
SK_PASS1_ITEM(pass1_f16_ams, c10::Half, float, true)
#undef SK_PASS1_ITEM

using Pass1Fn32 = void (*)(const Pass1Ctx<float>&, int64_t, int64_t, Scratch<float>&);

// The shape of pass 1's output for a bucket: (P, *batch, 3, r, r).
std::vector<int64_t> grams_shape(const Bucket& bk) {
  std::vector<int64_t> shape{bk.lists};
  shape.insert(shape.end(), bk.batch.begin(), bk.batch.end());
  shape.insert(shape.end(), {3, bk.geo.r, bk.geo.r});
  return shape;
}

// Pass 1 into `out` (grams_shape(bk), the working dtype S, contiguous).
template <typename S>
void run_pass1(const Bucket& bk, const at::Tensor& bc, double beta1, double beta2, double eps,
               bool amsgrad, bool maximize, const at::Tensor& out) {
  const Geometry& geo = bk.geo;
  const int64_t r = geo.r;
  const auto opts = at::TensorOptions().dtype(bk.sdtype).device(at::kCPU);
  if (out.numel() == 0) return;
  if (geo.n == 0) {  // no rows (an empty shard): zero sums
    out.zero_();
    return;
  }
  const int64_t nf = static_cast<int64_t>(bk.factors.size());
  const int64_t items = nf * geo.nchunks;
  // one chunk per factor (n <= kChunkRows): the partials are the sums, written in place (the
  // float64 chunk sum below would give back the same bits); no buffer, no extra pass
  const bool one_chunk = geo.nchunks == 1;
  at::Tensor partials = one_chunk ? out : at::empty({items * 3 * r * r}, opts);
  at::Tensor bcd = bc.to(at::kDouble).contiguous();
  Pass1Ctx<S> cx{&bk, make_hyper<S>(beta1, beta2, eps, maximize), bcd.data_ptr<double>(),
                 partials.data_ptr<S>()};
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch<S> sc(geo);
    if constexpr (std::is_same_v<S, double>) {
      (amsgrad ? pass1_f64_ams : pass1_f64)(cx, begin, end, sc);
    } else {
      Pass1Fn32 fn = nullptr;
      switch (bk.pdtype) {
        case at::kFloat: fn = amsgrad ? pass1_f32_ams : pass1_f32; break;
        case at::kBFloat16: fn = amsgrad ? pass1_bf16_ams : pass1_bf16; break;
        default: fn = amsgrad ? pass1_f16_ams : pass1_f16; break;
      }
      fn(cx, begin, end, sc);
    }
  });
  if (one_chunk) return;
  // chunk partials added in float64 in chunk order (independent of the thread count)
  const S* part = partials.data_ptr<S>();
  S* o = out.data_ptr<S>();
  const int64_t per = 3 * r * r, nchunks = geo.nchunks;
  at::parallel_for(0, nf, 1, [&](int64_t begin, int64_t end) {
    for (int64_t fi = begin; fi < end; ++fi) {
      for (int64_t e = 0; e < per; ++e) {
        double acc = 0.0;
        for (int64_t c = 0; c < nchunks; ++c) acc += static_cast<double>(part[(fi * nchunks + c) * per + e]);
        o[fi * per + e] = static_cast<S>(acc);
      }
    }
  });
}

void check_bc(const char* op, const at::Tensor& bc, int64_t lists) {
  TORCH_CHECK(bc.dim() == 2 && bc.size(0) == 2 && bc.size(1) == lists, "stiefel_kernels::", op,
              ": bc must have shape (2, ", lists, ") (rows: 1 - beta1^t, sqrt(1 - beta2^t)), got ",
              bc.sizes());
  TORCH_CHECK(bc.is_floating_point() && bc.device().is_cpu(), "stiefel_kernels::", op,
              ": bc must be a floating-point CPU tensor, got ", bc.scalar_type(), " on ", bc.device());
}

// The checks both pass-1 ops make, and their bucket.
Bucket pass1_bucket(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const at::Tensor& bc,
                    bool amsgrad, bool row_orthonormal) {
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  exp_avg_sqs.size() == params.size(),
              "stiefel_kernels::", op, ": params, grads, exp_avgs, exp_avg_sqs must have the same length, got ",
              params.size(), ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == params.size(), "stiefel_kernels::", op,
              ": amsgrad needs one max_exp_avg_sq per parameter, got ", max_exp_avg_sqs.size(), " for ",
              params.size());
  std::vector<at::TensorList> slots{params, grads, exp_avgs, exp_avg_sqs,
                                    amsgrad ? max_exp_avg_sqs : at::TensorList()};
  Bucket bk = describe(op, slots, row_orthonormal);
  check_bc(op, bc, bk.lists);
  return bk;
}

template <typename... A>
void dispatch_pass1(const Bucket& bk, A&&... args) {
  if (bk.sdtype == at::kDouble) run_pass1<double>(bk, std::forward<A>(args)...);
  else run_pass1<float>(bk, std::forward<A>(args)...);
}

at::Tensor stiefel_adamw_pass1_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                   const at::Tensor& bc, double beta1, double beta2, double eps,
                                   bool amsgrad, bool maximize, bool row_orthonormal) {
  const Bucket bk = pass1_bucket("stiefel_adamw_pass1", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                 bc, amsgrad, row_orthonormal);
  if (bk.lists == 0) return at::empty({0, 3, 0, 0}, bc.options().dtype(at::kFloat));
  at::Tensor out = at::empty(grams_shape(bk), at::TensorOptions().dtype(bk.sdtype).device(at::kCPU));
  dispatch_pass1(bk, bc, beta1, beta2, eps, amsgrad, maximize, out);
  return out;
}

// stiefel_adamw_pass1 into a caller's buffer: an optimizer keeps one per bucket, so no
// (P, *batch, 3, r, r) allocation per step (GPT-2's 144 factors of 768 x 64: 7 MB, a quarter of
// the parameters' bytes) and no page faults when the system has taken that memory back.
void stiefel_adamw_pass1_into_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                  const at::Tensor& bc, double beta1, double beta2, double eps,
                                  bool amsgrad, bool maximize, bool row_orthonormal, const at::Tensor& grams) {
  const char* op = "stiefel_adamw_pass1_into";
  const Bucket bk = pass1_bucket(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc, amsgrad,
                                 row_orthonormal);
  const std::vector<int64_t> want = bk.lists == 0 ? std::vector<int64_t>{0, 3, 0, 0} : grams_shape(bk);
  TORCH_CHECK(grams.device().is_cpu() && (bk.lists == 0 || grams.scalar_type() == bk.sdtype) &&
                  grams.sizes() == at::IntArrayRef(want) && grams.is_contiguous(),
              "stiefel_kernels::", op, ": grams must be a contiguous CPU tensor of shape ", at::IntArrayRef(want),
              " in the working dtype (float64 for float64 parameters, else float32), got shape ", grams.sizes(),
              ", ", grams.scalar_type(), grams.is_contiguous() ? "" : ", not contiguous", ", on ", grams.device());
  for (at::TensorList list : {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, at::TensorList(bc)})
    for (const at::Tensor& t : list)
      TORCH_CHECK(!may_share_memory(grams, t), "stiefel_kernels::", op,
                  ": grams must not share memory with the parameters, gradients, moments or bc");
  if (bk.lists == 0) return;
  dispatch_pass1(bk, bc, beta1, beta2, eps, amsgrad, maximize, grams);
}

// ----------------------------------------------------------------------- pass 2
template <typename S>
struct Pass2Ctx {
  const Bucket* bk;
  S eps;
  const double* bc;  // (2, P)
  // C and E, (F, r, r) contiguous, float32 or float64 as given (read into the per-factor scratch:
  // no converted copies of them per step)
  const void* c;
  const void* e;
  bool coef_f64;
};

template <typename P, typename S>
SK_INLINE void pass2_range_impl(const Pass2Ctx<S>& cx, int64_t begin, int64_t end, Scratch<S>& sc) {
  const Bucket& bk = *cx.bk;
  constexpr int W = VecOf<S>::W;
  // wide: sub-blocks of half pass 1's columns (measured faster at LoRA r = 16; the results of
  // pass 2 do not depend on the sub-blocks)
  Geometry geo = bk.geo;
  if (geo.wide) geo.block = std::max<int64_t>(4 * W, geo.block / 2 / (4 * W) * (4 * W));
  const int64_t r = geo.r, ra = geo.ra;
  using Prod = Producer<P, S, false, false>;
  auto make_prod = [&](const Blk& b, int buf) {
    Prod pr;
    if (!b.valid()) return pr;
    const Factor& f = bk.factors[b.item / geo.nchunks];
    pr.R = make_runs<P, S>(geo, f, b, sc.d[buf], sc.x[buf], 4 * W);
    pr.eps = cx.eps;
    pr.bc1 = static_cast<S>(cx.bc[f.bc_index]);
    pr.bc2 = static_cast<S>(cx.bc[bk.lists + f.bc_index]);
    return pr;
  };
  auto make_pf = [&](const Blk& b) {
    Prefetcher<P, S, false, false> pf;
    if (b.valid()) pf.R = make_runs<P, S>(geo, bk.factors[b.item / geo.nchunks], b, nullptr, nullptr, 4 * W);
    return pf;
  };
  Blk cur = first_blk(geo, begin, end);
  if (!cur.valid()) return;
  Blk nxt = next_blk(geo, cur, end);
  Blk nn = next_blk(geo, nxt, end);
  int buf = 0;
  make_pf(nxt).step(INT64_MAX);  // the range's first sub-block has no tiles before it
  Prod prev = make_prod(cur, 0);
  prev.step(prev.total());
  int64_t coef_factor = -1;
  while (cur.valid()) {
    const int64_t fi = cur.item / geo.nchunks;
    const Factor& f = bk.factors[fi];
    if (fi != coef_factor) {  // C - I (in float64, then rounded) and E, zero-padded to ra x ra
      auto load = [&](const void* base, int64_t idx) -> double {
        return cx.coef_f64 ? static_cast<const double*>(base)[idx]
                           : static_cast<double>(static_cast<const float*>(base)[idx]);
      };
      for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = 0; j < r; ++j) {
          const int64_t idx = (fi * r + i) * r + j;
          sc.cm[i * ra + j] = static_cast<S>(load(cx.c, idx) - (i == j ? 1.0 : 0.0));
          sc.e[i * ra + j] = static_cast<S>(load(cx.e, idx));
        }
      }
      coef_factor = fi;
    }
    // the next sub-block's D in slices at the ends of this one's tiles (where no accumulator is
    // live), the one after it prefetched from inside the tiles
    Prod pr = make_prod(nxt, buf ^ 1);
    auto pf = make_pf(nn);
    const S* x = prev.R.x;
    const int64_t sx = prev.R.xstride;
    const S* d = sc.d[buf];
    P* pp = reinterpret_cast<P*>(f.ptr[kP]);
    const int64_t b0 = cur.b0, nb = cur.nb;
    if (!geo.wide) {
      const int64_t rp = geo.rp;
      const int64_t units = std::max<int64_t>(1, apply_tall_units(nb, r, rp, W));
      const int64_t tiles = std::max<int64_t>(1, (nb + 3) / 4 * ((rp / W + 3) / 4));
      // y straight into the parameters when x is read from them and one tile spans a whole row
      // (it reads rows row0..row0+3 in full before it writes them; no other tile reads them)
      bool in_place = false;
      if constexpr (std::is_same_v<P, S>) in_place = prev.R.direct_x && rp <= 4 * W && nb % 4 == 0;
      S* y = in_place ? reinterpret_cast<S*>(pp) + b0 * r : sc.y;
      const int64_t pquota = (pf.total() + units - 1) / units, dquota = (pr.total() + tiles - 1) / tiles;
      apply_tall<S>(x, d, nb, r, rp, sc.cm, sc.e, y, [&]() __attribute__((always_inline)) { pf.step(pquota); },
                    [&]() __attribute__((always_inline)) { pr.step(dquota); });
      const bool flat = rp == r && f.ld[kP] == r && f.ld[kM] == r && f.ld[kV] == r;
      if (in_place) {
        // written by apply_tall
      } else if (flat) {
        convert_out<P, S>(sc.y, pp + b0 * r, nb * r);
      } else {
        for (int64_t k = 0; k < nb; ++k) convert_out<P, S>(sc.y + k * rp, pp + (b0 + k) * f.ld[kP], r);
      }
    } else {
      const int64_t stride = geo.block, len = round_up(nb, 4 * W);
      const int64_t tiles = std::max<int64_t>(1, (geo.r4 / 4) * (len / (4 * W)));
      const int64_t units = std::max<int64_t>(1, tiles * (r / kApplyRowsPerSlice));
      const int64_t pquota = (pf.total() + units - 1) / units, dquota = (pr.total() + tiles - 1) / tiles;
      apply_wide<S>(x, sx, d, r, geo.r4, stride, len, sc.cm, sc.e, sc.y,
                    [&]() __attribute__((always_inline)) { pf.step(pquota); },
                    [&]() __attribute__((always_inline)) { pr.step(dquota); });
      for (int64_t i = 0; i < r; ++i) convert_out<P, S>(sc.y + i * stride, pp + i * f.ld[kP] + b0, nb);
    }
    pf.step(pf.total());
    pr.step(pr.total());  // whatever the slices left
    prev = pr;
    cur = nxt;
    nxt = nn;
    nn = next_blk(geo, nn, end);
    buf ^= 1;
  }
}

#define SK_PASS2_ITEM(NAME, P, S)                                                              \
  SK_CLONES void NAME(const Pass2Ctx<S>& cx, int64_t begin, int64_t end, Scratch<S>& sc) {   \
    pass2_range_impl<P, S>(cx, begin, end, sc);                                            \
  }
SK_PASS2_ITEM(pass2_f32, float, float)
SK_PASS2_ITEM(pass2_f64, double, double)
SK_PASS2_ITEM(pass2_bf16, c10::BFloat16, float)
SK_PASS2_ITEM(pass2_f16, c10::Half, float)
#undef SK_PASS2_ITEM

template <typename S>
void run_pass2(const Bucket& bk, const at::Tensor& bc, const at::Tensor& c, const at::Tensor& e, double eps) {
  const Geometry& geo = bk.geo;
  const int64_t nf = static_cast<int64_t>(bk.factors.size());
  if (nf == 0 || geo.n == 0 || geo.r == 0) return;
  at::Tensor bcd = bc.to(at::kDouble).contiguous();
  // float32 / float64 C and E are read as they are (the r x r step returns them in the working
  // dtype); another floating dtype, or two different ones, are converted to float64 first
  const bool same = c.scalar_type() == e.scalar_type();
  const bool native = same && (c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble);
  at::Tensor cd = native ? c.contiguous() : c.to(at::kDouble).contiguous();
  at::Tensor ed = native ? e.contiguous() : e.to(at::kDouble).contiguous();
  Pass2Ctx<S> cx{&bk, static_cast<S>(eps), bcd.data_ptr<double>(), cd.data_ptr(), ed.data_ptr(),
                 cd.scalar_type() == at::kDouble};
  at::parallel_for(0, nf * geo.nchunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<S> sc(geo);
    if constexpr (std::is_same_v<S, double>) {
      pass2_f64(cx, begin, end, sc);
    } else {
      switch (bk.pdtype) {
        case at::kFloat: pass2_f32(cx, begin, end, sc); break;
        case at::kBFloat16: pass2_bf16(cx, begin, end, sc); break;
        default: pass2_f16(cx, begin, end, sc); break;
      }
    }
  });
}

void stiefel_adamw_pass2_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             const at::Tensor& bc, const at::Tensor& c, const at::Tensor& e, double eps,
                             bool row_orthonormal) {
  const char* op = "stiefel_adamw_pass2";
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              "stiefel_kernels::", op, ": params, exp_avgs, exp_avg_sqs must have the same length, got ",
              params.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  std::vector<at::TensorList> slots{params, at::TensorList(), exp_avgs, exp_avg_sqs, at::TensorList()};
  const Bucket bk = describe(op, slots, row_orthonormal);
  check_bc(op, bc, bk.lists);
  if (bk.lists == 0) return;
  const int64_t nf = bk.lists * c10::multiply_integers(bk.batch);
  const int64_t r = bk.geo.r;
  for (const at::Tensor* t : {&c, &e}) {
    TORCH_CHECK(t->is_floating_point() && t->device().is_cpu(), "stiefel_kernels::", op,
                ": c and e must be floating-point CPU tensors, got ", t->scalar_type(), " on ", t->device());
    TORCH_CHECK(t->numel() == nf * r * r && (t->dim() < 2 || (t->size(-1) == r && t->size(-2) == r)),
                "stiefel_kernels::", op, ": c and e must hold ", nf, " matrices of ", r, " x ", r,
                " (shape (P, *batch, r, r)), got shape ", t->sizes());
  }
  if (bk.sdtype == at::kDouble) run_pass2<double>(bk, bc, c, e, eps);
  else run_pass2<float>(bk, bc, c, e, eps);
}

}  // namespace
}  // namespace stiefel_kernels

TORCH_LIBRARY_IMPL(stiefel_kernels, CPU, m) {
  m.impl("stiefel_adamw_pass1", &stiefel_kernels::stiefel_adamw_pass1_cpu);
  m.impl("stiefel_adamw_pass1_into", &stiefel_kernels::stiefel_adamw_pass1_into_cpu);
  m.impl("stiefel_adamw_pass2", &stiefel_kernels::stiefel_adamw_pass2_cpu);
}
