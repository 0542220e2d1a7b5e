#!/usr/bin/env bash
# A TPU VM pod slice for pivot_jax: create it, set it up, train, evaluate, delete it.
#
#   launch/tpu/pod.sh [--dry-run] create|setup|train|evaluate|delete [-- EXTRA_ARGS...]
#
# The variables (project, zone, accelerator type, name, repository, config, workdir) are described
# and defaulted in launch/tpu/config.env; set them in the environment. EXTRA_ARGS go to
# pivot_jax.train / pivot_jax.evaluate (for example --config.num_train_steps=1000). Every worker runs
# the same command; JAX finds its peers on the pod by itself.
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

where=(--project="${PROJECT}" --zone="${ZONE}")
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${where[@]}" --worker=all --command="$1"
}
quoted_extra="$(printf ' %q' "${extra[@]+"${extra[@]}"}")"
enter="cd pivot_jax && . .venv/bin/activate && export TFDS_DATA_DIR=$(printf '%q' "${TFDS_DATA_DIR}")"

case "$action" in
  create)
    if [[ "$QUEUED" == 1 ]]; then
      spot=()
      if [[ "${SPOT}" == 1 ]]; then spot=(--spot); fi
      run gcloud compute tpus queued-resources create "${TPU_NAME}-qr" "${where[@]}" --node-id="${TPU_NAME}" \
        --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" "${spot[@]+"${spot[@]}"}"
    else
      run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${where[@]}" \
        --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}"
    fi ;;
  setup)
    on_all_workers "(git clone --branch $(printf '%q' "${BRANCH}") $(printf '%q' "${REPO_URL}") pivot_jax || git -C pivot_jax pull) && cd pivot_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[tpu]'" ;;
  train)
    on_all_workers "${enter} && python -m pivot_jax.train --config=$(printf '%q' "${CONFIG}") --workdir=$(printf '%q' "${WORKDIR}")${quoted_extra}" ;;
  evaluate)
    on_all_workers "${enter} && python -m pivot_jax.evaluate --config=$(printf '%q' "${CONFIG}") --workdir=$(printf '%q' "${WORKDIR}")${quoted_extra}" ;;
  delete)
    if [[ "$QUEUED" == 1 ]]; then
      run gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" "${where[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${where[@]}" --quiet
    fi ;;
  *)
    echo "usage: $0 [--dry-run] create|setup|train|evaluate|delete [-- EXTRA_ARGS...]" >&2
    exit 2 ;;
esac
