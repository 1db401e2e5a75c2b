// softmax_entropy on CUDA: one warp per row (8 rows per block) for C <= 128, else one block per row;
// reductions in the accumulation type, launched on the current stream. Same formulas as the CPU kernel
// (fcl_ext/math.h). NaN in a row gives NaN out (the sums carry it; the max is NaN-propagating).
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

template <typename scalar_t, typename opmath_t, bool kWarpPerRow>
__global__ void __launch_bounds__(1024)
    softmax_entropy_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ entropy,
                               opmath_t* __restrict__ stats, int64_t rows, int64_t C, opmath_t eps) {
  __shared__ opmath_t shared[32];
  const cuda::RowMap<kWarpPerRow> map;
  if (kWarpPerRow && map.row >= rows) return;  // a whole warp leaves; no block-wide barrier follows
  const int64_t r = map.row;
  const scalar_t* row = x + r * C;
  opmath_t m = -std::numeric_limits<opmath_t>::infinity();
#pragma unroll 4
  for (int64_t c = map.tid; c < C; c += map.nthreads) m = cuda::nan_max(m, static_cast<opmath_t>(row[c]));
  m = cuda::row_max<kWarpPerRow>(m, shared);
  if (m == -std::numeric_limits<opmath_t>::infinity() || m != m) {  // all -inf, or NaN in the row
    if (map.tid == 0) {
      const opmath_t nan = std::numeric_limits<opmath_t>::quiet_NaN();
      entropy[r] = static_cast<scalar_t>(nan);
      stats[3 * r] = m;
      stats[3 * r + 1] = nan;
      stats[3 * r + 2] = nan;
    }
    return;  // every thread of the row took this branch (m is the same for all)
  }
  opmath_t s = 0, t = 0;
#pragma unroll 4
  for (int64_t c = map.tid; c < C; c += map.nthreads) {
    const opmath_t d = static_cast<opmath_t>(row[c]) - m, e = ::exp(d);
    s += e;
    t += e == opmath_t(0) ? opmath_t(0) : e * d;
  }
  s = cuda::row_sum<kWarpPerRow>(s, shared);
  t = cuda::row_sum<kWarpPerRow>(t, shared);
  const opmath_t log_s = ::log(s);
  opmath_t h, abar;
  if (eps == opmath_t(0)) {
    h = log_s - t / s;
    abar = h - opmath_t(1);
  } else {
    opmath_t hh = 0, q = 0;
#pragma unroll 4
    for (int64_t c = map.tid; c < C; c += map.nthreads) {
      const opmath_t p = ::exp((static_cast<opmath_t>(row[c]) - m) - log_s);
      hh += p * ::log(p + eps);
      q += p * p / (p + eps);
    }
    hh = cuda::row_sum<kWarpPerRow>(hh, shared);
    q = cuda::row_sum<kWarpPerRow>(q, shared);
    h = -hh;
    abar = h - q;
  }
  if (map.tid == 0) {
    entropy[r] = static_cast<scalar_t>(h);
    stats[3 * r] = m;
    stats[3 * r + 1] = log_s;
    stats[3 * r + 2] = abar;
  }
}

// Elementwise per row, with the forward's row mapping (no division per element).
template <typename scalar_t, typename opmath_t, bool kWarpPerRow>
__global__ void __launch_bounds__(1024)
    softmax_entropy_bwd_kernel(const scalar_t* __restrict__ grad_h, const scalar_t* __restrict__ x,
                               const opmath_t* __restrict__ stats, scalar_t* __restrict__ grad_x, int64_t rows,
                               int64_t C, opmath_t eps) {
  const cuda::RowMap<kWarpPerRow> map;
  if (map.row >= rows) return;
  const int64_t r = map.row;
  const opmath_t m = stats[3 * r], log_s = stats[3 * r + 1], abar = stats[3 * r + 2];
  const opmath_t g = static_cast<opmath_t>(grad_h[r]);
  const scalar_t* row = x + r * C;
  scalar_t* out = grad_x + r * C;
#pragma unroll 4
  for (int64_t c = map.tid; c < C; c += map.nthreads) {
    const opmath_t logp = (static_cast<opmath_t>(row[c]) - m) - log_s, p = ::exp(logp);
    out[c] = static_cast<scalar_t>(p == opmath_t(0) ? opmath_t(0) : g * p * (math::entropy_dp(p, logp, eps) - abar));
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_entropy_cuda(const at::Tensor& logits, double eps) {
  check_floating(logits, "logits");
  check_dim_at_least(logits, 1, "logits");
  TORCH_CHECK(eps >= 0, "fcl_ext: eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t C = logits.size(-1);
  const auto x = logits.contiguous();
  const int64_t rows = C == 0 ? 0 : x.numel() / C;
  auto entropy = at::empty(logits.sizes().slice(0, logits.dim() - 1), logits.options());
  // Checked before the empty return: [3, 0] logits would otherwise give 3 uninitialised entropies.
  TORCH_CHECK(C > 0 || entropy.numel() == 0, "fcl_ext: logits must have at least one class (last dim > 0), got shape ",
              logits.sizes());
  auto stats = at::empty({rows, 3}, logits.options().dtype(at::toOpMathType(logits.scalar_type())));
  if (rows == 0) return {entropy, stats};
  const cuda::RowLaunch launch = cuda::row_launch(rows, C);
  TORCH_CHECK(launch.blocks <= INT32_MAX, "fcl_ext: too many rows for one launch: ", rows);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_entropy_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* hp = entropy.mutable_data_ptr<scalar_t>();
    opmath_t* sp = stats.mutable_data_ptr<opmath_t>();
    if (launch.warp_per_row) {
      softmax_entropy_fwd_kernel<scalar_t, opmath_t, true>
          <<<launch.blocks, launch.threads, 0, stream>>>(xp, hp, sp, rows, C, static_cast<opmath_t>(eps));
    } else {
      softmax_entropy_fwd_kernel<scalar_t, opmath_t, false>
          <<<launch.blocks, launch.threads, 0, stream>>>(xp, hp, sp, rows, C, static_cast<opmath_t>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {entropy, stats};
}

at::Tensor softmax_entropy_backward_cuda(const at::Tensor& grad_entropy, const at::Tensor& logits,
                                         const at::Tensor& stats, double eps) {
  check_softmax_entropy_backward_inputs(grad_entropy, logits, stats, eps);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t C = logits.size(-1);
  const auto x = logits.contiguous();
  const auto g = grad_entropy.contiguous();
  const auto st = stats.contiguous();
  auto grad = at::empty_like(x);
  const int64_t rows = C == 0 ? 0 : x.numel() / C;
  if (rows == 0) return grad;
  const cuda::RowLaunch launch = cuda::row_launch(rows, C);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_entropy_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const opmath_t* sp = st.const_data_ptr<opmath_t>();
    scalar_t* op = grad.mutable_data_ptr<scalar_t>();
    if (launch.warp_per_row) {
      softmax_entropy_bwd_kernel<scalar_t, opmath_t, true>
          <<<launch.blocks, launch.threads, 0, stream>>>(gp, xp, sp, op, rows, C, static_cast<opmath_t>(eps));
    } else {
      softmax_entropy_bwd_kernel<scalar_t, opmath_t, false>
          <<<launch.blocks, launch.threads, 0, stream>>>(gp, xp, sp, op, rows, C, static_cast<opmath_t>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CUDA, m) {
  m.impl("softmax_entropy", &softmax_entropy_cuda);
  m.impl("_softmax_entropy_backward", &softmax_entropy_backward_cuda);
}

}  // namespace fcl_ext
