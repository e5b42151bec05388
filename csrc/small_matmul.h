// The register-tiled small matrix product shared by the CPU kernels of the r x r step
// (small_bmm_cpu.cpp: stiefel_kernels::small_bmm; cayley_step_cpu.cpp:
// stiefel_kernels::cayley_fp_step): out = add + alpha * (A @ B) for one (m x k) @ (k x n)
// product, every operand through its strides, out row-major.
//
// Register tiles of 4 rows x up to 4 vectors (16 accumulators; per k: 4 broadcasts of A, 4 loads
// of B, 16 FMAs); sums run over k in order, one FMA per term (in the clones whose ISA has FMA).
// When a row of B is whole vectors (n a multiple of the vector width, unit column stride) B is
// read in place, else packed into a zero-padded row-major scratch; when n is a multiple of the
// vector width, add (if any) has unit column stride and out overlaps neither A nor B, the
// epilogue add + alpha * acc is done in registers and stored straight into out, else the tiles
// go through a scratch C and a scalar epilogue. None of this changes a bit of the result (the
// same sums in the same order, the epilogue one explicit FMA either way). r = 64 on this project's VM:
// 2.0 us per product in place (260 GFLOP/s) against 2.5 us packed; r = 16: 0.07 against 0.18 us.
// matmul is always inlined into the function that calls it, which must be cloned per ISA
// (cpu_vec.h) so that the vectors are as wide as the clone's ISA allows; run() calls such a
// function (one per dtype, defined in small_bmm_cpu.cpp).
#pragma once

#include "cpu_vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace stiefel_kernels {
namespace small_matmul {

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

// rows [i0, i0 + MR) x vectors [j0, j0 + NV W) of acc = A @ B (B rows ldb apart, whole vectors);
// direct: out = add + alpha * acc written to it.out (n a multiple of W), else acc into cp
template <typename S, int MR, int NV, bool kDirect>
SK_INLINE void tile(const Item<S>& it, const S* bp, int64_t ldb, int64_t i0, int64_t j0, S* cp, int64_t ldc) {
  using V = vec<S>;
  constexpr int W = VecOf<S>::W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  const S* arow[MR];
  for (int i = 0; i < MR; ++i) arow[i] = it.a + (i0 + i) * it.sa_r;
  for (int64_t kk = 0; kk < it.k; ++kk) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], bp + kk * ldb + j0 + v * W, sizeof(V));
    for (int i = 0; i < MR; ++i) {
      const S s = arow[i][kk * it.sa_c];
      V av = V{} + s;
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
  if constexpr (kDirect) {
    for (int i = 0; i < MR; ++i) {
      S* o = it.out + (i0 + i) * it.n + j0;
      if (it.add != nullptr) {
        const S* d = it.add + (i0 + i) * it.sd_r + j0;
        for (int v = 0; v < NV; ++v) {
          V dv;
          std::memcpy(&dv, d + v * W, sizeof(V));
          const V r = vfma<S>(V{} + it.alpha, acc[i][v], dv);
          std::memcpy(o + v * W, &r, sizeof(V));
        }
      } else {
        for (int v = 0; v < NV; ++v) {
          const V r = it.alpha * acc[i][v];
          std::memcpy(o + v * W, &r, sizeof(V));
        }
      }
    }
    return;
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) std::memcpy(cp + (i0 + i) * ldc + j0 + v * W, &acc[i][v], sizeof(V));
}

template <typename S, int MR, bool kDirect>
SK_INLINE void row_block(const Item<S>& it, const S* bp, int64_t ldb, int64_t npad, int64_t i0, S* cp) {
  constexpr int W = VecOf<S>::W;
  int64_t j0 = 0;
  for (; j0 + 4 * W <= npad; j0 += 4 * W) tile<S, MR, 4, kDirect>(it, bp, ldb, i0, j0, cp, npad);
  switch ((npad - j0) / W) {
    case 3: tile<S, MR, 3, kDirect>(it, bp, ldb, i0, j0, cp, npad); break;
    case 2: tile<S, MR, 2, kDirect>(it, bp, ldb, i0, j0, cp, npad); break;
    case 1: tile<S, MR, 1, kDirect>(it, bp, ldb, i0, j0, cp, npad); break;
    default: break;
  }
}

