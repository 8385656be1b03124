#!/usr/bin/env bash
# The EP-equivalence and kernel-vs-reference tests, RUNS times on fresh seeds (MOE_SYS_TEST_SEED,
# tests/tolerance.py), once per CPU vector ISA: "native" (what the machine has) and e.g. "avx2".
# ATEN_CPU_CAPABILITY lowers torch's own kernels and selects the matching build of ours
# (moe_sys/ops/build.py keeps one build folder per ISA), as on a machine with that ISA.
# A study, not a CI step:  bench/tolerance_repeat.sh [RUNS=20] [ISAS="native avx2"] [PYTEST ARGS...]
set -u
runs=${1:-20}
isas=${2:-native avx2}
shift $(( $# > 2 ? 2 : $# ))
tests=("$@")
[ ${#tests[@]} -eq 0 ] && tests=(tests/distributed/test_ep_equivalence.py tests/distributed/test_routing_ep.py
                                 tests/distributed/test_adapter_ep.py tests/ops/test_grouped_mm.py
                                 tests/ops/test_dispatch_ops.py)
python=${PYTHON:-python}
log=$(mktemp -d)
for isa in $isas; do
  isa_env=()
  [ "$isa" != native ] && isa_env=(ATEN_CPU_CAPABILITY="$isa")
  failed=0
  for run in $(seq 1 "$runs"); do
    if ! env "${isa_env[@]}" MOE_SYS_TEST_SEED="$run" "$python" -m pytest -q -x -p no:cacheprovider "${tests[@]}" \
        > "$log/$isa-$run.log" 2>&1; then
      failed=$((failed + 1))
      echo "$isa seed $run: FAILED ($log/$isa-$run.log)"; grep -m3 -E "^E |Error" "$log/$isa-$run.log"
    fi
  done
  echo "$isa: $((runs - failed))/$runs runs passed (torch CPU capability: $(env "${isa_env[@]}" "$python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'))"
done
