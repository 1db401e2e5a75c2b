"""Fake (shape) kernels and autograd formulas for every fcl_ext op.

Forward ops save small per-row statistics; each backward is its own private op
(`_<op>_backward`), which raises on double backward.
"""
import torch
from torch.library import register_autograd, register_fake

from fcl_ext._build_info import BUILD_INFO

_OPMATH = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return _OPMATH.get(dtype, dtype)


def _no_double_backward(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"fcl_ext: double backward through {name} is not supported")
    return backward


# Every private backward op refuses to be differentiated again.
_BACKWARD_OPS = []


def _register_backward_op(qualname: str):
    _BACKWARD_OPS.append(qualname)
    register_autograd(qualname, _no_double_backward(qualname))


# A CPU-only build has no CUDA kernels: say so instead of the dispatcher's generic error.
_ALL_OPS = []
_CUDA_GUARDS = {}  # qualname -> the CUDA stub registered in a CPU-only build (tests call it)


def _guard_cuda(qualname: str):
    _ALL_OPS.append(qualname)
    if BUILD_INFO["cuda_kernels"]:
        return

    def no_cuda(*args, **kwargs):
        raise RuntimeError(
            f"fcl_ext: {qualname} got a CUDA tensor, but this build has no CUDA kernels "
            f"({BUILD_INFO['cuda_reason']}). Rebuild with a CUDA torch and nvcc "
            "(FCL_EXT_CUDA=1 pip install --no-build-isolation -e .).")

    _CUDA_GUARDS[qualname] = no_cuda
    torch.library.impl(qualname, "CUDA")(no_cuda)


# ---- softmax_entropy ------------------------------------------------------------

@register_fake("fcl_ext::softmax_entropy")
def _softmax_entropy_fake(logits, eps):
    rows = logits.numel() // logits.shape[-1] if logits.shape[-1] != 0 else 0
    entropy = logits.new_empty(logits.shape[:-1])
    stats = logits.new_empty((rows, 3), dtype=opmath_dtype(logits.dtype))
    return entropy, stats


@register_fake("fcl_ext::_softmax_entropy_backward")
def _softmax_entropy_backward_fake(grad_entropy, logits, stats, eps):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _softmax_entropy_setup(ctx, inputs, output):
    logits, eps = inputs
    _, stats = output
    ctx.save_for_backward(logits, stats)
    ctx.eps = eps


def _softmax_entropy_backward(ctx, grad_entropy, grad_stats):
    logits, stats = ctx.saved_tensors
    grad = torch.ops.fcl_ext._softmax_entropy_backward(grad_entropy, logits, stats, ctx.eps)
    return grad, None


register_autograd("fcl_ext::softmax_entropy", _softmax_entropy_backward, setup_context=_softmax_entropy_setup)
_register_backward_op("fcl_ext::_softmax_entropy_backward")
for _op in ("fcl_ext::softmax_entropy", "fcl_ext::_softmax_entropy_backward"):
    _guard_cuda(_op)

# ---- glfc losses (issue 3) ------------------------------------------------------

@register_fake("fcl_ext::glfc_loss")
def _glfc_loss_fake(logits, labels, old_class_mask, old_logits, gc_weight, rd_weight):
    n = logits.shape[0]
    opmath = opmath_dtype(logits.dtype)
    return logits.new_empty((n,)), logits.new_empty((n,), dtype=opmath), logits.new_empty((n, 2), dtype=opmath)


@register_fake("fcl_ext::_glfc_loss_backward")
def _glfc_loss_backward_fake(grad_per_sample_loss, logits, labels, old_logits, weights, gc_weight, rd_weight):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _glfc_loss_setup(ctx, inputs, output):
    logits, labels, _, old_logits, gc_weight, rd_weight = inputs
    _, weights, row_stats = output
    ctx.mark_non_differentiable(weights, row_stats)
    # Only the weights are saved: the backward recomputes both sigmoids from the inputs.
    ctx.save_for_backward(logits, labels, old_logits, weights)
    ctx.gc_weight, ctx.rd_weight = gc_weight, rd_weight


