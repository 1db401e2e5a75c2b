"""nn.Module drop-ins for the fcl_ext ops, following torch.nn loss conventions."""
import torch
from torch import nn

from fcl_ext import ops
from fcl_ext._checks import check_nonneg, check_reduction

__all__ = ["SoftmaxEntropy", "CrossCorrelationLoss", "DualDomainDistillationLoss"]


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
