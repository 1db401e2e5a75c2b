"""Argument validation for the public functional API: errors name the bad argument."""
import torch

REDUCTIONS = ("mean", "sum", "none")


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_floating(x, name: str) -> None:
    check_tensor(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_reduction(reduction: str, name: str = "reduction") -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name} must be one of {REDUCTIONS}, got {reduction!r}")


def check_min_dim(x, dim: int, name: str) -> None:
    if x.dim() < dim:
        raise ValueError(f"{name} must have at least {dim} dimension(s), got shape {tuple(x.shape)}")


def check_same_device(a, name_a: str, b, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}")


def check_nonneg(value: float, name: str) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    return per_item
