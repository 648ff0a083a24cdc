#!/usr/bin/env bash
# Run one dagger-jax verb on GPUs: one node directly, or several nodes through SLURM's srun.
# `launch/gpu.sh --help` explains the options; every step is one command line, and --dry-run
# prints those lines instead of running them (no srun needed).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu.sh [OPTIONS] VERB [ARGS...]

Runs `dagger-jax VERB ARGS...` from this checkout's .venv (`make install`, plus `pip install -e
'.[gpu]'` for CUDA), in the checkout's root, so relative paths in ARGS are relative to it. The
first word that is not an option is the verb; everything after it goes to dagger-jax unchanged.

  one node      runs the verb directly; JAX uses every visible GPU (config.mesh.fsdp=-1 fills
                the mesh with them)
  N > 1 nodes   srun --nodes=N --ntasks-per-node=1 --gpus-per-node=G: one process per node,
                each with DAGGER_JAX_MULTIHOST=1 (the CLI calls jax.distributed.initialize(),
                which reads the coordinator, process count and rank from SLURM) and
                JAX_LOCAL_DEVICE_IDS=0,...,G-1 (without it JAX's SLURM detection gives each
                process only GPU SLURM_LOCALID, i.e. one GPU per node)

options (a flag wins over its environment variable):
  --nodes N             NODES          default: SLURM_JOB_NUM_NODES inside an allocation, else 1
  --gpus-per-node G     GPUS_PER_NODE  required with N > 1; default SLURM_GPUS_ON_NODE (set by
                                       sbatch/salloc --gpus-per-node)
  --partition P         PARTITION      srun --partition
  --srun-arg ARG                       one more srun argument (repeatable), e.g.
                                       --srun-arg=--time=04:00:00 --srun-arg=--cpus-per-task=64
                                       (many clusters give a task 1 CPU unless told otherwise)
Rollout server (`dagger-jax serve`, started in the background before the verb, stopped after):
  --serve MODEL_DIR     SERVE_MODEL    the checkpoint to serve (HF dir or Orbax params)
  --serve-port PORT     SERVE_PORT     default 30000 (config.rollout.sglang_url's)
  --serve-node K        SERVE_NODE     with N > 1: the allocation's node K runs it (srun
                                       --relative=K --overlap), default 0; needs an allocation
                                       (sbatch or salloc) shared by server and trainer
  --serve-gpus IDS      SERVE_GPUS     CUDA_VISIBLE_DEVICES for the server, e.g. 7 (default:
                                       all, shared with the trainer)
  The server logs to runs/serve_PORT.log (its pid in runs/serve_PORT.pid), binds 127.0.0.1 on
  one node and 0.0.0.0 with N > 1, and does not preallocate GPU memory
  (XLA_PYTHON_CLIENT_PREALLOCATE=false); the trainer takes 75% of each GPU it sees, so leave it
  room (XLA_PYTHON_CLIENT_MEM_FRACTION=0.6) or give the server its own GPU.
Other:
  --dry-run                            print the commands, one per line, instead of running them
  -h, --help                           this text
environment: DAGGER (default .venv/bin/dagger-jax), DAGGER_JAX_DIR (the checkout; found by
  itself, and from SLURM_SUBMIT_DIR when sbatch runs a copy of this script).

examples:
  # one node, all its GPUs
  launch/gpu.sh train --config configs/qwen3_4b_swe.py --shards runs/x/shards/round_000
  # 4 nodes x 8 GPUs as a batch job (run from the checkout's root)
  sbatch -N 4 --gpus-per-node=8 launch/gpu.sh train --config configs/qwen3_8b_swe.py \
      --shards runs/x/shards/round_000
  # 2 nodes straight from a login node (srun makes the allocation)
  launch/gpu.sh --nodes 2 --gpus-per-node 8 --partition gpu train --config configs/qwen3_8b_swe.py
  # DAgger on one node, the rollout server on GPU 7, port 30001
  launch/gpu.sh --serve runs/hf_student --serve-port 30001 --serve-gpus 7 dagger \
      --config configs/qwen3_4b_swe.py --config.rollout.sglang_url=http://127.0.0.1:30001
  # see the exact commands without running anything
  launch/gpu.sh --dry-run --nodes 2 --gpus-per-node 8 train --config configs/qwen3_8b_swe.py
EOF
}

# These helpers are the same in tpu.sh and gpu.sh on purpose: each script stands alone, since
# sbatch runs a copy of gpu.sh from its spool directory, where no sourced file is found.
die() {
  printf 'launch/gpu.sh: %s\n' "$*" >&2
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

is_uint() {
  [[ $1 =~ ^[0-9]+$ ]]
}

NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
PARTITION=${PARTITION:-}
SERVE_MODEL=${SERVE_MODEL:-}
SERVE_PORT=${SERVE_PORT:-30000}
SERVE_NODE=${SERVE_NODE:-0}
SERVE_GPUS=${SERVE_GPUS:-}
DAGGER=${DAGGER:-.venv/bin/dagger-jax}
SRUN_ARGS=()

while [ $# -gt 0 ]; do
  opt=$1 val="" has=0
  case $opt in --*=*) val=${opt#*=} opt=${opt%%=*} has=1 ;; esac
  shift
  case $opt in
    --nodes|--gpus-per-node|--partition|--srun-arg|--serve|--serve-port|--serve-node|\
    --serve-gpus)
      if [ "$has" = 0 ]; then
        [ $# -gt 0 ] || die "$opt needs a value (see --help)"
        val=$1
        shift
      fi ;;
    -h|--help|--dry-run|--)
      [ "$has" = 0 ] || die "$opt takes no value" ;;
    -*) die "unknown option $opt (options go before the verb; see --help)" ;;
    *) set -- "$opt" "$@"; break ;;
  esac
  case $opt in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --nodes) NODES=$val ;;
    --gpus-per-node) GPUS_PER_NODE=$val ;;
    --partition) PARTITION=$val ;;
    --srun-arg) SRUN_ARGS+=("$val") ;;
    --serve) SERVE_MODEL=$val ;;
    --serve-port) SERVE_PORT=$val ;;
    --serve-node) SERVE_NODE=$val ;;
    --serve-gpus) SERVE_GPUS=$val ;;
    --) break ;;
  esac
done

[ $# -gt 0 ] || die "no verb: give a dagger-jax verb (e.g. train --config FILE); see --help"
if ! is_uint "$NODES" || [ "$NODES" -lt 1 ]; then
  die "--nodes $NODES: expected a node count 1, 2, ... (NODES)"
fi
if [ "$NODES" -gt 1 ]; then
  [ -n "$GPUS_PER_NODE" ] || die "$NODES nodes need the GPUs per node: set GPUS_PER_NODE or pass"\
    "--gpus-per-node G (under sbatch/salloc --gpus-per-node it is read from SLURM_GPUS_ON_NODE)"
  if ! is_uint "$GPUS_PER_NODE" || [ "$GPUS_PER_NODE" -lt 1 ]; then
    die "--gpus-per-node $GPUS_PER_NODE: expected a GPU count 1, 2, ... (GPUS_PER_NODE)"
  fi
fi
if [ -n "$SERVE_MODEL" ]; then
  if ! is_uint "$SERVE_PORT" || [ "$SERVE_PORT" -lt 1 ] || [ "$SERVE_PORT" -gt 65535 ]; then
    die "--serve-port $SERVE_PORT: expected a port number 1-65535 (SERVE_PORT)"
  fi
  if ! is_uint "$SERVE_NODE" || [ "$SERVE_NODE" -ge "$NODES" ]; then
    die "--serve-node $SERVE_NODE: expected a node index 0..$((NODES - 1)) (SERVE_NODE)"
  fi
  [ -z "$SERVE_GPUS" ] || [[ $SERVE_GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] \
    || die "--serve-gpus $SERVE_GPUS: expected GPU indices like 7 or 6,7 (SERVE_GPUS)"
  [ "$NODES" = 1 ] || [ -n "${SLURM_JOB_ID:-}" ] || die "--serve with $NODES nodes runs the server"\
    "in the trainer's SLURM allocation: run this under sbatch or salloc"
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${DAGGER_JAX_DIR:-}" ]; then
  REPO=$DAGGER_JAX_DIR
elif [ -f "$HERE/dagger_jax/cli.py" ]; then
  REPO=$HERE
elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/dagger_jax/cli.py" ]; then
  REPO=$SLURM_SUBMIT_DIR  # sbatch runs a copy of this script from its spool directory
else
  die "cannot find the dagger_jax checkout (sbatch runs a copy of this script): submit from the"\
    "checkout's root or set DAGGER_JAX_DIR=/path/to/checkout"
fi
[ -f "$REPO/dagger_jax/cli.py" ] || die "DAGGER_JAX_DIR=$REPO is not a dagger_jax checkout"

if [ "$DRY_RUN" = 1 ]; then
  printf 'cd %s\n' "$(q "$REPO")"
else
  printf '+ cd %s\n' "$(q "$REPO")" >&2
  cd "$REPO"
  [ -x "$DAGGER" ] || die "$DAGGER not found in $REPO: run \`make install\` there (and pip install"\
    "-e '.[gpu]'), or set DAGGER=/path/to/dagger-jax"
  [ "$NODES" = 1 ] || command -v srun >/dev/null 2>&1 \
    || die "srun not found: $NODES nodes need SLURM (or use --dry-run to see the commands)"
  [ -z "$SERVE_MODEL" ] || command -v curl >/dev/null 2>&1 \
    || die "curl not found: --serve needs it to wait for the server's /health"
fi

SRUN=(srun)
[ -z "$PARTITION" ] || SRUN+=(--partition="$PARTITION")
SRUN+=(${SRUN_ARGS[@]+"${SRUN_ARGS[@]}"})
if [ -n "$SERVE_MODEL" ]; then
  LOG=runs/serve_$SERVE_PORT.log
  PID=runs/serve_$SERVE_PORT.pid
  SERVE=(env XLA_PYTHON_CLIENT_PREALLOCATE=false)
  [ -z "$SERVE_GPUS" ] || SERVE+=(CUDA_VISIBLE_DEVICES="$SERVE_GPUS")
  SERVE+=("$DAGGER" serve --model "$SERVE_MODEL")
  if [ "$NODES" = 1 ]; then
    SERVE+=(--host 127.0.0.1 --port "$SERVE_PORT")
    HOST=127.0.0.1
    WHERE="http://$HOST:$SERVE_PORT"
  else
    SERVE=("${SRUN[@]:0:1}" --nodes=1 --ntasks=1 --relative="$SERVE_NODE" --overlap
           --gpus-per-node="$GPUS_PER_NODE" "${SRUN[@]:1}" "${SERVE[@]}" --host 0.0.0.0
           --port "$SERVE_PORT")
    HOST="\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n $((SERVE_NODE + 1))p)"
    WHERE="port $SERVE_PORT of the allocation's node $SERVE_NODE"
    [ "$DRY_RUN" = 1 ] || WHERE="http://$(bash -c "echo $HOST"):$SERVE_PORT"
  fi
  step "mkdir -p runs && (nohup $(qjoin "${SERVE[@]}") > $LOG 2>&1 < /dev/null & echo \$! > $PID)"
  STOP="kill \$(cat $PID)"
  [ "$DRY_RUN" = 1 ] || trap 'step "$STOP" || true' EXIT
  note "rollout server: $WHERE, log $REPO/$LOG"
  # Wait until it answers /health (the verb's client only waits 30 s); give up when it dies.
  step "timeout 1800 bash -c 'until curl -sf http://$HOST:$SERVE_PORT/health >/dev/null; do kill \
-0 \$(cat $PID) || exit 1; sleep 2; done'"
fi
if [ "$NODES" = 1 ]; then
  step "$(qjoin "$DAGGER" "$@")"
else
  step "$(qjoin "${SRUN[@]:0:1}" --nodes="$NODES" --ntasks-per-node=1 \
    --gpus-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 "${SRUN[@]:1}" env \
    DAGGER_JAX_MULTIHOST=1 JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS_PER_NODE - 1)))" \
    "$DAGGER" "$@")"
fi
if [ -n "$SERVE_MODEL" ] && [ "$DRY_RUN" = 1 ]; then
  step "$STOP"
fi
