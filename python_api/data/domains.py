"""FCCL's domains and public data (specs/fccl.md 2.2-2.4), decoded once into uint8 tensors.

Every private domain becomes a `DomainData` of N x 3 x S x S uint8 images (S = 32 for the reference
protocols) with int64 labels; normalisation and the public set's augmentation run on the batch, on the
device (`normalise`, `augment`), so no per-sample PIL transform runs during training.

File layouts under `data_root` (the torchvision layouts; the readers parse the files themselves, so tiny
test files in the same formats load too):

    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]    Fashion-MNIST: FashionMNIST/raw/...
    usps.bz2, usps.t.bz2                                            (libsvm text, bz2)
    train_32x32.mat, test_32x32.mat                                 (SVHN, scipy .mat)
    syn/imgs_train/<class>/*, syn/imgs_valid/<class>/*              (SYN digits, image folders)
    OfficeHome/{Art,Clipart,Product,Real World}/<class>/*           (Office-Home, image folders)
    cifar-100-python/train                                          (CIFAR-100 pickle)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG                    (Tiny-ImageNet)

The bundled offline default (`bundled_digit_domains`) needs no files: four domains derived
deterministically from scikit-learn's 8x8 digits (plain, inverted, rotated, noisy-coloured) and a
disjoint unlabeled public split.
"""
from __future__ import annotations

import bz2
import gzip
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from python_api.data.common import DeviceAugment, resize_uint8

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
BUNDLED_MEAN, BUNDLED_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

DIGITS_DOMAINS = ("mnist", "usps", "svhn", "syn")
OFFICE_HOME_DOMAINS = ("Art", "Clipart", "Product", "Real World")
BUNDLED_DOMAINS = ("plain", "inverted", "rotated", "coloured")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class DomainData:
    """One participant's domain: a private training subset and the domain's test set (uint8 images).

    Provenance, for `check_no_test_leak`: `train_index` / `test_index` are the images' indices in the pools
    named `train_source` / `test_source` (e.g. "mnist/train" and "mnist/test", or "officehome/Art" for both
    halves of a split domain); None where unknown."""
    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    train_source: Optional[str] = None
    train_index: Optional[torch.Tensor] = None
    test_source: Optional[str] = None
    test_index: Optional[torch.Tensor] = None


@dataclass
class PublicData:
    """The unlabeled public set every participant sees, with its batch augmentation."""
    name: str
    images: torch.Tensor
    mean: tuple = CIFAR100_MEAN
    std: tuple = CIFAR100_STD
    crop_padding: int = 4
    hflip: bool = True
    rotation_degrees: float = 15.0
    crop_size: int = 32                 # RandomCrop's output size (images larger than this get cropped to it)
    notes: dict = field(default_factory=dict)
    source: Optional[str] = None        # the pool the images come from, and their indices in it (provenance)
    index: Optional[torch.Tensor] = None


def _provenance(source: Optional[str], index: Optional[torch.Tensor]) -> set:
    return set() if source is None or index is None else {(source, int(i)) for i in index.tolist()}


def check_no_test_leak(train_sets: Sequence[DomainData], public: Optional[PublicData] = None,
                       test_sets: Optional[Sequence[DomainData]] = None, what: str = "training") -> None:
    """Raise ValueError if any training or public image is one of any test set's images.

    Compares (pool, index) pairs, so it holds across participants: participant i is evaluated on every
    domain's test set (inter accuracy), so no participant may train on an image of any test set. Sets
    without provenance (built by hand) are skipped."""
    test_sets = train_sets if test_sets is None else test_sets
    tested = set()
    for test in test_sets:
        tested |= _provenance(test.test_source, test.test_index)
    if not tested:
        return
    for domain in train_sets:
        leaked = _provenance(domain.train_source, domain.train_index) & tested
        if leaked:
            raise ValueError(f"{what} data of domain {domain.name!r} holds {len(leaked)} test image(s) "
                             f"(first: {sorted(leaked)[0]}); test sets must be disjoint from all training data")
    if public is not None:
        leaked = _provenance(public.source, public.index) & tested
        if leaked:
            raise ValueError(f"public set {public.name!r} holds {len(leaked)} test image(s) "
                             f"(first: {sorted(leaked)[0]}); test sets must be disjoint from all training data")


