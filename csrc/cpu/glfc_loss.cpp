// GLFC local losses on the CPU (specs/glfc.md 1.2-1.3): rows in parallel with SIMD (at::vec)
// inner loops in the accumulation type.
// Forward: one pass per row gives the two BCE row sums and G_i = 1 - sigmoid(o_{i,y_i}); one
// O(N) pass then forms the two group means of G, the weights w and the per-sample losses.
// Backward: one elementwise pass per row that recomputes the sigmoids; only w is saved.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "fcl_ext/cpu_rows.h"
#include "fcl_ext/glfc_checks.h"
#include "fcl_ext/math.h"
#include "fcl_ext/op_checks.h"

namespace fcl_ext {
namespace {

using at::vec::Vectorized;

// softplus(x) = max(x, 0) + log1p(exp(-|x|)): no overflow for any |x|.
template <typename T>
inline Vectorized<T> softplus(const Vectorized<T>& x) {
  const Vectorized<T> zero(0);
  return at::vec::maximum(x, zero) + x.abs().neg().exp().log1p();
}

// 1 / (1 + exp(-x)): exp overflows to inf for very negative x, which gives the right 0.
template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(1);
  return one / (one + x.neg().exp());
}

template <typename T>
struct RowSums {
  T gc;  // sum_c BCE(o_c, onehot(y)_c)
  T rd;  // sum_c BCE(o_c, t'_c), t' = [sigmoid(q) || onehot(y)[C_old:]]
  T g;   // G = 1 - sigmoid(o_y)
};

// One row of the forward, one element at a time with the twin's semantics at every logit (math.h): for
// the rare rows that hold an infinite or NaN logit, where the SIMD formulas below would differ (softplus(-inf)
// is 0 where the twin's BCE is NaN, inf - inf where it is inf).
template <typename T>
inline RowSums<T> glfc_row_forward_any(const T* x, const T* q, int64_t C, int64_t c_old, int64_t y) {
  RowSums<T> r{0, 0, 0};
  for (int64_t c = 0; c < C; ++c) {
    const T gc = c == y ? math::bce_on_target(x[c]) : math::bce_off_target(x[c]);
    r.gc += gc;
    r.rd += c < c_old ? math::bce_teacher_target(x[c], q[c]) : gc;
  }
  r.g = math::sigmoid(-x[y]);
  return r;
}

// One row of the forward. q may be null when c_old == 0. Tails use masked loads, so there
// are no scalar remainder loops.
template <typename T>
inline RowSums<T> glfc_row_forward(const T* x, const T* q, int64_t C, int64_t c_old, int64_t y) {
  using Vec = Vectorized<T>;
  constexpr int64_t kLanes = Vec::size();
  const Vec zero(0), lane = Vec::arange(T(0), T(1));
  // Keeps lanes [0, count) and drops the target's lane. The target's terms are added exactly
  // below (softplus(-o_y)); summing softplus(o_y) and subtracting o_y instead would cancel
  // catastrophically when o_y is large.
  auto without_target = [&](Vec v, int64_t i, int64_t count) {
    if (count < kLanes) v = Vec::set(zero, v, count);
    if (y >= i && y < i + kLanes) v = Vec::blendv(v, zero, lane == Vec(static_cast<T>(y - i)));
    return v;
  };
  // probe = sum of o * 0: NaN iff the row holds an infinite or NaN logit (one multiply-add per vector).
  Vec gc_old(0), rd_old(0), both_new(0), probe(0);
  for (int64_t i = 0; i < c_old; i += kLanes) {
    const int64_t count = std::min(kLanes, c_old - i);
    const Vec o = Vec::loadu(x + i, count), t = sigmoid(Vec::loadu(q + i, count));
    probe = at::vec::fmadd(o, zero, probe);
    const Vec sp = softplus(o);
    gc_old = gc_old + without_target(sp, i, count);
    // The RD target of an old class is sigmoid(q) even at the label, so nothing is dropped here.
    const Vec rd = sp - o * t;
    rd_old = rd_old + (count < kLanes ? Vec::set(zero, rd, count) : rd);
  }
  for (int64_t i = c_old; i < C; i += kLanes) {
    const int64_t count = std::min(kLanes, C - i);
    const Vec o = Vec::loadu(x + i, count);
    probe = at::vec::fmadd(o, zero, probe);
    both_new = both_new + without_target(softplus(o), i, count);
  }
  if (cpu::vec_hsum(probe) != T(0)) return glfc_row_forward_any(x, q, C, c_old, y);
  const T o_y = x[y];
  const T target_bce = math::softplus(-o_y);  // BCE(o_y, 1)
  const T shared = cpu::vec_hsum(both_new);
  RowSums<T> r;
  r.gc = cpu::vec_hsum(gc_old) + shared + target_bce;
  r.rd = cpu::vec_hsum(rd_old) + shared + (y >= c_old ? target_bce : T(0));
  r.g = math::sigmoid(-o_y);
  return r;
}

// One row of the backward: out_c = a sigmoid(o_c) - b sigmoid(q_c) [c < C_old], then the
// target entry written exactly. a = s (gc_w w + rd_w), b = s rd_w, s = grad / C.
template <typename T>
inline void glfc_row_backward(const T* x, const T* q, int64_t C, int64_t c_old, int64_t y, T scale, T w,
                              T gc_weight, T rd_weight, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t kLanes = Vec::size();
  const T a = scale * (gc_weight * w + rd_weight), b = scale * rd_weight;
  const Vec va(a), vb(b);
  for (int64_t i = 0; i < c_old; i += kLanes) {
    const int64_t count = std::min(kLanes, c_old - i);
    const Vec r = va * sigmoid(Vec::loadu(x + i, count)) - vb * sigmoid(Vec::loadu(q + i, count));
    r.store(out + i, count);
  }
  for (int64_t i = c_old; i < C; i += kLanes) {
    const int64_t count = std::min(kLanes, C - i);
    (va * sigmoid(Vec::loadu(x + i, count))).store(out + i, count);
  }
  // p_y - 1 = -sigmoid(-o_y), exact where p_y rounds to 1.
  const T o_y = x[y], one_minus_p = math::sigmoid(-o_y);
  T grad_y = -scale * gc_weight * w * one_minus_p;
  if (y >= c_old) {
    grad_y -= b * one_minus_p;
  } else {
    grad_y += b * (math::sigmoid(o_y) - math::sigmoid(q[y]));
  }
  out[y] = grad_y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> glfc_loss_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                             const std::optional<at::Tensor>& old_class_mask,
                                                             const std::optional<at::Tensor>& old_logits,
                                                             double gc_weight, double rd_weight) {
  const int64_t c_old = check_glfc_inputs(logits, labels, old_class_mask, old_logits);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto opmath = at::toOpMathType(logits.scalar_type());
  auto per_sample = at::empty({N}, logits.options());
  auto weights = at::empty({N}, logits.options().dtype(opmath));
  auto row_stats = at::empty({N, 2}, logits.options().dtype(opmath));
  if (N == 0) return {per_sample, weights, row_stats};
  const auto x = logits.contiguous();
  const auto y = labels.contiguous();
  const at::Tensor q = c_old > 0 ? old_logits->contiguous() : at::Tensor();
  const at::Tensor mask = old_class_mask.has_value() ? old_class_mask->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "glfc_loss_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* qp = c_old > 0 ? q.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* yp = y.const_data_ptr<int64_t>();
    opmath_t* wp = weights.mutable_data_ptr<opmath_t>();
    opmath_t* sp = row_stats.mutable_data_ptr<opmath_t>();
    at::parallel_for(0, N, cpu::row_grain(C), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> xbuf, qbuf;
      for (int64_t r = begin; r < end; ++r) {
        check_label_value(yp[r], C, r);
        const opmath_t* row = cpu::widen_row<scalar_t, opmath_t>(xp + r * C, C, xbuf);
        const opmath_t* qrow = c_old > 0 ? cpu::widen_row<scalar_t, opmath_t>(qp + r * c_old, c_old, qbuf) : nullptr;
        const RowSums<opmath_t> s = glfc_row_forward<opmath_t>(row, qrow, C, c_old, yp[r]);
        sp[2 * r] = s.gc;
        sp[2 * r + 1] = s.rd;
        wp[r] = s.g;  // G for now; the weights need both group means first
      }
    });

