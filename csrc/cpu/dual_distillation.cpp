// FCCL dual-domain distillation on the CPU: rows in parallel. Forward: per row one max pass and one
// exp pass giving the log-sum-exps of s, s/T and each teacher t/T (the KL needs no third pass:
// KL(p||q) = sum p (t - s) / T - lse(t/T) + lse(s/T)). Backward: one elementwise pass per row,
// grad = ce_w (softmax(s) - onehot) / N + sum_t w_t (softmax(s/T) - softmax(t/T)) / (T N).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fcl_ext/checks.h"
#include "fcl_ext/op_checks.h"
#include "fcl_ext/cpu_rows.h"
#include "fcl_ext/math.h"

namespace fcl_ext {
namespace {

constexpr int kStats = 4;  // lse(s), lse(s/T), lse(t_intra/T), lse(t_inter/T)

// Rows per task: about 128K elements of the three inputs, so FCCL's 512-row batches with few classes run
// without opening an OpenMP region (whose cost dominates them, especially on a loaded machine).
inline int64_t rows_per_task(int64_t C) {
  return std::max<int64_t>(1, (int64_t(1) << 17) / (3 * std::max<int64_t>(C, 1)));
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

using at::vec::Vectorized;

// The last, partial vector of a row with the missing lanes set to `fill`: FCCL rows have 10 or 65
// logits, so a scalar tail loop (scalar exp) would cost more than the vector body.
template <typename T>
inline Vectorized<T> load_tail(const T* x, int64_t count, T fill) {
  return Vectorized<T>::set(Vectorized<T>(fill), Vectorized<T>::loadu(x, count), count);
}

template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  Vec vm(neg_inf);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + i));
  if (i < n) vm = at::vec::maximum(vm, load_tail(x + i, n - i, neg_inf));
  T tmp[Vec::size()];
  vm.store(tmp);
  T m = neg_inf;
  for (int k = 0; k < Vec::size(); ++k) m = tmp[k] > m ? tmp[k] : m;
  return m;
}

// sum exp((x - m) * scale); padded lanes are -inf and add exp(-inf) = 0.
template <typename T>
T sum_exp(const T* x, int64_t n, T m, T scale) {
  using Vec = Vectorized<T>;
  Vec acc(0), vm(m), vscale(scale);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + cpu::fast_exp((Vec::loadu(x + i) - vm) * vscale);
  if (i < n) acc = acc + cpu::fast_exp((load_tail(x + i, n - i, -std::numeric_limits<T>::infinity()) - vm) * vscale);
  return cpu::vec_hsum(acc);
}

// Loss of one row (before the 1/N) and its stats.
template <typename acc_t>
acc_t row_forward(const acc_t* s, const acc_t* t1, const acc_t* t2, int64_t C, int64_t y, acc_t inv_t,
                  acc_t ce_w, acc_t w1, acc_t w2, acc_t* stats) {
  using Vec = Vectorized<acc_t>;
  const acc_t ms = row_max(s, C);
  const acc_t z1 = sum_exp(s, C, ms, acc_t(1));
  const acc_t zt = inv_t == acc_t(1) ? z1 : sum_exp(s, C, ms, inv_t);  // T = 1 (FCCL): one exp pass
  const acc_t lse_s = ms + std::log(z1), lse_st = ms * inv_t + std::log(zt);
  stats[0] = lse_s;
  stats[1] = lse_st;
  acc_t loss = ce_w * (lse_s - s[y]);
  const acc_t* teachers[2] = {t1, t2};
  const acc_t weights[2] = {w1, w2};
  for (int k = 0; k < 2; ++k) {
    const acc_t* t = teachers[k];
    if (t == nullptr) {
      stats[2 + k] = 0;
      continue;
    }
    const acc_t mt = row_max(t, C);
    Vec vz(0), vgap(0), vmt(mt), vinv(inv_t), zero(0);
    // e (t - s) with e = exp((t - mt) / T); e == 0 (a -inf teacher logit, or a padded lane) adds nothing.
    auto accumulate = [&](const Vec& vt, const Vec& vs) {
      const Vec e = cpu::fast_exp((vt - vmt) * vinv);
      vz = vz + e;
      vgap = vgap + Vec::blendv(e * (vt - vs), zero, e == zero);
    };
    int64_t c = 0;
    for (; c + Vec::size() <= C; c += Vec::size()) accumulate(Vec::loadu(t + c), Vec::loadu(s + c));
    if (c < C) {
      accumulate(load_tail(t + c, C - c, -std::numeric_limits<acc_t>::infinity()), load_tail(s + c, C - c, acc_t(0)));
    }
    const acc_t z = cpu::vec_hsum(vz), gap = cpu::vec_hsum(vgap);
    const acc_t lse_t = mt * inv_t + std::log(z);
    stats[2 + k] = lse_t;
    loss += weights[k] * (gap * inv_t / z - lse_t + lse_st);
  }
  return loss;
}

