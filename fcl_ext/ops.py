"""Functional API: validate arguments (errors name the bad one), map reductions, call
torch.ops.fcl_ext.*. Every function here has a pure-PyTorch twin of the same name and
signature in fcl_ext.reference."""
import torch

from fcl_ext._checks import (check_choice, check_flag, check_floating, check_min_dim, check_nonneg, check_number,
                             check_positive, check_reduction, check_same_device, check_tensor, has_data, reduce)

__all__ = ["softmax_entropy", "gradient_compensated_bce", "relation_distillation_bce", "glfc_loss",
           "cross_correlation_matrix", "cross_correlation_loss", "dual_distillation_loss",
           "gradient_matching_loss", "lbfgs_direction"]


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
    eps = check_nonneg(eps, "eps")
    if logits.shape[-1] == 0 and logits.numel() == 0 and logits.dim() >= 1 and logits.shape[:-1].numel() > 0:
        raise ValueError(f"logits must have at least one class (last dim > 0), got shape {tuple(logits.shape)}")
    entropy, _ = torch.ops.fcl_ext.softmax_entropy(logits, eps)
    return reduce(entropy, reduction)

# ---- glfc losses (issue 3) ------------------------------------------------------
# GLFC's local objective (specs/glfc.md 1.2-1.3). One fused op computes both BCE row sums
# and the gradient-compensation weights; the three functions pick its gc/rd weights.

def _check_values_in_range(values: torch.Tensor, upper: int, name: str) -> None:
    # Only for old_class_mask given as class ids (a convenience form; pass the bool mask to avoid it). Data-
    # dependent (one host sync on CUDA), so skipped while torch.compile traces and for meta/fake tensors.
    # Labels are not checked here: the kernels check them where they read them (no host sync), with an
    # error naming labels[i].
    if values.numel() == 0 or not has_data(values):
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
    check_flag(return_weights, "return_weights")
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
    # The weights are checked even where they are ignored (no old model): a bad value is a bug either way.
    gc_weight = check_nonneg(gc_weight, "gc_weight")
    rd_weight = check_nonneg(rd_weight, "rd_weight")
    check_flag(return_weights, "return_weights")
    if old_logits is None:
        gc_weight, rd_weight = 1.0, 0.0
    per_sample, weights, _ = torch.ops.fcl_ext.glfc_loss(logits, labels, mask, old_logits, gc_weight, rd_weight)
    loss = per_sample.mean()
    return (loss, weights) if return_weights else loss


# ---- fccl losses (issue 4) ------------------------------------------------------

def _check_pair(a, b, min_batch: int = 2) -> None:
    """a, b: floating [B, K] on one device with one dtype and batch; B >= min_batch (a rank's shard of a
    distributed batch may hold fewer than 2 rows: min_batch=0)."""
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
    if a.shape[0] < min_batch:
        raise ValueError(f"a must have a batch of at least 2 rows to standardise its columns, got shape "
                         f"{tuple(a.shape)}")


def cross_correlation_matrix(a: torch.Tensor, b: torch.Tensor, *, unbiased: bool = True,
                             eps: float = 0.0, gather_distributed: bool = False, batch_stats: str = "global",
                             group=None) -> torch.Tensor:
    """M = a_hat^T b_hat / B, a_hat = (a - mean_B a) / sqrt(var_B a + eps), b_hat likewise.

    a [B, Ka], b [B, Kb], B >= 2; var is unbiased (/(B-1)) or biased (/B). Returns [Ka, Kb].
    With eps == 0 a column that is constant over the batch raises (it would give NaN).
    Differentiable in a and b (each only when it requires grad).
    gather_distributed=True: M of the batch spread over the ranks of `group` when a torch.distributed
    group is initialised (batch_stats "global" or "local"; see fcl_ext.distributed).
    """
    if check_flag(gather_distributed, "gather_distributed"):
        from fcl_ext import distributed
        return distributed.cross_correlation_matrix(a, b, unbiased=unbiased, eps=eps, batch_stats=batch_stats,
                                                    group=group)
    _check_pair(a, b)
    check_flag(unbiased, "unbiased")
    eps = check_nonneg(eps, "eps")
    matrix, _, _ = torch.ops.fcl_ext.cross_correlation_matrix(a, b, unbiased, eps)
    return matrix


