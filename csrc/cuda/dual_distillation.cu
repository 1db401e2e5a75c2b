// FCCL dual-domain distillation on CUDA, same math as csrc/cpu/dual_distillation.cpp.
// Forward: one block per row computes the log-sum-exps of s, s/T and each teacher t/T and the row's
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

namespace fcl_ext {
namespace {

constexpr int kStats = kDualDistillationStats;  // layout: csrc/cpu/dual_distillation.cpp row_forward
// Kernels may run with up to 1024 threads (cuda::row_block_threads): __launch_bounds__ keeps their
// register use within what a 1024-thread block can have.

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_max(const scalar_t* row, int64_t C, acc_t* shared) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) m = fmax(m, static_cast<acc_t>(row[c]));
  return cuda::block_max(m, shared);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(1024)
    dual_distillation_fwd_kernel(const scalar_t* __restrict__ s, const int64_t* __restrict__ labels,
                                 const scalar_t* __restrict__ t1, const scalar_t* __restrict__ t2, int64_t C,
                                 acc_t inv_t, acc_t ce_w, acc_t w1, acc_t w2, acc_t* __restrict__ row_loss,
                                 acc_t* __restrict__ stats) {
  __shared__ acc_t shared[32];
  const int64_t r = blockIdx.x;
  const scalar_t* srow = s + r * C;
  const acc_t ms = row_max<scalar_t, acc_t>(srow, C, shared);
  acc_t z1 = 0, zt = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t d = static_cast<acc_t>(srow[c]) - ms;
    z1 += ::exp(d);
    zt += ::exp(d * inv_t);
  }
  z1 = cuda::block_sum(z1, shared);
  zt = cuda::block_sum(zt, shared);
  // Maxima and log-sums kept apart (as on the CPU): x - max stays exact for large |x|.
  const acc_t log_z1 = ::log(z1), log_zt = ::log(zt);
  const int64_t y = labels[r];
  CUDA_KERNEL_ASSERT(y >= 0 && y < C);
  acc_t loss = ce_w * ((ms - static_cast<acc_t>(srow[y])) + log_z1);
  acc_t max_t[2] = {0, 0}, log_z_t[2] = {0, 0};
  const scalar_t* teachers[2] = {t1, t2};
  const acc_t weights[2] = {w1, w2};
  for (int k = 0; k < 2; ++k) {
    if (teachers[k] == nullptr) continue;
    const scalar_t* trow = teachers[k] + r * C;
    const acc_t mt = row_max<scalar_t, acc_t>(trow, C, shared);
    acc_t z = 0, gap = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const acc_t t = static_cast<acc_t>(trow[c]);
      const acc_t e = ::exp((t - mt) * inv_t);
      z += e;
      gap += math::kd_weighted_gap(e, t - mt, static_cast<acc_t>(srow[c]) - ms);
    }
    z = cuda::block_sum(z, shared);
    gap = cuda::block_sum(gap, shared);
    max_t[k] = mt;
    log_z_t[k] = ::log(z);
    loss += weights[k] * (gap * inv_t / z + (log_zt - log_z_t[k]));
  }
  if (threadIdx.x == 0) {
    row_loss[r] = loss;
    acc_t* st = stats + kStats * r;
    st[0] = ms;
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

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(1024)
    dual_distillation_bwd_kernel(const scalar_t* __restrict__ grad_loss, const scalar_t* __restrict__ s,
                                 const int64_t* __restrict__ labels, const scalar_t* __restrict__ t1,
                                 const scalar_t* __restrict__ t2, const acc_t* __restrict__ stats, int64_t N,
                                 int64_t C, acc_t inv_t, acc_t ce_w, acc_t w1, acc_t w2,
                                 scalar_t* __restrict__ grad) {
  const int64_t r = blockIdx.x;
  const acc_t scale = static_cast<acc_t>(*grad_loss) / acc_t(N);
  const acc_t ce_s = scale * ce_w;
  const acc_t k1 = t1 != nullptr ? scale * w1 * inv_t : acc_t(0);
  const acc_t k2 = t2 != nullptr ? scale * w2 * inv_t : acc_t(0);
  const acc_t* st = stats + kStats * r;
  const int64_t y = labels[r];
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t e = r * C + c;
    const acc_t x = static_cast<acc_t>(s[e]);
    const acc_t d = x - st[0];
    acc_t v = ce_s * (::exp(d - st[1]) - (c == y ? acc_t(1) : acc_t(0))) + (k1 + k2) * ::exp(d * inv_t - st[2]);
    if (t1 != nullptr) v -= k1 * ::exp((static_cast<acc_t>(t1[e]) - st[3]) * inv_t - st[4]);
    if (t2 != nullptr) v -= k2 * ::exp((static_cast<acc_t>(t2[e]) - st[5]) * inv_t - st[6]);
    grad[e] = static_cast<scalar_t>(v);
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
  const int threads = cuda::row_block_threads(C);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dual_distillation_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dual_distillation_fwd_kernel<scalar_t, acc_t><<<N, threads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), ptr_or_null<scalar_t>(t1),
        ptr_or_null<scalar_t>(t2), C, acc_t(1 / temperature), acc_t(ce_weight), acc_t(intra_weight),
        acc_t(inter_weight), row_loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>());
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
  const int threads = cuda::row_block_threads(C);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dual_distillation_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dual_distillation_bwd_kernel<scalar_t, acc_t><<<N, threads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(),
        ptr_or_null<scalar_t>(t1), ptr_or_null<scalar_t>(t2), st.const_data_ptr<acc_t>(), N, C,
        acc_t(1 / temperature), acc_t(ce_weight), acc_t(intra_weight), acc_t(inter_weight),
        grad.mutable_data_ptr<scalar_t>());
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