def _glfc_loss_backward(ctx, grad_per_sample_loss, grad_weights, grad_row_stats):
    logits, labels, old_logits, weights = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.fcl_ext._glfc_loss_backward(grad_per_sample_loss, logits, labels, old_logits, weights,
                                                     ctx.gc_weight, ctx.rd_weight)
    # No gradient to labels, the mask, or old_logits (the teacher is fixed), nor to the floats.
    return grad, None, None, None, None, None


register_autograd("fcl_ext::glfc_loss", _glfc_loss_backward, setup_context=_glfc_loss_setup)
_register_backward_op("fcl_ext::_glfc_loss_backward")
for _op in ("fcl_ext::glfc_loss", "fcl_ext::_glfc_loss_backward"):
    _guard_cuda(_op)

# ---- fccl losses (issue 4) ------------------------------------------------------

@register_fake("fcl_ext::cross_correlation_matrix")
def _cross_correlation_matrix_fake(a, b, unbiased, eps):
    acc = opmath_dtype(a.dtype)
    return (a.new_empty((a.shape[1], b.shape[1])), a.new_empty((2, a.shape[1]), dtype=acc),
            b.new_empty((2, b.shape[1]), dtype=acc))


@register_fake("fcl_ext::cross_correlation_loss")
def _cross_correlation_loss_fake(a, b, off_diag_weight, off_diag_target, unbiased, eps, keep_matrix):
    acc = opmath_dtype(a.dtype)
    matrix = a.new_empty((a.shape[1], b.shape[1]) if keep_matrix else (0,), dtype=acc)
    return (a.new_empty(()), matrix, a.new_empty((2, a.shape[1]), dtype=acc),
            b.new_empty((2, b.shape[1]), dtype=acc))


@register_fake("fcl_ext::_cross_correlation_backward")
def _cross_correlation_backward_fake(grad, a, b, stats_a, stats_b, matrix, unbiased, off_diag_weight,
                                     off_diag_target, from_loss, need_a, need_b):
    grad_a = torch.empty_like(a, memory_format=torch.contiguous_format) if need_a else a.new_empty((0,))
    grad_b = torch.empty_like(b, memory_format=torch.contiguous_format) if need_b else b.new_empty((0,))
    return grad_a, grad_b


def _cross_correlation_matrix_setup(ctx, inputs, output):
    a, b, unbiased, eps = inputs
    _, stats_a, stats_b = output
    ctx.save_for_backward(a, b, stats_a, stats_b)
    ctx.unbiased = unbiased


def _cross_correlation_matrix_backward(ctx, grad_matrix, grad_stats_a, grad_stats_b):
    a, b, stats_a, stats_b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_a, grad_b = torch.ops.fcl_ext._cross_correlation_backward(
        grad_matrix, a, b, stats_a, stats_b, stats_a.new_empty((0,)), ctx.unbiased, 0.0, 0.0, False, need_a, need_b)
    return (grad_a if need_a else None), (grad_b if need_b else None), None, None


def _cross_correlation_loss_setup(ctx, inputs, output):
    a, b, off_diag_weight, off_diag_target, unbiased, eps, keep_matrix = inputs
    _, matrix, stats_a, stats_b = output
    ctx.save_for_backward(a, b, stats_a, stats_b, matrix)
    ctx.args = (unbiased, off_diag_weight, off_diag_target)
    ctx.keep_matrix = keep_matrix


def _cross_correlation_loss_backward(ctx, grad_loss, grad_matrix, grad_stats_a, grad_stats_b):
    a, b, stats_a, stats_b, matrix = ctx.saved_tensors
    if not ctx.keep_matrix:
        raise RuntimeError("fcl_ext: cross_correlation_loss was called with keep_matrix=False, so it cannot be "
                           "differentiated; call it through fcl_ext.ops.cross_correlation_loss")
    unbiased, off_diag_weight, off_diag_target = ctx.args
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_a, grad_b = torch.ops.fcl_ext._cross_correlation_backward(
        grad_loss, a, b, stats_a, stats_b, matrix, unbiased, off_diag_weight, off_diag_target, True, need_a, need_b)
    return (grad_a if need_a else None), (grad_b if need_b else None), None, None, None, None, None


