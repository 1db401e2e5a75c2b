// Cross-correlation (FCCL / Barlow Twins) on CUDA, same math as csrc/cpu/cross_correlation.cpp.
//
// Tiny problems (B * Ka * Kb <= 2^18, K <= 128: FCCL's K=10 at B=512): the whole forward is one launch of
// one block: column statistics (shifted sums, one pass), every M_uv as a dot over the batch of the
// standardised columns, and the loss. The small backward is one launch too (one block per column).
// Everything else (FCCL's K=65, a large batch at small K, Barlow Twins projectors) is multi-block:
// split-B column statistics (partial sums per row chunk, then a fixed-order finish), a grid-stride
// standardisation, cuBLAS GEMM for a_hat^T b_hat (the only K x K buffer, and the split-B reduction), then
// the loss epilogue as one reduction kernel plus a one-block finish. Backward: dL/dM is affine in M, so
// dL/da_hat is one GEMM with the saved M; a split-B column reduction and a split-B apply kernel then go
// back through the standardisation.
// Column statistics as the CPU's: shifted one-pass sums, redone by a scaled two-pass for a column whose sum of
// squares is out of range (no overflow near +-3e38; a NaN column stays NaN). With eps == 0 a zero-variance or
// NaN column gives NaN entries and a device error (fcl_ext.check_device_errors()); no host sync on any path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "fcl_ext/checks.h"
#include "fcl_ext/op_checks.h"
#include "fcl_ext/cuda_utils.cuh"
#include "fcl_ext/math.h"
#include "kernel_utils.cuh"

