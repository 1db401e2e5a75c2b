"""Offline datasets that need no download.

bundled_digits: scikit-learn's `load_digits` (1,797 8×8 grey digits, 10 classes, shipped inside the
  scikit-learn package), scaled to 0-255, resized to data.image_size, replicated to 3 channels.
  Deterministic split: per class, a fixed permutation (seed 0), the first 80 % train, the rest test.
synthetic: random class-dependent patterns (for tests): data.num_classes classes ×
  data.samples_per_class images, 75 % train / 25 % test, generated from a fixed seed.
"""
from __future__ import annotations

import numpy as np
import torch

from python_api.data.common import ImageTensors, register_dataset, resize_uint8

__all__ = ["load_bundled_digits", "load_synthetic", "split_per_class"]


def split_per_class(labels: np.ndarray, train_fraction: float, seed: int = 0):
    rng = np.random.RandomState(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(train_fraction * len(idx)))
        train_idx.append(np.sort(idx[:k]))
        test_idx.append(np.sort(idx[k:]))
    return np.concatenate(train_idx), np.concatenate(test_idx)


@register_dataset("bundled_digits")
def load_bundled_digits(data_cfg):
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    images = resize_uint8(images, data_cfg.image_size).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    tr, te = split_per_class(digits.target, 0.8, seed=0)
    names = [str(i) for i in range(10)]
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return ImageTensors(images[tr], labels[tr], names), ImageTensors(images[te], labels[te], names)


@register_dataset("synthetic")
def load_synthetic(data_cfg):
    """Each class = a fixed random low-frequency colour pattern + per-image noise and shift."""
    num_classes = data_cfg.num_classes or 10
    n = data_cfg.samples_per_class
    size = data_cfg.image_size
    g = torch.Generator().manual_seed(12345)
    base = torch.rand(num_classes, 3, 4, 4, generator=g)
    protos = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.arange(num_classes).repeat_interleave(n)
    noise = 0.15 * torch.randn(num_classes * n, 3, size, size, generator=g)
    images = ((protos[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    tr, te = split_per_class(labels.numpy(), 0.75, seed=0)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    names = [f"class{i}" for i in range(num_classes)]
    return ImageTensors(images[tr], labels[tr], names), ImageTensors(images[te], labels[te], names)
