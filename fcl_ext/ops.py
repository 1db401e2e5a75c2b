"""Functional API: validate arguments (errors name the bad one), map reductions, call
torch.ops.fcl_ext.*. Every function here has a pure-PyTorch twin of the same name and
signature in fcl_ext.reference."""
import torch

from fcl_ext._checks import check_floating, check_min_dim, check_nonneg, check_reduction, reduce

__all__ = ["softmax_entropy", "gradient_matching_loss", "lbfgs_direction"]


# ---- softmax_entropy ------------------------------------------------------------

def softmax_entropy(logits: torch.Tensor, *, reduction: str = "mean", eps: float = 0.0) -> torch.Tensor:
    """Shannon entropy of softmax(logits) over the last dim.

    eps == 0: H = -sum p log p, computed stably from log-softmax.
    eps > 0:  H = -sum p log(p + eps), the GLFC task-transition form (eps=1e-5).
    reduction: "none" -> shape logits.shape[:-1]; "mean" or "sum" over all rows.
    Differentiable in both forms (usable as an entropy-minimisation loss).
    """
    check_floating(logits, "logits")
    check_min_dim(logits, 1, "logits")
    check_reduction(reduction)
    check_nonneg(eps, "eps")
    if logits.shape[-1] == 0 and logits.numel() == 0 and logits.dim() >= 1 and logits.shape[:-1].numel() > 0:
        raise ValueError(f"logits must have at least one class (last dim > 0), got shape {tuple(logits.shape)}")
    entropy, _ = torch.ops.fcl_ext.softmax_entropy(logits, float(eps))
    return reduce(entropy, reduction)

# ---- glfc losses (issue 3) ------------------------------------------------------

# ---- fccl losses (issue 4) ------------------------------------------------------

# ---- gradient matching / lbfgs (issue 5) ---------------------------------------
from fcl_ext._checks import check_same_device  # noqa: E402

MATCHING_METRICS = ("l2", "cosine")


def gradient_matching_loss(grads: torch.Tensor, target_grads: torch.Tensor, *, metric: str = "l2") -> torch.Tensor:
    """Per-problem gradient-matching distance between rows of [K, P] tensors -> [K].

    metric "l2":     sum_p (g - g*)^2 (GLFC's proxy-server objective).
    metric "cosine": 1 - <g, g*> / (|g| |g*|) (1 with zero gradient where a norm is 0).
    Differentiable w.r.t. `grads` (twice-differentiable graphs upstream of `grads` are
    fine: the op's own backward is first order); `target_grads` gets no gradient.
    """
    check_floating(grads, "grads")
    check_floating(target_grads, "target_grads")
    if grads.dim() != 2:
        raise ValueError(f"grads must be 2-D [K, P], got shape {tuple(grads.shape)}")
    if target_grads.shape != grads.shape:
        raise ValueError(f"target_grads must have the shape of grads {tuple(grads.shape)}, "
                         f"got {tuple(target_grads.shape)}")
    if target_grads.dtype != grads.dtype:
        raise ValueError(f"target_grads must have the dtype of grads ({grads.dtype}), got {target_grads.dtype}")
    check_same_device(grads, "grads", target_grads, "target_grads")
    if metric not in MATCHING_METRICS:
        raise ValueError(f"metric must be one of {MATCHING_METRICS}, got {metric!r}")
    loss, _ = torch.ops.fcl_ext.gradient_matching_loss(grads, target_grads.detach(), metric)
    return loss


def lbfgs_direction(grad: torch.Tensor, s_hist: torch.Tensor, y_hist: torch.Tensor, rho: torch.Tensor,
                    hist_len: torch.Tensor, h_diag: torch.Tensor, *, hist_start=None) -> torch.Tensor:
    """L-BFGS two-loop recursion for K independent problems -> the descent directions [K, D].

    d_k = -H_k grad_k, computed exactly as torch.optim.LBFGS does for one problem
    (q = -g; newest -> oldest: a_i = rho_i <s_i, q>, q -= a_i y_i; r = h_diag q;
    oldest -> newest: b_i = rho_i <y_i, r>, r += (a_i - b_i) s_i).

    Layout: s_hist, y_hist [K, M, D] and rho [K, M] (rho_i = 1 / <y_i, s_i>) hold up to M
    pairs per problem; hist_len [K] (int64) says how many are valid. The i-th OLDEST pair
    of problem k (0 <= i < hist_len[k]) is in slot (hist_start[k] + i) % M: a ring buffer,
    so appending to a full history overwrites the oldest slot instead of shifting M D
    values. hist_start=None means slot i (oldest -> newest from slot 0). h_diag [K] is the
    initial inverse-Hessian scale (1 before the first accepted pair). No gradient.
    """
    check_floating(grad, "grad")
    if grad.dim() != 2:
        raise ValueError(f"grad must be 2-D [K, D], got shape {tuple(grad.shape)}")
    k, d = grad.shape
    if s_hist.dim() != 3 or s_hist.shape[0] != k or s_hist.shape[2] != d:
        raise ValueError(f"s_hist must be [K, M, D] with K={k}, D={d}, got shape {tuple(s_hist.shape)}")
    if y_hist.shape != s_hist.shape:
        raise ValueError(f"y_hist must have the shape of s_hist {tuple(s_hist.shape)}, got {tuple(y_hist.shape)}")
    m = s_hist.shape[1]
    if rho.shape != (k, m):
        raise ValueError(f"rho must be [K, M] = [{k}, {m}], got shape {tuple(rho.shape)}")
    if h_diag.shape != (k,):
        raise ValueError(f"h_diag must be [K] = [{k}], got shape {tuple(h_diag.shape)}")
    for name, t in (("s_hist", s_hist), ("y_hist", y_hist), ("rho", rho), ("h_diag", h_diag)):
        if t.dtype != grad.dtype:
            raise ValueError(f"{name} must have the dtype of grad ({grad.dtype}), got {t.dtype}")
        check_same_device(grad, "grad", t, name)
    for name, t in (("hist_len", hist_len), ("hist_start", hist_start)):
        if t is None:
            continue
        if t.dtype != torch.int64 or t.shape != (k,):
            raise ValueError(f"{name} must be an int64 tensor [K] = [{k}], got {t.dtype} {tuple(t.shape)}")
        check_same_device(grad, "grad", t, name)
    if grad.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"grad must be float32 or float64 (the history needs the precision), got {grad.dtype}")
    with torch.no_grad():
        return torch.ops.fcl_ext.lbfgs_direction(grad, s_hist, y_hist, rho, hist_len, h_diag, hist_start)