namespace fcl_ext {
namespace {

constexpr int kColsPerBlock = 32;  // threadIdx.x: one column each (coalesced row segments)
constexpr int kRowLanes = 8;       // threadIdx.y: rows strided across these lanes
constexpr int kFusedThreads = 1024;
constexpr int64_t kFusedMaxK = 128;
constexpr int64_t kFusedMaxWork = int64_t(1) << 18;  // B * Ka * Kb multiply-adds for one block
constexpr int64_t kRowsPerSplit = 256;  // split-B column kernels: at least this many rows per block

// Column statistics, as the CPU's (csrc/cpu/cross_correlation.cpp): shifted one-pass sums, and for a column whose
// sum of squares is not safely in range (overflow near +-3e38, NaN or inf entries, a constant column, subnormal
// squares) a scaled two-pass, so that the variance neither overflows nor hides a NaN.

// mean / inv_std from a column's shifted one-pass sums; false where s2 is not safely in range.
template <typename acc_t>
__device__ __forceinline__ bool column_stats_from_sums(acc_t shift, acc_t s1, acc_t s2, int64_t B, acc_t n_var,
                                                       acc_t eps, acc_t* mean, acc_t* inv_std) {
  if (!math::sum_of_squares_in_range(s2, B)) return false;
  const acc_t var = (s2 - s1 * (s1 / acc_t(B))) / n_var;  // s1 (s1 / B) <= s2: in range where s2 is (as on the CPU)
  *mean = shift + s1 / acc_t(B);
  *inv_std = acc_t(1) / ::sqrt((var > acc_t(0) ? var : acc_t(0)) + eps);
  return true;
}

// Scaled two-pass mean and inv_std of column `col` of x [B, K]: the column is scaled by a power of two (exact) that
// brings its largest |entry| to [1, 2); inv_std = 2^-e / sqrt(var_hat + eps 2^-2e). A NaN or inf entry gives NaN
// (mean and inv_std), an all-zero column mean 0 and 1 / sqrt(eps). By the kLanes lanes of a warp (kLanes = 32,
// `lane` its lane id; all 32 take part) or by one thread (kLanes = 1, lane 0).
template <int kLanes, typename scalar_t, typename acc_t>
__device__ void column_stats_scaled(const scalar_t* __restrict__ x, int64_t B, int64_t K, int64_t col, acc_t n_var,
                                    acc_t eps, int lane, acc_t* mean, acc_t* inv_std) {
  acc_t m = 0;
  for (int64_t i = lane; i < B; i += kLanes) m = cuda::nan_max(m, ::abs(static_cast<acc_t>(x[i * K + col])));
  if (kLanes > 1) m = cuda::warp_nan_max(m);
  if (!math::is_finite(m)) {
    *mean = *inv_std = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  if (m == acc_t(0)) {  // all zeros: a constant column
    *mean = 0;
    *inv_std = acc_t(1) / ::sqrt(eps);
    return;
  }
  const int e = ::ilogb(m);
  const auto split = math::split_pow2(-e);  // two factors: 2^-e alone overflows for a subnormal m
  const acc_t s1 = math::pow2<acc_t>(split.first), s2 = math::pow2<acc_t>(split.second);
  // shifted by the first (scaled) entry: a constant column gives exactly mu = ss = 0 (as on the CPU)
  const acc_t shift = static_cast<acc_t>(x[col]) * s1 * s2;
  acc_t sum = 0;
  for (int64_t i = lane; i < B; i += kLanes) sum += static_cast<acc_t>(x[i * K + col]) * s1 * s2 - shift;
  if (kLanes > 1) sum = cuda::warp_sum(sum);
  const acc_t mu = sum / acc_t(B);
  acc_t ss = 0;
  for (int64_t i = lane; i < B; i += kLanes) {
    const acc_t d = (static_cast<acc_t>(x[i * K + col]) * s1 * s2 - shift) - mu;
    ss += d * d;
  }
  if (kLanes > 1) ss = cuda::warp_sum(ss);
  *mean = ::ldexp(shift + mu, e);
  *inv_std = math::scaled_inv_std(ss / n_var, eps, e);
}

// A column the correlation cannot standardise, recorded as the CPU raises it (`which`: 0 = a, 1 = b): with
// eps == 0 a NaN inv_std (a NaN or inf entry: "NaN in column"), and an infinite one: "constant" where every entry
// equals the first (read again here, on the error path only), else a varying column whose 1/std overflows.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool report_bad_column(long long* errors, acc_t inv_std, acc_t eps, int64_t col, int64_t K,
                                                  int which, const scalar_t* __restrict__ x, int64_t B) {
  if (eps == acc_t(0) && inv_std != inv_std) {
    cuda::report_device_error(errors, cuda::kErrNanColumn, cuda::kOpCrossCorrelation, col, 0, K, which);
    return true;
  }
  if (inv_std == std::numeric_limits<acc_t>::infinity()) {
    bool constant = true;
    for (int64_t i = 1; i < B && constant; ++i) constant = x[i * K + col] == x[col];
    cuda::report_device_error(errors, constant ? cuda::kErrConstantColumn : cuda::kErrTinyStdColumn,
                              cuda::kOpCrossCorrelation, col, 0, K, which);
    return true;
  }
  return false;
}

// Split-B column statistics: block (x, y) sums columns [32x, 32x+32) over row chunk y, shifted by the
// column's first value (one shift for all chunks, so the partial sums add exactly): partial[y][0|1][col].
template <typename scalar_t, typename acc_t>
__global__ void column_stats_partial_kernel(const scalar_t* __restrict__ x, int64_t B, int64_t K, int64_t rows_per,
                                            acc_t* __restrict__ partial) {
  __shared__ acc_t s1_sh[kRowLanes][kColsPerBlock], s2_sh[kRowLanes][kColsPerBlock];
  const int64_t col = int64_t(blockIdx.x) * kColsPerBlock + threadIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * rows_per;
  const int64_t end = begin + rows_per < B ? begin + rows_per : B;
  acc_t s1 = 0, s2 = 0;
  if (col < K) {
    const acc_t shift = static_cast<acc_t>(x[col]);
#pragma unroll 4
    for (int64_t i = begin + threadIdx.y; i < end; i += kRowLanes) {
      const acc_t d = static_cast<acc_t>(x[i * K + col]) - shift;
      s1 += d;
      s2 += d * d;
    }
  }
  s1_sh[threadIdx.y][threadIdx.x] = s1;
  s2_sh[threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && col < K) {
    for (int r = 1; r < kRowLanes; ++r) {
      s1 += s1_sh[r][threadIdx.x];
      s2 += s2_sh[r][threadIdx.x];
    }
    partial[(int64_t(blockIdx.y) * 2) * K + col] = s1;
    partial[(int64_t(blockIdx.y) * 2 + 1) * K + col] = s2;
  }
}

// One thread per column: adds the chunks in order, writes (mean, inv_std) (the scaled two-pass where the sums are
// out of range); with eps == 0 a constant or NaN column is recorded as a device error (`which`: 0 = a, 1 = b).
template <typename scalar_t, typename acc_t>
__global__ void column_stats_finish_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ partial,
                                           int splits, int64_t B, int64_t K, acc_t n_var, acc_t eps,
                                           acc_t* __restrict__ mean, acc_t* __restrict__ inv_std, int which,
                                           long long* __restrict__ errors) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= K) return;
  acc_t s1 = 0, s2 = 0;
  for (int j = 0; j < splits; ++j) {
    s1 += partial[(int64_t(j) * 2) * K + col];
    s2 += partial[(int64_t(j) * 2 + 1) * K + col];
  }
  acc_t mu, inv;
  if (!column_stats_from_sums(static_cast<acc_t>(x[col]), s1, s2, B, n_var, eps, &mu, &inv)) {
    column_stats_scaled<1>(x, B, K, col, n_var, eps, 0, &mu, &inv);
  }
  mean[col] = mu;
  inv_std[col] = inv;
  report_bad_column(errors, inv, eps, col, K, which, x, B);
}

