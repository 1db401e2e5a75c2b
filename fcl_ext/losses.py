"""nn.Module drop-ins for the fcl_ext ops, following torch.nn loss conventions.

Each module takes its settings in the constructor (``reduction=`` where the loss has a per-sample
form) and the tensors in ``forward``; ``repr`` shows the settings. What each one replaces, with
the argument mapping, is in docs/losses.md.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fcl_ext import ops
from fcl_ext._checks import check_nonneg, check_reduction

__all__ = ["SoftmaxEntropy", "GradientCompensatedBCELoss", "RelationDistillationLoss", "GLFCLoss",
           "CrossCorrelationLoss", "DualDomainDistillationLoss"]

LossAndWeights = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class SoftmaxEntropy(nn.Module):
    r"""Shannon entropy of ``softmax(logits)`` over the last dimension.

    .. math::
        H_i = -\sum_c p_{ic} \log(p_{ic} + \epsilon), \qquad p_i = \mathrm{softmax}(x_i)

    ``eps=0`` computes :math:`-\sum p \log p` stably from log-softmax; ``eps=1e-5`` is GLFC's
    task-transition signal (GLFC.py:21-25). Differentiable: usable as an entropy-minimisation loss.

    Args:
        reduction: ``"mean"`` | ``"sum"`` over all rows, or ``"none"``.
        eps: added inside the log (>= 0).

    Shape:
        - logits: :math:`(*, C)`, floating point.
        - output: scalar, or :math:`(*)` with ``reduction="none"``.

    Example::

        >>> entropy = SoftmaxEntropy(reduction="none")
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> h = entropy(logits)
        >>> h.shape
        torch.Size([4])
        >>> bool((h <= torch.log(torch.tensor(10.0)) + 1e-6).all())
        True
        >>> SoftmaxEntropy()(logits).backward()
    """

    def __init__(self, reduction: str = "mean", eps: float = 0.0) -> None:
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
    r"""GLFC's class-aware gradient-compensated BCE, :math:`L_{GC}` (GLFC.py:189-201, 211-245).

    .. math::
        \ell_i = \frac{w_i}{C} \sum_c \mathrm{BCEWithLogits}(x_{ic}, \mathrm{onehot}(y_i)_c), \quad
        w_i = \frac{G_i}{\bar G_{g(i)}}, \quad G_i = 1 - \sigma(x_{i, y_i})

    :math:`\bar G_{g(i)}` is the mean of :math:`G` over sample i's group: the samples whose label
    is an old class (``old_class_mask``) or the others. :math:`w` carries no gradient; with no old
    class, :math:`w = 1`.

    Args:
        reduction: ``"mean"`` (GLFC: mean over :math:`N C`), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(N, C)`; labels: :math:`(N)` integer class ids in :math:`[0, C)`.
        - old_class_mask: bool :math:`(C)`, a 1-D integer tensor of class ids, or ``None``.
        - output: scalar, or :math:`(N)` with ``reduction="none"``; with ``return_weights=True``
          also :math:`w` of shape :math:`(N)`.

    Example::

        >>> loss_fn = GradientCompensatedBCELoss()
        >>> logits = torch.randn(8, 5, requires_grad=True)
        >>> labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
        >>> loss, w = loss_fn(logits, labels, old_class_mask=torch.tensor([0, 1]), return_weights=True)
        >>> loss.shape, w.shape
        (torch.Size([]), torch.Size([8]))
        >>> loss.backward()
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, old_class_mask: Optional[torch.Tensor] = None,
                return_weights: bool = False) -> LossAndWeights:
        return ops.gradient_compensated_bce(logits, labels, old_class_mask, reduction=self.reduction,
                                            return_weights=return_weights)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class RelationDistillationLoss(nn.Module):
    r"""GLFC's class-semantic relation distillation, :math:`L_{RD}` (GLFC.py:199-209).

    .. math::
        \ell_i = \frac{1}{C} \sum_c \mathrm{BCEWithLogits}(x_{ic}, t_{ic}), \quad
        t_i = [\sigma(q_i) \,\|\, \mathrm{onehot}(y_i)_{C_{old}:}]

    :math:`q` = ``old_logits``, the old model's logits (no gradient flows to them).

    Args:
        reduction: ``"mean"`` (GLFC), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(N, C)`; labels: :math:`(N)`; old_logits: :math:`(N, C_{old})`, :math:`C_{old} \le C`.
        - output: scalar, or :math:`(N)` with ``reduction="none"``.

    Example::

        >>> loss_fn = RelationDistillationLoss(reduction="none")
        >>> logits = torch.randn(6, 10, requires_grad=True)
        >>> old_logits = torch.randn(6, 5)
        >>> loss_fn(logits, torch.tensor([0, 5, 6, 7, 8, 9]), old_logits).shape
        torch.Size([6])
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        return ops.relation_distillation_bce(logits, labels, old_logits, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class GLFCLoss(nn.Module):
    r"""GLFC's local objective (GLFC.py:189-209): :math:`L_{GC}` and, given an old model's logits,
    :math:`L_{RD}`.

    .. math::
        \ell_i = \begin{cases} \alpha\, \ell^{GC}_i + \beta\, \ell^{RD}_i & \text{with old\_logits} \\
                               \ell^{GC}_i & \text{without} \end{cases}

    with :math:`\ell^{GC}_i`, :math:`\ell^{RD}_i` the per-sample terms of
    :class:`GradientCompensatedBCELoss` and :class:`RelationDistillationLoss`,
    :math:`\alpha` = ``gc_weight``, :math:`\beta` = ``rd_weight`` (GLFC: 0.5 and 0.5).
    ``reduction="mean"`` is one fused pass over both terms; ``"sum"`` is the mean times :math:`N`;
    ``"none"`` runs the two per-sample ops.

    Args:
        gc_weight, rd_weight: weights of the two terms (>= 0; ignored without old_logits).
        reduction: ``"mean"`` (GLFC), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(N, C)`; labels: :math:`(N)`; old_class_mask: bool :math:`(C)`, class ids or ``None``;
          old_logits: :math:`(N, C_{old})` or ``None``.
        - output: scalar, or :math:`(N)` with ``reduction="none"``; with ``return_weights=True`` also
          the gradient-compensation weights :math:`(N)`.

    Example::

        >>> criterion = GLFCLoss()
        >>> logits = torch.randn(8, 10, requires_grad=True)
        >>> labels = torch.randint(0, 10, (8,))
        >>> old_logits = torch.randn(8, 5)            # the old model's outputs on the same batch
        >>> loss = criterion(logits, labels, old_class_mask=torch.arange(5), old_logits=old_logits)
        >>> loss.backward()
        >>> GLFCLoss(reduction="none")(logits, labels, torch.arange(5), old_logits).shape
        torch.Size([8])
    """

    def __init__(self, gc_weight: float = 0.5, rd_weight: float = 0.5, reduction: str = "mean") -> None:
        super().__init__()
        check_nonneg(gc_weight, "gc_weight")
        check_nonneg(rd_weight, "rd_weight")
        check_reduction(reduction)
        self.gc_weight = float(gc_weight)
        self.rd_weight = float(rd_weight)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, old_class_mask: Optional[torch.Tensor] = None,
                old_logits: Optional[torch.Tensor] = None, return_weights: bool = False) -> LossAndWeights:
        if self.reduction != "none":
            loss, weights = ops.glfc_loss(logits, labels, old_class_mask, old_logits, gc_weight=self.gc_weight,
                                          rd_weight=self.rd_weight, return_weights=True)
            if self.reduction == "sum":
                loss = loss * logits.shape[0]
            return (loss, weights) if return_weights else loss
        loss, weights = ops.gradient_compensated_bce(logits, labels, old_class_mask, reduction="none",
                                                     return_weights=True)
        if old_logits is not None:
            rd = ops.relation_distillation_bce(logits, labels, old_logits, reduction="none")
            loss = self.gc_weight * loss + self.rd_weight * rd
        return (loss, weights) if return_weights else loss

    def extra_repr(self) -> str:
        return f"gc_weight={self.gc_weight}, rd_weight={self.rd_weight}, reduction={self.reduction!r}"


