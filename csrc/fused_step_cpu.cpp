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
// copies sub-blocks of its rows into per-thread scratch (float32 for bf16/fp16/fp32 factors,
// float64 for fp64) in the storage orientation and runs register-tiled micro-kernels there:
//   * "tall" (unit stride along r, e.g. a stored n x r factor): outer-product tiles;
//   * "wide" (unit stride along n, e.g. LoRA's A, r x n): dot-product tiles over the long side.
// Gram sums: products accumulated in the working dtype inside a chunk (a fixed order), chunk
// partials written to a buffer and then added in float64 in chunk order, so the result does not
// depend on the thread count (gram.gram_pass's accuracy contract). K and H are symmetric: only
// their upper tiles are computed, the lower triangle is mirrored.
//
// Vectorization: GCC vector extensions of 64 bytes in functions compiled three times
// (x86-64-v4 / v3 / baseline, picked at load time: target_clones), like ops_cpu.cpp. at::vec is
// not used: in an extension compiled without torch's per-capability flags it is the generic
// array implementation, and its fmadd does not say whether it fuses, which the bit-exact moment
// update needs to control (explicit __builtin_fma there; no other multiply feeds an add in it).
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
#include <vector>

// The 64-byte vector types below only live inside always-inlined helpers of the cloned
// functions (no ABI boundary), so GCC's note on their calling convention does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace stiefel_kernels {
namespace {

// rows of X per Gram partial (gram.GRAM_CHUNK_ROWS)
constexpr int64_t kChunkRows = 4096;
// elements of one scratch array of a sub-block: tall 32 KiB float32 (L1), wide 128 KiB (L2: the
// dot-product tiles of the wide layout reduce their lanes once per sub-block, so longer rows pay)
constexpr int64_t kScratchElems = 8192;
constexpr int64_t kWideScratchElems = 32768;

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(STIEFEL_NO_TARGET_CLONES)
#define SK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SK_CLONES
#endif
#define SK_INLINE C10_ALWAYS_INLINE

template <typename S>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float T __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct VecOf<double> {
  typedef double T __attribute__((vector_size(64)));
  static constexpr int W = 8;
};
template <typename S>
using vec = typename VecOf<S>::T;

template <typename S>
SK_INLINE vec<S> vload(const S* p) {
  vec<S> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename S>
SK_INLINE void vstore(S* p, const vec<S>& v) {
  std::memcpy(p, &v, sizeof(v));
}

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
// Horizontal sums of 16 vectors, out[k] = sum of the lanes of v[k], by rounds of pair_add (each
// round halves the vectors and the lanes per input; the order is fixed).
template <typename S>
SK_INLINE void reduce16(const vec<S>* v, S* out) {
  constexpr int W = VecOf<S>::W;
  vec<S> t[16];
  for (int k = 0; k < 16; ++k) t[k] = v[k];
  int count = 16;
  for (int lanes = W; lanes > 1 && count > 1; lanes /= 2) {  // lanes per input vector
    for (int k = 0; k < count / 2; ++k) t[k] = pair_add(t[2 * k], t[2 * k + 1]);
    count /= 2;
  }
  // float: one vector, lane k = input k; double: two vectors of 8
  for (int k = 0; k < 16; ++k) out[k] = t[k / W][k % W];
}

SK_INLINE float fused(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
SK_INLINE double fused(double a, double b, double c) { return __builtin_fma(a, b, c); }

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
    const S mj = fused(w, gj - mo, small ? mo : gj);     // torch lerp_ (lerp_vec: fmadd)
    const S vb = v[j] * b2;                               // mul_(beta2)
    const S vj = fused(c2 * gj, gj, vb);                  // addcmul_(g, g, 1 - beta2)
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
template <typename S>
SK_INLINE void gram_tall(const S* __restrict x, const S* __restrict d, int64_t nb, int64_t rp,
                         S* __restrict K, S* __restrict G, S* __restrict H) {
  constexpr int W = VecOf<S>::W;
  for (int64_t it = 0; it < rp; it += 4) {
    for (int64_t jt = 0; jt < rp; jt += W) {
      if (jt + W > it) {  // the tile reaches the diagonal or lies above it: K, G, H
        vec<S> k[4], g[4], h[4];
        for (int a = 0; a < 4; ++a) {
          k[a] = vload(K + (it + a) * rp + jt);
          g[a] = vload(G + (it + a) * rp + jt);
          h[a] = vload(H + (it + a) * rp + jt);
        }
        for (int64_t row = 0; row < nb; ++row) {
          const S* xr = x + row * rp;
          const S* dr = d + row * rp;
          const vec<S> xb = vload(xr + jt), db = vload(dr + jt);
          for (int a = 0; a < 4; ++a) {
            const S xa = xr[it + a], da = dr[it + a];
            k[a] += xa * xb;
            g[a] += xa * db;
            h[a] += da * db;
          }
        }
        for (int a = 0; a < 4; ++a) {
          vstore(K + (it + a) * rp + jt, k[a]);
          vstore(G + (it + a) * rp + jt, g[a]);
          vstore(H + (it + a) * rp + jt, h[a]);
        }
      } else {  // strictly below the diagonal: G only
        vec<S> g[4];
        for (int a = 0; a < 4; ++a) g[a] = vload(G + (it + a) * rp + jt);
        for (int64_t row = 0; row < nb; ++row) {
          const S* xr = x + row * rp;
          const vec<S> db = vload(d + row * rp + jt);
          for (int a = 0; a < 4; ++a) g[a] += xr[it + a] * db;
        }
        for (int a = 0; a < 4; ++a) vstore(G + (it + a) * rp + jt, g[a]);
      }
    }
  }
}

// out[i0 + a, j0 + b] += sum_k u[i0 + a, k] w[j0 + b, k] over len (a multiple of W) columns.
template <typename S>
SK_INLINE void dot_tile(const S* __restrict u, const S* __restrict w, int64_t stride, int64_t len,
                        int64_t i0, int64_t j0, S* __restrict out, int64_t ra) {
  constexpr int W = VecOf<S>::W;
  vec<S> acc[4][4];
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) acc[a][b] = vec<S>{};
  for (int64_t k = 0; k < len; k += W) {
    vec<S> uv[4], wv[4];
    for (int a = 0; a < 4; ++a) uv[a] = vload(u + (i0 + a) * stride + k);
    for (int b = 0; b < 4; ++b) wv[b] = vload(w + (j0 + b) * stride + k);
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b) acc[a][b] += uv[a] * wv[b];
  }
  // 16 horizontal sums at once (a fixed pairwise tree): sums[a * 4 + b] = hsum(acc[a][b])
  S sums[16];
  reduce16<S>(&acc[0][0], sums);
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) out[(i0 + a) * ra + j0 + b] += sums[a * 4 + b];
}