// out = (x - mean) * inv_std * scale; thread = one column (coalesced), rows strided over grid.y (no
// per-element index division).
template <typename scalar_t, typename acc_t>
__global__ void standardise_kernel(const scalar_t* __restrict__ x, int64_t B, int64_t K,
                                   const acc_t* __restrict__ stats, acc_t scale, acc_t* __restrict__ out) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= K) return;
  const auto standardise = math::make_standardiser(stats[j], stats[K + j] * scale);  // no x - mean overflow
#pragma unroll 4
  for (int64_t i = blockIdx.y; i < B; i += gridDim.y) out[i * K + j] = standardise(static_cast<acc_t>(x[i * K + j]));
}

// One block of kFusedThreads (launch bounds keep registers within a 1024-thread block): statistics of a
// and b, then M (written when matrix != nullptr) and the loss.
template <typename scalar_t, typename acc_t, typename out_t>
__global__ void __launch_bounds__(kFusedThreads)
    fused_small_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t B, int64_t Ka,
                       int64_t Kb, acc_t n_var, acc_t eps, acc_t w, acc_t tau, out_t* __restrict__ matrix,
                       scalar_t* __restrict__ loss, acc_t* __restrict__ stats_a, acc_t* __restrict__ stats_b,
                       long long* __restrict__ errors) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_raw);  // mean_a[Ka], inv_a[Ka], mean_b[Kb], inv_b[Kb]
  __shared__ acc_t red[32];
  const int lane = threadIdx.x % cuda::kWarp, warp = threadIdx.x / cuda::kWarp;
  const int nwarps = blockDim.x / cuda::kWarp;
  for (int64_t c = warp; c < Ka + Kb; c += nwarps) {
    const bool is_a = c < Ka;
    const int64_t col = is_a ? c : c - Ka, K = is_a ? Ka : Kb;
    const scalar_t* x = is_a ? a : b;
    const acc_t shift = static_cast<acc_t>(x[col]);
    acc_t s1 = 0, s2 = 0;
    for (int64_t i = lane; i < B; i += cuda::kWarp) {
      const acc_t d = static_cast<acc_t>(x[i * K + col]) - shift;
      s1 += d;
      s2 += d * d;
    }
    s1 = cuda::warp_sum(s1);
    s2 = cuda::warp_sum(s2);
    acc_t mu, inv;
    if (!column_stats_from_sums(shift, s1, s2, B, n_var, eps, &mu, &inv)) {  // the same for the whole warp
      column_stats_scaled<cuda::kWarp>(x, B, K, col, n_var, eps, lane, &mu, &inv);
    }
    if (lane == 0) {
      acc_t* st = is_a ? stats_a : stats_b;
      st[col] = mu;
      st[K + col] = inv;
      acc_t* s = is_a ? sh : sh + 2 * Ka;
      s[col] = mu;
      s[K + col] = inv;
    }
  }
  __syncthreads();
  const acc_t *mean_a = sh, *inv_a = sh + Ka, *mean_b = sh + 2 * Ka, *inv_b = sh + 2 * Ka + Kb;
  if (threadIdx.x == 0) {  // the first constant or NaN column with eps == 0, in the CPU's order (a, then b)
    for (int64_t c = 0; c < Ka + Kb; ++c) {
      const bool is_a = c < Ka;
      if (report_bad_column(errors, is_a ? inv_a[c] : inv_b[c - Ka], eps, is_a ? c : c - Ka, is_a ? Ka : Kb,
                            is_a ? 0 : 1, is_a ? a : b, B)) {
        break;
      }
    }
  }
  acc_t partial = 0;
  const acc_t inv_batch = acc_t(1) / acc_t(B);
  for (int64_t e = threadIdx.x; e < Ka * Kb; e += blockDim.x) {
    const int64_t u = e / Kb, v = e % Kb;
    // standardised before the product, as on the CPU: (a - mu)(b - mu) alone overflows for large columns
    const auto std_a = math::make_standardiser(mean_a[u], inv_a[u]);
    const auto std_b = math::make_standardiser(mean_b[v], inv_b[v]);
    acc_t dot = 0;
    for (int64_t i = 0; i < B; ++i) {
      dot += std_a(static_cast<acc_t>(a[i * Ka + u])) * std_b(static_cast<acc_t>(b[i * Kb + v]));
    }
    const acc_t m = dot * inv_batch;
    if (matrix != nullptr) matrix[e] = static_cast<out_t>(m);
    partial += math::cross_corr_term(m, u == v, w, tau);
  }
  partial = cuda::block_sum(partial, red);
  if (loss != nullptr && threadIdx.x == 0) *loss = static_cast<scalar_t>(partial);
}

