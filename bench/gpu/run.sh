#!/usr/bin/env bash
# GPU validation of moe_sys in one call (bench/gpu/run.py has the stages; docs/benchmarks.md, "GPU").
#
#   bash bench/gpu/run.sh            on the GPU machine: installs .whl/ (made by prepare_wheels.sh),
#                                    then runs every stage; under 7 minutes on one H200
#   bash bench/gpu/run.sh --dry-run  the same stages at tiny sizes on the CPU, in the current environment
#
# Other arguments go to bench/gpu/run.py (--only STAGES, --budget-s S, --out DIR). Writes run.log and
# results.json to $OUT (or --out, else a temp dir). Exit 0 only when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DRY=0
for arg in "$@"; do [ "$arg" = --dry-run ] && DRY=1; done

if [ "$DRY" = 0 ]; then
    # The device image lacks DeepSpeed, megatron-core and pydantic: install the carried wheels beside it.
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || echo "run.sh: installing .whl/ failed; the stages will say what is missing"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "run.sh: no .whl/*.whl (run bench/gpu/prepare_wheels.sh here and carry .whl); using what is installed"
    fi
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # sm_90 machine code, not PTX the driver JITs
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/moe_sys_ext}
fi
# moe_sys and bench come from this checkout (nothing is pip-installed there). Which ninja builds the
# kernels is moe_sys's choice in every process (moe_sys.ops.build.prefer_environment_tools).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" -m bench.gpu.run "$@"
