// Argument checks of the glfc_loss ops, shared by the CPU and CUDA kernels. The Python
// layer (fcl_ext/ops.py) gives friendlier messages; these guard direct torch.ops calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "fcl_ext/checks.h"

namespace fcl_ext {

// Returns C_old, the number of leading classes whose RD target comes from old_logits.
inline int64_t check_glfc_inputs(const at::Tensor& logits, const at::Tensor& labels,
                                 const std::optional<at::Tensor>& old_class_mask,
                                 const std::optional<at::Tensor>& old_logits) {
  check_floating(logits, "logits");
  check_dim(logits, 2, "logits");
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C > 0 || N == 0, "fcl_ext: logits must have at least one class (dim 1 > 0)");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "fcl_ext: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N, "fcl_ext: labels must have shape [", N,
              "] (one per logits row), got ", labels.sizes());
  check_same_device(logits, "logits", labels, "labels");
  if (old_class_mask.has_value()) {
    const auto& m = *old_class_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "fcl_ext: old_class_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == C, "fcl_ext: old_class_mask must have shape [", C,
                "] (one per class), got ", m.sizes());
    check_same_device(logits, "logits", m, "old_class_mask");
  }
  if (!old_logits.has_value()) return 0;
  const auto& q = *old_logits;
  TORCH_CHECK(q.scalar_type() == logits.scalar_type(), "fcl_ext: old_logits must have the dtype of logits (",
              logits.scalar_type(), "), got ", q.scalar_type());
  check_dim(q, 2, "old_logits");
  TORCH_CHECK(q.size(0) == N, "fcl_ext: old_logits must have ", N, " rows like logits, got ", q.size(0));
  TORCH_CHECK(q.size(1) <= C, "fcl_ext: old_logits has ", q.size(1), " classes, more than logits (", C, ")");
  check_same_device(logits, "logits", q, "old_logits");
  return q.size(1);
}

}  // namespace fcl_ext
