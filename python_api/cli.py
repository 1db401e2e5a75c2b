"""`fcl-ext` command line (also `python -m python_api`).

    fcl-ext train glfc --config glfc-demo [key.sub=value ...] [--out DIR] [--resume] [--engine inprocess]
    fcl-ext train fccl --config fccl-demo --data-root ~/data
    fcl-ext compare glfc-demo lwf-demo --seeds 0 1 2 --out runs/cmp [--jobs 2]   methods x seeds -> one table
    fcl-ext compare-demo            GLFC + baselines x 2 seeds on the bundled digits
    fcl-ext make-data synthetic --like cifar100 --out DIR [--scale 0.01]   same-size synthetic set, real format
    fcl-ext estimate glfc --config glfc-cifar100-t10 --data-root DIR   phase table + projected wall time, memory
    fcl-ext presets                 list the shipped YAML presets
    fcl-ext show-config glfc --config glfc-cifar100-t10 client.local_epochs=5   print the resolved config
    fcl-ext info                    fcl_ext build information
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from python_api.config import ConfigError, list_presets, load_config, to_dict
from python_api.nonfinite import NonFiniteError

__all__ = ["main", "build_parser", "resolve_config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcl-ext", description="Federated continual learning trainers (GLFC, FCCL)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config_args(p):
        p.add_argument("method", help="method name: glfc | fccl")
        p.add_argument("--config", "-c", default=None,
                       help="preset name (see `fcl-ext presets`) or path to a YAML file")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="dotted overrides, e.g. client.local_epochs=5 run.seed=1")
        p.add_argument("--data-root", default=None, help="shorthand for data.root=PATH")
        p.add_argument("--device", default=None, help="shorthand for run.device=NAME (auto|cpu|cuda)")

    train = sub.add_parser("train", help="train a method; results go to a run directory")
    add_config_args(train)
    train.add_argument("--out", "-o", default=None, help="run directory (default runs/<method>-<timestamp>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--engine", default="inprocess", help="execution engine (default inprocess)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (run.progress=false)")

    est = sub.add_parser("estimate", help="time the phases of the first rounds, project the full run's cost")
    add_config_args(est)
    est.add_argument("--rounds", type=int, default=None,
                     help="rounds to measure (default 1; 2 with run.workers > 1: round 0 warms the workers up)")
    est.add_argument("--sample-clients", type=int, default=1,
                     help="clients actually run per train/refresh send, scaled to all (0 = all; default 1)")
    est.add_argument("--sample-batches", type=int, default=2,
                     help="items run of every long loop (batches, steps), scaled to all (0 = all; default 2)")
    est.add_argument("--sample-seconds", type=float, default=3.0,
                     help="a batch loop goes on past --sample-batches until it has run this long (default 3)")
    est.add_argument("--sample-max-seconds", type=float, default=10.0,
                     help="... and stops after any batch once it has run this long (default 10)")
    est.add_argument("--out", "-o", default=None, help="run directory of the measured rounds (default: a temp dir)")

    show = sub.add_parser("show-config", help="print the resolved config as YAML")
    add_config_args(show)

    compare = sub.add_parser("compare", help="run methods/presets x seeds and tabulate mean ± std (python_api/compare.py)")
    compare.add_argument("names", nargs="*", metavar="NAME|key.sub=value",
                         help="presets or method names to compare, and overrides applied to every run")
    compare.add_argument("--plan", default=None, help="YAML file listing the runs (see python_api/compare.py)")
    compare.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the plan's, or 0)")
    compare.add_argument("--out", "-o", default="runs/compare", help="output directory (default runs/compare)")
    compare.add_argument("--jobs", "-j", type=int, default=1, help="runs in parallel worker processes")
    compare.add_argument("--threads", type=int, default=1, help="torch threads per run (run.threads)")
    demo = sub.add_parser("compare-demo", help="GLFC + baselines x 2 seeds on the bundled digits, then the table")
    demo.add_argument("--out", "-o", default="runs/compare-demo")
    demo.add_argument("--jobs", "-j", type=int, default=2)

    make_data = sub.add_parser("make-data", help="write a synthetic dataset in a real on-disk format")
    make_data.add_argument("kind", choices=["synthetic"], help="what to make (synthetic: python_api/data/synthetic.py)")
    make_data.add_argument("--like", required=True,
                           help="cifar100 | tiny-imagenet | mini-imagenet | digits | mnist | usps | svhn | syn | "
                                "office-home | fashion-mnist")
    make_data.add_argument("--out", "-o", required=True, help="data root to write into (use as --data-root)")
    make_data.add_argument("--scale", type=float, default=1.0,
                           help="fraction of the real image counts (default 1: the real counts)")
    make_data.add_argument("--seed", type=int, default=0)

    sub.add_parser("presets", help="list the YAML presets shipped with the package")
    sub.add_parser("info", help="fcl_ext build information")
    return parser


def resolve_config(args):
    from python_api.methods import get_method
    spec = get_method(args.method)
    overrides = list(args.overrides)
    if args.data_root is not None:
        overrides.append(f"data.root={args.data_root}")
    if args.device is not None:
        overrides.append(f"run.device={args.device}")
    if getattr(args, "no_progress", False):
        overrides.append("run.progress=false")
    return spec, load_config(spec.config_cls, args.config, overrides)


def _train(args) -> int:
    from python_api.engine.runner import run_training
    spec, cfg = resolve_config(args)
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out DIR (the run directory to continue)")
    result = run_training(spec.name, cfg, out_dir=args.out, resume=args.resume, engine=args.engine)
    print()
    report = result.summary.get("report")
    if report:
        print(report)
    print(f"run directory: {result.run_dir}")
    print(f"  metrics: {result.run_dir / 'metrics.json'}  {result.run_dir / 'metrics.csv'}")
    plots = sorted(str(p) for p in (result.run_dir / "plots").glob("*.png"))
    print(f"  plots:   {', '.join(plots) if plots else '(none)'}")
    if not result.completed:
        print(f"  stopped after {len(result.records)} rounds (run.max_rounds); continue with --resume --out {result.run_dir}")
    return 0


def _compare(args) -> int:
    from python_api import compare
    names = [n for n in args.names if "=" not in n]
    overrides = [n for n in args.names if "=" in n]
    if args.plan is not None:
        if names:
            raise ConfigError("compare: give either --plan FILE or names on the command line, not both")
        specs = compare.plan_from_yaml(args.plan, args.seeds, overrides)
    elif names:
        specs = compare.plan_from_names(names, args.seeds or [0], overrides)
    else:
        raise ConfigError("compare: nothing to run; name presets/methods or give --plan FILE")
    result = compare.run_compare(specs, args.out, jobs=args.jobs, threads=args.threads)
    print()
    print((Path(args.out) / "compare.md").read_text(), end="")
    print(f"results: {Path(args.out) / 'compare.json'}  {Path(args.out) / 'compare.csv'}  {Path(args.out) / 'compare.md'}")
    return 1 if result["failures"] else 0


def main(argv=None) -> int:
    parser = build_parser()
    # overrides may come after options (`--config x a.b=1`): argparse leaves those as unknown args
    args, extra = parser.parse_known_args(argv)
    for item in extra:
        if "=" in item and not item.startswith("-") and hasattr(args, "overrides"):
            args.overrides.append(item)
        elif "=" in item and not item.startswith("-") and hasattr(args, "names"):
            args.names.append(item)
        else:
            parser.error(f"unrecognized argument: {item}")
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "estimate":
            from python_api.estimate import estimate
            args.no_progress = True
            spec, cfg = resolve_config(args)
            estimate(spec.name, cfg, rounds=args.rounds, sample_clients=args.sample_clients,
                     sample_batches=args.sample_batches, sample_seconds=args.sample_seconds,
                     sample_max_seconds=args.sample_max_seconds, out_dir=args.out)
            return 0
        if args.command == "compare-demo":
            from python_api.compare import compare_demo
            return compare_demo(args.out, args.jobs)
        if args.command == "show-config":
            spec, cfg = resolve_config(args)
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            report = getattr(spec.config_cls, "switch_report", None)   # e.g. GLFC: reference value of every switch
            if report is not None:
                print(report(cfg))
            return 0
        if args.command == "make-data":
            from python_api.data.synthetic import make_synthetic
            try:
                counts = make_synthetic(args.like, args.out, scale=args.scale, seed=args.seed)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            for split, count in counts.items():
                print(f"  {split}: {count} images")
            return 0
        if args.command == "presets":
            for name in list_presets():
                print(name)
            return 0
        if args.command == "info":
            import fcl_ext
            print(json.dumps(fcl_ext.info(), indent=1))
            return 0
    except (ConfigError, KeyError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fcl-ext: error: {msg}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"fcl-ext: error: {exc}", file=sys.stderr)
        return 3
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
