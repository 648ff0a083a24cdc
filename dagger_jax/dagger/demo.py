"""`dagger-jax demo`: DAgger against SFT and on-policy labelling, on one teacher-label budget.

    dagger-jax demo --config configs/demo.py                 # what `make demo` runs
    dagger-jax demo --config configs/demo.py --seeds 3       # the same on 3 seeds

Three runs from the same base student (`config.model.init_from`, built by `dagger-jax pretrain`)
and the same round 0 (teacher-only episodes, beta = 1, trained once and copied):

    dagger     beta_r from config.dagger (the demo: 1, 0.5, 0.25), interventions by rule, the
               teacher labels every state the mixed policy visits
    sft        beta = 1 every round: teacher-only episodes (behaviour cloning)
    onpolicy   beta = 0 after round 0, no interventions: the student acts alone and the teacher
               labels its states

Equal label budgets: DAgger runs first; each other method's round r collects the shortest run of
episodes whose teacher labels reach DAgger's cumulative labels at round r
(`config.dagger.label_budget`), so a win never comes from more labels. Every method trains the
same number of steps per round on the aggregate of its rounds. After every round the student is
evaluated alone (beta = 0, greedy) on `config.dagger.eval_episodes` held-out tasks; an episode
that hits `env.max_turns` without submitting counts as unresolved (mini-swe-agent's SWE-bench
convention: its prediction has no patch).

The demo prints a table per method and round (beta, labels, episodes, trained tokens, steps,
held-out resolved with a 95% Wilson interval), where the time went, DAgger minus SFT on the last
round with its standard error, and for several seeds the mean +- std per method. It writes
`<workdir>/demo.png` and `<workdir>/demo.json`; its last line is one JSON object. Like every
run it resumes: run it again and finished rounds are read back, not redone.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import time
from typing import Any, Sequence

import jax

from dagger_jax.dagger import loop
from dagger_jax.data.trajectory import read_jsonl
from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.errors import UsageError
from dagger_jax.rundir import DemoDir, RunDir, parent_of

log = logging.getLogger(__name__)

METHODS = ("dagger", "sft", "onpolicy")
COLORS = {"dagger": "#1f77b4", "sft": "#d62728", "onpolicy": "#2ca02c"}


def method_config(config: Any, method: str, seed: int, shared: RunDir, run_dir: RunDir,
                  label_budget: Sequence[int] = ()) -> Any:
  """The config of one run: `config` with its seed, its workdir, the shared tasks, the
  method's beta schedule and interventions, and (sft, onpolicy) DAgger's label budget."""
  if method not in METHODS:
    raise UsageError(f"unknown demo method {method!r} (known: {', '.join(METHODS)})")
  c = config.copy_and_resolve_references()
  c.unlock()
  c.seed = seed
  c.workdir = run_dir.root
  c.tasks.train_file = c.tasks.train_file or shared.tasks("train")
  c.tasks.eval_file = c.tasks.eval_file or shared.tasks("eval")
  if c.data.tokenizer == "demo-bpe":  # the one trained in `shared`, by path
    c.data.tokenizer = shared.tokenizer
  if method == "sft":
    c.dagger.beta_schedule, c.dagger.beta0 = "constant", 1.0
  elif method == "onpolicy":  # 1, 0, 0, ...: teacher-only round 0, then the student alone
    c.dagger.beta_schedule, c.dagger.beta0, c.dagger.beta_decay = "exponential", 1.0, 0.0
    c.dagger.interventions = ()
  if method != "dagger":
    c.dagger.label_budget = tuple(int(x) for x in label_budget)
  return c


def _prepare_shared(config: Any, shared: RunDir) -> None:
  """Tasks (and, for demo-bpe, a tokenizer) made once for every run of the demo."""
  train_tasks, _ = loop.load_or_make_tasks(config, shared.root)  # generated there unless given
  if config.data.tokenizer == "demo-bpe":
    loop.ensure_tokenizer(config, shared.root, loop.tokenizer_corpus(config, train_tasks))


def _share_round0(dagger_dir: RunDir, run_dir: RunDir) -> None:
  """Round 0 is the same experiment in every method (beta = 1, the same episodes and steps):
  copy DAgger's instead of redoing it."""
  if os.path.exists(run_dir.metrics):
    return
  with open(dagger_dir.metrics) as f:
    row0 = json.loads(f.readline())
  if row0["round"] != 0 or row0["beta"] != 1.0:
    return
  # Each part is copied aside and renamed, and the metrics row (which marks round 0 done) comes
  # last, so a kill leaves whole parts or none, and the next start copies what is missing.
  for part in ("shards", "checkpoints", "trajectories", "eval_episodes", "eval_summary"):
    src, dst = getattr(dagger_dir, part)(0), getattr(run_dir, part)(0)
    if not os.path.exists(src) or os.path.exists(dst):
      continue
    dst = parent_of(dst)
    tmp = f"{dst}.tmp-copy"
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, tmp)
    os.replace(tmp, dst)
  metrics = parent_of(run_dir.metrics)
  with open(f"{metrics}.tmp-copy", "w") as f:
    f.write(json.dumps({**row0, "copied_from": dagger_dir.root}) + "\n")
  os.replace(f"{metrics}.tmp-copy", metrics)


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


