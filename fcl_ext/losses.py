"""nn.Module drop-ins for the fcl_ext ops, following torch.nn loss conventions."""
import torch
from torch import nn

from fcl_ext import ops
from fcl_ext._checks import check_nonneg, check_reduction

__all__ = ["SoftmaxEntropy", "GradientCompensatedBCELoss", "RelationDistillationLoss", "GLFCLoss",
           "CrossCorrelationLoss", "DualDomainDistillationLoss"]


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

class CrossCorrelationLoss(nn.Module):
    """Cross-correlation loss of batch-standardised a and b; see fcl_ext.ops.cross_correlation_loss.

    CrossCorrelationLoss.fccl() is FCCL's collaborative loss (pass the target detached);
    CrossCorrelationLoss.barlow_twins(lambd) is the Barlow Twins loss (both views trained).
    """

    def __init__(self, off_diag_weight: float = 0.0051, off_diag_target: float = -1.0, unbiased: bool = True,
                 eps: float = 0.0):
        super().__init__()
        check_nonneg(off_diag_weight, "off_diag_weight")
        check_nonneg(eps, "eps")
        self.off_diag_weight = off_diag_weight
        self.off_diag_target = off_diag_target
        self.unbiased = unbiased
        self.eps = eps

    @classmethod
    def fccl(cls) -> "CrossCorrelationLoss":
        """FCCL (specs/fccl.md 1.3): lambda 0.0051, off-diagonals to -1, unbiased std, no eps."""
        return cls(off_diag_weight=0.0051, off_diag_target=-1.0, unbiased=True, eps=0.0)

    @classmethod
    def barlow_twins(cls, lambd: float = 0.0051) -> "CrossCorrelationLoss":
        """Barlow Twins: off-diagonals to 0 with weight lambd, biased variance, eps 1e-5."""
        return cls(off_diag_weight=lambd, off_diag_target=0.0, unbiased=False, eps=1e-5)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ops.cross_correlation_loss(a, b, off_diag_weight=self.off_diag_weight,
                                          off_diag_target=self.off_diag_target, unbiased=self.unbiased, eps=self.eps)

    def extra_repr(self) -> str:
        return (f"off_diag_weight={self.off_diag_weight}, off_diag_target={self.off_diag_target}, "
                f"unbiased={self.unbiased}, eps={self.eps}")


class DualDomainDistillationLoss(nn.Module):
    """FCCL's local objective: CE + intra- and inter-domain KL distillation; see
    fcl_ext.ops.dual_distillation_loss. Call as loss(logits, labels, intra_logits, inter_logits)."""

    def __init__(self, temperature: float = 1.0, ce_weight: float = 1.0, intra_weight: float = 1.0,
                 inter_weight: float = 1.0, temperature_squared: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for value, name in ((ce_weight, "ce_weight"), (intra_weight, "intra_weight"), (inter_weight, "inter_weight")):
            check_nonneg(value, name)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.intra_weight = intra_weight
        self.inter_weight = inter_weight
        self.temperature_squared = temperature_squared

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, intra_logits=None, inter_logits=None):
        return ops.dual_distillation_loss(logits, labels, intra_logits, inter_logits, temperature=self.temperature,
                                          ce_weight=self.ce_weight, intra_weight=self.intra_weight,
                                          inter_weight=self.inter_weight, temperature_squared=self.temperature_squared)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ce_weight={self.ce_weight}, intra_weight={self.intra_weight}, "
                f"inter_weight={self.inter_weight}, temperature_squared={self.temperature_squared}")
