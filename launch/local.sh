#!/usr/bin/env bash
# One process on this machine (CPU, one GPU host, or one TPU VM).
#
#   launch/local.sh RECIPE[:ARG] WORKDIR [more train flags ...]
#   launch/local.sh ola:model=tiny /tmp/ola --config.data_root=data/fixtures \
#       --config.tokenizer.path=data/fixtures/spm.model
#
# Environment:
#   NUM_DEVICES=N  emulate N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
#                  JAX_PLATFORMS=cpu), e.g. with --config.train.mesh.fsdp=2
#   PYTHON         interpreter (default: python)
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 RECIPE[:ARG] WORKDIR [train flags ...]" >&2
  exit 2
fi
recipe=$1
workdir=$2
shift 2

cmd=()
if [[ -n "${NUM_DEVICES:-}" ]]; then
  flags="--xla_force_host_platform_device_count=${NUM_DEVICES}${XLA_FLAGS:+ $XLA_FLAGS}"
  cmd+=(env "XLA_FLAGS=$flags" JAX_PLATFORMS=cpu)
fi
cmd+=("${PYTHON:-python}" -m omni_jax.cli.train --config "$recipe" --workdir "$workdir" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
