"""`fcl-ext estimate`: time the phases of a run's first rounds on a sampled workload, project the full run.

Sampled, then scaled back by known counts (the table says which numbers are measured and which extrapolated):
  * inside every client / participant and on the server, each long loop runs only its first
    `sample_batches` items (training steps over all epochs, entropy / evaluation / feature batches, the
    perturbation and reconstruction steps, the prototype classes, the public batches) and is scaled by
    items-in-full / items-run (profiling.sampling, profiling.batches);
  * of every train / refresh send only the first `sample_clients` clients run; a client phase is scaled
    per client to the clients asked for.
The rounds of the whole run are projected with the method's `round_plan(r)` (when it has one): how many
units of each phase round r asks for (clients trained and refreshed, test classes, training images), and
whether it starts a task (the phases in the method's TASK_START_PHASES run only then: GLFC's prototype
encoding and reconstruction follow the entropy signal, which fires when a task's new classes arrive).
Kept apart from python_api/profiling.py (which methods import) because it drives the runner and engine."""
from __future__ import annotations

import contextlib
import math
import time

from python_api.profiling import ONE_TIME, TOP_LEVEL, format_table, full_loop_seconds, peak_rss_mb

__all__ = ["estimate", "extrapolate_round", "project_rounds", "CLIENT_KINDS"]


# message kind -> the client phase its handling is timed as; only these sends are cut to a sample of clients
CLIENT_KINDS = {"train": "local_training", "refresh": "refresh"}


def _sampling_engine(sample: int, counts: dict, walls: dict):
    """The in-process transport running only the first `sample` messages of every train / refresh send; it
    notes how many were asked for and run (counts[kind] = [asked, run]) and each kind's wall time."""
    from python_api.engine.inprocess import InProcessEngine

    class SamplingEngine(InProcessEngine):
        def send(self, messages, desc=""):
            messages = list(messages)
            kinds = {m.kind for m in messages}
            chosen = messages
            if sample and kinds <= set(CLIENT_KINDS):
                chosen = messages[:sample]
            for m in messages:
                counts.setdefault(m.kind, [0, 0])[0] += 1
            for m in chosen:
                counts[m.kind][1] += 1
            start = time.perf_counter()
            try:
                return super().send(chosen, desc)
            finally:
                for kind in kinds:
                    walls[kind] = walls.get(kind, 0.0) + (time.perf_counter() - start) / len(kinds)

    return lambda method, progress=True: SamplingEngine(method, progress=progress)


def _ancestors(path: str) -> list:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def extrapolate_round(paths: dict, loops: dict, other: float = 0.0) -> dict:
    """One measured round, its sampled loops scaled to full length.

    paths: seconds by phase nesting path ("local_training/entropy"); loops: "PATH/loop" -> [seconds, items
    run, items in full(, first items' seconds, loops timed item by item)] (profiling.pop_details); other: the
    round's time outside every phase.
    Returns {"paths": extrapolated seconds by path (a loop's extra time added to every enclosing phase),
    "loops": {loop path: full-length seconds}, "one_time": seconds paid once in a run, not per round (ONE_TIME
    phases and the loops' warm-up, taken out of their enclosing phases), "other": the rest of the round
    without root-level one-time phases}."""
    ext = {p: float(s) for p, s in paths.items()}
    full_loops = {}
    one_time, other = 0.0, float(other)
    for path, entry in loops.items():
        seconds = entry[0]
        full, warm_up = full_loop_seconds(*entry)
        full_loops[path] = full
        one_time += warm_up
        for anc in _ancestors(path)[:-1]:
            ext[anc] = ext.get(anc, 0.0) + full - seconds
    for path in sorted(ext, key=lambda p: p.count("/")):
        parts = path.split("/")
        if parts[-1] in ONE_TIME and not any(p in ONE_TIME for p in parts[:-1]):
            seconds = ext[path]
            one_time += seconds
            if len(parts) == 1:
                other = max(other - seconds, 0.0)   # root level: counted in the round's "other"
            for anc in _ancestors(path)[:-1]:
                ext[anc] -= seconds
    return {"paths": ext, "loops": full_loops, "one_time": one_time, "other": other}


