#!/usr/bin/env bash
# Submits launch/slurm/train.sbatch: a pivot_jax training on a GPU cluster, requeued and resumed
# across time limits and preemptions until it finishes.
#
#   launch/slurm/submit.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--per-node] [--cpus-per-gpu C] \
#       [--time T] [--partition P] CONFIG WORKDIR [TRAIN_ARGS...]
#
# Default: 1 node, 8 GPUs, one process per GPU (JAX gives each its own GPU). --per-node starts one
# process per node that drives all of the node's GPUs. Each GPU gets C CPUs (default 16) for the
# input pipeline. T is the job's time limit (default 48:00:00); 5 minutes before it the training
# saves a checkpoint and the job requeues itself, so a run longer than the limit goes on by itself.
# CONFIG and WORKDIR travel in the environment: sbatch's --export splits its value at commas, which
# config arguments such as configs/imagenet.py:mode=clean,pod have. --dry-run prints the sbatch
# command and the srun command the job will run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nodes=1
gpus=8
per_node=0
cpus_per_gpu=16
time_limit=48:00:00
partition=()
dry_run=0
usage="usage: $0 [--dry-run] [--nodes N] [--gpus-per-node G] [--per-node] [--cpus-per-gpu C] [--time T] [--partition P] CONFIG WORKDIR [TRAIN_ARGS...]"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --per-node) per_node=1; shift ;;
    --cpus-per-gpu) cpus_per_gpu="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --partition) partition=(--partition="$2"); shift 2 ;;
    --*) echo "unknown option $1 ($usage)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "$usage" >&2
  exit 2
fi
export CONFIG="$1" WORKDIR="$2" PER_NODE="$per_node" GPUS_PER_NODE="$gpus"
shift 2
tasks="$gpus"
cpus="$cpus_per_gpu"
if [[ "$per_node" == 1 ]]; then
  tasks=1
  cpus=$((cpus_per_gpu * gpus))
fi

command=(sbatch --nodes="${nodes}" --ntasks-per-node="${tasks}" --gpus-per-node="${gpus}" --cpus-per-task="${cpus}"
         --time="${time_limit}" --signal=B:USR1@300 --requeue "${partition[@]+"${partition[@]}"}"
         --export=ALL "${here}/train.sbatch" "$@")
if [[ "$dry_run" == 1 ]]; then
  printf 'CONFIG=%q WORKDIR=%q PER_NODE=%q GPUS_PER_NODE=%q ' "$CONFIG" "$WORKDIR" "$PER_NODE" "$GPUS_PER_NODE"
  printf '%q ' "${command[@]}"
  printf '\n'
  DRY_RUN=1 bash "${here}/train.sbatch" "$@"
  exit 0
fi
"${command[@]}"
