"""`fcl-ext estimate`: time the phases of a run's first rounds on a cut-down workload, project the full run.

Kept apart from python_api/profiling.py (which methods import) because it drives the runner and engine."""
from __future__ import annotations

import time

from python_api.profiling import TOP_LEVEL, format_table, peak_rss_mb

__all__ = ["estimate"]


# message kind -> the phase a client's handling of it is timed as
KIND_PHASE = {"train": "local_training", "refresh": "refresh"}


def _sampling_engine(sample: int, counts: dict):
    """An in-process transport that runs only the first `sample` messages of every send and notes how many
    were asked for (counts[kind] = [requested, run]), so the per-client phase times scale to the full round."""
    from python_api.engine.inprocess import InProcessEngine

    class SamplingEngine(InProcessEngine):
        def send(self, messages, desc=""):
            for m in messages:
                counts.setdefault(m.kind, [0, 0])[0] += 1
            chosen = list(messages)[:sample] if sample else list(messages)
            for m in chosen:
                counts[m.kind][1] += 1
            return super().send(chosen, desc)

    return lambda method, progress=True: SamplingEngine(method, progress=progress)


def estimate(method_name: str, cfg, rounds: int = 1, sample_clients: int = 2, out_dir=None, echo=print) -> dict:
    """Run the first `rounds` rounds on a cut-down workload, time the phases, project the full run.

    Cut-down: one local epoch instead of client.local_epochs (the epoch part of local_training is scaled
    back by the epoch count; entropy, herding and prototype encoding are per round, not per epoch) and only
    `sample_clients` of every round's train / refresh messages (the per-client time is scaled to the number
    asked for). Later tasks are assumed to cost like the measured rounds, with evaluation growing with the
    classes seen (the test set of the seen classes)."""
    import copy
    import tempfile
    from pathlib import Path
    from python_api.engine.runner import run_training

    epochs = getattr(getattr(cfg, "client", None), "local_epochs", None)
    run_cfg = copy.deepcopy(cfg)
    if epochs:
        run_cfg.client.local_epochs = 1
    run_cfg.run.max_rounds = rounds
    counts: dict = {}
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fcl-estimate-"))
    start = time.perf_counter()
    result = run_training(method_name, run_cfg, out_dir=out, engine=_sampling_engine(sample_clients, counts),
                          verbose=False)
    wall = time.perf_counter() - start
    records = result.records
    measured = [r.get("phase_times_s", {}) for r in records]
    setup_s = max(wall - sum(r["round_time_s"] for r in records), 0.0)
    n = max(len(measured), 1)
    mean = {k: sum(m.get(k, 0.0) for m in measured) / n for k in {k for m in measured for k in m}}
    # scale to the configured workload
    per_round = dict(mean)
    for kind, phase_name in KIND_PHASE.items():
        asked, ran = counts.get(kind, [0, 0])
        if ran and phase_name in per_round:
            factor = asked / ran
            per_round[phase_name] *= factor
            if phase_name == "local_training" and epochs:
                fixed = sum(mean.get(k, 0.0) for k in ("entropy", "herding", "prototype_encoding")) * factor
                per_round[phase_name] = fixed + (per_round[phase_name] - fixed) * epochs
    total_rounds = result.summary.get("rounds_total") or len(records)
    tasks = getattr(getattr(cfg, "federated", None), "num_tasks", 1) or 1
    per_task = max(total_rounds // tasks, 1)
    measured_task = sum(r.get("task", 0) for r in records) / n + 1   # classes seen ∝ task + 1
    total = setup_s
    for r in range(total_rounds):
        growth = (min(r // per_task, tasks - 1) + 1) / measured_task
        total += sum(v * (growth if k == "evaluation" else 1.0) for k, v in per_round.items() if k in TOP_LEVEL)
    round_s = sum(v for k, v in per_round.items() if k in TOP_LEVEL)
    rows = [(k, f"{mean.get(k, 0.0):.2f}", f"{per_round[k]:.2f}") for k in sorted(per_round, key=lambda k: (
        k not in TOP_LEVEL, k))]
    table = format_table(rows, ("phase (per round)", "measured s", "projected s"))
    report = {"measured_rounds": len(records), "measured_wall_s": wall, "setup_s": setup_s,
              "phase_times_s": mean, "projected_round_s": per_round, "projected_first_round_s": round_s,
              "rounds_total": total_rounds, "projected_total_s": total, "peak_rss_mb": peak_rss_mb(),
              "messages": counts, "run_dir": str(out)}
    echo(table)
    echo(f"measured {len(records)} round(s) in {wall:.1f} s (setup {setup_s:.1f} s; {sample_clients or 'all'} "
         f"client(s) per send, 1 local epoch of {epochs})")
    echo(f"projected full run: {total_rounds} rounds, {_hms(total)} on this device; peak memory "
         f"{report['peak_rss_mb']:.0f} MiB (measured)")
    return report


def _hms(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
