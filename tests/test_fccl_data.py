"""FCCL's loaders on tiny files in the real formats, the bundled domains and the public augmentation."""
import bz2
import gzip
import struct

import numpy as np
import pytest
import torch

from python_api.data import domains as D


def _write_idx(path, array, compress=False):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if compress else open)(path, "wb").write(data)


def _write_image_folder(root, classes, per_class, size=(20, 12)):
    from PIL import Image
    rng = np.random.RandomState(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{j}.png")


def test_mnist_idx_plain_and_gz(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    _write_idx(raw / "train-images-idx3-ubyte.gz", images, compress=True)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]), compress=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", images[:2])
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([9, 2]))
    x, y = D.load_digits_split("mnist", tmp_path, True, size=32)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [3, 1, 4, 1, 5]
    raw_x, _ = D.load_idx_pair(tmp_path, "MNIST", False)
    assert torch.equal(raw_x[:, 0], torch.from_numpy(images[:2].astype(np.uint8)))
    domain = D.digits_domain("mnist", tmp_path, 3, np.random.RandomState(42), 32)
    assert len(domain.train_labels) == 3 and len(domain.test_labels) == 2


def test_usps_bz2(tmp_path):
    lines = ["10 1:-1 2:1 256:0.5", "3 5:0"]
    for name in ("usps.bz2", "usps.t.bz2"):
        with bz2.open(tmp_path / name, "wt") as fh:
            fh.write("\n".join(lines) + "\n")
    x, y = D.load_usps(tmp_path, True)
    assert y.tolist() == [9, 2]
    assert x.shape == (2, 1, 16, 16)
    assert x[0, 0, 0, 0] == 0 and x[0, 0, 0, 1] == 255 and x[0, 0, 15, 15] == 191
    x32, _ = D.load_digits_split("usps", tmp_path, False)
    assert x32.shape == (2, 3, 32, 32)


def test_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    X = np.random.RandomState(0).randint(0, 255, (32, 32, 3, 4)).astype(np.uint8)
    y = np.array([[10], [1], [2], [10]], dtype=np.uint8)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        scipy_io.savemat(str(tmp_path / name), {"X": X, "y": y})
    images, labels = D.load_digits_split("svhn", tmp_path, True)
    assert labels.tolist() == [0, 1, 2, 0]
    assert torch.equal(images[1], torch.from_numpy(X[:, :, :, 1]).permute(2, 0, 1))


def test_syn_and_office_home_folders(tmp_path):
    _write_image_folder(tmp_path / "syn" / "imgs_train", ["0", "1"], 3)
    _write_image_folder(tmp_path / "syn" / "imgs_valid", ["0", "1"], 2)
    x, y = D.load_digits_split("syn", tmp_path, True)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    _write_image_folder(tmp_path / "OfficeHome" / "Art", ["Alarm", "Bike", "Zebra"], 10)
    rng = np.random.RandomState(42)
    held_out = D.office_home_domain("Art", tmp_path, 12, rng, 32)
    assert held_out.num_classes == 3 and len(held_out.train_labels) == 12 and len(held_out.test_labels) == 9
    # correct split: train and test disjoint (images are random, so equality means the same file)
    train_set = {bytes(t.numpy()) for t in held_out.train_images}
    assert not any(bytes(t.numpy()) in train_set for t in held_out.test_images)
    quirky = D.office_home_domain("Art", tmp_path, 12, np.random.RandomState(42), 32, reference_quirks=True)
    assert torch.equal(quirky.test_images, held_out.test_images)   # held out: never the whole domain
    assert quirky.train_labels.max() < 2                 # class-ordered truncation drops the last class


def test_missing_files_say_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="usps.bz2"):
        D.load_usps(tmp_path, True)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        D.public_dataset("cifar100", tmp_path, 10, np.random.RandomState(0))


def test_cifar100_public_pickle(tmp_path):
    import pickle
    (tmp_path / "cifar-100-python").mkdir()
    data = np.random.RandomState(0).randint(0, 255, (20, 3072)).astype(np.uint8)
    with open(tmp_path / "cifar-100-python" / "train", "wb") as fh:
        pickle.dump({"data": data, "fine_labels": list(range(20))}, fh)
    public = D.public_dataset("cifar100", tmp_path, 8, np.random.RandomState(0))
    assert public.images.shape == (8, 3, 32, 32)
    batch = D.augment_public(public, public.images, torch.Generator().manual_seed(0))
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.float32


