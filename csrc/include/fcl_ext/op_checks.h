// Argument checks of the FCCL and gradient-matching ops, shared by their CPU and CUDA
// kernels (direct torch.ops calls bypass the friendlier checks in fcl_ext/ops.py).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>

#include "fcl_ext/checks.h"

namespace fcl_ext {

inline void check_cross_correlation_inputs(const at::Tensor& a, const at::Tensor& b, double eps, bool same_shape) {
  check_floating(a, "a");
  check_floating(b, "b");
  check_dim(a, 2, "a");
  check_dim(b, 2, "b");
  check_same_device(a, "a", b, "b");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fcl_ext: a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0), "fcl_ext: a and b must have the same batch size, got ", a.size(0), " and ",
              b.size(0));
  TORCH_CHECK(a.size(0) >= 2, "fcl_ext: cross_correlation needs a batch of at least 2 rows, got ", a.size(0));
  TORCH_CHECK(!same_shape || a.sizes() == b.sizes(), "fcl_ext: a and b must have the same shape, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(eps >= 0, "fcl_ext: eps must be >= 0, got ", eps);
}

inline void check_dual_distillation_inputs(const at::Tensor& logits, const at::Tensor& labels,
                                           const std::optional<at::Tensor>& intra,
                                           const std::optional<at::Tensor>& inter, double temperature) {
  check_floating(logits, "logits");
  check_dim(logits, 2, "logits");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "fcl_ext: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "fcl_ext: labels must have shape [",
              logits.size(0), "], got ", labels.sizes());
  check_same_device(logits, "logits", labels, "labels");
  TORCH_CHECK(logits.size(0) > 0 && logits.size(1) > 0, "fcl_ext: logits must be non-empty, got shape ",
              logits.sizes());
  TORCH_CHECK(temperature > 0, "fcl_ext: temperature must be > 0, got ", temperature);
  for (const auto* t : {&intra, &inter}) {
    if (!t->has_value()) continue;
    const auto& tt = t->value();
    TORCH_CHECK(tt.sizes() == logits.sizes(), "fcl_ext: teacher logits must have the shape of logits ",
                logits.sizes(), ", got ", tt.sizes());
    TORCH_CHECK(tt.scalar_type() == logits.scalar_type(), "fcl_ext: teacher logits must have dtype ",
                logits.scalar_type(), ", got ", tt.scalar_type());
    check_same_device(logits, "logits", tt, "teacher logits");
  }
}

inline void check_gradient_matching_inputs(const at::Tensor& grads, const at::Tensor& target) {
  check_floating(grads, "grads");
  check_dim(grads, 2, "grads");
  check_same_device(grads, "grads", target, "target_grads");
  TORCH_CHECK(target.sizes() == grads.sizes(), "fcl_ext: target_grads must have the shape of grads ",
              grads.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == grads.scalar_type(), "fcl_ext: target_grads must have the dtype of grads (",
              grads.scalar_type(), "), got ", target.scalar_type());
}

// gradient_matching_loss's metric: "l2" -> false, "cosine" -> true, anything else is an error.
inline bool is_cosine_metric(std::string_view metric) {
  if (metric == "l2") return false;
  if (metric == "cosine") return true;
  TORCH_CHECK(false, "fcl_ext: metric must be 'l2' or 'cosine', got '", std::string(metric), "'");
  return false;
}

}  // namespace fcl_ext
