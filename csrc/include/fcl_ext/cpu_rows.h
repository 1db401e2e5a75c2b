// Helpers for CPU kernels that work row by row on a [rows, C] view.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <algorithm>
#include <limits>
#include <vector>

namespace fcl_ext {
namespace cpu {

// Rows per parallel task: aim for ~32K elements per chunk so small C still amortises
// the OpenMP overhead and large C still splits across threads.
inline int64_t row_grain(int64_t cols) {
  const int64_t target = 32768;
  const int64_t g = cols > 0 ? target / cols : target;
  return g < 1 ? 1 : g;
}

// Reduced-precision rows are widened into a per-thread float buffer so one vectorised
// float code path serves float, half and bfloat16.
template <typename scalar_t, typename opmath_t>
inline const opmath_t* widen_row(const scalar_t* src, int64_t n, std::vector<opmath_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return src;
  } else {
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<opmath_t>(src[i]);
    return buf.data();
  }
}

// Where to write an opmath result row: in place for float/double, else a scratch buffer
// that narrow_row() then converts into the output.
template <typename scalar_t, typename opmath_t>
inline opmath_t* narrow_target(scalar_t* dst, std::vector<opmath_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return dst;
  } else {
    return buf.data();
  }
}

template <typename scalar_t, typename opmath_t>
inline void narrow_row(const opmath_t* src, int64_t n, scalar_t* dst) {
  if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// NaN-propagating max: a NaN anywhere in the row makes the row's max NaN, which the kernels use to
// turn the whole row's results into NaN (the fast exp below would map NaN to a finite number).
template <typename T>
inline T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <typename T>
inline T vec_max(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= Vec::size()) {
    Vec vm(m);  // at::vec::maximum propagates NaN lane-wise
    for (; i + Vec::size() <= n; i += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + i));
    T tmp[Vec::size()];
    vm.store(tmp);
    for (int k = 0; k < Vec::size(); ++k) m = nan_max(m, tmp[k]);
  }
  for (; i < n; ++i) m = nan_max(m, x[i]);
  return m;
}

template <typename T>
inline void fill_nan(T* x, int64_t n) {
  std::fill(x, x + n, std::numeric_limits<T>::quiet_NaN());
}

// exp for the hot loops: ATen's 20-ULP polynomial for float (well inside float32 test
// tolerances, ~2x faster than the 1-ULP Sleef call), the exact Sleef/libm exp for double.
// exp_u20 clamps its input, so it maps NaN to a finite value: callers propagate NaN through a row
// statistic (nan_max) instead of paying a blend per vector.
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& v) { return v.exp_u20(); }
inline at::vec::Vectorized<double> fast_exp(const at::vec::Vectorized<double>& v) { return v.exp(); }

// log for the hot loops: Sleef's 3.5-ULP variant for float on AVX2, exact log otherwise.
inline at::vec::Vectorized<float> fast_log(const at::vec::Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  return at::vec::Vectorized<float>(Sleef_logf8_u35(v));
#else
  return v.log();
#endif
}
inline at::vec::Vectorized<double> fast_log(const at::vec::Vectorized<double>& v) { return v.log(); }

// The last `count` (< Vec::size()) entries of a row as one vector, the lanes past the row set to `fill`: the tail
// then goes through the body's SIMD math (one scalar libm exp + log per tail element cost about as much as the whole
// vector body at C = 100).
template <typename T>
inline at::vec::Vectorized<T> load_tail(const T* x, int64_t count, T fill) {
  using Vec = at::vec::Vectorized<T>;
  return Vec::set(Vec(fill), Vec::loadu(x, count), count);
}

template <typename T>
inline T vec_hsum(const at::vec::Vectorized<T>& v) {
  T tmp[at::vec::Vectorized<T>::size()];
  v.store(tmp);
  T s = 0;
  for (int k = 0; k < at::vec::Vectorized<T>::size(); ++k) s += tmp[k];
  return s;
}

}  // namespace cpu
}  // namespace fcl_ext
