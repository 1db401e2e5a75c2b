"""Run metrics: per-round records -> metrics.json (+ summary) and metrics.csv; continual-learning scores.

    logger = MetricsLogger(run_dir)
    logger.append({"round": 0, "accuracy": 51.2, ...})    # one record per round
    logger.write(summary={...})                           # metrics.json {"rounds": [...], "summary": {...}}

Accuracies are percentages. `accuracy_matrix[t][j]` = accuracy on task j's classes after the last
round of task t (NaN above the diagonal: task j not seen yet). Helpers below compute the standard
scores from it, used by GLFC and reusable by FCCL.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["MetricsLogger", "top1_accuracy", "topk_correct", "average_incremental_accuracy", "forgetting",
           "backward_transfer", "pycil_line", "psnr"]


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _jsonable(value.item())
    return value


class MetricsLogger:
    def __init__(self, run_dir, records: Optional[list] = None):
        self.run_dir = Path(run_dir)
        self.records: list = list(records or [])

    def append(self, record: dict) -> None:
        self.records.append(record)

    def write(self, summary: Optional[dict] = None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        payload = {"rounds": _jsonable(self.records), "summary": _jsonable(summary or {})}
        tmp = self.run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, self.run_dir / "metrics.json")
        self._write_csv()

    def _write_csv(self) -> None:
        """Scalar columns of every record (lists/dicts are left to metrics.json)."""
        columns: list = []
        for rec in self.records:
            for key, value in rec.items():
                if key not in columns and not isinstance(value, (list, tuple, dict)):
                    columns.append(key)
        tmp = self.run_dir / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for rec in self.records:
                writer.writerow({k: _jsonable(rec.get(k)) for k in columns})
        os.replace(tmp, self.run_dir / "metrics.csv")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> int:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels.view(-1, 1)).any(dim=1).sum())


def top1_accuracy(correct: int, total: int, integer_truncation: bool = False) -> float:
    """100·correct/total; `integer_truncation` reproduces torch-1.2 integer division (GLFC quirk 10)."""
    if total == 0:
        return float("nan")
    if integer_truncation:
        return float((100 * correct) // total)
    return 100.0 * correct / total


def average_incremental_accuracy(task_end_accuracies: Sequence[float]) -> float:
    """Mean over tasks of the accuracy on all seen classes after each task (the papers' "Avg")."""
    vals = [a for a in task_end_accuracies if a is not None and not math.isnan(a)]
    return sum(vals) / len(vals) if vals else float("nan")


def forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Mean over tasks j < T-1 of max_{t < T-1} A[t][j] - A[T-1][j] (Chaudhry et al.)."""
    T = len(matrix)
    if T < 2:
        return 0.0
    drops = []
    for j in range(T - 1):
        best = max(matrix[t][j] for t in range(j, T - 1))
        drops.append(best - matrix[T - 1][j])
    return sum(drops) / len(drops)


def backward_transfer(matrix: Sequence[Sequence[float]]) -> float:
    """Mean over j < T-1 of A[T-1][j] - A[j][j] (negative = forgetting)."""
    T = len(matrix)
    if T < 2:
        return 0.0
    return sum(matrix[T - 1][j] - matrix[j][j] for j in range(T - 1)) / (T - 1)


def pycil_line(task_end_accuracies: Sequence[float]) -> str:
    """PyCIL's per-task log line: 'CNN top1 curve: [a0, a1, ...]' and the average."""
    curve = [round(a, 2) for a in task_end_accuracies]
    return f"CNN top1 curve: {curve}  Average Accuracy (CNN): {average_incremental_accuracy(task_end_accuracies):.2f}"


def psnr(estimate: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB between [N, C, H, W] tensors in [0, data_range]."""
    mse = (estimate.float() - target.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)