// whether out (m x n row-major) shares memory with the (rows x cols) operand p through (sr, sc)
// (strides of either sign; addresses compared as integers)
template <typename S>
SK_INLINE bool overlaps(const Item<S>& it, const S* p, int64_t sr, int64_t sc, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0 || it.m <= 0 || it.n <= 0) return false;
  const int64_t lo = std::min<int64_t>(0, (rows - 1) * sr) + std::min<int64_t>(0, (cols - 1) * sc);
  const int64_t hi = std::max<int64_t>(0, (rows - 1) * sr) + std::max<int64_t>(0, (cols - 1) * sc);
  const uintptr_t base = reinterpret_cast<uintptr_t>(p);
  const uintptr_t p_lo = base + static_cast<uintptr_t>(lo * static_cast<int64_t>(sizeof(S)));
  const uintptr_t p_hi = base + static_cast<uintptr_t>(hi * static_cast<int64_t>(sizeof(S)));
  const uintptr_t o_lo = reinterpret_cast<uintptr_t>(it.out);
  const uintptr_t o_hi = o_lo + static_cast<uintptr_t>((it.m * it.n - 1) * static_cast<int64_t>(sizeof(S)));
  return !(p_hi < o_lo || p_lo > o_hi);
}

template <typename S>
SK_INLINE void matmul(const Item<S>& it, std::vector<S>& scratch) {
  constexpr int W = VecOf<S>::W;
  const int64_t npad = (it.n + W - 1) / W * W;
  // whole vectors of B in place and the epilogue in registers when the rows are whole vectors
  const bool direct = it.n % W == 0 && (it.add == nullptr || it.sd_c == 1) && !overlaps(it, it.a, it.sa_r, it.sa_c, it.m, it.k) &&
                      !overlaps(it, it.b, it.sb_r, it.sb_c, it.k, it.n);
  const bool b_in_place = it.n % W == 0 && it.sb_c == 1;
  const size_t need = static_cast<size_t>((b_in_place ? 0 : it.k * npad) + (direct ? 0 : it.m * npad));
  if (scratch.size() < need) scratch.resize(need);
  const S* bp = it.b;
  int64_t ldb = it.sb_r;
  S* cp = scratch.data() + (b_in_place ? 0 : it.k * npad);
  if (!b_in_place) {
    S* pk = scratch.data();
    for (int64_t kk = 0; kk < it.k; ++kk) {
      S* row = pk + kk * npad;
      const S* src = it.b + kk * it.sb_r;
      if (it.sb_c == 1) {
        std::memcpy(row, src, static_cast<size_t>(it.n) * sizeof(S));
      } else {
        for (int64_t j = 0; j < it.n; ++j) row[j] = src[j * it.sb_c];
      }
      for (int64_t j = it.n; j < npad; ++j) row[j] = S(0);
    }
    bp = pk;
    ldb = npad;
  }
  constexpr int MR = 4;  // 4 x 4 vectors measured fastest at r = 16 and 64 (5-7 rows: 7-20% slower)
  int64_t i0 = 0;
  if (direct) {
    for (; i0 + MR <= it.m; i0 += MR) row_block<S, MR, true>(it, bp, ldb, npad, i0, cp);
    for (; i0 < it.m; ++i0) row_block<S, 1, true>(it, bp, ldb, npad, i0, cp);
    return;
  }
  for (; i0 + MR <= it.m; i0 += MR) row_block<S, MR, false>(it, bp, ldb, npad, i0, cp);
  for (; i0 < it.m; ++i0) row_block<S, 1, false>(it, bp, ldb, npad, i0, cp);
  for (int64_t i = 0; i < it.m; ++i) {
    S* o = it.out + i * it.n;
    const S* c = cp + i * npad;
    if (it.add != nullptr) {
      const S* d = it.add + i * it.sd_r;
      for (int64_t j = 0; j < it.n; ++j) o[j] = sfma(it.alpha, c[j], d[j * it.sd_c]);
    } else {
      for (int64_t j = 0; j < it.n; ++j) o[j] = it.alpha * c[j];
    }
  }
}

// Out-of-line instances of matmul, cloned per ISA (defined in small_bmm_cpu.cpp). Callers with
// many products call these rather than inline matmul at every call site: inlined into the ~20
// call sites of cayley_step_cpu.cpp's three clones it took GCC ~10 minutes to compile.
void matmul_f32(const Item<float>& it, std::vector<float>& scratch);
void matmul_f64(const Item<double>& it, std::vector<double>& scratch);
inline void run(const Item<float>& it, std::vector<float>& scratch) { matmul_f32(it, scratch); }
inline void run(const Item<double>& it, std::vector<double>& scratch) { matmul_f64(it, scratch); }

}  // namespace small_matmul
}  // namespace stiefel_kernels
