// FCCL dual-domain distillation on the CPU: rows in parallel. Forward: per row one max pass and one
// exp pass giving the maxima and log-sum-exps of s, s/T and each teacher t/T (the KL needs no third pass:
// KL(p||q) = sum p ((t - mt) - (s - ms)) / T - log z_t + log z_s). Backward: one elementwise pass per row,
// grad = ce_w (softmax(s) - onehot) / N + sum_t w_t (softmax(s/T) - softmax(t/T)) / (T N).
// Few classes (FCCL's 10 or 65) take a row-blocked path: one row per SIMD lane.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fcl_ext/checks.h"
#include "fcl_ext/op_checks.h"
#include "fcl_ext/cpu_rows.h"
#include "fcl_ext/math.h"

namespace fcl_ext {
namespace {

constexpr int64_t kStats = kDualDistillationStats;  // layout: see row_forward

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

// NaN-propagating row max (a NaN logit makes the row's result NaN, see row_forward).
template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  Vec vm(neg_inf);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + i));
  if (i < n) vm = at::vec::maximum(vm, cpu::load_tail(x + i, n - i, neg_inf));
  T tmp[Vec::size()];
  vm.store(tmp);
  T m = neg_inf;
  for (int k = 0; k < Vec::size(); ++k) m = cpu::nan_max(m, tmp[k]);
  return m;
}

// sum exp((x - m) * scale); padded lanes are -inf and add exp(-inf) = 0.
template <typename T>
T sum_exp(const T* x, int64_t n, T m, T scale) {
  using Vec = Vectorized<T>;
  Vec acc(0), vm(m), vscale(scale);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + cpu::fast_exp((Vec::loadu(x + i) - vm) * vscale);
  if (i < n) {
    acc = acc + cpu::fast_exp((cpu::load_tail(x + i, n - i, -std::numeric_limits<T>::infinity()) - vm) * vscale);
  }
  return cpu::vec_hsum(acc);
}

// 0 for a finite x, NaN for NaN or +-inf: added to a row's loss and max statistic, it turns a row whose max is
// not finite (a NaN or +inf logit, or only -inf logits: undefined softmax, NaN in torch) into NaN.
template <typename T>
inline T nan_unless_finite(T x) {
  return x - x;
}

// Loss of one row (before the 1/N) and its stats:
//   stats = (ms, log z1, log zT, m1, log z1T, m2, log z2T), ms = max s, z1 = sum e^{s - ms}, zT = sum e^{(s - ms)/T},
//   m_k = max t_k, z_kT = sum e^{(t_k - m_k)/T}; ms is NaN for a row whose loss is NaN (the backward's flag).
// Maxima and log-sums stay apart, so every x - max is exact and no large lse is subtracted from a large logit:
//   CE = (ms - s_y) + log z1,   KL_k = sum p_k ((t_k - m_k) - (s - ms)) / T + log zT - log z_kT.
template <typename acc_t>
acc_t row_forward(const acc_t* s, const acc_t* t1, const acc_t* t2, int64_t C, int64_t y, acc_t inv_t,
                  acc_t ce_w, acc_t w1, acc_t w2, acc_t* stats) {
  using Vec = Vectorized<acc_t>;
  const acc_t ms = row_max(s, C);
  const acc_t z1 = sum_exp(s, C, ms, acc_t(1));
  const acc_t zt = inv_t == acc_t(1) ? z1 : sum_exp(s, C, ms, inv_t);  // T = 1 (FCCL): one exp pass
  const acc_t log_z1 = std::log(z1);
  const acc_t log_zt = inv_t == acc_t(1) ? log_z1 : std::log(zt);
  acc_t bad = nan_unless_finite(ms);
  acc_t loss = ce_w * ((ms - s[y]) + log_z1);
  stats[1] = log_z1;
  stats[2] = log_zt;
  const acc_t* teachers[2] = {t1, t2};
  const acc_t weights[2] = {w1, w2};
  for (int k = 0; k < 2; ++k) {
    const acc_t* t = teachers[k];
    if (t == nullptr) {
      stats[3 + 2 * k] = stats[4 + 2 * k] = 0;
      continue;
    }
    const acc_t mt = row_max(t, C);
    bad += nan_unless_finite(mt);
    Vec vz(0), vgap(0), vmt(mt), vms(ms), vinv(inv_t), zero(0);
    // e ((t - mt) - (s - ms)) with e = exp((t - mt) / T); e == 0 (a -inf teacher logit, or a padded lane) adds nothing.
    auto accumulate = [&](const Vec& vt, const Vec& vs) {
      const Vec dt = vt - vmt;
      const Vec e = cpu::fast_exp(dt * vinv);
      vz = vz + e;
      vgap = vgap + Vec::blendv(e * (dt - (vs - vms)), zero, e == zero);
    };
    int64_t c = 0;
    for (; c + Vec::size() <= C; c += Vec::size()) accumulate(Vec::loadu(t + c), Vec::loadu(s + c));
    if (c < C) {
      accumulate(cpu::load_tail(t + c, C - c, -std::numeric_limits<acc_t>::infinity()),
                 cpu::load_tail(s + c, C - c, acc_t(0)));
    }
    const acc_t z = cpu::vec_hsum(vz), gap = cpu::vec_hsum(vgap);
    const acc_t log_z = std::log(z);
    stats[3 + 2 * k] = mt;
    stats[4 + 2 * k] = log_z;
    loss += weights[k] * (gap * inv_t / z + (log_zt - log_z));
  }
  stats[0] = ms + bad;
  return loss + bad;
}

