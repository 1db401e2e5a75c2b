"""Gradient-inversion privacy audit of your own model with fcl_ext.reconstruct.

Question: if a client shares the gradient of one training sample (as GLFC's clients do for their
prototypes, or any FedSGD client with batch size 1), how much of the image can a server rebuild?
The usual audit is a DLG loop: for each image, a fresh torch.optim.LBFGS on a random image that
minimises |grad(candidate) - grad(shared)|^2 by double backward (GLFC's ProxyServer.py:75-132):

    for k in range(K):
        x = torch.randn(1, *shape, requires_grad=True)
        opt = torch.optim.LBFGS([x], lr=0.1)
        def closure():
            opt.zero_grad()
            dy = torch.autograd.grad(F.cross_entropy(model(x), y[k:k+1]), model.parameters(), create_graph=True)
            loss = sum(((g - t) ** 2).sum() for g, t in zip(dy, target[k]))
            loss.backward()
            return loss
        for _ in range(steps):
            opt.step(closure)

fcl_ext.reconstruct runs all K problems at once, each following exactly what torch.optim.LBFGS does on
it alone, and recovers the labels from the gradients (iDLG). Your model must be a LeNetEncoder
(the sigmoid LeNet GLFC uses, any input size and class count); load your weights into it.

Run: python examples/privacy_audit.py   (8 digit images, 8x8, CPU, seconds)
"""
import argparse
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from fcl_ext.reconstruct import LeNetEncoder, encode_gradients, psnr, reconstruct_from_gradients


def private_images(k: int = 8, dtype=torch.float64):
    """k images of scikit-learn's bundled digits (offline), [k, 1, 8, 8] in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:k] / 16.0, dtype=dtype).unsqueeze(1)
    return x, torch.tensor(digits.target[:k], dtype=torch.long)


def own_model(x: torch.Tensor, y: torch.Tensor, steps: int = 20, seed: int = 0) -> LeNetEncoder:
    """Stands for your trained model: a LeNetEncoder for 1x8x8 inputs and 10 classes, trained a little."""
    model = LeNetEncoder(in_channels=1, image_size=8, num_classes=10, seed=seed).to(x.dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def audit(model: LeNetEncoder, x: torch.Tensor, y: torch.Tensor, *, steps: int = 30, max_iter: int = 20,
          seed: int = 0, leak_db: float = 20.0, init: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Reconstruct every image from its shared gradient; PSNR (dB) per image, and which ones leak.
    init: the starting images [K, C, H, W] (default: N(0, 1) drawn from `seed`)."""
    shared = encode_gradients(model, x, y)  # [K, P]: one gradient per image, what would be sent
    result = reconstruct_from_gradients(model, shared, steps=steps, max_iter=max_iter, keep_last=1,
                                        init="normal" if init is None else init,
                                        generator=torch.Generator().manual_seed(seed))
    rebuilt = result.images[:, -1]
    quality = psnr(rebuilt.clamp(0, 1), x)
    return {"images": rebuilt, "labels": result.labels, "psnr": quality, "leaks": quality > leak_db,
            "matching_loss": result.losses}


def audit_one_by_one(model: LeNetEncoder, x: torch.Tensor, y: torch.Tensor, init: torch.Tensor, *,
                     steps: int = 30, max_iter: int = 20) -> torch.Tensor:
    """The DLG loop fcl_ext.reconstruct replaces (one torch.optim.LBFGS per image), from `init`."""
    params = list(model.parameters())
    shared = encode_gradients(model, x, y)
    sizes = [p.numel() for p in params]
    out = []
    for k in range(x.shape[0]):
        target = [t.view_as(p) for t, p in zip(shared[k].split(sizes), params)]
        cand = init[k:k + 1].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([cand], lr=0.1, max_iter=max_iter, history_size=100)

        def closure():
            opt.zero_grad()
            dy = torch.autograd.grad(F.cross_entropy(model(cand), y[k:k + 1]), params, create_graph=True)
            loss = sum(((g - t) ** 2).sum() for g, t in zip(dy, target))
            cand.grad, = torch.autograd.grad(loss, cand)
            return loss

        for _ in range(steps):
            opt.step(closure)
        out.append(cand.detach()[0])
    return torch.stack(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    x, y = private_images(args.images)
    model = own_model(x, y)
    report = audit(model, x, y, steps=args.steps)
    print(f"labels recovered from gradients: {report['labels'].tolist()} (true {y.tolist()})")
    for k, (db, leak) in enumerate(zip(report["psnr"].tolist(), report["leaks"].tolist())):
        print(f"image {k}: PSNR {db:6.1f} dB {'LEAKS' if leak else ''}")
    return report


if __name__ == "__main__":
    main()
