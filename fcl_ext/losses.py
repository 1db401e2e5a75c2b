"""nn.Module drop-ins for the fcl_ext ops, following torch.nn loss conventions."""
import torch
from torch import nn

from fcl_ext import ops
from fcl_ext._checks import check_nonneg, check_reduction

__all__ = ["SoftmaxEntropy", "GradientCompensatedBCELoss", "RelationDistillationLoss", "GLFCLoss"]


class SoftmaxEntropy(nn.Module):
    """Entropy of softmax(logits) over the last dim; see fcl_ext.ops.softmax_entropy."""

    def __init__(self, reduction: str = "mean", eps: float = 0.0):
        super().__init__()
        check_reduction(reduction)
        check_nonneg(eps, "eps")
        self.reduction = reduction
        self.eps = eps

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return ops.softmax_entropy(logits, reduction=self.reduction, eps=self.eps)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, eps={self.eps}"

# ---- glfc losses (issue 3) ------------------------------------------------------

class GradientCompensatedBCELoss(nn.Module):
    """GLFC's L_GC; see fcl_ext.ops.gradient_compensated_bce.

    forward(logits, labels, old_class_mask=None): old_class_mask is a bool [C] mask or a 1-D
    tensor of class ids of the classes this client holds exemplars of (None: none, w = 1).
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, old_class_mask=None,
                return_weights: bool = False):
        return ops.gradient_compensated_bce(logits, labels, old_class_mask, reduction=self.reduction,
                                            return_weights=return_weights)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class RelationDistillationLoss(nn.Module):
    """GLFC's L_RD; see fcl_ext.ops.relation_distillation_bce. forward(logits, labels, old_logits)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        return ops.relation_distillation_bce(logits, labels, old_logits, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class GLFCLoss(nn.Module):
    """GLFC's local objective gc_weight L_GC + rd_weight L_RD (L_GC alone without old logits);
    see fcl_ext.ops.glfc_loss. forward(logits, labels, old_class_mask=None, old_logits=None)."""

    def __init__(self, gc_weight: float = 0.5, rd_weight: float = 0.5):
        super().__init__()
        check_nonneg(gc_weight, "gc_weight")
        check_nonneg(rd_weight, "rd_weight")
        self.gc_weight = float(gc_weight)
        self.rd_weight = float(rd_weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, old_class_mask=None, old_logits=None,
                return_weights: bool = False):
        return ops.glfc_loss(logits, labels, old_class_mask, old_logits, gc_weight=self.gc_weight,
                             rd_weight=self.rd_weight, return_weights=return_weights)

    def extra_repr(self) -> str:
        return f"gc_weight={self.gc_weight}, rd_weight={self.rd_weight}"


# ---- fccl losses (issue 4) ------------------------------------------------------
