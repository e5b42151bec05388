// CPU kernels of the batched small-matrix ops (schemas and default kernels in
// stiefel_kernels/ops.py; these override the defaults on CPU tensors when _C is loaded).
//
// Every matrix is copied into a float64 scratch buffer, factored there by hand-written loops
// (no LAPACK, no at::linalg_*), and the result is rounded to the input dtype: float32 inputs get
// float64 accuracy before that final rounding. The batch is split over threads with
// at::parallel_for; each thread owns its scratch buffers.
//
// Failure policy ("never a silent wrong answer"): an entry whose factorization breaks down, or
// whose pivots / eigenvalues fall to the rounding level of the input dtype
// (<= k * eps(dtype) * scale), gets a nonzero info and a NaN-filled output. The reading of the
// inputs follows torch.linalg: inv_sqrt_spd and cholesky_upper_inverse read only the lower
// triangle (like eigh / cholesky with their default UPLO='L'), solve reads all of A.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "smallmat.h"

namespace stiefel_kernels {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The float64 cores below get an AVX2/FMA clone next to the baseline x86-64 one, picked at load
// time (GCC function multiversioning): ~1.5x at k >= 32, and the wheel still runs anywhere.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(STIEFEL_NO_TARGET_CLONES)
#define STIEFEL_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define STIEFEL_HOT
#endif

// sqrt(a^2 + b^2) without std::hypot's cost, falling back to it where squares could
// overflow or underflow.
inline double fast_hypot(double a, double b) {
  const double m = std::max(std::abs(a), std::abs(b));
  if (m > 1e150 || m < 1e-150) return std::hypot(a, b);
  return std::sqrt(a * a + b * b);
}
// Threads get chunks of about this many flops at least.
int64_t grain_for(int64_t k) {
  const int64_t work = std::max<int64_t>(1, k * k * k);
  return std::max<int64_t>(1, (int64_t{1} << 16) / work);
}

template <typename T>
bool all_finite_lower(const T* m, int64_t k) {
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j)
      if (!std::isfinite(static_cast<double>(m[i * k + j]))) return false;
  return true;
}

template <typename T>
bool all_finite(const T* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(m[i]))) return false;
  return true;
}

template <typename T>
void fill_nan(T* out, int64_t n) {
  std::fill(out, out + n, static_cast<T>(kNaN));
}

// ---------------------------------------------------------------------------------------------
// inv_sqrt_spd: eigen-decomposition M = V diag(w) V^T in float64, then V diag(w^-1/2) V^T.
//
// Method: Householder tridiagonalization + implicit QL with Wilkinson-type shifts (EISPACK
// tred2 / tql2, as in JAMA), iteration cap kQlMaxIter per eigenvalue. We first wrote a cyclic
// Jacobi solver; measured on this project's CPU (float64, one thread) it was 2x slower at k = 8,
// 4x at k = 32, 10x at k = 128 than this route for the same accuracy (both ~1e-15 relative on
// well-conditioned input), because Jacobi needs ~10 sweeps of ~6k^3 flops while tred2 + tql2
// take ~4k^3/3 + ~6k^3 with all inner loops contiguous. Both are backward stable.
//
// tred2(v, d, e, n): v is the matrix V in column-major storage (its lower triangle is read, so
// a row-major buffer holding the upper triangle of M^T = M); on return V holds the orthogonal
// reduction Q (so, row-major, row j of v is column j of Q), d the diagonal, e the off-diagonal.
// tql2(vt, d, e, n): on return d holds the eigenvalues and row i of vt the eigenvector of d[i];
// false if some eigenvalue needs more than kQlMaxIter QL iterations.
constexpr int kQlMaxIter = 60;

