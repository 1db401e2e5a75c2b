"""Same-size synthetic datasets in the real on-disk formats (`fcl-ext make-data synthetic --like NAME --out DIR`).

Every set is written exactly as the loaders in python_api/data/ read the real one, with the real counts and
resolutions, so a full-size run (data path, models at real resolution, memory, time) can be tried without
the real data:

    cifar100        cifar-100-python/{train,test,meta}              50,000 + 10,000 RGB 32x32, 100 classes
    tiny-imagenet   tiny-imagenet-200/train/<wnid>/images/*.JPEG     200 classes x 500 RGB 64x64 (+ wnids.txt)
    mini-imagenet   mini-imagenet/train/<class>/*.jpg                100 classes x 600 RGB 84x84
    mnist           MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte    60,000 + 10,000 grey 28x28
    fashion-mnist   FashionMNIST/raw/... (same IDX layout)           60,000 + 10,000 grey 28x28
    usps            usps.bz2, usps.t.bz2 (libsvm text)               7,291 + 2,007 grey 16x16
    svhn            train_32x32.mat, test_32x32.mat                  73,257 + 26,032 RGB 32x32
    syn             syn/imgs_train/<class>/*.png, syn/imgs_valid/... 10,000 + 2,000 RGB 32x32
    office-home     OfficeHome/<Art|Clipart|Product|Real World>/<class>/*.jpg   2,427 / 4,365 / 4,439 / 4,357,
                    65 classes, RGB 300x300 (the real images vary in size; the loader resizes them to 32)
    digits          mnist + usps + svhn + syn

Images have class structure a model can learn: every class has a smooth random prototype (low-resolution
noise upsampled), each image is its class prototype shifted by a few pixels, scaled in contrast and
brightness, plus pixel noise. Prototypes are drawn per (family, class) from the seed, so the Digits domains
share class prototypes and differ in style (grey / inverted / colour), as a domain shift.

`scale` (0 < scale <= 1) cuts every count to round(count * scale), at least one image per class and split,
for quick tests at the real resolutions.
"""
from __future__ import annotations

import bz2
import gzip
import pickle
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

__all__ = ["SYNTHETIC_SETS", "make_synthetic", "class_images"]

OFFICE_HOME_COUNTS = {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real World": 4357}
OFFICE_HOME_SIZE = 300


def _scaled(count: int, scale: float, classes: int) -> int:
    return max(classes, int(round(count * scale)))   # at least one image per class


def _balanced_labels(count: int, classes: int) -> np.ndarray:
    """`count` labels, as equal per class as possible, in class order."""
    return np.repeat(np.arange(classes), np.diff(np.linspace(0, count, classes + 1).round().astype(np.int64)))


def _prototypes(family: str, classes: int, size: int, channels: int, seed: int) -> np.ndarray:
    """[classes, channels, size, size] float32 in [0, 1]: smooth random patterns, one per class."""
    rng = np.random.RandomState(_stable_seed(family, seed))
    low = rng.rand(classes, channels, 5, 5).astype(np.float32)
    # bilinear upsampling of the 5x5 grid: a smooth pattern at any size
    pos = np.linspace(0, 4, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), 3)
    frac = pos - i0
    rows = low[:, :, i0, :] * (1 - frac)[None, None, :, None] + low[:, :, i0 + 1, :] * frac[None, None, :, None]
    out = rows[:, :, :, i0] * (1 - frac) + rows[:, :, :, i0 + 1] * frac
    lo, hi = out.min(axis=(1, 2, 3), keepdims=True), out.max(axis=(1, 2, 3), keepdims=True)
    return (out - lo) / np.maximum(hi - lo, 1e-6)


def _stable_seed(family: str, seed: int) -> int:
    return (sum((i + 1) * ord(ch) for i, ch in enumerate(family)) * 7919 + seed * 104729) % (2 ** 31)