// dst_c = ce_s softmax(s)_c + kq softmax(s/T)_c - k1 p1_c - k2 p2_c (the one-hot term is added after), each
// softmax rebuilt from its saved max and log-sum: exp((x - m) / T - log z).
template <typename acc_t>
void row_backward(const acc_t* s, const acc_t* t1, const acc_t* t2, int64_t C, acc_t inv_t, const acc_t* st,
                  acc_t ce_s, acc_t kq, acc_t k1, acc_t k2, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  const bool t_is_one = inv_t == acc_t(1);
  const acc_t c_p = t_is_one ? ce_s + kq : ce_s;  // at T = 1 softmax(s/T) is softmax(s)
  const Vec vms(st[0]), vl1(st[1]), vlt(st[2]), vm1(st[3]), vlz1(st[4]), vm2(st[5]), vlz2(st[6]);
  const Vec vinv(inv_t), vcp(c_p), vkq(kq), vk1(k1), vk2(k2);
  auto value = [&](int64_t c, int64_t count) {
    auto load = [&](const acc_t* p) { return count == Vec::size() ? Vec::loadu(p + c) : Vec::loadu(p + c, count); };
    const Vec d = load(s) - vms;
    Vec v = vcp * cpu::fast_exp(d - vl1);
    if (!t_is_one) v = v + vkq * cpu::fast_exp(d * vinv - vlt);
    if (t1) v = v - vk1 * cpu::fast_exp((load(t1) - vm1) * vinv - vlz1);
    if (t2) v = v - vk2 * cpu::fast_exp((load(t2) - vm2) * vinv - vlz2);
    return v;
  };
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) value(c, Vec::size()).store(dst + c);
  if (c < C) value(c, C - c).store(dst + c, C - c);  // padded lanes are computed and dropped
}

// ---- row-blocked path for few classes ------------------------------------------------------------------
// With C ~ 10 the per-row fixed cost of the row path (horizontal sums, scalar logs, partial vectors) dominates.
// Here L = Vec::size() rows are processed at once, one row per lane: a block is transposed into [C][L] buffers
// (widening half/bfloat16 on the way), after which every max, sum, exp and log is one vertical vector op. The
// formulas are row_forward's / row_backward's, lane-wise.
// Up to 72 classes (FCCL's C = 10 and 65): measured faster than the row path at C = 10 and 65 (forward),
// slower at C = 100 (forward + backward), where the transposes cost more than the row path's per-row overhead.
constexpr int64_t kBlockedMaxClasses = 72;

inline bool use_blocked(int64_t C) { return C <= kBlockedMaxClasses; }

// buf[c * L + l] = x[l * C + c] for the block's L rows.
template <typename scalar_t, typename acc_t, int L>
inline void transpose_in(const scalar_t* x, int64_t C, acc_t* buf) {
  for (int l = 0; l < L; ++l) {
    const scalar_t* row = x + l * C;
    for (int64_t c = 0; c < C; ++c) buf[c * L + l] = static_cast<acc_t>(row[c]);
  }
}

template <typename acc_t>
struct BlockBuffers {
  std::vector<acc_t> s, t1, t2, out;
  void resize(int64_t n) {
    s.resize(n);
    t1.resize(n);
    t2.resize(n);
    out.resize(n);
  }
};

