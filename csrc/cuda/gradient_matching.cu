// Gradient matching loss and the batched L-BFGS two-loop recursion on CUDA.
// gradient_matching_loss: the rows' sums (<g,t>, |g|^2, |t|^2 or |g-t|^2) by one block per row, or, when
// K is too small to fill the device, by several blocks per row (split-P) whose partial sums a finish
// kernel adds in a fixed order (deterministic); block reductions in the accumulation type. Its backward
// is one elementwise pass (any K: rows beyond the 65535 grid.y limit are looped over). Cosine rows with
// extreme norms (unscaled sums out of range) are summed again with each vector scaled by a power of two, in
// the forward and the backward, as on the CPU (no extra launch on the common path).
// lbfgs_direction: one block per problem; every thread owns the same coordinates of q through the whole
// recursion, so only the dot products (block reductions) synchronise; each q update pass also forms the
// next dot product (one pass over q per history pair instead of two). Up to D = 4 x threads (4096), q stays
// in registers and the loads of the next history pair are issued before each block reduction (software
// pipelining); longer D streams q through global memory. Invalid hist_len / hist_start
// give a NaN direction for that problem and a device error (fcl_ext.check_device_errors()).
// Same formulas as the CPU kernels (math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <string_view>

#include "fcl_ext/checks.h"
#include "fcl_ext/op_checks.h"
#include "fcl_ext/cuda_utils.cuh"
#include "fcl_ext/math.h"
#include "kernel_utils.cuh"

namespace fcl_ext {
namespace {

constexpr int kFinishThreads = 256;  // split-P finish: one block per row (it may rescale the row)

// Cosine sums of row (gr, tr) by the whole block with each vector scaled by a power of two (exact) that brings
// its largest |entry| to [1, 2) before squaring, as the CPU's rescaled pass (csrc/cpu/gradient_matching.cpp).
// Returns false (on every thread) for a row with a NaN, an inf or only zeros in g or t: its unscaled sums are
// exact there (NaN, inf or 0). Used only for rows whose unscaled sums are out of range (math.h).
template <typename scalar_t, typename opmath_t>
__device__ bool block_scaled_cosine_sums(const scalar_t* __restrict__ gr, const scalar_t* __restrict__ tr, int64_t P,
                                         opmath_t* shared, int* eg, int* et, opmath_t* dot, opmath_t* gg,
                                         opmath_t* tt) {
  opmath_t mg = 0, mt = 0;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    mg = cuda::nan_max(mg, ::abs(static_cast<opmath_t>(gr[i])));
    mt = cuda::nan_max(mt, ::abs(static_cast<opmath_t>(tr[i])));
  }
  mg = cuda::block_nan_max(mg, shared);
  mt = cuda::block_nan_max(mt, shared);
  if (!(math::is_finite(mg) && math::is_finite(mt)) || mg == opmath_t(0) || mt == opmath_t(0)) return false;
  *eg = ::ilogb(mg);
  *et = ::ilogb(mt);
  // each scale as two factors: 2^-e alone overflows where the largest entry is subnormal (math::split_pow2)
  const auto pg = math::split_pow2(-*eg), pt = math::split_pow2(-*et);
  const opmath_t sg1 = math::pow2<opmath_t>(pg.first), sg2 = math::pow2<opmath_t>(pg.second);
  const opmath_t st1 = math::pow2<opmath_t>(pt.first), st2 = math::pow2<opmath_t>(pt.second);
  opmath_t d = 0, a2 = 0, b2 = 0;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    const opmath_t a = static_cast<opmath_t>(gr[i]) * sg1 * sg2, b = static_cast<opmath_t>(tr[i]) * st1 * st2;
    d += a * b;
    a2 += a * a;
    b2 += b * b;
  }
  *dot = cuda::block_sum(d, shared);
  *gg = cuda::block_sum(a2, shared);
  *tt = cuda::block_sum(b2, shared);
  return true;
}

