#!/usr/bin/env bash
# All workers of a Cloud TPU VM pod slice run the same command; JAX finds the pod topology
# itself (OMNI_DISTRIBUTED=auto -> jax.distributed.initialize()).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh ola:model=qwen7b gs://bucket/ola \
#       --config.data_root=gs://bucket/data --config.tokenizer.path=/data/qwen/tokenizer.json \
#       --config.tokenizer.kind=hf --config.train.mesh.fsdp=-1 --config.train.mesh.data=1
#
# Environment:
#   TPU_NAME, ZONE (required); PROJECT (optional gcloud project)
#   REPO_DIR   checkout of omni_jax on every worker (default: ~/omni_jax); it and its Python
#              env must already be there (e.g. a startup script, or
#              gcloud compute tpus tpu-vm scp --worker=all)
#   VENV       virtualenv to activate on the workers (default: $REPO_DIR/.venv, if present)
#   PYTHON     interpreter on the workers (default: python)
#   DRY_RUN=1  print the gcloud command instead of running it
# WORKDIR must be visible to every worker (a gs:// bucket or a shared filesystem).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=... ZONE=... $0 RECIPE[:ARG] WORKDIR [train flags ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME (the TPU VM / pod slice name)}"
: "${ZONE:?set ZONE (e.g. us-central2-b)}"
recipe=$1
workdir=$2
shift 2
repo=${REPO_DIR:-'~/omni_jax'}
venv=${VENV:-"$repo/.venv"}

train=$(printf '%q ' "${PYTHON:-python}" -m omni_jax.cli.train --config "$recipe" \
  --workdir "$workdir" "$@")
remote="cd $repo && { [ -f $venv/bin/activate ] && . $venv/bin/activate || true; } && \
OMNI_DISTRIBUTED=auto $train"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  cmd+=(--project "$PROJECT")
fi
cmd+=(--worker=all --command "$remote")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
