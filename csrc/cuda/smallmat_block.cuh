// Block-cooperative algorithms of the batched small-matrix ops: one thread block per matrix.
//
// This header is the single source of the CUDA kernels' arithmetic (smallmat_cuda.cu wraps each
// function below in a __global__ kernel) and it is also plain C++: tests/csrc/block_emulator.cpp
// compiles it with g++ and runs every function with a "block" of std::threads and a barrier,
// under ThreadSanitizer, against float64 torch.linalg. That is how the CUDA arithmetic, its
// barriers and its data-race freedom are tested on machines without a GPU.
//
// Contract of a block type Blk (CudaBlock in smallmat_cuda.cu, ThreadBlock in the emulator):
//   int tid() const;   // 0 .. size() - 1
//   int size() const;  // threads in the block
//   void sync() const; // barrier + memory fence over the block (__syncthreads())
// Every function is called by all threads of a block with the same arguments; every branch that
// contains a sync() depends only on values all threads read after the same barrier (uniform), so
// no thread skips a barrier another one waits at.
//
// Memory: the matrices live in global memory; each block gets its own float64 workspace `ws`
// (size: *_workspace_doubles) and block-shared scratch `red` (size() doubles) / `redi` (size()
// ints) for reductions. Arithmetic is float64 whatever the input dtype, as in the CPU kernels
// (ops_cpu.cpp), and the result is rounded to the input dtype once.
//
// Semantics (same as the CPU kernels; see csrc/smallmat.h for the info codes):
//   inv_sqrt_spd:           M^(-1/2) from the lower triangle of M. Cyclic two-sided Jacobi with
//                           the round-robin (circle) ordering: the k/2 rotations of a round touch
//                           disjoint row/column pairs, so a round is three parallel phases.
//                           info = number of eigenvalues <= k eps(T) max|w|, or -2 if
//                           kJacobiMaxSweeps sweeps do not bring the off-diagonal norm below
//                           k eps(double) ||M||_F.
//   cholesky_upper_inverse: R^(-1), R^T R = M, R upper, from the lower triangle of M.
//                           info = j + 1 for the first pivot <= k eps(T) max_i m_ii.
//   solve:                  A^(-1) B by Gaussian elimination with partial pivoting (ties go to
//                           the smallest row index, like the CPU kernel).
//                           info = j + 1 for the first |pivot| <= k eps(T) max|a_ij|.
// Every entry whose info is nonzero is filled with NaN; -1 marks a non-finite input.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define SK_DEVICE __device__ __forceinline__
#define SK_HOST_DEVICE __host__ __device__ inline
#else
#define SK_DEVICE inline
#define SK_HOST_DEVICE inline
#endif

