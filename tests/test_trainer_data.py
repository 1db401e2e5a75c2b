"""Dataset loaders on tiny files in the real formats, the bundled data, on-device augmentation."""
import pickle

import numpy as np
import pytest
import torch

from python_api.config import DataConfig, from_dict
from python_api.data import ClassIncrementalStream, DeviceAugment, load_dataset


def _cfg(**kw):
    return from_dict(DataConfig, kw)


def _write_cifar100(root, n_train=6, n_test=4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
                 "fine_labels": [int(v) for v in rng.randint(0, 100, n)],
                 "coarse_labels": [0] * n, "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []}, fh)
    return folder


def test_cifar100_pickle_dir(tmp_path):
    folder = _write_cifar100(tmp_path)
    train, test = load_dataset(_cfg(dataset="cifar100", root=str(tmp_path)))
    with open(folder / "train", "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    assert train.images.shape == (6, 3, 32, 32) and train.images.dtype == torch.uint8 and len(test) == 4
    assert torch.equal(train.images[2], torch.from_numpy(raw["data"][2].reshape(3, 32, 32)))
    assert train.labels.tolist() == raw["fine_labels"] and train.class_names[5] == "c5"
    small, _ = load_dataset(_cfg(dataset="cifar100", root=str(tmp_path), image_size=16))
    assert small.images.shape == (6, 3, 16, 16)


def test_cifar100_missing_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*train.*--data-root|data.download"):
        load_dataset(_cfg(dataset="cifar100", root=str(tmp_path)))


def _write_folders(base, classes, per_class, sizes):
    from PIL import Image
    rng = np.random.RandomState(1)
    for c in classes:
        (base / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            size = sizes[i % len(sizes)]
            Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3)).astype(np.uint8)).save(
                base / "train" / c / f"img{i:02d}.png")


@pytest.mark.parametrize("name,dirname", [("mini_imagenet", "mini-imagenet"), ("tiny_imagenet", "tiny-imagenet-200")])
def test_image_folders_sorted_classes_and_split(tmp_path, name, dirname):
    _write_folders(tmp_path / dirname, ["n02", "n01", "n03"], per_class=5, sizes=[(20, 12), (9, 9)])
    cfg = _cfg(dataset=name, root=str(tmp_path), image_size=8, train_per_class=3)
    train, test = load_dataset(cfg)
    assert train.class_names == ["n01", "n02", "n03"]                  # sorted, not os.listdir order
    assert train.images.shape == (9, 3, 8, 8) and test.images.shape == (6, 3, 8, 8)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    again, _ = load_dataset(cfg)                                        # served from the cache now
    assert torch.equal(again.images, train.images)
    assert list((tmp_path / ".fcl_ext_cache").glob("*.pt"))


def test_image_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        load_dataset(_cfg(dataset="tiny_imagenet", root=str(tmp_path)))


def test_bundled_digits_is_deterministic_and_offline():
    a_train, a_test = load_dataset(_cfg(dataset="bundled_digits", image_size=16))
    b_train, _ = load_dataset(_cfg(dataset="bundled_digits", image_size=16))
    assert a_train.images.shape[1:] == (3, 16, 16) and len(a_train) + len(a_test) == 1797
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert sorted(set(a_test.labels.tolist())) == list(range(10))


def test_unknown_dataset():
    from python_api.config import ConfigError
    with pytest.raises(ConfigError, match="data.dataset: unknown dataset 'mnist2'"):
        load_dataset(_cfg(dataset="mnist2"))


def test_device_augment_shapes_ranges_and_determinism():
    imgs = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    aug = DeviceAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_padding=4, hflip=True, brightness=0.25)
    torch.manual_seed(0)
    a = aug.train(imgs)
    torch.manual_seed(0)
    b = aug.train(imgs)
    assert a.shape == imgs.shape and torch.equal(a, b)
    assert float(a.min()) >= -2.0 - 1e-6 and float(a.max()) <= 2.0 + 1e-6
    test = aug.test(imgs)
    torch.testing.assert_close(test, (imgs.float() / 255 - 0.5) / 0.25)
    plain = DeviceAugment((0, 0, 0), (1, 1, 1), crop_padding=0, hflip=True, brightness=0)
    torch.manual_seed(1)
    out = plain.train(imgs) * 255
    same = torch.isclose(out, imgs.float()).flatten(1).all(1)
    flipped = torch.isclose(out, imgs.float().flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and bool(flipped.any()) and bool(same.any())


def test_crop_is_a_shifted_window_of_the_padded_image():
    imgs = torch.arange(36, dtype=torch.uint8).view(1, 1, 6, 6).expand(8, 1, 6, 6).contiguous()
    aug = DeviceAugment((0,), (1,), crop_padding=2, hflip=False, brightness=0)
    torch.manual_seed(3)
    out = (aug.train(imgs) * 255).round().to(torch.uint8)
    padded = torch.nn.functional.pad(imgs, (2, 2, 2, 2))
    for k in range(8):
        assert any(torch.equal(out[k], padded[k, :, y:y + 6, x:x + 6]) for y in range(5) for x in range(5))


def test_stream_orders():
    natural = ClassIncrementalStream(10, 5)
    assert natural.task_classes(1) == [2, 3] and natural.seen_classes(2) == list(range(6))
    shuffled = ClassIncrementalStream(10, 5, order="seed", seed=4)
    labels = torch.tensor(shuffled.class_order)
    assert shuffled.remap(labels).tolist() == list(range(10))
    assert sorted(shuffled.class_order) == list(range(10)) and shuffled.class_order != list(range(10))