    // The two group means of G over the batch (double sums: N can be large).
    const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    const bool any_old = mp != nullptr && std::any_of(mp, mp + C, [](bool b) { return b; });
    opmath_t mean_old = 0, mean_new = 0;
    if (any_old) {
      double sum[2] = {0, 0};
      int64_t count[2] = {0, 0};
      for (int64_t r = 0; r < N; ++r) {
        const int k = mp[yp[r]] ? 1 : 0;
        sum[k] += static_cast<double>(wp[r]);
        count[k] += 1;
      }
      mean_new = count[0] > 0 ? static_cast<opmath_t>(sum[0] / count[0]) : opmath_t(0);
      mean_old = count[1] > 0 ? static_cast<opmath_t>(sum[1] / count[1]) : opmath_t(0);
    }
    scalar_t* lp = per_sample.mutable_data_ptr<scalar_t>();
    const opmath_t inv_c = opmath_t(1) / static_cast<opmath_t>(C);
    const opmath_t gc_w = static_cast<opmath_t>(gc_weight), rd_w = static_cast<opmath_t>(rd_weight);
    for (int64_t r = 0; r < N; ++r) {
      const opmath_t w =
          any_old ? math::gradient_compensation_weight(wp[r], mp[yp[r]] ? mean_old : mean_new) : opmath_t(1);
      wp[r] = w;
      const opmath_t gc = sp[2 * r] * inv_c, rd = sp[2 * r + 1] * inv_c;
      sp[2 * r] = gc;
      sp[2 * r + 1] = rd;
      // (w == 0 only where G underflowed: the label's logit is read only then)
      const opmath_t w_gc =
          w == opmath_t(0) ? math::compensated_row(w, gc, static_cast<opmath_t>(xp[r * C + yp[r]])) : w * gc;
      lp[r] = static_cast<scalar_t>(math::glfc_sample_loss(gc_w, w_gc, rd_w, rd));
    }
  });
  return {per_sample, weights, row_stats};
}

