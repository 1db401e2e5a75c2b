"""Synthetic same-size datasets (python_api/data/synthetic.py) read back through the real loaders.

The fast tests write small-count versions (`scale`) at the real resolutions and formats and load them with
the loaders the trainers use; the slow tests (full size) are marked slow."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from python_api.cli import main
from python_api.data import domains as D
from python_api.data.common import load_dataset
from python_api.data.synthetic import class_images, make_synthetic, _prototypes

SCALE = 0.004


def _cfg(dataset, root, image_size, **extra):
    base = dict(dataset=dataset, root=str(root), image_size=image_size, download=False, cache=False,
                train_per_class=None, test_per_class=None)
    base.update(extra)
    return SimpleNamespace(**base)


def test_cifar100_through_the_cli_and_loader(tmp_path, capsys):
    assert main(["make-data", "synthetic", "--like", "cifar100", "--out", str(tmp_path), "--scale", "0.01"]) == 0
    assert "cifar100/train: 500 images" in capsys.readouterr().out
    train, test = load_dataset(_cfg("cifar100", tmp_path, 32))
    assert train.images.shape == (500, 3, 32, 32) and test.images.shape == (100, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.num_classes == 100
    assert torch.equal(torch.bincount(train.labels, minlength=100), torch.full((100,), 5))
    assert train.class_names[:2] == ["class_000", "class_001"]


def test_folder_trees_tiny_and_mini_imagenet(tmp_path):
    make_synthetic("tiny-imagenet", tmp_path, scale=SCALE, progress=lambda *_: None)   # 2 per class
    make_synthetic("mini-imagenet", tmp_path, scale=SCALE, progress=lambda *_: None)   # 2 per class
    assert (tmp_path / "tiny-imagenet-200" / "train" / "n00000000" / "images" / "n00000000_0.JPEG").is_file()
    tr, te = load_dataset(_cfg("tiny_imagenet", tmp_path, 64, train_per_class=1))
    assert tr.images.shape == (200, 3, 64, 64) and te.images.shape == (200, 3, 64, 64)
    tr, te = load_dataset(_cfg("mini_imagenet", tmp_path, 84, train_per_class=1))
    assert tr.images.shape == (100, 3, 84, 84) and len(te) == 100
    from PIL import Image
    with Image.open(next((tmp_path / "mini-imagenet" / "train" / "n00000000").iterdir())) as img:
        assert img.size == (84, 84) and img.format == "JPEG"


def test_digits_domains_and_public_sets(tmp_path):
    counts = make_synthetic("digits", tmp_path, scale=SCALE, progress=lambda *_: None)
    make_synthetic("fashion-mnist", tmp_path, scale=SCALE, progress=lambda *_: None)
    make_synthetic("cifar100", tmp_path, scale=SCALE, progress=lambda *_: None)
    assert counts["MNIST/train"] == 240 and counts["svhn/train_32x32.mat"] == 293
    raw_sizes = {"mnist": 28, "usps": 16, "svhn": 32}
    for name in D.DIGITS_DOMAINS:
        for train in (True, False):
            images, labels = D.load_digits_split(name, tmp_path, train, 32)
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
            assert set(labels.tolist()) == set(range(10)), name
    assert D.load_idx_pair(tmp_path, "MNIST", True)[0].shape[-1] == raw_sizes["mnist"]
    assert D.load_usps(tmp_path, True)[0].shape[-1] == raw_sizes["usps"]
    domain = D.digits_domain("svhn", tmp_path, 50, np.random.RandomState(0))
    assert len(domain.train_labels) == 50
    rng = np.random.RandomState(0)
    for public in ("cifar100", "fashion_mnist"):
        assert D.public_dataset(public, tmp_path, 30, rng).images.shape == (30, 3, 32, 32)


def test_office_home_folders(tmp_path):
    counts = make_synthetic("office-home", tmp_path, scale=0.03, progress=lambda *_: None)
    assert counts == {"officehome/Art": 73, "officehome/Clipart": 131, "officehome/Product": 133,
                      "officehome/Real World": 131}
    domain = D.office_home_domain("Real World", tmp_path, None, np.random.RandomState(0))
    assert domain.num_classes == 65 and domain.train_images.shape[1:] == (3, 32, 32)
    assert len(domain.train_labels) + len(domain.test_labels) == 131


def test_images_have_learnable_class_structure():
    """A nearest-class-mean classifier on fresh images separates the classes far above chance."""
    protos = _prototypes("cifar100", 20, 32, 3, seed=0)
    rng = np.random.RandomState(1)
    labels = np.repeat(np.arange(20), 20)
    x = class_images(labels, protos, rng).reshape(len(labels), -1).astype(np.float32)
    means = np.stack([x[labels == c][:10].mean(0) for c in range(20)])
    held = np.concatenate([np.flatnonzero(labels == c)[10:] for c in range(20)])
    pred = ((x[held, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels[held]).mean() > 0.8


def test_bad_name_and_scale_are_named(tmp_path):
    with pytest.raises(ValueError, match="like: unknown dataset 'imagenet'"):
        make_synthetic("imagenet", tmp_path)
    with pytest.raises(ValueError, match="scale"):
        make_synthetic("cifar100", tmp_path, scale=2.0)
    assert main(["make-data", "synthetic", "--like", "nope", "--out", str(tmp_path)]) == 2


# ---- the cost-only switches the full-size smoke tests (tests/test_fullsize_presets.py) cut a round with

def test_cifar100_test_per_class_keeps_the_first_images_of_each_class(tmp_path):
    make_synthetic("cifar100", tmp_path, scale=0.03, progress=lambda *_: None)   # 3 per class
    full_train, full_test = load_dataset(_cfg("cifar100", tmp_path, 32))
    train, test = load_dataset(_cfg("cifar100", tmp_path, 32, test_per_class=2))
    assert torch.equal(train.images, full_train.images)                          # training set untouched
    assert torch.equal(torch.bincount(test.labels, minlength=100), torch.full((100,), 2))
    keep = torch.cat([torch.nonzero(full_test.labels == c).flatten()[:2] for c in range(100)]).sort().values
    assert torch.equal(test.images, full_test.images[keep]) and torch.equal(test.labels, full_test.labels[keep])


def test_glfc_max_images_per_class_caps_what_clients_see():
    from python_api.config import ConfigError, load_config
    from python_api.methods import get_method
    from python_api.methods.glfc.server import GLFCServer
    cls = get_method("glfc").config_cls
    with pytest.raises(ConfigError, match="client.max_images_per_class"):
        load_config(cls, "glfc-demo", ["client.max_images_per_class=0"])
    cfg = load_config(cls, "glfc-demo", ["client.max_images_per_class=3", "run.device=cpu"])
    server = GLFCServer(cfg, "unused-run-dir", torch.device("cpu"))
    labels = server.train.labels
    for c, idx in enumerate(server.ctx.class_indices):
        assert torch.equal(idx, torch.nonzero(labels == c).flatten()[:3])
    assert len(server.train) > 3 * server.stream.num_classes                     # the data set stays whole


def test_fccl_test_per_domain_evenly_spaced_subset():
    from python_api.data.domains import DomainData
    from python_api.methods.fccl.server import evenly_spaced_tests
    labels = torch.arange(10).repeat_interleave(10)                               # class-ordered test set
    domain = DomainData("d", torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                        torch.arange(100).view(100, 1, 1, 1).expand(100, 3, 4, 4).to(torch.uint8), labels, 10,
                        test_index=torch.arange(100) + 1000)
    cut = evenly_spaced_tests(domain, 10)
    assert torch.equal(cut.test_labels, torch.arange(10))                         # every class kept
    assert torch.equal(cut.test_index, cut.test_images[:, 0, 0, 0].long() + 1000)
    assert evenly_spaced_tests(domain, None) is domain and evenly_spaced_tests(domain, 100) is domain
    from python_api.config import ConfigError, load_config
    from python_api.methods import get_method
    with pytest.raises(ConfigError, match="data.test_per_domain"):
        load_config(get_method("fccl").config_cls, "fccl-demo", ["data.test_per_domain=0"])