// Loss of the block's L rows (before the 1/N) into loss[l] and their stats rows.
template <typename acc_t>
void block_forward(const acc_t* S, const acc_t* T1, const acc_t* T2, int64_t C, const acc_t* s_y, acc_t inv_t,
                   acc_t ce_w, acc_t w1, acc_t w2, acc_t* loss, acc_t* stats) {
  using Vec = Vectorized<acc_t>;
  constexpr int L = Vec::size();
  const Vec zero(0), vinv(inv_t);
  Vec vms(-std::numeric_limits<acc_t>::infinity());
  for (int64_t c = 0; c < C; ++c) vms = at::vec::maximum(vms, Vec::loadu(S + c * L));
  Vec z1(0), zt(0);
  const bool t_is_one = inv_t == acc_t(1);
  for (int64_t c = 0; c < C; ++c) {
    const Vec d = Vec::loadu(S + c * L) - vms;
    z1 = z1 + cpu::fast_exp(d);
    if (!t_is_one) zt = zt + cpu::fast_exp(d * vinv);
  }
  const Vec l1 = z1.log(), lt = t_is_one ? l1 : zt.log();
  Vec bad = vms - vms;  // 0, or NaN where the row max is not finite (see nan_unless_finite)
  Vec vloss = Vec(ce_w) * ((vms - Vec::loadu(s_y)) + l1);
  Vec teacher_stats[4] = {zero, zero, zero, zero};
  const acc_t* teachers[2] = {T1, T2};
  const acc_t weights[2] = {w1, w2};
  for (int k = 0; k < 2; ++k) {
    const acc_t* T = teachers[k];
    if (T == nullptr) continue;
    Vec vmt(-std::numeric_limits<acc_t>::infinity());
    for (int64_t c = 0; c < C; ++c) vmt = at::vec::maximum(vmt, Vec::loadu(T + c * L));
    bad = bad + (vmt - vmt);
    Vec z(0), gap(0);
    for (int64_t c = 0; c < C; ++c) {
      const Vec dt = Vec::loadu(T + c * L) - vmt;
      const Vec e = cpu::fast_exp(dt * vinv);
      z = z + e;
      gap = gap + Vec::blendv(e * (dt - (Vec::loadu(S + c * L) - vms)), zero, e == zero);
    }
    const Vec lz = z.log();
    teacher_stats[2 * k] = vmt;
    teacher_stats[2 * k + 1] = lz;
    vloss = vloss + Vec(weights[k]) * (gap * vinv / z + (lt - lz));
  }
  (vloss + bad).store(loss);
  const Vec columns[kStats] = {vms + bad, l1, lt, teacher_stats[0], teacher_stats[1], teacher_stats[2],
                               teacher_stats[3]};
  acc_t tmp[L];
  for (int j = 0; j < kStats; ++j) {
    columns[j].store(tmp);
    for (int l = 0; l < L; ++l) stats[l * kStats + j] = tmp[l];
  }
}

