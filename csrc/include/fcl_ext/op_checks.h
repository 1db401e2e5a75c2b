// Argument checks of the FCCL and gradient-matching ops, shared by their CPU and CUDA
// kernels (direct torch.ops calls bypass the friendlier checks in fcl_ext/ops.py).
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>

#include "fcl_ext/checks.h"
#include "fcl_ext/glfc_checks.h"

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

// ---- saved statistics and labels of the private backward ops ---------------------------------------
// Anyone can call torch.ops.fcl_ext._*_backward directly: every tensor they read is checked here, so a
// wrong one raises (naming it) instead of reading or writing out of bounds.

// A per-row (or per-column) statistic saved by a forward: `shape`, the accumulation dtype of `like`, its device.
inline void check_saved_stats(const at::Tensor& stats, const char* name, at::IntArrayRef shape, const at::Tensor& like,
                              const char* like_name) {
  const auto acc = at::toOpMathType(like.scalar_type());
  TORCH_CHECK(stats.sizes() == shape, "fcl_ext: ", name, " must have shape ", shape, " (as the forward returned it for ",
              like_name, " of shape ", like.sizes(), "), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == acc, "fcl_ext: ", name, " must have dtype ", acc, " (the accumulation dtype of ",
              like_name, ", ", like.scalar_type(), "), got ", stats.scalar_type());
  check_same_device(like, like_name, stats, name);
}

// An upstream gradient with `numel` elements in the dtype of `like` (a kernel reads it as that type).
inline void check_upstream_grad(const at::Tensor& grad, const char* name, int64_t numel, const at::Tensor& like,
                                const char* like_name) {
  TORCH_CHECK(grad.numel() == numel, "fcl_ext: ", name, " must have ", numel, " element(s) (one per output of the "
              "forward), got shape ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == like.scalar_type(), "fcl_ext: ", name, " must have the dtype of ", like_name, " (",
              like.scalar_type(), "), got ", grad.scalar_type());
  check_same_device(like, like_name, grad, name);
}

// An upstream gradient of exactly the forward output's shape (the numel alone would let a [] stand for a [1]).
inline void check_upstream_grad_shape(const at::Tensor& grad, const char* name, at::IntArrayRef shape,
                                      const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(grad.sizes() == shape, "fcl_ext: ", name, " must have the shape of the forward's output ", shape,
              ", got shape ", grad.sizes());
  check_upstream_grad(grad, name, c10::multiply_integers(shape), like, like_name);
}

// One label inside a kernel's row loop (the CPU kernels check there, before the row is read; no extra pass).
inline void check_label_value(int64_t y, int64_t C, int64_t row) {
  TORCH_CHECK_VALUE(y >= 0 && y < C, "fcl_ext: labels[", row, "] = ", y, " is out of range [0, ", C,
                    "): labels must be class ids in [0, C) with C = ", C, " classes");
}

inline void check_softmax_entropy_backward_inputs(const at::Tensor& grad_entropy, const at::Tensor& logits,
                                                  const at::Tensor& stats, double eps) {
  check_floating(logits, "logits");
  check_dim_at_least(logits, 1, "logits");
  TORCH_CHECK(eps >= 0, "fcl_ext: eps must be >= 0, got ", eps);
  const int64_t C = logits.size(-1);
  const int64_t rows = C == 0 ? 0 : logits.numel() / C;
  const auto batch_shape = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(C > 0 || c10::multiply_integers(batch_shape) == 0, "fcl_ext: logits must have at least one class "
              "(last dim > 0), got shape ", logits.sizes());
  check_upstream_grad_shape(grad_entropy, "grad_entropy", batch_shape, logits, "logits");
  check_saved_stats(stats, "stats", {rows, 3}, logits, "logits");
}

// Number of per-row statistics dual_distillation_loss saves: max(s), log sum exp(s - max), log sum
// exp((s - max) / T), and for each teacher max(t) / T and log sum exp((t - max) / T). Maxima and log-sums
// are kept apart so the backward rebuilds x - max exactly, whatever |x|.
constexpr int64_t kDualDistillationStats = 7;

inline void check_dual_distillation_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                    const at::Tensor& labels, const std::optional<at::Tensor>& intra,
                                                    const std::optional<at::Tensor>& inter, const at::Tensor& stats,
                                                    double temperature) {
  check_dual_distillation_inputs(logits, labels, intra, inter, temperature);
  check_upstream_grad(grad_loss, "grad_loss", 1, logits, "logits");
  check_saved_stats(stats, "stats", {logits.size(0), kDualDistillationStats}, logits, "logits");
}

inline void check_gradient_matching_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& grads,
                                                    const at::Tensor& target, const at::Tensor& stats) {
  check_gradient_matching_inputs(grads, target);
  check_upstream_grad_shape(grad_loss, "grad_loss", {grads.size(0)}, grads, "grads");
  check_saved_stats(stats, "stats", {grads.size(0), 3}, grads, "grads");
}

