#!/usr/bin/env bash
# A TPU VM pod slice for pivot_jax: create it, set it up, prepare the data, train, watch, evaluate,
# delete it.
#
#   launch/tpu/pod.sh [--dry-run] ACTION [-- EXTRA_ARGS...]
#
#   create    the slice (a queued resource with QUEUED=1, spot with SPOT=1). A slice that was preempted
#             or suspended is deleted and made again.
#   setup     clones the repository on every worker into ~/pivot_jax and installs it in a virtual
#             environment of Python >= PYTHON_VERSION (fetched with uv where the image's is older).
#   prepare   prepares the TFDS data set once, on worker 0, in TFDS_DATA_DIR (hours for ImageNet).
#   train     starts the training on every worker, detached from this SSH session (it runs `setup`
#             first where the worker has no environment yet), each worker logging to
#             ~/pivot_jax_logs/train.log. Run again after a preemption: it resumes from the last checkpoint.
#   status    whether each worker's training (and evaluation) runs, and its last log line.
#   logs      the last LOG_LINES lines of each worker's log (`logs evaluate`: the evaluation's).
#   stop      SIGTERM to every worker's training: it saves a checkpoint and stops.
#   evaluate  evaluates WORKDIR with the config it was trained with, detached like train.
#   delete    the slice.
#
# After a spot or queued slice is preempted, the same two commands bring the run back:
#   launch/tpu/pod.sh create && launch/tpu/pod.sh train
#
# The variables (project, zone, accelerator type, name, repository, config, workdir) are described
# and defaulted in launch/tpu/config.env; set them in the environment. EXTRA_ARGS go to
# pivot_jax.train / pivot_jax.evaluate (for example --config.num_train_steps=1000). Every worker runs
# the same command; JAX finds its peers through the TPU VM's metadata server.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/tpu/config.env
source "${here}/config.env"

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
action="${1:-}"
shift || true
if [[ "${1:-}" == "--" ]]; then
  shift
fi
extra=("$@")

run() {
  if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

q() { printf '%q' "$1"; }
where=(--project="${PROJECT}" --zone="${ZONE}")
on_workers() {  # WORKERS COMMAND: run COMMAND in a login shell of the workers (all, or one index)
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${where[@]}" --worker="$1" --command="$2"
}
quoted_extra=""
if (( ${#extra[@]} )); then quoted_extra="$(printf ' %q' "${extra[@]}")"; fi

# What the workers run. Python: the image's python3 where it is new enough, else one that uv fetches.
min_python="(${PYTHON_VERSION/./, })"
setup="(git clone --branch $(q "${BRANCH}") $(q "${REPO_URL}") pivot_jax || git -C pivot_jax pull --ff-only) && cd pivot_jax \
&& { [ -x .venv/bin/python ] || { if python3 -c 'import sys; sys.exit(sys.version_info < ${min_python})'; then python3 -m venv .venv; \
else python3 -m pip install --user --quiet uv && \"\$HOME/.local/bin/uv\" venv --seed --python $(q "${PYTHON_VERSION}") .venv; fi; }; } \
&& . .venv/bin/activate && python -m pip install --quiet -e '.[tpu]' && cd"
enter="{ [ -x pivot_jax/.venv/bin/python ] || { ${setup}; }; } && cd pivot_jax && . .venv/bin/activate \
&& export TFDS_DATA_DIR=$(q "${TFDS_DATA_DIR}") && mkdir -p ~/pivot_jax_logs"
detached() {  # NAME COMMAND: COMMAND in the background of each worker, surviving the SSH session
  local name="$1" command="$2" log="\$HOME/pivot_jax_logs/$1.log" pid="\$HOME/pivot_jax_logs/$1.pid"
  echo "${enter} && if [ -f ${pid} ] && kill -0 \"\$(cat ${pid})\" 2>/dev/null; then \
echo \"worker \$(hostname): ${name} is already running (pod.sh status, pod.sh logs)\"; exit 1; fi \
&& { setsid nohup ${command} >> ${log} 2>&1 < /dev/null & echo \$! > ${pid}; } \
&& echo \"worker \$(hostname): ${name} started (pid \$(cat ${pid})), log ${log}\""
}
state_of() {  # NAME: one line per worker: running or not, and the log's last line
  local log="\$HOME/pivot_jax_logs/$1.log" pid="\$HOME/pivot_jax_logs/$1.pid"
  echo "if [ -f ${pid} ] && kill -0 \"\$(cat ${pid})\" 2>/dev/null; then s=running; elif [ -f ${log} ]; then s=ended; \
else s='not started'; fi; echo \"worker \$(hostname) $1: \$s | \$(tail -n 1 ${log} 2>/dev/null)\""
}

case "$action" in
  create)
    if [[ -z "${RUNTIME_VERSION}" ]]; then
      echo "RUNTIME_VERSION: no default for ACCELERATOR_TYPE=${ACCELERATOR_TYPE}; set the TPU software version of its generation" >&2
      exit 2
    fi
    if [[ "$QUEUED" == 1 ]]; then
      state="$(gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" "${where[@]}" --format='value(state.state)' 2>/dev/null || true)"
      if [[ "$state" == SUSPENDED || "$state" == FAILED || "$state" == SUSPENDING ]]; then
        echo "queued resource ${TPU_NAME}-qr is ${state}: deleting it to request the slice again" >&2
        run gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" "${where[@]}" --force --quiet
      fi
      spot=()
      if [[ "${SPOT}" == 1 ]]; then spot=(--spot); fi
      run gcloud compute tpus queued-resources create "${TPU_NAME}-qr" "${where[@]}" --node-id="${TPU_NAME}" \
        --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" "${spot[@]+"${spot[@]}"}"
    else
      state="$(gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${where[@]}" --format='value(state)' 2>/dev/null || true)"
      if [[ "$state" == PREEMPTED || "$state" == TERMINATED ]]; then
        echo "TPU VM ${TPU_NAME} is ${state}: deleting it to create it again" >&2
        run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${where[@]}" --quiet
      fi
      run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${where[@]}" \
        --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}"
    fi ;;
  setup)
    on_workers all "${setup}" ;;
  prepare)
    on_workers 0 "$(detached prepare "python -m pivot_jax.prepare --config=$(q "${CONFIG}")${quoted_extra}")" ;;
  train)
    on_workers all "$(detached train "python -m pivot_jax.train --config=$(q "${CONFIG}") --workdir=$(q "${WORKDIR}")${quoted_extra}")" ;;
  evaluate)
    on_workers all "$(detached evaluate "python -m pivot_jax.evaluate --workdir=$(q "${WORKDIR}")${quoted_extra}")" ;;
  status)
    on_workers all "$(state_of prepare); $(state_of train); $(state_of evaluate)" ;;
  logs)
    name="${extra[0]:-train}"
    on_workers all "echo \"== worker \$(hostname): ~/pivot_jax_logs/${name}.log\"; tail -n $(q "${LOG_LINES}") ~/pivot_jax_logs/$(q "${name}").log" ;;
  stop)
    on_workers all "kill -TERM \"\$(cat ~/pivot_jax_logs/train.pid)\" && echo \"worker \$(hostname): asked the training to checkpoint and stop\"" ;;
  delete)
    if [[ "$QUEUED" == 1 ]]; then
      run gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" "${where[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${where[@]}" --quiet
    fi ;;
  *)
    echo "usage: $0 [--dry-run] create|setup|prepare|train|status|logs|stop|evaluate|delete [-- EXTRA_ARGS...]" >&2
    exit 2 ;;
esac
