"""Cross-correlation losses over a torch.distributed process group (data parallel training).

Under DistributedDataParallel each rank holds a shard of the batch. Computing the
cross-correlation loss on the shard alone optimises a different loss on every rank. With
``gather_distributed=True`` the shards are combined, in one of two ways:

``batch_stats="global"`` (default): columns are standardised with the mean and variance of the
    whole distributed batch, and M = sum over ranks of a_hat_r^T b_hat_r / N (N = total rows).
    The loss is then the single-process loss of the concatenated batch, whatever the split:
    the official Barlow Twins code (SyncBatchNorm, c / global batch size, all_reduce).
    Three all_reduce calls: column sums and the row count, centred sums of squares, M.
``batch_stats="local"``: each rank standardises with its own shard's statistics and
    M = mean over ranks of the local matrices (lightly's ``BarlowTwinsLoss(gather_distributed=True)``).
    One all_reduce (M); the local matrix is the fused fcl_ext op.

Backward. Every rank ends with the same loss L. The all_reduce used here sums gradients across
ranks in backward, so rank r receives world_size * dL/d(its rows): the gradient of the sum of
the ranks' (identical) losses. DDP then averages parameter gradients over ranks, which gives
exactly dL/dtheta, the single-process gradient on the concatenated batch. (The official Barlow
Twins code and lightly call the untracked dist.all_reduce: their backward is the identity, so
after DDP's averaging their parameters get dL/dtheta / world_size, i.e. a learning rate
/ world_size. Values are the same.)

Every rank must call with the same shapes and settings (as with any collective). An error
raised on one rank only (bad local input) leaves the others waiting in the collective;
errors that depend on global data (too few rows, a constant column) are raised on all ranks.
"""
from typing import Optional

import torch
import torch.distributed as dist

from fcl_ext._checks import check_nonneg

__all__ = ["BATCH_STATS", "is_distributed", "all_reduce_sum", "cross_correlation_matrix",
           "cross_correlation_loss", "loss_from_matrix"]

BATCH_STATS = ("global", "local")


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised and `group` (default: the world) has > 1 rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all_reduce(SUM): y = sum_r x_r on every rank; dx_r = sum_r' dy_r'."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of x over the ranks of `group`, differentiable (the backward sums the gradients too)."""
    return _AllReduceSum.apply(x, group)


def _check_inputs(a, b, eps, batch_stats):
    from fcl_ext.ops import _check_pair   # ops imports this module lazily: no circle at import time
    _check_pair(a, b, min_batch=0)
    check_nonneg(eps, "eps")
    if batch_stats not in BATCH_STATS:
        raise ValueError(f"batch_stats must be one of {BATCH_STATS}, got {batch_stats!r}")


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    # reduced-precision inputs accumulate in float32, as the fused kernels do
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _global_standardise(a, b, unbiased, eps, group):
    """a_hat, b_hat standardised with the whole distributed batch's statistics, and N."""
    ka = a.shape[1]
    count = torch.tensor([a.shape[0]], dtype=a.dtype, device=a.device)
    sums = all_reduce_sum(torch.cat([a.sum(0), b.sum(0), count]), group)
    n = int(sums[-1].item())
    if n < 2:
        raise ValueError(f"a must have at least 2 rows over all ranks to standardise its columns, got {n}")
    mean = sums[:-1] / n
    centred_a, centred_b = a - mean[:ka], b - mean[ka:]
    squares = all_reduce_sum(torch.cat([centred_a.pow(2).sum(0), centred_b.pow(2).sum(0)]), group)
    var = squares / (n - 1 if unbiased else n)
    if eps == 0:
        zero = (var == 0).nonzero()
        if zero.numel():
            j = int(zero[0, 0])
            name, col = ("a", j) if j < ka else ("b", j - ka)
            raise ValueError(f"column {col} of {name} is constant over the distributed batch (zero variance), so "
                             "standardising it divides by zero. Pass eps > 0 (e.g. eps=1e-5) to allow constant "
                             "columns.")
    inv_std = torch.rsqrt(var + eps)
    return centred_a * inv_std[:ka], centred_b * inv_std[ka:], n


def cross_correlation_matrix(a: torch.Tensor, b: torch.Tensor, *, unbiased: bool = True, eps: float = 0.0,
                             batch_stats: str = "global", group=None) -> torch.Tensor:
    """The cross-correlation matrix [Ka, Kb] of the batch distributed over `group`'s ranks.

    batch_stats "global": sum_r a_hat_r^T b_hat_r / N with global column statistics (equal to
    fcl_ext.ops.cross_correlation_matrix of the concatenated batch); "local": the mean over ranks of
    fcl_ext.ops.cross_correlation_matrix of each rank's shard. Without an initialised group of more
    than one rank, the single-process matrix. Identical on every rank; see the module docstring
    for the gradient each rank receives.
    """
    _check_inputs(a, b, eps, batch_stats)
    return _combined_matrix(a, b, unbiased, eps, batch_stats, group).to(a.dtype)


def _combined_matrix(a, b, unbiased, eps, batch_stats, group):
    """M in the accumulation dtype (the local-statistics matrix comes from the fused op in a's dtype)."""
    from fcl_ext import ops  # ops imports this module lazily; keep the cycle one-sided

    if not is_distributed(group):
        return ops.cross_correlation_matrix(a, b, unbiased=unbiased, eps=eps)
    if batch_stats == "local":
        local = ops.cross_correlation_matrix(a, b, unbiased=unbiased, eps=eps).to(_accumulation_dtype(a))
        return all_reduce_sum(local, group) / dist.get_world_size(group)
    acc = _accumulation_dtype(a)
    a_hat, b_hat, n = _global_standardise(a.to(acc), b.to(acc), unbiased, eps, group)
    return all_reduce_sum(a_hat.T @ b_hat, group) / n


def loss_from_matrix(matrix: torch.Tensor, off_diag_weight: float, off_diag_target: float) -> torch.Tensor:
    """sum_u (M_uu - 1)^2 + off_diag_weight * sum_{u != v} (M_uv - off_diag_target)^2 for a square M."""
    on_diag = (torch.diagonal(matrix) - 1).pow(2).sum()
    eye = torch.eye(matrix.shape[0], dtype=torch.bool, device=matrix.device)
    off_diag = (matrix - off_diag_target).pow(2).masked_fill(eye, 0).sum()
    return on_diag + off_diag_weight * off_diag


def cross_correlation_loss(a: torch.Tensor, b: torch.Tensor, *, off_diag_weight: float = 0.0051,
                           off_diag_target: float = -1.0, unbiased: bool = True, eps: float = 0.0,
                           batch_stats: str = "global", group: Optional[object] = None) -> torch.Tensor:
    """fcl_ext.ops.cross_correlation_loss with M combined over the ranks of `group`.

    The same loss value on every rank. batch_stats "global": the single-process loss of the
    concatenated batch (official Barlow Twins); "local": lightly's gather_distributed=True
    definition (per-rank statistics, mean of the ranks' matrices). Without an initialised group of
    more than one rank: exactly fcl_ext.ops.cross_correlation_loss.
    """
    from fcl_ext import ops

    _check_inputs(a, b, eps, batch_stats)
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    check_nonneg(off_diag_weight, "off_diag_weight")
    if not is_distributed(group):
        return ops.cross_correlation_loss(a, b, off_diag_weight=off_diag_weight, off_diag_target=off_diag_target,
                                          unbiased=unbiased, eps=eps)
    matrix = _combined_matrix(a, b, unbiased, eps, batch_stats, group)
    return loss_from_matrix(matrix, float(off_diag_weight), float(off_diag_target)).to(a.dtype)