// from_loss: `grad` is dL/dloss (one element) and `matrix` the saved M [Ka, Kb]; else `grad` is dL/dM [Ka, Kb]
// in the dtype of a and `matrix` is not read.
inline void check_cross_correlation_backward_inputs(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                                    const at::Tensor& stats_a, const at::Tensor& stats_b,
                                                    const at::Tensor& matrix, bool from_loss) {
  check_cross_correlation_inputs(a, b, 0.0, /*same_shape=*/from_loss);
  const int64_t Ka = a.size(1), Kb = b.size(1);
  check_saved_stats(stats_a, "stats_a", {2, Ka}, a, "a");
  check_saved_stats(stats_b, "stats_b", {2, Kb}, b, "b");
  if (from_loss) {
    check_upstream_grad(grad, "grad", 1, a, "a");
    check_saved_stats(matrix, "matrix", {Ka, Kb}, a, "a");
  } else {
    TORCH_CHECK(grad.sizes() == at::IntArrayRef({Ka, Kb}), "fcl_ext: grad must have the shape of the matrix [", Ka,
                ", ", Kb, "], got ", grad.sizes());
    check_upstream_grad(grad, "grad", Ka * Kb, a, "a");
  }
}

inline void check_glfc_backward_inputs(const at::Tensor& grad_per_sample, const at::Tensor& logits,
                                       const at::Tensor& weights) {
  const int64_t N = logits.size(0);
  TORCH_CHECK(at::isFloatingType(grad_per_sample.scalar_type()), "fcl_ext: grad_per_sample_loss must be a "
              "floating-point tensor, got ", grad_per_sample.scalar_type());
  TORCH_CHECK(grad_per_sample.sizes() == at::IntArrayRef({N}), "fcl_ext: grad_per_sample_loss must have shape [",
              N, "] (one per row of logits), got shape ", grad_per_sample.sizes());
  check_same_device(logits, "logits", grad_per_sample, "grad_per_sample_loss");
  check_saved_stats(weights, "weights", {N}, logits, "logits");
}

// lbfgs_direction's shapes, dtypes and devices (the values of hist_len / hist_start are checked where they are
// read: on the CPU by the kernel's host loop).
inline void check_lbfgs_inputs(const at::Tensor& grad, const at::Tensor& s_hist, const at::Tensor& y_hist,
                               const at::Tensor& rho, const at::Tensor& hist_len, const at::Tensor& h_diag,
                               const std::optional<at::Tensor>& hist_start) {
  check_floating(grad, "grad");
  check_dim(grad, 2, "grad");
  check_dim(s_hist, 3, "s_hist");
  const int64_t K = grad.size(0), D = grad.size(1), M = s_hist.size(1);
  TORCH_CHECK(s_hist.size(0) == K && s_hist.size(2) == D, "fcl_ext: s_hist must be [K, M, D] = [", K, ", M, ", D,
              "], got ", s_hist.sizes());
  TORCH_CHECK(y_hist.sizes() == s_hist.sizes(), "fcl_ext: y_hist must have the shape of s_hist ", s_hist.sizes(),
              ", got ", y_hist.sizes());
  TORCH_CHECK(rho.dim() == 2 && rho.size(0) == K && rho.size(1) == M, "fcl_ext: rho must be [K, M] = [", K, ", ",
              M, "], got ", rho.sizes());
  TORCH_CHECK(hist_len.dim() == 1 && hist_len.size(0) == K && hist_len.scalar_type() == at::kLong,
              "fcl_ext: hist_len must be an int64 tensor [K] = [", K, "], got ", hist_len.scalar_type(), " ",
              hist_len.sizes());
  TORCH_CHECK(h_diag.dim() == 1 && h_diag.size(0) == K, "fcl_ext: h_diag must be [K] = [", K, "], got ",
              h_diag.sizes());
  const std::pair<const at::Tensor*, const char*> history[] = {
      {&s_hist, "s_hist"}, {&y_hist, "y_hist"}, {&rho, "rho"}, {&h_diag, "h_diag"}};
  for (const auto& [t, name] : history) {
    TORCH_CHECK(t->scalar_type() == grad.scalar_type(), "fcl_ext: ", name, " must have the dtype of grad (",
                grad.scalar_type(), "), got ", t->scalar_type());
    check_same_device(grad, "grad", *t, name);
  }
  check_same_device(grad, "grad", hist_len, "hist_len");
  if (hist_start.has_value()) {
    const auto& hs = *hist_start;
    TORCH_CHECK(hs.dim() == 1 && hs.size(0) == K && hs.scalar_type() == at::kLong,
                "fcl_ext: hist_start must be an int64 tensor [K] = [", K, "], got ", hs.scalar_type(), " ", hs.sizes());
    check_same_device(grad, "grad", hs, "hist_start");
  }
}

}  // namespace fcl_ext
