// Gradient matching loss and the batched L-BFGS two-loop recursion on CUDA.
// gradient_matching_loss: one block per row, block reductions in the accumulation type;
// its backward is one elementwise pass. lbfgs_direction: one block per problem; every
// thread owns the same coordinates of q through the whole recursion, so only the dot
// products (block reductions) synchronise. Same formulas as the CPU kernels (math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <string_view>

#include "fcl_ext/checks.h"
#include "fcl_ext/op_checks.h"
#include "fcl_ext/cuda_utils.cuh"
#include "fcl_ext/math.h"

namespace fcl_ext {
namespace {

template <typename scalar_t, typename opmath_t>
__global__ void matching_fwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ t,
                                    scalar_t* __restrict__ loss, opmath_t* __restrict__ stats, int64_t P,
                                    bool cosine) {
  __shared__ opmath_t shared[32];
  const scalar_t* gr = g + blockIdx.x * P;
  const scalar_t* tr = t + blockIdx.x * P;
  opmath_t a = 0, b = 0, c = 0;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    const opmath_t gv = static_cast<opmath_t>(gr[i]), tv = static_cast<opmath_t>(tr[i]);
    if (cosine) {
      a += gv * tv;
      b += gv * gv;
      c += tv * tv;
    } else {
      const opmath_t d = gv - tv;
      a += d * d;
    }
  }
  a = cuda::block_sum(a, shared);
  if (cosine) {
    b = cuda::block_sum(b, shared);
    c = cuda::block_sum(c, shared);
  }
  if (threadIdx.x == 0) {
    opmath_t* st = stats + 3 * blockIdx.x;
    st[0] = a;
    st[1] = b;
    st[2] = c;
    loss[blockIdx.x] = static_cast<scalar_t>(cosine ? math::cosine_matching_loss(a, b, c) : a);
  }
}

template <typename scalar_t, typename opmath_t>
__global__ void matching_bwd_kernel(const scalar_t* __restrict__ grad_loss, const scalar_t* __restrict__ g,
                                    const scalar_t* __restrict__ t, const opmath_t* __restrict__ stats,
                                    scalar_t* __restrict__ out, int64_t P, bool cosine) {
  const int64_t k = blockIdx.y;
  opmath_t a = 2, b = 2;
  if (cosine) math::cosine_matching_grad_coeffs(stats[3 * k], stats[3 * k + 1], stats[3 * k + 2], &a, &b);
  const opmath_t up = static_cast<opmath_t>(grad_loss[k]);
  a *= up;
  b *= up;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < P; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t at = k * P + i;
    out[at] = static_cast<scalar_t>(
        math::matching_grad(cosine, a, b, static_cast<opmath_t>(g[at]), static_cast<opmath_t>(t[at])));
  }
}

std::tuple<at::Tensor, at::Tensor> gradient_matching_loss_cuda(const at::Tensor& grads, const at::Tensor& target_grads,
                                                               std::string_view metric) {
  check_gradient_matching_inputs(grads, target_grads);
  const bool cosine = is_cosine_metric(metric);
  const c10::cuda::CUDAGuard guard(grads.device());
  const auto g = grads.contiguous();
  const auto t = target_grads.contiguous();
  const int64_t K = g.size(0), P = g.size(1);
  auto loss = at::empty({K}, g.options());
  auto stats = at::zeros({K, 3}, g.options().dtype(at::toOpMathType(g.scalar_type())));
  if (K == 0) return {loss, stats};
  TORCH_CHECK(K <= INT32_MAX, "fcl_ext: too many rows for one launch: ", K);
  const int threads = cuda::row_block_threads(P);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_matching_loss_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    matching_fwd_kernel<scalar_t, opmath_t><<<K, threads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), loss.mutable_data_ptr<scalar_t>(),
        stats.mutable_data_ptr<opmath_t>(), P, cosine);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

