// GLFC local losses on CUDA (specs/glfc.md 1.2-1.3), on the current stream.
// Forward: (1) one warp (C <= 128) or one block per row sums both BCE rows and writes
// G_i = 1 - sigmoid(o_{i,y_i}); (2) one block over the batch forms the two group means of G,
// the weights w and the per-sample losses. Backward: one elementwise pass per row.
// Same per-element formulas as the CPU kernel (fcl_ext/math.h).
// A label outside [0, C) makes its row NaN (loss, weight, gradient), is left out of the group means, and is
// recorded as a device error (fcl_ext.check_device_errors()); no host sync, no device assert.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "fcl_ext/cuda_utils.cuh"
#include "fcl_ext/glfc_checks.h"
#include "fcl_ext/math.h"
#include "kernel_utils.cuh"

namespace fcl_ext {
namespace {

constexpr int kRowsPerWarpBlock = 8;  // warp-per-row launches: 8 warps (rows) per block
constexpr int kBatchThreads = 1024;   // the one block of the group-mean kernel

// Row r handled by `nthreads` threads, this one being `tid`. Warp-per-row launches use
// warp-level sums; block-per-row launches use block sums (kWarpPerRow false).
template <bool kWarpPerRow>
struct RowMapping {
  int64_t row;
  int tid, nthreads;
  __device__ RowMapping() {
    if (kWarpPerRow) {
      row = static_cast<int64_t>(blockIdx.x) * kRowsPerWarpBlock + threadIdx.x / cuda::kWarp;
      tid = threadIdx.x % cuda::kWarp;
      nthreads = cuda::kWarp;
    } else {
      row = blockIdx.x;
      tid = threadIdx.x;
      nthreads = blockDim.x;
    }
  }
};

template <typename scalar_t, typename opmath_t, bool kWarpPerRow>
__global__ void __launch_bounds__(1024) glfc_rows_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ q,
                                     const int64_t* __restrict__ labels, opmath_t* __restrict__ g_out,
                                     opmath_t* __restrict__ row_sums, int64_t N, int64_t C, int64_t c_old,
                                     long long* __restrict__ errors) {
  __shared__ opmath_t shared[32];
  const RowMapping<kWarpPerRow> map;
  // Warp-per-row: a warp past the last row still takes part in nothing block-wide, so it may leave.
  if (kWarpPerRow && map.row >= N) return;
  const int64_t r = map.row;
  const int64_t y = labels[r];
  const bool valid = y >= 0 && y < C;
  if (!valid && map.tid == 0) cuda::report_device_error(errors, cuda::kErrLabelRange, cuda::kOpGlfcLoss, r, y, C);
  const scalar_t* row = x + r * C;
  const scalar_t* qrow = c_old > 0 ? q + r * c_old : nullptr;
  // The target's own terms are added once, exactly, below: summing softplus(o_y) and then
  // subtracting o_y would cancel catastrophically when o_y is large.
  // Each term as the twin computes it, also at an infinite or NaN logit (math.h).
  opmath_t gc = 0, rd = 0;
  for (int64_t c = map.tid; c < c_old; c += map.nthreads) {
    const opmath_t o = static_cast<opmath_t>(row[c]);
    if (c != y) gc += math::bce_off_target(o);
    // RD target of an old class: sigmoid(q)
    rd += math::bce_teacher_target(o, static_cast<opmath_t>(qrow[c]));
  }
  for (int64_t c = c_old + map.tid; c < C; c += map.nthreads) {
    if (c == y) continue;
    const opmath_t bce = math::bce_off_target(static_cast<opmath_t>(row[c]));
    gc += bce;
    rd += bce;
  }
  if (kWarpPerRow) {
    gc = cuda::warp_sum(gc);
    rd = cuda::warp_sum(rd);
  } else {
    gc = cuda::block_sum(gc, shared);
    rd = cuda::block_sum(rd, shared);
  }
  if (map.tid == 0) {
    const opmath_t nan = std::numeric_limits<opmath_t>::quiet_NaN();
    const opmath_t o_y = valid ? static_cast<opmath_t>(row[y]) : nan;
    const opmath_t target_bce = math::bce_on_target(o_y);  // BCE(o_y, 1)
    row_sums[2 * r] = gc + target_bce;
    row_sums[2 * r + 1] = rd + (y >= c_old ? target_bce : opmath_t(0));
    g_out[r] = math::sigmoid(-o_y);
  }
}

// One block: group means of G (old / new label), then w, the per-sample loss and row_stats / C.
// `weights` holds G on entry and w on exit.
template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kBatchThreads) glfc_batch_kernel(const scalar_t* __restrict__ x,
                                  const int64_t* __restrict__ labels, const bool* __restrict__ mask,
                                  opmath_t* __restrict__ weights, opmath_t* __restrict__ row_stats,
                                  scalar_t* __restrict__ per_sample, int64_t N, int64_t C, opmath_t gc_weight,
                                  opmath_t rd_weight) {
  __shared__ double shared[32];
  double any = 0;
  if (mask != nullptr) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) any += mask[c] ? 1.0 : 0.0;
  }
  any = cuda::block_sum(any, shared);
  const bool any_old = any > 0;
  opmath_t mean_old = 0, mean_new = 0;
  if (any_old) {
    double sum_old = 0, sum_new = 0, count_old = 0, count_new = 0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const int64_t y = labels[i];
      const double g = static_cast<double>(weights[i]);
      if (y < 0 || y >= C) continue;  // an invalid label's NaN stays out of both groups
      if (mask[y]) {
        sum_old += g;
        count_old += 1;
      } else {
        sum_new += g;
        count_new += 1;
      }
    }
    sum_old = cuda::block_sum(sum_old, shared);
    sum_new = cuda::block_sum(sum_new, shared);
    count_old = cuda::block_sum(count_old, shared);
    count_new = cuda::block_sum(count_new, shared);
    mean_old = count_old > 0 ? static_cast<opmath_t>(sum_old / count_old) : opmath_t(0);
    mean_new = count_new > 0 ? static_cast<opmath_t>(sum_new / count_new) : opmath_t(0);
  }
  const opmath_t inv_c = opmath_t(1) / static_cast<opmath_t>(C);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    opmath_t w = 1;
    const int64_t y = labels[i];
    if (y < 0 || y >= C) {
      w = std::numeric_limits<opmath_t>::quiet_NaN();
    } else if (any_old) {
      w = math::gradient_compensation_weight(weights[i], mask[y] ? mean_old : mean_new);
    }
    weights[i] = w;
    const opmath_t gc = row_stats[2 * i] * inv_c, rd = row_stats[2 * i + 1] * inv_c;
    row_stats[2 * i] = gc;
    row_stats[2 * i + 1] = rd;
    // (w == 0 only where G underflowed: the label's logit is read only then)
    const opmath_t w_gc = w == opmath_t(0) ? math::compensated_row(w, gc, static_cast<opmath_t>(x[i * C + y])) : w * gc;
    per_sample[i] = static_cast<scalar_t>(math::glfc_sample_loss(gc_weight, w_gc, rd_weight, rd));
  }
}

