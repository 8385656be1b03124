#!/usr/bin/env bash
# VTAGML's zero-shot task transfer and unseen-script protocols of docs/multitask.md (a script, not a test:
# ~25 min on 2 shared CPU cores), for the adapters on the frozen backbone (configs/multitask_vtagml.yaml)
# and the fine-tuned shared encoder (configs/multitask_shared.yaml); every run $STEPS steps, evaluated at
# its last step on 200 test scenes (held-out classes).
#   transfer: S-D-N trained on fonts A (test: fonts B), then S alone fine-tuned on fonts B from it, D and N
#             evaluation-only (their decoders and task ids from the first run), against D-N trained directly
#             on fonts B from the pre-trained backbone (the same steps as the fine-tuning).
#   unseen scripts: S-D-N-E trained on latin, greek, cyrillic; D, N, E evaluated on the test scenes of
#             georgian, math_operators, arrows, and (the same training again) on those of the seen domains.
# Usage (repository root): [STEPS=200] docs/multitask_protocols.sh [--set key=value ...]  (extra args: every run)
set -euo pipefail
MS="${PYTHON:-python} -m moe_sys.cli"
STEPS="${STEPS:-200}"
OUT=runs/protocols
EXTRA=("$@")
[ -d runs/vit_pretrain/checkpoints ] || $MS train configs/vit_pretrain.yaml
run() {  # NAME CONFIG [--set ...]: one run into $OUT/NAME
  local name=$1 config=$2
  shift 2
  $MS train "configs/multitask_$config.yaml" --overwrite --set "train.steps=$STEPS" --set "train.eval_every=$STEPS" \
    --set "logging.run_dir=$OUT/$name" "$@" "${EXTRA[@]}"
}
fonts_b="task.multitask.fonts={train: B, test: B}"
for config in vtagml shared; do
  source="$OUT/${config}_SDN_fontsA"
  run "${config}_SDN_fontsA" $config --set "task.multitask.tasks=[S,D,N]"
  adapters=()
  [ $config = vtagml ] && adapters=(--set "adapters.load_from=$source/adapters")
  run "${config}_S_fontsB_transfer" $config --set "task.multitask.tasks=[S]" --set "task.multitask.eval_tasks=[S,D,N]" \
    --set "$fonts_b" --set "train.init_from=$source" "${adapters[@]}"
  run "${config}_DN_fontsB_direct" $config --set "task.multitask.tasks=[D,N]" --set "$fonts_b"
  for test in seen unseen; do
    domains=()
    [ $test = unseen ] && domains=(--set "task.multitask.test_domains=[georgian,math_operators,arrows]")
    run "${config}_SDNE_${test}" $config --set "task.multitask.tasks=[S,D,N,E]" \
      --set "task.multitask.eval_tasks=[D,N,E]" "${domains[@]}"
  done
done
${PYTHON:-python} - "$OUT" <<'PY'
import json, os, sys
from moe_sys.analysis.plot import read_records

out = sys.argv[1]
keys = ["S/miou", "D/rmse", "D/abs_rel", "N/mean_angle", "E/l1"]
for name in sorted(os.listdir(out)):
    records = read_records(os.path.join(out, name))
    last = [r for r in records if "D/rmse" in r][-1]
    print(f"{name:28s} step {last['step']}", " ".join(f"{k}={last[k]:.4f}" for k in keys if k in last))
for config in ("vtagml", "shared"):  # the two unseen-script runs must have trained alike
    seen, unseen = (read_records(os.path.join(out, f"{config}_SDNE_{t}")) for t in ("seen", "unseen"))
    same = [r["loss"] for r in seen] == [r["loss"] for r in unseen]
    print(f"{config}: seen and unseen runs logged identical training losses: {same}")
PY
