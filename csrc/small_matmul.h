// The register-tiled small matrix product shared by the CPU kernels of the r x r step
// (small_bmm_cpu.cpp: stiefel_kernels::small_bmm; cayley_step_cpu.cpp:
// stiefel_kernels::cayley_fp_step): out = add + alpha * (A @ B) for one (m x k) @ (k x n)
// product, every operand through its strides, out row-major.
//
// B is packed into a zero-padded row-major scratch (k x npad, npad a multiple of the vector
// width) so every load is a whole vector; register tiles of 4 rows x up to 4 vectors (16
// accumulators; per k: 4 broadcasts of A, 4 loads of B, 16 FMAs); sums run over k in order,
// one FMA per term. Everything here is always inlined into the callers' functions, which are
// cloned per ISA (cpu_vec.h), so the vectors are as wide as the clone's ISA allows.
#pragma once

#include "cpu_vec.h"

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

// rows [i0, i0 + MR) x vectors [j0, j0 + NV W) of acc = A @ Bp, then out = add + alpha * acc
template <typename S, int MR, int NV>
SK_INLINE void tile(const Item<S>& it, const S* bp, int64_t npad, int64_t i0, int64_t j0, S* cp) {
  using V = vec<S>;
  constexpr int W = VecOf<S>::W;
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
SK_INLINE void row_block(const Item<S>& it, const S* bp, int64_t npad, int64_t i0, S* cp) {
  constexpr int W = VecOf<S>::W;
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
SK_INLINE void matmul(const Item<S>& it, std::vector<S>& scratch) {
  constexpr int W = VecOf<S>::W;
  const int64_t npad = (it.n + W - 1) / W * W;
  const size_t need = static_cast<size_t>((it.k + it.m) * npad);
  if (scratch.size() < need) scratch.resize(need);
  S* bp = scratch.data();
  S* cp = bp + it.k * npad;
  for (int64_t kk = 0; kk < it.k; ++kk) {
    S* row = bp + kk * npad;
    const S* src = it.b + kk * it.sb_r;
    if (it.sb_c == 1) {
      std::memcpy(row, src, static_cast<size_t>(it.n) * sizeof(S));
    } else {
      for (int64_t j = 0; j < it.n; ++j) row[j] = src[j * it.sb_c];
    }
    for (int64_t j = it.n; j < npad; ++j) row[j] = S(0);
  }
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

}  // namespace small_matmul
}  // namespace stiefel_kernels
