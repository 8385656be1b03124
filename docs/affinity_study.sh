#!/usr/bin/env bash
# Task affinity of docs/multitask.md (a script, not a test: ~10 min on 2 shared CPU cores): the VTAGML
# config, 120 steps, affinity every 10 steps, two seeds; then the heatmaps, TAG's groups of each seed,
# how asymmetric the mean lookahead is and how well the two seeds agree.
# Usage (repository root): docs/affinity_study.sh [BACKBONE_RUN]   (default runs/vit_pretrain)
set -euo pipefail
MS="${PYTHON:-python} -m moe_sys.cli"
backbone="${1:-runs/vit_pretrain}"
[ -d "$backbone/checkpoints" ] || $MS train configs/vit_pretrain.yaml
for s in 1 2; do
  $MS train configs/multitask_vtagml.yaml --overwrite --set "train.init_from=$backbone" --set train.steps=120 \
    --set train.eval_every=120 --set task.multitask.affinity.every=10 --set train.seed=$s --set data.seed=$s \
    --set logging.run_dir=runs/affinity_seed$s --set logging.progress_bar=false
  $MS plot runs/affinity_seed$s
  $MS tasks group runs/affinity_seed$s --groups 2
done
${PYTHON:-python} - runs/affinity_seed1 runs/affinity_seed2 <<'PY'
import json, sys
import numpy as np
def latest(run):
    return [json.loads(l)["affinity"] for l in open(f"{run}/metrics.jsonl") if '"affinity"' in l][-1]
def off(m):
    return m[~np.eye(len(m), dtype=bool)]
z, c = {}, {}
for run in sys.argv[1:]:
    a = latest(run)
    z[run], c[run] = np.array(a["lookahead_mean"]), np.array(a["cosine_mean"])
    asym = np.abs(off(z[run] - z[run].T)).sum() / np.abs(off(z[run] + z[run].T)).sum()
    print(f"{run}: tasks {a['tasks']}, {a['measurements']['lookahead']} measurements; asymmetry "
          f"|Z - Z^T|_1 / |Z + Z^T|_1 off the diagonal = {asym:.3f} (0: symmetric; > 1: opposite signs)")
    print("  lookahead mean (row i -> column j):\n" + np.array2string(z[run], precision=4, suppress_small=True))
r1, r2 = sys.argv[1:]
print(f"seed agreement (Pearson r of the off-diagonal entries): lookahead {np.corrcoef(off(z[r1]), off(z[r2]))[0, 1]:.3f}, "
      f"cosine {np.corrcoef(off(c[r1]), off(c[r2]))[0, 1]:.3f}")
PY