template <typename opmath_t>
__device__ __forceinline__ bool cosine_sums_in_range(const opmath_t* st, int64_t P) {
  return math::sum_of_squares_in_range(st[1], P) && math::sum_of_squares_in_range(st[2], P);
}

// Row k's stats and loss from its sums (a, b, c), by the whole block (every thread holds the sums). Cosine rows
// whose unscaled sums under- or overflowed (|g| or |t| below ~1e-13 or above ~1e19 in float) are summed again,
// scaled, as on the CPU; the branch is the same for the whole block.
template <typename scalar_t, typename opmath_t>
__device__ void finish_row(const scalar_t* __restrict__ gr, const scalar_t* __restrict__ tr, int64_t P, opmath_t a,
                           opmath_t b, opmath_t c, bool cosine, opmath_t* shared, scalar_t* __restrict__ loss,
                           opmath_t* __restrict__ st) {
  opmath_t value = a;
  if (cosine) {
    int eg, et;
    opmath_t dot, gg, tt;
    if (!(math::sum_of_squares_in_range(b, P) && math::sum_of_squares_in_range(c, P)) &&
        block_scaled_cosine_sums(gr, tr, P, shared, &eg, &et, &dot, &gg, &tt)) {
      a = ::ldexp(dot, eg + et);
      b = ::ldexp(gg, 2 * eg);
      c = ::ldexp(tt, 2 * et);
      value = math::cosine_matching_loss(dot, gg, tt);
    } else {
      value = math::cosine_matching_loss(a, b, c);
    }
  }
  if (threadIdx.x != 0) return;
  st[0] = a;
  st[1] = b;
  st[2] = c;
  *loss = static_cast<scalar_t>(value);
}

// Block (blockIdx.x, k) sums its share of row k (chunk blockIdx.x of gridDim.x). With one block per row
// (gridDim.x == 1) it writes the loss and stats; else its three sums go to partial[k][blockIdx.x].
template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(1024)
    matching_fwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ t, scalar_t* __restrict__ loss,
                        opmath_t* __restrict__ stats, opmath_t* __restrict__ partial, int64_t P, int64_t chunk,
                        bool cosine) {
  __shared__ opmath_t shared[32];
  const int64_t k = blockIdx.y;
  const scalar_t* gr = g + k * P;
  const scalar_t* tr = t + k * P;
  const int64_t begin = int64_t(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < P ? begin + chunk : P;
  opmath_t a = 0, b = 0, c = 0;
#pragma unroll 4
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
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
  if (gridDim.x > 1) {
    if (threadIdx.x != 0) return;
    opmath_t* pt = partial + 3 * (k * gridDim.x + blockIdx.x);
    pt[0] = a;
    pt[1] = b;
    pt[2] = c;
    return;
  }
  finish_row(gr, tr, P, a, b, c, cosine, shared, loss + k, stats + 3 * k);
}

// Split-P finish: block k adds row k's `splits` partial sums in order (thread 0: deterministic), then
// finish_row (the whole block: it may rescale the row).
template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kFinishThreads)
    matching_finish_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ t,
                           const opmath_t* __restrict__ partial, int64_t P, int splits, scalar_t* __restrict__ loss,
                           opmath_t* __restrict__ stats, bool cosine) {
  __shared__ opmath_t shared[32];
  __shared__ opmath_t sums[3];
  const int64_t k = blockIdx.x;
  if (threadIdx.x == 0) {
    opmath_t a = 0, b = 0, c = 0;
    for (int j = 0; j < splits; ++j) {
      const opmath_t* pt = partial + 3 * (k * splits + j);
      a += pt[0];
      b += pt[1];
      c += pt[2];
    }
    sums[0] = a;
    sums[1] = b;
    sums[2] = c;
  }
  __syncthreads();
  finish_row(g + k * P, t + k * P, P, sums[0], sums[1], sums[2], cosine, shared, loss + k, stats + 3 * k);
}

