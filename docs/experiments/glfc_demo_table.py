"""Markdown table (mean ± sample std over seeds) from glfc_demo_seeds.sh's results.jsonl.

    python docs/experiments/glfc_demo_table.py /tmp/glfc-demo-seeds/results.jsonl
"""
import json
import statistics
import sys
from collections import defaultdict


def mean_std(values):
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(path):
    rows = defaultdict(list)
    for line in open(path):
        r = json.loads(line)
        if r.get("rc") == 0 and r.get("completed"):
            rows[r["setting"]].append(r)
    print("| setting | seeds | final accuracy | average incremental | forgetting | wall-seconds per run |")
    print("|---|---|---|---|---|---|")
    for setting, runs in rows.items():
        seeds = ",".join(str(r["seed"]) for r in runs)
        print(f"| {setting} | {len(runs)} ({seeds}) | {mean_std([r['final_accuracy'] for r in runs])} | "
              f"{mean_std([r['average_incremental_accuracy'] for r in runs])} | "
              f"{mean_std([r['forgetting'] for r in runs])} | {mean_std([float(r['wall_s']) for r in runs])} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/glfc-demo-seeds/results.jsonl")
