"""Pure-PyTorch twins of every fcl_ext op: same names, same signatures.

Written from the math, readable first. They are the test oracle, the benchmark
baseline (eager and torch.compile), and the `loss_backend="reference"` fallback.
"""
import torch
import torch.nn.functional as F

from fcl_ext._checks import reduce

__all__ = [
    "softmax_entropy",
    "gradient_compensation_weights", "gradient_compensated_bce", "relation_distillation_bce", "glfc_loss",
    "cross_correlation_matrix", "cross_correlation_loss", "dual_distillation_loss",
    "gradient_matching_loss", "lbfgs_direction",
]


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
# GLFC's local objective as its reference code computes it (specs/glfc.md 1.2-1.3).

def as_old_class_mask(old_class_mask, num_classes: int, device=None) -> torch.Tensor:
    """A bool mask [C]; a 1-D integer tensor of class ids is converted, None is "no old class"."""
    if old_class_mask is None:
        return torch.zeros(num_classes, dtype=torch.bool, device=device)
    if old_class_mask.dtype == torch.bool:
        return old_class_mask
    mask = torch.zeros(num_classes, dtype=torch.bool, device=old_class_mask.device)
    mask[old_class_mask.long()] = True
    return mask


def gradient_compensation_weights(logits, labels, old_class_mask):
    """Per-sample weights w [N] of L_GC (no gradient).

    G_i = 1 - sigmoid(o_{i, y_i}); w_i = G_i / mean(G over i's group (old or new classes)),
    or 1 for everyone when the client holds no old classes. A group whose mean G is 0
    gets w = 1 (the reference code divides by zero there).
    """
    n, c = logits.shape
    mask = as_old_class_mask(old_class_mask, c, logits.device).to(logits.device)
    labels = labels.long()  # any integer dtype, as the op
    with torch.no_grad():
        target_logit = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        target_logit = target_logit.double() if logits.dtype == torch.float64 else target_logit.float()
        g = torch.sigmoid(-target_logit)  # = 1 - p_y, without the cancellation where p_y -> 1
        if not bool(mask.any()):
            return torch.ones_like(g)
        is_old = mask[labels]
        w = torch.ones_like(g)
        for group in (is_old, ~is_old):
            if bool(group.any()):
                mean_g = g[group].mean()
                if mean_g > 0:
                    w[group] = g[group] / mean_g
        return w


def gradient_compensated_bce(logits, labels, old_class_mask, *, reduction="mean", return_weights=False):
    """L_GC = (1/(N C)) sum_i w_i sum_c BCEwithlogits(o_ic, onehot(y)_ic)."""
    n, c = logits.shape
    target = F.one_hot(labels.long(), c).to(logits.dtype)
    w = gradient_compensation_weights(logits, labels, old_class_mask)
    rows = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1) / c
    per_sample = w.to(rows.dtype) * rows
    out = reduce(per_sample, reduction)
    return (out, w) if return_weights else out


def relation_distillation_bce(logits, labels, old_logits, *, reduction="mean"):
    """L_RD = (1/(N C)) sum BCEwithlogits(o, [sigmoid(q) || onehot(y)[:, C_old:]]); no grad to q."""
    n, c = logits.shape
    target = F.one_hot(labels.long(), c).to(logits.dtype)
    c_old = old_logits.shape[1]
    # The teacher is cast to the student's dtype before the sigmoid, as the op does.
    target = torch.cat([torch.sigmoid(old_logits.detach().to(logits.dtype)), target[:, c_old:]], dim=1)
    per_sample = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1) / c
    return reduce(per_sample, reduction)


def glfc_loss(logits, labels, old_class_mask, old_logits=None, *, gc_weight=0.5, rd_weight=0.5,
              return_weights=False):
    """gc_weight * L_GC + rd_weight * L_RD with an old model's logits, L_GC alone without."""
    gc, w = gradient_compensated_bce(logits, labels, old_class_mask, return_weights=True)
    if old_logits is None:
        loss = gc
    else:
        loss = _weighted(gc_weight, gc) + _weighted(rd_weight, relation_distillation_bce(logits, labels, old_logits))
    return (loss, w) if return_weights else loss


def _weighted(weight, term):
    """weight * term, where a zero weight leaves the term out, as the op does: a switched-off term adds 0, not
    0 * inf = NaN (GC alone and RD alone are the losses above). Its gradient stays 0 * d term (NaN at a NaN logit)."""
    if weight != 0:
        return weight * term
    return 0 * torch.where(torch.isfinite(term), term, torch.zeros_like(term))


# ---- fccl losses (issue 4) ------------------------------------------------------
# FCCL's collaborative and local objectives (specs/fccl.md 1.3-1.4).

