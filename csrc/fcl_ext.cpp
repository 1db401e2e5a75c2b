// The one place every fcl_ext operator schema lives. Kernel files (csrc/cpu/*.cpp,
// csrc/cuda/*.cu) register their implementations with TORCH_LIBRARY_IMPL; fake
// (meta) kernels and autograd are registered from Python (fcl_ext/_registrations.py).
//
// The module has no Python bindings of its own: importing fcl_ext._C only loads the
// shared library so that the static registrations below run.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fcl_ext operator library (registers torch.ops.fcl_ext.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fcl_ext, m) {
  // ---- softmax_entropy ----------------------------------------------------------
  // Per-row Shannon entropy of softmax(logits) over the last dim. `stats` [rows, 3] holds,
  // per row and in the accumulation dtype, (max, log-sum-exp of x - max, abar) so that the
  // backward is one elementwise pass: dH/dx_j = p_j * (a_j - abar), a_j = -(log(p_j+eps) + p_j/(p_j+eps)).
  m.def("softmax_entropy(Tensor logits, float eps) -> (Tensor entropy, Tensor stats)");
  m.def("_softmax_entropy_backward(Tensor grad_entropy, Tensor logits, Tensor stats, float eps) -> Tensor");

  // ---- glfc losses (issue 3) -----------------------------------------------------
  // GLFC's local objective (specs/glfc.md 1.2-1.3), one fused op for L_GC, L_RD and their mix.
  // logits [N, C], labels int64 [N], old_class_mask bool [C] (None: no old classes, w = 1),
  // old_logits [N, C_old <= C] (None: C_old = 0, the RD target is the one-hot).
  // per_sample_loss [N] = (gc_weight * w_i * gc_i + rd_weight * rd_i) / C, where gc_i and rd_i are
  // the BCE row sums against onehot(y) and [sigmoid(q) || onehot(y)[C_old:]].
  // weights [N] (accumulation dtype) = w_i, the gradient-compensation weights (no gradient).
  // row_stats [N, 2] (accumulation dtype) = (gc_i / C, rd_i / C), unweighted, for logging.
  // The backward needs only the weights: dL/do_ic = g_i [gc_weight w_i (p - t) + rd_weight (p - t')] / C.
  m.def("glfc_loss(Tensor logits, Tensor labels, Tensor? old_class_mask, Tensor? old_logits, float gc_weight, "
        "float rd_weight) -> (Tensor per_sample_loss, Tensor weights, Tensor row_stats)");
  m.def("_glfc_loss_backward(Tensor grad_per_sample_loss, Tensor logits, Tensor labels, Tensor? old_logits, "
        "Tensor weights, float gc_weight, float rd_weight) -> Tensor");

  // ---- fccl losses (issue 4) -----------------------------------------------------
  // Cross-correlation of per-column batch-standardised a [B, Ka] and b [B, Kb] (B >= 2):
  // a_hat = (a - mean) * inv_std, inv_std = 1 / sqrt(var + eps), var unbiased (/(B-1)) or biased (/B);
  // M = a_hat^T b_hat / B. stats_* [2, K] hold (mean, inv_std) in the accumulation dtype. With eps == 0
  // a zero-variance column is an error (never silent NaN).
  m.def("cross_correlation_matrix(Tensor a, Tensor b, bool unbiased, float eps) -> "
        "(Tensor matrix, Tensor stats_a, Tensor stats_b)");
  // L = sum_u (M_uu - 1)^2 + off_diag_weight * sum_{u != v} (M_uv - off_diag_target)^2 (a, b same shape).
  // `matrix` is M in the accumulation dtype when keep_matrix (saved for the backward), else empty.
  m.def("cross_correlation_loss(Tensor a, Tensor b, float off_diag_weight, float off_diag_target, bool unbiased, "
        "float eps, bool keep_matrix) -> (Tensor loss, Tensor matrix, Tensor stats_a, Tensor stats_b)");
  // Shared backward. from_loss: `grad` is dL/dloss (0-dim) and `matrix` the saved M; else `grad` is dL/dM.
  // Gradients not asked for (need_a / need_b false) come back as empty tensors.
  m.def("_cross_correlation_backward(Tensor grad, Tensor a, Tensor b, Tensor stats_a, Tensor stats_b, "
        "Tensor matrix, bool unbiased, float off_diag_weight, float off_diag_target, bool from_loss, bool need_a, "
        "bool need_b) -> (Tensor grad_a, Tensor grad_b)");
  // FCCL local objective: ce_weight * CE(s, y) + sum over the given teachers of
  // weight * KL_batchmean(softmax(t / T) || softmax(s / T)); the weights already carry any T^2 factor.
  // stats [N, 7] per row (accumulation dtype): max s, log sum exp(s - max s), log sum exp((s - max s)/T), then for
  // t_intra and t_inter: max t, log sum exp((t - max t)/T) (0, 0 for an absent teacher). Maxima and log-sums stay
  // apart so large logits lose no digits; max s is NaN for a row whose loss is NaN.
  m.def("dual_distillation_loss(Tensor logits, Tensor labels, Tensor? intra_logits, Tensor? inter_logits, "
        "float temperature, float ce_weight, float intra_weight, float inter_weight) -> (Tensor loss, Tensor stats)");
  m.def("_dual_distillation_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor? intra_logits, "
        "Tensor? inter_logits, Tensor stats, float temperature, float ce_weight, float intra_weight, "
        "float inter_weight) -> Tensor");

  // ---- gradient matching / lbfgs (issue 5) -------------------------------------
  // Per-problem gradient matching D(g_k, t_k) over rows of [K, P]: "l2" = sum (g - t)^2,
  // "cosine" = 1 - <g, t> / (|g| |t|). `stats` [K, 3] (accumulation dtype) holds
  // (<g,t>, |g|^2, |t|^2) for the cosine backward. No gradient flows to target_grads.
  m.def("gradient_matching_loss(Tensor grads, Tensor target_grads, str metric) -> (Tensor loss, Tensor stats)");
  m.def("_gradient_matching_loss_backward(Tensor grad_loss, Tensor grads, Tensor target_grads, Tensor stats, str metric) -> Tensor");
  // L-BFGS two-loop recursion for K independent problems: d_k = -H_k grad_k. Problem k's
  // history is s_hist/y_hist [K, M, D], rho [K, M]; its i-th oldest pair (i < hist_len[k])
  // sits in slot (hist_start[k] + i) % M (hist_start None: slot i). Not differentiable.
  m.def("lbfgs_direction(Tensor grad, Tensor s_hist, Tensor y_hist, Tensor rho, Tensor hist_len, Tensor h_diag, Tensor? hist_start=None) -> Tensor");

  // ---- device-side input errors (csrc/cuda/kernel_utils.cuh) -------------------------
  // CUDA kernels record invalid inputs (labels out of range, ...) in a per-device buffer instead of
  // syncing; this reads device_like's buffer (one sync), clears it and returns it as int64 [8] on the CPU:
  // (code, op, index, value, bound, what, count, 0). fcl_ext.check_device_errors() turns it into an error.
  // On the CPU nothing is recorded (the CPU kernels raise at once): all zeros.
  m.def("_take_device_errors(Tensor device_like) -> Tensor");
}

TORCH_LIBRARY_IMPL(fcl_ext, CPU, m) {
  m.impl("_take_device_errors", [](const at::Tensor&) { return at::zeros({8}, at::kLong); });
}