def _per_unit(measured: list, task_start_phases: tuple) -> dict:
    """Seconds per unit of every top-level phase part, averaged over the measured rounds.

    measured: [{"ext": extrapolate_round(...), "units": {key: units}, "task_start": bool, "parallel": {phase:
    factor}}]. Parts: "T" (the phase without its loops in units and without task-start sub-phases),
    "T/loop" (a loop with its own units), "T@start" (the task-start sub-phases, from task-start rounds).
    The first measured round holds the process's (and the workers') first-use costs: when later rounds
    were measured, only they give the parts that every round pays."""
    sums, n = {}, {}
    for index, m in enumerate(measured):
        ext, units = m["ext"], m["units"]
        tops = {p for p in ext["paths"] if "/" not in p and p in TOP_LEVEL}
        values = {t: ext["paths"][t] for t in tops}
        values["other"] = ext["other"]
        for top, total in values.items():
            factor = m.get("parallel", {}).get(top, 1.0)
            starts = {p + "@start": s for p, s in ext["paths"].items() if p.count("/") == 1
                      and p.startswith(top + "/") and p.split("/")[1] in task_start_phases}
            parts = {k: ext["loops"][k] for k in units if k.startswith(top + "/") and k in ext["loops"]}
            parts[top] = max(total - sum(starts.values()) - sum(parts.values()), 0.0)
            if m["task_start"]:
                parts.update(starts)
            for key, seconds in parts.items():
                if index == 0 and len(measured) > 1 and not key.endswith("@start"):
                    continue
                u = _units(units, key)
                if not u:
                    continue
                sums[key] = sums.get(key, 0.0) + seconds * factor / u
                n[key] = n.get(key, 0) + 1
    return {k: sums[k] / n[k] for k in sums}


def _units(units: dict, key: str):
    """Units of a part: its own entry, else its top-level phase's, else 1."""
    base = key.split("@")[0]
    return units.get(base, units.get(base.split("/")[0], 1))


def project_rounds(measured: list, plans: list, task_start_phases: tuple = ()) -> list:
    """Projected seconds by top-level phase for every planned round ({"units", "task_start"} each)."""
    per_unit = _per_unit(measured, task_start_phases)
    out = []
    for plan in plans:
        units, costs = plan["units"], {}
        for key, seconds in per_unit.items():
            if key.endswith("@start") and not plan["task_start"]:
                continue
            top = key.split("/")[0].split("@")[0]
            costs[top] = costs.get(top, 0.0) + seconds * _units(units, key)
        out.append(costs)
    return out


def _measured_units(plan: dict, counts_by_round: dict) -> dict:
    """The round's planned units with the client phases (and the parts the plan names in "per_client",
    e.g. the reconstruction of the selected clients' gradients) cut to the clients that actually ran."""
    units = dict(plan["units"])
    per_client = plan.get("per_client", {})
    for kind, phase_name in CLIENT_KINDS.items():
        asked, ran = counts_by_round.get(kind, [0, 0])
        if asked:
            for key in units:
                if key == phase_name or key.startswith(phase_name + "/") or per_client.get(key) == kind:
                    units[key] = units[key] * ran / asked
    return units


