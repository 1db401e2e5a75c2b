// Gradient matching loss and the batched L-BFGS two-loop recursion on the CPU.
//
// gradient_matching_loss: one row per problem (rows in parallel), SIMD sums in the
// accumulation type. stats [K, 3] = (dot <g,t>, |g|^2, |t|^2) for "cosine"; for "l2"
// only column 0 is used (the loss itself), the backward needs no statistic.
//
// lbfgs_direction: problems in parallel; each runs torch.optim.LBFGS's two-loop
// recursion over its own history (ring buffer, see fcl_ext/ops.py for the layout).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string_view>

#include "fcl_ext/checks.h"
#include "fcl_ext/op_checks.h"
#include "fcl_ext/cpu_rows.h"
#include "fcl_ext/math.h"

namespace fcl_ext {
namespace {

using at::vec::Vectorized;

// Row sums: l2 -> (sum (g-t)^2, -, -); cosine -> (sum g t, sum g^2, sum t^2).
template <typename T>
inline void matching_row_sums(const T* g, const T* t, int64_t n, bool cosine, T* out) {
  using Vec = Vectorized<T>;
  Vec va(0), vb(0), vc(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec vg = Vec::loadu(g + i), vt = Vec::loadu(t + i);
    if (cosine) {
      va = at::vec::fmadd(vg, vt, va);
      vb = at::vec::fmadd(vg, vg, vb);
      vc = at::vec::fmadd(vt, vt, vc);
    } else {
      Vec d = vg - vt;
      va = at::vec::fmadd(d, d, va);
    }
  }
  T a = cpu::vec_hsum(va), b = cpu::vec_hsum(vb), c = cpu::vec_hsum(vc);
  for (; i < n; ++i) {
    if (cosine) {
      a += g[i] * t[i];
      b += g[i] * g[i];
      c += t[i] * t[i];
    } else {
      T d = g[i] - t[i];
      a += d * d;
    }
  }
  out[0] = a;
  out[1] = b;
  out[2] = c;
}

// Cosine sums of a row whose unscaled sums may have under- or overflowed: each vector is scaled by a power of
// two (exact) that brings its largest entry to [1, 2) before squaring, and the sums are scaled back. Returns
// the loss from the scaled sums (scale-free, right even where a sum itself is not representable).
// The binary exponents of a row pair's largest entries, for rescaled_cosine_*; false for a row with a NaN,
// an infinity or only zeros in g or t (its unscaled sums are exact: NaN, inf or 0).
template <typename T>
inline bool cosine_row_exponents(const T* g, const T* t, int64_t n, int* eg, int* et) {
  T mg = 0, mt = 0;
  for (int64_t i = 0; i < n; ++i) {
    mg = cpu::nan_max(mg, std::abs(g[i]));
    mt = cpu::nan_max(mt, std::abs(t[i]));
  }
  if (!(std::isfinite(mg) && std::isfinite(mt)) || mg == T(0) || mt == T(0)) return false;
  *eg = std::ilogb(mg);
  *et = std::ilogb(mt);
  return true;
}

// (dot, gg, tt) of g 2^-eg and t 2^-et (exact scalings), with the SIMD lanes of matching_row_sums (as accurate
// as the unscaled pass on long rows).
template <typename T>
inline void scaled_cosine_sums(const T* g, const T* t, int64_t n, int eg, int et, T* dot, T* gg, T* tt) {
  using Vec = Vectorized<T>;
  // each scale as two factors: 2^-e alone overflows where the largest entry is subnormal (math::split_pow2)
  const auto pg = math::split_pow2(-eg), pt = math::split_pow2(-et);
  const T sg1 = math::pow2<T>(pg.first), sg2 = math::pow2<T>(pg.second);
  const T st1 = math::pow2<T>(pt.first), st2 = math::pow2<T>(pt.second);
  const Vec vsg1(sg1), vsg2(sg2), vst1(st1), vst2(st2);
  Vec vd(0), va(0), vb(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec a = Vec::loadu(g + i) * vsg1 * vsg2, b = Vec::loadu(t + i) * vst1 * vst2;
    vd = at::vec::fmadd(a, b, vd);
    va = at::vec::fmadd(a, a, va);
    vb = at::vec::fmadd(b, b, vb);
  }
  T d = cpu::vec_hsum(vd), a2 = cpu::vec_hsum(va), b2 = cpu::vec_hsum(vb);
  for (; i < n; ++i) {
    const T a = g[i] * sg1 * sg2, b = t[i] * st1 * st2;
    d += a * b;
    a2 += a * a;
    b2 += b * b;
  }
  *dot = d;
  *gg = a2;
  *tt = b2;
}

template <typename T>
inline T rescaled_cosine_sums(const T* g, const T* t, int64_t n, T* out) {
  int eg = 0, et = 0;
  if (!cosine_row_exponents(g, t, n, &eg, &et)) {  // NaN / inf / zero: exact as is
    matching_row_sums(g, t, n, true, out);
    return math::cosine_matching_loss(out[0], out[1], out[2]);
  }
  T dot, gg, tt;
  scaled_cosine_sums(g, t, n, eg, et, &dot, &gg, &tt);
  out[0] = std::ldexp(dot, eg + et);
  out[1] = std::ldexp(gg, 2 * eg);
  out[2] = std::ldexp(tt, 2 * et);
  return math::cosine_matching_loss(dot, gg, tt);
}

// Backward of one cosine row whose unscaled sums under- or overflowed (math::sum_of_squares_in_range): with the
// forward's power-of-two scales sg = 2^-eg, st = 2^-et and g' = g sg, t' = t st,
//   dloss/dg = a g - b t = sg (A g' - B t'),  A = cos / |g'|^2,  B = 1 / (|g'| |t'|),
// so nothing is squared unscaled; the coefficients up sg A and up sg B are formed in double (sg alone may exceed
// float's range where the result does not). Not taken for NaN, inf or zero rows (the saved sums are exact there).
template <typename T>
inline bool rescaled_cosine_backward(const T* g, const T* t, int64_t n, T up, T* out) {
  int eg = 0, et = 0;
  if (!cosine_row_exponents(g, t, n, &eg, &et)) return false;
  const auto pg = math::split_pow2(-eg), pt = math::split_pow2(-et);
  const T sg1 = math::pow2<T>(pg.first), sg2 = math::pow2<T>(pg.second);
  const T st1 = math::pow2<T>(pt.first), st2 = math::pow2<T>(pt.second);
  T dot, gg, tt, A, B;
  scaled_cosine_sums(g, t, n, eg, et, &dot, &gg, &tt);
  math::cosine_matching_grad_coeffs(dot, gg, tt, &A, &B);
  // up 2^-eg A and up 2^-eg B in double, the power of two applied by ldexp last (never formed on its own, where
  // it may overflow; a zero A stays 0)
  const T ca = static_cast<T>(std::ldexp(static_cast<double>(up) * static_cast<double>(A), -eg));
  const T cb = static_cast<T>(std::ldexp(static_cast<double>(up) * static_cast<double>(B), -eg));
  for (int64_t i = 0; i < n; ++i) out[i] = ca * (g[i] * sg1 * sg2) - cb * (t[i] * st1 * st2);
  return true;
}


std::tuple<at::Tensor, at::Tensor> gradient_matching_loss_cpu(const at::Tensor& grads, const at::Tensor& target_grads,
                                                              std::string_view metric) {
  check_gradient_matching_inputs(grads, target_grads);
  const bool cosine = is_cosine_metric(metric);
  const auto g = grads.contiguous();
  const auto t = target_grads.contiguous();
  const int64_t K = g.size(0), P = g.size(1);
  auto loss = at::empty({K}, g.options());
  auto stats = at::zeros({K, 3}, g.options().dtype(at::toOpMathType(g.scalar_type())));
  if (K == 0) return {loss, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_matching_loss_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
    opmath_t* sp = stats.mutable_data_ptr<opmath_t>();
    at::parallel_for(0, K, cpu::row_grain(P), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> gbuf, tbuf;
      for (int64_t k = begin; k < end; ++k) {
        const opmath_t* gr = cpu::widen_row<scalar_t, opmath_t>(gp + k * P, P, gbuf);
        const opmath_t* tr = cpu::widen_row<scalar_t, opmath_t>(tp + k * P, P, tbuf);
        opmath_t* st = sp + 3 * k;
        matching_row_sums<opmath_t>(gr, tr, P, cosine, st);
        opmath_t value = st[0];
        if (cosine) {
          // The fast unscaled pass is right for all but extreme norms (|g| below ~1e-13 or above ~1e19 in float);
          // those rows take a second, scaled pass. NaN stays NaN either way.
          value = math::sum_of_squares_in_range(st[1], P) && math::sum_of_squares_in_range(st[2], P)
                      ? math::cosine_matching_loss(st[0], st[1], st[2])
                      : rescaled_cosine_sums(gr, tr, P, st);
        }
        lp[k] = static_cast<scalar_t>(value);
      }
    });
  });
  return {loss, stats};
}

