// The one place every fcl_ext operator schema lives. Kernel files (csrc/cpu/*.cpp,
// csrc/cuda/*.cu) register their implementations with TORCH_LIBRARY_IMPL; fake
// (meta) kernels and autograd are registered from Python (fcl_ext/_registrations.py).
//
// The module has no Python bindings of its own: importing fcl_ext._C only loads the
// shared library so that the static registrations below run.
#include <Python.h>
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

  // ---- fccl losses (issue 4) -----------------------------------------------------

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
}