def estimate(method_name: str, cfg, rounds: int = None, sample_clients: int = 1, sample_batches: int = 2,
             out_dir=None, echo=print, sample_seconds: float = 3.0, sample_max_seconds: float = 10.0) -> dict:
    """Run the first `rounds` rounds on the sampled workload, time the phases, project the full run.
    A batch loop runs at least `sample_batches` items and goes on until it has run `sample_seconds`, but
    stops after any item once it has run `sample_max_seconds` (one full-size batch can take that long)."""
    import copy
    import tempfile
    from pathlib import Path
    from python_api import profiling
    from python_api.engine.runner import run_training

    for name, value, least in (("rounds", 1 if rounds is None else rounds, 1), ("sample_clients", sample_clients, 0),
                               ("sample_batches", sample_batches, 0), ("sample_seconds", sample_seconds, 0),
                               ("sample_max_seconds", sample_max_seconds, 0)):
        if not value >= least:   # also refuses NaN
            raise ValueError(f"estimate: {name} must be >= {least}, got {value}")
    workers = int(getattr(cfg.run, "workers", 1) or 1)
    if rounds is None:   # with workers, round 0 holds the fresh worker processes' first-use costs
        rounds = 2 if workers > 1 else 1
    run_cfg = copy.deepcopy(cfg)
    run_cfg.run.max_rounds = rounds
    if workers > 1 and sample_clients:   # one sampled client per worker, so the sends' parallelism is measured
        sample_clients = max(sample_clients, workers)
    counts: dict = {}
    walls: dict = {}
    per_round_counts, per_round_walls = [], []
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fcl-estimate-"))
    holder = {}
    make_engine = _sampling_engine(sample_clients, counts, walls)

    def engine(method, progress=True):
        holder["method"] = method
        transport = make_engine(method, progress)
        run_round = method.run_round

        def counted_round(r, t):
            counts.clear()
            walls.clear()
            try:
                return run_round(r, t)
            finally:
                per_round_counts.append({k: list(v) for k, v in counts.items()})
                per_round_walls.append(dict(walls))
        method.run_round = counted_round
        return transport
    start = time.perf_counter()
    with profiling.sampling(sample_batches, sample_seconds, sample_max_seconds) if sample_batches else \
            contextlib.nullcontext():
        result = run_training(method_name, run_cfg, out_dir=out, engine=engine, verbose=False)
    wall = time.perf_counter() - start
    method = holder["method"]
    records = result.records
    setup_s = max(wall - sum(r["round_time_s"] for r in records), 0.0)
    total_rounds = method.num_rounds
    plan_of = getattr(method, "round_plan", None) or (lambda r: {"units": {}, "task_start": r == 0})
    task_start_phases = tuple(getattr(method, "TASK_START_PHASES", ()))
    measured, one_time = [], 0.0
    for record, rc, rw in zip(records, per_round_counts, per_round_walls):
        phases = record.get("phase_times_s", {})
        paths = record.get("phase_paths_s") or {k: v for k, v in phases.items() if k in TOP_LEVEL and k != "other"}
        ext = extrapolate_round(paths, record.get("phase_samples", {}), phases.get("other", 0.0))
        one_time += ext["one_time"]
        parallel = {}
        if workers > 1:   # client phases are summed over workers: scale to the sends' wall time
            for kind, phase_name in CLIENT_KINDS.items():
                if rw.get(kind) and paths.get(phase_name):
                    parallel[phase_name] = min(rw[kind] / paths[phase_name], 1.0)
        plan = plan_of(record["round"])
        measured.append({"ext": ext, "units": _measured_units(plan, rc), "task_start": plan["task_start"],
                         "parallel": parallel, "counts": rc, "record": record})
    plans = [plan_of(r) for r in range(total_rounds)]
    projected = project_rounds(measured, plans, task_start_phases)
    total = setup_s + one_time + sum(sum(c.values()) for c in projected)

    first = measured[0] if measured else None
    rows = _table_rows(first, projected[0] if projected else {}, plans[0] if plans else {}) if first else []
    table = format_table(rows, ("phase (round 0)", "measured s", "full round s", "how"))
    missing = [p for p in task_start_phases
               if not any(p in path.split("/") for m in measured for path in m["ext"]["paths"])]
    steady = next((i for i, p in enumerate(plans) if not p["task_start"]), None)
    report = {"measured_rounds": len(records), "measured_wall_s": wall, "setup_s": setup_s, "one_time_s": one_time,
              "phase_times_s": [m["record"].get("phase_times_s", {}) for m in measured],
              "projected_rounds_s": projected, "rounds_total": total_rounds, "projected_total_s": total,
              "peak_rss_mb": peak_rss_mb(), "messages": per_round_counts, "run_dir": str(out),
              "not_measured": missing, "table_rows": rows}
    echo(table)
    echo(f"measured {len(records)} round(s) in {wall:.1f} s (setup {setup_s:.1f} s, paid once: client setup and "
         f"warm-up {one_time:.1f} s); sampled: the first {sample_batches or 'all'} item(s) of every loop (batch loops: "
         f"at least {sample_seconds:g} s, at most {sample_max_seconds:g} s past the first), "
         f"{sample_clients or 'all'} client(s) per train/refresh send; workers={workers}")
    if projected:
        line = f"projected rounds: round 0 {_hms(sum(projected[0].values()))}"
        if steady is not None:
            line += f", round {steady} (no task start) {_hms(sum(projected[steady].values()))}"
        line += f", last round {_hms(sum(projected[-1].values()))}"
        echo(line)
    if missing:
        echo(f"not in the measured rounds, so not projected: {', '.join(missing)} (task-start phases)")
    echo(f"projected full run: {total_rounds} rounds, {_hms(total)} on this device; peak memory "
         f"{report['peak_rss_mb']:.0f} MiB (measured on the sampled rounds)")
    return report


