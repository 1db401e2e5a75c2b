"""Argument validation for the public functional API: errors name the bad argument.

One helper per kind of check. Wrong types raise TypeError, wrong values (NaN included: a
plain `value >= 0` lets NaN through) raise ValueError.
"""
import numbers

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_floating(x, name: str) -> None:
    check_tensor(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_choice(value, choices, name: str) -> None:
    """`value` is one of the strings `choices`."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_reduction(reduction: str, name: str = "reduction") -> None:
    check_choice(reduction, REDUCTIONS, name)


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_min_dim(x, dim: int, name: str) -> None:
    if x.dim() < dim:
        raise ValueError(f"{name} must have at least {dim} dimension(s), got shape {tuple(x.shape)}")


def check_same_device(a, name_a: str, b, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}")


def check_number(value, name: str) -> float:
    """A finite real number (bool is not one); returned as a Python float for the op schema."""
    kind = type(value)
    # float and int first: the ABC isinstance below costs ~1 us, a visible share of a small op's call
    if kind is not float and kind is not int and (
            isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt))):
        raise TypeError(f"{name} must be a real number, got {kind.__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range (10**400)
        raise ValueError(f"{name} must be a finite number, got an int of {value.bit_length()} bits") from None
    if value - value != 0.0:  # NaN or +-inf (inf - inf is NaN)
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_nonneg(value, name: str) -> float:
    value = check_number(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_positive(value, name: str) -> float:
    value = check_number(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_count(value, name: str, minimum: int = 1) -> int:
    """An integer >= minimum (bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def has_data(x: torch.Tensor) -> bool:
    """False where reading values is impossible (meta/fake tensors, torch.compile tracing):
    data-dependent checks are skipped there and left to the kernels."""
    if x.device.type == "meta" or torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake
    return not is_fake(x)


def reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    return per_item
