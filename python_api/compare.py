"""`fcl-ext compare`: many (method or preset, overrides) × seeds -> one table.

    fcl-ext compare glfc-demo finetune-demo lwf-demo --seeds 0 1 2 --out runs/cmp [key=value ...]
    fcl-ext compare --plan plan.yaml --out runs/cmp --jobs 2

A plan file:

    seeds: [0, 1, 2]
    overrides: [run.device=cpu]          # applied to every run (optional)
    runs:
      - preset: glfc-demo                # the method comes from the preset's `method:`
      - method: lwf                      # or a method with its defaults / a config file
        config: lwf-demo
        label: lwf-T2                    # table row name (default: the preset or method name)
        overrides: [lwf.temperature=1]

Each run goes to <out>/<label>/seed<seed>/ (the ordinary run-directory format). A run whose metrics.json says
completed and whose config.yaml equals the requested config is skipped; one with a checkpoint is resumed;
a directory holding a different config is an error (choose another --out). Then, in <out>:
    compare.json   every run's summary numbers + the per-label aggregates
    compare.csv    one row per run
    compare.md     mean ± std per label (sample std over seeds) with the number of seeds: final accuracy,
                   average incremental accuracy, forgetting (FCIL; iCaRL also NME) or intra / inter (FCCL)
    accuracy_vs_classes.png   mean accuracy on all seen classes vs classes seen, ± std band per label (FCIL)
    intra_inter.png           mean intra and inter accuracy per label with std error bars (heterogeneous)

Every run gets `run.threads` = --threads (default 1) and no progress bars, so a run's numbers do not depend
on --jobs: `--jobs N` runs N runs at once in spawned worker processes and gives the same numbers as --jobs 1.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from python_api.config import ConfigError, list_presets, load_config, read_yaml_source, to_dict

__all__ = ["RunSpec", "plan_from_yaml", "plan_from_names", "run_compare", "aggregate", "markdown_table"]

FCIL_COLUMNS = (("final_accuracy", "final acc"), ("average_incremental_accuracy", "avg inc acc"),
                ("forgetting", "forgetting"), ("nme_final_accuracy", "NME final acc"))
HETERO_COLUMNS = (("intra", "intra"), ("inter", "inter"))
IGNORED_RUN_KEYS = ("progress", "max_rounds")     # change no result (the runner's resume rule)


@dataclass
class RunSpec:
    label: str
    method: str
    config: Optional[str]
    overrides: list = field(default_factory=list)
    seed: int = 0

    def run_dir(self, out: Path) -> Path:
        return Path(out) / self.label / f"seed{self.seed}"


def _method_of(name: str) -> tuple:
    """A preset name -> (its method, the preset); a method name -> (method, None)."""
    from python_api.methods import available_methods
    if name in list_presets() or name.endswith((".yaml", ".yml")):
        method = read_yaml_source(name).get("method")
        if method is None:
            raise ConfigError(f"compare: config {name!r} has no `method:` key")
        return method, name
    if name in available_methods():
        return name, None
    raise ConfigError(f"compare: {name!r} is neither a preset (fcl-ext presets) nor a method "
                      f"({', '.join(available_methods())})")


def _expand(entries: list, seeds: list, common: list) -> list:
    if not seeds:
        raise ConfigError("compare: no seeds given")
    labels, specs = set(), []
    for e in entries:
        if e["label"] in labels:
            raise ConfigError(f"compare: label {e['label']!r} appears twice; give the runs distinct labels")
        labels.add(e["label"])
        for s in seeds:
            specs.append(RunSpec(e["label"], e["method"], e["config"], list(common) + list(e.get("overrides", [])), s))
    return specs


def plan_from_names(names: list, seeds: list, overrides: list = ()) -> list:
    entries = []
    for name in names:
        method, preset = _method_of(name)
        entries.append({"label": Path(name).stem if preset else name, "method": method, "config": preset})
    return _expand(entries, list(seeds), list(overrides))


def plan_from_yaml(path, seeds: Optional[list] = None, overrides: list = ()) -> list:
    data = read_yaml_source(path)
    unknown = set(data) - {"seeds", "overrides", "runs"}
    if unknown:
        raise ConfigError(f"compare plan {str(path)!r}: unknown keys {sorted(unknown)}; expected seeds, overrides, runs")
    entries = []
    for i, run in enumerate(data.get("runs") or []):
        if not isinstance(run, dict) or not ({"preset", "method"} & set(run)):
            raise ConfigError(f"compare plan {str(path)!r}: runs[{i}] needs a `preset` or a `method`")
        bad = set(run) - {"preset", "method", "config", "label", "overrides"}
        if bad:
            raise ConfigError(f"compare plan {str(path)!r}: runs[{i}] has unknown keys {sorted(bad)}")
        config = run.get("preset") or run.get("config")
        method = run.get("method") or _method_of(config)[0]
        label = run.get("label") or (Path(config).stem if config else method)
        entries.append({"label": label, "method": method, "config": config, "overrides": list(run.get("overrides") or [])})
    if not entries:
        raise ConfigError(f"compare plan {str(path)!r}: no runs")
    return _expand(entries, list(seeds if seeds else data.get("seeds") or [0]),
                   list(data.get("overrides") or []) + list(overrides))


def resolve(spec: RunSpec, threads: int):
    from python_api.methods import get_method
    overrides = spec.overrides + [f"run.seed={spec.seed}", "run.progress=false", f"run.threads={threads}"]
    return load_config(get_method(spec.method).config_cls, spec.config, overrides)


def _comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    for key in IGNORED_RUN_KEYS:
        d.get("run", {}).pop(key, None)
    return d


def run_status(spec: RunSpec, cfg, out: Path) -> str:
    """complete | resume | fresh; raises when the directory holds another config."""
    run_dir = spec.run_dir(out)
    if not (run_dir / "config.yaml").exists():
        return "fresh"
    # through the config class, so a key added since the run was made compares at its default
    saved = to_dict(load_config(type(cfg), run_dir / "config.yaml"))
    if _comparable(saved) != _comparable(to_dict(cfg)):
        raise ConfigError(f"compare: {run_dir} holds a run with a different config; use another --out or remove it")
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        summary = json.loads(metrics.read_text()).get("summary") or {}
        if summary.get("completed"):
            return "complete"
    return "resume" if (run_dir / "checkpoints" / "last.pt").exists() else "fresh"


def _execute(method: str, cfg_dict: dict, run_dir: str, resume: bool, config_cls_method: str) -> str:
    """One run (in this process or a worker); returns the run directory."""
    from python_api.config import from_dict
    from python_api.engine.runner import run_training
    from python_api.methods import get_method
    cfg = from_dict(get_method(config_cls_method).config_cls, cfg_dict)
    run_training(method, cfg, out_dir=run_dir, resume=resume, verbose=False)
    return run_dir


def run_compare(specs: list, out, jobs: int = 1, threads: int = 1, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(specs)
    work, actions = [], {}
    for k, spec in enumerate(specs, 1):
        cfg = resolve(spec, threads)
        status = run_status(spec, cfg, out)
        actions[(spec.label, spec.seed)] = {"complete": "skipped", "resume": "resumed", "fresh": "ran"}[status]
        if status == "complete":
            log(f"[compare] run {k} of {n}: {spec.label} seed {spec.seed} — complete, skipped")
        else:
            work.append((k, spec, cfg, status == "resume"))
    failures = []

    def started(k, spec, resume):
        log(f"[compare] run {k} of {n}: {spec.label} seed {spec.seed}{' (resuming)' if resume else ''}", )

    if jobs <= 1:
        for k, spec, cfg, resume in work:
            started(k, spec, resume)
            try:
                _execute(spec.method, to_dict(cfg), str(spec.run_dir(out)), resume, spec.method)
            except Exception as exc:   # one failed run must not lose the others
                failures.append((spec, repr(exc)))
                log(f"[compare] run {k} of {n} FAILED: {exc!r}")
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {}
            for k, spec, cfg, resume in work:
                started(k, spec, resume)
                futures[pool.submit(_execute, spec.method, to_dict(cfg), str(spec.run_dir(out)), resume,
                                    spec.method)] = (k, spec)
            for fut in as_completed(futures):
                k, spec = futures[fut]
                try:
                    fut.result()
                    log(f"[compare] run {k} of {n} done: {spec.label} seed {spec.seed}")
                except Exception as exc:
                    failures.append((spec, repr(exc)))
                    log(f"[compare] run {k} of {n} FAILED: {exc!r}")
    result = collect(specs, out, actions)
    result["failures"] = [{"label": s.label, "seed": s.seed, "error": e} for s, e in failures]
    write_outputs(result, out)
    return result


# ---- results ------------------------------------------------------------------------------------------

def _scalar(summary: dict, key: str):
    v = summary.get(key)
    if isinstance(v, dict):            # FCCL: {"per_participant": [...], "mean": x}
        v = v.get("mean")
    return v if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else None


def collect(specs: list, out: Path, actions: dict) -> dict:
    runs = []
    for spec in specs:
        path = spec.run_dir(out) / "metrics.json"
        summary = json.loads(path.read_text()).get("summary", {}) if path.exists() else {}
        row = {"label": spec.label, "method": spec.method, "config": spec.config, "overrides": spec.overrides,
               "seed": spec.seed, "run_dir": str(spec.run_dir(out)), "completed": bool(summary.get("completed")),
               "action": actions.get((spec.label, spec.seed))}
        for key, _ in FCIL_COLUMNS + HETERO_COLUMNS:
            row[key] = _scalar(summary, key)
        row["classes_seen"] = summary.get("classes_seen")
        row["task_end_accuracy"] = summary.get("task_end_accuracy")
        runs.append(row)
    return {"runs": runs, "aggregates": aggregate(runs)}


def _mean_std(values: list) -> tuple:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(runs: list) -> list:
    out = []
    for label in dict.fromkeys(r["label"] for r in runs):
        rows = [r for r in runs if r["label"] == label and r["completed"]]
        agg = {"label": label, "method": rows[0]["method"] if rows else None, "seeds": len(rows),
               "kind": "heterogeneous" if rows and rows[0]["intra"] is not None else "fcil"}
        for key, _ in FCIL_COLUMNS + HETERO_COLUMNS:
            agg[key + "_mean"], agg[key + "_std"] = _mean_std([r[key] for r in rows])
        curves = [r["task_end_accuracy"] for r in rows if r["task_end_accuracy"]]
        if curves and all(len(c) == len(curves[0]) for c in curves):
            agg["classes_seen"] = rows[0]["classes_seen"]
            agg["curve_mean"] = [statistics.fmean(v) for v in zip(*curves)]
            agg["curve_std"] = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*curves)]
        out.append(agg)
    return out


def markdown_table(aggregates: list) -> str:
    def cell(a, key):
        m, s = a[key + "_mean"], a[key + "_std"]
        return "–" if m is None else f"{m:.2f} ± {s:.2f}"
    lines = []
    fcil = [a for a in aggregates if a["kind"] == "fcil"]
    hetero = [a for a in aggregates if a["kind"] == "heterogeneous"]
    if fcil:
        cols = [c for c in FCIL_COLUMNS if c[0] != "nme_final_accuracy" or any(a["nme_final_accuracy_mean"] is not None
                                                                               for a in fcil)]
        lines.append("| method | seeds | " + " | ".join(name + " (%)" for _, name in cols) + " |")
        lines.append("|---|---:|" + "---:|" * len(cols))
        for a in fcil:
            lines.append(f"| {a['label']} | {a['seeds']} | " + " | ".join(cell(a, k) for k, _ in cols) + " |")
    if hetero:
        if lines:
            lines.append("")
        lines.append("| method | seeds | intra (%) | inter (%) |")
        lines.append("|---|---:|---:|---:|")
        for a in hetero:
            lines.append(f"| {a['label']} | {a['seeds']} | {cell(a, 'intra')} | {cell(a, 'inter')} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    out = Path(out)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    keys = ["label", "method", "config", "seed", "completed"] + [k for k, _ in FCIL_COLUMNS + HETERO_COLUMNS] + ["run_dir"]
    with open(out / "compare.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in result["runs"]:
            w.writerow({k: r[k] for k in keys})
    (out / "compare.md").write_text(markdown_table(result["aggregates"]))
    try:
        write_plots(result["aggregates"], out)
    except Exception as exc:  # plots must never lose the table
        print(f"[compare] plots failed: {exc!r}", file=sys.stderr)


def write_plots(aggregates: list, out: Path) -> list:
    from python_api.report import _save, plt
    written = []
    fcil = [a for a in aggregates if a["kind"] == "fcil" and a.get("curve_mean")]
    if fcil:
        fig, ax = plt.subplots(figsize=(6, 4))
        for a in fcil:
            x, m, s = a["classes_seen"], a["curve_mean"], a["curve_std"]
            line, = ax.plot(x, m, marker="o", label=f"{a['label']} (n={a['seeds']})")
            ax.fill_between(x, [u - v for u, v in zip(m, s)], [u + v for u, v in zip(m, s)],
                            color=line.get_color(), alpha=0.2)
        ax.set_xlabel("classes seen")
        ax.set_ylabel("top-1 accuracy on all seen classes (%)")
        ax.set_title("accuracy vs number of classes (mean ± std over seeds)")
        ax.legend()
        written.append(_save(fig, out / "accuracy_vs_classes.png"))
    hetero = [a for a in aggregates if a["kind"] == "heterogeneous"]
    if hetero:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = range(len(hetero))
        for offset, key in ((-0.2, "intra"), (0.2, "inter")):
            ax.bar([x + offset for x in xs], [a[key + "_mean"] or 0 for a in hetero], width=0.4,
                   yerr=[a[key + "_std"] or 0 for a in hetero], capsize=4, label=key)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([a["label"] for a in hetero])
        ax.set_ylabel("accuracy (%)")
        ax.set_title("intra / inter accuracy (mean ± std over seeds)")
        ax.legend()
        written.append(_save(fig, out / "intra_inter.png"))
    return written


# ---- the demo ------------------------------------------------------------------------------------------

DEMO_PRESETS = ("glfc-demo", "finetune-demo", "lwf-demo", "icarl-demo", "joint-demo")
DEMO_SEEDS = (0, 1)


def compare_demo(out="runs/compare-demo", jobs: int = 2) -> int:
    """GLFC and four baselines x 2 seeds on the bundled digits (the presets' settings), then the table."""
    specs = plan_from_names(list(DEMO_PRESETS), list(DEMO_SEEDS))
    result = run_compare(specs, out, jobs=jobs, threads=1)
    print()
    print(Path(out, "compare.md").read_text(), end="")
    print(f"results and plots: {out}/compare.json, compare.csv, compare.md, accuracy_vs_classes.png")
    return 1 if result["failures"] else 0
