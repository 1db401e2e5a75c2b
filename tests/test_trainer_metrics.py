"""Continual-learning scores, the metrics files, plots and atomic checkpoints."""
import json
import math
import random

import numpy as np
import pytest
import torch

from python_api.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from python_api.metrics import (MetricsLogger, average_incremental_accuracy, backward_transfer, forgetting, psnr,
                                pycil_line, top1_accuracy)
from python_api import report


def test_scores_on_a_hand_computed_matrix():
    m = [[90.0, None, None], [70.0, 80.0, None], [50.0, 60.0, 85.0]]
    assert forgetting(m) == pytest.approx(((90 - 50) + (80 - 60)) / 2)
    assert backward_transfer(m) == pytest.approx(((50 - 90) + (60 - 80)) / 2)
    assert average_incremental_accuracy([90, 75, 65]) == pytest.approx(230 / 3)
    assert pycil_line([90, 75, 65]).startswith("CNN top1 curve: [90, 75, 65]")
    assert forgetting([[50.0]]) == 0.0


def test_accuracy_truncation_and_psnr():
    assert top1_accuracy(2, 3) == pytest.approx(66.6667, abs=1e-3)
    assert top1_accuracy(2, 3, integer_truncation=True) == 66.0
    assert math.isnan(top1_accuracy(0, 0))
    x = torch.zeros(2, 1, 4, 4)
    assert psnr(x + 0.1, x)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_logger_writes_json_and_csv(tmp_path):
    log = MetricsLogger(tmp_path)
    log.append({"round": 0, "accuracy": 50.0, "per_task": [50.0], "t": torch.tensor(1.5)})
    log.append({"round": 1, "accuracy": float("nan"), "extra": 3})
    log.write(summary={"final_accuracy": 1.0})
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["rounds"][0]["t"] == 1.5 and data["rounds"][1]["accuracy"] is None
    assert data["summary"]["final_accuracy"] == 1.0
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "round,accuracy,t,extra" and len(lines) == 3


def test_plots_are_pngs(tmp_path):
    paths = [report.plot_accuracy_curve(tmp_path / "a.png", [2, 4], [90, 70]),
             report.plot_matrix(tmp_path / "m.png", [[1.0, None], [0.5, 0.7]]),
             report.plot_image_grid(tmp_path / "g.png", torch.rand(3, 3, 8, 8), ["a", "b", "c"])]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_is_atomic_and_restores_rng(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, {"a": torch.arange(3)})
    save_checkpoint(path, {"a": torch.arange(4)})
    assert load_checkpoint(path)["a"].tolist() == [0, 1, 2, 3]
    assert not list(path.parent.glob("*.tmp"))
    state = capture_rng_state()
    first = (torch.rand(2), np.random.rand(), random.random())
    restore_rng_state(state)
    second = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
