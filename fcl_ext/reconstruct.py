"""Batched gradient-matching reconstruction: GLFC's proxy-server engine (specs/glfc.md 1.6-1.7).

A client uploads the parameter gradient of CE(encoder(x), y) for one prototype image x;
the server recovers y (iDLG) and rebuilds x by minimising the distance between the
gradient of a candidate image and the uploaded one, with L-BFGS. The reference does this
one problem at a time (~250 x 20 double-backward passes each). Here all K problems run
together: one batched closure per inner iteration, per-problem L-BFGS state that follows
torch.optim.LBFGS exactly on each problem, and the fused ops
fcl_ext.ops.gradient_matching_loss / fcl_ext.ops.lbfgs_direction.

    encoder = LeNetEncoder(seed=0)
    grads = encode_gradients(encoder, images, labels)          # [K, P], what clients send
    result = reconstruct_from_gradients(encoder, grads)        # labels recovered (iDLG)
    result.images[:, -1], result.losses, result.labels
    psnr(result.images[:, -1], images)

It doubles as a gradient-inversion privacy evaluator (psnr of the reconstructions).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fcl_ext import ops
from fcl_ext import reference as _reference
from fcl_ext._checks import check_choice, check_count, check_flag, check_floating, check_nonneg, check_positive, check_tensor

__all__ = [
    "LeNetEncoder", "ParameterSlice", "parameter_layout", "split_gradients", "encode_gradients",
    "per_sample_gradients", "recover_labels", "BatchedLBFGS", "ReconstructionResult",
    "reconstruct_from_gradients", "reconstruct_sequential_reference", "psnr",
]


# ---- the encoder ---------------------------------------------------------------

def _conv_out(size: int, stride: int, kernel: int = 5, padding: int = 2) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class LeNetEncoder(nn.Module):
    """GLFC's fixed gradient-encoding network (myNetwork.py:32-65), any image size / class count.

    Conv(C->w, 5, s2, p2)-Sigmoid, Conv(w->w, 5, s2, p2)-Sigmoid, Conv(w->w, 5, s1, p2)-Sigmoid,
    flatten, Linear(w*h*w' -> num_classes); w = 12. Every weight and bias is U(-0.5, 0.5),
    drawn from torch.Generator().manual_seed(seed) in parameters() order. It is never
    trained: every client and the server share one instance (same seed -> same network).
    """

    def __init__(self, in_channels: int = 3, image_size: Union[int, Tuple[int, int]] = 32,
                 num_classes: int = 100, *, seed: int = 0, width: int = 12):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if min(h, w) < 1 or in_channels < 1 or num_classes < 1 or width < 1:
            raise ValueError(f"LeNetEncoder needs positive sizes, got in_channels={in_channels}, "
                             f"image_size={image_size}, num_classes={num_classes}, width={width}")
        self.input_shape = (in_channels, h, w)
        self.num_classes = num_classes
        self.convs = nn.ModuleList([
            nn.Conv2d(in_channels, width, 5, stride=2, padding=2),
            nn.Conv2d(width, width, 5, stride=2, padding=2),
            nn.Conv2d(width, width, 5, stride=1, padding=2),
        ])
        for conv in self.convs:
            h, w = _conv_out(h, conv.stride[0]), _conv_out(w, conv.stride[1])
        self.feature_shape = (width, h, w)
        self.fc = nn.Linear(width * h * w, num_classes)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).sub_(0.5).to(p.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.sigmoid(conv(x))
        return self.fc(x.flatten(1))


# ---- flat gradient layout --------------------------------------------------------

class ParameterSlice(NamedTuple):
    name: str
    start: int
    stop: int
    shape: Tuple[int, ...]


def parameter_layout(encoder: nn.Module) -> List[ParameterSlice]:
    """Where each parameter's gradient sits in a flat [K, P] row (encoder.parameters() order)."""
    out, offset = [], 0
    for name, p in encoder.named_parameters():
        out.append(ParameterSlice(name, offset, offset + p.numel(), tuple(p.shape)))
        offset += p.numel()
    return out


def split_gradients(flat: torch.Tensor, encoder: nn.Module) -> List[torch.Tensor]:
    """[K, P] -> one [K, *shape] view per parameter (GLFC's per-prototype list of tensors)."""
    return [flat[:, s.start:s.stop].view(flat.shape[0], *s.shape) for s in parameter_layout(encoder)]


def _flatten_target(target_grads, encoder) -> torch.Tensor:
    if isinstance(target_grads, (list, tuple)):
        if len(target_grads) == 0:
            raise ValueError("target_grads must not be an empty list")
        for i, t in enumerate(target_grads):
            check_floating(t, f"target_grads[{i}]")
            if t.dim() < 1 or t.shape[0] != target_grads[0].shape[0]:
                raise ValueError(f"target_grads[{i}] must be [K, ...] with the K of target_grads[0], "
                                 f"got shape {tuple(t.shape)}")
        return torch.cat([t.reshape(t.shape[0], -1) for t in target_grads], dim=1)
    if not isinstance(target_grads, torch.Tensor):
        raise TypeError("target_grads must be a [K, P] tensor or a list of per-parameter [K, ...] tensors, "
                        f"got {type(target_grads).__name__}")
    check_floating(target_grads, "target_grads")
    if target_grads.dim() != 2:
        raise ValueError(f"target_grads must be a [K, P] tensor or a list of per-parameter [K, ...] tensors, "
                         f"got shape {tuple(target_grads.shape)}")
    return target_grads


# ---- per-sample gradients --------------------------------------------------------

def encode_gradients(encoder: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients of CE(encoder(x_k), y_k) w.r.t. encoder.parameters(): [K, P].

    What a GLFC client uploads for each prototype (GLFC.py:333-339), for all K at once
    with torch.func (vmap over grad). Split it with split_gradients / parameter_layout.
    """
    check_floating(images, "images")
    check_tensor(labels, "labels")
    if images.dim() != 4:
        raise ValueError(f"images must be [K, C, H, W], got shape {tuple(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [K] = [{images.shape[0]}], got shape {tuple(labels.shape)}")
    names = [n for n, _ in encoder.named_parameters()]
    params = {n: p.detach() for n, p in encoder.named_parameters()}

    def sample_loss(p, x, y):
        logits = torch.func.functional_call(encoder, p, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, images, labels)
    return torch.cat([grads[n].reshape(images.shape[0], -1) for n in names], dim=1)


def per_sample_gradients(encoder: LeNetEncoder, images: torch.Tensor, labels: torch.Tensor, *,
                         flatten: bool = True):
    """The same [K, P] gradients as encode_gradients, written out layer by layer.

    Built from differentiable ops (unfold + bmm for the per-sample conv weight gradients,
    conv_transpose2d for the input gradients), so autograd can take d/dx of any function
    of them: the batched reconstruction closure's double backward. flatten=False returns
    the per-parameter [K, numel] blocks instead of their concatenation.
    """
    blocks, delta, features = _gradient_parts(encoder, images, labels)
    # the fc weight gradient is the outer product delta features^T (bmm: its backward is
    # two bmm reductions, no [K, C, F] temporaries)
    fc_weight = torch.bmm(delta.unsqueeze(2), features.unsqueeze(1)).reshape(images.shape[0], -1)
    out = blocks[:-1] + [fc_weight, blocks[-1]]
    return torch.cat(out, dim=1) if flatten else out


def _gradient_parts(encoder: LeNetEncoder, images: torch.Tensor, labels: torch.Tensor):
    """Per-sample gradients of every parameter but the fc weight ([K, numel] blocks in
    parameters() order, fc bias last), plus its factors: dL/dW_fc = delta features^T."""
    params = [p.detach() for p in encoder.parameters()]
    acts, x = [images], images
    for i, conv in enumerate(encoder.convs):
        x = torch.sigmoid(F.conv2d(x, params[2 * i], params[2 * i + 1], conv.stride, conv.padding))
        acts.append(x)
    k = images.shape[0]
    features = x.flatten(1)
    fc_w, fc_b = params[-2], params[-1]
    logits = F.linear(features, fc_w, fc_b)
    # d CE / d logits = softmax - onehot (batch of one per problem, so mean == sum)
    delta = torch.softmax(logits, dim=1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    out = [delta]
    delta_act = (delta @ fc_w).view_as(x)
    for i in range(len(encoder.convs) - 1, -1, -1):
        conv, a, a_prev = encoder.convs[i], acts[i + 1], acts[i]
        delta_pre = delta_act * a * (1 - a)  # sigmoid'
        cols = F.unfold(a_prev, conv.kernel_size, padding=conv.padding, stride=conv.stride)
        # cols @ delta^T, then transpose the small result: the backward's gradient w.r.t.
        # cols then comes out contiguous for col2im (no transposed copy of [K, C k k, L]).
        grad_w = torch.bmm(cols, delta_pre.flatten(2).transpose(1, 2)).transpose(1, 2)
        out = [grad_w.reshape(k, -1), delta_pre.sum((2, 3))] + out
        if i > 0:
            w = params[2 * i]
            out_pad = [a_prev.shape[d + 2] - ((a.shape[d + 2] - 1) * conv.stride[d] - 2 * conv.padding[d]
                                                + conv.kernel_size[d]) for d in range(2)]
            delta_act = F.conv_transpose2d(delta_pre, w, stride=conv.stride, padding=conv.padding,
                                           output_padding=out_pad)
    return [t.reshape(k, -1) for t in out], delta, features


def recover_labels(grads, encoder: Optional[nn.Module] = None) -> torch.Tensor:
    """iDLG label recovery, batched: argmin_c sum_j dL/dW^fc_{c,j} -> [K] int64.

    The sigmoid features are positive, so only the true class's row of the last linear
    layer's weight gradient sums to a negative value (specs/glfc.md 1.7).
    `grads`: a flat [K, P] tensor (needs `encoder` for the layout) or a list of
    per-parameter [K, ...] tensors whose second-to-last entry is the fc weight gradient.
    """
    if isinstance(grads, (list, tuple)):
        if len(grads) < 2:
            raise ValueError(f"grads must list at least the fc weight and bias gradients, got {len(grads)} tensors")
        fc_weight = grads[-2]
        check_floating(fc_weight, "grads[-2]")
        if fc_weight.dim() != 3:
            raise ValueError(f"grads[-2] must be the fc weight gradient [K, classes, features], got shape "
                             f"{tuple(fc_weight.shape)}")
    else:
        check_floating(grads, "grads")
        if grads.dim() != 2:
            raise ValueError(f"grads must be a flat [K, P] tensor or a list, got shape {tuple(grads.shape)}")
        if encoder is None:
            raise ValueError("encoder is needed to find the fc weight gradient in a flat [K, P] grads tensor")
        s = parameter_layout(encoder)[-2]
        fc_weight = grads[:, s.start:s.stop].view(grads.shape[0], *s.shape)
    return fc_weight.sum(dim=2).argmin(dim=1)


# ---- batched L-BFGS --------------------------------------------------------------

Objective = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


class BatchedLBFGS:
    """K independent torch.optim.LBFGS runs (line_search_fn=None) in lockstep.

    Each problem k follows exactly what LBFGS([x_k], lr, max_iter, max_eval, tolerance_grad,
    tolerance_change, history_size).step(closure_k) would do, step after step: first-step
    scaling t = min(1, 1/|g|_1) lr, curvature check ys > 1e-10, H_diag = ys/yy, the
    max_iter / max_eval / tolerance breaks, and state carried across step() calls. Problems
    that broke out of the inner loop are masked; those still running share one objective
    call per inner iteration.

    `objective(x_rows, idx)` returns (loss [n], grad [n, D]) for the problems `idx` at the
    points `x_rows` [n, D]; problem k's gradient must depend on x_k alone.

    With rollback_nonfinite=True (default) a problem whose loss turns NaN/Inf is rolled back to its
    best (lowest-loss) iterate and stopped for good (`stopped`); with False it keeps iterating as
    torch.optim.LBFGS would (NaN in, NaN out). The others are not affected either way.
    """

    def __init__(self, x0: torch.Tensor, *, lr: float = 1.0, max_iter: int = 20, max_eval: Optional[int] = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100,
                 rollback_nonfinite: bool = True):
        check_floating(x0, "x0")
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [K, D], got shape {tuple(x0.shape)}")
        self.lr = check_nonneg(lr, "lr")
        self.max_iter = check_count(max_iter, "max_iter")
        history_size = check_count(history_size, "history_size")
        self.max_eval = check_count(max_eval, "max_eval") if max_eval is not None else self.max_iter * 5 // 4
        self.tolerance_grad = check_nonneg(tolerance_grad, "tolerance_grad")
        self.tolerance_change = check_nonneg(tolerance_change, "tolerance_change")
        self.rollback_nonfinite = check_flag(rollback_nonfinite, "rollback_nonfinite")
        k, dim = x0.shape
        opts = dict(dtype=x0.dtype, device=x0.device)
        self.x = x0.detach().clone()
        self.d = torch.zeros(k, dim, **opts)
        self.t = torch.zeros(k, **opts)
        self.s_hist = torch.zeros(k, history_size, dim, **opts)
        self.y_hist = torch.zeros(k, history_size, dim, **opts)
        self.rho = torch.zeros(k, history_size, **opts)
        self.hist_len = torch.zeros(k, dtype=torch.int64, device=x0.device)
        self.hist_start = torch.zeros(k, dtype=torch.int64, device=x0.device)
        self.h_diag = torch.ones(k, **opts)
        self.prev_grad = torch.zeros(k, dim, **opts)
        self.prev_loss = torch.zeros(k, dtype=torch.float64, device=x0.device)
        self.n_iter = torch.zeros(k, dtype=torch.int64, device=x0.device)
        self.func_evals = torch.zeros(k, dtype=torch.int64, device=x0.device)
        self.stopped = torch.zeros(k, dtype=torch.bool, device=x0.device)
        self.best_loss = torch.full((k,), math.inf, dtype=torch.float64, device=x0.device)
        self.best_x = self.x.clone()
        # The objective at the current x, when the last inner iteration evaluated it there
        # (LBFGS re-evaluates it at the start of the next step: same x, same value).
        self._cached = torch.zeros(k, dtype=torch.bool, device=x0.device)
        self._loss = torch.zeros(k, **opts)
        self._grad = torch.zeros(k, dim, **opts)

    def _evaluate(self, objective: Objective, rows: torch.Tensor) -> torch.Tensor:
        """Objective for problems `rows` (int64 indices) at the current x; returns those that went non-finite."""
        loss, grad = objective(self.x[rows], rows)
        loss, grad = loss.detach().to(self.x.dtype), grad.detach().to(self.x.dtype)
        self._loss[rows] = loss
        self._grad[rows] = grad
        self.func_evals[rows] += 1
        loss64 = loss.to(torch.float64)
        finite = torch.isfinite(loss64)
        better = finite & (loss64 < self.best_loss[rows])
        if bool(better.any()):
            b = rows[better]
            self.best_loss[b] = loss64[better]
            self.best_x[b] = self.x[b]
        bad = rows[~finite]
        if not self.rollback_nonfinite:
            return bad[:0]
        if bad.numel():
            self.x[bad] = self.best_x[bad]
            self.stopped[bad] = True
            self._cached[bad] = False
        return bad

    @torch.no_grad()
    def step(self, objective: Objective) -> torch.Tensor:
        """One LBFGS.step(closure) on every problem not stopped; returns the losses at the step's start."""
        k = self.x.shape[0]
        device = self.x.device
        all_rows = torch.arange(k, device=device)
        todo = all_rows[~self.stopped & ~self._cached]
        if todo.numel():
            with torch.enable_grad():
                self._evaluate(objective, todo)
        self.func_evals[~self.stopped & self._cached] += 1  # a cached closure() still counts
        orig_loss = self._loss.clone()
        running = ~self.stopped & ~(self._grad.abs().amax(1) <= self.tolerance_grad)
        current_evals = 1
        inner = 0
        self._cached[:] = True  # until x moves without an evaluation
        while bool(running.any()):
            inner += 1
            self.n_iter += running
            first = running & (self.n_iter == 1)
            later = running & ~first
            grad = self._grad
            if bool(first.any()):
                self.hist_len[first] = 0
                self.hist_start[first] = 0
                self.h_diag[first] = 1
            if bool(later.any()):
                rows = all_rows[later]
                y = grad[rows] - self.prev_grad[rows]
                s = self.d[rows] * self.t[rows, None]
                ys = (y * s).sum(1)
                accept = ys > 1e-10
                if bool(accept.any()):
                    self._push(rows[accept], s[accept], y[accept], ys[accept])
            # first problems have an empty history and h_diag 1, so this is -g for them
            use_len = torch.where(running, self.hist_len, torch.zeros_like(self.hist_len))
            direction = ops.lbfgs_direction(grad, self.s_hist, self.y_hist, self.rho, use_len, self.h_diag,
                                            hist_start=self.hist_start)
            self.d = torch.where(running[:, None], direction, self.d)
            self.prev_grad = torch.where(running[:, None], grad, self.prev_grad)
            self.prev_loss = torch.where(running, self._loss.to(torch.float64), self.prev_loss)
            inv_l1 = 1.0 / grad.abs().sum(1)
            t_first = torch.where(inv_l1 < 1.0, inv_l1 * self.lr, torch.full_like(inv_l1, self.lr))
            self.t = torch.where(first, t_first, torch.where(running, torch.full_like(t_first, self.lr), self.t))
            gtd = (grad * self.d).sum(1)
            moving = running & ~(gtd > -self.tolerance_change)
            if not bool(moving.any()):
                break
            self.x.add_(torch.where(moving[:, None], self.d * self.t[:, None], torch.zeros_like(self.d)))
            opt_cond = torch.zeros_like(moving)
            if inner != self.max_iter:
                rows = all_rows[moving]
                with torch.enable_grad():
                    bad = self._evaluate(objective, rows)
                if bad.numel():
                    moving[bad] = False
                opt_cond = self._grad.abs().amax(1) <= self.tolerance_grad
                current_evals += 1
            else:
                self._cached[moving] = False
            if inner == self.max_iter or current_evals >= self.max_eval:
                break
            lack_of_progress = (self.d * self.t[:, None]).abs().amax(1) <= self.tolerance_change
            small_change = (self._loss.to(torch.float64) - self.prev_loss).abs() < self.tolerance_change
            running = moving & ~opt_cond & ~lack_of_progress & ~small_change
        return orig_loss

    def _push(self, rows, s, y, ys):
        """Append (s, y) to the ring buffers of `rows`; a full history drops its oldest pair."""
        m = self.s_hist.shape[1]
        length, start = self.hist_len[rows], self.hist_start[rows]
        full = length == m
        slot = torch.where(full, start, (start + length) % m)
        self.s_hist[rows, slot] = s
        self.y_hist[rows, slot] = y
        self.rho[rows, slot] = 1.0 / ys
        self.hist_start[rows] = torch.where(full, (start + 1) % m, start)
        self.hist_len[rows] = torch.where(full, length, length + 1)
        self.h_diag[rows] = ys / (y * y).sum(1)


# ---- reconstruction --------------------------------------------------------------

@dataclass
class ReconstructionResult:
    """images: the iterates after each of the last keep_last steps [K, min(keep_last, steps), C, H, W]
    (oldest first; GLFC keeps steps 230..249 of 250 as its 20 monitor images per gradient);
    losses: the matching loss at the final iterate [K]; labels [K];
    stopped: problems rolled back after a NaN/Inf loss [K]; func_evals: objective evaluations [K]."""
    images: torch.Tensor
    losses: torch.Tensor
    labels: torch.Tensor
    stopped: torch.Tensor
    func_evals: torch.Tensor


def _initial_images(init, k, shape, dtype, device, generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(init, (str, torch.Tensor)):
        raise TypeError(f"init must be 'normal', 'uniform' or a [K, C, H, W] tensor, got {type(init).__name__}")
    if isinstance(init, torch.Tensor):
        if init.shape != (k, *shape):
            raise ValueError(f"init must be [K, C, H, W] = {(k, *shape)}, got shape {tuple(init.shape)}")
        return init.detach().to(dtype=dtype, device=device).clone()
    if init == "normal":
        return torch.randn((k, *shape), generator=generator, dtype=dtype, device=device)
    if init == "uniform":
        return torch.rand((k, *shape), generator=generator, dtype=dtype, device=device)
    raise ValueError(f"init must be 'normal', 'uniform' or a [K, C, H, W] tensor, got {init!r}")


def _check_common(encoder, target, labels, optimizer, metric, steps, keep_last, lr, max_iter, history_size):
    if not isinstance(encoder, LeNetEncoder):
        raise TypeError(f"encoder must be a LeNetEncoder, got {type(encoder).__name__}")
    p = sum(t.numel() for t in encoder.parameters())
    if target.shape[1] != p:
        raise ValueError(f"target_grads must have P = {p} columns (the encoder's parameter count), "
                         f"got shape {tuple(target.shape)}")
    check_choice(optimizer, ("lbfgs", "adam"), "optimizer")
    check_choice(metric, ops.MATCHING_METRICS, "metric")
    check_count(steps, "steps")
    check_count(keep_last, "keep_last")
    check_positive(lr, "lr")
    check_count(max_iter, "max_iter")
    check_count(history_size, "history_size")
    if labels is None:
        labels = recover_labels(target, encoder)
    if isinstance(labels, torch.Tensor) and (labels.is_floating_point() or labels.is_complex()
                                             or labels.dtype == torch.bool):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    try:
        labels = torch.as_tensor(labels, device=target.device).long()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"labels must be a [K] integer tensor or sequence, got {type(labels).__name__}") from err
    if labels.shape != (target.shape[0],):
        raise ValueError(f"labels must be [K] = [{target.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= encoder.num_classes):
        raise ValueError(f"labels must be class ids in [0, {encoder.num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def _matching_objective(encoder, target, labels, metric):
    """objective(x_rows, idx) -> (loss [n], d loss / d x [n, D]) for problems idx, in one batch."""
    shape, k = encoder.input_shape, target.shape[0]
    layout = parameter_layout(encoder)
    if metric == "l2":
        # l2 is a sum over parameters: match block by block against contiguous target
        # blocks (no concatenation). The fc weight block (90 % of P) is never formed:
        # |delta f^T - T|^2 = |delta|^2 |f|^2 - 2 delta^T T f + |T|^2, in float64 so the
        # cancellation near a match costs nothing (float64 rounding on terms ~|T|^2).
        blocks = [target[:, s.start:s.stop].contiguous() for s in layout]
        fc = layout[-2]
        fc_target = blocks.pop(-2).view(k, *fc.shape).double()
        fc_target_sq = fc_target.pow(2).sum((1, 2))

    def objective(x_rows, idx):
        everyone = idx.numel() == k  # skip the gathers when every problem is evaluated
        x = x_rows.detach().view(-1, *shape).requires_grad_(True)
        lab = labels if everyone else labels[idx]
        if metric == "l2":
            parts, delta, features = _gradient_parts(encoder, x, lab)
            loss = None
            for g, t in zip(parts, blocks):
                term = ops.gradient_matching_loss(g, t if everyone else t[idx], metric="l2")
                loss = term if loss is None else loss + term
            t_fc = fc_target if everyone else fc_target[idx]
            d64, f64 = delta.double(), features.double()
            cross = (d64 * torch.bmm(t_fc, f64.unsqueeze(2)).squeeze(2)).sum(1)
            fc_term = d64.pow(2).sum(1) * f64.pow(2).sum(1) - 2 * cross + (
                fc_target_sq if everyone else fc_target_sq[idx])
            loss = loss + fc_term.to(loss.dtype)
        else:
            grads = per_sample_gradients(encoder, x, lab)
            loss = ops.gradient_matching_loss(grads, target if everyone else target[idx], metric=metric)
        gx, = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), gx.reshape(x_rows.shape)
    return objective


@torch.no_grad()
def _final_losses(encoder, x, target, labels, metric):
    grads = per_sample_gradients(encoder, x, labels)
    return ops.gradient_matching_loss(grads, target, metric=metric)


def reconstruct_from_gradients(encoder: LeNetEncoder, target_grads, labels=None, *, steps: int = 250,
                               optimizer: str = "lbfgs", lr: float = 0.1, max_iter: int = 20,
                               history_size: int = 100, keep_last: int = 20, metric: str = "l2",
                               init: Union[str, torch.Tensor] = "normal",
                               generator: Optional[torch.Generator] = None, tolerance_grad: float = 1e-7,
                               tolerance_change: float = 1e-9,
                               rollback_nonfinite: bool = True) -> ReconstructionResult:
    """Rebuild K images from their encoder gradients, all problems at once.

    target_grads: [K, P] (encode_gradients layout) or a list of per-parameter [K, ...] tensors;
    its dtype is the working dtype. labels: [K], recovered with iDLG when None.
    optimizer "lbfgs": per problem exactly torch.optim.LBFGS(lr, max_iter, history_size)
    stepped `steps` times (BatchedLBFGS); "adam": torch.optim.Adam(lr), elementwise, hence
    also per-problem exact. init: "normal" (GLFC: N(0, 1)), "uniform" or a [K, C, H, W] tensor.
    tolerance_grad / tolerance_change: LBFGS's (torch >= 1.4 defaults; GLFC ran torch 1.2: 1e-5 / 1e-9).
    rollback_nonfinite: a problem whose loss turns NaN/Inf is rolled back to its best iterate and
    stopped (lbfgs only); False keeps iterating as torch.optim.LBFGS does.
    """
    target = _flatten_target(target_grads, encoder).detach()
    labels = _check_common(encoder, target, labels, optimizer, metric, steps, keep_last, lr, max_iter, history_size)
    k, shape = target.shape[0], encoder.input_shape
    x0 = _initial_images(init, k, shape, target.dtype, target.device, generator)
    encoder = _working_encoder(encoder, target)
    objective = _matching_objective(encoder, target, labels, metric)
    keep = []
    if optimizer == "lbfgs":
        opt = BatchedLBFGS(x0.view(k, -1), lr=lr, max_iter=max_iter, history_size=history_size,
                           tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                           rollback_nonfinite=rollback_nonfinite)
        for step in range(steps):
            opt.step(objective)
            if step >= steps - keep_last:
                keep.append(opt.x.view(k, *shape).clone())
        x, stopped, evals = opt.x.view(k, *shape), opt.stopped, opt.func_evals
    else:
        x, stopped, evals = _adam(objective, x0.view(k, -1), lr, steps, keep_last, keep, shape)
        x = x.view(k, *shape)
    losses = _final_losses(encoder, x, target, labels, metric)
    return ReconstructionResult(torch.stack(keep, 1), losses, labels, stopped.clone(), evals.clone())


def _working_encoder(encoder, target):
    """The encoder in the target's dtype and device (a copy when that differs: never mutate the caller's)."""
    p = next(encoder.parameters())
    if p.dtype == target.dtype and p.device == target.device:
        return encoder
    return copy.deepcopy(encoder).to(dtype=target.dtype, device=target.device)


def _adam(objective, x0, lr, steps, keep_last, keep, shape):
    """Adam on all problems; elementwise, so each problem's trajectory is its own."""
    k = x0.shape[0]
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    stopped = torch.zeros(k, dtype=torch.bool, device=x0.device)
    best_loss = torch.full((k,), math.inf, dtype=torch.float64, device=x0.device)
    best_x = x0.clone()
    rows = torch.arange(k, device=x0.device)
    for step in range(steps):
        loss, grad = objective(x.detach(), rows)
        loss64 = loss.double()
        with torch.no_grad():
            better = torch.isfinite(loss64) & (loss64 < best_loss) & ~stopped
            best_loss[better] = loss64[better]
            best_x[better] = x[better]
            stopped |= ~torch.isfinite(loss64)
            x.grad = torch.where(stopped[:, None], torch.zeros_like(grad), grad)
        opt.step()
        with torch.no_grad():
            x[stopped] = best_x[stopped]
        if step >= steps - keep_last:
            keep.append(x.detach().view(k, *shape).clone())
    return x.detach(), stopped, torch.full((k,), steps, dtype=torch.int64, device=x0.device)


def reconstruct_sequential_reference(encoder: LeNetEncoder, target_grads, labels=None, *, steps: int = 250,
                                     optimizer: str = "lbfgs", lr: float = 0.1, max_iter: int = 20,
                                     history_size: int = 100, keep_last: int = 20, metric: str = "l2",
                                     init: Union[str, torch.Tensor] = "normal",
                                     generator: Optional[torch.Generator] = None,
                                     log_closure: bool = False) -> ReconstructionResult:
    """The reference proxy-server loop (ProxyServer.py:75-132): one problem at a time, a fresh
    torch.optim.LBFGS per problem, the closure sum_params |grad_theta CE(encoder(x), y) - g|^2
    by double backward. log_closure=True adds the reference's extra logging closure() per
    step. Same arguments and result as reconstruct_from_gradients (test oracle, benchmark baseline).
    """
    target = _flatten_target(target_grads, encoder).detach()
    labels = _check_common(encoder, target, labels, optimizer, metric, steps, keep_last, lr, max_iter, history_size)
    k, shape = target.shape[0], encoder.input_shape
    x0 = _initial_images(init, k, shape, target.dtype, target.device, generator)
    encoder = _working_encoder(encoder, target)
    params = list(encoder.parameters())
    per_layer = split_gradients(target, encoder)
    images, losses, evals = [], [], []
    for i in range(k):
        x = x0[i:i + 1].clone().requires_grad_(True)
        y = labels[i:i + 1]
        g_target = [t[i] for t in per_layer]
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS([x], lr=lr, max_iter=max_iter, history_size=history_size)
        else:
            opt = torch.optim.Adam([x], lr=lr)
        calls = [0]

        def matching(create_graph):
            loss = F.cross_entropy(encoder(x), y)
            dy = torch.autograd.grad(loss, params, create_graph=create_graph)
            if metric == "l2":
                return sum(((gx - gy) ** 2).sum() for gx, gy in zip(dy, g_target))
            flat = torch.cat([g.reshape(1, -1) for g in dy], 1)
            return _reference.gradient_matching_loss(flat, target[i:i + 1], metric=metric)[0]

        def closure():
            opt.zero_grad()
            calls[0] += 1
            value = matching(True)
            x.grad, = torch.autograd.grad(value, x)
            return value

        kept = []
        for step in range(steps):
            opt.step(closure)
            if log_closure:
                closure()
            if step >= steps - keep_last:
                kept.append(x.detach()[0].clone())
        images.append(torch.stack(kept))
        losses.append(matching(False).detach())
        evals.append(calls[0])
    return ReconstructionResult(torch.stack(images), torch.stack(losses).to(target.dtype), labels,
                                torch.zeros(k, dtype=torch.bool), torch.tensor(evals))


# ---- privacy metric --------------------------------------------------------------

def psnr(reconstructed: torch.Tensor, original: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (mean over the last three dims: C, H, W).

    Shapes broadcast, e.g. reconstructed [K, T, C, H, W] against original [K, 1, C, H, W].
    Identical images give +inf.
    """
    for x, name in ((reconstructed, "reconstructed"), (original, "original")):
        check_tensor(x, name)
        if x.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dims (C, H, W), got shape {tuple(x.shape)}")
    data_range = check_positive(data_range, "data_range")
    mse = (reconstructed.double() - original.double()).pow(2).mean(dim=(-3, -2, -1))
    return 10 * torch.log10(data_range ** 2 / mse)