// Backward of the cosine rows: dloss/dg = ca (g sg) - cb (t st). In-range rows: ca = up a, cb = up b from the
// saved sums and sg = st = 1 (exact: the plain a g - b t). Rows the forward rescaled are summed again, scaled,
// by every block that works on them (rare: extreme norms only; no extra launch on the common path), with
// ca = up 2^-eg A, cb = up 2^-eg B, A = cos / |g'|^2, B = 1 / (|g'| |t'|) of the scaled rows g' = g sg,
// t' = t st (formed in double: 2^-eg alone may exceed float's range), so nothing is squared unscaled (the CPU's
// rescaled_cosine_backward). l2: 2 up (g - t).
template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(256)
    matching_bwd_kernel(const scalar_t* __restrict__ grad_loss, const scalar_t* __restrict__ g,
                        const scalar_t* __restrict__ t, const opmath_t* __restrict__ stats,
                        scalar_t* __restrict__ out, int64_t K, int64_t P, bool cosine) {
  __shared__ opmath_t shared[32];
  for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {  // grid.y is at most 65535
    const opmath_t up = static_cast<opmath_t>(grad_loss[k]);
    const opmath_t* st = stats + 3 * k;
    opmath_t a = 2 * up, b = 2 * up, sg1 = 1, sg2 = 1, st1 = 1, st2 = 1;
    if (cosine) {
      int eg, et;
      opmath_t dot, gg, tt;
      if (cosine_sums_in_range(st, P) ||  // the same branch for the whole block
          !block_scaled_cosine_sums(g + k * P, t + k * P, P, shared, &eg, &et, &dot, &gg, &tt)) {
        math::cosine_matching_grad_coeffs(st[0], st[1], st[2], &a, &b);
        a *= up;
        b *= up;
      } else {
        opmath_t A, B;
        math::cosine_matching_grad_coeffs(dot, gg, tt, &A, &B);
        // the power of two by ldexp last, in double (never formed on its own, where it may overflow)
        a = static_cast<opmath_t>(::ldexp(static_cast<double>(up) * static_cast<double>(A), -eg));
        b = static_cast<opmath_t>(::ldexp(static_cast<double>(up) * static_cast<double>(B), -eg));
        const auto pg = math::split_pow2(-eg), pt = math::split_pow2(-et);
        sg1 = math::pow2<opmath_t>(pg.first);
        sg2 = math::pow2<opmath_t>(pg.second);
        st1 = math::pow2<opmath_t>(pt.first);
        st2 = math::pow2<opmath_t>(pt.second);
      }
    }
#pragma unroll 4
    for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < P; i += (int64_t)gridDim.x * blockDim.x) {
      const int64_t at = k * P + i;
      out[at] = static_cast<scalar_t>(math::matching_grad(cosine, a, b, static_cast<opmath_t>(g[at]) * sg1 * sg2,
                                                          static_cast<opmath_t>(t[at]) * st1 * st2));
    }
  }
}

