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

// ---- GLFC's BCE terms at any logit, as the twin computes them (issue 17) ----
// The twin is PyTorch's BCE with logits, (1 - t) x - log_sigmoid(x). For a finite x that is the stable
// softplus(x) - x t below; at a non-finite x it gives NaN for NaN and for -inf (-inf + inf), and for +inf:
// +inf where 1 - t > 0, NaN where 1 - t is 0 (0 * inf) or NaN. The kernels use these three helpers for
// every element (CUDA) or for the rare rows that hold a non-finite logit (CPU; its SIMD loops cover the rest).
template <typename T>
C10_HOST_DEVICE inline bool is_finite(T x) {
  return x - x == T(0);  // inf - inf and NaN - NaN are NaN
}

template <typename T>
C10_HOST_DEVICE inline T bce_at_nonfinite_logit(T x, T one_minus_t) {
  return (x > T(0) && one_minus_t > T(0)) ? x : std::numeric_limits<T>::quiet_NaN();
}

// BCE(x, 0): a logit that is not the label's (one-hot target 0).
template <typename T>
C10_HOST_DEVICE inline T bce_off_target(T x) {
  return is_finite(x) ? softplus(x) : bce_at_nonfinite_logit(x, T(1));
}

// BCE(x, 1) at the label, as softplus(-x): no large softplus(x) - x to cancel.
template <typename T>
C10_HOST_DEVICE inline T bce_on_target(T x) {
  return is_finite(x) ? softplus(-x) : std::numeric_limits<T>::quiet_NaN();
}

// BCE(x, sigmoid(q)) against an old model's logit q. Whether 1 - sigmoid(q) is 0 at x = +inf is decided in
// float64, as the float64 twin rounds it (from q ~ 36.7; float32 would round from q ~ 16.6): the float64
// twin is the oracle, and this branch is only taken at a non-finite logit.
template <typename T>
C10_HOST_DEVICE inline T bce_teacher_target(T x, T q) {
  if (is_finite(x)) return softplus(x) - x * sigmoid(q);
  return bce_at_nonfinite_logit(x, static_cast<T>(1.0 - sigmoid(static_cast<double>(q))));
}

// w * gc for one sample (gc its GC row sum or mean). 0 * inf is NaN, as in the twin, where the twin's float64
// weight is 0 too: float32's G = sigmoid(-o_y) underflows to 0 from o_y ~ 104, float64's only from ~ 745.
template <typename T>
C10_HOST_DEVICE inline T compensated_row(T w, T gc, T o_y) {
  if (w == T(0) && gc > T(0) && !is_finite(gc)) {
    return sigmoid(-static_cast<double>(o_y)) > 0.0 ? gc : std::numeric_limits<T>::quiet_NaN();
  }
  return w * gc;
}

// One sample's GLFC loss from its (weighted) GC and RD terms. A zero weight leaves its term out, so that a
// switched-off term cannot turn an infinite loss into 0 * inf = NaN: GC alone and RD alone (the twin's
// gradient_compensated_bce and relation_distillation_bce) are this with the other weight 0.
template <typename T>
C10_HOST_DEVICE inline T glfc_sample_loss(T gc_weight, T weighted_gc, T rd_weight, T rd) {
  const T gc_term = gc_weight == T(0) ? T(0) : gc_weight * weighted_gc;
  const T rd_term = rd_weight == T(0) ? T(0) : rd_weight * rd;
  return gc_term + rd_term;
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

// Whether an unscaled sum of n squares can be trusted: not overflowed, and large enough that entries whose
// squares fell into the subnormal range (absolute error <= the smallest subnormal each) cost < 1 ulp in total.
// The kernels sum the rows that fail it again, each vector scaled by a power of two first (cosine metric).
template <typename T>
C10_HOST_DEVICE inline bool sum_of_squares_in_range(T x, int64_t n) {
  const T lo = static_cast<T>(static_cast<double>(n) * std::numeric_limits<T>::denorm_min() /
                              std::numeric_limits<T>::epsilon());
  return x >= lo && x <= std::numeric_limits<T>::max();
}

// ---- power-of-two scaling of tiny or huge vectors (issue 17) ----
// The rescaled passes bring a vector's largest |entry| to [1, 2) by an exact power of two 2^-e. For a vector whose
// largest entry is subnormal, 2^-e alone is not representable (2^149 in float, 2^1074 in double), so the factor is
// applied as two halves, each in range; a product by a power of two is exact both times.
struct Pow2Scale {
  int first, second;  // exponents of the two factors, first + second = the whole exponent
};

C10_HOST_DEVICE inline Pow2Scale split_pow2(int e) {
  return {e / 2, e - e / 2};
}

template <typename T>
C10_HOST_DEVICE inline T pow2(int e) {
  return ::ldexp(T(1), e);
}

// inv_std = 2^-e / sqrt(var_hat + eps 2^-2e) of a column whose values, scaled by 2^-e, have variance var_hat.
// A constant column (var_hat == 0) gets exactly 1 / sqrt(eps), whatever e (eps 2^-2e may underflow to 0 for a
// huge column). Where eps 2^-2e overflows (a column tiny next to eps), eps dominates and
// inv_std = 1 / sqrt(var_hat 2^2e + eps). inf only for eps == 0 with a constant column or where the true value
// is beyond the type's range (a standard deviation below ~3e-39 in float).
template <typename T>
C10_HOST_DEVICE inline T scaled_inv_std(T var_hat, T eps, int e) {
  if (var_hat == T(0)) return T(1) / ::sqrt(eps);
  const T eps_hat = ::ldexp(eps, -2 * e);
  if (eps_hat <= std::numeric_limits<T>::max()) return ::ldexp(T(1) / ::sqrt(var_hat + eps_hat), -e);
  return T(1) / ::sqrt(::ldexp(var_hat, 2 * e) + eps);
}

// ---- cross-correlation standardisation near the top of the range (issue 17) ----
// (x - mean) * inv_std, as three per-column factors: x * pre - mean_pre, times post. Only a column with
// |mean| >= max 2^-30 can have x - mean beyond the largest finite value (|x| <= max, and below that |mean| is under
// half an ulp of max) while x_hat itself is O(1); such a column is standardised from exact halves,
// (x/2 - mean/2) (2 inv_std). Every other column gets pre = 1: the usual (x - mean) inv_std, bit for bit.
template <typename T>
struct Standardiser {
  T pre, mean_pre, post;
  C10_HOST_DEVICE T operator()(T x) const {
    return (x * pre - mean_pre) * post;
  }
};

template <typename T>
C10_HOST_DEVICE inline Standardiser<T> make_standardiser(T mean, T inv_std) {
  const bool halve = (mean < T(0) ? -mean : mean) >= std::numeric_limits<T>::max() * T(9.313225746154785e-10);
  const T pre = halve ? T(0.5) : T(1);
  return {pre, mean * pre, inv_std * (halve ? T(2) : T(1))};
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
