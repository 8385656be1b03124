#!/usr/bin/env bash
# Delta_m of docs/multitask.md (a script, not a test: ~20 min on 2 shared CPU cores): the pre-trained
# backbone, one single-task run per task (the shared-encoder config with one task), then the
# shared-encoder baseline and VTAGML's adapters, both scored against those single-task runs.
# Usage (repository root): docs/multitask_study.sh [--set train.seed=N ...]   (extra args go to every run)
set -euo pipefail
MS="${PYTHON:-python} -m moe_sys.cli"
[ -d runs/vit_pretrain/checkpoints ] || $MS train configs/vit_pretrain.yaml
singles=()
for t in S D N E G; do
  $MS train configs/multitask_shared.yaml --overwrite --set "task.multitask.tasks=[$t]" \
    --set "logging.run_dir=runs/multitask_single_$t" "$@"
  singles+=("runs/multitask_single_$t")
done
baseline="task.multitask.baseline_runs=[$(IFS=,; echo "${singles[*]}")]"
for name in shared vtagml; do
  $MS train "configs/multitask_$name.yaml" --overwrite --set "$baseline" "$@"
done
for name in shared vtagml; do
  ${PYTHON:-python} - "runs/multitask_$name/metrics.jsonl" <<'PY'
import json, sys
last = [json.loads(l) for l in open(sys.argv[1]) if "delta_m" in l][-1]
keys = ["S/miou", "D/rmse", "D/abs_rel", "N/mean_angle", "E/l1", "G/acc", "delta_m"]
print(sys.argv[1], " ".join(f"{k}={last[k]:.4f}" for k in keys))
PY
done
