"""Image-folder datasets: Mini-ImageNet and Tiny-ImageNet as the reference reads them (fixed).

    <data.root>/<dirname>/train/<class_id>/*.{jpg,jpeg,png,JPEG}

Classes are the SORTED sub-folder names (the reference used unsorted os.listdir order, spec §4.2-15),
images within a class are sorted by file name. Per class the first `data.train_per_class` images are the
training set and the rest the test set (Mini-ImageNet: 500 / rest; Tiny-ImageNet: 450 / last 50, as the
reference does with Tiny's train folder only). Any image size: every image is resized to
data.image_size at load time. Decoded tensors are cached under <root>/.fcl_ext_cache when data.cache.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from python_api.data.common import ImageTensors, register_dataset

__all__ = ["load_image_folder_split", "FOLDER_DATASETS"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

# dataset name -> (directory under root, default train images per class)
FOLDER_DATASETS = {"mini_imagenet": ("mini-imagenet", 500), "tiny_imagenet": ("tiny-imagenet-200", 450),
                   "image_folder": ("", None)}


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def load_image_folder_split(train_dir: Path, image_size: int, train_per_class, test_per_class=None,
                            cache_dir=None):
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"image folder {train_dir} not found: put one sub-folder per class with its images there "
            f"(<root>/<dataset>/train/<class>/*.jpg); set the root with --data-root DIR")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{train_dir} has no class sub-folders")
    files = {c: sorted(p for p in (train_dir / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    key = hashlib.sha1(repr((str(train_dir.resolve()), image_size, train_per_class, test_per_class,
                             [(c, len(f)) for c, f in files.items()])).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{train_dir.parent.name}-{image_size}-{key}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        blob = torch.load(cache, weights_only=False)
        return blob["train"], blob["test"]
    split = {"train": ([], []), "test": ([], [])}
    for label, c in enumerate(classes):
        paths = files[c]
        n_train = len(paths) if train_per_class is None else min(train_per_class, len(paths))
        if train_per_class is None:   # no fixed count: 80/20
            n_train = int(round(0.8 * len(paths)))
        test_paths = paths[n_train:]
        if test_per_class is not None:
            test_paths = test_paths[:test_per_class]
        for part, plist in (("train", paths[:n_train]), ("test", test_paths)):
            split[part][0].extend(_decode(p, image_size) for p in plist)
            split[part][1].extend([label] * len(plist))
    out = []
    for part in ("train", "test"):
        imgs, labels = split[part]
        images = torch.from_numpy(np.stack(imgs)) if imgs else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
        out.append(ImageTensors(images, torch.tensor(labels, dtype=torch.long), classes))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"train": out[0], "test": out[1]}, tmp)
        tmp.replace(cache)
    return out[0], out[1]


def _folder_loader(name):
    dirname, default_train = FOLDER_DATASETS[name]

    def load(data_cfg):
        root = Path(data_cfg.root).expanduser()
        base = root / dirname if dirname else root
        train_per_class = data_cfg.train_per_class if data_cfg.train_per_class is not None else default_train
        cache_dir = root / ".fcl_ext_cache" if data_cfg.cache else None
        return load_image_folder_split(base / "train", data_cfg.image_size, train_per_class,
                                       data_cfg.test_per_class, cache_dir)
    return load


for _name in FOLDER_DATASETS:
    register_dataset(_name, _folder_loader(_name))
