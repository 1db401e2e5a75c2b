"""Functional API: validate arguments (errors name the bad one), map reductions, call
torch.ops.fcl_ext.*. Every function here has a pure-PyTorch twin of the same name and
signature in fcl_ext.reference."""
import torch

from fcl_ext._checks import check_floating, check_min_dim, check_nonneg, check_reduction, reduce

__all__ = ["softmax_entropy"]


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
