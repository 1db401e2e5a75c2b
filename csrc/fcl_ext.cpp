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

  // ---- gradient matching / lbfgs (issue 5) -------------------------------------
}
