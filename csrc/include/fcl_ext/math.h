// Per-element formulas shared by the CPU and CUDA kernels (C10_HOST_DEVICE), so the
// CPU tests exercise exactly the math the GPU runs. All take and return the
// accumulation type (float for float/half/bfloat16 inputs, double for double).
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>
#include <limits>

namespace fcl_ext {
namespace math {

template <typename T>
C10_HOST_DEVICE inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// p * log(p), with the limit 0 at p == 0 (a -inf logit contributes nothing).
template <typename T>
C10_HOST_DEVICE inline T xlogx_from_log(T p, T logp) {
  return p == T(0) ? T(0) : p * logp;
}

// Entropy integrand derivative a = dH/dp (with the sign absorbed):
//   H = -sum p log(p + eps)  ->  a = -(log(p + eps) + p / (p + eps)).
// For eps == 0 we take log p from the stable log-softmax: a = -(logp + 1).
template <typename T>
C10_HOST_DEVICE inline T entropy_dp(T p, T logp, T eps) {
  if (eps == T(0)) return -(logp + T(1));
  return -(::log(p + eps) + p / (p + eps));
}

// Stable softplus log(1 + e^x) = max(x, 0) + log1p(e^{-|x|}); exact for |x| up to 1e4.
template <typename T>
C10_HOST_DEVICE inline T softplus(T x) {
  return (x > T(0) ? x : T(0)) + ::log1p(::exp(-(x > T(0) ? x : -x)));
}

// BCE with logits for one element: softplus(x) - x * t (stable for any |x|).
template <typename T>
C10_HOST_DEVICE inline T bce_with_logits(T x, T t) {
  return softplus(x) - x * t;
}

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  if (x >= T(0)) {
    return T(1) / (T(1) + ::exp(-x));
  }
  T e = ::exp(x);
  return e / (T(1) + e);
}

// GLFC gradient-compensation weight of one sample: G / mean(G over its group), with w = 1
// where the group's mean is not positive (the reference code divides by zero there).
template <typename T>
C10_HOST_DEVICE inline T gradient_compensation_weight(T g, T group_mean_g) {
  return group_mean_g > T(0) ? g / group_mean_g : T(1);
}

}  // namespace math
}  // namespace fcl_ext