def cross_correlation_loss(a: torch.Tensor, b: torch.Tensor, *, off_diag_weight: float = 0.0051,
                           off_diag_target: float = -1.0, unbiased: bool = True, eps: float = 0.0,
                           gather_distributed: bool = False, batch_stats: str = "global",
                           group=None) -> torch.Tensor:
    """sum_u (M_uu - 1)^2 + off_diag_weight * sum_{u != v} (M_uv - off_diag_target)^2, M as in
    cross_correlation_matrix (a and b of the same shape [B, K]).

    Defaults are FCCL's collaborative loss (unbiased std, no eps, off-diagonals pushed to -1; detach b
    for its target). Barlow Twins: off_diag_target=0, unbiased=False, eps=1e-5.
    gather_distributed=True: when a torch.distributed group is initialised, M is combined over the
    ranks of `group`: batch_stats="global" gives the loss of the concatenated batch (official Barlow
    Twins), "local" lightly's gather_distributed=True loss; see fcl_ext.distributed.
    """
    if check_flag(gather_distributed, "gather_distributed"):
        from fcl_ext import distributed
        return distributed.cross_correlation_loss(a, b, off_diag_weight=off_diag_weight,
                                                  off_diag_target=off_diag_target, unbiased=unbiased, eps=eps,
                                                  batch_stats=batch_stats, group=group)
    _check_pair(a, b)
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    check_flag(unbiased, "unbiased")
    eps = check_nonneg(eps, "eps")
    off_diag_weight = check_nonneg(off_diag_weight, "off_diag_weight")
    off_diag_target = check_number(off_diag_target, "off_diag_target")
    keep_matrix = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    loss, _, _, _ = torch.ops.fcl_ext.cross_correlation_loss(a, b, off_diag_weight, off_diag_target, unbiased, eps,
                                                             keep_matrix)
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
    temperature = check_positive(temperature, "temperature")
    ce_weight = check_nonneg(ce_weight, "ce_weight")
    intra_weight = check_nonneg(intra_weight, "intra_weight")
    inter_weight = check_nonneg(inter_weight, "inter_weight")
    scale = temperature ** 2 if check_flag(temperature_squared, "temperature_squared") else 1.0
    teachers = [None if t is None else t.detach().to(logits.dtype) for t in (intra_logits, inter_logits)]
    loss, _ = torch.ops.fcl_ext.dual_distillation_loss(logits, labels.long(), teachers[0], teachers[1],
                                                       temperature, ce_weight, intra_weight * scale,
                                                       inter_weight * scale)
    return loss

# ---- gradient matching / lbfgs (issue 5) ---------------------------------------

MATCHING_METRICS = ("l2", "cosine")


def gradient_matching_loss(grads: torch.Tensor, target_grads: torch.Tensor, *, metric: str = "l2") -> torch.Tensor:
    """Per-problem gradient-matching distance between rows of [K, P] tensors -> [K].

    metric "l2":     sum_p (g - g*)^2 (GLFC's proxy-server objective).
    metric "cosine": 1 - <g, g*> / (|g| |g*|) (1 with zero gradient where a norm is 0).
    Differentiable w.r.t. `grads` (twice-differentiable graphs upstream of `grads` are
    fine: the op's own backward is first order); `target_grads` gets no gradient.
    """
    check_floating(grads, "grads")
    check_floating(target_grads, "target_grads")
    if grads.dim() != 2:
        raise ValueError(f"grads must be 2-D [K, P], got shape {tuple(grads.shape)}")
    if target_grads.shape != grads.shape:
        raise ValueError(f"target_grads must have the shape of grads {tuple(grads.shape)}, "
                         f"got {tuple(target_grads.shape)}")
    if target_grads.dtype != grads.dtype:
        raise ValueError(f"target_grads must have the dtype of grads ({grads.dtype}), got {target_grads.dtype}")
    check_same_device(grads, "grads", target_grads, "target_grads")
    check_choice(metric, MATCHING_METRICS, "metric")
    loss, _ = torch.ops.fcl_ext.gradient_matching_loss(grads, target_grads.detach(), metric)
    return loss


