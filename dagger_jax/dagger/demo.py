"""`dagger-jax demo`: a complete small DAgger experiment on CPU, with its SFT baseline.

    dagger-jax demo --config configs/demo.py                 # ~17 minutes on 2 cores
    dagger-jax demo --config configs/demo.py --seeds 3       # the same, 3 seeds (3x the time)

Two runs with the same budget of rounds, episodes per round and gradient steps per round:

    dagger   beta_r from config.dagger (the demo: 1, 0.5, 0.25, ...), teacher labels on the
             states the mixed policy visits
    sft      beta = 1 every round: teacher-only episodes (behaviour cloning on the teacher's own
             states), the baseline DAgger is meant to beat

Round 0 (beta = 1) is the same experiment in both, so the SFT run starts from a copy of the
DAgger run's round 0. After every round the student is evaluated alone (beta = 0, greedy) on
held-out tasks. The demo prints a table (held-out resolve rate by round and cumulative teacher
labels), writes `<workdir>/demo.png` and `<workdir>/demo.json`, and its last line is one JSON
object. Like every run it resumes: run it again and finished rounds are read back, not redone.

The tasks (config.tasks, toy bug-fix repositories) and the tokenizer (config.data, a BPE trained
on them) are made once in `<workdir>/shared` and used by both runs, so they see the same data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import time
from typing import Any

log = logging.getLogger(__name__)

METHODS = ("dagger", "sft")


def demo_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", default=None,
                      help="run directory (default: config.workdir); one sub-folder per method "
                      "and seed")
  parser.add_argument("--seeds", type=int, default=1,
                      help="repeat the comparison with seeds config.seed, config.seed+1, ...")
  parser.add_argument("--only", choices=METHODS, default=None,
                      help="run one method only (no comparison)")
  parser.add_argument("--no-plot", action="store_true", help="skip demo.png")


def method_config(config: Any, method: str, seed: int, shared: str, workdir: str) -> Any:
  """The config of one run: `config` with its seed, its workdir, the shared tasks, and for the
  SFT baseline a constant beta of 1."""
  c = config.copy_and_resolve_references()
  c.unlock()
  c.seed = seed
  c.workdir = workdir
  c.tasks.train_file = c.tasks.train_file or os.path.join(shared, "tasks", "train.jsonl")
  c.tasks.eval_file = c.tasks.eval_file or os.path.join(shared, "tasks", "eval.jsonl")
  if c.data.tokenizer == "demo-bpe":  # the one trained in `shared`, by path
    from dagger_jax.data.tokenizer import DEMO_DIRNAME
    c.data.tokenizer = os.path.join(shared, DEMO_DIRNAME)
  if method == "sft":
    c.dagger.beta_schedule = "constant"
    c.dagger.beta0 = 1.0
  return c


def _prepare_shared(config: Any, shared: str) -> None:
  """Tasks and (for demo-bpe) the tokenizer, made once for every run of the demo."""
  from dagger_jax.dagger import loop

  train_tasks, _ = loop.load_or_make_tasks(config, shared)  # generated there unless given
  if config.data.tokenizer == "demo-bpe":
    loop.ensure_tokenizer(config, shared, loop.tokenizer_corpus(config, train_tasks))


def _share_round0(dagger_dir: str, sft_dir: str) -> None:
  """SFT's round 0 is DAgger's round 0 (beta = 1 in both): copy it instead of redoing it."""
  from dagger_jax.data.shards import shard_dir
  from dagger_jax.train.trainer import checkpoint_dir

  if os.path.exists(os.path.join(sft_dir, "metrics.jsonl")):
    return
  with open(os.path.join(dagger_dir, "metrics.jsonl")) as f:
    row0 = json.loads(f.readline())
  if row0["round"] != 0 or row0["beta"] != 1.0:
    return
  pairs = [(shard_dir(dagger_dir, 0), shard_dir(sft_dir, 0)),
           (checkpoint_dir(dagger_dir, 0), checkpoint_dir(sft_dir, 0))]
  for name in ("trajectories/round_000.jsonl", "eval/round_000.jsonl", "eval/round_000.json"):
    pairs.append((os.path.join(dagger_dir, name), os.path.join(sft_dir, name)))
  for src, dst in pairs:
    if not os.path.exists(src) or os.path.exists(dst):
      continue
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
  os.makedirs(sft_dir, exist_ok=True)
  with open(os.path.join(sft_dir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({**row0, "copied_from": dagger_dir}) + "\n")


def cumulative_labels(run: list[dict]) -> list[int]:
  """Teacher labels collected up to and including each round of one run."""
  return list(itertools.accumulate(row["labels_this_round"] for row in run))


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson interval of a resolve rate measured on n tasks (sensible at 0% and 100% too,
  where the plain standard error is 0)."""
  if not n:
    return float("nan"), float("nan")
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def table(results: dict[str, list[list[dict]]]) -> str:
  """Held-out resolve rate per round, mean over seeds, side by side."""
  methods = [m for m in METHODS if results.get(m)]
  rounds = max(len(runs[0]) for runs in results.values() if runs)
  head = f"{'round':>5} " + " ".join(f"{m + ' beta':>11} {m + ' labels':>13} {m + ' resolved':>20}"
                                     for m in methods)
  lines = [head, "-" * len(head)]
  for r in range(rounds):
    cells = []
    for m in methods:
      runs = [run for run in results[m] if len(run) > r]
      rows = [run[r] for run in runs]
      labels = statistics.mean(cumulative_labels(run)[r] for run in runs)
      rate = sum(x["eval_resolve_rate"] for x in rows) / max(1, len(rows))
      n = sum(x["eval_episodes"] for x in rows)
      lo, hi = wilson(rate, n)
      cells.append(f"{rows[0]['beta']:>11.3f} {labels:>13.0f} "
                   f"{100 * rate:>5.1f}% [{100 * lo:>4.1f},{100 * hi:>5.1f}]")
    lines.append(f"{r:>5} " + " ".join(cells))
  return "\n".join(lines)


