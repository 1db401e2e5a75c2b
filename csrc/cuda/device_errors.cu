// The per-device input-error buffer (see kernel_utils.cuh) and the op that reads and clears it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "kernel_utils.cuh"

namespace fcl_ext {
namespace cuda {
namespace {
std::mutex buffers_mutex;
std::vector<long long*> buffers;  // per device; lives as long as the process (never freed on purpose)
}  // namespace

long long* device_error_buffer(const at::Tensor& like) {
  TORCH_CHECK(like.is_cuda(), "fcl_ext: device_error_buffer needs a CUDA tensor");
  const int dev = like.get_device();
  std::lock_guard<std::mutex> lock(buffers_mutex);
  if (buffers.size() <= static_cast<size_t>(dev)) buffers.resize(dev + 1, nullptr);
  if (buffers[dev] == nullptr) {
    const c10::cuda::CUDAGuard guard(like.device());
    void* p = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&p, sizeof(long long) * kErrSlots));
    C10_CUDA_CHECK(cudaMemset(p, 0, sizeof(long long) * kErrSlots));
    C10_CUDA_CHECK(cudaDeviceSynchronize());  // once per device: the zeros are in place before any kernel
    buffers[dev] = static_cast<long long*>(p);
  }
  return buffers[dev];
}

namespace {

// Copy the buffer to the host (after the current stream's work), clear it, return it: one sync.
at::Tensor take_device_errors_cuda(const at::Tensor& like) {
  const c10::cuda::CUDAGuard guard(like.device());
  long long* buf = device_error_buffer(like);
  auto host = at::empty({kErrSlots}, at::TensorOptions().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemcpyAsync(host.data_ptr<int64_t>(), buf, sizeof(long long) * kErrSlots,
                                 cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaMemsetAsync(buf, 0, sizeof(long long) * kErrSlots, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fcl_ext, CUDA, m) { m.impl("_take_device_errors", &cuda::take_device_errors_cuda); }

}  // namespace fcl_ext
