"""Functional API: validate arguments (errors name the bad one), map reductions, call
torch.ops.fcl_ext.*. Every function here has a pure-PyTorch twin of the same name and
signature in fcl_ext.reference."""
import torch

from fcl_ext._checks import (check_floating, check_min_dim, check_nonneg, check_reduction, check_same_device,
                             check_tensor, reduce)

__all__ = ["softmax_entropy", "gradient_compensated_bce", "relation_distillation_bce", "glfc_loss"]


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
# GLFC's local objective (specs/glfc.md 1.2-1.3). One fused op computes both BCE row sums
# and the gradient-compensation weights; the three functions pick its gc/rd weights.

def _check_values_in_range(values: torch.Tensor, upper: int, name: str) -> None:
    # Data-dependent (one host sync on CUDA), so skipped while torch.compile traces; the CPU
    # kernel checks labels again and the CUDA kernel asserts.
    if values.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(values)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must be class ids in [0, {upper}), got values in [{lo}, {hi}]")


def _is_integer(x: torch.Tensor) -> bool:
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def _glfc_check_logits_labels(logits, labels):
    check_floating(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [N, C], got shape {tuple(logits.shape)}")
    n, c = logits.shape
    if c == 0:
        raise ValueError(f"logits must have at least one class (C > 0), got shape {tuple(logits.shape)}")
    check_tensor(labels, "labels")
    if not _is_integer(labels):
        raise ValueError(f"labels must be an integer tensor of class ids, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape [N] = [{n}] (one per logits row), got shape {tuple(labels.shape)}")
    check_same_device(logits, "logits", labels, "labels")
    _check_values_in_range(labels, c, "labels")
    return labels.long()


def _glfc_old_class_mask(old_class_mask, logits):
    """A bool [C] mask on logits' device, or None (no old classes)."""
    if old_class_mask is None:
        return None
    check_tensor(old_class_mask, "old_class_mask")
    c = logits.shape[1]
    if old_class_mask.dtype == torch.bool:
        if old_class_mask.shape != (c,):
            raise ValueError(f"old_class_mask (bool) must have shape [C] = [{c}], got shape "
                             f"{tuple(old_class_mask.shape)}")
        mask = old_class_mask
    elif _is_integer(old_class_mask):
        if old_class_mask.dim() != 1:
            raise ValueError(f"old_class_mask (class ids) must be 1-D, got shape {tuple(old_class_mask.shape)}")
        _check_values_in_range(old_class_mask, c, "old_class_mask")
        mask = torch.zeros(c, dtype=torch.bool, device=old_class_mask.device)
        mask[old_class_mask.long()] = True
    else:
        raise ValueError("old_class_mask must be a bool mask [C] or a 1-D integer tensor of class ids, got dtype "
                         f"{old_class_mask.dtype}")
    return mask.to(logits.device)


def _glfc_old_logits(old_logits, logits):
    if old_logits is None:
        return None
    check_floating(old_logits, "old_logits")
    n, c = logits.shape
    if old_logits.dim() != 2:
        raise ValueError(f"old_logits must have shape [N, C_old], got shape {tuple(old_logits.shape)}")
    if old_logits.shape[0] != n:
        raise ValueError(f"old_logits must have N = {n} rows like logits, got shape {tuple(old_logits.shape)}")
    if old_logits.shape[1] > c:
        raise ValueError(f"old_logits has C_old = {old_logits.shape[1]} classes, more than logits' C = {c}")
    check_same_device(logits, "logits", old_logits, "old_logits")
    # The teacher gets no gradient; its dtype follows the student's (as the reference's target does).
    return old_logits.detach().to(logits.dtype)


def _check_loss_weight(value, name):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    check_nonneg(value, name)


def gradient_compensated_bce(logits: torch.Tensor, labels: torch.Tensor, old_class_mask, *,
                             reduction: str = "mean", return_weights: bool = False):
    """GLFC's class-aware gradient-compensated BCE (L_GC, specs/glfc.md 1.2).

    L_GC = (1/(N C)) sum_i w_i sum_c BCEwithlogits(o_ic, onehot(y)_ic), with
    G_i = 1 - sigmoid(o_{i,y_i}) and w_i = G_i / mean(G over i's group), the groups being the
    samples whose label is an old class (old_class_mask[y_i]) and the rest; w = 1 for everyone
    when no class is old, and for a group whose mean G is 0. w carries no gradient.

    logits [N, C] float; labels [N] integer in [0, C); old_class_mask bool [C], a 1-D integer
    tensor of class ids, or None (no old classes). reduction: "none" -> [N] row sums / C,
    "sum", or "mean". return_weights=True also returns w [N] (float32, float64 for float64 logits).
    """
    labels = _glfc_check_logits_labels(logits, labels)
    mask = _glfc_old_class_mask(old_class_mask, logits)
    check_reduction(reduction)
    per_sample, weights, _ = torch.ops.fcl_ext.glfc_loss(logits, labels, mask, None, 1.0, 0.0)
    out = reduce(per_sample, reduction)
    return (out, weights) if return_weights else out


def relation_distillation_bce(logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor, *,
                              reduction: str = "mean") -> torch.Tensor:
    """GLFC's class-semantic relation distillation (L_RD, specs/glfc.md 1.3).

    L_RD = (1/(N C)) sum_ic BCEwithlogits(o_ic, t'_ic), t' = [sigmoid(q) || onehot(y)[:, C_old:]],
    q = old_logits [N, C_old <= C] (no gradient flows to it). reduction as gradient_compensated_bce.
    """
    labels = _glfc_check_logits_labels(logits, labels)
    check_tensor(old_logits, "old_logits")
    old_logits = _glfc_old_logits(old_logits, logits)
    check_reduction(reduction)
    per_sample, _, _ = torch.ops.fcl_ext.glfc_loss(logits, labels, None, old_logits, 0.0, 1.0)
    return reduce(per_sample, reduction)


def glfc_loss(logits: torch.Tensor, labels: torch.Tensor, old_class_mask, old_logits=None, *,
              gc_weight: float = 0.5, rd_weight: float = 0.5, return_weights: bool = False):
    """GLFC's local objective: gc_weight L_GC + rd_weight L_RD with an old model's logits,
    L_GC alone (weights ignored) without. Mean over N C; one fused pass for both terms.
    return_weights=True also returns the gradient-compensation weights w [N].
    """
    labels = _glfc_check_logits_labels(logits, labels)
    mask = _glfc_old_class_mask(old_class_mask, logits)
    old_logits = _glfc_old_logits(old_logits, logits)
    if old_logits is None:
        gc_weight, rd_weight = 1.0, 0.0
    else:
        _check_loss_weight(gc_weight, "gc_weight")
        _check_loss_weight(rd_weight, "rd_weight")
    per_sample, weights, _ = torch.ops.fcl_ext.glfc_loss(logits, labels, mask, old_logits, float(gc_weight),
                                                         float(rd_weight))
    loss = per_sample.mean()
    return (loss, weights) if return_weights else loss


# ---- fccl losses (issue 4) ------------------------------------------------------

# ---- gradient matching / lbfgs (issue 5) ---------------------------------------
