#!/usr/bin/env bash
#SBATCH --job-name=omni_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=omni_jax-%j.out
# SLURM GPU cluster: srun starts one process per node (MODE=node, all local GPUs) or one per
# GPU (MODE=gpu); the first node of the allocation is the jax.distributed coordinator.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh ola:model=qwen7b /shared/runs/ola \
#       --config.data_root=/shared/data --config.tokenizer.path=/shared/qwen/tokenizer.json \
#       --config.tokenizer.kind=hf --config.train.mesh.fsdp=8 --config.train.mesh.data=-1
#   MODE=gpu sbatch --nodes=2 --ntasks-per-node=8 launch/gpu_slurm.sh ...
#
# Environment:
#   MODE           node (default) | gpu
#   GPUS_PER_NODE  default: $SLURM_GPUS_ON_NODE, else 8
#   PORT           coordinator port (default 12355)
#   REPO_DIR       checkout on the shared filesystem (default: the submit directory)
#   PYTHON         interpreter (default: python; activate a venv before sbatch, or set it)
#   HEAD_NODE      coordinator host (default: first host of $SLURM_JOB_NODELIST)
#   DRY_RUN=1      print the srun command instead of running it (works outside SLURM)
# WORKDIR must be on a filesystem shared by all nodes.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: [MODE=node|gpu] sbatch $0 RECIPE[:ARG] WORKDIR [train flags ...]" >&2
  exit 2
fi
recipe=$1
workdir=$2
shift 2
mode=${MODE:-node}
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
case "$mode" in
  node) per_node=1 ;;
  gpu) per_node=$gpus ;;
  *) echo "MODE must be 'node' or 'gpu', got '$mode'" >&2; exit 2 ;;
esac
if [[ -z "${HEAD_NODE:-}" ]]; then
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
    HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  else
    HEAD_NODE=$(hostname)
  fi
fi

export OMNI_COORDINATOR_ADDRESS="${HEAD_NODE}:${PORT:-12355}"
export OMNI_NUM_PROCESSES=$((nodes * per_node))
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}"

# Each task sets its process id (and, per GPU, its one visible device) before starting Python.
task='export OMNI_PROCESS_ID=$SLURM_PROCID; '
if [[ "$mode" == gpu ]]; then
  task+='export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; '
fi
task+='exec "$@"'
cmd=(srun --nodes="$nodes" --ntasks-per-node="$per_node" --kill-on-bad-exit=1
     bash -c "$task" omni_jax_task
     "${PYTHON:-python}" -m omni_jax.cli.train --config "$recipe" --workdir "$workdir" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "OMNI_COORDINATOR_ADDRESS=$OMNI_COORDINATOR_ADDRESS OMNI_NUM_PROCESSES=$OMNI_NUM_PROCESSES"
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