def class_images(labels: np.ndarray, prototypes: np.ndarray, rng: np.random.RandomState,
                 style: str = "plain", chunk: int = 4096) -> np.ndarray:
    """uint8 [N, C, S, S] images of the given labels: prototype, random shift, contrast, brightness, noise."""
    n = len(labels)
    _, channels, size, _ = prototypes.shape
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    shift = max(1, size // 16)
    for start in range(0, n, chunk):
        lab = labels[start:start + chunk]
        m = len(lab)
        x = prototypes[lab]
        dy, dx = rng.randint(-shift, shift + 1, size=2)   # one shift per chunk keeps it vectorised
        x = np.roll(x, (int(dy), int(dx)), axis=(2, 3))
        contrast = rng.uniform(0.6, 1.0, size=(m, 1, 1, 1)).astype(np.float32)
        bright = rng.uniform(-0.15, 0.15, size=(m, 1, 1, 1)).astype(np.float32)
        x = (x - 0.5) * contrast + 0.5 + bright + rng.normal(0, 0.08, size=x.shape).astype(np.float32)
        if style == "inverted":
            x = 1.0 - x
        elif style == "colour":
            tint = rng.uniform(0.5, 1.0, size=(m, channels, 1, 1)).astype(np.float32)
            x = x * tint
        out[start:start + m] = np.clip(x * 255.0, 0, 255).round().astype(np.uint8)
    return out


def _grey_to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=1) if images.shape[1] == 1 else images


def _write_images(paths, images: np.ndarray, fmt: str) -> None:
    from PIL import Image
    for path, img in zip(paths, images):
        arr = img.transpose(1, 2, 0)
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        pil.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


# ---------------------------------------------------------------- writers, one per real format

def _write_cifar100(out: Path, scale: float, seed: int, progress) -> dict:
    folder = out / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    protos = _prototypes("cifar100", 100, 32, 3, seed)
    rng = np.random.RandomState(seed)
    counts = {}
    for part, count in (("train", 50000), ("test", 10000)):
        labels = _balanced_labels(_scaled(count, scale, 100), 100)
        labels = labels[rng.permutation(len(labels))]   # the real files are shuffled
        images = class_images(labels, protos, rng)
        entry = {"filenames": [f"synthetic_{i}.png" for i in range(len(labels))], "batch_label": f"synthetic {part}",
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "data": images.reshape(len(labels), -1)}
        with open(folder / part, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        counts[f"cifar100/{part}"] = len(labels)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"class_{i:03d}" for i in range(100)],
                     "coarse_label_names": [f"super_{i:02d}" for i in range(20)]}, fh, protocol=2)
    return counts


def _write_folder_tree(base: Path, family: str, classes: list, per_class, size: int, seed: int,
                       suffix: str, fmt: str, progress, sub: str = "", style: str = "plain") -> int:
    """One folder per class; generated and written class by class (bounded memory at any size)."""
    protos = _prototypes(family, len(classes), size, 3, seed)
    rng = np.random.RandomState(_stable_seed(family + "/" + base.name, seed))
    per_class = np.broadcast_to(np.asarray(per_class, dtype=np.int64), (len(classes),))
    written = 0
    for label, name in enumerate(classes):
        directory = base / name / sub if sub else base / name
        directory.mkdir(parents=True, exist_ok=True)
        count = int(per_class[label])
        images = class_images(np.full(count, label), protos, rng, style=style)
        _write_images([directory / f"{name}_{i}{suffix}" for i in range(count)], images, fmt)
        written += count
        if (label + 1) % 20 == 0:
            progress(f"  {base}: {label + 1}/{len(classes)} classes, {written} images")
    return written


def _write_tiny_imagenet(out: Path, scale: float, seed: int, progress) -> dict:
    base = out / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    per_class = max(1, int(round(500 * scale)))
    n = _write_folder_tree(base / "train", "tiny_imagenet", wnids, per_class, 64, seed, ".JPEG", "JPEG",
                           progress, sub="images")
    return {"tiny_imagenet/train": n}


def _write_mini_imagenet(out: Path, scale: float, seed: int, progress) -> dict:
    classes = [f"n{i:08d}" for i in range(100)]
    per_class = max(2, int(round(600 * scale)))
    n = _write_folder_tree(out / "mini-imagenet" / "train", "mini_imagenet", classes, per_class, 84, seed,
                           ".jpg", "JPEG", progress)
    return {"mini_imagenet/train": n}


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_idx_set(out: Path, folder: str, family: str, scale: float, seed: int, style: str) -> dict:
    raw = out / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    protos = _prototypes(family, 10, 28, 1, seed)
    rng = np.random.RandomState(_stable_seed(folder, seed))
    counts = {}
    for prefix, count in (("train", 60000), ("t10k", 10000)):
        labels = _balanced_labels(_scaled(count, scale, 10), 10)
        labels = labels[rng.permutation(len(labels))]
        images = class_images(labels, protos, rng, style=style)[:, 0]
        # gzip level 1: the loaders read .gz, and level 9 would dominate the time
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb", compresslevel=1) as fh:
            fh.write(_idx_bytes(images))
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb", compresslevel=1) as fh:
            fh.write(_idx_bytes(labels.astype(np.uint8)))
        counts[f"{folder}/{prefix}"] = len(labels)
    return counts