# ---- fccl losses (issue 4) ------------------------------------------------------

class CrossCorrelationLoss(nn.Module):
    r"""Cross-correlation loss of batch-standardised ``a`` and ``b``: FCCL's :math:`L_{Col}`
    (FCCL.py:209-218) or the Barlow Twins loss.

    .. math::
        M = \frac{1}{B} \hat a^\top \hat b, \quad \hat z_{:,u} = \frac{z_{:,u} - \mu_u}{\sqrt{\sigma^2_u + \epsilon}}

    .. math::
        L = \sum_u (M_{uu} - 1)^2 + \lambda \sum_{u \ne v} (M_{uv} - \tau)^2

    :math:`\mu, \sigma^2` are column statistics over the batch (:math:`\sigma^2` unbiased or biased),
    :math:`\lambda` = ``off_diag_weight``, :math:`\tau` = ``off_diag_target``. ``CrossCorrelationLoss.fccl()``
    is FCCL's loss (pass the target ``b`` detached); ``CrossCorrelationLoss.barlow_twins(lambd)`` is
    Barlow Twins (:math:`\tau = 0`, biased variance, :math:`\epsilon = 10^{-5}`, both views trained).
    There is no ``reduction``: the loss is a function of the whole batch's matrix, not a sum over samples.

    ``gather_distributed=True`` (data-parallel training): when a torch.distributed group is
    initialised, the batch is the union of the ranks' shards. ``batch_stats="global"`` standardises
    with the whole batch's statistics, which gives the loss of the concatenated batch (the official
    Barlow Twins code, with SyncBatchNorm); ``"local"`` standardises per rank and averages the ranks'
    matrices (lightly's ``gather_distributed=True``). Each rank gets world_size times its rows'
    gradient, so that DDP's gradient averaging yields the gradient of the loss; see
    fcl_ext.distributed. Without an initialised group it is the single-process loss.

    Args:
        off_diag_weight: :math:`\lambda` (>= 0).
        off_diag_target: :math:`\tau` (FCCL: -1, Barlow Twins: 0).
        unbiased: divide the variance by :math:`B - 1` (FCCL) or :math:`B` (Barlow Twins).
        eps: added to the variance; with ``eps=0`` a constant column raises.
        gather_distributed: combine the batch across the ranks of ``group`` (default: the world).
        batch_stats: ``"global"`` or ``"local"``, as above (used only with gather_distributed).

    Shape:
        - a, b: :math:`(B, K)` with :math:`B \ge 2` (over all ranks with gather_distributed).
        - output: scalar.

    Example::

        >>> barlow = CrossCorrelationLoss.barlow_twins(lambd=5e-3)
        >>> z1 = torch.randn(32, 16, requires_grad=True)
        >>> z2 = z1.detach() + 0.1 * torch.randn(32, 16)
        >>> loss = barlow(z1, z2)
        >>> loss.backward()
        >>> fccl = CrossCorrelationLoss.fccl()
        >>> fccl(z1, z2.detach()).shape
        torch.Size([])
        >>> barlow
        CrossCorrelationLoss(off_diag_weight=0.005, off_diag_target=0.0, unbiased=False, eps=1e-05)
    """

    def __init__(self, off_diag_weight: float = 0.0051, off_diag_target: float = -1.0, unbiased: bool = True,
                 eps: float = 0.0, gather_distributed: bool = False, batch_stats: str = "global",
                 group: Optional[object] = None) -> None:
        super().__init__()
        from fcl_ext.distributed import BATCH_STATS

        check_nonneg(off_diag_weight, "off_diag_weight")
        check_nonneg(eps, "eps")
        if batch_stats not in BATCH_STATS:
            raise ValueError(f"batch_stats must be one of {BATCH_STATS}, got {batch_stats!r}")
        self.off_diag_weight = off_diag_weight
        self.off_diag_target = off_diag_target
        self.unbiased = unbiased
        self.eps = eps
        self.gather_distributed = bool(gather_distributed)
        self.batch_stats = batch_stats
        self.group = group

    @classmethod
    def fccl(cls, **kwargs) -> "CrossCorrelationLoss":
        """FCCL (specs/fccl.md 1.3): lambda 0.0051, off-diagonals to -1, unbiased std, no eps.
        kwargs: gather_distributed, batch_stats, group."""
        return cls(off_diag_weight=0.0051, off_diag_target=-1.0, unbiased=True, eps=0.0, **kwargs)

    @classmethod
    def barlow_twins(cls, lambd: float = 0.0051, **kwargs) -> "CrossCorrelationLoss":
        """Barlow Twins: off-diagonals to 0 with weight lambd, biased variance, eps 1e-5 (BatchNorm1d's).
        kwargs: gather_distributed, batch_stats, group."""
        return cls(off_diag_weight=lambd, off_diag_target=0.0, unbiased=False, eps=1e-5, **kwargs)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ops.cross_correlation_loss(a, b, off_diag_weight=self.off_diag_weight,
                                          off_diag_target=self.off_diag_target, unbiased=self.unbiased, eps=self.eps,
                                          gather_distributed=self.gather_distributed, batch_stats=self.batch_stats,
                                          group=self.group)

    def extra_repr(self) -> str:
        out = (f"off_diag_weight={self.off_diag_weight}, off_diag_target={self.off_diag_target}, "
               f"unbiased={self.unbiased}, eps={self.eps}")
        if self.gather_distributed:
            out += f", gather_distributed=True, batch_stats={self.batch_stats!r}"
        return out


