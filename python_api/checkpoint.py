"""Atomic checkpoints with RNG states.

    save_checkpoint(path, state)          torch.save to path.tmp, fsync, os.replace -> never half-written
    state = load_checkpoint(path)
    rng = capture_rng_state(); restore_rng_state(rng)   # torch (CPU + CUDA), numpy, random
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state", "seed_everything",
           "keep_round_checkpoints"]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """The reference's seeding: torch, CUDA, numpy, random (+ cudnn.deterministic)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def capture_rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)


def keep_round_checkpoints(last_path, round_idx: int, keep: int) -> list:
    """Keep `last_path` (just written) as round-NNNN.pt beside it, and only the newest `keep` of those.
    A hard link: no second copy on disk (a copy where links are not supported). Returns the kept paths."""
    last_path = Path(last_path)
    folder = last_path.parent
    if keep > 0:
        target = folder / f"round-{round_idx:04d}.pt"
        tmp = folder / (target.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(last_path, tmp)
        except OSError:
            import shutil
            shutil.copyfile(last_path, tmp)
        os.replace(tmp, target)
    kept = sorted(folder.glob("round-[0-9][0-9][0-9][0-9].pt"))
    for old in kept[:max(0, len(kept) - keep)]:
        old.unlink()
    return kept[max(0, len(kept) - keep):]
