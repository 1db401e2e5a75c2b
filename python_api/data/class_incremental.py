"""Class-incremental task stream: which classes each task introduces.

    stream = ClassIncrementalStream(num_classes=100, num_tasks=10, order="natural", seed=2021)
    stream.task_size, stream.task_classes(t), stream.seen_classes(t)
    labels = stream.remap(labels)       # dataset labels -> positions in the class order

Class order `natural` keeps the dataset's labels (the reference); `seed` shuffles them with the seed
(then labels are remapped so task t always owns positions [t·task_size, (t+1)·task_size)).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["ClassIncrementalStream"]


class ClassIncrementalStream:
    def __init__(self, num_classes: int, num_tasks: int, order: str = "natural", seed: int = 0):
        from python_api.config import ConfigError
        if num_tasks < 1 or num_classes % num_tasks != 0:
            raise ConfigError(f"num_tasks={num_tasks} does not divide the {num_classes} classes of the dataset "
                              f"into equal tasks; choose a divisor of {num_classes}")
        self.num_classes = num_classes
        self.num_tasks = num_tasks
        self.task_size = num_classes // num_tasks
        if order == "natural":
            self.class_order = list(range(num_classes))
        elif order == "seed":
            self.class_order = [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]
        else:
            raise ConfigError(f"data.class_order: expected natural or seed, got {order!r}")
        self._position = torch.empty(num_classes, dtype=torch.long)
        self._position[torch.tensor(self.class_order)] = torch.arange(num_classes)

    def remap(self, labels: torch.Tensor) -> torch.Tensor:
        return self._position.to(labels.device)[labels]

    def task_classes(self, task: int) -> list:
        return list(range(task * self.task_size, (task + 1) * self.task_size))

    def seen_classes(self, task: int) -> list:
        return list(range(0, (task + 1) * self.task_size))

    def task_of(self, label: int) -> int:
        return int(label) // self.task_size
