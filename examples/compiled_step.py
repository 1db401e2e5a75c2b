"""A training step under torch.compile with fcl_ext's ops inside, without graph breaks.

Every fcl_ext op is a torch.library custom op with a fake (meta) kernel and a registered autograd
formula, so torch.compile traces through the losses as single nodes (the compiled graph calls the
fused CPU/CUDA kernels) and `fullgraph=True` holds: the whole step below is one graph.

    step = torch.compile(loss_of_batch, fullgraph=True)   # raises on any graph break
    loss = step(x, y); loss.backward(); optimizer.step()

The step mixes GLFC's local objective (GLFCLoss with an old model's logits), an entropy term
(SoftmaxEntropy) and FCCL's cross-correlation alignment to a detached target.

Run: python examples/compiled_step.py [--backend aot_eager]   (CPU; inductor compiles in ~a minute
on a small machine, aot_eager in seconds)
"""
import argparse

import torch
from torch import nn

import fcl_ext

IN_DIM, NUM_CLASSES, OLD_CLASSES = 16, 8, 4


def make_models(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN_DIM, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)).to(dtype)
    old_model = nn.Sequential(nn.Linear(IN_DIM, 32), nn.ReLU(), nn.Linear(32, OLD_CLASSES)).to(dtype).eval()
    return model, old_model


class Objective(nn.Module):
    """The per-batch loss: model forward, teachers, and three fcl_ext losses."""

    def __init__(self, model: nn.Module, old_model: nn.Module):
        super().__init__()
        self.model, self.old_model = model, old_model
        self.glfc = fcl_ext.losses.GLFCLoss()
        self.entropy = fcl_ext.losses.SoftmaxEntropy()
        self.align = fcl_ext.losses.CrossCorrelationLoss.fccl()
        self.register_buffer("old_classes", torch.arange(OLD_CLASSES))

    def forward(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        with torch.no_grad():
            old_logits = self.old_model(x)
        return (self.glfc(logits, y, self.old_classes, old_logits) + 0.1 * self.entropy(logits)
                + 0.01 * self.align(logits, target))


def make_batch(batch: int = 32, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, IN_DIM, generator=g, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    target = torch.randn(batch, NUM_CLASSES, generator=g, dtype=dtype)
    return x, y, target


def train(compiled: bool, steps: int = 3, backend: str = "inductor", seed: int = 0, dtype=torch.float32):
    """`steps` SGD steps, eager or compiled (fullgraph=True) -> (losses, model)."""
    model, old_model = make_models(seed, dtype)
    objective = Objective(model, old_model)
    step_loss = torch.compile(objective, fullgraph=True, backend=backend) if compiled else objective
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for i in range(steps):
        x, y, target = make_batch(seed=seed + i, dtype=dtype)
        optimizer.zero_grad()
        loss = step_loss(x, y, target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, model


def graph_breaks() -> int:
    """Graph breaks torch._dynamo reports for one step (0 expected)."""
    objective = Objective(*make_models())
    return torch._dynamo.explain(objective)(*make_batch()).graph_break_count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args(argv)
    eager, _ = train(False, args.steps)
    compiled, _ = train(True, args.steps, backend=args.backend)
    print(f"graph breaks: {graph_breaks()}")
    for i, (a, b) in enumerate(zip(eager, compiled)):
        print(f"step {i}: eager {a:.6f}  compiled ({args.backend}, fullgraph) {b:.6f}")
    return eager, compiled


if __name__ == "__main__":
    main()