template <typename acc_t>
__global__ void loss_partial_kernel(const acc_t* __restrict__ m, int64_t K, acc_t w, acc_t tau,
                                    acc_t* __restrict__ partials) {
  __shared__ acc_t red[32];
  acc_t s = 0;
  const int64_t n = K * K;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    s += math::cross_corr_term(m[e], e % (K + 1) == 0, w, tau);  // the diagonal is every (K+1)-th entry
  }
  s = cuda::block_sum(s, red);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

template <typename scalar_t, typename acc_t>
__global__ void finish_sum_kernel(const acc_t* __restrict__ partials, int n, scalar_t* __restrict__ out) {
  __shared__ acc_t red[32];
  acc_t s = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
  s = cuda::block_sum(s, red);
  if (threadIdx.x == 0) *out = static_cast<scalar_t>(s);
}

// dx[:, u] = grad_scale * inv_std_u (g_u - mean(g_u) - x_hat_u sum(g_u x_hat_u) / n_var),
// g_iu = alpha P_iu + beta row_i + diag_u other_hat_iu (row / diag may be null). Split-B in two launches:
// backward_cols_partial_kernel sums (g, g x_hat) over row chunk blockIdx.y into partial[y][0|1][u];
// backward_cols_apply_kernel adds the chunks in order and writes its chunk's rows.
template <typename acc_t>
struct ColumnGrad {
  const acc_t* P;
  acc_t alpha;
  const acc_t* row;
  acc_t beta;
  const acc_t* diag;
  const acc_t* other_hat;
  int64_t K;
  __device__ __forceinline__ acc_t at(int64_t i, int64_t u, acc_t d) const {
    acc_t g = alpha * P[i * K + u];
    if (row != nullptr) g += beta * row[i];
    if (diag != nullptr) g += d * other_hat[i * K + u];
    return g;
  }
};