// Blocks per row for the forward: 1 when K rows fill the device twice over or a row is short, else enough
// chunks (of at least 8 elements per thread) to give every SM two blocks.
int64_t matching_splits(int64_t K, int64_t P, int threads) {
  const int64_t want_blocks = 2 * int64_t(cuda::sm_count());
  if (K >= want_blocks) return 1;
  const int64_t by_device = (want_blocks + K - 1) / K;
  const int64_t by_length = P / (int64_t(threads) * 8);
  return std::max<int64_t>(1, std::min(by_device, by_length));
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
  const int threads = cuda::row_block_threads(P);
  const int64_t splits = matching_splits(K, P, threads);
  TORCH_CHECK(K <= 65535 || splits == 1, "fcl_ext: internal: split-P path with K > 65535");
  const int64_t rows_per_launch = 65535;  // grid.y limit: more rows go in several launches
  const int64_t chunk = (P + splits - 1) / splits;
  const auto opmath = at::toOpMathType(g.scalar_type());
  at::Tensor partial = splits > 1 ? at::empty({K, splits, 3}, g.options().dtype(opmath)) : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_matching_loss_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    for (int64_t k0 = 0; k0 < K; k0 += rows_per_launch) {
      const int64_t rows = std::min(rows_per_launch, K - k0);
      const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(rows));
      matching_fwd_kernel<scalar_t, opmath_t><<<grid, threads, 0, stream>>>(
          g.const_data_ptr<scalar_t>() + k0 * P, t.const_data_ptr<scalar_t>() + k0 * P,
          loss.mutable_data_ptr<scalar_t>() + k0, stats.mutable_data_ptr<opmath_t>() + 3 * k0,
          splits > 1 ? partial.mutable_data_ptr<opmath_t>() : nullptr, P, chunk, cosine);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (splits > 1) {  // K < 2 x SMs here
      matching_finish_kernel<scalar_t, opmath_t><<<static_cast<unsigned>(K), kFinishThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), partial.const_data_ptr<opmath_t>(), P,
          static_cast<int>(splits), loss.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<opmath_t>(), cosine);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
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
  const int threads = 256;
  const int64_t blocks_x = std::max<int64_t>(1, std::min<int64_t>((P + threads - 1) / threads, 1024));
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(std::min<int64_t>(K, 65535)));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_matching_loss_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    matching_bwd_kernel<scalar_t, opmath_t><<<grid, threads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
        st.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>(), K, P, cosine);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- lbfgs_direction --------------------------------------------------------------

// Problem k's history must have 0 <= hist_len <= M and, when it is not empty, 0 <= hist_start < M (as the CPU
// kernel checks); else its direction q is NaN, the error is recorded and this returns false.
template <typename T>
__device__ bool lbfgs_history_ok(int64_t k, int64_t len, int64_t first, bool has_start, int64_t M, int64_t D, T* q,
                                 long long* errors) {
  const bool len_ok = len >= 0 && len <= M;
  const bool start_ok = !has_start || len == 0 || (first >= 0 && first < M);
  if (len_ok && start_ok) return true;
  if (threadIdx.x == 0) {
    cuda::report_device_error(errors, cuda::kErrHistoryRange, cuda::kOpLbfgsDirection, k, len_ok ? first : len, M,
                              len_ok ? 1 : 0);
  }
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) q[i] = std::numeric_limits<T>::quiet_NaN();
  return false;
}

// The register path (D <= kLbfgsRegs x threads, e.g. D = 3072 with 1024 threads): q lives in registers for the
// whole recursion (kLbfgsRegs coordinates per thread), and each step is software-pipelined: the loads of the next
// history rows (the step's update row and the following dot's row, and rho / alpha) are issued into registers
// BEFORE the step's block reduction, so their memory latency overlaps the reduction's barriers instead of
// following it. Same operations in the same order per coordinate, and the same reductions, as
// lbfgs_direction_kernel below (and so as the CPU kernel's math).
constexpr int kLbfgsRegs = 4;