def difference(a: float, b: float, n: int) -> tuple[float, float]:
  """a - b for two resolve rates measured on the same n tasks by different students, and its
  standard error sqrt(a(1-a)/n + b(1-b)/n) (unpooled; 0 only when both are 0% or 100%)."""
  return a - b, math.sqrt((a * (1 - a) + b * (1 - b)) / n) if n else float("nan")


def table(results: dict[str, list[list[dict]]]) -> str:
  """One line per method and round (mean over seeds): beta, cumulative labels, episodes,
  trained tokens (aggregate), steps, held-out resolved [95% Wilson interval over all seeds]."""
  head = (f"{'method':<9} {'round':>5} {'beta':>5} {'labels':>7} {'episodes':>8} "
          f"{'trained tok':>11} {'steps':>5}  {'held-out resolved':<28}")
  lines = [head, "-" * len(head)]
  for m, runs in results.items():
    for r in range(min(len(run) for run in runs)):
      rows = [run[r] for run in runs]
      evaluated = all(x["eval_episodes"] for x in rows)
      k = sum(x["eval_resolved"] or 0 for x in rows)
      n = sum(x["eval_episodes"] or 0 for x in rows)
      lo, hi = wilson(k / n if n else 0.0, n)
      labels = statistics.mean(cumulative_labels(run)[r] for run in runs)
      episodes = statistics.mean(x.get("episodes_this_round", 0) for x in rows)
      tokens = statistics.mean(x.get("trained_tokens_aggregate", 0) for x in rows)
      steps = sum(x.get("steps", 0) for x in runs[0][:r + 1])
      cell = (f"{k:>4}/{n:<4} {100 * k / max(n, 1):5.1f}% [{100 * lo:4.1f}, {100 * hi:5.1f}]"
              if evaluated else "(not evaluated)")
      lines.append(f"{m:<9} {r:>5} {rows[0]['beta']:>5.2f} {labels:>7.0f} {episodes:>8.0f} "
                   f"{tokens:>11.0f} {steps:>5}  {cell}")
  return "\n".join(lines)


def time_table(results: dict[str, list[list[dict]]]) -> str:
  """Where the time went: seconds per phase, summed over seeds, per method and round."""
  lines = [f"{'method':<9} {'round':>5} {'collect':>8} {'render':>7} {'train':>7} {'evaluate':>9}"]
  for m, runs in results.items():
    for r in range(min(len(run) for run in runs)):
      rows = [run[r] for run in runs if "copied_from" not in run[r]]
      if not rows:
        lines.append(f"{m:<9} {r:>5} {'(round 0 copied from dagger)':>34}")
        continue
      t = {k: sum(x.get(f"{k}_s", 0.0) for x in rows) for k in ("collect", "render", "train",
                                                                 "eval")}
      lines.append(f"{m:<9} {r:>5} {t['collect']:>8.0f} {t['render']:>7.0f} {t['train']:>7.0f} "
                   f"{t['eval']:>9.0f}")
  return "\n".join(lines)


