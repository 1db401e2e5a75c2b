"""Functional API: validate arguments (errors name the bad one), map reductions, call
torch.ops.fcl_ext.*. Every function here has a pure-PyTorch twin of the same name and
signature in fcl_ext.reference."""
import torch

from fcl_ext._checks import (check_floating, check_min_dim, check_nonneg, check_reduction, check_same_device,
                             check_tensor, reduce)

__all__ = ["softmax_entropy", "cross_correlation_matrix", "cross_correlation_loss", "dual_distillation_loss"]


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

def _check_pair(a, b) -> None:
    check_floating(a, "a")
    check_floating(b, "b")
    for x, name in ((a, "a"), (b, "b")):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, features], got shape {tuple(x.shape)}")
    check_same_device(a, "a", b, "b")
    if a.dtype != b.dtype:
        raise ValueError(f"b must have the dtype of a ({a.dtype}), got {b.dtype}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same batch size, got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError(f"a must have a batch of at least 2 rows to standardise its columns, got shape "
                         f"{tuple(a.shape)}")


def cross_correlation_matrix(a: torch.Tensor, b: torch.Tensor, *, unbiased: bool = True,
                             eps: float = 0.0) -> torch.Tensor:
    """M = a_hat^T b_hat / B, a_hat = (a - mean_B a) / sqrt(var_B a + eps), b_hat likewise.

    a [B, Ka], b [B, Kb], B >= 2; var is unbiased (/(B-1)) or biased (/B). Returns [Ka, Kb].
    With eps == 0 a column that is constant over the batch raises (it would give NaN).
    Differentiable in a and b (each only when it requires grad).
    """
    _check_pair(a, b)
    check_nonneg(eps, "eps")
    matrix, _, _ = torch.ops.fcl_ext.cross_correlation_matrix(a, b, bool(unbiased), float(eps))
    return matrix


def cross_correlation_loss(a: torch.Tensor, b: torch.Tensor, *, off_diag_weight: float = 0.0051,
                           off_diag_target: float = -1.0, unbiased: bool = True, eps: float = 0.0) -> torch.Tensor:
    """sum_u (M_uu - 1)^2 + off_diag_weight * sum_{u != v} (M_uv - off_diag_target)^2, M as in
    cross_correlation_matrix (a and b of the same shape [B, K]).

    Defaults are FCCL's collaborative loss (unbiased std, no eps, off-diagonals pushed to -1; detach b
    for its target). Barlow Twins: off_diag_target=0, unbiased=False, eps=1e-5.
    """
    _check_pair(a, b)
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    check_nonneg(eps, "eps")
    check_nonneg(off_diag_weight, "off_diag_weight")
    keep_matrix = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    loss, _, _, _ = torch.ops.fcl_ext.cross_correlation_loss(a, b, float(off_diag_weight), float(off_diag_target),
                                                             bool(unbiased), float(eps), keep_matrix)
    return loss


def dual_distillation_loss(logits: torch.Tensor, labels: torch.Tensor, intra_logits=None, inter_logits=None, *,
                           temperature: float = 1.0, ce_weight: float = 1.0, intra_weight: float = 1.0,
                           inter_weight: float = 1.0, temperature_squared: bool = False) -> torch.Tensor:
    """ce_weight CE(s, y) + intra_weight KL(softmax(t_intra/T) || softmax(s/T))
    + inter_weight KL(softmax(t_inter/T) || softmax(s/T)), KL batchmean, mean CE.

    Either teacher may be None (its term is dropped); teachers get no gradient.
    temperature_squared=True multiplies the KL terms by T^2 (Hinton's scaling); FCCL uses T=1 without it.
    """
    check_floating(logits, "logits")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty 2-D [N, C] tensor, got shape {tuple(logits.shape)}")
    check_tensor(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    check_same_device(logits, "logits", labels, "labels")
    for teacher, name in ((intra_logits, "intra_logits"), (inter_logits, "inter_logits")):
        if teacher is None:
            continue
        check_floating(teacher, name)
        if teacher.shape != logits.shape:
            raise ValueError(f"{name} must have the shape of logits {tuple(logits.shape)}, got {tuple(teacher.shape)}")
        check_same_device(logits, "logits", teacher, name)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for value, name in ((ce_weight, "ce_weight"), (intra_weight, "intra_weight"), (inter_weight, "inter_weight")):
        check_nonneg(value, name)
    scale = float(temperature) ** 2 if temperature_squared else 1.0
    teachers = [None if t is None else t.detach().to(logits.dtype) for t in (intra_logits, inter_logits)]
    loss, _ = torch.ops.fcl_ext.dual_distillation_loss(logits, labels.long(), teachers[0], teachers[1],
                                                       float(temperature), float(ce_weight),
                                                       float(intra_weight) * scale, float(inter_weight) * scale)
    return loss

# ---- gradient matching / lbfgs (issue 5) ---------------------------------------
