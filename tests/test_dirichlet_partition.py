"""data.partition=dirichlet (TARGET/LANDER protocol): the split, its determinism, and a tiny run."""
import numpy as np
import pytest
import torch

from python_api.config import ConfigError
from python_api.data.class_incremental import ClassIncrementalStream
from python_api.data.dirichlet import dirichlet_split, dirichlet_task_partition
from python_api.engine.runner import run_training
from python_api.methods.glfc import GLFCConfig
from python_api.config import load_config

from tests.fcil_tiny import tiny_baseline_config
from tests.glfc_tiny import TINY


def test_shares_follow_the_dirichlet_distribution():
    # one class of 10000 samples over 5 clients: each client's share ~ Beta(β, 4β), mean 1/5,
    # variance (1/5)(4/5)/(5β + 1); min_samples=0 so no redraw biases the sample
    labels = torch.zeros(10000, dtype=torch.long)
    beta, n = 0.5, 5
    shares = np.array([[len(s) / 10000 for s in dirichlet_split(labels, [0], n, beta, seed, min_samples=0)]
                       for seed in range(600)])
    assert shares.sum(1) == pytest.approx(1.0)
    assert shares.mean() == pytest.approx(1 / n, abs=0.01)
    assert shares.var() == pytest.approx((1 / n) * (1 - 1 / n) / (n * beta + 1), rel=0.15)
    iid = np.array([[len(s) / 10000 for s in dirichlet_split(labels, [0], n, 100.0, seed, min_samples=0)]
                    for seed in range(50)])
    assert iid.var() < shares.var() / 50                           # large β: nearly equal shares


def test_split_is_a_partition_deterministic_per_seed():
    labels = torch.arange(10).repeat_interleave(30)
    a = dirichlet_split(labels, [2, 3, 4], 4, 0.5, seed=7)
    b = dirichlet_split(labels, [2, 3, 4], 4, 0.5, seed=7)
    c = dirichlet_split(labels, [2, 3, 4], 4, 0.5, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    union = torch.cat(a).sort().values
    assert torch.equal(union, torch.nonzero((labels >= 2) & (labels <= 4)).flatten())   # disjoint, complete
    assert all(len(s) >= 1 for s in a)


def test_every_client_non_empty_or_a_clear_error():
    labels = torch.arange(2).repeat_interleave(40)
    for seed in range(20):
        shards = dirichlet_split(labels, [0, 1], 5, 0.05, seed, min_samples=3)
        assert min(len(s) for s in shards) >= 3
    with pytest.raises(ConfigError, match="dirichlet_min_samples"):
        dirichlet_split(labels, [0, 1], 5, 0.5, 0, min_samples=20)
    with pytest.raises(ConfigError, match="data.beta"):
        dirichlet_split(labels, [0, 1], 5, 0.0, 0)


def test_task_partition_covers_each_task():
    labels = torch.arange(4).repeat_interleave(10)
    stream = ClassIncrementalStream(4, 2, "natural", 0)
    part = dirichlet_task_partition(labels, stream, 3, 0.5, seed=1)
    assert len(part) == 2 and all(len(p) == 3 for p in part)
    for t in range(2):
        got = set(labels[torch.cat(part[t])].tolist())
        assert got == set(stream.task_classes(t))


def test_baseline_runs_on_a_dirichlet_split(tmp_path):
    cfg = tiny_baseline_config("lwf", "data.partition=dirichlet", "data.beta=0.5", "federated.clients_per_round=4")
    result = run_training("lwf", cfg, out_dir=tmp_path / "run", verbose=False)
    assert result.completed
    assert all(r["num_clients"] == 4 and sorted(r["selected"]) == [0, 1, 2, 3] for r in result.records)
    assert result.records[2]["groups"] == {"old": 0, "between": 4, "new": 0}


def test_glfc_rejects_dirichlet():
    with pytest.raises(ConfigError, match="data.partition"):
        load_config(GLFCConfig, None, TINY + ["data.partition=dirichlet"])
