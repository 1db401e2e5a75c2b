// Cross-correlation (FCCL / Barlow Twins) on the CPU.
//
// Forward: column statistics in one pass over the rows (shifted sums), standardisation into
// accumulation-dtype buffers (b_hat pre-scaled by 1/B), M = a_hat^T b_hat by at::mm (MKL), then the
// loss epilogue as one reduction over M. M is the only K x K buffer.
// Backward: dL/dM = 2 w (M - tau) + diag(2 (M_uu - 1) - 2 w (M_uu - tau)), so
//   dL/da_hat = (2w b_hat M^T - 2 w tau rowsum(b_hat) 1^T + b_hat diag(d)) / B
// is one GEMM with the saved M (no second K x K buffer), followed by one column pass back through the
// standardisation (mean and variance terms included).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fcl_ext/checks.h"
#include "fcl_ext/op_checks.h"
#include "fcl_ext/cpu_rows.h"
#include "fcl_ext/math.h"

namespace fcl_ext {
namespace {

constexpr int64_t kColChunk = 64;  // columns per task: a row segment of one cache line pair or more

// at::parallel_for over column chunks of x [B, K], run inline when the whole job is small: an OpenMP
// region costs more than FCCL's 512 x 10 problem, and on a loaded machine far more.
// Rows per task for row-parallel loops: at least 64K elements, so small jobs never open a region.
inline int64_t small_job_grain(int64_t cols) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(cols, 1));
}

template <typename F>
void for_column_chunks(int64_t B, int64_t K, const F& fn) {
  const int64_t chunks = (K + kColChunk - 1) / kColChunk;
  if (B * K < (int64_t(1) << 16) || chunks == 1) {
    fn(int64_t(0), chunks);
  } else {
    at::parallel_for(0, chunks, 1, fn);
  }
}

