"""CIFAR-100 from the official python pickle files (the format torchvision downloads).

Expected layout: <data.root>/cifar-100-python/{train,test,meta}, i.e. the extracted
https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz. With data.download=true torchvision fetches it.
Labels are the fine labels 0-99 (the reference's natural class order).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from python_api.data.common import ImageTensors, register_dataset, resize_uint8

__all__ = ["load_cifar100", "read_cifar_pickle"]

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def read_cifar_pickle(path) -> tuple:
    with open(path, "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry["fine_labels"] if "fine_labels" in entry else entry["labels"], dtype=np.int64)
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


@register_dataset("cifar100")
def load_cifar100(data_cfg):
    folder = Path(data_cfg.root).expanduser() / "cifar-100-python"
    missing = [name for name in ("train", "test") if not (folder / name).is_file()]
    if missing and data_cfg.download:
        import torchvision
        torchvision.datasets.CIFAR100(str(Path(data_cfg.root).expanduser()), train=True, download=True)
        missing = [name for name in ("train", "test") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-100 not found: missing {', '.join(str(folder / m) for m in missing)}. Put the extracted "
            f"'cifar-100-python' folder (files train, test, meta from {URL}) under {Path(data_cfg.root)} "
            f"(set it with --data-root DIR), or pass data.download=true to let torchvision fetch it.")
    names = [str(i) for i in range(100)]
    if (folder / "meta").is_file():
        with open(folder / "meta", "rb") as fh:
            names = list(pickle.load(fh, encoding="latin1").get("fine_label_names", names))
    x_tr, y_tr = read_cifar_pickle(folder / "train")
    x_te, y_te = read_cifar_pickle(folder / "test")
    size = data_cfg.image_size
    test = ImageTensors(x_te, y_te, names).first_per_class(getattr(data_cfg, "test_per_class", None))   # cost cut
    return ImageTensors(resize_uint8(x_tr, size), y_tr, names), ImageTensors(resize_uint8(test.images, size),
                                                                             test.labels, names)
