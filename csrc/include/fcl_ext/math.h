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

// Gradient matching, cosine metric, from per-row sums dot = <g, t>, gg = |g|^2, tt = |t|^2:
//   loss = 1 - dot / (|g| |t|);   dloss/dg_p = a * g_p - b * t_p,
//   a = cos / |g|^2,  b = 1 / (|g| |t|)   (norms taken before multiplying: no |g|^3 |t| to overflow).
// A row with |g| |t| == 0 has loss 1 and gradient 0 (the cosine is undefined there); a NaN anywhere gives NaN.
template <typename T>
C10_HOST_DEVICE inline T cosine_matching_loss(T dot, T gg, T tt) {
  const T den = ::sqrt(gg) * ::sqrt(tt);
  if (den > T(0)) return T(1) - dot / den;
  return den == T(0) ? T(1) : den;  // den is NaN here
}

template <typename T>
C10_HOST_DEVICE inline void cosine_matching_grad_coeffs(T dot, T gg, T tt, T* a, T* b) {
  const T den = ::sqrt(gg) * ::sqrt(tt);
  if (den > T(0)) {
    *b = T(1) / den;
    *a = (dot / den) / gg;
  } else {
    *a = den == T(0) ? T(0) : den;  // NaN in -> NaN out
    *b = *a;
  }
}

// One element of the matching backward: cosine a g - b t; l2 a (g - t) with a = 2 grad (no a g - a t overflow).
template <typename T>
C10_HOST_DEVICE inline T matching_grad(bool cosine, T a, T b, T g, T t) {
  return cosine ? a * g - b * t : a * (g - t);
}

// ---- fccl losses (issue 4) ----
// One entry of the cross-correlation loss: (m - 1)^2 on the diagonal, w (m - tau)^2 off it.
template <typename T>
C10_HOST_DEVICE inline T cross_corr_term(T m, bool on_diag, T off_weight, T off_target) {
  return on_diag ? (m - T(1)) * (m - T(1)) : off_weight * (m - off_target) * (m - off_target);
}

// Its derivative dL/dM_uv: 2 (m - 1) on the diagonal, 2 w (m - tau) off it.
template <typename T>
C10_HOST_DEVICE inline T cross_corr_dterm(T m, bool on_diag, T off_weight, T off_target) {
  return on_diag ? T(2) * (m - T(1)) : T(2) * off_weight * (m - off_target);
}

// Back through x_hat = (x - mean) * inv_std over a column of n values, var = sum (x - mean)^2 / n_var:
// dx = inv_std * (g - mean(g) - x_hat * sum(g x_hat) / n_var).
template <typename T>
C10_HOST_DEVICE inline T standardise_backward(T g, T g_mean, T x_hat, T g_dot_xhat, T inv_std, T n_var) {
  return inv_std * (g - g_mean - x_hat * g_dot_xhat / n_var);
}

// e * (dt - ds) for a teacher weight e = exp(dt / T), dt = t - max t, ds = s - max s (each difference exact,
// so no large logit cancels); a -inf teacher logit (e == 0) adds nothing.
template <typename T>
C10_HOST_DEVICE inline T kd_weighted_gap(T e, T dt, T ds) {
  return e == T(0) ? T(0) : e * (dt - ds);
}

}  // namespace math
}  // namespace fcl_ext
