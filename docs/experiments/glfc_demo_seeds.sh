#!/usr/bin/env bash
# glfc-demo settings by evidence (issue 16, item 8): the same glfc-demo sizes under two switch settings,
# seeds 0..N-1, one run at a time, one thread. Appends one JSON line per run to $OUT/results.jsonl.
#   reference : glfc-demo as shipped now (every switch at the official code's value)
#   old-demo  : the settings glfc-demo shipped before issue 16 (corrected proxy/memory/LR switches and the
#               old defaults of the switches this issue added)
# Usage: OUT=/tmp/glfc-seeds SEEDS="0 1 2 3 4" bash docs/experiments/glfc_demo_seeds.sh
set -u
OUT=${OUT:-/tmp/glfc-demo-seeds}
SEEDS=${SEEDS:-"0 1 2 3 4"}
PY=${PY:-python}
mkdir -p "$OUT"
OLD_DEMO="client.lr_schedule=per_task_step client.skip_relearned_classes=true proxy.best_perf_reset_per_task=true
 proxy.monitor_transform=test proxy.pixel_wrap=false client.herding_train_mode=false client.bn_stats_after_upload=false
 proxy.accuracy_integer_truncation=false proxy.encoder_num_classes=null proxy.tolerance_grad=1.0e-7
 proxy.nonfinite_rollback=true"
for seed in $SEEDS; do
  for setting in reference old-demo; do
    extra=""
    [ "$setting" = old-demo ] && extra=$OLD_DEMO
    dir="$OUT/$setting-seed$seed"
    [ -f "$dir/metrics.json" ] && grep -q '"completed": true' "$dir/metrics.json" && continue
    start=$(date +%s)
    OMP_NUM_THREADS=1 nice -n 5 $PY -m python_api.cli train glfc --config glfc-demo --out "$dir" --no-progress \
      run.seed=$seed run.threads=1 run.device=cpu $extra > "$dir.log" 2>&1
    rc=$?
    end=$(date +%s)
    $PY - "$dir" "$setting" "$seed" "$rc" "$((end - start))" >> "$OUT/results.jsonl" <<'PYEOF'
import json, sys
d, setting, seed, rc, wall = sys.argv[1:]
try:
    s = json.load(open(f"{d}/metrics.json"))["summary"]
    row = {k: s.get(k) for k in ("final_accuracy", "average_incremental_accuracy", "forgetting", "task_end_accuracy",
                                 "mean_round_time_s", "completed")}
except Exception as exc:  # a failed run is recorded, not hidden
    row = {"error": repr(exc)}
print(json.dumps({"setting": setting, "seed": int(seed), "rc": int(rc), "wall_s": int(wall), **row}))
PYEOF
  done
done