// Wide scratch: x, d are r4 rows (rows >= r zero) of `stride` columns, the first len in use
// (len a multiple of W, columns past the valid ones zero). acc* are r4 x r4.
template <typename S>
SK_INLINE void gram_wide(const S* __restrict x, const S* __restrict d, int64_t r4, int64_t stride,
                         int64_t len, S* __restrict K, S* __restrict G, S* __restrict H) {
  for (int64_t i0 = 0; i0 < r4; i0 += 4) {
    for (int64_t j0 = 0; j0 < r4; j0 += 4) {
      if (j0 >= i0) {
        dot_tile(x, x, stride, len, i0, j0, K, r4);
        dot_tile(d, d, stride, len, i0, j0, H, r4);
      }
      dot_tile(x, d, stride, len, i0, j0, G, r4);
    }
  }
}

// ----------------------------------------------------------------------- pass-2 micro-kernels
// Tall: rows [0, nb) of x, d (rp columns) -> y = x + (x Cm + d E); Cm, E are rp x rp (zero pad).
template <typename S>
SK_INLINE void apply_tall(const S* __restrict x, const S* __restrict d, int64_t nb, int64_t r,
                          int64_t rp, const S* __restrict cm, const S* __restrict e,
                          S* __restrict y) {
  constexpr int W = VecOf<S>::W;
  for (int64_t row0 = 0; row0 < nb; row0 += 4) {  // scratch has a multiple of 4 rows
    for (int64_t jt = 0; jt < rp; jt += W) {
      vec<S> acc[4];
      for (int a = 0; a < 4; ++a) acc[a] = vec<S>{};
      for (int64_t i = 0; i < r; ++i) {
        const vec<S> cv = vload(cm + i * rp + jt), ev = vload(e + i * rp + jt);
        for (int a = 0; a < 4; ++a) {
          acc[a] += x[(row0 + a) * rp + i] * cv;
          acc[a] += d[(row0 + a) * rp + i] * ev;
        }
      }
      for (int a = 0; a < 4; ++a)
        vstore(y + (row0 + a) * rp + jt, vload(x + (row0 + a) * rp + jt) + acc[a]);
    }
  }
}

