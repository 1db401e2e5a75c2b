// FCCL dual-domain distillation on CUDA, same math as csrc/cpu/dual_distillation.cpp.
// A label outside [0, C) gives a NaN row loss and gradient and a device error (fcl_ext.check_device_errors()).
// Forward: one warp (C <= 128) or one block per row computes the log-sum-exps of s, s/T and each teacher t/T and the row's
// loss in one read of the row (max pass + exp pass, both from L1); a one-block finish sums the rows in a
// fixed order (deterministic). Backward: one elementwise pass per row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "fcl_ext/checks.h"
#include "fcl_ext/op_checks.h"
#include "fcl_ext/cuda_utils.cuh"
#include "fcl_ext/math.h"
#include "kernel_utils.cuh"

#include <type_traits>

namespace fcl_ext {
namespace {

// Per-row stats in the CPU kernel's layout (csrc/cpu/dual_distillation.cpp row_forward): maxima and log-sums
// apart; max s is NaN for a row whose loss is NaN (here: an invalid label).
constexpr int kStats = kDualDistillationStats;
// Kernels may run with up to 1024 threads (cuda::row_block_threads): __launch_bounds__ keeps their
// register use within what a 1024-thread block can have.

template <bool kWarpPerRow, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_max_of(const scalar_t* row, int64_t C, const cuda::RowMap<kWarpPerRow>& map,
                                            acc_t* shared) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma unroll 4
  for (int64_t c = map.tid; c < C; c += map.nthreads) m = cuda::nan_max(m, static_cast<acc_t>(row[c]));
  return cuda::row_max<kWarpPerRow>(m, shared);
}

// One row per warp (kWarpPerRow, C <= 128) or per block. Max and log-sum are kept apart in the loss
// (lse - x = (max - x) + log sum) so a huge common offset does not swallow the log-sum.
template <typename scalar_t, typename acc_t, bool kWarpPerRow>
__global__ void __launch_bounds__(1024)
    dual_distillation_fwd_kernel(const scalar_t* __restrict__ s, const int64_t* __restrict__ labels,
                                 const scalar_t* __restrict__ t1, const scalar_t* __restrict__ t2, int64_t N,
                                 int64_t C, acc_t inv_t, acc_t ce_w, acc_t w1, acc_t w2, acc_t* __restrict__ row_loss,
                                 acc_t* __restrict__ stats, long long* __restrict__ errors) {
  __shared__ acc_t shared[32];
  const cuda::RowMap<kWarpPerRow> map;
  if (kWarpPerRow && map.row >= N) return;  // a whole warp leaves; no block-wide barrier follows
  const int64_t r = map.row;
  const scalar_t* srow = s + r * C;
  const acc_t ms = row_max_of<kWarpPerRow, scalar_t, acc_t>(srow, C, map, shared);
  acc_t z1 = 0, zt = 0;
#pragma unroll 4
  for (int64_t c = map.tid; c < C; c += map.nthreads) {
    const acc_t d = static_cast<acc_t>(srow[c]) - ms;
    z1 += ::exp(d);
    zt += ::exp(d * inv_t);
  }
  z1 = cuda::row_sum<kWarpPerRow>(z1, shared);
  zt = cuda::row_sum<kWarpPerRow>(zt, shared);
  const acc_t log_z1 = ::log(z1), log_zt = ::log(zt);
  const int64_t y = labels[r];
  const bool valid = y >= 0 && y < C;
  if (!valid && map.tid == 0) {
    cuda::report_device_error(errors, cuda::kErrLabelRange, cuda::kOpDualDistillation, r, y, C);
  }
  acc_t loss = valid ? ce_w * ((ms - static_cast<acc_t>(srow[y])) + log_z1)
                     : std::numeric_limits<acc_t>::quiet_NaN();
  acc_t max_t[2] = {0, 0}, log_z_t[2] = {0, 0};
  const scalar_t* teachers[2] = {t1, t2};
  const acc_t weights[2] = {w1, w2};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (teachers[k] == nullptr) continue;
    const scalar_t* trow = teachers[k] + r * C;
    const acc_t mt = row_max_of<kWarpPerRow, scalar_t, acc_t>(trow, C, map, shared);
    acc_t z = 0, gap = 0;
#pragma unroll 4
    for (int64_t c = map.tid; c < C; c += map.nthreads) {
      const acc_t t = static_cast<acc_t>(trow[c]);
      const acc_t e = ::exp((t - mt) * inv_t);
      z += e;
      gap += math::kd_weighted_gap(e, t - mt, static_cast<acc_t>(srow[c]) - ms);
    }
    z = cuda::row_sum<kWarpPerRow>(z, shared);
    gap = cuda::row_sum<kWarpPerRow>(gap, shared);
    max_t[k] = mt;
    log_z_t[k] = ::log(z);
    // KL = sum p_t (t - s) / T - lse(t/T) + lse(s/T); with t' = t - max t, s' = s - max s the maxima cancel.
    loss += weights[k] * (gap * inv_t / z + (log_zt - log_z_t[k]));
  }
  if (map.tid == 0) {
    row_loss[r] = loss;
    acc_t* st = stats + kStats * r;
    st[0] = valid ? ms : std::numeric_limits<acc_t>::quiet_NaN();
    st[1] = log_z1;
    st[2] = log_zt;
    st[3] = max_t[0];
    st[4] = log_z_t[0];
    st[5] = max_t[1];
    st[6] = log_z_t[1];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void mean_finish_kernel(const acc_t* __restrict__ row_loss, int64_t n, scalar_t* __restrict__ out) {
  __shared__ acc_t shared[32];
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += row_loss[i];
  s = cuda::block_sum(s, shared);
  if (threadIdx.x == 0) *out = static_cast<scalar_t>(s / acc_t(n));
}

template <typename scalar_t, typename acc_t, bool kWarpPerRow>
__global__ void __launch_bounds__(1024)
    dual_distillation_bwd_kernel(const scalar_t* __restrict__ grad_loss, const scalar_t* __restrict__ s,
                                 const int64_t* __restrict__ labels, const scalar_t* __restrict__ t1,
                                 const scalar_t* __restrict__ t2, const acc_t* __restrict__ stats, int64_t N,
                                 int64_t C, acc_t inv_t, acc_t ce_w, acc_t w1, acc_t w2,
                                 scalar_t* __restrict__ grad) {
  const cuda::RowMap<kWarpPerRow> map;
  if (map.row >= N) return;
  const int64_t r = map.row;
  const acc_t scale = static_cast<acc_t>(*grad_loss) / acc_t(N);
  const acc_t ce_s = scale * ce_w;
  const acc_t k1 = t1 != nullptr ? scale * w1 * inv_t : acc_t(0);
  const acc_t k2 = t2 != nullptr ? scale * w2 * inv_t : acc_t(0);
  const acc_t* st = stats + kStats * r;
  const acc_t ms = st[0], log_z1 = st[1], log_zt = st[2], mt1 = st[3], log_z_t1 = st[4], mt2 = st[5],
              log_z_t2 = st[6];
  const int64_t y = labels[r];
  const bool valid = y >= 0 && y < C;  // else a NaN row (the forward recorded the error)
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t base = r * C;
#pragma unroll 4
  for (int64_t c = map.tid; c < C; c += map.nthreads) {
    const int64_t e = base + c;
    const acc_t d = static_cast<acc_t>(s[e]) - ms;
    acc_t v = ce_s * (::exp(d - log_z1) - (c == y ? acc_t(1) : acc_t(0))) + (k1 + k2) * ::exp(d * inv_t - log_zt);
    if (t1 != nullptr) v -= k1 * ::exp((static_cast<acc_t>(t1[e]) - mt1) * inv_t - log_z_t1);
    if (t2 != nullptr) v -= k2 * ::exp((static_cast<acc_t>(t2[e]) - mt2) * inv_t - log_z_t2);
    grad[e] = static_cast<scalar_t>(valid ? v : nan);
  }
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> dual_distillation_loss_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                               const std::optional<at::Tensor>& intra_logits,
                                                               const std::optional<at::Tensor>& inter_logits,
                                                               double temperature, double ce_weight,
                                                               double intra_weight, double inter_weight) {
  check_dual_distillation_inputs(logits, labels, intra_logits, inter_logits, temperature);
  TORCH_CHECK(logits.size(0) <= INT32_MAX, "fcl_ext: too many rows for one launch: ", logits.size(0));
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto s = logits.contiguous();
  const auto y = labels.contiguous();
  const auto t1 = contiguous_or_none(intra_logits), t2 = contiguous_or_none(inter_logits);
  const auto acc_type = at::toOpMathType(logits.scalar_type());
  auto stats = at::empty({N, kStats}, logits.options().dtype(acc_type));
  auto row_loss = at::empty({N}, logits.options().dtype(acc_type));
  auto loss = at::empty({}, logits.options());
  const cuda::RowLaunch launch = cuda::row_launch(N, C);
  long long* errors = cuda::device_error_buffer(logits);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dual_distillation_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch_rows = [&](auto warp_per_row) {
      dual_distillation_fwd_kernel<scalar_t, acc_t, decltype(warp_per_row)::value>
          <<<launch.blocks, launch.threads, 0, stream>>>(
              s.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), ptr_or_null<scalar_t>(t1),
              ptr_or_null<scalar_t>(t2), N, C, acc_t(1 / temperature), acc_t(ce_weight), acc_t(intra_weight),
              acc_t(inter_weight), row_loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(), errors);
    };
    if (launch.warp_per_row) {
      launch_rows(std::true_type{});
    } else {
      launch_rows(std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mean_finish_kernel<scalar_t, acc_t><<<1, 512, 0, stream>>>(row_loss.const_data_ptr<acc_t>(), N,
                                                               loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

at::Tensor dual_distillation_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                           const at::Tensor& labels, const std::optional<at::Tensor>& intra_logits,
                                           const std::optional<at::Tensor>& inter_logits, const at::Tensor& stats,
                                           double temperature, double ce_weight, double intra_weight,
                                           double inter_weight) {
  check_dual_distillation_backward_inputs(grad_loss, logits, labels, intra_logits, inter_logits, stats, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto s = logits.contiguous();
  const auto y = labels.contiguous();
  const auto st = stats.contiguous();
  const auto g = grad_loss.contiguous();
  const auto t1 = contiguous_or_none(intra_logits), t2 = contiguous_or_none(inter_logits);
  auto grad = at::empty_like(s);
  const cuda::RowLaunch launch = cuda::row_launch(N, C);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dual_distillation_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch_rows = [&](auto warp_per_row) {
      dual_distillation_bwd_kernel<scalar_t, acc_t, decltype(warp_per_row)::value>
          <<<launch.blocks, launch.threads, 0, stream>>>(
              g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(),
              ptr_or_null<scalar_t>(t1), ptr_or_null<scalar_t>(t2), st.const_data_ptr<acc_t>(), N, C,
              acc_t(1 / temperature), acc_t(ce_weight), acc_t(intra_weight), acc_t(inter_weight),
              grad.mutable_data_ptr<scalar_t>());
    };
    if (launch.warp_per_row) {
      launch_rows(std::true_type{});
    } else {
      launch_rows(std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CUDA, m) {
  m.impl("dual_distillation_loss", &dual_distillation_loss_cuda);
  m.impl("_dual_distillation_backward", &dual_distillation_backward_cuda);
}

}  // namespace fcl_ext
