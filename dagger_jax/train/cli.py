"""CLI verbs of the training room: `dagger-jax train` and `dagger-jax plan`.

    dagger-jax train --config configs/demo.py --shards runs/x/shards/round_000 \
        --config.workdir runs/x
    dagger-jax plan --config configs/qwen3_8b_swe.py --mesh data=1,fsdp=64,tensor=1 --device v5p
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from dagger_jax.errors import UsageError
from dagger_jax.train import plan as plan_lib
from dagger_jax.train import trainer


def train_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--shards", nargs="+", required=True, metavar="DIR",
                      help="shard directories (one per round) to train on")
  parser.add_argument("--round", type=int, default=0, dest="round_index",
                      help="the DAgger round this training belongs to (default 0)")


def train(args: argparse.Namespace, config: Any) -> int:
  for d in args.shards:
    if not os.path.isdir(d):
      raise UsageError(f"--shards {d}: no such directory")
  result = trainer.train(config, args.shards, workdir=config.workdir,
                         round_index=args.round_index)
  last = result.history[-1] if result.history else {}
  print(f"trained round {result.round_index} to step {result.steps}: "
        f"loss {last.get('loss', float('nan')):.4f}; checkpoints in {result.checkpoint_dir}")
  return 0


def plan_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                      help="the mesh to plan instead of config.mesh, e.g. data=1,fsdp=64,tensor=1")
  parser.add_argument("--num-devices", type=int, default=None, metavar="N",
                      help="devices for a mesh axis of -1 (config.mesh or --mesh)")
  parser.add_argument("--device", choices=plan_lib.DEVICE_CHOICES, default="v5p",
                      help="the accelerator: its memory and peak FLOP/s (default v5p; cpu = this "
                           "machine's RAM and measured matmul rate)")
  parser.add_argument("--mfu", type=float, default=0.4,
                      help="model FLOPs utilisation for the step-time estimate (default 0.4)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--no-compile", action="store_true",
                      help="shapes only: skip the AOT compile (activations become a lower bound)")
  parser.add_argument("--full-depth", action="store_true",
                      help="compile every layer instead of 1 and 2 layers scaled (slow on CPU)")


def plan(args: argparse.Namespace, config: Any) -> int:
  """Prints the plan (text or --json); exit 1 when it does not fit, with what to change."""
  sizes = plan_lib.resolve_mesh(args.mesh, config.mesh, args.num_devices)
  plan_lib.configure_cpu_devices(math.prod(sizes.values()))  # before JAX starts its backend
  p = plan_lib.make_plan(config, mesh=args.mesh, num_devices=args.num_devices,
                         device=args.device, mfu=args.mfu, use_compiler=not args.no_compile,
                         full_depth=args.full_depth)
  print(json.dumps(p.to_json()) if args.json else p.render(), flush=True)
  if not p.fits:
    print(f"dagger-jax plan: {p.message()}", file=sys.stderr)
    return 1
  return 0