// mean and inv_std of column j of x [B, K] by a scaled, shifted two-pass: the column is scaled by a power of two
// (exact) that brings its largest |entry| to [1, 2), so neither x - mean nor its square over- or underflows; var is then
// scaled back inside inv_std (math::scaled_inv_std). A NaN (or inf) entry gives a NaN inv_std; inv_std is inf
// only where 1/std itself is beyond the type's range (eps == 0, std below ~1e-38 in float).
template <typename scalar_t, typename acc_t>
void column_stats_scaled(const scalar_t* x, int64_t B, int64_t K, int64_t j, acc_t n_var, acc_t eps, acc_t* mean,
                         acc_t* inv_std) {
  acc_t m = 0;
  for (int64_t i = 0; i < B; ++i) m = cpu::nan_max(m, std::abs(static_cast<acc_t>(x[i * K + j])));
  if (!std::isfinite(m)) {
    *mean = *inv_std = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  if (m == acc_t(0)) {  // all zeros: a constant column
    *mean = 0;
    *inv_std = acc_t(1) / std::sqrt(eps);
    return;
  }
  const int e = std::ilogb(m);
  const auto split = math::split_pow2(-e);  // two factors: 2^-e alone overflows for a subnormal m
  const acc_t s1 = math::pow2<acc_t>(split.first), s2 = math::pow2<acc_t>(split.second);
  // Shifted by the first (scaled) entry, so a constant column gives exactly mu = ss = 0 (a plain mean of B equal
  // values rounds, and its error would pass for a variance).
  const acc_t shift = static_cast<acc_t>(x[j]) * s1 * s2;
  acc_t sum = 0;
  for (int64_t i = 0; i < B; ++i) sum += static_cast<acc_t>(x[i * K + j]) * s1 * s2 - shift;
  const acc_t mu = sum / acc_t(B);
  acc_t ss = 0;
  for (int64_t i = 0; i < B; ++i) {
    const acc_t d = (static_cast<acc_t>(x[i * K + j]) * s1 * s2 - shift) - mu;
    ss += d * d;
  }
  *mean = std::ldexp(shift + mu, e);
  *inv_std = math::scaled_inv_std(ss / n_var, eps, e);
}

// mean and inv_std of every column of x [B, K]; one pass over the rows. Shifting by the first row
// keeps sum(d^2) - sum(d)^2 / B free of the cancellation a raw sum of squares suffers (its relative error is at
// most ~B ulp, so a non-constant column never gets variance 0 from it). A column whose sum of squares is not
// safely in range (overflowed, NaN, or so small that subnormal squares lose digits; also exactly constant ones)
// is redone by the scaled two-pass above.
template <typename scalar_t, typename acc_t>
void column_stats(const scalar_t* x, int64_t B, int64_t K, bool unbiased, acc_t eps, acc_t* mean,
                  acc_t* inv_std) {
  const acc_t n_var = unbiased ? acc_t(B - 1) : acc_t(B);
  const acc_t lo = static_cast<acc_t>(static_cast<double>(B) * std::numeric_limits<acc_t>::denorm_min() /
                                      std::numeric_limits<acc_t>::epsilon());
  for_column_chunks(B, K, [&](int64_t begin, int64_t end) {
    acc_t shift[kColChunk], s1[kColChunk], s2[kColChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * kColChunk, w = std::min(kColChunk, K - c0);
      for (int64_t j = 0; j < w; ++j) {
        shift[j] = static_cast<acc_t>(x[c0 + j]);
        s1[j] = s2[j] = acc_t(0);
      }
      for (int64_t i = 0; i < B; ++i) {
        const scalar_t* row = x + i * K + c0;
        for (int64_t j = 0; j < w; ++j) {
          const acc_t d = static_cast<acc_t>(row[j]) - shift[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      }
      for (int64_t j = 0; j < w; ++j) {
        if (!(s2[j] >= lo && s2[j] <= std::numeric_limits<acc_t>::max())) {
          column_stats_scaled(x, B, K, c0 + j, n_var, eps, mean + c0 + j, inv_std + c0 + j);
          continue;
        }
        // s1 (s1 / B) <= s2 (Cauchy-Schwarz), so it stays in range where s2 does; s1 * s1 alone overflowed for
        // float columns near 1e18 (found by the power-of-two scaling property)
        const acc_t var = std::max(acc_t(0), (s2[j] - s1[j] * (s1[j] / acc_t(B))) / n_var);
        mean[c0 + j] = shift[j] + s1[j] / acc_t(B);
        inv_std[c0 + j] = acc_t(1) / std::sqrt(var + eps);
      }
    }
  });
}

// stats [2, K] (mean, inv_std) in the accumulation dtype. With eps == 0 a constant column is an error, and so
// is a NaN or infinite entry (which would make the whole matrix NaN); the message says which.
at::Tensor compute_stats(const at::Tensor& x, bool unbiased, double eps, const char* name) {
  const int64_t B = x.size(0), K = x.size(1);
  auto stats = at::empty({2, K}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_correlation_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sp = stats.mutable_data_ptr<acc_t>();
    column_stats<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), B, K, unbiased, static_cast<acc_t>(eps), sp, sp + K);
    if (eps == 0) {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      for (int64_t j = 0; j < K; ++j) {
        TORCH_CHECK(!std::isnan(sp[K + j]), "fcl_ext: cross_correlation: NaN in column ", j, " of ", name,
                    " (a NaN or infinite entry makes its variance NaN), so the correlation would be NaN.");
        if (std::isfinite(sp[K + j])) continue;
        bool constant = true;  // the error path only: tell a constant column from a tiny-but-varying one
        for (int64_t i = 1; i < B && constant; ++i) constant = xp[i * K + j] == xp[j];
        TORCH_CHECK(!constant, "fcl_ext: cross_correlation: column ", j, " of ", name,
                    " is constant over the batch (zero variance), so standardising it divides by zero. "
                    "Pass eps > 0 (e.g. eps=1e-5) to allow constant columns.");
        TORCH_CHECK(false, "fcl_ext: cross_correlation: column ", j, " of ", name, " varies, but its standard "
                    "deviation is so small that 1/std overflows ", x.scalar_type(), "'s accumulation type. Pass "
                    "eps > 0 or compute in float64.");
      }
    }
  });
  return stats;
}

// x_hat = (x - mean) * inv_std * scale as a [B, K] accumulation-dtype tensor (math::Standardiser: no overflow of
// x - mean for columns near the top of the range).
at::Tensor standardised(const at::Tensor& x, const at::Tensor& stats, double scale) {
  const int64_t B = x.size(0), K = x.size(1);
  auto hat = at::empty({B, K}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_correlation_standardise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* st = stats.const_data_ptr<acc_t>();
    // per-column factors of math::Standardiser as plain arrays, so the row loop stays vectorisable
    std::vector<acc_t> pre(K), mean_pre(K), post(K);
    for (int64_t j = 0; j < K; ++j) {
      const auto f = math::make_standardiser(st[j], st[K + j] * static_cast<acc_t>(scale));
      pre[j] = f.pre;
      mean_pre[j] = f.mean_pre;
      post[j] = f.post;
    }
    acc_t* hp = hat.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, small_job_grain(K), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* src = xp + i * K;
        acc_t* dst = hp + i * K;
        for (int64_t j = 0; j < K; ++j) dst[j] = (static_cast<acc_t>(src[j]) * pre[j] - mean_pre[j]) * post[j];
      }
    });
  });
  return hat;
}

