#!/usr/bin/env bash
# Run one dagger-jax verb on every worker of a TPU pod slice (JAX multi-controller).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu.sh setup
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu.sh train --config configs/qwen3_8b_swe.py \
#       --shards gs://bucket/run/shards/round_000 --config.workdir=gs://bucket/run
#
# `setup` copies this checkout to every worker and installs it with the [tpu] extra. Any other
# arguments are passed to `dagger-jax` on all workers at once; DAGGER_JAX_MULTIHOST=1 makes the
# CLI call jax.distributed.initialize() so the workers form one JAX program.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-dagger_jax}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG --worker=all --command "$1"
}
if [ "${1:-}" = "setup" ]; then
  cd "$(dirname "$0")/.."
  tar czf /tmp/dagger_jax_src.tgz --exclude=.venv --exclude=runs --exclude=.git .
  gcloud compute tpus tpu-vm scp /tmp/dagger_jax_src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" $PROJECT_FLAG --worker=all
  ssh_all "mkdir -p $REMOTE_DIR && tar xzf /tmp/dagger_jax_src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && \
    python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
  exit 0
fi
ARGS=$(printf '%q ' "$@")
ssh_all "cd $REMOTE_DIR && DAGGER_JAX_MULTIHOST=1 .venv/bin/dagger-jax $ARGS"
