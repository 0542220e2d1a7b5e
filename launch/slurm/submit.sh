#!/usr/bin/env bash
# Submits launch/slurm/train.sbatch.
#
#   launch/slurm/submit.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--per-node] [--partition P] \
#       CONFIG WORKDIR [TRAIN_ARGS...]
#
# Default: 1 node, 8 GPUs, one process per GPU. --per-node starts one process per node that drives
# all of the node's GPUs. --dry-run prints the sbatch command and the srun command it will run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nodes=1
gpus=8
per_node=0
partition=()
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --per-node) per_node=1; shift ;;
    --partition) partition=(--partition="$2"); shift 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] [--nodes N] [--gpus-per-node G] [--per-node] [--partition P] CONFIG WORKDIR [TRAIN_ARGS...]" >&2
  exit 2
fi
config="$1"
workdir="$2"
shift 2
tasks="$gpus"
if [[ "$per_node" == 1 ]]; then tasks=1; fi

command=(sbatch --nodes="${nodes}" --ntasks-per-node="${tasks}" --gpus-per-node="${gpus}"
         "${partition[@]+"${partition[@]}"}"
         --export="ALL,CONFIG=${config},WORKDIR=${workdir},PER_NODE=${per_node}" "${here}/train.sbatch" "$@")
if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${command[@]}"
  printf '\n'
  CONFIG="$config" WORKDIR="$workdir" PER_NODE="$per_node" DRY_RUN=1 bash "${here}/train.sbatch" "$@"
  exit 0
fi
"${command[@]}"
