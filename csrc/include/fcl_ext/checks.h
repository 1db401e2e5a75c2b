// Argument checks shared by the CPU and CUDA kernels. The Python layer (fcl_ext/ops.py)
// validates user input with friendlier messages; these guard direct torch.ops calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fcl_ext {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fcl_ext: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "fcl_ext: ", na, " is on ", a.device(), " but ", nb,
              " is on ", b.device());
}

inline void check_dim_at_least(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() >= dim, "fcl_ext: ", name, " must have at least ", dim,
              " dimension(s), got shape ", t.sizes());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "fcl_ext: ", name, " must have ", dim, " dimension(s), got shape ",
              t.sizes());
}

}  // namespace fcl_ext