// dst_c = ce_s softmax(s)_c + kq softmax(s/T)_c - k1 p1_c - k2 p2_c (the one-hot term is added after).
template <typename acc_t>
void row_backward(const acc_t* s, const acc_t* t1, const acc_t* t2, int64_t C, acc_t inv_t, const acc_t* st,
                  acc_t ce_s, acc_t kq, acc_t k1, acc_t k2, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  const bool t_is_one = inv_t == acc_t(1);
  const acc_t c_p = t_is_one ? ce_s + kq : ce_s;  // at T = 1 softmax(s/T) is softmax(s)
  const Vec vlse(st[0]), vlset(st[1]), vl1(st[2]), vl2(st[3]), vinv(inv_t), vcp(c_p), vkq(kq), vk1(k1), vk2(k2);
  auto value = [&](int64_t c, int64_t count) {
    auto load = [&](const acc_t* p) { return count == Vec::size() ? Vec::loadu(p + c) : Vec::loadu(p + c, count); };
    const Vec x = load(s);
    Vec v = vcp * cpu::fast_exp(x - vlse);
    if (!t_is_one) v = v + vkq * cpu::fast_exp(x * vinv - vlset);
    if (t1) v = v - vk1 * cpu::fast_exp(load(t1) * vinv - vl1);
    if (t2) v = v - vk2 * cpu::fast_exp(load(t2) * vinv - vl2);
    return v;
  };
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) value(c, Vec::size()).store(dst + c);
  if (c < C) value(c, C - c).store(dst + c, C - c);  // padded lanes are computed and dropped
}

std::tuple<at::Tensor, at::Tensor> dual_distillation_loss_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                              const std::optional<at::Tensor>& intra_logits,
                                                              const std::optional<at::Tensor>& inter_logits,
                                                              double temperature, double ce_weight,
                                                              double intra_weight, double inter_weight) {
  check_dual_distillation_inputs(logits, labels, intra_logits, inter_logits, temperature);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto s = logits.contiguous();
  const auto y = labels.contiguous();
  std::optional<at::Tensor> t1, t2;
  if (intra_logits.has_value()) t1 = intra_logits->contiguous();
  if (inter_logits.has_value()) t2 = inter_logits->contiguous();
  const auto acc_type = at::toOpMathType(logits.scalar_type());
  auto stats = at::empty({N, kStats}, logits.options().dtype(acc_type));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dual_distillation_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* p1 = ptr_or_null<scalar_t>(t1);
    const scalar_t* p2 = ptr_or_null<scalar_t>(t2);
    const int64_t* yp = y.const_data_ptr<int64_t>();
    acc_t* stp = stats.mutable_data_ptr<acc_t>();
    for (int64_t r = 0; r < N; ++r) {
      TORCH_CHECK(yp[r] >= 0 && yp[r] < C, "fcl_ext: labels[", r, "] = ", yp[r], " is out of range [0, ", C, ")");
    }
    std::vector<acc_t> row_loss(N);
    at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> bs, b1, b2;
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* rs = cpu::widen_row<scalar_t, acc_t>(sp + r * C, C, bs);
        const acc_t* r1 = p1 ? cpu::widen_row<scalar_t, acc_t>(p1 + r * C, C, b1) : nullptr;
        const acc_t* r2 = p2 ? cpu::widen_row<scalar_t, acc_t>(p2 + r * C, C, b2) : nullptr;
        row_loss[r] = row_forward<acc_t>(rs, r1, r2, C, yp[r], acc_t(1 / temperature), acc_t(ce_weight),
                                         acc_t(intra_weight), acc_t(inter_weight), stp + kStats * r);
      }
    });
    acc_t total = 0;
    for (int64_t r = 0; r < N; ++r) total += row_loss[r];
    loss = at::scalar_tensor(total / acc_t(N), logits.options().dtype(acc_type)).to(logits.scalar_type());
  });
  return {loss, stats};
}

at::Tensor dual_distillation_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                          const at::Tensor& labels, const std::optional<at::Tensor>& intra_logits,
                                          const std::optional<at::Tensor>& inter_logits, const at::Tensor& stats,
                                          double temperature, double ce_weight, double intra_weight,
                                          double inter_weight) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto s = logits.contiguous();
  const auto y = labels.contiguous();
  const auto st = stats.contiguous();
  std::optional<at::Tensor> t1, t2;
  if (intra_logits.has_value()) t1 = intra_logits->contiguous();
  if (inter_logits.has_value()) t2 = inter_logits->contiguous();
  auto grad = at::empty_like(s);
  const double g = grad_loss.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dual_distillation_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* p1 = ptr_or_null<scalar_t>(t1);
    const scalar_t* p2 = ptr_or_null<scalar_t>(t2);
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const acc_t* stp = st.const_data_ptr<acc_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const acc_t inv_t = acc_t(1 / temperature);
    const acc_t scale = acc_t(g / static_cast<double>(N));
    const acc_t ce_s = scale * acc_t(ce_weight);
    // Teacher terms are (q - p_t) w / (T N); the q parts of both teachers merge into one coefficient.
    const acc_t k1 = p1 ? scale * acc_t(intra_weight) * inv_t : acc_t(0);
    const acc_t k2 = p2 ? scale * acc_t(inter_weight) * inv_t : acc_t(0);
    const acc_t kq = k1 + k2;
    at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> bs, b1, b2, out(std::is_same_v<scalar_t, acc_t> ? 0 : C);
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* rs = cpu::widen_row<scalar_t, acc_t>(sp + r * C, C, bs);
        const acc_t* r1 = p1 ? cpu::widen_row<scalar_t, acc_t>(p1 + r * C, C, b1) : nullptr;
        const acc_t* r2 = p2 ? cpu::widen_row<scalar_t, acc_t>(p2 + r * C, C, b2) : nullptr;
        const acc_t* rst = stp + kStats * r;
        acc_t* dst = cpu::narrow_target<scalar_t, acc_t>(gp + r * C, out);
        row_backward<acc_t>(rs, r1, r2, C, inv_t, rst, ce_s, kq, k1, k2, dst);
        dst[yp[r]] -= ce_s;
        cpu::narrow_row<scalar_t, acc_t>(dst, C, gp + r * C);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CPU, m) {
  m.impl("dual_distillation_loss", &dual_distillation_loss_cpu);
  m.impl("_dual_distillation_backward", &dual_distillation_backward_cpu);
}

}  // namespace fcl_ext