at::Tensor gradient_matching_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grads,
                                               const at::Tensor& target_grads, const at::Tensor& stats,
                                               std::string_view metric) {
  check_gradient_matching_backward_inputs(grad_loss, grads, target_grads, stats);
  const bool cosine = is_cosine_metric(metric);
  const auto g = grads.contiguous();
  const auto t = target_grads.contiguous();
  const auto go = grad_loss.contiguous();
  const auto st = stats.contiguous();
  const int64_t K = g.size(0), P = g.size(1);
  auto out = at::empty_like(g);
  if (g.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_matching_loss_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<opmath_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    const opmath_t* sp = st.const_data_ptr<opmath_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, K, cpu::row_grain(P), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> gbuf, tbuf, obuf(std::is_same_v<scalar_t, opmath_t> ? 0 : P);
      for (int64_t k = begin; k < end; ++k) {
        const opmath_t* gr = cpu::widen_row<scalar_t, opmath_t>(gp + k * P, P, gbuf);
        const opmath_t* tr = cpu::widen_row<scalar_t, opmath_t>(tp + k * P, P, tbuf);
        opmath_t* dst = cpu::narrow_target<scalar_t, opmath_t>(op + k * P, obuf);
        const opmath_t up = static_cast<opmath_t>(gop[k]);
        const opmath_t* row_stats = sp + 3 * k;
        // the rows the forward summed scaled (extreme norms): scale before squaring here too
        const bool in_range =
            math::sum_of_squares_in_range(row_stats[1], P) && math::sum_of_squares_in_range(row_stats[2], P);
        if (cosine && !in_range && rescaled_cosine_backward(gr, tr, P, up, dst)) {
          cpu::narrow_row<scalar_t, opmath_t>(dst, P, op + k * P);
          continue;
        }
        // d/dg of the row loss: l2 -> 2 up (g - t) (no 2g - 2t to overflow); cosine -> a g - b t, math.h coefficients.
        opmath_t a = 2, b = 2;
        if (cosine) math::cosine_matching_grad_coeffs(row_stats[0], row_stats[1], row_stats[2], &a, &b);
        a *= up;
        b *= up;
        const Vec va(a), vb(b);
        int64_t i = 0;
        if (cosine) {
          for (; i + Vec::size() <= P; i += Vec::size()) {
            (va * Vec::loadu(gr + i) - vb * Vec::loadu(tr + i)).store(dst + i);
          }
        } else {
          for (; i + Vec::size() <= P; i += Vec::size()) (va * (Vec::loadu(gr + i) - Vec::loadu(tr + i))).store(dst + i);
        }
        for (; i < P; ++i) dst[i] = math::matching_grad(cosine, a, b, gr[i], tr[i]);
        cpu::narrow_row<scalar_t, opmath_t>(dst, P, op + k * P);
      }
    });
  });
  return out;
}

