"""Full-size smoke tests (issue 14, item 2; `make test-slow`): every paper preset runs ONE round on its
synthetic same-size data set (python_api/data/synthetic.py: real on-disk formats, real counts and
resolutions), through the real CLI in a child process, with the work of the round cut by overrides.

Each test checks
  - the data path: the real loaders read the full-size files (counts and image sizes, raw and decoded);
  - the models at the real resolution: the round trains and evaluates at the preset's image size
    (ResNet-18 at 32x32 / 64x64 / 84x84; FCCL's ResNet-10/12/18, EfficientNet-B0, MobileNetV2 at 32x32);
  - GLFC's proxy at the real image size: the reconstructions of the round are real-size images;
  - peak memory: the child's ru_maxrss (from wait4; GLFC: also its `runtime_peak_rss_mb`) under a stated bound;
  - metrics.json written, every number in it finite.

What the overrides cut (the presets' method settings are untouched; the cost-only switches are
`client.max_images_per_class`, `data.test_per_class` (GLFC) and `data.test_per_domain` (FCCL), whose
null default is the reference behaviour): GLFC: 2 clients (1 trained, 1 refreshed), 1 class per client,
64 images per class, 1 local epoch, 2 perturbation and 2 L-BFGS steps, 10 test images per class.
FCCL: 1 pretraining and 1 local epoch, 128 private and 128 public images, 100 test images per domain, no
SOLO evaluation.

Data sets are written once per session (FCL_EXT_FULLSIZE_CACHE=DIR keeps them across sessions: about
2.2 GB for all; each set is made once, marked by DIR/.fullsize-<name>.json). Each test's measured time,
round time and peak memory: docs/glfc-trainer.md and docs/fccl.md, "Full-size smoke tests".
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from python_api.config import load_config
from python_api.data import domains as D
from python_api.data.common import load_dataset
from python_api.methods import get_method
from python_api.data.synthetic import OFFICE_HOME_COUNTS, OFFICE_HOME_SIZE, make_synthetic

pytestmark = pytest.mark.slow

CACHE_ENV = "FCL_EXT_FULLSIZE_CACHE"
REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 3600        # a hung run fails the test instead of the session

GLFC_CUTS = ("federated.initial_clients=2", "federated.clients_per_round=1", "client.classes_per_client=1",
             "client.max_images_per_class=64", "client.local_epochs=1", "client.perturb_steps=2",
             "proxy.steps=2", "proxy.max_iter=2", "proxy.keep_last=2", "data.test_per_class=10",
             "data.cache=false")   # the run decodes the files itself
FCCL_CUTS = ("pretrain.epochs=1", "data.public_size=128", "data.public_batch_size=128",
             "data.test_per_domain=100", "fccl.evaluate_solo=false",
             *(f"participants.{i}.{key}" for i in range(4) for key in ("local_epochs=1", "private_samples=128")))
COMMON = ("run.max_rounds=1", "run.device=cpu")


# ---------------------------------------------------------------- the data, made once

@pytest.fixture(scope="session")
def fullsize_data(tmp_path_factory):
    """ensure(*names) -> the data root holding the synthetic sets `names` (made on first use)."""
    kept = os.environ.get(CACHE_ENV)
    root = Path(kept).expanduser() if kept else tmp_path_factory.mktemp("fullsize-data")

    def ensure(*names) -> Path:
        for name in names:
            marker = root / f".fullsize-{name}.json"
            if marker.is_file():
                continue
            start = time.perf_counter()
            counts = make_synthetic(name, root, progress=lambda line: print(line, file=sys.stderr, flush=True))
            marker.write_text(json.dumps({"counts": counts, "seconds": round(time.perf_counter() - start, 1)}))
        return root
    return ensure


# ---------------------------------------------------------------- helpers

def run_cli(args: list, out: Path) -> int:
    """`fcl-ext train ...` from this checkout in a child process; returns the child's peak resident memory
    in MiB (ru_maxrss from wait4: the run's own peak, whatever this process holds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out.mkdir(parents=True, exist_ok=True)
    log = out / "cli.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "python_api.cli", "train", *args, "--out", str(out),
                                 "--no-progress"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        timer = threading.Timer(RUN_TIMEOUT_S, proc.kill)   # a hung run fails this test, not the session
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{log.read_text()[-6000:]}"
    return usage.ru_maxrss / 1024.0


def non_finite_numbers(node, path="") -> list:
    """Paths of every NaN/Inf number in a JSON tree (None is allowed: 'not measured')."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in non_finite_numbers(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in non_finite_numbers(v, f"{path}[{i}]")]
    if isinstance(node, float) and not math.isfinite(node):
        return [path]
    return []


def read_metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 1, "one round was asked for"
    assert non_finite_numbers(metrics) == [], non_finite_numbers(metrics)
    return metrics


def image_size_on_disk(path: Path) -> tuple:
    from PIL import Image
    with Image.open(path) as img:
        return img.size


# ---------------------------------------------------------------- GLFC

@dataclass(frozen=True)
class GLFCCase:
    preset: str
    data: str                 # synthetic set name
    train: int                # images the loader must read at full size
    test: int
    size: int                 # the preset's (real) resolution
    task_classes: int         # classes of task 0
    peak_mb: int              # bound on the run's peak resident memory


GLFC_CASES = [
    GLFCCase("glfc-cifar100-t5", "cifar100", 50000, 10000, 32, 20, 3000),
    GLFCCase("glfc-cifar100-t10", "cifar100", 50000, 10000, 32, 10, 3000),
    GLFCCase("glfc-cifar100-t20", "cifar100", 50000, 10000, 32, 5, 3000),
    GLFCCase("glfc-tiny-imagenet", "tiny-imagenet", 90000, 10000, 64, 20, 8000),
    GLFCCase("glfc-mini-imagenet", "mini-imagenet", 50000, 10000, 84, 10, 8000),
]


def check_glfc_raw_files(case: GLFCCase, root: Path) -> None:
    """The files on disk have the real resolution (the loader would hide a wrong size by resizing)."""
    if case.data == "cifar100":
        from python_api.data.cifar import read_cifar_pickle
        images, labels = read_cifar_pickle(root / "cifar-100-python" / "test")
        assert images.shape == (10000, 3, 32, 32) and len(labels) == 10000
    elif case.data == "tiny-imagenet":
        first = root / "tiny-imagenet-200" / "train" / "n00000000" / "images" / "n00000000_0.JPEG"
        assert image_size_on_disk(first) == (64, 64)
    else:
        assert image_size_on_disk(root / "mini-imagenet" / "train" / "n00000000" / "n00000000_0.jpg") == (84, 84)


@pytest.mark.parametrize("case", GLFC_CASES, ids=[c.preset for c in GLFC_CASES])
def test_glfc_preset_one_round_at_full_size(case, fullsize_data, tmp_path):
    """Measured times: docs/glfc-trainer.md, "Full-size smoke tests"."""
    root = fullsize_data(case.data)
    check_glfc_raw_files(case, root)

    # the data path: the preset's loader reads every file at full size
    cfg = load_config(get_method("glfc").config_cls, case.preset, [f"data.root={root}", "data.cache=false"])
    train, test = load_dataset(cfg.data)
    assert train.images.shape == (case.train, 3, case.size, case.size) and train.images.dtype == torch.uint8
    assert test.images.shape == (case.test, 3, case.size, case.size)
    assert train.num_classes == test.num_classes == (200 if case.data == "tiny-imagenet" else 100)
    per_class = torch.bincount(train.labels)
    assert per_class.min() == per_class.max() == case.train // train.num_classes
    del train, test

    out = tmp_path / "run"
    peak_mb = run_cli(["glfc", "--config", case.preset, "--data-root", str(root), *COMMON, *GLFC_CUTS], out)
    record = read_metrics(out)["rounds"][0]
    print(f"{case.preset}: peak RSS {peak_mb:.0f} MiB (round record {record['runtime_peak_rss_mb']} MiB), "
          f"round {record['round_time_s']:.0f} s, phases {record['phase_times_s']}")

    # the round trained, refreshed, encoded prototypes and evaluated at the real resolution
    assert record["classes_seen"] == case.task_classes
    assert 0.0 <= record["accuracy"] <= 100.0 and record["loss"] > 0
    phases = record["phase_times_s"]
    for name in ("local_training", "refresh", "entropy", "evaluation"):
        assert phases[name] > 0, name
    assert peak_mb < case.peak_mb and record["runtime_peak_rss_mb"] <= peak_mb + 1, (peak_mb, case.peak_mb)

    # the proxy reconstructed real-size images from the round's prototype gradients
    assert record["signals_selected"] == 1, "the trained client's entropy signal fires at task 0"
    assert record["num_gradients"] == 1 and phases["prototype_encoding"] > 0
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    proxy = state["method_state"]["proxy"]
    assert proxy["monitor_images"].shape == (2, 3, case.size, case.size)      # keep_last=2 iterates
    assert proxy["gallery"]["images"].shape == (1, 3, case.size, case.size)
    assert torch.isfinite(proxy["gallery"]["images"]).all()
    assert (out / "plots" / "reconstructions.png").is_file()


# ---------------------------------------------------------------- FCCL

@dataclass(frozen=True)
class FCCLCase:
    preset: str
    data: tuple               # synthetic sets (the public CIFAR-100 included)
    peak_mb: int


FCCL_CASES = [FCCLCase("fccl-digits", ("digits", "cifar100"), 7000),
              FCCLCase("fccl-officehome", ("office-home", "cifar100"), 7000)]

# real counts: (train split, test split) per Digits domain; Office-Home: images per domain (30 % test)
DIGITS_COUNTS = {"mnist": (60000, 10000), "usps": (7291, 2007), "svhn": (73257, 26032), "syn": (10000, 2000)}
DIGITS_RAW_SIZE = {"mnist": 28, "usps": 16, "svhn": 32}


def check_fccl_data_path(preset: str, root: Path) -> None:
    from python_api.methods.fccl.data import build_domains
    cfg = load_config(get_method("fccl").config_cls, preset, [f"data.root={root}"])
    domains, public = build_domains(cfg)      # the preset's own data path, full size
    assert public.images.shape == (5000, 3, 32, 32) and D.load_cifar100_train(root).shape[0] == 50000
    for domain, participant in zip(domains, cfg.participants):
        assert domain.train_images.shape == (participant.private_samples, 3, 32, 32), domain.name
        assert domain.test_images.shape[1:] == (3, 32, 32) and domain.test_images.dtype == torch.uint8
    if cfg.data.scenario == "digits":
        for domain in domains:
            train_count, test_count = DIGITS_COUNTS[domain.name]
            assert len(domain.test_labels) == test_count, domain.name
            assert len(D.load_digits_split(domain.name, root, True, 32)[1]) == train_count, domain.name
        assert D.load_idx_pair(root, "MNIST", True)[0].shape[-1] == DIGITS_RAW_SIZE["mnist"]
        assert D.load_usps(root, True)[0].shape[-1] == DIGITS_RAW_SIZE["usps"]
        assert D.load_svhn(root, True)[0].shape[-1] == DIGITS_RAW_SIZE["svhn"]
        assert image_size_on_disk(root / "syn" / "imgs_train" / "0" / "0_0.png") == (32, 32)
    else:
        for domain in domains:   # the held-out 30 % of every class of the whole domain
            per_class = np.diff(np.linspace(0, OFFICE_HOME_COUNTS[domain.name], 66).round().astype(np.int64))
            assert len(domain.test_labels) == sum(int(n * 0.3) for n in per_class), domain.name
            assert domain.num_classes == 65
        first = next((D.office_home_dir(root) / "Art" / "class_00").iterdir())
        assert image_size_on_disk(first) == (OFFICE_HOME_SIZE, OFFICE_HOME_SIZE)


@pytest.mark.parametrize("case", FCCL_CASES, ids=[c.preset for c in FCCL_CASES])
def test_fccl_preset_one_round_at_full_size(case, fullsize_data, tmp_path):
    """Measured times: docs/fccl.md, "Full-size smoke tests"."""
    root = fullsize_data(*case.data)
    check_fccl_data_path(case.preset, root)

    out = tmp_path / "run"
    peak_mb = run_cli(["fccl", "--config", case.preset, "--data-root", str(root), *COMMON, *FCCL_CUTS,
             f"pretrain.cache_dir={tmp_path / 'pretrained'}"], out)
    metrics = read_metrics(out)
    record = metrics["rounds"][0]
    n = 4
    for key in ("accuracy_top1", "accuracy_top5"):
        matrix = np.asarray(record[key], dtype=float)
        assert matrix.shape == (n, n) and ((0 <= matrix) & (matrix <= 100)).all(), key
    assert all(record[k] > 0 for k in record if k.endswith("_local_loss") or k.endswith("_collab_loss"))
    assert peak_mb < case.peak_mb, (peak_mb, case.peak_mb)
    assert metrics["summary"]["rounds_done"] == 1
    print(f"{case.preset}: peak RSS {peak_mb:.0f} MiB, round {record['round_time_s']:.0f} s")
