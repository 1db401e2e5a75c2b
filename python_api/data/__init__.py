"""Datasets (decoded to tensors, augmented on the device) and class-incremental partitioning.

Built-in datasets (data.dataset): bundled_digits (offline, default), synthetic (tests), cifar100
(pickle dir under data.root), mini_imagenet / tiny_imagenet / image_folder (image folders).
Other packages add theirs with `register_dataset`.
"""
from python_api.data.common import (DeviceAugment, ImageTensors, available_datasets, iterate_batches, load_dataset,
                                    register_dataset, resize_uint8)
from python_api.data import bundled, cifar, folders  # noqa: F401,E402  (register loaders)
from python_api.data.class_incremental import ClassIncrementalStream  # noqa: E402

__all__ = ["DeviceAugment", "ImageTensors", "available_datasets", "iterate_batches", "load_dataset",
           "register_dataset", "resize_uint8", "ClassIncrementalStream"]
