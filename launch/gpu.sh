#!/usr/bin/env bash
# Run one dagger-jax verb on GPUs: one node directly, or several nodes under SLURM.
#
#   launch/gpu.sh train --config configs/qwen3_4b_swe.py --shards runs/x/shards/round_000
#   sbatch -N 4 --gpus-per-node=8 launch/gpu.sh train --config configs/qwen3_8b_swe.py ...
#
# Same configs as on TPU; the mesh fills with all visible devices (config.mesh.fsdp=-1).
# Under SLURM with more than one node, DAGGER_JAX_MULTIHOST=1 makes the CLI call
# jax.distributed.initialize(), which reads the SLURM environment.
set -euo pipefail
cd "$(dirname "$0")/.."
DAGGER=${DAGGER:-.venv/bin/dagger-jax}
if [ -n "${SLURM_JOB_NUM_NODES:-}" ] && [ "${SLURM_JOB_NUM_NODES}" -gt 1 ]; then
  exec srun --ntasks-per-node=1 env DAGGER_JAX_MULTIHOST=1 "$DAGGER" "$@"
fi
exec "$DAGGER" "$@"