namespace stiefel_kernels {
namespace block {

constexpr int32_t kInfoNonFinite = -1;      // == kInfoNonFinite in smallmat.h
constexpr int32_t kInfoNoConvergence = -2;  // == kInfoNoConvergence in smallmat.h
// Cyclic Jacobi converges quadratically once the off-diagonal part is small; 6-10 sweeps are
// typical for k <= 256 in float64, so hitting this cap means the input is pathological.
constexpr int kJacobiMaxSweeps = 30;

template <typename T>
struct Eps;
template <>
struct Eps<float> {
  static constexpr double value = 1.1920928955078125e-07;  // 2^-23
};
template <>
struct Eps<double> {
  static constexpr double value = 2.220446049250313e-16;  // 2^-52
};

SK_DEVICE double quiet_nan() {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(0x7ff8000000000000LL);
#else
  return __builtin_nan("");
#endif
}

// False for NaN and +-Inf (x - x is NaN for both); no reliance on <cmath>'s host-only overloads.
SK_DEVICE bool is_finite(double x) { return x - x == 0.0; }

SK_DEVICE int pow2_ceil(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// ---- block reductions: every thread passes its value and gets the block's result ------------
// Tree reductions over `red` in a fixed order (deterministic for a given block size); they start
// and end with a barrier, so they also publish every global-memory write made before the call.

struct Add {
  SK_DEVICE double operator()(double a, double b) const { return a + b; }
};
struct Max {
  SK_DEVICE double operator()(double a, double b) const { return b > a ? b : a; }
};

template <class Blk, class Combine>
SK_DEVICE double block_reduce(const Blk& blk, double* red, double v, Combine combine) {
  const int t = blk.tid();
  const int n = blk.size();
  red[t] = v;
  blk.sync();
  for (int s = pow2_ceil(n) / 2; s > 0; s >>= 1) {
    if (t < s && t + s < n) red[t] = combine(red[t], red[t + s]);
    blk.sync();
  }
  const double r = red[0];
  blk.sync();  // everyone has read red[0] before red is reused
  return r;
}

template <class Blk>
SK_DEVICE double block_sum(const Blk& blk, double* red, double v) {
  return block_reduce(blk, red, v, Add{});
}

template <class Blk>
SK_DEVICE double block_max(const Blk& blk, double* red, double v) {
  return block_reduce(blk, red, v, Max{});
}

// Largest v over the block, ties to the smallest index i; the result comes back in (v, i).
template <class Blk>
SK_DEVICE void block_argmax(const Blk& blk, double* red, int* redi, double& v, int& i) {
  const int t = blk.tid();
  const int n = blk.size();
  red[t] = v;
  redi[t] = i;
  blk.sync();
  for (int s = pow2_ceil(n) / 2; s > 0; s >>= 1) {
    if (t < s && t + s < n) {
      const double o = red[t + s];
      const int oi = redi[t + s];
      if (o > red[t] || (o == red[t] && oi < redi[t])) {
        red[t] = o;
        redi[t] = oi;
      }
    }
    blk.sync();
  }
  v = red[0];
  i = redi[0];
  blk.sync();
}

template <class Blk, typename T>
SK_DEVICE void fill_nan(const Blk& blk, T* out, int64_t n) {
  const T nan = static_cast<T>(quiet_nan());
  for (int64_t i = blk.tid(); i < n; i += blk.size()) out[i] = nan;
}

// ---- cholesky_upper_inverse -------------------------------------------------------------------

SK_HOST_DEVICE int64_t cholesky_upper_inverse_workspace_doubles(int k) {
  return 2 * int64_t{k} * k + k;
}

// m, out: (k, k) row-major. ws: cholesky_upper_inverse_workspace_doubles(k). Returns info.
template <class Blk, typename T>
SK_DEVICE int32_t cholesky_upper_inverse_block(const Blk& blk, const T* m, T* out, int k,
                                               double* ws, double* red) {
  const int t = blk.tid();
  const int nt = blk.size();
  double* r = ws;                       // upper triangle: R (row j scaled in step j)
  double* x = ws + int64_t{k} * k;      // R^-1
  double* diag = x + int64_t{k} * k;    // r_jj (kept apart so the pivot reads never race)
  // r(j, l) = m(l, j) for l >= j: the lower triangle of M, transposed.
  double bad = 0.0;
  double dmax = 0.0;
  for (int idx = t; idx < k * k; idx += nt) {
    const int j = idx / k;
    const int l = idx % k;
    if (l < j) continue;
    const double v = static_cast<double>(m[l * k + j]);
    r[idx] = v;
    if (!is_finite(v)) bad += 1.0;
    if (l == j && v > dmax) dmax = v;
  }
  bad = block_sum(blk, red, bad);
  if (bad > 0.0) {
    fill_nan(blk, out, int64_t{k} * k);
    return kInfoNonFinite;
  }
  dmax = block_max(blk, red, dmax);
  const double tol = k * Eps<T>::value * dmax;
  // Right-looking upper Cholesky, one column per step: pivot, scale row j, update the trailing
  // upper triangle. Two barriers per step.
  for (int j = 0; j < k; ++j) {
    const double d = r[j * k + j];  // published by the previous barrier; nobody writes it again
    if (!(d > tol)) {
      fill_nan(blk, out, int64_t{k} * k);
      return j + 1;
    }
    const double rjj = sqrt(d);
    const double inv = 1.0 / rjj;
    for (int l = j + 1 + t; l < k; l += nt) r[j * k + l] *= inv;
    if (t == 0) diag[j] = rjj;
    blk.sync();
    const int w = k - j - 1;
    for (int idx = t; idx < w * w; idx += nt) {
      const int i = j + 1 + idx / w;
      const int l = j + 1 + idx % w;
      if (l >= i) r[i * k + l] -= r[j * k + i] * r[j * k + l];
    }
    blk.sync();
  }
  // X = R^-1 column by column (columns are independent: no barrier), back substitution
  // x_il = (delta_il - sum_{i<j<=l} r_ij x_jl) / r_ii; consecutive threads take consecutive
  // columns so the accesses to x coalesce.
  for (int l = t; l < k; l += nt) {
    for (int i = k - 1; i > l; --i) out[i * k + l] = static_cast<T>(0);
    for (int i = l; i >= 0; --i) {
      double s = (i == l) ? 1.0 : 0.0;
      for (int j = i + 1; j <= l; ++j) s -= r[i * k + j] * x[j * k + l];
      s /= diag[i];
      x[i * k + l] = s;
      out[i * k + l] = static_cast<T>(s);
    }
  }
  return 0;
}

// ---- solve --------------------------------------------------------------------------------------

SK_HOST_DEVICE int64_t solve_workspace_doubles(int k, int n) {
  return int64_t{k} * k + int64_t{k} * n;
}

// a: (k, k), b and out: (k, n), row-major. ws: solve_workspace_doubles(k, n). Returns info.
template <class Blk, typename T>
SK_DEVICE int32_t solve_block(const Blk& blk, const T* a_in, const T* b_in, T* out, int k, int n,
                              double* ws, double* red, int* redi) {
  const int t = blk.tid();
  const int nt = blk.size();
  double* a = ws;
  double* b = ws + int64_t{k} * k;
  double bad = 0.0;
  double amax = 0.0;
  for (int idx = t; idx < k * k; idx += nt) {
    const double v = static_cast<double>(a_in[idx]);
    a[idx] = v;
    if (!is_finite(v)) bad += 1.0;
    if (fabs(v) > amax) amax = fabs(v);
  }
  for (int idx = t; idx < k * n; idx += nt) {
    const double v = static_cast<double>(b_in[idx]);
    b[idx] = v;
    if (!is_finite(v)) bad += 1.0;
  }
  bad = block_sum(blk, red, bad);
  if (bad > 0.0) {
    fill_nan(blk, out, int64_t{k} * n);
    return kInfoNonFinite;
  }
  amax = block_max(blk, red, amax);
  const double tol = k * Eps<T>::value * amax;
  for (int j = 0; j < k; ++j) {
    // Partial pivoting: each thread's first maximum over its rows, then the block's.
    double best = -1.0;
    int p = k;
    for (int i = j + t; i < k; i += nt) {
      const double v = fabs(a[i * k + j]);
      if (v > best) {
        best = v;
        p = i;
      }
    }
    block_argmax(blk, red, redi, best, p);  // ends with a barrier: all pivot reads are done
    if (!(best > tol)) {
      fill_nan(blk, out, int64_t{k} * n);
      return j + 1;
    }
    if (p != j) {
      const int w = k - j;
      for (int c = t; c < w + n; c += nt) {
        double* x = c < w ? a + j * k + j + c : b + j * n + (c - w);
        double* y = c < w ? a + p * k + j + c : b + p * n + (c - w);
        const double tmp = *x;
        *x = *y;
        *y = tmp;
      }
      blk.sync();
    }
    // Eliminate below the pivot. Column j itself is only read here (the back substitution
    // never reads below the diagonal), so the multipliers a_ij / a_jj stay valid throughout.
    const double inv = 1.0 / a[j * k + j];
    const int h = k - j - 1;
    const int w = h + n;
    for (int idx = t; idx < h * w; idx += nt) {
      const int i = j + 1 + idx / w;
      const int c = idx % w;
      const double f = a[i * k + j] * inv;
      if (c < h) {
        a[i * k + j + 1 + c] -= f * a[j * k + j + 1 + c];
      } else {
        b[i * n + (c - h)] -= f * b[j * n + (c - h)];
      }
    }
    blk.sync();
  }
  // Back substitution, one right-hand side per thread (columns are independent).
  for (int c = t; c < n; c += nt) {
    for (int i = k - 1; i >= 0; --i) {
      double s = b[i * n + c];
      for (int j = i + 1; j < k; ++j) s -= a[i * k + j] * b[j * n + c];
      s /= a[i * k + i];
      b[i * n + c] = s;
      out[i * n + c] = static_cast<T>(s);
    }
  }
  return 0;
}

// ---- inv_sqrt_spd -------------------------------------------------------------------------------

// Round-robin ("circle method") schedule over m (even) indices: in round `round` (0 .. m-2), slot
// s (0 .. m/2-1) pairs the players at positions s and m-1-s; position 0 holds player 0 and the
// others rotate. Every unordered pair meets exactly once per m-1 rounds, and the pairs of one
// round are disjoint.
SK_DEVICE void jacobi_pair(int round, int slot, int m, int& p, int& q) {
  const int a = slot;
  const int b = m - 1 - slot;
  p = a == 0 ? 0 : 1 + (a - 1 + round) % (m - 1);
  q = 1 + (b - 1 + round) % (m - 1);  // b >= m/2 >= 1
}

SK_HOST_DEVICE int64_t inv_sqrt_spd_workspace_doubles(int k) {
  return 2 * int64_t{k} * k + k + (k & 1);
}

// m, out: (k, k) row-major. ws: inv_sqrt_spd_workspace_doubles(k). Returns info.
template <class Blk, typename T>
SK_DEVICE int32_t inv_sqrt_spd_block(const Blk& blk, const T* m_in, T* out, int k, double* ws,
                                     double* red) {
  const int t = blk.tid();
  const int nt = blk.size();
  const int m = k + (k & 1);  // an odd k gets a dummy index k that is never rotated
  double* a = ws;                          // symmetric iterate, converges to diag(w)
  double* v = ws + int64_t{k} * k;         // accumulated rotations: M = V diag(w) V^T
  double* cs = v + int64_t{k} * k;         // (c, s) of each slot; later w^(-1/4)
  double bad = 0.0;
  double fro2 = 0.0;
  for (int idx = t; idx < k * k; idx += nt) {
    const int i = idx / k;
    const int j = idx % k;
    const double x = static_cast<double>(j <= i ? m_in[i * k + j] : m_in[j * k + i]);
    a[idx] = x;
    v[idx] = i == j ? 1.0 : 0.0;
    if (j <= i && !is_finite(x)) bad += 1.0;
    fro2 += x * x;
  }
  bad = block_sum(blk, red, bad);
  if (bad > 0.0) {
    fill_nan(blk, out, int64_t{k} * k);
    return kInfoNonFinite;
  }
  fro2 = block_sum(blk, red, fro2);
  const double tol_off = k * Eps<double>::value;
  const double tol2 = tol_off * tol_off * fro2;
  bool converged = false;
  for (int sweep = 0; sweep <= kJacobiMaxSweeps; ++sweep) {
    double off = 0.0;
    for (int idx = t; idx < k * k; idx += nt) {
      if (idx / k != idx % k) off += a[idx] * a[idx];
    }
    off = block_sum(blk, red, off);
    if (off <= tol2) {
      converged = true;
      break;
    }
    if (sweep == kJacobiMaxSweeps) break;
    for (int round = 0; round < m - 1; ++round) {
      // Phase 1: the rotation J of each slot, chosen so that (J^T A J)_pq = 0 (Golub & Van Loan,
      // sym.schur2): J_pp = J_qq = c, J_pq = s, J_qp = -s.
      for (int s = t; s < m / 2; s += nt) {
        int p, q;
        jacobi_pair(round, s, m, p, q);
        double c = 1.0, sn = 0.0;
        if (p < k && q < k) {
          const double apq = a[p * k + q];
          if (apq != 0.0) {
            const double tau = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
            const double tt = tau >= 0.0 ? 1.0 / (tau + sqrt(1.0 + tau * tau))
                                         : -1.0 / (-tau + sqrt(1.0 + tau * tau));
            c = 1.0 / sqrt(1.0 + tt * tt);
            sn = tt * c;
          }
        }
        cs[2 * s] = c;
        cs[2 * s + 1] = sn;
      }
      blk.sync();
      // Phase 2: A <- J^T A (rows p, q of every slot; slots touch disjoint rows).
      for (int idx = t; idx < (m / 2) * k; idx += nt) {
        const int s = idx / k;
        const int l = idx % k;
        int p, q;
        jacobi_pair(round, s, m, p, q);
        if (p >= k || q >= k) continue;
        const double c = cs[2 * s], sn = cs[2 * s + 1];
        const double ap = a[p * k + l];
        const double aq = a[q * k + l];
        a[p * k + l] = c * ap - sn * aq;
        a[q * k + l] = sn * ap + c * aq;
      }
      blk.sync();
      // Phase 3: A <- A J and V <- V J (columns p, q of every slot).
      for (int idx = t; idx < (m / 2) * k * 2; idx += nt) {
        const int which = idx / ((m / 2) * k);  // 0: A, 1: V
        const int rest = idx % ((m / 2) * k);
        const int s = rest / k;
        const int l = rest % k;
        int p, q;
        jacobi_pair(round, s, m, p, q);
        if (p >= k || q >= k) continue;
        const double c = cs[2 * s], sn = cs[2 * s + 1];
        double* row = (which == 0 ? a : v) + l * k;
        const double xp = row[p];
        const double xq = row[q];
        row[p] = c * xp - sn * xq;
        row[q] = sn * xp + c * xq;
      }
      blk.sync();
    }
  }
  if (!converged) {
    fill_nan(blk, out, int64_t{k} * k);
    return kInfoNoConvergence;
  }
  double wmax = 0.0;
  for (int i = t; i < k; i += nt) {
    if (fabs(a[i * k + i]) > wmax) wmax = fabs(a[i * k + i]);
  }
  wmax = block_max(blk, red, wmax);
  const double tol = k * Eps<T>::value * wmax;
  double nbad = 0.0;
  for (int i = t; i < k; i += nt) {
    const double w = a[i * k + i];
    if (!(w > tol)) {
      nbad += 1.0;
    } else {
      cs[i] = 1.0 / sqrt(sqrt(w));  // cs is free again: the rotations are done
    }
  }
  nbad = block_sum(blk, red, nbad);  // also publishes cs
  if (nbad > 0.0) {
    fill_nan(blk, out, int64_t{k} * k);
    return static_cast<int32_t>(nbad);
  }
  // out = V diag(w^-1/2) V^T = W^T W with W = diag(w^-1/4) V^T; entry (r, c) and (c, r) take the
  // same products in the same order, so the result is exactly symmetric.
  for (int idx = t; idx < k * k; idx += nt) {
    const int r = idx / k;
    const int c = idx % k;
    double s = 0.0;
    for (int i = 0; i < k; ++i) s += (v[r * k + i] * cs[i]) * (v[c * k + i] * cs[i]);
    out[idx] = static_cast<T>(s);
  }
  return 0;
}

// ---- batch loops: a block takes matrices first, first + stride, ... ----------------------------
// The barrier at the end of each matrix keeps a fast thread from overwriting the workspace or
// `red` while a slow one still reads them for the previous matrix.

template <class Blk, typename T>
SK_DEVICE void cholesky_upper_inverse_batch(const Blk& blk, const T* m, T* out, int32_t* info,
                                            int64_t batch, int k, int64_t first, int64_t stride,
                                            double* ws, double* red) {
  const int64_t kk = int64_t{k} * k;
  for (int64_t b = first; b < batch; b += stride) {
    const int32_t code = cholesky_upper_inverse_block(blk, m + b * kk, out + b * kk, k, ws, red);
    if (blk.tid() == 0) info[b] = code;
    blk.sync();
  }
}

template <class Blk, typename T>
SK_DEVICE void solve_batch(const Blk& blk, const T* a, const T* b_in, T* out, int32_t* info,
                           int64_t batch, int k, int n, int64_t first, int64_t stride, double* ws,
                           double* red, int* redi) {
  const int64_t kk = int64_t{k} * k;
  const int64_t kn = int64_t{k} * n;
  for (int64_t b = first; b < batch; b += stride) {
    const int32_t code =
        solve_block(blk, a + b * kk, b_in + b * kn, out + b * kn, k, n, ws, red, redi);
    if (blk.tid() == 0) info[b] = code;
    blk.sync();
  }
}

template <class Blk, typename T>
SK_DEVICE void inv_sqrt_spd_batch(const Blk& blk, const T* m, T* out, int32_t* info,
                                  int64_t batch, int k, int64_t first, int64_t stride, double* ws,
                                  double* red) {
  const int64_t kk = int64_t{k} * k;
  for (int64_t b = first; b < batch; b += stride) {
    const int32_t code = inv_sqrt_spd_block(blk, m + b * kk, out + b * kk, k, ws, red);
    if (blk.tid() == 0) info[b] = code;
    blk.sync();
  }
}

}  // namespace block
}  // namespace stiefel_kernels