STIEFEL_HOT void tred2(double* v, double* d, double* e, int64_t n) {
#define V(i, j) v[(j) * n + (i)]  // column-major: the inner loops below run down columns
  for (int64_t j = 0; j < n; ++j) d[j] = V(n - 1, j);
  for (int64_t i = n - 1; i > 0; --i) {
    double scale = 0.0;
    double h = 0.0;
    for (int64_t k = 0; k < i; ++k) scale += std::abs(d[k]);
    if (scale == 0.0) {
      e[i] = d[i - 1];
      for (int64_t j = 0; j < i; ++j) {
        d[j] = V(i - 1, j);
        V(i, j) = 0.0;
        V(j, i) = 0.0;
      }
    } else {
      for (int64_t k = 0; k < i; ++k) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      double f = d[i - 1];
      double g = std::sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (int64_t j = 0; j < i; ++j) e[j] = 0.0;
      for (int64_t j = 0; j < i; ++j) {
        f = d[j];
        V(j, i) = f;
        g = e[j] + V(j, j) * f;
        for (int64_t k = j + 1; k <= i - 1; ++k) {
          g += V(k, j) * d[k];
          e[k] += V(k, j) * f;
        }
        e[j] = g;
      }
      f = 0.0;
      for (int64_t j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const double hh = f / (h + h);
      for (int64_t j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int64_t j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        for (int64_t k = j; k <= i - 1; ++k) V(k, j) -= (f * e[k] + g * d[k]);
        d[j] = V(i - 1, j);
        V(i, j) = 0.0;
      }
    }
    d[i] = h;
  }
  // Accumulate the transformations.
  for (int64_t i = 0; i < n - 1; ++i) {
    V(n - 1, i) = V(i, i);
    V(i, i) = 1.0;
    const double h = d[i + 1];
    if (h != 0.0) {
      for (int64_t k = 0; k <= i; ++k) d[k] = V(k, i + 1) / h;
      for (int64_t j = 0; j <= i; ++j) {
        double g = 0.0;
        for (int64_t k = 0; k <= i; ++k) g += V(k, i + 1) * V(k, j);
        for (int64_t k = 0; k <= i; ++k) V(k, j) -= g * d[k];
      }
    }
    for (int64_t k = 0; k <= i; ++k) V(k, i + 1) = 0.0;
  }
  for (int64_t j = 0; j < n; ++j) {
    d[j] = V(n - 1, j);
    V(n - 1, j) = 0.0;
  }
  V(n - 1, n - 1) = 1.0;
  e[0] = 0.0;
#undef V
}

// vt: rows are the columns of tred2's V (transposed so the rotations below run on rows).
STIEFEL_HOT bool tql2(double* vt, double* d, double* e, int64_t n) {
  for (int64_t i = 1; i < n; ++i) e[i - 1] = e[i];
  e[n - 1] = 0.0;
  double f = 0.0;
  double tst1 = 0.0;
  const double eps = std::numeric_limits<double>::epsilon();
  for (int64_t l = 0; l < n; ++l) {
    tst1 = std::max(tst1, std::abs(d[l]) + std::abs(e[l]));
    int64_t m = l;
    while (m < n) {
      if (std::abs(e[m]) <= eps * tst1) break;
      ++m;
    }
    if (m > l) {
      int iter = 0;
      do {
        if (++iter > kQlMaxIter) return false;
        double g = d[l];
        double p = (d[l + 1] - g) / (2.0 * e[l]);
        double r = fast_hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int64_t i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1.0, c2 = 1.0, c3 = 1.0;
        const double el1 = e[l + 1];
        double s = 0.0, s2 = 0.0;
        for (int64_t i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = fast_hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          double* vi = vt + i * n;
          double* vi1 = vt + (i + 1) * n;
          for (int64_t k = 0; k < n; ++k) {
            const double x = vi1[k];
            const double y = vi[k];
            vi1[k] = s * y + c * x;
            vi[k] = c * y - s * x;
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (std::abs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0.0;
  }
  return true;
}

// Upper triangle of V diag(w^-1/2) V^T = W^T W, W = diag(w^-1/4) V^T, into a (vt is scaled).
STIEFEL_HOT void inv_sqrt_from_eigh(double* vt, const double* w, double* a, int64_t k) {
  for (int64_t i = 0; i < k; ++i) {
    const double f = 1.0 / std::sqrt(std::sqrt(w[i]));
    double* vi = vt + i * k;
    for (int64_t j = 0; j < k; ++j) vi[j] *= f;
  }
  std::fill(a, a + k * k, 0.0);
  for (int64_t i = 0; i < k; ++i) {
    const double* vi = vt + i * k;
    for (int64_t r = 0; r < k; ++r) {
      const double f = vi[r];
      double* ar = a + r * k;
      for (int64_t c = r; c < k; ++c) ar[c] += f * vi[c];
    }
  }
}

template <typename T>
int32_t inv_sqrt_spd_one(const T* m, T* out, int64_t k, double* a, double* vt, double* w,
                         double* e) {
  if (k == 0) return 0;  // tred2 / tql2 index row n - 1
  if (!all_finite_lower(m, k)) {
    fill_nan(out, k * k);
    return kInfoNonFinite;
  }
  // tred2 works on V column-major = vt row-major, and reads the lower triangle of V.
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) vt[j * k + i] = static_cast<double>(m[i * k + j]);
  tred2(vt, w, e, k);
  if (!tql2(vt, w, e, k)) {
    fill_nan(out, k * k);
    return kInfoNoConvergence;
  }
  double wmax = 0.0;
  for (int64_t i = 0; i < k; ++i) wmax = std::max(wmax, std::abs(w[i]));
  // Eigenvalues at the rounding level of the input dtype count as non-positive.
  const double tol = static_cast<double>(k) * std::numeric_limits<T>::epsilon() * wmax;
  int32_t bad = 0;
  for (int64_t i = 0; i < k; ++i)
    if (!(w[i] > tol)) ++bad;
  if (bad) {
    fill_nan(out, k * k);
    return bad;
  }
  inv_sqrt_from_eigh(vt, w, a, k);
  for (int64_t r = 0; r < k; ++r)
    for (int64_t c = r; c < k; ++c) out[r * k + c] = out[c * k + r] = static_cast<T>(a[r * k + c]);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// cholesky_upper_inverse: R^T R = M with R upper (R = L^T, L from the lower triangle of M), then
// R^-1 by row-oriented back substitution. info = j + 1 when the j-th pivot (0-based) is not
// positive (LAPACK potrf convention), counting pivots <= k * eps(dtype) * max_i m_ii as not
// positive.
//
// Core: r's upper triangle holds M's lower triangle, transposed; on success R^-1 goes to x.
STIEFEL_HOT int32_t cholesky_upper_inverse_core(double* r, double* x, int64_t k, double tol) {
  // Right-looking upper Cholesky on rows (contiguous updates).
  for (int64_t j = 0; j < k; ++j) {
    double* rj = r + j * k;
    const double d = rj[j];
    if (!(d > tol)) return static_cast<int32_t>(j + 1);
    const double rjj = std::sqrt(d);
    const double inv = 1.0 / rjj;
    rj[j] = rjj;
    for (int64_t l = j + 1; l < k; ++l) rj[l] *= inv;
    for (int64_t i = j + 1; i < k; ++i) {
      const double f = rj[i];
      double* ri = r + i * k;
      for (int64_t l = i; l < k; ++l) ri[l] -= f * rj[l];
    }
  }
  // X = R^-1, upper: x_ii = 1/r_ii, x_il = -(sum_{i<j<=l} r_ij x_jl) / r_ii.
  std::fill(x, x + k * k, 0.0);
  for (int64_t i = k - 1; i >= 0; --i) {
    const double* ri = r + i * k;
    double* xi = x + i * k;
    for (int64_t j = i + 1; j < k; ++j) {
      const double f = ri[j];
      const double* xj = x + j * k;
      for (int64_t l = j; l < k; ++l) xi[l] += f * xj[l];
    }
    const double inv = 1.0 / ri[i];
    for (int64_t l = i + 1; l < k; ++l) xi[l] *= -inv;
    xi[i] = inv;
  }
  return 0;
}

template <typename T>
int32_t cholesky_upper_inverse_one(const T* m, T* out, int64_t k, double* r, double* x) {
  if (!all_finite_lower(m, k)) {
    fill_nan(out, k * k);
    return kInfoNonFinite;
  }
  double dmax = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    dmax = std::max(dmax, static_cast<double>(m[j * k + j]));
    // Upper triangle of r <- lower triangle of m, transposed.
    for (int64_t l = j; l < k; ++l) r[j * k + l] = static_cast<double>(m[l * k + j]);
  }
  const double tol = static_cast<double>(k) * std::numeric_limits<T>::epsilon() * dmax;
  const int32_t info = cholesky_upper_inverse_core(r, x, k, tol);
  if (info) {
    fill_nan(out, k * k);
    return info;
  }
  for (int64_t i = 0; i < k * k; ++i) out[i] = static_cast<T>(x[i]);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// solve: Gaussian elimination with partial pivoting on [A | B], then back substitution.
// info = j + 1 for the first pivot (0-based j) with |pivot| <= k * eps(dtype) * max|a_ij|.
//
// Core: in place on float64 copies: a (k x k) is destroyed, b (k x n) becomes A^-1 B.
STIEFEL_HOT int32_t solve_core(double* a, double* b, int64_t k, int64_t n, double tol) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t p = j;
    double best = std::abs(a[j * k + j]);
    for (int64_t i = j + 1; i < k; ++i) {
      const double v = std::abs(a[i * k + j]);
      if (v > best) {
        best = v;
        p = i;
      }
    }
    if (!(best > tol)) return static_cast<int32_t>(j + 1);
    if (p != j) {
      std::swap_ranges(a + j * k + j, a + j * k + k, a + p * k + j);
      std::swap_ranges(b + j * n, b + j * n + n, b + p * n);
    }
    const double* aj = a + j * k;
    const double* bj = b + j * n;
    const double inv = 1.0 / aj[j];
    for (int64_t i = j + 1; i < k; ++i) {
      double* ai = a + i * k;
      const double f = ai[j] * inv;
      if (f == 0.0) continue;
      for (int64_t l = j + 1; l < k; ++l) ai[l] -= f * aj[l];
      double* bi = b + i * n;
      for (int64_t l = 0; l < n; ++l) bi[l] -= f * bj[l];
    }
  }
  for (int64_t i = k - 1; i >= 0; --i) {
    const double* ai = a + i * k;
    double* bi = b + i * n;
    for (int64_t j = i + 1; j < k; ++j) {
      const double f = ai[j];
      const double* bj = b + j * n;
      for (int64_t l = 0; l < n; ++l) bi[l] -= f * bj[l];
    }
    const double inv = 1.0 / ai[i];
    for (int64_t l = 0; l < n; ++l) bi[l] *= inv;
  }
  return 0;
}

template <typename T>
int32_t solve_one(const T* a_in, const T* b_in, T* out, int64_t k, int64_t n, double* a, double* b) {
  if (!all_finite(a_in, k * k) || !all_finite(b_in, k * n)) {
    fill_nan(out, k * n);
    return kInfoNonFinite;
  }
  double amax = 0.0;
  for (int64_t i = 0; i < k * k; ++i) {
    a[i] = static_cast<double>(a_in[i]);
    amax = std::max(amax, std::abs(a[i]));
  }
  for (int64_t i = 0; i < k * n; ++i) b[i] = static_cast<double>(b_in[i]);
  const double tol = static_cast<double>(k) * std::numeric_limits<T>::epsilon() * amax;
  const int32_t info = solve_core(a, b, k, n, tol);
  if (info) {
    fill_nan(out, k * n);
    return info;
  }
  for (int64_t i = 0; i < k * n; ++i) out[i] = static_cast<T>(b[i]);
  return 0;
}

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), "stiefel_kernels::", op, ": CPU kernel got a tensor on ",
              t.device());
}

at::Tensor new_info(const at::Tensor& like, at::IntArrayRef batch_shape) {
  return at::empty(batch_shape, like.options().dtype(at::kInt));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> inv_sqrt_spd_cpu(const at::Tensor& m_in) {
  check_square_batch(m_in, "inv_sqrt_spd");
  check_cpu(m_in, "inv_sqrt_spd");
  const at::Tensor m = m_in.contiguous();
  const int64_t k = m.size(-1);
  const int64_t batch = c10::multiply_integers(m.sizes().slice(0, m.dim() - 2));
  at::Tensor out = at::empty(m.sizes(), m.options());
  at::Tensor info = new_info(m, m.sizes().slice(0, m.dim() - 2));
  int32_t* info_p = info.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "inv_sqrt_spd_cpu", [&] {
    const scalar_t* src = m.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(k), [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(2 * k * k + 2 * k);
      double* s = scratch.data();
      for (int64_t b = begin; b < end; ++b) {
        info_p[b] = inv_sqrt_spd_one<scalar_t>(src + b * k * k, dst + b * k * k, k, s, s + k * k,
                                               s + 2 * k * k, s + 2 * k * k + k);
      }
    });
  });
  return {out, info};
}

