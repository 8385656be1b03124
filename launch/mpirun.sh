#!/usr/bin/env bash
# `moe-sys train` under mpirun: every rank finds its rank, and rank 0's address, through mpi4py.
#
#   launch/mpirun.sh -np 16 --hostfile hosts moe-sys train configs/mixtral_8x.yaml
#
# Plain `mpirun -np 2 moe-sys train configs/tiny.yaml` works too; this adds the environment below
# and, for Open MPI, passes it to the ranks on other nodes (-x).
set -euo pipefail

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # NCCL: a failed or stuck collective raises instead of hanging the job.
    knobs=(TORCH_NCCL_ASYNC_ERROR_HANDLING=1 "NCCL_DEBUG=${NCCL_DEBUG:-WARN}")
    binding=()
else
    # CPU: DeepSpeed's CPU accelerator and gloo. Open MPI binds each rank to one core by default,
    # which would squeeze a rank's OMP_NUM_THREADS threads onto that core.
    knobs=(DS_ACCELERATOR=cpu "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
    binding=(--bind-to none)
fi
export "${knobs[@]}"

forward=()
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
    for knob in "${knobs[@]}"; do forward+=(-x "${knob%%=*}"); done
else
    binding=()  # MPICH/Intel MPI: the environment reaches every rank already; binding flags differ
fi
exec mpirun "${forward[@]}" "${binding[@]}" "$@"