class DualDomainDistillationLoss(nn.Module):
    r"""FCCL's local objective (utils_idea.py:218-252): cross-entropy plus KL distillation from an
    intra-domain and an inter-domain teacher.

    .. math::
        \ell_i = w_{ce}\, \mathrm{CE}(s_i, y_i)
            + \kappa \sum_{t \in \{intra, inter\}} w_t\, \mathrm{KL}\big(\mathrm{softmax}(t_i / T)
              \,\|\, \mathrm{softmax}(s_i / T)\big)

    :math:`\kappa = T^2` with ``temperature_squared=True``, else 1 (FCCL: T = 1, no :math:`T^2`).
    ``reduction="mean"`` (FCCL: mean CE and ``KLDivLoss(reduction="batchmean")``) is one fused pass;
    ``"sum"`` is the mean times :math:`N`; ``"none"`` is computed in plain PyTorch. Either teacher
    may be ``None`` (its term is dropped); teachers get no gradient.

    Args:
        temperature: :math:`T` (> 0).
        ce_weight, intra_weight, inter_weight: term weights (>= 0).
        temperature_squared: multiply the KL terms by :math:`T^2` (Hinton's scaling).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shape:
        - logits, intra_logits, inter_logits: :math:`(N, C)`; labels: :math:`(N)` class ids.
        - output: scalar, or :math:`(N)` with ``reduction="none"``.

    Example::

        >>> criterion = DualDomainDistillationLoss()
        >>> logits = torch.randn(8, 10, requires_grad=True)
        >>> labels = torch.randint(0, 10, (8,))
        >>> loss = criterion(logits, labels, torch.randn(8, 10), torch.randn(8, 10))
        >>> loss.backward()
        >>> DualDomainDistillationLoss(reduction="none")(logits, labels, torch.randn(8, 10)).shape
        torch.Size([8])
    """

    def __init__(self, temperature: float = 1.0, ce_weight: float = 1.0, intra_weight: float = 1.0,
                 inter_weight: float = 1.0, temperature_squared: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for value, name in ((ce_weight, "ce_weight"), (intra_weight, "intra_weight"), (inter_weight, "inter_weight")):
            check_nonneg(value, name)
        check_reduction(reduction)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.intra_weight = intra_weight
        self.inter_weight = inter_weight
        self.temperature_squared = temperature_squared
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, intra_logits: Optional[torch.Tensor] = None,
                inter_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        kwargs = dict(temperature=self.temperature, ce_weight=self.ce_weight, intra_weight=self.intra_weight,
                      inter_weight=self.inter_weight, temperature_squared=self.temperature_squared)
        if self.reduction == "none":
            with torch.no_grad():  # the fused op's argument checks (the kernel reduces in-kernel)
                ops.dual_distillation_loss(logits, labels, intra_logits, inter_logits, **kwargs)
            return self._per_sample(logits, labels, intra_logits, inter_logits)
        loss = ops.dual_distillation_loss(logits, labels, intra_logits, inter_logits, **kwargs)
        return loss * logits.shape[0] if self.reduction == "sum" else loss

    def _per_sample(self, logits, labels, intra_logits, inter_logits) -> torch.Tensor:
        acc = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        s = logits.to(acc)
        out = self.ce_weight * F.cross_entropy(s, labels.long(), reduction="none")
        log_q = F.log_softmax(s / self.temperature, dim=1)
        scale = self.temperature ** 2 if self.temperature_squared else 1.0
        for teacher, weight in ((intra_logits, self.intra_weight), (inter_logits, self.inter_weight)):
            if teacher is not None:
                log_p = F.log_softmax(teacher.detach().to(acc) / self.temperature, dim=1)
                out = out + weight * scale * F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)
        return out.to(logits.dtype)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ce_weight={self.ce_weight}, intra_weight={self.intra_weight}, "
                f"inter_weight={self.inter_weight}, temperature_squared={self.temperature_squared}, "
                f"reduction={self.reduction!r}")
