#!/usr/bin/env bash
# Starts N processes of a pivot_jax command on this machine, each with D fake CPU devices, joined by
# jax.distributed through a coordinator on 127.0.0.1. This is how multi-process runs are tested here.
#
#   launch/local/run.sh [--dry-run] [--processes N] [--devices D] [--port P] -- \
#       python -m pivot_jax.train --config=configs/mnist.py:smoke --workdir=/tmp/run
#
# Output lines are prefixed with the process index. Exits non-zero if any process fails. SIGTERM or
# SIGINT to this script is passed on to every process, as a cluster's preemption notice would be.
set -euo pipefail

processes=2
devices=2
port=12355
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --processes) processes="$2"; shift 2 ;;
    --devices) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (usage: $0 [--dry-run] [--processes N] [--devices D] [--port P] -- COMMAND...)" >&2
       exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "no command given after --" >&2
  exit 2
fi

pids=()
for ((i = 0; i < processes; i++)); do
  line=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${devices}" "$@"
        "--coordinator_address=127.0.0.1:${port}" "--num_processes=${processes}" "--process_id=${i}")
  if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "${line[@]}"
    printf '\n'
  else
    "${line[@]}" > >(sed -u "s/^/[${i}] /") 2>&1 &
    pids+=("$!")
  fi
done

# shellcheck disable=SC2329  # called by the traps below
forward() {
  kill -s "$1" "${pids[@]}" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid" && code=0 || code=$?
    # A trapped signal ends `wait` early while the process still runs: wait for it again.
    kill -0 "$pid" 2>/dev/null || break
  done
  [[ "$code" == 0 ]] || status="$code"
done
exit "$status"