def plot(results: dict[str, list[list[dict]]], path: str) -> str | None:
  """Held-out resolve rate against cumulative teacher labels, one line per method and seed."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log.warning("matplotlib is not installed (pip install matplotlib): no plot")
    return None
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  colors = {"dagger": "tab:blue", "sft": "tab:orange"}
  top = 0.0
  for m, runs in results.items():
    for i, run in enumerate(runs):
      x = cumulative_labels(run)
      rates = [row["eval_resolve_rate"] for row in run]
      lo, hi = zip(*(wilson(r, row["eval_episodes"]) for r, row in zip(rates, run)))
      ax.plot(x, [100 * r for r in rates], "o-", color=colors[m], alpha=1.0 if i == 0 else 0.5,
              label=f"{m} (95% Wilson band)" if i == 0 else None)
      ax.fill_between(x, [100 * v for v in lo], [100 * v for v in hi], color=colors[m],
                      alpha=0.15 if i == 0 else 0.07, linewidth=0)
      top = max(top, *(100 * v for v in hi))
  ax.set_ylim(0, min(100, max(10.0, 1.1 * top)))  # rates are >= 0; 0% is a floor, not a centre
  ax.set_xlabel("teacher labels (cumulative)")
  ax.set_ylabel("held-out resolved (%), student alone")
  ax.set_title("DAgger vs SFT on the same budget")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def demo(args, config) -> int:
  from dagger_jax.dagger import loop

  loop.setup_logging()
  workdir = args.workdir or config.workdir
  _enable_compilation_cache(os.path.join(workdir, ".jax_cache"))
  shared = os.path.join(workdir, "shared")
  start = time.time()
  methods = [args.only] if args.only else list(METHODS)
  print(f"demo: {', '.join(methods)} x {args.seeds} seed(s), {config.dagger.rounds} rounds of "
        f"{config.dagger.episodes_per_round} episodes and {config.train.steps} steps each, "
        f"held-out: {config.dagger.eval_episodes} tasks; writing {workdir}", flush=True)
  _prepare_shared(config, shared)
  results: dict[str, list[list[dict]]] = {m: [] for m in methods}
  for s in range(args.seeds):
    seed = int(config.seed) + s
    for m in methods:
      run_dir = os.path.join(workdir, f"{m}_seed{seed}")
      c = method_config(config, m, seed, shared, run_dir)
      if m == "sft" and "dagger" in methods:
        _share_round0(os.path.join(workdir, f"dagger_seed{seed}"), run_dir)
      print(f"== {m}, seed {seed} -> {run_dir}", flush=True)
      results[m].append(loop.run(c, workdir=run_dir))
  text = table(results)
  print("\nheld-out resolve rate of the student alone (mean over seeds, [95% Wilson interval]):")
  print(text)
  summary: dict[str, Any] = {"demo": config.name, "seeds": args.seeds,
                             "minutes": round((time.time() - start) / 60, 1)}
  for m, runs in results.items():
    summary[f"{m}_final"] = sum(run[-1]["eval_resolve_rate"] for run in runs) / len(runs)
    summary[f"{m}_labels"] = statistics.mean(cumulative_labels(run)[-1] for run in runs)
  n = sum(run[-1]["eval_episodes"] for run in next(iter(results.values())))
  summary["eval_tasks"] = n
  if len(results) == 2:
    a, b = summary["dagger_final"], summary["sft_final"]
    gap, pooled = a - b, (a + b) / 2
    se = math.sqrt(pooled * (1 - pooled) * 2 / n) if n else float("nan")  # two-proportion test
    verdict = ("DAgger ahead" if gap > 2 * se else "SFT ahead" if gap < -2 * se else
               "no difference beyond noise (2 s.e.)")
    print(f"\nfinal round: DAgger {100 * a:.1f}% vs SFT {100 * b:.1f}% on {n} held-out tasks "
          f"(difference {100 * gap:+.1f} points, s.e. {100 * se:.1f}): {verdict}")
    summary["verdict"] = verdict
  if not args.no_plot:
    path = plot(results, os.path.join(workdir, "demo.png"))
    if path:
      print(f"plot: {path}")
  with open(os.path.join(workdir, "demo.json"), "w") as f:
    json.dump({"summary": summary, "rounds": results}, f, indent=1)
  print(f"TensorBoard: tensorboard --logdir {workdir}")
  print(json.dumps(summary))
  return 0


def _enable_compilation_cache(path: str) -> None:
  """XLA compilations persist across demo runs (a second run starts training at once)."""
  import jax

  path = os.path.abspath(path)
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
