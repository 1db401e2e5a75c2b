"""Pure-PyTorch twins of every fcl_ext op: same names, same signatures.

Written from the math, readable first. They are the test oracle, the benchmark
baseline (eager and torch.compile), and the `loss_backend="reference"` fallback.
"""
import torch
import torch.nn.functional as F

from fcl_ext._checks import reduce

__all__ = ["softmax_entropy"]


# ---- softmax_entropy ------------------------------------------------------------

def softmax_entropy(logits: torch.Tensor, *, reduction: str = "mean", eps: float = 0.0) -> torch.Tensor:
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    p = logp.exp()
    if eps == 0:
        # p log p -> 0 as p -> 0: clamp -inf so that 0 * log 0 is 0, not NaN.
        plogp = p * logp.clamp_min(torch.finfo(logp.dtype).min)
    else:
        plogp = p * torch.log(p + eps)
    entropy = -plogp.sum(dim=-1)
    return reduce(entropy.to(logits.dtype), reduction)

# ---- glfc losses (issue 3) ------------------------------------------------------

# ---- fccl losses (issue 4) ------------------------------------------------------

# ---- gradient matching / lbfgs (issue 5) ---------------------------------------
