// Launch shapes and the device-side input-error buffer shared by the CUDA kernels (csrc/cuda/*.cu).
//
// Device errors: a kernel that finds an invalid input it cannot reject without a host sync (a label out of
// range, a constant or NaN column with eps == 0, an L-BFGS history index out of range) writes NaN where the bad
// input would have been used and records the first such error in a small per-device int64 buffer. Nothing
// synchronises on the hot path; fcl_ext.check_device_errors() (fcl_ext/device_errors.py) reads the buffer
// with one sync, clears it and raises a clear error. A device-side assert would instead poison the whole
// CUDA context.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>

#include "fcl_ext/cuda_utils.cuh"

namespace fcl_ext {
namespace cuda {

// Buffer layout (int64 slots). Keep in sync with fcl_ext/device_errors.py.
enum DeviceErrorSlot : int { kErrCode = 0, kErrOp, kErrIndex, kErrValue, kErrBound, kErrWhat, kErrCount, kErrSlots = 8 };
enum DeviceErrorCode : long long {
  kErrNone = 0,
  kErrLabelRange = 1,
  kErrConstantColumn = 2,
  kErrHistoryRange = 3,
  kErrNanColumn = 4,
  kErrTinyStdColumn = 5
};
enum DeviceErrorOp : long long { kOpGlfcLoss = 1, kOpDualDistillation = 2, kOpCrossCorrelation = 3, kOpLbfgsDirection = 4 };

// The buffer of `like`'s device, allocated (zeroed, one blocking cudaMemset) on the first call for that device.
// Call fcl_ext.check_device_errors() once before capturing a CUDA graph so the allocation is not captured.
long long* device_error_buffer(const at::Tensor& like);

// Record an error; the first one since the last check keeps its details, later ones only count.
__device__ __forceinline__ void report_device_error(long long* buf, long long code, long long op, long long index,
                                                    long long value, long long bound, long long what = 0) {
  if (buf == nullptr) return;
  atomicAdd(reinterpret_cast<unsigned long long*>(buf + kErrCount), 1ull);
  if (atomicCAS(reinterpret_cast<unsigned long long*>(buf + kErrCode), 0ull, static_cast<unsigned long long>(code)) ==
      0ull) {
    buf[kErrOp] = op;
    buf[kErrIndex] = index;
    buf[kErrValue] = value;
    buf[kErrBound] = bound;
    buf[kErrWhat] = what;
  }
}

// Streaming multiprocessors of the current device (torch caches the properties).
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks for a grid-stride loop over n items: enough to fill the device `per_sm` times over, never 0.
inline int grid_stride_blocks(int64_t n, int threads, int per_sm = 4) {
  const int64_t need = (n + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(need, int64_t(per_sm) * sm_count())));
}

// Row kernels: one warp per row (kRowsPerWarpBlock rows per block) when a row is short, else one block per row.
constexpr int kRowsPerWarpBlock = 8;
constexpr int64_t kWarpPerRowMaxCols = 128;

struct RowLaunch {
  int64_t blocks;
  int threads;
  bool warp_per_row;
};

inline RowLaunch row_launch(int64_t rows, int64_t cols) {
  if (cols <= kWarpPerRowMaxCols) {
    return {(rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock, kWarp * kRowsPerWarpBlock, true};
  }
  return {rows, row_block_threads(cols), false};
}

// The row this thread works on and its lane within the row's threads.
template <bool kWarpPerRow>
struct RowMap {
  int64_t row;
  int tid, nthreads;
  __device__ __forceinline__ RowMap() {
    if (kWarpPerRow) {
      row = static_cast<int64_t>(blockIdx.x) * kRowsPerWarpBlock + threadIdx.x / kWarp;
      tid = threadIdx.x % kWarp;
      nthreads = kWarp;
    } else {
      row = blockIdx.x;
      tid = threadIdx.x;
      nthreads = blockDim.x;
    }
  }
};

// Sum / max over the threads of one row (every one of them gets the result). Block mode needs all of the
// block's threads; warp mode only the row's warp, so a warp past the last row may return early.
template <bool kWarpPerRow, typename T>
__device__ __forceinline__ T row_sum(T v, T* shared) {
  if (kWarpPerRow) return warp_sum(v);
  return block_sum(v, shared);
}

template <bool kWarpPerRow, typename T>
__device__ __forceinline__ T row_max(T v, T* shared) {
  if (kWarpPerRow) return warp_max(v);
  return block_max(v, shared);
}

// max that propagates NaN (fmax drops it): a NaN input must give a NaN output.
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// nan_max over a warp / a block (every thread gets the result; `shared` needs blockDim.x/32 slots).
template <typename T>
__device__ __forceinline__ T warp_nan_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T block_nan_max(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_nan_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < nwarps ? shared[lane] : -std::numeric_limits<T>::infinity();
  return warp_nan_max(v);
}

}  // namespace cuda
}  // namespace fcl_ext
