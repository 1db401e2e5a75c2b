// softmax_entropy on the CPU: rows in parallel, SIMD (at::vec) inner loops in the
// accumulation type. Forward: max, then sum exp(x-m) and sum exp(x-m)(x-m) in one pass
// (eps == 0) plus one more pass for the eps > 0 form. Backward: one pass per row.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fcl_ext/checks.h"
#include "fcl_ext/cpu_rows.h"
#include "fcl_ext/op_checks.h"
#include "fcl_ext/math.h"

namespace fcl_ext {
namespace {

using at::vec::Vectorized;

// Returns H, writes (max, log sum exp(x - max), abar) into stats. Keeping the max apart
// from log-sum keeps x - max exact; x - logsumexp loses digits when |x| is large.
template <typename T>
inline T entropy_row(const T* x, int64_t n, T eps, T* stats, std::vector<T>& e_buf) {
  using Vec = Vectorized<T>;
  const T m = cpu::vec_max(x, n);
  if (!std::isfinite(m)) {  // a NaN or +inf entry, or all entries -inf: NaN, as in torch
    stats[0] = stats[1] = stats[2] = std::numeric_limits<T>::quiet_NaN();
    return std::numeric_limits<T>::quiet_NaN();
  }
  // s = sum e, t = sum e * (x - m); a -inf logit has e == 0 and contributes nothing.
  // The eps form needs p = e / s again: keep e in a row buffer (L1-resident) instead of
  // recomputing the exponentials.
  const bool keep = eps != T(0);
  if (keep) e_buf.resize(n);
  T* eb = e_buf.data();
  Vec vs(0), vt(0), vm(m), zero(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec d = Vec::loadu(x + i) - vm;
    Vec e = cpu::fast_exp(d);
    vs = vs + e;
    vt = vt + Vec::blendv(e * d, zero, e == zero);
    if (keep) e.store(eb + i);
  }
  if (i < n) {  // the tail as one vector; its lanes past the row are -inf logits, e = 0 (masked to be sure)
    const int64_t r = n - i;
    Vec d = cpu::load_tail(x + i, r, -std::numeric_limits<T>::infinity()) - vm;
    Vec e = Vec::set(zero, cpu::fast_exp(d), r);
    vs = vs + e;
    vt = vt + Vec::blendv(e * d, zero, e == zero);
    if (keep) e.store(eb + i, r);
  }
  const T s = cpu::vec_hsum(vs), t = cpu::vec_hsum(vt);
  const T log_s = std::log(s);
  stats[0] = m;
  stats[1] = log_s;
  if (eps == T(0)) {
    const T h = log_s - t / s;  // -sum p log p = log s - sum p (x - m)
    stats[2] = h - T(1);        // abar = sum p a, a = -(log p + 1)
    return h;
  }
  // eps > 0: H = -sum p log(p + eps), abar = H - sum p^2 / (p + eps).
  const T inv_s = T(1) / s;
  Vec vh(0), vq(0), vinv(inv_s), veps(eps);
  i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec p = Vec::loadu(eb + i) * vinv;
    Vec pe = p + veps;
    vh = vh + p * cpu::fast_log(pe);
    vq = vq + p * p / pe;
  }
  if (i < n) {  // the tail: lanes past the row have p = 0 and add nothing (eps > 0 here)
    Vec p = Vec::loadu(eb + i, n - i) * vinv;
    Vec pe = p + veps;
    vh = vh + p * cpu::fast_log(pe);
    vq = vq + p * p / pe;
  }
  T h = cpu::vec_hsum(vh), q = cpu::vec_hsum(vq);
  h = -h;
  stats[2] = h - q;
  return h;
}

// grad_x_j = g * p_j * (a_j - abar)
template <typename T>
inline void entropy_row_backward(const T* x, int64_t n, T eps, const T* stats, T g, T* out) {
  using Vec = Vectorized<T>;
  const T m = stats[0], log_s = stats[1], abar = stats[2];
  if (std::isnan(m) || std::isnan(g)) {  // the forward's NaN row (see entropy_row), or a NaN upstream gradient
    cpu::fill_nan(out, n);
    return;
  }
  Vec vm(m), vls(log_s), vabar(abar), vg(g), one(1), zero(0), veps(eps);
  auto grad_of = [&](const Vec& xv) {
    Vec logp = (xv - vm) - vls;
    Vec p = cpu::fast_exp(logp);
    Vec a;
    if (eps == T(0)) {
      a = zero - (logp + one);
    } else {
      Vec pe = p + veps;
      a = zero - (cpu::fast_log(pe) + p / pe);
    }
    return Vec::blendv(vg * p * (a - vabar), zero, p == zero);  // -inf logits get zero gradient, not NaN
  };
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) grad_of(Vec::loadu(x + i)).store(out + i);
  // the tail as one vector (lanes past the row: -inf logits, gradient 0, not stored)
  if (i < n) grad_of(cpu::load_tail(x + i, n - i, -std::numeric_limits<T>::infinity())).store(out + i, n - i);
}