at::Tensor gradient_matching_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grads,
                                                const at::Tensor& target_grads, const at::Tensor& stats,
                                                std::string_view metric) {
  check_gradient_matching_backward_inputs(grad_loss, grads, target_grads, stats);
  const bool cosine = is_cosine_metric(metric);
  const c10::cuda::CUDAGuard guard(grads.device());
  const auto g = grads.contiguous();
  const auto t = target_grads.contiguous();
  const auto go = grad_loss.contiguous();
  const auto st = stats.contiguous();
  const int64_t K = g.size(0), P = g.size(1);
  auto out = at::empty_like(g);
  if (g.numel() == 0) return out;
  TORCH_CHECK(K <= 65535, "fcl_ext: gradient_matching_loss backward supports at most 65535 rows, got ", K);
  const int threads = 256;
  const int64_t blocks_x = std::min<int64_t>((P + threads - 1) / threads, 1024);
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(K));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_matching_loss_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    matching_bwd_kernel<scalar_t, opmath_t><<<grid, threads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
        st.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>(), P, cosine);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- lbfgs_direction --------------------------------------------------------------

template <typename T>
__global__ void lbfgs_direction_kernel(const T* __restrict__ g, const T* __restrict__ S, const T* __restrict__ Y,
                                       const T* __restrict__ rho, const int64_t* __restrict__ hist_len,
                                       const int64_t* __restrict__ hist_start, const T* __restrict__ h_diag,
                                       T* __restrict__ d, T* __restrict__ alpha_buf, int64_t D, int64_t M) {
  __shared__ T shared[32];
  const int64_t k = blockIdx.x;
  T* q = d + k * D;
  const T* gk = g + k * D;
  T* alpha = alpha_buf + k * M;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) q[i] = -gk[i];
  const int64_t len = hist_len[k];
  const int64_t first = hist_start == nullptr ? 0 : hist_start[k];
  for (int64_t h = len - 1; h >= 0; --h) {
    const int64_t j = (first + h) % M;
    const T* s = S + (k * M + j) * D;
    const T* y = Y + (k * M + j) * D;
    T part = 0;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) part += s[i] * q[i];
    const T a = cuda::block_sum(part, shared) * rho[k * M + j];
    if (threadIdx.x == 0) alpha[h] = a;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) q[i] -= a * y[i];
  }
  const T hd = h_diag[k];
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) q[i] *= hd;
  __syncthreads();  // alpha[] written by thread 0 is read by all below
  for (int64_t h = 0; h < len; ++h) {
    const int64_t j = (first + h) % M;
    const T* s = S + (k * M + j) * D;
    const T* y = Y + (k * M + j) * D;
    T part = 0;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) part += y[i] * q[i];
    const T beta = cuda::block_sum(part, shared) * rho[k * M + j];
    const T c = alpha[h] - beta;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) q[i] += c * s[i];
  }
}

at::Tensor lbfgs_direction_cuda(const at::Tensor& grad, const at::Tensor& s_hist, const at::Tensor& y_hist,
                                const at::Tensor& rho, const at::Tensor& hist_len, const at::Tensor& h_diag,
                                const std::optional<at::Tensor>& hist_start) {
  check_lbfgs_inputs(grad, s_hist, y_hist, rho, hist_len, h_diag, hist_start);
  const int64_t K = grad.size(0), D = grad.size(1), M = s_hist.size(1);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous();
  const auto S = s_hist.contiguous();
  const auto Y = y_hist.contiguous();
  const auto R = rho.contiguous();
  const auto L = hist_len.contiguous();
  const auto H = h_diag.contiguous();
  at::Tensor start;
  if (hist_start.has_value()) start = hist_start->contiguous();
  auto d = at::empty_like(g);
  if (K == 0) return d;
  TORCH_CHECK(K <= INT32_MAX, "fcl_ext: too many problems for one launch: ", K);
  auto alpha = at::empty({K, std::max<int64_t>(M, 1)}, g.options());
  const int threads = cuda::row_block_threads(D);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "lbfgs_direction_cuda", [&] {
    lbfgs_direction_kernel<scalar_t><<<K, threads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), S.const_data_ptr<scalar_t>(), Y.const_data_ptr<scalar_t>(),
        R.const_data_ptr<scalar_t>(), L.const_data_ptr<int64_t>(),
        start.defined() ? start.const_data_ptr<int64_t>() : nullptr, H.const_data_ptr<scalar_t>(),
        d.mutable_data_ptr<scalar_t>(), alpha.mutable_data_ptr<scalar_t>(), D, M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcl_ext, CUDA, m) {
  m.impl("gradient_matching_loss", &gradient_matching_loss_cuda);
  m.impl("_gradient_matching_loss_backward", &gradient_matching_loss_backward_cuda);
  m.impl("lbfgs_direction", &lbfgs_direction_cuda);
}

}  // namespace fcl_ext