def behaviour(trajectories: Sequence[Any]) -> dict[str, int]:
  """What a student did in its held-out episodes (toy tasks), counted per episode:

    right_function   its first grep names the function the issue names
    first_edit_ok    the tests passed after its first edit
    restored         it restored the files after a change (`git checkout`)
    recovered        resolved after a restore
    submitted_red    submitted while the last test run failed (or without testing its change)
    not_submitted    ended without submitting (env.max_turns, or format errors in a row)
  """
  out = collections.Counter()
  for t in trajectories:
    statement = t.messages[1]["content"]
    named = toy.named_function(statement)
    commands, observations = [], []
    for m in t.messages[2:]:
      if m["role"] == "assistant":
        commands.append(protocol.parse_action(m["content"]).command or "")
      else:
        observations.append(m["content"])
    greps = [c for c in commands if c.startswith("grep")]
    if named and greps and f"def {named}(" in greps[0]:
      out["right_function"] += 1
    edits = [i for i, c in enumerate(commands) if c.startswith("sed -i")]
    tests = [i for i, c in enumerate(commands) if "run_tests" in c or "pytest" in c]
    if edits:
      after = [i for i in tests if i > edits[0]]
      if after and after[0] < len(observations) and observations[after[0]].startswith(
          "<returncode>0</returncode>"):
        out["first_edit_ok"] += 1
    restored = any(c.startswith("git checkout") for c in commands)
    out["restored"] += restored
    out["recovered"] += bool(restored and t.outcome.resolved)
    if t.outcome.submitted:
      last_test = max(tests, default=-1)
      green = (0 <= last_test < len(observations)
               and observations[last_test].startswith("<returncode>0</returncode>")
               and not any(e > last_test for e in edits))
      out["submitted_red"] += not green
    else:
      out["not_submitted"] += 1
  return {k: out[k] for k in ("right_function", "first_edit_ok", "restored", "recovered",
                              "submitted_red", "not_submitted")}


def summarize(results: dict[str, list[list[dict]]], wall_s: float) -> dict[str, Any]:
  """The demo's figures: per method the last round's held-out resolve rate (mean over seeds,
  per seed, std) and labels; DAgger minus SFT with its standard error and the verdict."""
  out: dict[str, Any] = {"methods": {}}
  n = results["dagger"][0][-1]["eval_episodes"]
  for m, runs in results.items():
    rates = [run[-1]["eval_resolve_rate"] for run in runs]
    out["methods"][m] = {
        "heldout_resolve": statistics.mean(rates), "per_seed": rates,
        "std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
        "teacher_labels": statistics.mean(cumulative_labels(run)[-1] for run in runs),
        "trained_tokens": statistics.mean(run[-1].get("trained_tokens_aggregate", 0)
                                          for run in runs),
        "steps": sum(row.get("steps", 0) for row in runs[0]),
        "teacher": _teacher_cost(runs)}
  out["heldout_tasks"] = n
  out["seeds"] = len(results["dagger"])
  if "sft" in results:
    gaps = [a[-1]["eval_resolve_rate"] - b[-1]["eval_resolve_rate"]
            for a, b in zip(results["dagger"], results["sft"])]
    first_gap, se = difference(results["dagger"][0][-1]["eval_resolve_rate"],
                               results["sft"][0][-1]["eval_resolve_rate"], n)
    verdict = ("DAgger ahead beyond 2 s.e." if first_gap > 2 * se else
               "SFT ahead beyond 2 s.e." if first_gap < -2 * se else
               "no difference beyond 2 s.e.")
    out["dagger_minus_sft"] = {"seed0": first_gap, "se_seed0": se, "verdict_seed0": verdict,
                               "per_seed": gaps, "mean": statistics.mean(gaps),
                               "std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
                               "dagger_ahead_every_seed": all(g > 0 for g in gaps)}
  out["wall_s"] = round(wall_s, 1)
  return out


def _teacher_cost(runs: list[list[dict]]) -> dict[str, float]:
  """Teacher calls and (for a remote teacher) prompt and completion tokens, summed over a run's
  rounds, mean over seeds (`teacher_calls`, `teacher_usage` in metrics.jsonl; rows written
  before these were recorded count 0)."""
  per_run = [{"calls": sum(row.get("teacher_calls", 0) for row in run),
              **{k: sum(row.get("teacher_usage", {}).get(k, 0) for row in run)
                 for k in ("prompt_tokens", "completion_tokens")}} for run in runs]
  return {k: statistics.mean(r[k] for r in per_run) for k in per_run[0]}