// grad_c = s [gc_w w (p_c - t_c) + rd_w (p_c - t'_c)], s = grad_i / C.
template <typename scalar_t, typename opmath_t, bool kWarpPerRow>
__global__ void __launch_bounds__(1024) glfc_rows_bwd_kernel(const scalar_t* __restrict__ grad_loss, const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ q, const int64_t* __restrict__ labels,
                                     const opmath_t* __restrict__ weights, scalar_t* __restrict__ grad_x, int64_t N,
                                     int64_t C, int64_t c_old, opmath_t gc_weight, opmath_t rd_weight) {
  const RowMapping<kWarpPerRow> map;
  if (map.row >= N) return;
  const int64_t r = map.row;
  const int64_t y = labels[r];
  const bool valid = y >= 0 && y < C;  // else a NaN row (the forward recorded the error)
  const opmath_t scale = static_cast<opmath_t>(grad_loss[r]) / static_cast<opmath_t>(C);
  const opmath_t w = weights[r];
  const opmath_t a = scale * (gc_weight * w + rd_weight), b = scale * rd_weight;
  const scalar_t* row = x + r * C;
  const scalar_t* qrow = c_old > 0 ? q + r * c_old : nullptr;
  scalar_t* out = grad_x + r * C;
  for (int64_t c = map.tid; c < C; c += map.nthreads) {
    const opmath_t o = static_cast<opmath_t>(row[c]);
    opmath_t v;
    if (c == y) {
      // p_y - 1 = -sigmoid(-o_y), exact where p_y rounds to 1.
      const opmath_t one_minus_p = math::sigmoid(-o);
      v = -scale * gc_weight * w * one_minus_p;
      v += c < c_old ? b * (math::sigmoid(o) - math::sigmoid(static_cast<opmath_t>(qrow[c]))) : -b * one_minus_p;
    } else {
      v = a * math::sigmoid(o);
      if (c < c_old) v -= b * math::sigmoid(static_cast<opmath_t>(qrow[c]));
    }
    out[c] = static_cast<scalar_t>(valid ? v : std::numeric_limits<opmath_t>::quiet_NaN());
  }
}