def _missing(what: str, where: Path, hint: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found: expected {where}. {hint}")


# ---------------------------------------------------------------- tensor helpers

def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 (x / 255 - mean) / std."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def to_three_channels(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def augment(images: torch.Tensor, *, crop_padding: int = 4, hflip: bool = True, rotation_degrees: float = 15.0,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RandomCrop(pad) -> RandomHorizontalFlip -> RandomRotation(deg) on a [0, 1] float batch, one draw per image.

    Crop and flip are the shared DeviceAugment's (zero padding; global torch RNG, saved in checkpoints);
    the rotation uses zero fill and nearest sampling, torchvision's RandomRotation defaults."""
    out = DeviceAugment((0.0,), (1.0,), crop_padding=crop_padding, hflip=hflip, device=images.device) \
        .augment_unit(images)
    if rotation_degrees > 0:
        n = out.shape[0]
        angle = (torch.rand(n, generator=generator) * 2 - 1).to(out.device) * math.radians(rotation_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3, device=out.device, dtype=out.dtype)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out


def augment_public(public: PublicData, images_uint8: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The public batch transform: augmentation in [0, 1] pixel space, then normalisation."""
    x = images_uint8.float() / 255.0
    padding = public.crop_padding
    if x.shape[-1] > public.crop_size:   # Tiny-ImageNet: RandomCrop(32, pad 4) of a 64x64 image (spec 2.3)
        x, padding = crop_to(x, public.crop_size, padding, generator), 0
    x = augment(x, crop_padding=padding, hflip=public.hflip,
                rotation_degrees=public.rotation_degrees, generator=generator)
    return normalise((x * 255.0).round_().to(torch.uint8), public.mean, public.std)


def subsample(count: Optional[int], total: int, rng: np.random.RandomState) -> np.ndarray:
    """The reference's private subset: a random permutation of the pool cut to `count` (all if None)."""
    order = rng.permutation(total)
    return order if count is None or count >= total else order[:count]


# ---------------------------------------------------------------- file formats

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST/Fashion-MNIST), plain or .gz."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(base: Path, stem: str) -> Path:
    for candidate in (base / stem, base / (stem + ".gz")):
        if candidate.exists():
            return candidate
    raise _missing(stem, base / stem, "Put the IDX files (optionally .gz) there, as torchvision downloads them.")


def load_idx_pair(root, folder: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    base = Path(root) / folder / "raw"
    prefix = "train" if train else "t10k"
    images = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(base, f"{prefix}-labels-idx1-ubyte"))
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_usps(root, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """USPS in torchvision's libsvm bz2 files: `label i:v ...`, labels 1..10, values in [-1, 1], 16x16."""
    path = Path(root) / ("usps.bz2" if train else "usps.t.bz2")
    if not path.exists():
        raise _missing("USPS", path, "Download usps.bz2 and usps.t.bz2 (LIBSVM datasets) into the data root.")
    images, labels = [], []
    with bz2.open(path, "rt") as handle:
        for line in handle:
            fields = line.split()
            if not fields:
                continue
            labels.append(int(float(fields[0])) - 1)
            pixels = np.zeros(256, dtype=np.float32)
            for item in fields[1:]:
                index, value = item.split(":")
                pixels[int(index) - 1] = float(value)
            images.append(pixels)
    array = np.stack(images).reshape(-1, 1, 16, 16)
    array = np.clip((array + 1.0) / 2.0 * 255.0, 0, 255).round().astype(np.uint8)
    return torch.from_numpy(array), torch.tensor(labels, dtype=torch.int64)


def load_svhn(root, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN .mat (X: 32x32x3xN uint8, y: N x 1 with 10 meaning digit 0)."""
    import scipy.io
    path = Path(root) / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.exists():
        raise _missing("SVHN", path, "Download train_32x32.mat and test_32x32.mat into the data root.")
    mat = scipy.io.loadmat(str(path))
    images = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)
    labels = mat["y"].astype(np.int64).reshape(-1) % 10
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def image_folder_files(path: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, class index) in ImageFolder order: classes sorted by name, files sorted within a class."""
    if not path.is_dir():
        raise _missing("image folder", path, "Expected one sub-folder per class holding its images.")
    classes = sorted(entry.name for entry in path.iterdir() if entry.is_dir())
    samples = []
    for index, name in enumerate(classes):
        for directory, _, files in sorted(os.walk(path / name)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((Path(directory) / file, index))
    return samples, classes


def decode_images(files: Sequence[Path], size: Optional[int]) -> torch.Tensor:
    """Decode to RGB once and resize to size x size (bilinear, as torchvision Resize((s, s))); None keeps the size."""
    from PIL import Image
    if size is not None and files:
        from python_api.data.folders import _decode   # the shared decoder (RGB, bilinear resize)
        return torch.from_numpy(np.stack([_decode(Path(f), size) for f in files]))
    arrays = []
    for file in files:
        with Image.open(file) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            arrays.append(np.asarray(image, dtype=np.uint8))
    if not arrays:
        return torch.zeros(0, 3, size or 1, size or 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_image_folder(path, size: Optional[int] = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    samples, classes = image_folder_files(Path(path))
    images = decode_images([file for file, _ in samples], size)
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64), classes


# ---------------------------------------------------------------- Digits (specs/fccl.md 2.2-2.3)

def load_digits_split(name: str, root, train: bool, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """One Digits domain split as 3-channel size x size uint8 images (the reference's transforms)."""
    if name == "mnist":
        images, labels = load_idx_pair(root, "MNIST", train)
    elif name == "usps":
        images, labels = load_usps(root, train)
    elif name == "svhn":
        images, labels = load_svhn(root, train)
    elif name == "syn":
        images, labels, _ = load_image_folder(Path(root) / "syn" / ("imgs_train" if train else "imgs_valid"), size)
    else:
        raise ValueError(f"domain: unknown Digits domain {name!r}; expected one of {DIGITS_DOMAINS}")
    return to_three_channels(resize_uint8(images, size)), labels


def digits_domain(name: str, root, private_samples: Optional[int], rng: np.random.RandomState,
                  size: int = 32) -> DomainData:
    """The private subset from the official training split; the test set is the official test split."""
    train_images, train_labels = load_digits_split(name, root, True, size)
    test_images, test_labels = load_digits_split(name, root, False, size)
    keep = torch.from_numpy(subsample(private_samples, len(train_labels), rng))
    return DomainData(name, train_images[keep], train_labels[keep], test_images, test_labels, 10,
                      train_source=f"{name}/train", train_index=keep,
                      test_source=f"{name}/test", test_index=torch.arange(len(test_labels)))


# ---------------------------------------------------------------- Office-Home (specs/fccl.md 2.2-2.4)

def office_home_dir(root) -> Path:
    for folder in ("OfficeHome", "OfficeHomeDataset_10072016", "office_home", "office-home"):
        if (Path(root) / folder).is_dir():
            return Path(root) / folder
    raise _missing("Office-Home", Path(root) / "OfficeHome",
                   "Unpack Office-Home so that OfficeHome/<Art|Clipart|Product|Real World>/<class>/ exist.")


def office_home_split(labels: np.ndarray, private_samples: Optional[int], rng: np.random.RandomState,
                      test_fraction: float = 0.3, reference_quirks: bool = False,
                      split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) for one Office-Home domain.

    The test split, `test_fraction` of every class, is drawn from its own stream seeded by `split_seed`
    alone, so no training seed moves an image into or out of it (the private subset's `rng`, whichever
    seed drew it, only chooses among the other images). Default: the private subset is a random draw of
    the rest. `reference_quirks=True` reproduces the CVPR code's class-ordered truncation (spec 2.4): the
    first `private_samples` of the sorted non-test indices, dropping the alphabetically last classes. The
    reference's evaluation on the whole domain, training images included, is not reproduced.
    """
    split_rng = np.random.RandomState(split_seed)
    test = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        chosen = split_rng.permutation(len(members))[: int(len(members) * test_fraction)]
        test.extend(members[chosen].tolist())
    test_set = set(test)
    rest = np.array(sorted(set(range(len(labels))) - test_set), dtype=np.int64)
    if reference_quirks:
        train = rest if private_samples is None else rest[:private_samples]
    else:
        train = np.sort(rest[subsample(private_samples, len(rest), rng)])
    return train, np.array(sorted(test_set), dtype=np.int64)


def office_home_domain(name: str, root, private_samples: Optional[int], rng: np.random.RandomState,
                       size: int = 32, reference_quirks: bool = False, split_seed: int = 0) -> DomainData:
    images, labels, classes = load_image_folder(office_home_dir(root) / name, size)
    train, test = office_home_split(labels.numpy(), private_samples, rng, reference_quirks=reference_quirks,
                                    split_seed=split_seed)
    train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
    source = f"officehome/{name}"
    return DomainData(name, images[train_t], labels[train_t], images[test_t], labels[test_t], len(classes),
                      train_source=source, train_index=train_t, test_source=source, test_index=test_t)


# ---------------------------------------------------------------- public data (specs/fccl.md 2.3)

def load_cifar100_train(root) -> torch.Tensor:
    path = Path(root) / "cifar-100-python" / "train"
    if not path.exists():
        raise _missing("CIFAR-100", path, "Unpack cifar-100-python.tar.gz into the data root.")
    with open(path, "rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    return torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())


def public_dataset(name: str, root, size: int, rng: np.random.RandomState, image_size: int = 32) -> PublicData:
    """The reference's public sets: a random `size` subset of the training split, with its augmentation.

    Images are resized once to `image_size` (32 in the reference), except Tiny-ImageNet, kept at 64x64 so
    that RandomCrop takes a random patch of it, as the reference does (spec 2.3, 4.2.9)."""
    if name == "cifar100":
        images = load_cifar100_train(root)
        keep = torch.from_numpy(subsample(size, len(images), rng))
        return PublicData(name, resize_uint8(images[keep], image_size), CIFAR100_MEAN, CIFAR100_STD,
                          crop_size=image_size, source="cifar100/train", index=keep)
    if name == "fashion_mnist":
        images, _ = load_idx_pair(root, "FashionMNIST", True)
        keep = torch.from_numpy(subsample(size, len(images), rng))
        return PublicData(name, to_three_channels(resize_uint8(images[keep], image_size)), IMAGENET_MEAN,
                          IMAGENET_STD, crop_size=image_size, source="fashion_mnist/train", index=keep)
    if name == "tiny_imagenet":
        samples, _ = image_folder_files(Path(root) / "tiny-imagenet-200" / "train")
        chosen = subsample(size, len(samples), rng)
        images = decode_images([samples[i][0] for i in chosen], None)
        return PublicData(name, images, IMAGENET_MEAN, IMAGENET_STD, crop_size=image_size,
                          source="tiny_imagenet/train", index=torch.from_numpy(np.asarray(chosen, dtype=np.int64)))
    raise ValueError(f"public.dataset: unknown public set {name!r}; expected cifar100, fashion_mnist, "
                     "tiny_imagenet or bundled")


def crop_to(images: torch.Tensor, size: int, padding: int, generator=None) -> torch.Tensor:
    """RandomCrop(size, padding) for images larger than `size` (Tiny-ImageNet's 64x64 in the reference)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    top = torch.randint(0, h + 2 * padding - size + 1, (n,), generator=generator).tolist()
    left = torch.randint(0, w + 2 * padding - size + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, t:t + size, c:c + size] for i, (t, c) in enumerate(zip(top, left))])


# ---------------------------------------------------------------- bundled offline domains

def _digit_styles(base: torch.Tensor, style: str, generator: torch.Generator) -> torch.Tensor:
    """base: N x 1 x S x S floats in [0, 1] (ink = 1). Returns N x 3 x S x S in [0, 1]."""
    if style == "plain":
        out = base
    elif style == "inverted":
        out = 1.0 - base
    elif style == "rotated":
        out = torch.rot90(base, 1, dims=(2, 3))
    elif style == "coloured":
        n = base.shape[0]
        ink = 0.4 + 0.6 * torch.rand(n, 3, 1, 1, generator=generator)
        paper = 0.45 * torch.rand(n, 3, 1, 1, generator=generator)
        noise = 0.12 * torch.randn(n, 3, *base.shape[2:], generator=generator)
        return (base * ink + (1 - base) * paper + noise).clamp_(0, 1)
    else:
        raise ValueError(f"unknown bundled style {style!r}")
    return out.expand(-1, 3, -1, -1)


def bundled_digit_domains(image_size: int = 16, train_per_domain: int = 100, test_per_domain: Optional[int] = None,
                          public_size: int = 500, seed: int = 0,
                          domains: Sequence[str] = BUNDLED_DOMAINS) -> tuple[list[DomainData], PublicData]:
    """Four domains from scikit-learn's digits (1797 8x8 images, ships with scikit-learn), all disjoint.

    A seeded permutation gives the public split first (its labels are dropped; each public image takes a
    random one of the four styles), then one disjoint slice per domain, cut into train and test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    per_domain = (len(labels) - public_size) // len(domains)
    if per_domain <= train_per_domain:
        raise ValueError(f"data.bundled: public_size={public_size} and train_per_domain={train_per_domain} "
                         f"leave no test images for {len(domains)} domains out of {len(labels)}")
    test_count = per_domain - train_per_domain if test_per_domain is None else min(test_per_domain,
                                                                                  per_domain - train_per_domain)
    base = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)

    def as_uint8(x):
        return (x * 255).round_().to(torch.uint8).contiguous()

    public_index = order[:public_size]
    style_of = torch.randint(0, len(BUNDLED_DOMAINS), (public_size,), generator=generator)
    public_images = torch.empty(public_size, 3, image_size, image_size)
    for s, style in enumerate(BUNDLED_DOMAINS):
        rows = (style_of == s).nonzero().flatten()
        public_images[rows] = _digit_styles(base[public_index[rows]], style, generator)
    public = PublicData("bundled", as_uint8(public_images), BUNDLED_MEAN, BUNDLED_STD, crop_padding=2,
                        hflip=False, rotation_degrees=10.0, crop_size=image_size,
                        notes={"source": "sklearn digits, mixed styles"}, source="sklearn_digits",
                        index=public_index.clone())
    result = []
    for d, style in enumerate(domains):
        chunk = order[public_size + d * per_domain: public_size + (d + 1) * per_domain]
        images = as_uint8(_digit_styles(base[chunk], style, generator))
        train, test = slice(0, train_per_domain), slice(train_per_domain, train_per_domain + test_count)
        result.append(DomainData(style, images[train], labels[chunk][train], images[test], labels[chunk][test], 10,
                                 BUNDLED_MEAN, BUNDLED_STD, train_source="sklearn_digits",
                                 train_index=chunk[train].clone(), test_source="sklearn_digits",
                                 test_index=chunk[test].clone()))
    return result, public