def _split_name(results: dict[str, list[list[dict]]]) -> str:
  split = results["dagger"][0][-1].get("eval_split", "test")
  return "held-out" if split == "test" else split


def plot(results: dict[str, list[list[dict]]], path: str) -> str | None:
  """The lab-meeting figure: (a) held-out resolve rate against cumulative teacher labels, one
  line per method (mean over seeds) with 95% Wilson intervals and each round's beta marked;
  (b-d) the training rounds: episodes resolved under the collecting policy, teacher take-overs by
  rule, and the loss."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log.warning("matplotlib is not installed (pip install matplotlib): no plot")
    return None
  fig = plt.figure(figsize=(12, 5), dpi=120)
  grid = fig.add_gridspec(3, 2, width_ratios=(1.6, 1), hspace=0.45, wspace=0.18)
  ax = fig.add_subplot(grid[:, 0])
  side = [fig.add_subplot(grid[i, 1]) for i in range(3)]
  seeds = len(results["dagger"])
  n = results["dagger"][0][-1]["eval_episodes"]
  top = 0.0
  offsets = {m: (i - 1) * 0.012 for i, m in enumerate(METHODS)}  # keep error bars apart
  for m, runs in results.items():
    rounds = min(len(run) for run in runs)
    shown = [r for r in range(rounds) if all(run[r]["eval_episodes"] for run in runs)]
    x = [statistics.mean(cumulative_labels(run)[r] for run in runs) for r in shown]
    k = [sum(run[r]["eval_resolved"] for run in runs) for r in shown]
    tot = [sum(run[r]["eval_episodes"] for run in runs) for r in shown]
    y = [100 * a / b for a, b in zip(k, tot)]
    lo, hi = zip(*(wilson(a / b, b) for a, b in zip(k, tot)))
    span = max(x) - min(x) or 1.0
    xs = [v + offsets.get(m, 0.0) * span for v in x]
    ax.errorbar(xs, y, yerr=[[v - 100 * l for v, l in zip(y, lo)],
                             [100 * h - v for v, h in zip(y, hi)]],
                fmt="o-", color=COLORS.get(m), capsize=3, lw=2, ms=6, label=m)
    for i, r in enumerate(shown):
      if r == 0 and m != "dagger":  # round 0 is shared: one label, DAgger's
        continue
      text = "r0 β=1 (shared)" if r == 0 else f"r{r} β={runs[0][r]['beta']:g}"
      ax.annotate(text, (xs[i], y[i]), textcoords="offset points", xytext=(6, -12), fontsize=7,
                  color="0.3" if r == 0 else COLORS.get(m))
    top = max(top, *(100 * v for v in hi))
    rows = [[run[r] for run in runs] for r in range(rounds)]
    rs = list(range(rounds))
    side[0].plot(rs, [100 * statistics.mean(x_["train_resolved"] / max(1, x_["episodes_this_round"])
                                            for x_ in rr) for rr in rows],
                 "o-", color=COLORS.get(m), label=m)
    side[1].plot(rs, [statistics.mean(sum(x_.get("interventions", {}).values()) for x_ in rr)
                      for rr in rows], "o-", color=COLORS.get(m))
    side[2].plot(rs, [statistics.mean(x_["train_loss"] for x_ in rr if x_["train_loss"] is not None)
                      if any(x_["train_loss"] is not None for x_ in rr) else float("nan")
                      for rr in rows], "o-", color=COLORS.get(m))
  ax.set_ylim(0, min(100, max(10.0, 1.1 * top)))
  ax.set_xlabel("teacher labels (cumulative)")
  ax.set_ylabel(f"{_split_name(results)} resolved (%), student alone, greedy")
  ax.set_title(f"DAgger vs SFT vs on-policy on one label budget\n"
               f"n = {n} {_split_name(results)} tasks, {seeds} seed(s), 95% Wilson intervals",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left")
  for a, title in zip(side, ("training episodes resolved (%)", "teacher take-overs by rule",
                             "train loss (teacher tokens)")):
    a.set_title(title, fontsize=9)
    a.grid(alpha=0.3)
    a.set_xticks(range(max(len(r) for r in results["dagger"])))
    a.tick_params(labelsize=8)
  side[2].set_xlabel("round", fontsize=8)
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)
  return path


def run(config: Any, *, seeds: int = 1, methods: Sequence[str] = METHODS,
        make_plot: bool = True) -> dict:
  """The whole comparison (module doc) in `config.workdir`; prints its report and returns the
  summary that demo.json holds (its last printed line). `dagger` always runs: it sets the label
  budget."""
  workdir = config.workdir
  root = DemoDir(workdir)
  _enable_compilation_cache(root.compilation_cache)
  shared = root.shared
  start = time.time()
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise UsageError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
  methods = ["dagger"] + [m for m in METHODS[1:] if m in methods]
  print(f"demo: {', '.join(methods)} x {seeds} seed(s), {config.dagger.rounds} rounds, "
        f"{config.dagger.episodes_per_round} DAgger episodes and {config.train.steps} steps per "
        f"round, {config.dagger.eval_episodes} {config.dagger.eval_split}-split tasks; "
        f"writing {workdir}", flush=True)
  _prepare_shared(config, shared)
  results: dict[str, list[list[dict]]] = {m: [] for m in methods}
  for s in range(seeds):
    seed = int(config.seed) + s
    dagger_dir = root.run("dagger", seed)
    budget: list[int] = []
    for m in methods:
      run_dir = root.run(m, seed)
      c = method_config(config, m, seed, shared, run_dir, budget)
      if m != "dagger":
        _share_round0(dagger_dir, run_dir)
      print(f"== {m}, seed {seed} -> {run_dir.root}", flush=True)
      results[m].append(loop.run(c))
      if m == "dagger":
        budget = cumulative_labels(results[m][-1])
  print(f"\nper method and round ({config.dagger.eval_split} split, student alone; "
        f"mean over {seeds} seed(s)):")
  print(table(results))
  print("\nwhat the students did on the last round's evaluation (episodes, seed "
        f"{config.seed}; see demo.behaviour):")
  acts = {}
  for m in methods:
    last = len(results[m][0]) - 1
    acts[m] = behaviour(read_jsonl(root.run(m, config.seed).eval_episodes(last)))
  keys = list(next(iter(acts.values())))
  print(f"{'method':<9} " + " ".join(f"{k:>14}" for k in keys))
  for m, v in acts.items():
    print(f"{m:<9} " + " ".join(f"{v[k]:>14}" for k in keys))
  print("\nwhere the time went (seconds):")
  print(time_table(results))
  summary = summarize(results, time.time() - start)
  summary["behaviour_seed0"] = acts
  if "dagger_minus_sft" in summary:
    g = summary["dagger_minus_sft"]
    print(f"\nlast round, seed {config.seed}: DAgger {100 * results['dagger'][0][-1]['eval_resolve_rate']:.1f}% "
          f"vs SFT {100 * results['sft'][0][-1]['eval_resolve_rate']:.1f}% on "
          f"{summary['heldout_tasks']} tasks: difference {100 * g['seed0']:+.1f} points, "
          f"s.e. {100 * g['se_seed0']:.1f}: {g['verdict_seed0']}")
  if seeds > 1:
    for m, v in summary["methods"].items():
      print(f"{m:<9} {100 * v['heldout_resolve']:5.1f}% +- {100 * v['std']:.1f} "
            f"(seeds: {', '.join(f'{100 * r:.1f}' for r in v['per_seed'])})")
    if "dagger_minus_sft" in summary:
      g = summary["dagger_minus_sft"]
      print(f"DAgger - SFT: {100 * g['mean']:+.1f} +- {100 * g['std']:.1f} points; DAgger ahead "
            f"on every seed: {g['dagger_ahead_every_seed']}")
  if make_plot:
    path = plot(results, root.plot)
    if path:
      print(f"plot: {path}")
  with open(root.summary, "w") as f:
    json.dump({"summary": summary, "rounds": results}, f, indent=1)
  print(f"TensorBoard: tensorboard --logdir {workdir}")
  print(json.dumps(summary))
  return summary


def _enable_compilation_cache(path: str) -> None:
  """XLA compilations persist across demo runs (a second run starts training at once)."""
  path = os.path.abspath(path)
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