def _write_mnist(out, scale, seed, progress):
    return _write_idx_set(out, "MNIST", "digits", scale, seed, "plain")


def _write_fashion_mnist(out, scale, seed, progress):
    return _write_idx_set(out, "FashionMNIST", "fashion_mnist", scale, seed, "plain")


def _write_usps(out: Path, scale: float, seed: int, progress) -> dict:
    protos = _prototypes("digits", 10, 16, 1, seed)
    rng = np.random.RandomState(_stable_seed("usps", seed))
    counts = {}
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("usps.bz2", 7291), ("usps.t.bz2", 2007)):
        labels = _balanced_labels(_scaled(count, scale, 10), 10)
        labels = labels[rng.permutation(len(labels))]
        values = class_images(labels, protos, rng, style="inverted").reshape(len(labels), -1) / 255.0 * 2 - 1
        lines = [f"{lab + 1} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(row))
                 for lab, row in zip(labels, values)]
        with bz2.open(out / name, "wt") as fh:
            fh.write("\n".join(lines) + "\n")
        counts[f"usps/{name}"] = len(labels)
    return counts


def _write_svhn(out: Path, scale: float, seed: int, progress) -> dict:
    import scipy.io
    protos = _prototypes("digits", 10, 32, 3, seed)
    rng = np.random.RandomState(_stable_seed("svhn", seed))
    counts = {}
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train_32x32.mat", 73257), ("test_32x32.mat", 26032)):
        labels = _balanced_labels(_scaled(count, scale, 10), 10)
        labels = labels[rng.permutation(len(labels))]
        images = class_images(labels, protos, rng, style="colour")
        # the .mat layout: X is 32x32x3xN, y is N x 1 with 10 standing for digit 0
        scipy.io.savemat(str(out / name), {"X": np.ascontiguousarray(images.transpose(2, 3, 1, 0)),
                                           "y": np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)})
        counts[f"svhn/{name}"] = len(labels)
    return counts


def _write_syn(out: Path, scale: float, seed: int, progress) -> dict:
    counts = {}
    for sub, count in (("imgs_train", 10000), ("imgs_valid", 2000)):
        per_class = max(1, int(round(count / 10 * scale)))
        counts[f"syn/{sub}"] = _write_folder_tree(out / "syn" / sub, "digits", [str(i) for i in range(10)],
                                                  per_class, 32, seed, ".png", "PNG", progress, style="colour")
    return counts


def _write_office_home(out: Path, scale: float, seed: int, progress) -> dict:
    classes = [f"class_{i:02d}" for i in range(65)]
    counts = {}
    styles = {"Art": "plain", "Clipart": "inverted", "Product": "colour", "Real World": "plain"}
    for domain, count in OFFICE_HOME_COUNTS.items():
        per_class = np.diff(np.linspace(0, _scaled(count, scale, 65), 66).round().astype(np.int64))
        counts[f"officehome/{domain}"] = _write_folder_tree(
            out / "OfficeHome" / domain, "office_home", classes, per_class, OFFICE_HOME_SIZE, seed, ".jpg", "JPEG",
            progress, style=styles[domain])
    return counts


SYNTHETIC_SETS = {"cifar100": _write_cifar100, "tiny-imagenet": _write_tiny_imagenet,
                  "mini-imagenet": _write_mini_imagenet, "mnist": _write_mnist, "fashion-mnist": _write_fashion_mnist,
                  "usps": _write_usps, "svhn": _write_svhn, "syn": _write_syn, "office-home": _write_office_home}
GROUPS = {"digits": ("mnist", "usps", "svhn", "syn")}


def make_synthetic(like: str, out, scale: float = 1.0, seed: int = 0, progress: Callable = print) -> dict:
    """Write the synthetic twin of `like` under `out`; returns {split: image count}."""
    names = GROUPS.get(like, (like,))
    unknown = [n for n in names if n not in SYNTHETIC_SETS]
    if unknown:
        raise ValueError(f"like: unknown dataset {like!r}; expected one of "
                         f"{', '.join(sorted(SYNTHETIC_SETS) + sorted(GROUPS))}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale: must be in (0, 1], got {scale}")
    out = Path(out).expanduser()
    counts = {}
    for name in names:
        start = time.perf_counter()
        progress(f"make-data: writing synthetic {name} under {out} (scale {scale})")
        counts.update(SYNTHETIC_SETS[name](out, scale, seed, progress))
        progress(f"make-data: {name} done in {time.perf_counter() - start:.1f} s")
    return counts
