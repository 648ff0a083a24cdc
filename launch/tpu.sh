#!/usr/bin/env bash
# Run one dagger-jax verb on every worker of a TPU slice at once (JAX multi-controller).
# `launch/tpu.sh --help` explains the options; every step is one gcloud command line, and
# --dry-run prints those lines instead of running them (no gcloud needed).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu.sh [OPTIONS] setup
       launch/tpu.sh [OPTIONS] VERB [ARGS...]
       launch/tpu.sh [OPTIONS] --create

Runs `dagger-jax VERB ARGS...` on every worker of a Cloud TPU slice at once, each worker with
DAGGER_JAX_MULTIHOST=1 (the CLI then calls jax.distributed.initialize(), which finds the other
workers by itself), from the checkout that `setup` copied to the workers. The first word that is
not an option is the verb; everything after it goes to dagger-jax unchanged, quoting kept.

  setup    copy this checkout (no .venv, runs, .git) to every worker and install it there:
           python3.11 -m venv .venv && .venv/bin/pip install -e '.[tpu]' (jax needs Python >= 3.11;
           python3.11 and python3.11-venv are apt-installed when missing)
  VERB     any dagger-jax verb (dagger, train, plan, generate, ...), on all workers at once

The slice (a flag wins over its environment variable):
  --name NAME              TPU_NAME          the TPU VM / slice name (required)
  --zone ZONE              ZONE              e.g. us-east5-a (required)
  --project PROJECT        PROJECT           default: gcloud's configured project
  --create                                   create the slice when `describe` does not find it;
                                             without it an existing READY slice is reused
  --accelerator-type TYPE  ACCELERATOR_TYPE  with --create: v5p-64, v4-32, v5litepod-16, v6e-8, ...
  --runtime-version V      RUNTIME_VERSION   with --create: the TPU software version, e.g.
                                             tpu-ubuntu2204-base (v4, v5p), v2-alpha-tpuv5-lite
                                             (v5e), v2-alpha-tpuv6e (v6e)
  --spot                   TPU_SPOT=1        with --create: a Spot slice
  --create-arg ARG                           with --create: one more `gcloud ... create` argument,
                                             e.g. --create-arg=--network=my-net (repeatable)
On the workers:
  --remote-dir DIR         REMOTE_DIR        the checkout, relative to the home dir (default
                                             dagger_jax)
  --python PY              REMOTE_PYTHON     interpreter for setup's venv (default python3.11)
  --env NAME=VALUE                           set for the verb and the server (repeatable), e.g.
                                             --env OPENAI_API_KEY="$OPENAI_API_KEY"; note that
                                             --dry-run prints the value
Rollout server (`dagger-jax serve`, started in the background before the verb, stopped after):
  --serve MODEL_DIR        SERVE_MODEL       the checkpoint to serve: a path on that worker,
                                             relative to REMOTE_DIR or absolute
  --serve-port PORT        SERVE_PORT        default 30000 (config.rollout.sglang_url's)
  --serve-worker N         SERVE_WORKER      the worker that runs it (default 0)
  The trainer holds the worker's TPU chips, so the server runs on its CPU (JAX_PLATFORMS=cpu),
  binds 0.0.0.0 and logs to REMOTE_DIR/runs/serve_PORT.log on that worker. For a model that
  needs accelerators, serve it from another TPU VM instead.
Other:
  --dry-run                                  print the commands, one per line, instead of
                                             running them; needs no gcloud
  -h, --help                                 this text

examples:
  # create a v5p-64 slice when it does not exist yet, then install this checkout on it
  TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu.sh --create --accelerator-type v5p-64 \
      --runtime-version tpu-ubuntu2204-base setup
  # train on all 8 workers at once
  TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu.sh train --config configs/qwen3_8b_swe.py \
      --shards gs://bucket/run/shards/round_000 --config.workdir=gs://bucket/run
  # DAgger rounds with a rollout server on worker 0, port 30001
  launch/tpu.sh --name my-v5p-64 --zone us-east5-a --serve runs/hf_student --serve-port 30001 \
      dagger --config configs/qwen3_8b_swe.py --config.rollout.sglang_url=http://127.0.0.1:30001
  # see the exact gcloud commands without running anything
  launch/tpu.sh --dry-run --name my-v5p-64 --zone us-east5-a plan --config configs/qwen3_8b_swe.py
EOF
}

# These helpers are the same in tpu.sh and gpu.sh on purpose: each script stands alone, since
# sbatch runs a copy of gpu.sh from its spool directory, where no sourced file is found.
die() {
  printf 'launch/tpu.sh: %s\n' "$*" >&2
  exit 2
}