// Launch shape for a per-row kernel: (blocks, threads, warp-per-row?).
struct RowLaunch {
  int64_t blocks;
  int threads;
  bool warp_per_row;
};

inline RowLaunch row_launch(int64_t N, int64_t C) {
  const int threads = cuda::row_block_threads(C);
  if (threads == cuda::kWarp) {
    return {(N + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock, cuda::kWarp * kRowsPerWarpBlock, true};
  }
  return {N, threads, false};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> glfc_loss_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                              const std::optional<at::Tensor>& old_class_mask,
                                                              const std::optional<at::Tensor>& old_logits,
                                                              double gc_weight, double rd_weight) {
  const int64_t c_old = check_glfc_inputs(logits, labels, old_class_mask, old_logits);
  const c10::cuda::CUDAGuard guard(logits.device());
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
  const RowLaunch launch = row_launch(N, C);
  TORCH_CHECK(launch.blocks <= INT32_MAX, "fcl_ext: too many rows for one launch: ", N);
  long long* errors = cuda::device_error_buffer(logits);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "glfc_loss_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* qp = c_old > 0 ? q.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* yp = y.const_data_ptr<int64_t>();
    opmath_t* wp = weights.mutable_data_ptr<opmath_t>();
    opmath_t* sp = row_stats.mutable_data_ptr<opmath_t>();
    if (launch.warp_per_row) {
      glfc_rows_fwd_kernel<scalar_t, opmath_t, true>
          <<<launch.blocks, launch.threads, 0, stream>>>(xp, qp, yp, wp, sp, N, C, c_old, errors);
    } else {
      glfc_rows_fwd_kernel<scalar_t, opmath_t, false>
          <<<launch.blocks, launch.threads, 0, stream>>>(xp, qp, yp, wp, sp, N, C, c_old, errors);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    glfc_batch_kernel<scalar_t, opmath_t><<<1, kBatchThreads, 0, stream>>>(
        xp, yp, mask.defined() ? mask.const_data_ptr<bool>() : nullptr, wp, sp, per_sample.mutable_data_ptr<scalar_t>(),
        N, C, static_cast<opmath_t>(gc_weight), static_cast<opmath_t>(rd_weight));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {per_sample, weights, row_stats};
}

at::Tensor glfc_loss_backward_cuda(const at::Tensor& grad_per_sample, const at::Tensor& logits,
                                   const at::Tensor& labels, const std::optional<at::Tensor>& old_logits,
                                   const at::Tensor& weights, double gc_weight, double rd_weight) {
  const int64_t c_old = check_glfc_inputs(logits, labels, std::nullopt, old_logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(grad_per_sample.numel() == N, "fcl_ext: grad_per_sample_loss must have ", N, " elements");
  TORCH_CHECK(weights.numel() == N && weights.scalar_type() == at::toOpMathType(logits.scalar_type()),
              "fcl_ext: weights must be the [N] accumulation-dtype weights returned by glfc_loss");
  check_same_device(logits, "logits", grad_per_sample, "grad_per_sample_loss");
  check_same_device(logits, "logits", weights, "weights");
  const auto x = logits.contiguous();
  auto grad = at::empty_like(x);
  if (N == 0) return grad;
  const auto y = labels.contiguous();
  const auto g = grad_per_sample.to(logits.scalar_type()).contiguous();
  const auto w = weights.contiguous();
  const at::Tensor q = c_old > 0 ? old_logits->contiguous() : at::Tensor();
  const RowLaunch launch = row_launch(N, C);
  TORCH_CHECK(launch.blocks <= INT32_MAX, "fcl_ext: too many rows for one launch: ", N);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "glfc_loss_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* qp = c_old > 0 ? q.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    scalar_t* op = grad.mutable_data_ptr<scalar_t>();
    const opmath_t gc_w = static_cast<opmath_t>(gc_weight), rd_w = static_cast<opmath_t>(rd_weight);
    if (launch.warp_per_row) {
      glfc_rows_bwd_kernel<scalar_t, opmath_t, true>
          <<<launch.blocks, launch.threads, 0, stream>>>(gp, xp, qp, yp, wp, op, N, C, c_old, gc_w, rd_w);
    } else {
      glfc_rows_bwd_kernel<scalar_t, opmath_t, false>
          <<<launch.blocks, launch.threads, 0, stream>>>(gp, xp, qp, yp, wp, op, N, C, c_old, gc_w, rd_w);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CUDA, m) {
  m.impl("glfc_loss", &glfc_loss_cuda);
  m.impl("_glfc_loss_backward", &glfc_loss_backward_cuda);
}

}  // namespace fcl_ext