template <typename acc_t>
__global__ void backward_cols_partial_kernel(ColumnGrad<acc_t> cg, const acc_t* __restrict__ hat, int64_t B,
                                             int64_t rows_per, acc_t* __restrict__ partial) {
  __shared__ acc_t g_sh[kRowLanes][kColsPerBlock], gx_sh[kRowLanes][kColsPerBlock];
  const int64_t K = cg.K;
  const int64_t u = int64_t(blockIdx.x) * kColsPerBlock + threadIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * rows_per;
  const int64_t end = begin + rows_per < B ? begin + rows_per : B;
  acc_t gs = 0, gx = 0;
  if (u < K) {
    const acc_t d = cg.diag != nullptr ? cg.diag[u] : acc_t(0);
#pragma unroll 4
    for (int64_t i = begin + threadIdx.y; i < end; i += kRowLanes) {
      const acc_t g = cg.at(i, u, d);
      gs += g;
      gx += g * hat[i * K + u];
    }
  }
  g_sh[threadIdx.y][threadIdx.x] = gs;
  gx_sh[threadIdx.y][threadIdx.x] = gx;
  __syncthreads();
  if (threadIdx.y == 0 && u < K) {
    for (int r = 1; r < kRowLanes; ++r) {
      gs += g_sh[r][threadIdx.x];
      gx += gx_sh[r][threadIdx.x];
    }
    partial[(int64_t(blockIdx.y) * 2) * K + u] = gs;
    partial[(int64_t(blockIdx.y) * 2 + 1) * K + u] = gx;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_cols_apply_kernel(ColumnGrad<acc_t> cg, const acc_t* __restrict__ hat,
                                           const acc_t* __restrict__ inv_std, const acc_t* __restrict__ grad_scale,
                                           const acc_t* __restrict__ partial, int splits, int64_t B, int64_t rows_per,
                                           acc_t n_var, scalar_t* __restrict__ out) {
  const int64_t K = cg.K;
  const int64_t u = int64_t(blockIdx.x) * kColsPerBlock + threadIdx.x;
  if (u >= K) return;  // no barrier below
  acc_t gs = 0, gx = 0;
  for (int j = 0; j < splits; ++j) {
    gs += partial[(int64_t(j) * 2) * K + u];
    gx += partial[(int64_t(j) * 2 + 1) * K + u];
  }
  const acc_t d = cg.diag != nullptr ? cg.diag[u] : acc_t(0);
  const acc_t g_mean = gs / acc_t(B), scale = grad_scale != nullptr ? *grad_scale : acc_t(1), r = inv_std[u];
  const int64_t begin = int64_t(blockIdx.y) * rows_per;
  const int64_t end = begin + rows_per < B ? begin + rows_per : B;
#pragma unroll 4
  for (int64_t i = begin + threadIdx.y; i < end; i += kRowLanes) {
    out[i * K + u] = static_cast<scalar_t>(
        scale * math::standardise_backward(cg.at(i, u, d), g_mean, hat[i * K + u], gx, r, n_var));
  }
}

// Small-K backward in one launch: block c < Ka is column c of grad_a, block Ka + c column c of grad_b.
// g_iu = sum_v other_hat_iv dL/dM(u, v) / B (v over the other input's columns; for grad_b, M^T), with
// dL/dM = grad_loss * cross_corr_dterm(M) (from_loss) or the given grad_matrix; then back through the
// standardisation with two passes over the column (the second recomputes g instead of storing it).
template <typename scalar_t, typename acc_t, typename g_t>
__global__ void fused_small_backward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                            const acc_t* __restrict__ stats_a, const acc_t* __restrict__ stats_b,
                                            const g_t* __restrict__ gmat, const scalar_t* __restrict__ grad_loss,
                                            bool from_loss, acc_t w, acc_t tau, int64_t B, int64_t Ka, int64_t Kb,
                                            acc_t n_var, bool need_a, bool need_b, scalar_t* __restrict__ grad_a,
                                            scalar_t* __restrict__ grad_b) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* coef = reinterpret_cast<acc_t*>(smem_raw);  // [Ky]: dL/dM(u, v) / B
  __shared__ acc_t red[32];
  const bool for_a = blockIdx.x < Ka;
  if ((for_a && !need_a) || (!for_a && !need_b)) return;
  const int64_t u = for_a ? blockIdx.x : blockIdx.x - Ka;
  const int64_t Kx = for_a ? Ka : Kb, Ky = for_a ? Kb : Ka;
  const scalar_t* x = for_a ? a : b;
  const scalar_t* y = for_a ? b : a;
  const acc_t* stats_x = for_a ? stats_a : stats_b;
  const acc_t* stats_y = for_a ? stats_b : stats_a;
  scalar_t* out = for_a ? grad_a : grad_b;
  const acc_t scale = from_loss ? static_cast<acc_t>(*grad_loss) : acc_t(1);
  const acc_t* mean_y = stats_y;
  for (int64_t v = threadIdx.x; v < Ky; v += blockDim.x) {
    const int64_t e = for_a ? u * Kb + v : v * Kb + u;  // M is [Ka, Kb]
    const acc_t g = from_loss ? scale * math::cross_corr_dterm(static_cast<acc_t>(gmat[e]), u == v, w, tau)
                              : static_cast<acc_t>(gmat[e]);
    coef[v] = g / acc_t(B);
  }
  __syncthreads();
  const acc_t inv = stats_x[Kx + u];
  const auto standardise_x = math::make_standardiser(stats_x[u], inv);
  auto g_at = [&](int64_t i) {  // y standardised before the product (no y - mean overflow), as on the CPU
    const scalar_t* row = y + i * Ky;
    acc_t g = 0;
    for (int64_t v = 0; v < Ky; ++v) {
      g += math::make_standardiser(mean_y[v], stats_y[Ky + v])(static_cast<acc_t>(row[v])) * coef[v];
    }
    return g;
  };
  acc_t gs = 0, gx = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const acc_t g = g_at(i);
    gs += g;
    gx += g * standardise_x(static_cast<acc_t>(x[i * Kx + u]));
  }
  gs = cuda::block_sum(gs, red);
  gx = cuda::block_sum(gx, red);
  const acc_t g_mean = gs / acc_t(B);
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const acc_t x_hat = standardise_x(static_cast<acc_t>(x[i * Kx + u]));
    out[i * Kx + u] = static_cast<scalar_t>(math::standardise_backward(g_at(i), g_mean, x_hat, gx, inv, n_var));
  }
}

bool use_fused(int64_t B, int64_t Ka, int64_t Kb) {
  return Ka <= kFusedMaxK && Kb <= kFusedMaxK && B * Ka * Kb <= kFusedMaxWork;
}

