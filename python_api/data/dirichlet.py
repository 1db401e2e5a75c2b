"""Dirichlet non-IID split of a class-incremental stream (the TARGET / LANDER protocol).

TARGET (Zhang et al., ICCV 2023) and LANDER (Tran et al., CVPR 2024) split every task's data over a fixed
set of clients (5 in their tables) by a Dirichlet draw per class: for class c, proportions
p_c ~ Dir(β·1_N) over the N clients, and the class's samples are cut at the cumulative proportions. Small β
gives each client few classes, large β an IID split. As in their code (the FedLab-style "min_require_size"
loop), the draw is repeated until every client holds at least `min_samples` samples of the task, so no
client is ever empty; a draw that cannot satisfy it after `max_draws` attempts raises an error that names
the settings to change.

    shards = dirichlet_split(labels, classes=[0, 1], num_clients=5, beta=0.5, seed=3)
    shards[k]  # int64 index tensor into `labels`: client k's samples of this task (class by class)

`dirichlet_task_partition` applies it to every task of a stream with seed (seed, task), so a run's
partition is a pure function of run.seed.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["dirichlet_split", "dirichlet_task_partition"]


def dirichlet_split(labels: torch.Tensor, classes, num_clients: int, beta: float, seed: int,
                    min_samples: int = 1, max_draws: int = 1000) -> list:
    """Split the samples of `classes` over `num_clients` clients, class proportions ~ Dir(beta)."""
    from python_api.config import ConfigError
    if num_clients < 1:
        raise ConfigError(f"federated.initial_clients: a Dirichlet split needs >= 1 client, got {num_clients}")
    if not beta > 0:
        raise ConfigError(f"data.beta: the Dirichlet concentration must be > 0, got {beta}")
    rng = np.random.RandomState(seed)
    labels_np = labels.detach().cpu().numpy()
    per_class = []
    for c in classes:
        idx = np.nonzero(labels_np == c)[0]
        per_class.append(idx[rng.permutation(len(idx))])
    total = sum(len(i) for i in per_class)
    if total < num_clients * min_samples:
        raise ConfigError(f"data.dirichlet_min_samples={min_samples}: the task has {total} samples, fewer than "
                          f"{num_clients} clients x {min_samples}")
    for _ in range(max_draws):
        shards = [[] for _ in range(num_clients)]
        for idx in per_class:
            p = rng.dirichlet(np.full(num_clients, beta))
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
        sizes = [sum(len(p) for p in s) for s in shards]
        if min(sizes) >= min_samples:
            return [torch.from_numpy(np.concatenate(s).astype(np.int64)) for s in shards]
    raise ConfigError(f"data.beta={beta}: no Dirichlet draw in {max_draws} gave every one of {num_clients} clients "
                      f">= {min_samples} samples (data.dirichlet_min_samples); raise data.beta or lower it")


def dirichlet_task_partition(labels: torch.Tensor, stream, num_clients: int, beta: float, seed: int,
                             min_samples: int = 1) -> list:
    """partition[t][k] = client k's sample indices of task t (on labels' device)."""
    out = []
    for t in range(stream.num_tasks):
        shards = dirichlet_split(labels, stream.task_classes(t), num_clients, beta, seed=seed * 1000 + t,
                                 min_samples=min_samples)
        out.append([s.to(labels.device) for s in shards])
    return out