std::tuple<at::Tensor, at::Tensor> cholesky_upper_inverse_cpu(const at::Tensor& m_in) {
  check_square_batch(m_in, "cholesky_upper_inverse");
  check_cpu(m_in, "cholesky_upper_inverse");
  const at::Tensor m = m_in.contiguous();
  const int64_t k = m.size(-1);
  const int64_t batch = c10::multiply_integers(m.sizes().slice(0, m.dim() - 2));
  at::Tensor out = at::empty(m.sizes(), m.options());
  at::Tensor info = new_info(m, m.sizes().slice(0, m.dim() - 2));
  int32_t* info_p = info.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cholesky_upper_inverse_cpu", [&] {
    const scalar_t* src = m.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(k), [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(2 * k * k);
      for (int64_t b = begin; b < end; ++b) {
        info_p[b] = cholesky_upper_inverse_one<scalar_t>(src + b * k * k, dst + b * k * k, k,
                                                         scratch.data(), scratch.data() + k * k);
      }
    });
  });
  return {out, info};
}

std::tuple<at::Tensor, at::Tensor> solve_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_solve_args(a_in, b_in);
  check_cpu(a_in, "solve");
  const int64_t k = a_in.size(-1);
  const int64_t n = b_in.size(-1);
  const SolveOperands operands = broadcast_solve_operands(a_in, b_in);
  const at::Tensor& a = operands.a;
  const at::Tensor& b = operands.b;
  const int64_t batch = operands.batch;
  at::Tensor out = at::empty(b.sizes(), b.options());
  at::Tensor info = new_info(a, operands.batch_shape);
  int32_t* info_p = info.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "solve_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(std::max(k, n)), [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(k * k + k * n);
      for (int64_t i = begin; i < end; ++i) {
        info_p[i] = solve_one<scalar_t>(pa + i * k * k, pb + i * k * n, dst + i * k * n, k, n,
                                        scratch.data(), scratch.data() + k * k);
      }
    });
  });
  return {out, info};
}

}  // namespace stiefel_kernels

TORCH_LIBRARY_IMPL(stiefel_kernels, CPU, m) {
  m.impl("inv_sqrt_spd", &stiefel_kernels::inv_sqrt_spd_cpu);
  m.impl("cholesky_upper_inverse", &stiefel_kernels::cholesky_upper_inverse_cpu);
  m.impl("solve", &stiefel_kernels::solve_cpu);
}