// out[c * L + l] = row_backward's value for lane l (one-hot term not included).
template <typename acc_t>
void block_backward(const acc_t* S, const acc_t* T1, const acc_t* T2, int64_t C, acc_t inv_t, const acc_t* stats,
                    acc_t ce_s, acc_t kq, acc_t k1, acc_t k2, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  constexpr int L = Vec::size();
  Vec st[kStats];
  acc_t tmp[L];
  for (int j = 0; j < kStats; ++j) {
    for (int l = 0; l < L; ++l) tmp[l] = stats[l * kStats + j];
    st[j] = Vec::loadu(tmp);
  }
  const bool t_is_one = inv_t == acc_t(1);
  const Vec vinv(inv_t), vcp(t_is_one ? ce_s + kq : ce_s), vkq(kq), vk1(k1), vk2(k2);
  for (int64_t c = 0; c < C; ++c) {
    const Vec d = Vec::loadu(S + c * L) - st[0];
    Vec v = vcp * cpu::fast_exp(d - st[1]);
    if (!t_is_one) v = v + vkq * cpu::fast_exp(d * vinv - st[2]);
    if (T1) v = v - vk1 * cpu::fast_exp((Vec::loadu(T1 + c * L) - st[3]) * vinv - st[4]);
    if (T2) v = v - vk2 * cpu::fast_exp((Vec::loadu(T2 + c * L) - st[5]) * vinv - st[6]);
    v.store(out + c * L);
  }
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
    constexpr int L = Vectorized<acc_t>::size();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* p1 = ptr_or_null<scalar_t>(t1);
    const scalar_t* p2 = ptr_or_null<scalar_t>(t2);
    const int64_t* yp = y.const_data_ptr<int64_t>();
    acc_t* stp = stats.mutable_data_ptr<acc_t>();
    const acc_t inv_t = acc_t(1 / temperature), ce_w = acc_t(ce_weight), w1 = acc_t(intra_weight),
                w2 = acc_t(inter_weight);
    std::vector<acc_t> row_loss(N);
    // Labels are checked where each row is read (before s[y]), so a bad one raises before anything is returned.
    at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
      int64_t r = begin;
      if (use_blocked(C)) {
        BlockBuffers<acc_t> buf;
        buf.resize(C * L);
        for (; r + L <= end; r += L) {
          acc_t s_y[L];
          for (int l = 0; l < L; ++l) {
            check_label_value(yp[r + l], C, r + l);
            s_y[l] = static_cast<acc_t>(sp[(r + l) * C + yp[r + l]]);
          }
          transpose_in<scalar_t, acc_t, L>(sp + r * C, C, buf.s.data());
          if (p1) transpose_in<scalar_t, acc_t, L>(p1 + r * C, C, buf.t1.data());
          if (p2) transpose_in<scalar_t, acc_t, L>(p2 + r * C, C, buf.t2.data());
          block_forward<acc_t>(buf.s.data(), p1 ? buf.t1.data() : nullptr, p2 ? buf.t2.data() : nullptr, C, s_y,
                               inv_t, ce_w, w1, w2, row_loss.data() + r, stp + kStats * r);
        }
      }
      std::vector<acc_t> bs, b1, b2;
      for (; r < end; ++r) {
        check_label_value(yp[r], C, r);
        const acc_t* rs = cpu::widen_row<scalar_t, acc_t>(sp + r * C, C, bs);
        const acc_t* r1 = p1 ? cpu::widen_row<scalar_t, acc_t>(p1 + r * C, C, b1) : nullptr;
        const acc_t* r2 = p2 ? cpu::widen_row<scalar_t, acc_t>(p2 + r * C, C, b2) : nullptr;
        row_loss[r] = row_forward<acc_t>(rs, r1, r2, C, yp[r], inv_t, ce_w, w1, w2, stp + kStats * r);
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
  check_dual_distillation_backward_inputs(grad_loss, logits, labels, intra_logits, inter_logits, stats, temperature);
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
    constexpr int L = Vectorized<acc_t>::size();
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
    // A row the forward flagged (NaN max statistic) gets a NaN gradient, as in torch.
    auto nan_row_if_flagged = [&](int64_t r) {
      if (std::isnan(stp[kStats * r])) {
        std::fill(gp + r * C, gp + (r + 1) * C, std::numeric_limits<scalar_t>::quiet_NaN());
      }
    };
    at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
      int64_t r = begin;
      if (use_blocked(C)) {
        BlockBuffers<acc_t> buf;
        buf.resize(C * L);
        for (; r + L <= end; r += L) {
          for (int l = 0; l < L; ++l) check_label_value(yp[r + l], C, r + l);
          transpose_in<scalar_t, acc_t, L>(sp + r * C, C, buf.s.data());
          if (p1) transpose_in<scalar_t, acc_t, L>(p1 + r * C, C, buf.t1.data());
          if (p2) transpose_in<scalar_t, acc_t, L>(p2 + r * C, C, buf.t2.data());
          acc_t* o = buf.out.data();
          block_backward<acc_t>(buf.s.data(), p1 ? buf.t1.data() : nullptr, p2 ? buf.t2.data() : nullptr, C, inv_t,
                                stp + kStats * r, ce_s, kq, k1, k2, o);
          for (int l = 0; l < L; ++l) {
            o[yp[r + l] * L + l] -= ce_s;
            scalar_t* dst = gp + (r + l) * C;
            for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(o[c * L + l]);
            nan_row_if_flagged(r + l);
          }
        }
      }
      std::vector<acc_t> bs, b1, b2, out(std::is_same_v<scalar_t, acc_t> ? 0 : C);
      for (; r < end; ++r) {
        check_label_value(yp[r], C, r);
        const acc_t* rs = cpu::widen_row<scalar_t, acc_t>(sp + r * C, C, bs);
        const acc_t* r1 = p1 ? cpu::widen_row<scalar_t, acc_t>(p1 + r * C, C, b1) : nullptr;
        const acc_t* r2 = p2 ? cpu::widen_row<scalar_t, acc_t>(p2 + r * C, C, b2) : nullptr;
        acc_t* dst = cpu::narrow_target<scalar_t, acc_t>(gp + r * C, out);
        row_backward<acc_t>(rs, r1, r2, C, inv_t, stp + kStats * r, ce_s, kq, k1, k2, dst);
        dst[yp[r]] -= ce_s;
        cpu::narrow_row<scalar_t, acc_t>(dst, C, gp + r * C);
        nan_row_if_flagged(r);
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