std::tuple<at::Tensor, at::Tensor> softmax_entropy_cpu(const at::Tensor& logits, double eps) {
  check_floating(logits, "logits");
  check_dim_at_least(logits, 1, "logits");
  TORCH_CHECK(eps >= 0, "fcl_ext: eps must be >= 0, got ", eps);
  const int64_t C = logits.size(-1);
  const auto x = logits.contiguous();
  const int64_t rows = C == 0 ? 0 : x.numel() / C;
  auto batch_shape = logits.sizes().slice(0, logits.dim() - 1);
  auto entropy = at::empty(batch_shape, logits.options());
  const auto opmath = at::toOpMathType(logits.scalar_type());
  // Checked before the empty return: [3, 0] logits would otherwise give 3 uninitialised entropies.
  TORCH_CHECK(C > 0 || entropy.numel() == 0, "fcl_ext: logits must have at least one class (last dim > 0), got shape ",
              logits.sizes());
  auto stats = at::empty({rows, 3}, logits.options().dtype(opmath));
  if (rows == 0) return {entropy, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_entropy_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* hp = entropy.mutable_data_ptr<scalar_t>();
    opmath_t* sp = stats.mutable_data_ptr<opmath_t>();
    at::parallel_for(0, rows, cpu::row_grain(C), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> buf, e_buf;
      for (int64_t r = begin; r < end; ++r) {
        const opmath_t* row = cpu::widen_row<scalar_t, opmath_t>(xp + r * C, C, buf);
        hp[r] = static_cast<scalar_t>(entropy_row<opmath_t>(row, C, static_cast<opmath_t>(eps), sp + 3 * r, e_buf));
      }
    });
  });
  return {entropy, stats};
}

at::Tensor softmax_entropy_backward_cpu(const at::Tensor& grad_entropy, const at::Tensor& logits,
                                        const at::Tensor& stats, double eps) {
  check_softmax_entropy_backward_inputs(grad_entropy, logits, stats, eps);
  const int64_t C = logits.size(-1);
  const auto x = logits.contiguous();
  const auto g = grad_entropy.contiguous();
  const auto st = stats.contiguous();
  auto grad = at::empty_like(x);
  const int64_t rows = C == 0 ? 0 : x.numel() / C;
  if (rows == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_entropy_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const opmath_t* sp = st.const_data_ptr<opmath_t>();
    scalar_t* op = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, cpu::row_grain(C), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> buf, out(std::is_same_v<scalar_t, opmath_t> ? 0 : C);
      for (int64_t r = begin; r < end; ++r) {
        const opmath_t* row = cpu::widen_row<scalar_t, opmath_t>(xp + r * C, C, buf);
        opmath_t* dst = cpu::narrow_target<scalar_t, opmath_t>(op + r * C, out);
        entropy_row_backward<opmath_t>(row, C, eps, sp + 3 * r, static_cast<opmath_t>(gp[r]), dst);
        cpu::narrow_row<scalar_t, opmath_t>(dst, C, op + r * C);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CPU, m) {
  m.impl("softmax_entropy", &softmax_entropy_cpu);
  m.impl("_softmax_entropy_backward", &softmax_entropy_backward_cpu);
}

}  // namespace fcl_ext