// M = a_hat^T b_hat / B in the accumulation dtype; also returns the statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor> correlation(const at::Tensor& a, const at::Tensor& b, bool unbiased,
                                                           double eps) {
  const auto ac = a.contiguous(), bc = b.contiguous();
  auto stats_a = compute_stats(ac, unbiased, eps, "a");
  auto stats_b = compute_stats(bc, unbiased, eps, "b");
  const auto a_hat = standardised(ac, stats_a, 1.0);
  const auto b_hat = standardised(bc, stats_b, 1.0 / static_cast<double>(a.size(0)));
  return {at::mm(a_hat.t(), b_hat), stats_a, stats_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_correlation_matrix_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                            bool unbiased, double eps) {
  check_cross_correlation_inputs(a, b, eps, /*same_shape=*/false);
  auto [m, stats_a, stats_b] = correlation(a, b, unbiased, eps);
  return {m.to(a.scalar_type()), stats_a, stats_b};
}

template <typename acc_t>
acc_t loss_from_matrix(const acc_t* m, int64_t K, acc_t w, acc_t tau) {
  std::vector<acc_t> row_sum(K);
  at::parallel_for(0, K, small_job_grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const acc_t* row = m + u * K;
      acc_t s = 0;
      for (int64_t v = 0; v < K; ++v) s += (row[v] - tau) * (row[v] - tau);
      // Swap the diagonal entry's off-diagonal term for its on-diagonal one.
      row_sum[u] = w * s - w * (row[u] - tau) * (row[u] - tau) + (row[u] - acc_t(1)) * (row[u] - acc_t(1));
    }
  });
  acc_t total = 0;
  for (int64_t u = 0; u < K; ++u) total += row_sum[u];
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_correlation_loss_cpu(
    const at::Tensor& a, const at::Tensor& b, double off_diag_weight, double off_diag_target, bool unbiased,
    double eps, bool keep_matrix) {
  check_cross_correlation_inputs(a, b, eps, /*same_shape=*/true);
  auto [m, stats_a, stats_b] = correlation(a, b, unbiased, eps);
  const int64_t K = a.size(1);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cross_correlation_loss_cpu", [&] {
    const scalar_t value = loss_from_matrix<scalar_t>(m.const_data_ptr<scalar_t>(), K,
                                                      static_cast<scalar_t>(off_diag_weight),
                                                      static_cast<scalar_t>(off_diag_target));
    loss = at::scalar_tensor(value, a.options().dtype(m.scalar_type())).to(a.scalar_type());
  });
  if (!keep_matrix) m = at::empty({0}, m.options());
  return {loss, m, stats_a, stats_b};
}

// dx[:, u] = grad_scale * inv_std_u (g_u - mean(g_u) - x_hat_u sum(g_u x_hat_u) / n_var) with
// g_iu = alpha P_iu + beta row_i + diag_u other_hat_iu (row / diag may be null).
template <typename scalar_t, typename acc_t>
void standardise_backward_cols(const acc_t* P, acc_t alpha, const acc_t* row, acc_t beta, const acc_t* diag,
                               const acc_t* other_hat, const acc_t* hat, const acc_t* inv_std, acc_t grad_scale,
                               int64_t B, int64_t K, acc_t n_var, scalar_t* out) {
  for_column_chunks(B, K, [&](int64_t begin, int64_t end) {
    acc_t g_sum[kColChunk], gx_sum[kColChunk];
    auto g_at = [&](int64_t i, int64_t u) {
      acc_t g = alpha * P[i * K + u];
      if (row) g += beta * row[i];
      if (diag) g += diag[u] * other_hat[i * K + u];
      return g;
    };
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * kColChunk, w = std::min(kColChunk, K - c0);
      for (int64_t j = 0; j < w; ++j) g_sum[j] = gx_sum[j] = acc_t(0);
      for (int64_t i = 0; i < B; ++i) {
        for (int64_t j = 0; j < w; ++j) {
          const acc_t g = g_at(i, c0 + j);
          g_sum[j] += g;
          gx_sum[j] += g * hat[i * K + c0 + j];
        }
      }
      for (int64_t j = 0; j < w; ++j) g_sum[j] /= acc_t(B);
      for (int64_t i = 0; i < B; ++i) {
        for (int64_t j = 0; j < w; ++j) {
          const int64_t u = c0 + j;
          out[i * K + u] = static_cast<scalar_t>(
              grad_scale * math::standardise_backward(g_at(i, u), g_sum[j], hat[i * K + u], gx_sum[j], inv_std[u], n_var));
        }
      }
    }
  });
}