def test_bundled_domains_disjoint_and_deterministic():
    domains, public = D.bundled_digit_domains(image_size=8, train_per_domain=20, public_size=100, seed=0)
    again, public2 = D.bundled_digit_domains(image_size=8, train_per_domain=20, public_size=100, seed=0)
    assert [d.name for d in domains] == list(D.BUNDLED_DOMAINS)
    assert torch.equal(public.images, public2.images)
    assert all(torch.equal(a.train_images, b.train_images) for a, b in zip(domains, again))
    assert torch.equal(domains[0].train_images, 255 - domains[1].train_images) is False  # different digits
    assert public.images.shape[0] == 100 and not hasattr(public, "labels")
    for d in domains:
        assert d.train_images.shape == (20, 3, 8, 8) and len(d.test_labels) > 0
    plain = domains[0].train_images.float()
    inverted = domains[1].train_images.float()
    assert plain.mean() < 128 < inverted.mean()          # ink on black vs black ink on white


def test_augment_crop_flip_rotation_shapes_and_zero_padding():
    x = torch.ones(16, 3, 8, 8)
    out = D.augment(x, crop_padding=2, hflip=True, rotation_degrees=0, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert (out == 0).any() and (out == 1).any()         # some crops hit the zero padding
    same = D.augment(x, crop_padding=0, hflip=False, rotation_degrees=0)
    assert torch.equal(same, x)


def write_tiny_digits_root(root, n=24):
    """MNIST idx, USPS bz2, SVHN .mat, SYN folders and a CIFAR-100 pickle, a few images each."""
    import pickle
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.RandomState(0)
    labels = np.arange(n) % 10
    for prefix in ("train", "t10k"):
        _write_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", rng.randint(0, 255, (n, 28, 28)))
        _write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
    for name in ("usps.bz2", "usps.t.bz2"):
        with bz2.open(root / name, "wt") as fh:
            for label in labels:
                fh.write(f"{label + 1} " + " ".join(f"{j + 1}:{rng.uniform(-1, 1):.3f}" for j in range(256)) + "\n")
    for name in ("train_32x32.mat", "test_32x32.mat"):
        scipy_io.savemat(str(root / name), {"X": rng.randint(0, 255, (32, 32, 3, n)).astype(np.uint8),
                                            "y": np.where(labels == 0, 10, labels).reshape(-1, 1)})
    for split in ("imgs_train", "imgs_valid"):
        _write_image_folder(root / "syn" / split, [str(c) for c in range(10)], 2, size=(32, 32))
    (root / "cifar-100-python").mkdir()
    with open(root / "cifar-100-python" / "train", "wb") as fh:
        pickle.dump({"data": rng.randint(0, 255, (40, 3072)).astype(np.uint8), "fine_labels": [0] * 40}, fh)


def test_digits_protocol_end_to_end_on_tiny_files(tmp_path, one_torch_thread):
    from python_api.config import load_config
    from python_api.engine.runner import run_training
    from python_api.methods.fccl import FCCLConfig
    write_tiny_digits_root(tmp_path / "data")
    cfg = load_config(FCCLConfig, "fccl-digits", [
        f"data.root={tmp_path / 'data'}", "data.image_size=8", "data.public_size=32", "data.public_batch_size=16",
        "run.device=cpu", "run.progress=false", "fccl.rounds=1", "fccl.loss_backend=reference",
        "pretrain.epochs=1", f"pretrain.cache_dir={tmp_path / 'cache'}",
        "participants=[{domain: mnist, backbone: resnet10, width: 0.0625, private_samples: 15, local_epochs: 1},"
        "{domain: usps, backbone: resnet12, width: 0.0625, private_samples: 8, local_epochs: 1},"
        "{domain: svhn, backbone: resnet10, width: 0.0625, private_samples: 20, local_epochs: 1},"
        "{domain: syn, backbone: resnet12, width: 0.0625, private_samples: 18, local_epochs: 1}]"])
    result = run_training("fccl", cfg, out_dir=tmp_path / "run", verbose=False)
    assert result.summary["domains"] == ["mnist", "usps", "svhn", "syn"]
    assert len(result.summary["inter"]["per_participant"]) == 4
    assert result.records[0]["p2_svhn_local_loss"] > 0