// Row chunks for the split-B column kernels: enough blocks to give every SM two, at least kRowsPerSplit
// rows each; returns (splits, rows per split).
std::pair<int, int64_t> row_splits(int64_t B, int64_t K) {
  const int64_t col_blocks = (K + kColsPerBlock - 1) / kColsPerBlock;
  const int64_t want = std::max<int64_t>(1, (2 * int64_t(cuda::sm_count()) + col_blocks - 1) / col_blocks);
  const int64_t by_rows = std::max<int64_t>(1, B / kRowsPerSplit);
  const int64_t splits = std::min<int64_t>({want, by_rows, 65535});
  const int64_t rows_per = (B + splits - 1) / splits;
  return {static_cast<int>((B + rows_per - 1) / rows_per), rows_per};
}

// The fused one-launch forward. matrix_dtype: dtype of the written M (undefined = don't write it).
void fused_forward(const at::Tensor& a, const at::Tensor& b, bool unbiased, double eps, double w, double tau,
                   at::Tensor* matrix, at::Tensor* loss, at::Tensor& stats_a, at::Tensor& stats_b) {
  const int64_t B = a.size(0), Ka = a.size(1), Kb = b.size(1);
  long long* errors = cuda::device_error_buffer(a);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_correlation_fused_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = sizeof(acc_t) * 2 * (Ka + Kb);
    const acc_t n_var = unbiased ? acc_t(B - 1) : acc_t(B);
    scalar_t* loss_ptr = loss != nullptr ? loss->mutable_data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto* out_ptr) {
      using out_t = std::remove_pointer_t<decltype(out_ptr)>;
      fused_small_kernel<scalar_t, acc_t, out_t><<<1, kFusedThreads, smem, stream>>>(
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), B, Ka, Kb, n_var, static_cast<acc_t>(eps),
          static_cast<acc_t>(w), static_cast<acc_t>(tau), out_ptr, loss_ptr, stats_a.mutable_data_ptr<acc_t>(),
          stats_b.mutable_data_ptr<acc_t>(), errors);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (matrix == nullptr) {
      launch(static_cast<acc_t*>(nullptr));
    } else if (matrix->scalar_type() == a.scalar_type()) {
      launch(matrix->mutable_data_ptr<scalar_t>());
    } else {
      launch(matrix->mutable_data_ptr<acc_t>());
    }
  });
}

at::Tensor compute_stats(const at::Tensor& x, bool unbiased, double eps, int which) {
  const int64_t B = x.size(0), K = x.size(1);
  auto stats = at::empty({2, K}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (K == 0) return stats;  // no launch with a 0-block grid
  const std::pair<int, int64_t> split = row_splits(B, K);
  const int splits = split.first;
  const int64_t rows_per = split.second;
  auto partial = at::empty({splits, 2, K}, stats.options());
  long long* errors = cuda::device_error_buffer(x);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_correlation_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 block(kColsPerBlock, kRowLanes);
    const dim3 grid(static_cast<unsigned>((K + kColsPerBlock - 1) / kColsPerBlock), static_cast<unsigned>(splits));
    column_stats_partial_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), B, K, rows_per, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    acc_t* sp = stats.mutable_data_ptr<acc_t>();
    column_stats_finish_kernel<scalar_t, acc_t><<<static_cast<unsigned>((K + 255) / 256), 256, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), partial.const_data_ptr<acc_t>(), splits, B, K,
        unbiased ? acc_t(B - 1) : acc_t(B), static_cast<acc_t>(eps), sp, sp + K, which, errors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return stats;
}

at::Tensor standardised(const at::Tensor& x, const at::Tensor& stats, double scale) {
  const int64_t B = x.size(0), K = x.size(1);
  auto hat = at::empty({B, K}, stats.options());
  if (hat.numel() == 0) return hat;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_correlation_standardise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t col_blocks = (K + 255) / 256;
    const int64_t row_blocks = std::max<int64_t>(
        1, std::min<int64_t>({(4 * int64_t(cuda::sm_count()) + col_blocks - 1) / col_blocks, B, 65535}));
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
    standardise_kernel<scalar_t, acc_t><<<grid, 256, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), B, K, stats.const_data_ptr<acc_t>(), static_cast<acc_t>(scale),
        hat.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return hat;
}