def lbfgs_direction(grad: torch.Tensor, s_hist: torch.Tensor, y_hist: torch.Tensor, rho: torch.Tensor,
                    hist_len: torch.Tensor, h_diag: torch.Tensor, *, hist_start=None) -> torch.Tensor:
    """L-BFGS two-loop recursion for K independent problems -> the descent directions [K, D].

    d_k = -H_k grad_k, computed exactly as torch.optim.LBFGS does for one problem
    (q = -g; newest -> oldest: a_i = rho_i <s_i, q>, q -= a_i y_i; r = h_diag q;
    oldest -> newest: b_i = rho_i <y_i, r>, r += (a_i - b_i) s_i).

    Layout: s_hist, y_hist [K, M, D] and rho [K, M] (rho_i = 1 / <y_i, s_i>) hold up to M
    pairs per problem; hist_len [K] (int64) says how many are valid. The i-th OLDEST pair
    of problem k (0 <= i < hist_len[k]) is in slot (hist_start[k] + i) % M: a ring buffer,
    so appending to a full history overwrites the oldest slot instead of shifting M D
    values. hist_start=None means slot i (oldest -> newest from slot 0). h_diag [K] is the
    initial inverse-Hessian scale (1 before the first accepted pair). No gradient.
    """
    check_floating(grad, "grad")
    for name, t in (("s_hist", s_hist), ("y_hist", y_hist), ("rho", rho), ("hist_len", hist_len),
                    ("h_diag", h_diag)):
        check_tensor(t, name)
    if hist_start is not None:
        check_tensor(hist_start, "hist_start")
    if grad.dim() != 2:
        raise ValueError(f"grad must be 2-D [K, D], got shape {tuple(grad.shape)}")
    k, d = grad.shape
    if s_hist.dim() != 3 or s_hist.shape[0] != k or s_hist.shape[2] != d:
        raise ValueError(f"s_hist must be [K, M, D] with K={k}, D={d}, got shape {tuple(s_hist.shape)}")
    if y_hist.shape != s_hist.shape:
        raise ValueError(f"y_hist must have the shape of s_hist {tuple(s_hist.shape)}, got {tuple(y_hist.shape)}")
    m = s_hist.shape[1]
    if rho.shape != (k, m):
        raise ValueError(f"rho must be [K, M] = [{k}, {m}], got shape {tuple(rho.shape)}")
    if h_diag.shape != (k,):
        raise ValueError(f"h_diag must be [K] = [{k}], got shape {tuple(h_diag.shape)}")
    for name, t in (("s_hist", s_hist), ("y_hist", y_hist), ("rho", rho), ("h_diag", h_diag)):
        if t.dtype != grad.dtype:
            raise ValueError(f"{name} must have the dtype of grad ({grad.dtype}), got {t.dtype}")
        check_same_device(grad, "grad", t, name)
    for name, t in (("hist_len", hist_len), ("hist_start", hist_start)):
        if t is None:
            continue
        if t.dtype != torch.int64 or t.shape != (k,):
            raise ValueError(f"{name} must be an int64 tensor [K] = [{k}], got {t.dtype} {tuple(t.shape)}")
        check_same_device(grad, "grad", t, name)
    if grad.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"grad must be float32 or float64 (the history needs the precision), got {grad.dtype}")
    with torch.no_grad():
        return torch.ops.fcl_ext.lbfgs_direction(grad, s_hist, y_hist, rho, hist_len, h_diag, hist_start)