def _table_rows(first: dict, full_round: dict, plan: dict) -> list:
    """Rows of round 0: every phase path, its measured seconds, the full round's seconds and how they came."""
    ext, record, counts = first["ext"], first["record"], first["counts"]
    paths = record.get("phase_paths_s") or {}
    loops = record.get("phase_samples") or {}
    clients = {phase_name: counts.get(kind, [0, 0]) for kind, phase_name in CLIENT_KINDS.items()}
    clients.update({key: counts.get(kind, [0, 0]) for key, kind in plan.get("per_client", {}).items()})
    rows = []
    for path in sorted(paths, key=lambda p: (p.split("/")[0] not in TOP_LEVEL, TOP_LEVEL.index(p.split("/")[0])
                                              if p.split("/")[0] in TOP_LEVEL else 99, p)):
        top = path.split("/")[0]
        own = [(k.rsplit("/", 1)[1], v) for k, v in loops.items() if k.rsplit("/", 1)[0] == path and v[1] < v[2]]
        inner = any(k.startswith(path + "/") and v[1] < v[2] for k, v in loops.items())
        how = []
        if own:
            how.append("extrapolated: " + ", ".join(f"{name} {v[1]} of {v[2]}" for name, v in own))
        elif inner:
            how.append("extrapolated in its parts")
        asked, ran_c = clients.get(path, clients.get(top, [0, 0]))
        factor = 1.0
        if asked and ran_c and ran_c < asked:
            how.append(f"x{asked}/{ran_c} clients")
            factor = asked / ran_c
        if path.split("/")[-1] in ONE_TIME:
            how.append("once per client")
        full = full_round.get(path, 0.0) if "/" not in path and path in TOP_LEVEL else \
            ext["paths"].get(path, 0.0) * factor
        label = ("  " * path.count("/")) + path.split("/")[-1]
        rows.append((label, f"{paths[path]:.2f}", f"{full:.2f}", "; ".join(how) or "measured"))
    rows.append(("other", f"{record.get('phase_times_s', {}).get('other', 0.0):.2f}",
                 f"{full_round.get('other', ext['other']):.2f}", "measured"))
    rows.append(("round (projected, top-level phases)", f"{record['round_time_s']:.2f}",
                 f"{sum(full_round.values()):.2f}", "with the round plan's units"))
    return rows


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    d, rest = divmod(int(round(seconds)), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