note() {  # information for the user: stderr, so that --dry-run's stdout is only commands
  printf '# %s\n' "$*" >&2
}

q() {  # one word, quoted for bash only when (and where) it needs it
  local w=$1
  if [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$w"
  elif [[ $w =~ ^(-{0,2}[A-Za-z0-9_.-]+=)(.+)$ ]]; then  # --opt=VALUE, NAME=VALUE: quote VALUE
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  elif [[ $w == *"'"* && $w != *!* ]]; then  # "..." reads better than '\'' (! would expand)
    w=${w//\\/\\\\}
    w=${w//\$/\\\$}
    w=${w//\`/\\\`}
    printf '"%s"' "${w//\"/\\\"}"
  else
    printf "'%s'" "${w//\'/\'\\\'\'}"
  fi
}

qjoin() {  # the words as one command line
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}

DRY_RUN=0
step() {  # one command line: printed under --dry-run, else echoed to stderr and run by bash
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
    bash -c "$1"
  fi
}

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
CREATE=0
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
TPU_SPOT=${TPU_SPOT:-0}
REMOTE_DIR=${REMOTE_DIR:-dagger_jax}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3.11}
SERVE_MODEL=${SERVE_MODEL:-}
SERVE_PORT=${SERVE_PORT:-30000}
SERVE_WORKER=${SERVE_WORKER:-0}
CREATE_ARGS=()
REMOTE_ENV=()

while [ $# -gt 0 ]; do
  opt=$1 val="" has=0
  case $opt in --*=*) val=${opt#*=} opt=${opt%%=*} has=1 ;; esac
  shift
  case $opt in
    --name|--zone|--project|--accelerator-type|--runtime-version|--create-arg|--remote-dir|\
    --python|--env|--serve|--serve-port|--serve-worker)
      if [ "$has" = 0 ]; then
        [ $# -gt 0 ] || die "$opt needs a value (see --help)"
        val=$1
        shift
      fi ;;
    -h|--help|--dry-run|--create|--spot|--)
      [ "$has" = 0 ] || die "$opt takes no value" ;;
    -*) die "unknown option $opt (options go before the verb; see --help)" ;;
    *) set -- "$opt" "$@"; break ;;
  esac
  case $opt in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name) TPU_NAME=$val ;;
    --zone) ZONE=$val ;;
    --project) PROJECT=$val ;;
    --create) CREATE=1 ;;
    --accelerator-type) ACCELERATOR_TYPE=$val ;;
    --runtime-version) RUNTIME_VERSION=$val ;;
    --spot) TPU_SPOT=1 ;;
    --create-arg) CREATE_ARGS+=("$val") ;;
    --remote-dir) REMOTE_DIR=$val ;;
    --python) REMOTE_PYTHON=$val ;;
    --env)
      [[ $val =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $val: expected NAME=VALUE"
      REMOTE_ENV+=("$val") ;;
    --serve) SERVE_MODEL=$val ;;
    --serve-port) SERVE_PORT=$val ;;
    --serve-worker) SERVE_WORKER=$val ;;
    --) break ;;
  esac
done

