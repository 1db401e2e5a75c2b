"""Decoded datasets as tensors, on-device augmentation, the dataset registry.

    train, test = load_dataset(cfg.data)           # ImageTensors (uint8 NCHW images, int64 labels)
    train = train.to(device)                       # decode once, keep on the device
    aug = DeviceAugment.from_config(cfg.data, device)
    x = aug.train(train.images[idx])               # random crop/flip/brightness + Normalize, batched
    x = aug.test(test.images[idx])                 # Normalize only

Register a new dataset with `register_dataset("name", loader)` where
`loader(data_cfg) -> (train: ImageTensors, test: ImageTensors)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["ImageTensors", "DeviceAugment", "register_dataset", "load_dataset", "available_datasets",
           "resize_uint8", "iterate_batches"]


@dataclass
class ImageTensors:
    """A decoded image set: images uint8 [N, C, H, W] (0-255), labels int64 [N]."""
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def to(self, device) -> "ImageTensors":
        return ImageTensors(self.images.to(device), self.labels.to(device), self.class_names)

    def subset(self, indices: torch.Tensor) -> "ImageTensors":
        return ImageTensors(self.images[indices], self.labels[indices], self.class_names)

    def first_per_class(self, count: Optional[int]) -> "ImageTensors":
        """The first `count` images of every class, in dataset order (all of them when count is None)."""
        if count is None:
            return self
        order = torch.argsort(self.labels, stable=True)
        sorted_labels = self.labels[order]
        starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
        rank = torch.arange(len(order), device=order.device) - starts   # position within its class
        keep = torch.sort(order[rank < count]).values
        return self.subset(keep)

    def indices_of(self, classes) -> torch.Tensor:
        """Indices of the samples whose label is in `classes` (in dataset order)."""
        wanted = torch.zeros(max(self.num_classes, int(self.labels.max()) + 1), dtype=torch.bool,
                             device=self.labels.device)
        wanted[torch.as_tensor(list(classes), dtype=torch.long, device=self.labels.device)] = True
        return torch.nonzero(wanted[self.labels]).flatten()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 NCHW images to size×size (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=images.shape[-1] > size)
    return out.round().clamp(0, 255).to(torch.uint8)


class DeviceAugment:
    """The reference transforms as batched tensor ops on the images' device.

    train: RandomCrop(size, padding=crop_padding) (zero pad), RandomHorizontalFlip(0.5),
           ColorJitter(brightness=b) (factor ~ U[max(0,1-b), 1+b], result clamped to [0,1]), Normalize.
    test:  Normalize. (Images are already at the model's size, resized once at load time.)
    Random numbers come from the global torch RNG of the images' device, so runs are reproducible
    from the seed and resumable from the saved RNG state.
    """

    def __init__(self, mean, std, crop_padding: int = 4, hflip: bool = True, brightness: float = 0.0,
                 device="cpu"):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)
        self.brightness = float(brightness)

    @classmethod
    def from_config(cls, data_cfg, device="cpu") -> "DeviceAugment":
        a = data_cfg.augment
        return cls(data_cfg.mean, data_cfg.std, a.crop_padding, a.hflip, a.brightness, device)

    def _stats(self, channels: int):
        mean, std = self.mean.to(torch.float32), self.std
        if channels != mean.shape[1]:   # grey images with RGB constants: use the channel means
            mean, std = mean.mean(1, keepdim=True).expand(1, channels, 1, 1), std.mean(1, keepdim=True).expand(
                1, channels, 1, 1)
        return mean, std

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """[0,1] float images -> normalised."""
        mean, std = self._stats(x01.shape[1])
        return (x01 - mean) / std

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()

    def test(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.to_unit(images))

    def draw(self, n: int, device) -> dict:
        """The random numbers of augmenting n images (global RNG, in the order augment_unit draws them)."""
        out = {}
        if self.crop_padding > 0:
            p = self.crop_padding
            out["oy"] = torch.randint(0, 2 * p + 1, (n,), device=device)
            out["ox"] = torch.randint(0, 2 * p + 1, (n,), device=device)
        if self.hflip:
            out["flip"] = torch.rand(n, device=device) < 0.5
        if self.brightness > 0:
            lo, hi = max(0.0, 1 - self.brightness), 1 + self.brightness
            out["factor"] = torch.empty(n, device=device).uniform_(lo, hi)
        return out

    def augment_unit(self, x: torch.Tensor, drawn: dict = None) -> torch.Tensor:
        """Random crop/flip/brightness on [0,1] float images (no Normalize); `drawn`: numbers from draw()."""
        n, c, h, w = x.shape
        dev = x.device
        drawn = self.draw(n, dev) if drawn is None else drawn
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            oy, ox = drawn["oy"], drawn["ox"]
            rows = (oy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
            cols = (ox.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
            batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
            chan = torch.arange(c, device=dev).view(1, c, 1, 1)
            x = padded[batch, chan, rows, cols]
        if self.hflip:
            x = torch.where(drawn["flip"].view(n, 1, 1, 1), x.flip(-1), x)
        if self.brightness > 0:
            x = (x * drawn["factor"].view(n, 1, 1, 1)).clamp(0, 1)
        return x

    def train(self, images: torch.Tensor, drawn: dict = None) -> torch.Tensor:
        return self.normalize(self.augment_unit(self.to_unit(images), drawn))


def iterate_batches(n: int, batch_size: int, shuffle: bool, device="cpu", drop_last: bool = False):
    """Index batches over range(n): a permutation from the global RNG when shuffling."""
    order = torch.randperm(n, device=device) if shuffle else torch.arange(n, device=device)
    stop = n - (n % batch_size) if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


_DATASETS: dict = {}


def register_dataset(name: str, loader: Optional[Callable] = None):
    """Register `loader(data_cfg) -> (train, test)`; usable as a decorator."""
    def deco(fn):
        _DATASETS[name] = fn
        return fn
    return deco(loader) if loader is not None else deco


def available_datasets() -> list:
    return sorted(_DATASETS)


def load_dataset(data_cfg):
    """(train, test) ImageTensors on the CPU for `data_cfg.dataset`."""
    import python_api.data  # noqa: F401  (registers the built-in loaders)
    if data_cfg.dataset not in _DATASETS:
        from python_api.config import ConfigError
        raise ConfigError(f"data.dataset: unknown dataset {data_cfg.dataset!r}; "
                          f"available: {', '.join(available_datasets())}")
    return _DATASETS[data_cfg.dataset](data_cfg)
