"""nn.Module drop-ins for the fcl_ext ops, following torch.nn loss conventions."""
import torch
from torch import nn

from fcl_ext import ops
from fcl_ext._checks import check_nonneg, check_reduction

__all__ = ["SoftmaxEntropy"]


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