[ -n "$TPU_NAME" ] || die "no TPU slice named: set TPU_NAME=NAME or pass --name NAME"
[ -n "$ZONE" ] || die "no zone: set ZONE=ZONE (e.g. us-east5-a) or pass --zone ZONE"
[ $# -gt 0 ] || [ "$CREATE" = 1 ] \
  || die "no verb: give \`setup\` or a dagger-jax verb (e.g. train --config FILE); see --help"
[ "${1:-}" != setup ] || [ $# = 1 ] || die "setup takes no arguments (got: $(qjoin "${@:2}"))"
if [ "$CREATE" = 1 ]; then
  [ -n "$ACCELERATOR_TYPE" ] \
    || die "--create needs an accelerator type: set ACCELERATOR_TYPE or pass --accelerator-type"\
           "(e.g. v5p-64)"
  [ -n "$RUNTIME_VERSION" ] \
    || die "--create needs a TPU runtime version: set RUNTIME_VERSION or pass --runtime-version"\
           "(e.g. tpu-ubuntu2204-base)"
fi
if [ -n "$SERVE_MODEL" ]; then
  [ "${1:-setup}" != setup ] || die "--serve starts a server next to a verb; give one (not setup)"
  if ! [[ $SERVE_PORT =~ ^[0-9]+$ ]] || [ "$SERVE_PORT" -lt 1 ] || [ "$SERVE_PORT" -gt 65535 ]; then
    die "--serve-port $SERVE_PORT: expected a port number 1-65535 (SERVE_PORT)"
  fi
  [[ $SERVE_WORKER =~ ^[0-9]+$ ]] \
    || die "--serve-worker $SERVE_WORKER: expected a worker index 0, 1, ... (SERVE_WORKER)"
fi
if [ "$DRY_RUN" = 0 ]; then
  command -v gcloud >/dev/null 2>&1 \
    || die "gcloud not found: install the Google Cloud CLI (or use --dry-run to see the commands)"
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[ -z "$PROJECT" ] || WHERE+=(--project="$PROJECT")
on() {  # on WORKER COMMAND: the gcloud line that runs COMMAND (a shell line) on those workers
  qjoin "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command "$2"
}

# The slice: create it when missing (--create), else check that it exists and is READY.
DESCRIBE=$(qjoin "${TPU[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)')
if [ "$CREATE" = 1 ]; then
  CREATE_CMD=("${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
              --version="$RUNTIME_VERSION")
  [ "$TPU_SPOT" != 1 ] || CREATE_CMD+=(--spot)
  CREATE_CMD+=(${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"})
  step "$DESCRIBE >/dev/null 2>&1 || $(qjoin "${CREATE_CMD[@]}")"
elif [ "$DRY_RUN" = 1 ]; then
  step "$DESCRIBE"
else
  printf '+ %s\n' "$DESCRIBE" >&2
  state=$(bash -c "$DESCRIBE") \
    || die "TPU slice $TPU_NAME not found in $ZONE${PROJECT:+ ($PROJECT)} (gcloud's error above):"\
           "to create it, add --create --accelerator-type TYPE --runtime-version VERSION"
  [ "$state" = READY ] || die "TPU slice $TPU_NAME is $state, not READY: wait, or delete it and"\
    "run again with --create"
fi
[ $# -gt 0 ] || exit 0

RD=$(q "$REMOTE_DIR")
if [ "$1" = setup ]; then
  TGZ=/tmp/dagger_jax_src.tgz
  PY=$(q "$REMOTE_PYTHON")
  step "$(qjoin tar czf "$TGZ" --exclude=./.venv --exclude=./runs --exclude=./.git \
    --exclude=__pycache__ --exclude='*.egg-info' -C "$REPO" .)"
  step "$(qjoin "${TPU[@]}" scp "$TGZ" "$TPU_NAME:$TGZ" "${WHERE[@]}" --worker=all)"
  step "$(on all "mkdir -p $RD && tar xzf $TGZ -C $RD && cd $RD && ($PY -m venv .venv || (sudo \
apt-get update -qq && sudo apt-get install -y -qq $PY $PY-venv && $PY -m venv --clear .venv)) \
&& .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'")"
  exit 0
fi

ENV_PREFIX=""
for kv in ${REMOTE_ENV[@]+"${REMOTE_ENV[@]}"}; do
  ENV_PREFIX+="${kv%%=*}=$(q "${kv#*=}") "
done
if [ -n "$SERVE_MODEL" ]; then
  LOG=runs/serve_$SERVE_PORT.log
  PID=runs/serve_$SERVE_PORT.pid
  SERVE=$(qjoin .venv/bin/dagger-jax serve --model "$SERVE_MODEL" --host 0.0.0.0 \
    --port "$SERVE_PORT")
  step "$(on "$SERVE_WORKER" "cd $RD && mkdir -p runs && (${ENV_PREFIX}JAX_PLATFORMS=cpu nohup \
$SERVE > $LOG 2>&1 < /dev/null & echo \$! > $PID)")"
  STOP=$(on "$SERVE_WORKER" "cd $RD && kill \$(cat $PID)")
  [ "$DRY_RUN" = 1 ] || trap 'step "$STOP" || true' EXIT
  note "rollout server: worker $SERVE_WORKER port $SERVE_PORT (http://127.0.0.1:$SERVE_PORT on" \
    "that worker), log $REMOTE_DIR/$LOG there:"
  note "  $(on "$SERVE_WORKER" "tail -f $RD/$LOG")"
  # Wait until it answers /health (the verb's client only waits 30 s); give up when it dies.
  step "$(on "$SERVE_WORKER" "cd $RD && timeout 1800 bash -c 'until curl -sf \
http://127.0.0.1:$SERVE_PORT/health >/dev/null; do kill -0 \$(cat $PID) || exit 1; sleep 2; \
done'")"
fi
VERB=$(qjoin .venv/bin/dagger-jax "$@")
step "$(on all "cd $RD && ${ENV_PREFIX}DAGGER_JAX_MULTIHOST=1 $VERB")"
if [ -n "$SERVE_MODEL" ] && [ "$DRY_RUN" = 1 ]; then
  step "$STOP"
fi