at::Tensor row_sums(const at::Tensor& hat) {
  const int64_t B = hat.size(0), K = hat.size(1);
  auto out = at::empty({B}, hat.options());
  AT_DISPATCH_FLOATING_TYPES(hat.scalar_type(), "cross_correlation_row_sums", [&] {
    const scalar_t* hp = hat.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, small_job_grain(K), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t acc = 0;
        for (int64_t j = 0; j < K; ++j) acc += hp[i * K + j];
        op[i] = acc;
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cross_correlation_backward_cpu(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& stats_a,
    const at::Tensor& stats_b, const at::Tensor& matrix, bool unbiased, double off_diag_weight,
    double off_diag_target, bool from_loss, bool need_a, bool need_b) {
  check_cross_correlation_backward_inputs(grad, a, b, stats_a, stats_b, matrix, from_loss);
  const auto ac = a.contiguous(), bc = b.contiguous();
  const int64_t B = a.size(0), Ka = a.size(1), Kb = b.size(1);
  const auto acc_type = stats_a.scalar_type();
  const auto a_hat = standardised(ac, stats_a, 1.0);
  const auto b_hat = standardised(bc, stats_b, 1.0);
  at::Tensor grad_a = need_a ? at::empty_like(ac) : at::empty({0}, a.options());
  at::Tensor grad_b = need_b ? at::empty_like(bc) : at::empty({0}, b.options());
  const double inv_b = 1.0 / static_cast<double>(B);
  double grad_scale = 1.0;
  at::Tensor g_matrix, diag;
  at::Tensor row_a, row_b;
  if (from_loss) {
    grad_scale = grad.item<double>();
    g_matrix = matrix;  // dL/dM is affine in M: use M itself in the GEMMs
    const double w = off_diag_weight, tau = off_diag_target;
    // Small vectors in plain loops: a handful of ATen calls would cost more than FCCL's whole backward.
    diag = at::empty({Ka}, matrix.options());
    AT_DISPATCH_FLOATING_TYPES(acc_type, "cross_correlation_backward_diag", [&] {
      const scalar_t* mp = matrix.const_data_ptr<scalar_t>();
      scalar_t* dp = diag.mutable_data_ptr<scalar_t>();
      for (int64_t u = 0; u < Ka; ++u) {
        const scalar_t m = mp[u * Ka + u];
        dp[u] = static_cast<scalar_t>((math::cross_corr_dterm<scalar_t>(m, true, w, tau) -
                                       math::cross_corr_dterm<scalar_t>(m, false, w, tau)) * inv_b);
      }
    });
    if (tau != 0.0) {
      if (need_a) row_b = row_sums(b_hat);
      if (need_b) row_a = row_sums(a_hat);
    }
  } else {
    g_matrix = grad.to(acc_type);
  }
  const double alpha = from_loss ? 2.0 * off_diag_weight * inv_b : inv_b;
  const double beta = from_loss ? -2.0 * off_diag_weight * off_diag_target * inv_b : 0.0;
  const double n_var = unbiased ? static_cast<double>(B - 1) : static_cast<double>(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_correlation_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](const at::Tensor& P, const at::Tensor& row, const at::Tensor& other_hat, const at::Tensor& hat,
                   const at::Tensor& stats, int64_t K, at::Tensor& out) {
      standardise_backward_cols<scalar_t, acc_t>(
          P.const_data_ptr<acc_t>(), static_cast<acc_t>(alpha), row.defined() ? row.const_data_ptr<acc_t>() : nullptr,
          static_cast<acc_t>(beta), diag.defined() ? diag.const_data_ptr<acc_t>() : nullptr,
          other_hat.const_data_ptr<acc_t>(), hat.const_data_ptr<acc_t>(), stats.const_data_ptr<acc_t>() + K,
          static_cast<acc_t>(grad_scale), B, K, static_cast<acc_t>(n_var), out.mutable_data_ptr<scalar_t>());
    };
    if (need_a) {
      const auto P = at::mm(b_hat, g_matrix.t());  // [B, Ka]
      run(P, row_b, b_hat, a_hat, stats_a, Ka, grad_a);
    }
    if (need_b) {
      const auto P = at::mm(a_hat, g_matrix);  // [B, Kb]
      run(P, row_a, a_hat, b_hat, stats_b, Kb, grad_b);
    }
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CPU, m) {
  m.impl("cross_correlation_matrix", &cross_correlation_matrix_cpu);
  m.impl("cross_correlation_loss", &cross_correlation_loss_cpu);
  m.impl("_cross_correlation_backward", &cross_correlation_backward_cpu);
}

}  // namespace fcl_ext
