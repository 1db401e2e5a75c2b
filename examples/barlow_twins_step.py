"""Barlow Twins training step with fcl_ext's loss in place of the usual one.

The official code (facebookresearch/barlowtwins, main.py) computes the loss inside the model:

    self.bn = nn.BatchNorm1d(sizes[-1], affine=False)      # SyncBatchNorm under DDP
    c = self.bn(z1).T @ self.bn(z2)
    c.div_(self.args.batch_size)                             # the global batch size
    torch.distributed.all_reduce(c)
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = off_diagonal(c).pow_(2).sum()
    loss = on_diag + self.args.lambd * off_diag

With fcl_ext those lines become one module (no BatchNorm layer to keep, no all_reduce to write):

    criterion = fcl_ext.losses.CrossCorrelationLoss.barlow_twins(lambd=0.0051, gather_distributed=True)
    loss = criterion(z1, z2)

lightly's `BarlowTwinsLoss(lambda_param=5e-3, gather_distributed=True)` maps to
`CrossCorrelationLoss.barlow_twins(lambd=5e-3, gather_distributed=True, batch_stats="local")`.

Run: python examples/barlow_twins_step.py   (a few steps on random "images", CPU, seconds)
"""
import argparse

import torch
from torch import nn

import fcl_ext


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class OfficialBarlowTwinsLoss(nn.Module):
    """The loss lines of the official BarlowTwins.forward, transcribed for one process (the
    all_reduce is a no-op there): the code this example replaces."""

    def __init__(self, dim: int, batch_size: int, lambd: float = 0.0051):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.batch_size = batch_size
        self.lambd = lambd

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        c = self.bn(z1).T @ self.bn(z2)
        c.div_(self.batch_size)
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = off_diagonal(c).pow_(2).sum()
        return on_diag + self.lambd * off_diag


def make_model(in_dim: int = 32, hidden: int = 64, out_dim: int = 16, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small backbone + Barlow Twins projector (Linear-BN-ReLU, Linear)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out_dim, bias=False)).to(dtype)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Two views of a batch: additive noise and a random per-feature scale."""
    scale = 1 + 0.1 * torch.randn(x.shape[1], generator=generator, dtype=x.dtype)
    return x * scale + 0.2 * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, y1: torch.Tensor,
               y2: torch.Tensor) -> float:
    """One Barlow Twins step: both views through the same network, the loss, backward, step."""
    optimizer.zero_grad()
    loss = criterion(model(y1), model(y2))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train(criterion: nn.Module, steps: int = 5, batch_size: int = 64, seed: int = 0,
          dtype: torch.dtype = torch.float32):
    """`steps` steps from a fixed initialisation and data stream -> (losses, model)."""
    model = make_model(seed=seed, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        x = torch.randn(batch_size, 32, generator=g, dtype=dtype)
        losses.append(train_step(model, criterion, optimizer, augment(x, g), augment(x, g)))
    return losses, model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    ours, _ = train(fcl_ext.losses.CrossCorrelationLoss.barlow_twins(lambd=0.0051), args.steps, args.batch_size)
    official, _ = train(OfficialBarlowTwinsLoss(16, args.batch_size, lambd=0.0051), args.steps, args.batch_size)
    for step, (a, b) in enumerate(zip(ours, official)):
        print(f"step {step:3d}  fcl_ext {a:10.5f}  official {b:10.5f}")
    return ours, official


if __name__ == "__main__":
    main()