template <typename T>
__device__ __forceinline__ void lbfgs_load_row(T (&dst)[kLbfgsRegs], const T* __restrict__ row, int64_t D) {
#pragma unroll
  for (int e = 0; e < kLbfgsRegs; ++e) {
    const int64_t i = threadIdx.x + int64_t(e) * blockDim.x;
    dst[e] = (row != nullptr && i < D) ? row[i] : T(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(1024)
    lbfgs_direction_prefetch_kernel(const T* __restrict__ g, const T* __restrict__ S, const T* __restrict__ Y,
                                    const T* __restrict__ rho, const int64_t* __restrict__ hist_len,
                                    const int64_t* __restrict__ hist_start, const T* __restrict__ h_diag,
                                    T* __restrict__ d, T* __restrict__ alpha_buf, int64_t D, int64_t M,
                                    long long* __restrict__ errors) {
  __shared__ T shared[32];
  const int64_t k = blockIdx.x;
  T* dk = d + k * D;
  T* alpha = alpha_buf + k * (M > 0 ? M : 1);
  const int64_t len = hist_len[k];
  const int64_t first = hist_start == nullptr ? 0 : hist_start[k];
  if (!lbfgs_history_ok(k, len, first, hist_start != nullptr, M, D, dk, errors)) return;  // the whole block
  auto slot = [&](int64_t h) { return k * M + (first + h) % M; };  // only called with M > 0 (h < len <= M)
  auto mine = [&](int e) { return threadIdx.x + int64_t(e) * blockDim.x < D; };
  T q[kLbfgsRegs], upd[kLbfgsRegs], dot_row[kLbfgsRegs];  // q; the step's update row; the next dot's row
  // First loop, newest -> oldest: a_h = rho_h <s_h, q>, q -= a_h y_h; the update of step h forms <s_{h-1}, q>.
  const T* s_next = len > 0 ? S + slot(len - 1) * D : nullptr;
  lbfgs_load_row(q, g + k * D, D);
  lbfgs_load_row(dot_row, s_next, D);
  T part = 0;
#pragma unroll
  for (int e = 0; e < kLbfgsRegs; ++e) {
    if (!mine(e)) continue;
    q[e] = -q[e];
    if (s_next != nullptr) part += dot_row[e] * q[e];
  }
  for (int64_t h = len - 1; h >= 0; --h) {
    const int64_t j = slot(h);
    // prefetch: y_h, s_{h-1} and rho_h, before the reduction that gives a_h
    const T rho_j = rho[j];
    lbfgs_load_row(upd, Y + j * D, D);
    s_next = h > 0 ? S + slot(h - 1) * D : nullptr;
    lbfgs_load_row(dot_row, s_next, D);
    const T a = cuda::block_sum(part, shared) * rho_j;
    if (threadIdx.x == 0) alpha[h] = a;
    part = 0;
#pragma unroll
    for (int e = 0; e < kLbfgsRegs; ++e) {
      if (!mine(e)) continue;
      const T v = q[e] - a * upd[e];
      q[e] = v;
      if (s_next != nullptr) part += dot_row[e] * v;
    }
  }
  // r = h_diag q with <y_0, r>; then oldest -> newest: b_h = rho_h <y_h, r>, r += (a_h - b_h) s_h, the update
  // forming <y_{h+1}, r>.
  const T hd = h_diag[k];
  const T* y_next = len > 0 ? Y + slot(0) * D : nullptr;
  lbfgs_load_row(dot_row, y_next, D);
  part = 0;
#pragma unroll
  for (int e = 0; e < kLbfgsRegs; ++e) {
    if (!mine(e)) continue;
    q[e] = q[e] * hd;
    if (y_next != nullptr) part += dot_row[e] * q[e];
  }
  __syncthreads();  // alpha[] written by thread 0 is read by all below
  for (int64_t h = 0; h < len; ++h) {
    const int64_t j = slot(h);
    // prefetch: s_h, y_{h+1}, rho_h and a_h, before the reduction that gives b_h
    const T rho_j = rho[j], a_h = alpha[h];
    lbfgs_load_row(upd, S + j * D, D);
    y_next = h + 1 < len ? Y + slot(h + 1) * D : nullptr;
    lbfgs_load_row(dot_row, y_next, D);
    const T beta = cuda::block_sum(part, shared) * rho_j;
    const T c = a_h - beta;
    part = 0;
#pragma unroll
    for (int e = 0; e < kLbfgsRegs; ++e) {
      if (!mine(e)) continue;
      const T v = q[e] + c * upd[e];
      q[e] = v;
      if (y_next != nullptr) part += dot_row[e] * v;
    }
  }
#pragma unroll
  for (int e = 0; e < kLbfgsRegs; ++e) {
    if (mine(e)) dk[threadIdx.x + int64_t(e) * blockDim.x] = q[e];
  }
}

// The streaming path (longer D): q in global memory, one pass over it per history pair.
template <typename T>
__global__ void __launch_bounds__(1024)
    lbfgs_direction_kernel(const T* __restrict__ g, const T* __restrict__ S, const T* __restrict__ Y,
                           const T* __restrict__ rho, const int64_t* __restrict__ hist_len,
                           const int64_t* __restrict__ hist_start, const T* __restrict__ h_diag, T* __restrict__ d,
                           T* __restrict__ alpha_buf, int64_t D, int64_t M, long long* __restrict__ errors) {
  __shared__ T shared[32];
  const int64_t k = blockIdx.x;
  T* q = d + k * D;
  const T* gk = g + k * D;
  T* alpha = alpha_buf + k * (M > 0 ? M : 1);
  const int64_t len = hist_len[k];
  const int64_t first = hist_start == nullptr ? 0 : hist_start[k];
  if (!lbfgs_history_ok(k, len, first, hist_start != nullptr, M, D, q, errors)) return;  // the whole block
  auto slot = [&](int64_t h) { return k * M + (first + h) % M; };  // only called with M > 0 (h < len <= M)
  // First loop, newest -> oldest: a_h = rho_h <s_h, q>, q -= a_h y_h. The pass that updates q also forms
  // <s_{h-1}, q> for the next step, so q is read once per pair.
  T part = 0;
  const T* s_next = len > 0 ? S + slot(len - 1) * D : nullptr;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const T v = -gk[i];
    q[i] = v;
    if (s_next != nullptr) part += s_next[i] * v;
  }
  for (int64_t h = len - 1; h >= 0; --h) {
    const int64_t j = slot(h);
    const T a = cuda::block_sum(part, shared) * rho[j];
    if (threadIdx.x == 0) alpha[h] = a;
    const T* y = Y + j * D;
    s_next = h > 0 ? S + slot(h - 1) * D : nullptr;
    part = 0;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      const T v = q[i] - a * y[i];
      q[i] = v;
      if (s_next != nullptr) part += s_next[i] * v;
    }
  }
  // r = h_diag q, with <y_0, r> formed in the same pass; then oldest -> newest: b_h = rho_h <y_h, r>,
  // r += (a_h - b_h) s_h, the update pass forming <y_{h+1}, r>.
  const T hd = h_diag[k];
  const T* y_next = len > 0 ? Y + slot(0) * D : nullptr;
  part = 0;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const T v = q[i] * hd;
    q[i] = v;
    if (y_next != nullptr) part += y_next[i] * v;
  }
  __syncthreads();  // alpha[] written by thread 0 is read by all below
  for (int64_t h = 0; h < len; ++h) {
    const int64_t j = slot(h);
    const T beta = cuda::block_sum(part, shared) * rho[j];
    const T c = alpha[h] - beta;
    const T* s = S + j * D;
    y_next = h + 1 < len ? Y + slot(h + 1) * D : nullptr;
    part = 0;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      const T v = q[i] + c * s[i];
      q[i] = v;
      if (y_next != nullptr) part += y_next[i] * v;
    }
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
  long long* errors = cuda::device_error_buffer(grad);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool in_registers = D <= int64_t(kLbfgsRegs) * threads;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "lbfgs_direction_cuda", [&] {
    auto kernel = in_registers ? lbfgs_direction_prefetch_kernel<scalar_t> : lbfgs_direction_kernel<scalar_t>;
    kernel<<<K, threads, 0, stream>>>(g.const_data_ptr<scalar_t>(), S.const_data_ptr<scalar_t>(),
                                      Y.const_data_ptr<scalar_t>(), R.const_data_ptr<scalar_t>(),
                                      L.const_data_ptr<int64_t>(),
                                      start.defined() ? start.const_data_ptr<int64_t>() : nullptr,
                                      H.const_data_ptr<scalar_t>(), d.mutable_data_ptr<scalar_t>(),
                                      alpha.mutable_data_ptr<scalar_t>(), D, M, errors);
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