at::Tensor glfc_loss_backward_cpu(const at::Tensor& grad_per_sample, const at::Tensor& logits,
                                  const at::Tensor& labels, const std::optional<at::Tensor>& old_logits,
                                  const at::Tensor& weights, double gc_weight, double rd_weight) {
  const int64_t c_old = check_glfc_inputs(logits, labels, std::nullopt, old_logits);
  const int64_t N = logits.size(0), C = logits.size(1);
  check_glfc_backward_inputs(grad_per_sample, logits, weights);
  const auto x = logits.contiguous();
  auto grad = at::empty_like(x);
  if (N == 0) return grad;
  const auto y = labels.contiguous();
  const auto g = grad_per_sample.to(logits.scalar_type()).contiguous();
  const auto w = weights.contiguous();
  const at::Tensor q = c_old > 0 ? old_logits->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "glfc_loss_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* qp = c_old > 0 ? q.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    scalar_t* op = grad.mutable_data_ptr<scalar_t>();
    const opmath_t inv_c = opmath_t(1) / static_cast<opmath_t>(C);
    const opmath_t gc_w = static_cast<opmath_t>(gc_weight), rd_w = static_cast<opmath_t>(rd_weight);
    at::parallel_for(0, N, cpu::row_grain(C), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> xbuf, qbuf, out(std::is_same_v<scalar_t, opmath_t> ? 0 : C);
      for (int64_t r = begin; r < end; ++r) {
        check_label_value(yp[r], C, r);
        const opmath_t* row = cpu::widen_row<scalar_t, opmath_t>(xp + r * C, C, xbuf);
        const opmath_t* qrow = c_old > 0 ? cpu::widen_row<scalar_t, opmath_t>(qp + r * c_old, c_old, qbuf) : nullptr;
        opmath_t* dst = cpu::narrow_target<scalar_t, opmath_t>(op + r * C, out);
        glfc_row_backward<opmath_t>(row, qrow, C, c_old, yp[r], static_cast<opmath_t>(gp[r]) * inv_c, wp[r], gc_w,
                                    rd_w, dst);
        cpu::narrow_row<scalar_t, opmath_t>(dst, C, op + r * C);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CPU, m) {
  m.impl("glfc_loss", &glfc_loss_cpu);
  m.impl("_glfc_loss_backward", &glfc_loss_backward_cpu);
}

}  // namespace fcl_ext