// General path: M = a_hat^T b_hat / B by cuBLAS, in the accumulation dtype.
at::Tensor general_matrix(const at::Tensor& a, const at::Tensor& b, bool unbiased, double eps, at::Tensor& stats_a,
                          at::Tensor& stats_b) {
  stats_a = compute_stats(a, unbiased, eps, 0);
  stats_b = compute_stats(b, unbiased, eps, 1);
  const auto a_hat = standardised(a, stats_a, 1.0);
  const auto b_hat = standardised(b, stats_b, 1.0 / static_cast<double>(a.size(0)));
  return at::mm(a_hat.t(), b_hat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_correlation_matrix_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                             bool unbiased, double eps) {
  check_cross_correlation_inputs(a, b, eps, /*same_shape=*/false);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto ac = a.contiguous(), bc = b.contiguous();
  const auto acc_type = at::toOpMathType(a.scalar_type());
  if (use_fused(a.size(0), a.size(1), b.size(1))) {
    auto stats_a = at::empty({2, a.size(1)}, a.options().dtype(acc_type));
    auto stats_b = at::empty({2, b.size(1)}, a.options().dtype(acc_type));
    auto matrix = at::empty({a.size(1), b.size(1)}, a.options());
    fused_forward(ac, bc, unbiased, eps, 0.0, 0.0, &matrix, nullptr, stats_a, stats_b);
    return {matrix, stats_a, stats_b};
  }
  at::Tensor stats_a, stats_b;
  auto m = general_matrix(ac, bc, unbiased, eps, stats_a, stats_b);
  return {m.to(a.scalar_type()), stats_a, stats_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_correlation_loss_cuda(
    const at::Tensor& a, const at::Tensor& b, double off_diag_weight, double off_diag_target, bool unbiased,
    double eps, bool keep_matrix) {
  check_cross_correlation_inputs(a, b, eps, /*same_shape=*/true);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto ac = a.contiguous(), bc = b.contiguous();
  const int64_t K = a.size(1);
  const auto acc_type = at::toOpMathType(a.scalar_type());
  auto loss = at::empty({}, a.options());
  if (use_fused(a.size(0), K, K)) {
    auto stats_a = at::empty({2, K}, a.options().dtype(acc_type));
    auto stats_b = at::empty({2, K}, a.options().dtype(acc_type));
    auto matrix = keep_matrix ? at::empty({K, K}, a.options().dtype(acc_type)) : at::empty({0}, a.options().dtype(acc_type));
    fused_forward(ac, bc, unbiased, eps, off_diag_weight, off_diag_target, keep_matrix ? &matrix : nullptr, &loss,
                  stats_a, stats_b);
    return {loss, matrix, stats_a, stats_b};
  }
  at::Tensor stats_a, stats_b;
  auto m = general_matrix(ac, bc, unbiased, eps, stats_a, stats_b);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 512, blocks = cuda::grid_stride_blocks(K * K, threads);
  auto partials = at::empty({blocks}, m.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_correlation_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    loss_partial_kernel<acc_t><<<blocks, threads, 0, stream>>>(m.const_data_ptr<acc_t>(), K,
                                                               static_cast<acc_t>(off_diag_weight),
                                                               static_cast<acc_t>(off_diag_target),
                                                               partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_sum_kernel<scalar_t, acc_t><<<1, 512, 0, stream>>>(partials.const_data_ptr<acc_t>(), blocks,
                                                              loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!keep_matrix) m = at::empty({0}, m.options());
  return {loss, m, stats_a, stats_b};
}

std::tuple<at::Tensor, at::Tensor> cross_correlation_backward_cuda(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& stats_a,
    const at::Tensor& stats_b, const at::Tensor& matrix, bool unbiased, double off_diag_weight,
    double off_diag_target, bool from_loss, bool need_a, bool need_b) {
  check_cross_correlation_backward_inputs(grad, a, b, stats_a, stats_b, matrix, from_loss);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto ac = a.contiguous(), bc = b.contiguous();
  const int64_t B = a.size(0), Ka = a.size(1), Kb = b.size(1);
  const auto acc_type = stats_a.scalar_type();
  if (use_fused(B, Ka, Kb)) {
    at::Tensor grad_a = need_a ? at::empty_like(ac) : at::empty({0}, a.options());
    at::Tensor grad_b = need_b ? at::empty_like(bc) : at::empty({0}, b.options());
    const auto sa = stats_a.contiguous(), sb = stats_b.contiguous();
    const auto g = grad.contiguous();
    const auto gm = from_loss ? matrix.contiguous() : g;
    if (Ka + Kb == 0) return {grad_a, grad_b};  // nothing to launch (a 0-block grid is an error)
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_correlation_fused_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t smem = sizeof(acc_t) * std::max(Ka, Kb);
      const acc_t n_var = unbiased ? acc_t(B - 1) : acc_t(B);
      auto launch = [&](const auto* gptr) {
        using g_t = std::remove_const_t<std::remove_pointer_t<decltype(gptr)>>;
        fused_small_backward_kernel<scalar_t, acc_t, g_t><<<static_cast<int>(Ka + Kb), 256, smem, stream>>>(
            ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), sa.const_data_ptr<acc_t>(),
            sb.const_data_ptr<acc_t>(), gptr, from_loss ? g.const_data_ptr<scalar_t>() : nullptr, from_loss,
            static_cast<acc_t>(off_diag_weight), static_cast<acc_t>(off_diag_target), B, Ka, Kb, n_var, need_a,
            need_b, need_a ? grad_a.mutable_data_ptr<scalar_t>() : nullptr,
            need_b ? grad_b.mutable_data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (from_loss) {
        launch(gm.const_data_ptr<acc_t>());
      } else {
        launch(gm.const_data_ptr<scalar_t>());
      }
    });
    return {grad_a, grad_b};
  }
  const auto a_hat = standardised(ac, stats_a, 1.0);
  const auto b_hat = standardised(bc, stats_b, 1.0);
  at::Tensor grad_a = need_a ? at::empty_like(ac) : at::empty({0}, a.options());
  at::Tensor grad_b = need_b ? at::empty_like(bc) : at::empty({0}, b.options());
  const double inv_b = 1.0 / static_cast<double>(B);
  at::Tensor g_matrix, diag, row_a, row_b, grad_scale;
  if (from_loss) {
    grad_scale = grad.to(acc_type).contiguous();  // stays on the device: no synchronisation
    g_matrix = matrix;
    const double w = off_diag_weight, tau = off_diag_target;
    auto m_diag = matrix.diagonal();
    diag = (((m_diag - 1.0) * 2.0 - (m_diag - tau) * (2.0 * w)) * inv_b).contiguous();
    if (tau != 0.0) {
      if (need_a) row_b = b_hat.sum(1);
      if (need_b) row_a = a_hat.sum(1);
    }
  } else {
    g_matrix = grad.to(acc_type);
  }
  const double alpha = from_loss ? 2.0 * off_diag_weight * inv_b : inv_b;
  const double beta = from_loss ? -2.0 * off_diag_weight * off_diag_target * inv_b : 0.0;
  const double n_var = unbiased ? static_cast<double>(B - 1) : static_cast<double>(B);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_correlation_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](const at::Tensor& P, const at::Tensor& row, const at::Tensor& other_hat, const at::Tensor& hat,
                   const at::Tensor& stats, int64_t K, at::Tensor& out) {
      if (out.numel() == 0) return;
      const std::pair<int, int64_t> split = row_splits(B, K);
      const int splits = split.first;
      const int64_t rows_per = split.second;
      auto partial = at::empty({splits, 2, K}, P.options());
      const ColumnGrad<acc_t> cg{P.const_data_ptr<acc_t>(), static_cast<acc_t>(alpha),
                                 row.defined() ? row.const_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(beta),
                                 diag.defined() ? diag.const_data_ptr<acc_t>() : nullptr,
                                 other_hat.const_data_ptr<acc_t>(), K};
      const dim3 block(kColsPerBlock, kRowLanes);
      const dim3 grid(static_cast<unsigned>((K + kColsPerBlock - 1) / kColsPerBlock), static_cast<unsigned>(splits));
      backward_cols_partial_kernel<acc_t><<<grid, block, 0, stream>>>(cg, hat.const_data_ptr<acc_t>(), B, rows_per,
                                                                      partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_cols_apply_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          cg, hat.const_data_ptr<acc_t>(), stats.const_data_ptr<acc_t>() + K,
          grad_scale.defined() ? grad_scale.const_data_ptr<acc_t>() : nullptr, partial.const_data_ptr<acc_t>(), splits,
          B, rows_per, static_cast<acc_t>(n_var), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (need_a) {
      const auto P = at::mm(b_hat, g_matrix.t());
      run(P, row_b, b_hat, a_hat, stats_a, Ka, grad_a);
    }
    if (need_b) {
      const auto P = at::mm(a_hat, g_matrix);
      run(P, row_a, a_hat, b_hat, stats_b, Kb, grad_b);
    }
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CUDA, m) {
  m.impl("cross_correlation_matrix", &cross_correlation_matrix_cuda);
  m.impl("cross_correlation_loss", &cross_correlation_loss_cuda);
  m.impl("_cross_correlation_backward", &cross_correlation_backward_cuda);
}

}  // namespace fcl_ext
