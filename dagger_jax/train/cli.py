"""CLI verb of the training room: `dagger-jax train`.

    dagger-jax train --config configs/demo.py --shards runs/x/shards/round_000 \
        --config.workdir runs/x
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from dagger_jax.errors import UsageError
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
