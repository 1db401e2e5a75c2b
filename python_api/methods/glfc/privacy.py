"""The gradient-encoding / reconstruction path of GLFC, on top of `fcl_ext.reconstruct` (issue 5).

    encoder = build_encoder(in_channels, image_size, num_classes, seed, device)   # the fixed random LeNet
    grads = encode(encoder, images, labels)             # [K, P] per-prototype parameter gradients
    labels = recover(encoder, grads)                    # iDLG rule on the fc-weight gradient
    iterates = reconstruct(encoder, grads, labels, proxy_cfg)   # [K, keep_last, C, H, W]

Every party rebuilds the same encoder from `seed` (the reference shares one object, spec §1.6-3);
the weights are the same whether fcl_ext.reconstruct is available or not (`lenet_init_`).
When this build of fcl_ext has no `reconstruct` module yet, a plain-PyTorch fallback with the
reference's semantics is used (sequential torch.optim.LBFGS per problem, slow but equivalent).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # issue 5; the trainer also runs before it lands
    from fcl_ext import reconstruct as _fx_reconstruct
except Exception:  # pragma: no cover - depends on the build
    _fx_reconstruct = None

__all__ = ["build_encoder", "encode", "recover", "reconstruct", "lenet_init_", "HAVE_FCL_EXT_RECONSTRUCT"]

HAVE_FCL_EXT_RECONSTRUCT = _fx_reconstruct is not None
_warned: list = []


class _FallbackLeNet(nn.Module):
    """The reference LeNet (myNetwork.py:32-52): 3 sigmoid convs (12 ch) + Linear; U(-0.5, 0.5) init."""

    def __init__(self, in_channels=3, image_size=32, num_classes=100):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, 5, stride=2, padding=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, stride=2, padding=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, stride=1, padding=2), nn.Sigmoid())
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.fc = nn.Linear(12 * side * side, num_classes)
        lenet_init_(self, 0)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


@torch.no_grad()
def lenet_init_(encoder: nn.Module, seed: int) -> nn.Module:
    """U(-0.5, 0.5) for every weight and bias (myNetwork.py:55-65), drawn in parameters() order from
    a private generator seeded with `seed` (float64 draws, then cast): one rule for every build, and
    the run's global RNG streams are not touched."""
    gen = torch.Generator().manual_seed(int(seed))
    for p in encoder.parameters():
        p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).sub_(0.5).to(p.dtype))
    return encoder


def build_encoder(in_channels: int, image_size: int, num_classes: int, seed: int, device) -> nn.Module:
    """The fixed random LeNet; same weights with or without fcl_ext.reconstruct (both layouts list
    conv1 w/b, conv2 w/b, conv3 w/b, fc w/b in parameters() order)."""
    if _fx_reconstruct is not None:
        enc = _fx_reconstruct.LeNetEncoder(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    else:
        enc = _FallbackLeNet(in_channels, image_size, num_classes)
    lenet_init_(enc, seed)
    enc = enc.to(device).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def _flat_grads(encoder, x, y, create_graph=False):
    params = [p for p in encoder.parameters()]
    loss = F.cross_entropy(encoder(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return torch.cat([g.reshape(-1) for g in grads])


def encode(encoder, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[K, C, H, W] images, [K] labels -> [K, P]: ∇θ CE(encoder(x_k), y_k), one problem per row."""
    if _fx_reconstruct is not None:
        return _fx_reconstruct.encode_gradients(encoder, images, labels)
    with torch.enable_grad():
        for p in encoder.parameters():
            p.requires_grad_(True)
        try:
            return torch.stack([_flat_grads(encoder, images[k:k + 1], labels[k:k + 1]).detach()
                                for k in range(images.shape[0])])
        finally:
            for p in encoder.parameters():
                p.requires_grad_(False)


def _fc_weight_slice(encoder, num_params: int):
    """Where the last Linear's weight sits in the flat gradient (parameter order)."""
    offset, found = 0, None
    last_linear = [m for m in encoder.modules() if isinstance(m, nn.Linear)][-1]
    for p in encoder.parameters():
        if p is last_linear.weight:
            found = (offset, offset + p.numel(), p.shape)
        offset += p.numel()
    return found


def recover(encoder, grads: torch.Tensor) -> torch.Tensor:
    """iDLG: y = argmin_c Σ_j ∂ℓ/∂W_fc[c, j] (only the true row is negative: features are positive)."""
    if _fx_reconstruct is not None and hasattr(_fx_reconstruct, "recover_labels"):
        return _fx_reconstruct.recover_labels(grads, encoder)
    start, stop, shape = _fc_weight_slice(encoder, grads.shape[1])
    return grads[:, start:stop].reshape(grads.shape[0], *shape).sum(-1).argmin(-1)


def reconstruct(encoder, grads: torch.Tensor, labels: torch.Tensor, proxy_cfg, image_shape) -> tuple:
    """Gradient matching from N(0,1) starts with L-BFGS -> (iterates [K, keep_last, C, H, W], final loss [K])."""
    kw = dict(steps=proxy_cfg.steps, optimizer=proxy_cfg.optimizer, lr=proxy_cfg.lr, max_iter=proxy_cfg.max_iter,
              history_size=proxy_cfg.history_size, keep_last=proxy_cfg.keep_last)
    tolerances = dict(tolerance_grad=proxy_cfg.tolerance_grad, tolerance_change=proxy_cfg.tolerance_change)
    if _fx_reconstruct is not None:
        out = _fx_reconstruct.reconstruct_from_gradients(encoder, grads, labels, **kw, **tolerances,
                                                         rollback_nonfinite=proxy_cfg.nonfinite_rollback)
        if hasattr(out, "images"):          # ReconstructionResult
            return out.images, out.losses
        return out[0], out[1]
    if not _warned:
        warnings.warn("fcl_ext.reconstruct is not in this build: using the slow sequential fallback", stacklevel=2)
        _warned.append(True)
    keep = max(1, min(proxy_cfg.keep_last, proxy_cfg.steps))
    for p in encoder.parameters():
        p.requires_grad_(True)
    all_iterates, losses = [], []
    try:
        for k in range(grads.shape[0]):
            x = torch.randn(1, *image_shape, device=grads.device, requires_grad=True)
            opt = torch.optim.LBFGS([x], lr=proxy_cfg.lr, max_iter=proxy_cfg.max_iter,
                                    history_size=proxy_cfg.history_size, **tolerances)
            target, y = grads[k], labels[k:k + 1]

            def closure():
                opt.zero_grad()
                loss = (_flat_grads(encoder, x, y, create_graph=True) - target).pow(2).sum()
                loss.backward()
                return loss
            kept = []
            loss = torch.tensor(float("nan"))
            best_loss, best_x, stopped = math.inf, x.detach().clone(), False
            for step in range(proxy_cfg.steps):
                if not stopped:
                    start = x.detach().clone()
                    loss = opt.step(closure).detach()   # the loss at the step's start point
                    finite = bool(torch.isfinite(loss))
                    if finite and float(loss) < best_loss:
                        best_loss, best_x = float(loss), start
                    if not finite and proxy_cfg.nonfinite_rollback:   # a named fix, not in the reference
                        with torch.no_grad():
                            x.copy_(best_x)
                        stopped = True
                if step >= proxy_cfg.steps - keep:
                    kept.append(x.detach()[0].clone())
            all_iterates.append(torch.stack(kept))
            losses.append(float(loss.detach()))
    finally:
        for p in encoder.parameters():
            p.requires_grad_(False)
    return torch.stack(all_iterates), torch.tensor(losses)
