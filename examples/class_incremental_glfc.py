"""A plain PyTorch class-incremental loop (iCaRL / PyCIL style) switched to GLFC's loss in three lines.

The loop: classes arrive in tasks; the head grows; an exemplar memory keeps a few samples of every
seen class; the model of the previous task is frozen as a teacher. iCaRL's loss is BCE to one-hot
targets whose old-class entries are the teacher's sigmoid outputs:

    target = F.one_hot(labels, num_classes).float()
    target[:, :old_logits.shape[1]] = torch.sigmoid(old_logits)
    loss = F.binary_cross_entropy_with_logits(logits, target)

The three lines that switch it to GLFC's local objective (gradient-compensated BCE + relation
distillation, GLFC.py:189-245):

    criterion = fcl_ext.losses.GLFCLoss()                        # 1. the module (0.5 L_GC + 0.5 L_RD)
    old_class_mask = torch.tensor(sorted(memory.classes))        # 2. the classes with exemplars
    loss = criterion(logits, labels, old_class_mask, old_logits)  # 3. replaces the three iCaRL lines

(`fcl_ext.losses.RelationDistillationLoss()(logits, labels, old_logits)` is exactly the iCaRL loss.)

Run: python examples/class_incremental_glfc.py   (3 tasks of 2 classes on Gaussian blobs, seconds)
"""
import argparse
import copy
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fcl_ext

DIM = 10


def make_stream(num_classes: int = 6, per_class: int = 60, seed: int = 0, dtype=torch.float32):
    """Gaussian blobs, one per class: (x [N, DIM], y [N]) train and test splits."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, DIM, generator=g, dtype=dtype)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = centres[y] + torch.randn(len(y), DIM, generator=g, dtype=dtype)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    half = len(y) // 2
    return (x[:half], y[:half]), (x[half:], y[half:])


class IncrementalNet(nn.Module):
    """Feature extractor + a linear head that grows (old rows copied, as GLFC's myNetwork does)."""

    def __init__(self, num_classes: int, dtype=torch.float32):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU()).to(dtype)
        self.fc = nn.Linear(32, num_classes).to(dtype)

    def expand(self, num_classes: int) -> None:
        old = self.fc
        self.fc = nn.Linear(old.in_features, num_classes).to(old.weight.dtype)
        with torch.no_grad():
            self.fc.weight[:old.out_features] = old.weight
            self.fc.bias[:old.out_features] = old.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def icarl_loss(logits, labels, old_logits):
    """The iCaRL / PyCIL line this example replaces: BCE to [sigmoid(old) || one-hot]."""
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    if old_logits is not None:
        target[:, :old_logits.shape[1]] = torch.sigmoid(old_logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def train(loss: str = "glfc", tasks: int = 3, classes_per_task: int = 2, epochs: int = 15, memory_per_class: int = 5,
          seed: int = 0, dtype=torch.float32, criterion: Optional[Callable] = None) -> Dict[str, object]:
    """The loop. loss="icarl" (the original line) or "glfc" (the three-line switch; `criterion`
    replaces GLFCLoss() for comparisons). Returns the per-task test accuracy on all seen classes
    and the final model."""
    (x_train, y_train), (x_test, y_test) = make_stream(tasks * classes_per_task, seed=seed, dtype=dtype)
    torch.manual_seed(seed)
    model = IncrementalNet(classes_per_task, dtype)
    old_model: Optional[nn.Module] = None
    memory: Dict[int, torch.Tensor] = {}  # class -> exemplars
    criterion = criterion or fcl_ext.losses.GLFCLoss()  # 1
    accuracies = []
    for task in range(tasks):
        seen = (task + 1) * classes_per_task
        if task > 0:
            model.expand(seen)
        new = (y_train >= seen - classes_per_task) & (y_train < seen)
        x = torch.cat([x_train[new]] + [memory[c] for c in sorted(memory)])
        y = torch.cat([y_train[new]] + [torch.full((len(memory[c]),), c) for c in sorted(memory)])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(seed + task)
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=g).split(16):
                logits = model(x[idx])
                with torch.no_grad():
                    old_logits = old_model(x[idx]) if old_model is not None else None
                if loss == "icarl":
                    batch_loss = icarl_loss(logits, y[idx], old_logits)
                else:
                    old_class_mask = torch.tensor(sorted(memory), dtype=torch.long)  # 2
                    batch_loss = criterion(logits, y[idx], old_class_mask, old_logits)  # 3
                optimizer.zero_grad()
                batch_loss.backward()
                optimizer.step()
        for c in range(seen - classes_per_task, seen):  # exemplars: the first samples of each new class
            memory[c] = x_train[y_train == c][:memory_per_class]
        old_model = copy.deepcopy(model).eval()
        with torch.no_grad():
            test = y_test < seen
            accuracies.append(float((model(x_test[test]).argmax(1) == y_test[test]).float().mean()))
    return {"accuracy": accuracies, "model": model}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    for loss in ("icarl", "glfc"):
        acc = train(loss, epochs=args.epochs)["accuracy"]
        print(f"{loss:6s} accuracy on seen classes after each task: " + " ".join(f"{a:.3f}" for a in acc))


if __name__ == "__main__":
    main()