// ---- lbfgs_direction --------------------------------------------------------------

template <typename T>
inline T vec_dot(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  T s = cpu::vec_hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x += alpha * v
template <typename T>
inline void vec_axpy(T* x, T alpha, const T* v, int64_t n) {
  using Vec = Vectorized<T>;
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) at::vec::fmadd(va, Vec::loadu(v + i), Vec::loadu(x + i)).store(x + i);
  for (; i < n; ++i) x[i] += alpha * v[i];
}

at::Tensor lbfgs_direction_cpu(const at::Tensor& grad, const at::Tensor& s_hist, const at::Tensor& y_hist,
                               const at::Tensor& rho, const at::Tensor& hist_len, const at::Tensor& h_diag,
                               const std::optional<at::Tensor>& hist_start) {
  check_lbfgs_inputs(grad, s_hist, y_hist, rho, hist_len, h_diag, hist_start);
  const int64_t K = grad.size(0), D = grad.size(1), M = s_hist.size(1);
  const auto g = grad.contiguous();
  const auto S = s_hist.contiguous();
  const auto Y = y_hist.contiguous();
  const auto R = rho.contiguous();
  const auto L = hist_len.contiguous();
  const auto H = h_diag.contiguous();
  const auto start = hist_start.has_value() ? hist_start->contiguous() : at::zeros({K}, L.options());
  auto d = at::empty_like(g);
  if (K == 0) return d;
  const int64_t* lp = L.const_data_ptr<int64_t>();
  const int64_t* stp = start.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(lp[k] >= 0 && lp[k] <= M, "fcl_ext: hist_len[", k, "] = ", lp[k], " is outside [0, ", M, "]");
    TORCH_CHECK(lp[k] == 0 || (stp[k] >= 0 && stp[k] < M), "fcl_ext: hist_start[", k, "] = ", stp[k],
                " is outside [0, ", M, ")");
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "lbfgs_direction_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = S.const_data_ptr<scalar_t>();
    const scalar_t* yp = Y.const_data_ptr<scalar_t>();
    const scalar_t* rp = R.const_data_ptr<scalar_t>();
    const scalar_t* hp = H.const_data_ptr<scalar_t>();
    scalar_t* dp = d.mutable_data_ptr<scalar_t>();
    // One problem per task: the history (2 M D values) is what each task streams through.
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> alpha(M);
      for (int64_t k = begin; k < end; ++k) {
        scalar_t* q = dp + k * D;
        const scalar_t* gk = gp + k * D;
        for (int64_t i = 0; i < D; ++i) q[i] = -gk[i];
        const int64_t len = lp[k], first = stp[k];
        auto slot = [&](int64_t i) { return (first + i) % M; };  // i-th oldest pair
        // newest -> oldest: alpha_i = rho_i <s_i, q>, q -= alpha_i y_i
        for (int64_t i = len - 1; i >= 0; --i) {
          const int64_t j = slot(i);
          const scalar_t* s = sp + (k * M + j) * D;
          const scalar_t* y = yp + (k * M + j) * D;
          alpha[i] = vec_dot(s, q, D) * rp[k * M + j];
          vec_axpy(q, -alpha[i], y, D);
        }
        // r = H_diag q, then oldest -> newest: beta_i = rho_i <y_i, r>, r += (alpha_i - beta_i) s_i
        const scalar_t h = hp[k];
        for (int64_t i = 0; i < D; ++i) q[i] *= h;
        for (int64_t i = 0; i < len; ++i) {
          const int64_t j = slot(i);
          const scalar_t* s = sp + (k * M + j) * D;
          const scalar_t* y = yp + (k * M + j) * D;
          const scalar_t beta = vec_dot(y, q, D) * rp[k * M + j];
          vec_axpy(q, alpha[i] - beta, s, D);
        }
      }
    });
  });
  return d;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CPU, m) {
  m.impl("gradient_matching_loss", &gradient_matching_loss_cpu);
  m.impl("_gradient_matching_loss_backward", &gradient_matching_loss_backward_cpu);
  m.impl("lbfgs_direction", &lbfgs_direction_cpu);
}

}  // namespace fcl_ext
