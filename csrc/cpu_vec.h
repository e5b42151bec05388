// The vector types and function-cloning macro of the native CPU kernels (fused_step_cpu.cpp,
// small_matmul.h and the kernels on it): GCC vector extensions of 64 bytes, used only inside
// always-inlined helpers of functions compiled three times (x86-64-v4 / v3 / baseline, picked at
// load time: target_clones), so each clone gets vectors as wide as its ISA allows. at::vec is not
// used: in an extension compiled without torch's per-capability flags it is the generic array
// implementation.
#pragma once

#include <c10/macros/Macros.h>

#include <cstring>

// The 64-byte vector types only live inside always-inlined helpers of the cloned functions (no
// ABI boundary), so GCC's note on their calling convention does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(STIEFEL_NO_TARGET_CLONES)
#define SK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SK_CLONES
#endif
#define SK_INLINE C10_ALWAYS_INLINE

namespace stiefel_kernels {

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

// a * b + c rounded once, lane by lane (an FMA instruction where the ISA has one): explicit where
// bits must not depend on whether the compiler contracts a multiply and an add
SK_INLINE float sfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
SK_INLINE double sfma(double a, double b, double c) { return __builtin_fma(a, b, c); }
template <typename S>
SK_INLINE vec<S> vfma(const vec<S>& a, const vec<S>& b, const vec<S>& c) {
  vec<S> r;
  for (int l = 0; l < VecOf<S>::W; ++l) r[l] = sfma(a[l], b[l], c[l]);
  return r;
}

}  // namespace stiefel_kernels