// Wide: A-rows j of y = x_j + sum_i Cm[i, j] x_i + E[i, j] d_i over len (a multiple of 2W)
// columns; Cm, E are r4 x r4 (zero pad), x, d, y have r4 rows of `stride` columns.
template <typename S>
SK_INLINE void apply_wide(const S* __restrict x, const S* __restrict d, int64_t r, int64_t r4,
                          int64_t stride, int64_t len, const S* __restrict cm,
                          const S* __restrict e, S* __restrict y) {
  constexpr int W = VecOf<S>::W;
  for (int64_t j0 = 0; j0 < r4; j0 += 4) {
    for (int64_t k = 0; k < len; k += 2 * W) {
      vec<S> acc[4][2];
      for (int b = 0; b < 4; ++b) acc[b][0] = acc[b][1] = vec<S>{};
      for (int64_t i = 0; i < r; ++i) {
        const vec<S> x0 = vload(x + i * stride + k), x1 = vload(x + i * stride + k + W);
        const vec<S> d0 = vload(d + i * stride + k), d1 = vload(d + i * stride + k + W);
        for (int b = 0; b < 4; ++b) {
          const S cb = cm[i * r4 + j0 + b], eb = e[i * r4 + j0 + b];
          acc[b][0] += cb * x0;
          acc[b][1] += cb * x1;
          acc[b][0] += eb * d0;
          acc[b][1] += eb * d1;
        }
      }
      for (int b = 0; b < 4; ++b) {
        const S* xr = x + (j0 + b) * stride + k;
        vstore(y + (j0 + b) * stride + k, vload(xr) + acc[b][0]);
        vstore(y + (j0 + b) * stride + k + W, vload(xr + W) + acc[b][1]);
      }
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
  int64_t block = 0;    // rows of X per sub-block (tall: multiple of 4; wide: multiple of 2W)
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
        2 * W, std::min<int64_t>(kChunkRows, kWideScratchElems / geo.r4) / (2 * W) * (2 * W));
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

// Per-thread scratch of one parallel_for range.
template <typename S>
struct Scratch {
  std::vector<S> buf;
  S *x, *d, *y, *K, *G, *H, *cm, *e;
  explicit Scratch(const Geometry& geo) {
    const int64_t rr = geo.ra * geo.ra;
    const int64_t pad = 64 / sizeof(S);  // slack so that vector tails never leave the buffer
    buf.assign(3 * (geo.scratch + pad) + 5 * (rr + pad), S(0));
    S* q = buf.data();
    x = q; q += geo.scratch + pad;
    d = q; q += geo.scratch + pad;
    y = q; q += geo.scratch + pad;
    K = q; q += rr + pad;
    G = q; q += rr + pad;
    H = q; q += rr + pad;
    cm = q; q += rr + pad;
    e = q;
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

template <typename P, typename S, bool kAms>
SK_INLINE void pass1_item_impl(const Pass1Ctx<S>& cx, int64_t item, Scratch<S>& sc) {
  const Bucket& bk = *cx.bk;
  const Geometry& geo = bk.geo;
  constexpr int W = VecOf<S>::W;
  const int64_t fi = item / geo.nchunks, chunk = item % geo.nchunks;
  const Factor& f = bk.factors[fi];
  const S bc1 = static_cast<S>(cx.bc[f.bc_index]);
  const S bc2 = static_cast<S>(cx.bc[bk.lists + f.bc_index]);
  const int64_t r = geo.r, ra = geo.ra;
  const int64_t row_begin = chunk * kChunkRows, row_end = std::min(geo.n, row_begin + kChunkRows);
  std::fill(sc.K, sc.K + ra * ra, S(0));
  std::fill(sc.G, sc.G + ra * ra, S(0));
  std::fill(sc.H, sc.H + ra * ra, S(0));
  const P* pp = reinterpret_cast<const P*>(f.ptr[kP]);
  const P* gp = reinterpret_cast<const P*>(f.ptr[kG]);
  S* mp = reinterpret_cast<S*>(f.ptr[kM]);
  S* vp = reinterpret_cast<S*>(f.ptr[kV]);
  S* xp = reinterpret_cast<S*>(f.ptr[kVmax]);
  for (int64_t b0 = row_begin; b0 < row_end; b0 += geo.block) {
    const int64_t nb = std::min(geo.block, row_end - b0);
    if (!geo.wide) {
      const int64_t rp = geo.rp;
      const bool flat = rp == r && f.ld[kP] == r && f.ld[kG] == r && f.ld[kM] == r && f.ld[kV] == r &&
                        (!kAms || f.ld[kVmax] == r);
      if (flat) {  // the sub-block is one contiguous run in every tensor
        const int64_t o = b0 * r;
        moments<P, S, kAms>(gp + o, mp + o, vp + o, kAms ? xp + o : nullptr, sc.d, nb * r, cx.hyp, bc1, bc2);
        convert_in<P, S>(pp + o, sc.x, nb * r);
      } else {
        for (int64_t k = 0; k < nb; ++k) {
          const int64_t row = b0 + k;
          moments<P, S, kAms>(gp + row * f.ld[kG], mp + row * f.ld[kM], vp + row * f.ld[kV],
                              kAms ? xp + row * f.ld[kVmax] : nullptr, sc.d + k * rp, r, cx.hyp, bc1, bc2);
          convert_in<P, S>(pp + row * f.ld[kP], sc.x + k * rp, r);
        }
      }
      gram_tall<S>(sc.x, sc.d, nb, rp, sc.K, sc.G, sc.H);
    } else {
      const int64_t stride = geo.block, len = round_up(nb, W);
      for (int64_t i = 0; i < r; ++i) {
        moments<P, S, kAms>(gp + i * f.ld[kG] + b0, mp + i * f.ld[kM] + b0, vp + i * f.ld[kV] + b0,
                            kAms ? xp + i * f.ld[kVmax] + b0 : nullptr, sc.d + i * stride, nb, cx.hyp,
                            bc1, bc2);
        convert_in<P, S>(pp + i * f.ld[kP] + b0, sc.x + i * stride, nb);
        if (len > nb) {
          std::fill(sc.d + i * stride + nb, sc.d + i * stride + len, S(0));
          std::fill(sc.x + i * stride + nb, sc.x + i * stride + len, S(0));
        }
      }
      gram_wide<S>(sc.x, sc.d, geo.r4, stride, len, sc.K, sc.G, sc.H);
    }
  }
  S* out = cx.partials + item * 3 * r * r;
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      const int64_t up = i <= j ? i * ra + j : j * ra + i;  // K, H: upper triangle computed
      out[i * r + j] = sc.K[up];
      out[r * r + i * r + j] = sc.G[i * ra + j];
      out[2 * r * r + i * r + j] = sc.H[up];
    }
  }
}

#define SK_PASS1_ITEM(NAME, P, S, AMS)                                                         \
  SK_CLONES void NAME(const Pass1Ctx<S>& cx, int64_t begin, int64_t end, Scratch<S>& sc) {   \
    for (int64_t item = begin; item < end; ++item) pass1_item_impl<P, S, AMS>(cx, item, sc); \
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

template <typename S>
at::Tensor run_pass1(const Bucket& bk, const at::Tensor& bc, double beta1, double beta2, double eps,
                     bool amsgrad, bool maximize) {
  const Geometry& geo = bk.geo;
  const int64_t r = geo.r;
  std::vector<int64_t> out_shape{bk.lists};
  out_shape.insert(out_shape.end(), bk.batch.begin(), bk.batch.end());
  out_shape.insert(out_shape.end(), {3, r, r});
  const auto opts = at::TensorOptions().dtype(bk.sdtype).device(at::kCPU);
  at::Tensor out = at::empty(out_shape, opts);
  if (out.numel() == 0) return out;
  if (geo.n == 0) return out.zero_();  // no rows (an empty shard): zero sums
  const int64_t nf = static_cast<int64_t>(bk.factors.size());
  const int64_t items = nf * geo.nchunks;
  at::Tensor partials = at::empty({items * 3 * r * r}, opts);
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
  return out;
}

void check_bc(const char* op, const at::Tensor& bc, int64_t lists) {
  TORCH_CHECK(bc.dim() == 2 && bc.size(0) == 2 && bc.size(1) == lists, "stiefel_kernels::", op,
              ": bc must have shape (2, ", lists, ") (rows: 1 - beta1^t, sqrt(1 - beta2^t)), got ",
              bc.sizes());
  TORCH_CHECK(bc.is_floating_point() && bc.device().is_cpu(), "stiefel_kernels::", op,
              ": bc must be a floating-point CPU tensor, got ", bc.scalar_type(), " on ", bc.device());
}

at::Tensor stiefel_adamw_pass1_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                   const at::Tensor& bc, double beta1, double beta2, double eps,
                                   bool amsgrad, bool maximize, bool row_orthonormal) {
  const char* op = "stiefel_adamw_pass1";
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  exp_avg_sqs.size() == params.size(),
              "stiefel_kernels::", op, ": params, grads, exp_avgs, exp_avg_sqs must have the same length, got ",
              params.size(), ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == params.size(), "stiefel_kernels::", op,
              ": amsgrad needs one max_exp_avg_sq per parameter, got ", max_exp_avg_sqs.size(), " for ",
              params.size());
  std::vector<at::TensorList> slots{params, grads, exp_avgs, exp_avg_sqs,
                                    amsgrad ? max_exp_avg_sqs : at::TensorList()};
  const Bucket bk = describe(op, slots, row_orthonormal);
  check_bc(op, bc, bk.lists);
  if (bk.lists == 0) return at::empty({0, 3, 0, 0}, bc.options().dtype(at::kFloat));
  return bk.sdtype == at::kDouble ? run_pass1<double>(bk, bc, beta1, beta2, eps, amsgrad, maximize)
                                  : run_pass1<float>(bk, bc, beta1, beta2, eps, amsgrad, maximize);
}

// ----------------------------------------------------------------------- pass 2
template <typename S>
struct Pass2Ctx {
  const Bucket* bk;
  S eps;
  const double* bc;  // (2, P)
  const double* c;   // (F, r, r)
  const double* e;   // (F, r, r)
};

template <typename P, typename S>
SK_INLINE void pass2_item_impl(const Pass2Ctx<S>& cx, int64_t item, Scratch<S>& sc) {
  const Bucket& bk = *cx.bk;
  const Geometry& geo = bk.geo;
  constexpr int W = VecOf<S>::W;
  const int64_t fi = item / geo.nchunks, chunk = item % geo.nchunks;
  const Factor& f = bk.factors[fi];
  const S bc1 = static_cast<S>(cx.bc[f.bc_index]);
  const S bc2 = static_cast<S>(cx.bc[bk.lists + f.bc_index]);
  const int64_t r = geo.r, ra = geo.ra;
  // C - I (in float64, then rounded) and E, zero-padded to ra x ra
  const double* cf = cx.c + fi * r * r;
  const double* ef = cx.e + fi * r * r;
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      sc.cm[i * ra + j] = static_cast<S>(cf[i * r + j] - (i == j ? 1.0 : 0.0));
      sc.e[i * ra + j] = static_cast<S>(ef[i * r + j]);
    }
  }
  const int64_t row_begin = chunk * kChunkRows, row_end = std::min(geo.n, row_begin + kChunkRows);
  P* pp = reinterpret_cast<P*>(f.ptr[kP]);
  const S* mp = reinterpret_cast<const S*>(f.ptr[kM]);
  const S* vp = reinterpret_cast<const S*>(f.ptr[kV]);
  for (int64_t b0 = row_begin; b0 < row_end; b0 += geo.block) {
    const int64_t nb = std::min(geo.block, row_end - b0);
    if (!geo.wide) {
      const int64_t rp = geo.rp;
      const bool flat = rp == r && f.ld[kP] == r && f.ld[kM] == r && f.ld[kV] == r;
      if (flat) {
        const int64_t o = b0 * r;
        direction<S>(mp + o, vp + o, sc.d, nb * r, cx.eps, bc1, bc2);
        convert_in<P, S>(pp + o, sc.x, nb * r);
      } else {
        for (int64_t k = 0; k < nb; ++k) {
          const int64_t row = b0 + k;
          direction<S>(mp + row * f.ld[kM], vp + row * f.ld[kV], sc.d + k * rp, r, cx.eps, bc1, bc2);
          convert_in<P, S>(pp + row * f.ld[kP], sc.x + k * rp, r);
        }
      }
      apply_tall<S>(sc.x, sc.d, nb, r, rp, sc.cm, sc.e, sc.y);
      if (flat) {
        convert_out<P, S>(sc.y, pp + b0 * r, nb * r);
      } else {
        for (int64_t k = 0; k < nb; ++k) convert_out<P, S>(sc.y + k * rp, pp + (b0 + k) * f.ld[kP], r);
      }
    } else {
      const int64_t stride = geo.block, len = round_up(nb, 2 * W);
      for (int64_t i = 0; i < r; ++i) {
        direction<S>(mp + i * f.ld[kM] + b0, vp + i * f.ld[kV] + b0, sc.d + i * stride, nb, cx.eps, bc1, bc2);
        convert_in<P, S>(pp + i * f.ld[kP] + b0, sc.x + i * stride, nb);
      }
      apply_wide<S>(sc.x, sc.d, r, geo.r4, stride, len, sc.cm, sc.e, sc.y);
      for (int64_t i = 0; i < r; ++i) convert_out<P, S>(sc.y + i * stride, pp + i * f.ld[kP] + b0, nb);
    }
  }
}

#define SK_PASS2_ITEM(NAME, P, S)                                                              \
  SK_CLONES void NAME(const Pass2Ctx<S>& cx, int64_t begin, int64_t end, Scratch<S>& sc) {   \
    for (int64_t item = begin; item < end; ++item) pass2_item_impl<P, S>(cx, item, sc);      \
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
  at::Tensor cd = c.to(at::kDouble).contiguous();
  at::Tensor ed = e.to(at::kDouble).contiguous();
  Pass2Ctx<S> cx{&bk, static_cast<S>(eps), bcd.data_ptr<double>(), cd.data_ptr<double>(),
                 ed.data_ptr<double>()};
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
  m.impl("stiefel_adamw_pass2", &stiefel_kernels::stiefel_adamw_pass2_cpu);
}
