"""The gradient-encoding / reconstruction path of GLFC, on top of `fcl_ext.reconstruct` (issue 5).

    encoder = build_encoder(in_channels, image_size, num_classes, seed, device)   # the fixed random LeNet
    grads = encode(encoder, images, labels)             # [K, P] per-prototype parameter gradients
    labels = recover(encoder, grads)                    # iDLG rule on the fc-weight gradient
    iterates = reconstruct(encoder, grads, labels, proxy_cfg)   # [K, keep_last, C, H, W]

Every party rebuilds the same encoder from `seed` (the reference shares one object, spec §1.6-3).
When this build of fcl_ext has no `reconstruct` module yet, a plain-PyTorch fallback with the
reference's semantics is used (sequential L-BFGS per problem, slow but equivalent).
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

__all__ = ["build_encoder", "encode", "recover", "reconstruct", "HAVE_FCL_EXT_RECONSTRUCT"]

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
        for p in self.parameters():
            nn.init.uniform_(p, -0.5, 0.5)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def build_encoder(in_channels: int, image_size: int, num_classes: int, seed: int, device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if _fx_reconstruct is not None:
            try:
                enc = _fx_reconstruct.LeNetEncoder(in_channels=in_channels, image_size=image_size,
                                                   num_classes=num_classes, seed=seed)
            except TypeError:
                enc = _fx_reconstruct.LeNetEncoder(in_channels=in_channels, image_size=image_size,
                                                   num_classes=num_classes)
        else:
            enc = _FallbackLeNet(in_channels, image_size, num_classes)
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
    if _fx_reconstruct is not None:
        out = _fx_reconstruct.reconstruct_from_gradients(encoder, grads, labels, **kw)
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
                                    history_size=proxy_cfg.history_size)
            target, y = grads[k], labels[k:k + 1]

            def closure():
                opt.zero_grad()
                loss = (_flat_grads(encoder, x, y, create_graph=True) - target).pow(2).sum()
                loss.backward()
                return loss
            kept = []
            loss = torch.tensor(float("nan"))
            for step in range(proxy_cfg.steps):
                loss = opt.step(closure)
                if step >= proxy_cfg.steps - keep:
                    kept.append(x.detach()[0].clone())
            all_iterates.append(torch.stack(kept))
            losses.append(float(loss.detach()))
    finally:
        for p in encoder.parameters():
            p.requires_grad_(False)
    return torch.stack(all_iterates), torch.tensor(losses)
