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

# ---- gradient matching / lbfgs (issue 5) ---------------------------------------
