"""CLI verbs of the DAgger room: `dagger-jax dagger`, `dagger-jax demo`, `dagger-jax pretrain`.

    dagger-jax dagger --config configs/qwen3_4b_swe.py --config.workdir runs/4b
    dagger-jax demo --config configs/demo.py [--seeds 3] [--methods dagger,sft]
    dagger-jax pretrain --config configs/demo.py --out assets/demo_base
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from absl import logging as absl_logging

from dagger_jax.dagger import demo as demo_lib
from dagger_jax.dagger import loop
from dagger_jax.dagger import pretrain as pretrain_lib


def setup_logging() -> None:
  """Our progress at INFO on the console; libraries (orbax, jax, absl) at WARNING."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("dagger_jax").setLevel(logging.INFO)
  absl_logging.set_verbosity(absl_logging.WARNING)


def dagger(args: argparse.Namespace, config: Any) -> int:
  setup_logging()
  for row in loop.run(config):
    evaluated = (f"eval resolved {row['eval_resolved']}/{row['eval_episodes']} "
                 f"({100 * row['eval_resolve_rate']:.1f}%)" if row["eval_episodes"] else
                 "not evaluated (config.dagger.eval_every)")
    print(f"round {row['round']}: beta={row['beta']:.3f} labels={row['labels_this_round']} "
          f"{evaluated}")
  return 0


def demo_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--seeds", type=int, default=1,
                      help="repeat the comparison with seeds config.seed, config.seed+1, ...")
  parser.add_argument("--methods", default=",".join(demo_lib.METHODS),
                      help=f"comma-separated subset of {', '.join(demo_lib.METHODS)} (dagger "
                      "always runs: it sets the label budget)")
  parser.add_argument("--no-plot", action="store_true", help="skip demo.png")


def demo(args: argparse.Namespace, config: Any) -> int:
  setup_logging()
  demo_lib.run(config, seeds=args.seeds,
               methods=[m.strip() for m in args.methods.split(",") if m.strip()],
               make_plot=not args.no_plot)
  return 0


def pretrain_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", default=None, help="where the base goes (default: "
                      "config.pretrain.out); replaced atomically when the build finishes")


def pretrain(args: argparse.Namespace, config: Any) -> int:
  setup_logging()
  out = args.out or config.pretrain.out
  p = config.pretrain
  print(f"pretrain: {p.repos} explored repositories, {p.steps} steps of "
        f"{config.train.batch_size} x {config.data.max_len} tokens -> {out}", flush=True)
  info = pretrain_lib.build_base(config, out)
  print(f"base written to {out}: loss {info['final_loss']:.3f}, copy accuracy "
        f"{info['copy_accuracy']:.3f}, corpus {info['corpus_s']} s, "
        f"training {info['train_s']} s, params sha256 {info['params_sha256'][:16]}")
  print(json.dumps({k: info[k] for k in ("transcripts", "tokens", "final_loss", "copy_accuracy",
                                         "corpus_s", "train_s", "params_sha256")}))
  return 0