def cross_correlation_matrix(a, b, *, unbiased=True, eps=0.0, gather_distributed=False, batch_stats="global",
                             group=None):
    """M = a_hat^T b_hat / B with per-column batch standardisation (var unbiased or biased).

    gather_distributed=True: the batch spread over the ranks of `group` (fcl_ext.distributed, itself
    plain PyTorch around the collectives); without an initialised group it is the local M.
    """
    if gather_distributed:
        from fcl_ext import distributed
        return distributed.cross_correlation_matrix(a, b, unbiased=unbiased, eps=eps, batch_stats=batch_stats,
                                                    group=group)
    def standardise(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=unbiased) + eps)
    return standardise(a).T @ standardise(b) / a.shape[0]


def cross_correlation_loss(a, b, *, off_diag_weight=0.0051, off_diag_target=-1.0, unbiased=True, eps=0.0,
                           gather_distributed=False, batch_stats="global", group=None):
    """sum_u (M_uu - 1)^2 + lambda sum_{u != v} (M_uv - tau)^2.

    FCCL: tau = -1, unbiased, eps = 0. Barlow Twins: tau = 0, biased, eps = 1e-5.
    """
    m = cross_correlation_matrix(a, b, unbiased=unbiased, eps=eps, gather_distributed=gather_distributed,
                                 batch_stats=batch_stats, group=group)
    on_diag = (torch.diagonal(m) - 1).pow(2).sum()
    off = ~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
    off_diag = (m[off] - off_diag_target).pow(2).sum()
    return on_diag + off_diag_weight * off_diag


def dual_distillation_loss(logits, labels, intra_logits=None, inter_logits=None, *, temperature=1.0,
                           ce_weight=1.0, intra_weight=1.0, inter_weight=1.0, temperature_squared=False):
    """w_ce CE(s, y) + w_intra KL(p_intra || q) + w_inter KL(p_inter || q), KL batchmean, q = softmax(s/T)."""
    loss = ce_weight * F.cross_entropy(logits, labels.long())
    log_q = F.log_softmax(logits / temperature, dim=1)
    scale = temperature ** 2 if temperature_squared else 1.0
    for teacher, weight in ((intra_logits, intra_weight), (inter_logits, inter_weight)):
        if teacher is None:
            continue
        # The teacher is cast to the student's dtype, as the op does.
        log_p = F.log_softmax(teacher.detach().to(logits.dtype) / temperature, dim=1)
        # KL batchmean = sum p (log p - log q) / N, with 0 log 0 = 0 where a teacher logit is -inf
        # (F.kl_div gives NaN there); a NaN teacher still gives NaN.
        terms = torch.where(log_p == float("-inf"), torch.zeros_like(log_q), log_p.exp() * (log_p - log_q))
        kl = terms.sum() / logits.shape[0]
        loss = loss + weight * scale * kl
    return loss

# ---- gradient matching / lbfgs (issue 5) ---------------------------------------
# Batched gradient-matching reconstruction (specs/glfc.md 1.7): the matching distance and
# torch.optim.LBFGS's two-loop recursion, per problem, in plain PyTorch.

def gradient_matching_loss(grads, target_grads, *, metric="l2"):
    """[K] distances between rows: l2 = sum (g - g*)^2; cosine = 1 - <g,g*>/(|g||g*|) (1 where a norm is 0)."""
    target = target_grads.detach()
    acc = torch.float32 if grads.dtype in (torch.float16, torch.bfloat16) else grads.dtype
    g, t = grads.to(acc), target.to(acc)
    if metric == "l2":
        out = (g - t).pow(2).sum(1)
    elif metric == "cosine":
        den = g.norm(dim=1) * t.norm(dim=1)
        zero = den == 0  # a zero norm: distance 1 by definition; NaN stays NaN
        out = torch.where(zero, torch.ones_like(den), 1 - (g * t).sum(1) / torch.where(zero, torch.ones_like(den), den))
    else:
        raise ValueError(f"metric must be one of ('l2', 'cosine'), got {metric!r}")
    return out.to(grads.dtype)


def lbfgs_direction(grad, s_hist, y_hist, rho, hist_len, h_diag, *, hist_start=None):
    """d_k = -H_k grad_k by the two-loop recursion, one problem at a time (layout: fcl_ext.ops)."""
    k_count, _, m = grad.shape[0], grad.shape[1], s_hist.shape[1]
    out = torch.empty_like(grad)
    for k in range(k_count):
        n = int(hist_len[k])
        first = 0 if hist_start is None else int(hist_start[k])
        slots = [(first + i) % m for i in range(n)]
        q = grad[k].neg()
        alpha = [None] * n
        for i in range(n - 1, -1, -1):
            alpha[i] = s_hist[k, slots[i]].dot(q) * rho[k, slots[i]]
            q.add_(y_hist[k, slots[i]], alpha=-alpha[i])
        r = torch.mul(q, h_diag[k])
        for i in range(n):
            beta = y_hist[k, slots[i]].dot(r) * rho[k, slots[i]]
            r.add_(s_hist[k, slots[i]], alpha=alpha[i] - beta)
        out[k] = r
    return out
