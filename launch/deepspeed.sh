#!/usr/bin/env bash
# `moe-sys train` under the deepspeed launcher, on this node or on the nodes of a hostfile.
#
#   launch/deepspeed.sh [deepspeed options] -- CONFIG [--set KEY=VALUE ...]
#
#   one node, 8 GPUs:  launch/deepspeed.sh --num_gpus 8 -- configs/mixtral_8x.yaml
#   a hostfile:        launch/deepspeed.sh --hostfile hosts --include "node1@node2:0-3" -- configs/mixtral_8x.yaml
#   (hostfile lines look like "node1 slots=8"; deepspeed reaches the other nodes with pdsh over ssh.
#    A hostfile naming only this node needs --no_ssh_check --master_addr 127.0.0.1.)
set -euo pipefail

ds_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do ds_args+=("$1"); shift; done
[[ $# -gt 0 ]] && shift

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # NCCL: a failed or stuck collective raises instead of hanging the job.
    knobs=(TORCH_NCCL_ASYNC_ERROR_HANDLING=1 "NCCL_DEBUG=${NCCL_DEBUG:-WARN}")
else
    # CPU: DeepSpeed's CPU accelerator and gloo; one compute thread per rank unless told otherwise
    # (or pass --bind_cores_to_rank, which splits the cores with numactl).
    knobs=(DS_ACCELERATOR=cpu "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
fi
export "${knobs[@]}"
port=29500  # deepspeed's default rendezvous port
for ((i = 0; i < ${#ds_args[@]}; i++)); do
    case "${ds_args[i]}" in
        --master_port) port=${ds_args[i + 1]} ;;
        --master_port=*) port=${ds_args[i]#*=} ;;
    esac
done
# deepspeed forwards only some variables (NCCL*, PYTHON*, ...) to other nodes; DS_ENV_FILE adds ours.
DS_ENV_FILE=$(mktemp)
export DS_ENV_FILE
# DeepSpeed's CPU all-reduce op leaves a 67 MB /dev/shm buffer per rank when all ranks are on this node.
trap 'rm -f "$DS_ENV_FILE" /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*_"$port"_*' EXIT
printf '%s\n' "${knobs[@]}" >"$DS_ENV_FILE"

deepspeed "${ds_args[@]}" --no_local_rank --module moe_sys.cli train "$@"
