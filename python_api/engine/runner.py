"""The training loop shared by every method: run directory, rounds, metrics, checkpoints, plots.

    result = run_training("glfc", cfg, out_dir="runs/x", resume=False, engine="inprocess")
    result.run_dir, result.summary, result.records

Run directory contract (both methods):
    config.yaml        the resolved config
    metrics.json       {"rounds": [one record per round], "summary": {...}}
    metrics.csv        the scalar columns of the round records
    plots/*.png        written by the method's write_plots
    checkpoints/       last.pt (atomic) after every `run.checkpoint_every` rounds, and the last
                       `run.keep_checkpoints` of them as round-NNNN.pt (hard links to the same bytes)
A checkpoint holds the method's server state, every client's state, the metrics records and the RNG
states; `resume=True` continues after the last complete round and reaches the same final metrics as
an uninterrupted run. A non-finite loss or update (run.on_nonfinite=stop) raises NonFiniteError from
the round; metrics.json then holds the rounds before it and `summary.stopped`, the checkpoint is untouched.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fcl_ext.device_errors import DeviceInputError, check_device_errors
from python_api import profiling
from python_api.checkpoint import (capture_rng_state, keep_round_checkpoints, load_checkpoint, restore_rng_state,
                                   save_checkpoint, seed_everything)
from python_api.config import ConfigError, load_config, save_config, to_dict
from python_api.engine.registry import build_engine, get_engine
from python_api.metrics import MetricsLogger
from python_api.nonfinite import NonFiniteError

__all__ = ["RunResult", "run_training", "resolve_device", "default_run_dir"]

CHECKPOINT_FORMAT = 1


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    records: list
    completed: bool          # False when run.max_rounds stopped it early


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} requested but no CUDA device is visible")
    return device


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_training(method_name: str, cfg, out_dir=None, resume: bool = False, engine: str = "inprocess",
                 verbose: bool = True) -> RunResult:
    if isinstance(engine, str) and get_engine(engine).run is not None:   # e.g. Flower: it owns the process layout
        return get_engine(engine).run(method_name, cfg, out_dir=out_dir, resume=resume, engine=engine,
                                      verbose=verbose)
    from python_api.methods import get_method
    spec = get_method(method_name)
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(method_name)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        saved = load_config(spec.config_cls, run_dir / "config.yaml")
        if cfg is not None:
            # The saved config wins (other settings would not reproduce the run); only the settings
            # that do not change results (run.max_rounds, run.progress) come from the caller.
            a, b = to_dict(saved), to_dict(cfg)
            for key in ("max_rounds", "progress"):
                a["run"][key] = b["run"][key]
            if a != b and verbose:
                print(f"[resume] using the saved config {run_dir / 'config.yaml'} (given settings differ)")
            saved.run.max_rounds, saved.run.progress = cfg.run.max_rounds, cfg.run.progress
        cfg = saved
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plots").mkdir(exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    if getattr(cfg.run, "keep_freed_memory", False):   # before the data and models are allocated
        profiling.keep_freed_memory()
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    method = spec.build(cfg, run_dir, device)
    transport = build_engine(engine, method, progress=cfg.run.progress)

    start_round = 0
    logger = MetricsLogger(run_dir)
    if resume:
        state = load_checkpoint(ckpt_path, map_location="cpu")
        if state.get("format") != CHECKPOINT_FORMAT or state.get("method") != method_name:
            raise RuntimeError(f"{ckpt_path} is not a {method_name} checkpoint of format {CHECKPOINT_FORMAT}")
        method.load_state_dict(state["method_state"])
        transport.load_state_dict(state["engine_state"])
        logger = MetricsLogger(run_dir, state["records"])
        restore_rng_state(state["rng"])
        start_round = state["round"] + 1
        if verbose:
            print(f"[resume] {run_dir}: continuing after round {state['round']}")

    end_round = method.num_rounds
    if cfg.run.max_rounds is not None:
        end_round = min(end_round, start_round + cfg.run.max_rounds)
    bar = range(start_round, end_round)
    if cfg.run.progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"{method_name} rounds", initial=start_round, total=method.num_rounds,
                   unit="round", dynamic_ncols=True)
    profiling.pop_round()   # phase times of the setup do not belong to round 0
    profiling.pop_details()
    for r in bar:
        t0 = time.perf_counter()
        try:
            record = method.run_round(r, transport)
            # CUDA kernels record invalid inputs (labels out of range, ...) on the device instead of
            # syncing; one sync per round reads them, before anything of this round is saved.
            check_device_errors()
        except (NonFiniteError, DeviceInputError) as exc:   # nothing of this round is saved
            stopped = str(exc) if isinstance(exc, NonFiniteError) else f"round {r}: {exc}"
            logger.write(summary={"completed": False, "rounds_done": len(logger.records), "stopped": stopped})
            raise
        record.setdefault("round", r)
        record["round_time_s"] = time.perf_counter() - t0
        phases, details = profiling.pop_round(), profiling.pop_details()
        if profiling.sample_limit() is not None:   # `fcl-ext estimate`: what was cut, to scale it back
            record["phase_paths_s"], record["phase_samples"] = details["paths"], details["loops"]
        if phases:   # the non-overlapping phases, and the rest of the round as "other"
            top = sum(v for k, v in phases.items() if k in profiling.TOP_LEVEL)
            phases["other"] = round(max(record["round_time_s"] - top, 0.0), 4)
            record["phase_times_s"] = phases
            record["runtime_peak_rss_mb"] = round(profiling.peak_rss_mb(), 1)
        logger.append(record)
        if cfg.run.progress and hasattr(method, "round_postfix"):
            bar.set_postfix(method.round_postfix(record))
        last = r == end_round - 1
        if (r + 1) % max(1, cfg.run.checkpoint_every) == 0 or last:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "method": method_name, "round": r,
                "method_state": method.state_dict(), "engine_state": transport.state_dict(),
                "records": logger.records, "rng": capture_rng_state()})
            keep_round_checkpoints(ckpt_path, r, cfg.run.keep_checkpoints)
        logger.write(summary=method.summary(logger.records) if not last else None)

    close = getattr(transport, "close", None)   # e.g. the in-process engine's worker processes
    if close is not None:
        close()
    completed = end_round == method.num_rounds
    summary = method.summary(logger.records)
    summary["completed"] = completed
    summary["rounds_done"] = len(logger.records)
    summary["rounds_total"] = method.num_rounds
    logger.write(summary=summary)
    try:
        method.write_plots(run_dir / "plots", logger.records, summary)
    except Exception as exc:  # plots must never lose a finished run's metrics
        print(f"[plots] failed: {exc!r}")
    return RunResult(run_dir=run_dir, summary=summary, records=logger.records, completed=completed)