register_autograd("fcl_ext::cross_correlation_matrix", _cross_correlation_matrix_backward,
                  setup_context=_cross_correlation_matrix_setup)
register_autograd("fcl_ext::cross_correlation_loss", _cross_correlation_loss_backward,
                  setup_context=_cross_correlation_loss_setup)
_register_backward_op("fcl_ext::_cross_correlation_backward")


@register_fake("fcl_ext::dual_distillation_loss")
def _dual_distillation_loss_fake(logits, labels, intra_logits, inter_logits, temperature, ce_weight, intra_weight,
                                 inter_weight):
    return logits.new_empty(()), logits.new_empty((logits.shape[0], 7), dtype=opmath_dtype(logits.dtype))


@register_fake("fcl_ext::_dual_distillation_backward")
def _dual_distillation_backward_fake(grad_loss, logits, labels, intra_logits, inter_logits, stats, temperature,
                                     ce_weight, intra_weight, inter_weight):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _dual_distillation_setup(ctx, inputs, output):
    logits, labels, intra_logits, inter_logits = inputs[:4]
    _, stats = output
    ctx.save_for_backward(logits, labels, intra_logits, inter_logits, stats)
    ctx.args = inputs[4:]


def _dual_distillation_backward(ctx, grad_loss, grad_stats):
    logits, labels, intra_logits, inter_logits, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.fcl_ext._dual_distillation_backward(grad_loss, logits, labels, intra_logits, inter_logits,
                                                             stats, *ctx.args)
    # Teachers get no gradient (they are targets), labels are integers.
    return grad, None, None, None, None, None, None, None


register_autograd("fcl_ext::dual_distillation_loss", _dual_distillation_backward,
                  setup_context=_dual_distillation_setup)
_register_backward_op("fcl_ext::_dual_distillation_backward")
for _op in ("fcl_ext::cross_correlation_matrix", "fcl_ext::cross_correlation_loss",
            "fcl_ext::_cross_correlation_backward", "fcl_ext::dual_distillation_loss",
            "fcl_ext::_dual_distillation_backward"):
    _guard_cuda(_op)

# ---- gradient matching / lbfgs (issue 5) ---------------------------------------

@register_fake("fcl_ext::gradient_matching_loss")
def _gradient_matching_loss_fake(grads, target_grads, metric):
    loss = grads.new_empty((grads.shape[0],))
    stats = grads.new_empty((grads.shape[0], 3), dtype=opmath_dtype(grads.dtype))
    return loss, stats


@register_fake("fcl_ext::_gradient_matching_loss_backward")
def _gradient_matching_loss_backward_fake(grad_loss, grads, target_grads, stats, metric):
    return torch.empty_like(grads, memory_format=torch.contiguous_format)


def _gradient_matching_loss_setup(ctx, inputs, output):
    grads, target_grads, metric = inputs
    _, stats = output
    ctx.save_for_backward(grads, target_grads, stats)
    ctx.metric = metric


def _gradient_matching_loss_backward(ctx, grad_loss, grad_stats):
    grads, target_grads, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.fcl_ext._gradient_matching_loss_backward(grad_loss, grads, target_grads, stats, ctx.metric)
    # The target is data (what a client uploaded): no gradient flows to it.
    return grad, None, None


register_autograd("fcl_ext::gradient_matching_loss", _gradient_matching_loss_backward,
                  setup_context=_gradient_matching_loss_setup)
_register_backward_op("fcl_ext::_gradient_matching_loss_backward")


@register_fake("fcl_ext::lbfgs_direction")
def _lbfgs_direction_fake(grad, s_hist, y_hist, rho, hist_len, h_diag, hist_start=None):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


for _op in ("fcl_ext::gradient_matching_loss", "fcl_ext::_gradient_matching_loss_backward",
            "fcl_ext::lbfgs_direction"):
    _guard_cuda(_op)
