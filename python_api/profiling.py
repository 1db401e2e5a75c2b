"""Phase timing of a round, and the cost projection of a whole run (`fcl-ext estimate`).

    with profiling.phase("local_training"):     # anywhere in a method; nested phases are timed on their own
        ...
    times = profiling.pop_round()               # {phase: seconds} since the last pop (the runner stores it
                                                # as record["phase_times_s"] in metrics.json)

A phase longer than `LOG_AFTER_S` prints one line to stderr when it ends, progress bars or not, so a long
round shows what it is doing. Phase names used by the trainers:

    local_training        a selected client's local update (all epochs)
    refresh               an unselected client's refresh (entropy pass, herding when its signal fires)
    entropy, herding      the parts of both (inside local_training / refresh)
    prototype_encoding    a client's perturbed prototypes and their gradients (GLFC)
    proxy_reconstruction  the proxy server's reconstruction and old-model choice (GLFC)
    aggregation           FedAvg of the updates
    evaluation            the global model on the test set
"""
from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections import defaultdict

__all__ = ["phase", "pop_round", "peak_rss_mb", "LOG_AFTER_S", "project_run", "format_table"]

LOG_AFTER_S = 10.0

_local = threading.local()


def _totals() -> dict:
    if not hasattr(_local, "totals"):
        _local.totals = defaultdict(float)
        _local.counts = defaultdict(int)
    return _local.totals


@contextlib.contextmanager
def phase(name: str, detail: str = ""):
    totals = _totals()
    start = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - start
        totals[name] += took
        _local.counts[name] += 1
        if took >= LOG_AFTER_S:
            print(f"[phase] {name}{' ' + detail if detail else ''}: {took:.1f} s", file=sys.stderr, flush=True)


def add(times: dict, counts: dict = None) -> None:
    """Merge phase times measured elsewhere (a worker process) into this process's totals."""
    totals = _totals()
    for name, seconds in times.items():
        totals[name] += seconds
        _local.counts[name] += (counts or {}).get(name, 1)


def pop_round(with_counts: bool = False):
    """The phase totals since the last call (and reset them)."""
    totals = _totals()
    out, counts = {k: round(v, 4) for k, v in totals.items()}, dict(_local.counts)
    totals.clear()
    _local.counts.clear()
    return (out, counts) if with_counts else out


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and of finished children) in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


def format_table(rows: list, header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def project_run(measured: list, total_rounds: int, setup_s: float, scale: dict = None) -> dict:
    """Projected wall time of a run of `total_rounds` from the phase times of its first measured rounds.

    `measured`: one {phase: seconds} per measured round; `scale`: {phase: factor} for phases measured on a
    cut-down workload (fewer clients, fewer epochs) to the configured one. The round's unphased rest
    (bookkeeping) is carried over as 'other'. Every later round is assumed to cost the mean measured round."""
    scale = scale or {}
    names = sorted({k for m in measured for k in m})
    per_round = {k: sum(m.get(k, 0.0) for m in measured) / max(len(measured), 1) * scale.get(k, 1.0) for k in names}
    round_s = sum(v for k, v in per_round.items() if k in TOP_LEVEL)
    return {"per_round_s": per_round, "round_s": round_s, "setup_s": setup_s,
            "total_s": setup_s + round_s * total_rounds, "rounds": total_rounds}


# the phases that do not overlap (the others are parts of them); their sum is the round's cost
TOP_LEVEL = ("local_training", "refresh", "proxy_reconstruction", "aggregation", "evaluation", "other")


# ---------------------------------------------------------------- fcl-ext estimate

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
