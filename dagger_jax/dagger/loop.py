"""DAgger rounds: collect -> aggregate -> train -> sync weights -> evaluate.

    summary = run(config)            # or: dagger-jax dagger --config configs/demo.py

Round r (beta_r from `schedule.beta`):
  1. collect `config.dagger.episodes_per_round` episodes on training tasks, the teacher acting
     with probability beta_r at each turn (and by intervention rules), labelling every state;
  2. render them into the round's shard (`<workdir>/shards/round_r`);
  3. train on the aggregate, shards 0..r, continuing from round r-1's checkpoint
     (`config.train.continue_from`);
  4. hand the new params to the student's engine (`policies.make_student`: in process, or an
     SGLang server whose weights are updated) and evaluate it alone (beta = 0, no teacher) on
     held-out tasks.

The teacher is `policies.make_teacher(config)`: the scripted oracle, or any OpenAI-compatible
endpoint; its calls and tokens are counted per round in metrics.jsonl (`teacher_usage`).

Failed episodes (`collector`: a policy could not act on them after its retries, or their sandbox
failed) never reach a shard: a round trains only on episodes whose every state got its label.
The round's metrics row counts them (`failed_episodes`, `failure_rate`, `failure_reasons`). When
more than `config.rollout.max_failure_rate` of a round's episodes (or of an evaluation's) failed,
the round stops with `RoundFailedError` before it trains (evaluates) on what is left, a biased
sample; the failed episodes are moved to `<file>.failed.jsonl` beside the round's file, so that
running the same command again, once the fault is gone, keeps every episode collected and
collects only the failed ones again.

Everything a run writes lives under `config.workdir`, laid out by `dagger_jax.rundir.RunDir`
(tasks, tokenizer, trajectories, shards, checkpoints, eval, metrics.jsonl, tensorboard, and
run.json, which records the config and the tokenizer directory).

Runs resume: a stage whose output is complete is skipped, a collection continues where its file
ends, training resumes from its last checkpoint. Killing a run loses at most the episodes in
flight and the steps since the last checkpoint, and the resumed run ends where an uninterrupted
one with the same seed ends: the same episodes, shards, metrics rows (timings aside) and, on CPU,
bitwise the same params (`benchmarks/fault_injection.py` kills it at the `dagger_jax.faults`
points and at random moments to check). Every file a later stage trusts is whole or absent: waves
of episodes and metrics rows are appended in one write (a torn last line is cut on resume),
shards, checkpoints and evaluation summaries are written aside and renamed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable

from dagger_jax import faults, paths, policies
from dagger_jax.dagger import collector, schedule
from dagger_jax.data import shards as shards_lib
from dagger_jax.data import tokenizer as tokenizer_lib
from dagger_jax.data.trajectory import Trajectory, append_lines, cut_torn_tail, read_jsonl
from dagger_jax.envs import tasks as tasks_lib
from dagger_jax.envs.sandbox import check_available
from dagger_jax.envs.tasks import sources as task_sources
from dagger_jax.envs.tasks import toy
from dagger_jax.errors import ConfigError, DaggerJaxError
from dagger_jax.model import loader, reshard
from dagger_jax.model.params_io import model_from_params
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.policies.oracle import OracleTeacher
from dagger_jax.rundir import RunDir, parent_of
from dagger_jax.train import trainer

log = logging.getLogger(__name__)


def load_or_make_tasks(config: Any, workdir: str) -> tuple[list[dict], list[dict]]:
  """Training and evaluation tasks: from `config.tasks.{train,eval}_file`, or generated once.

  A `*_file` (and a `config.tasks.source` that is neither a toy family nor pypi:NAME, which
  gives the training tasks) is a tasks file or a Hugging Face dataset NAME[:SPLIT]
  (`envs/tasks/sources.py`); rows without a repository source run in their swebench instance
  image (`config.tasks.{train,eval}_images`). A dataset's rows are also written to the run's
  tasks folder, the record of what was trained and evaluated on.

  The evaluation tasks are the held-out ones (`config.dagger.eval_split="test"`), or the
  validation ones (`"validation"`: tasks of the test split drawn with another seed, none of them
  held out) on which a config is chosen, so that the held-out split is never tuned on. Training
  tasks that are SWE-bench Verified instances or evaluation tasks are refused
  (`config.tasks.allow_held_out_training` overrides).
  """
  t = config.tasks
  eval_split = config.dagger.eval_split
  if eval_split not in ("test", "validation"):
    raise ConfigError(f"config.dagger.eval_split={eval_split!r}: not 'test' or 'validation'")
  wanted = [("train", t.train_file, t.n_train, t.seed), ("eval", t.eval_file, t.n_eval, t.seed + 1)]
  if eval_split == "validation":
    wanted.append(("validation", "", t.n_eval, t.seed + 2))
  generated = t.source in toy.FAMILIES or t.source.startswith("pypi:")
  for split, file, _, _ in wanted:  # before a dataset is loaded, maybe over the network
    if (file or t.source in toy.FAMILIES or (split == "train" and not generated)
        or os.path.exists(RunDir(workdir).tasks(split))):
      continue
    fix = {"eval": "set config.tasks.eval_file (e.g. princeton-nlp/SWE-bench_Verified:test)",
           "train": "set config.tasks.train_file",
           "validation": "validation tasks are drawn from a toy family only: evaluate on "
                         "config.tasks.eval_file with config.dagger.eval_split='test'"}[split]
    raise ConfigError(f"config.tasks.source={t.source!r}: no {split} tasks; {fix} "
                      "(pypi:NAME tasks are made by `dagger-jax tasks generate`)")
  out, where = {}, {}
  for split, file, n, seed in wanted:
    key, spec = f"config.tasks.{split}_file", file
    if not spec and split == "train" and not generated:
      key, spec = "config.tasks.source", t.source
    if spec:
      out[split] = task_sources.load(
          spec, key=key, default_split="train" if split == "train" else "test",
          images=t.get("train_images" if split == "train" else "eval_images", ""),
          repo_template=t.get("repo_template", ""))
      where[split] = f"{key}={spec}"
      if not task_sources.is_task_file(spec):
        tasks_lib.save_tasks(parent_of(RunDir(workdir).tasks(split)), out[split])
      continue
    path = RunDir(workdir).tasks(split)
    if not os.path.exists(path):  # a toy family (checked above)
      split_name = "train" if split == "train" else "test"
      tasks = toy.generate(n + (n if split == "validation" else 0), seed, split=split_name,
                           family=t.source)
      if split == "validation":  # never a held-out task
        held_out = {x["instance_id"] for x in out["eval"]}
        tasks = [x for x in tasks if x["instance_id"] not in held_out][:n]
      tasks_lib.save_tasks(parent_of(path), tasks)
    out[split] = tasks_lib.load_tasks(path)
    where[split] = path
  evaluation = out["validation" if eval_split == "validation" else "eval"]
  task_sources.refuse_held_out(out["train"], where=where["train"],
                               eval_tasks=out["eval"] + out.get("validation", []),
                               allow=bool(t.get("allow_held_out_training", False)))
  return out["train"], evaluation


def _round_tasks(tasks: list[dict], start: int, n: int) -> list[dict]:
  """The n tasks after the first `start` a run has used, cycling through the training set."""
  return [tasks[(start + i) % len(tasks)] for i in range(n)]


def ensure_tokenizer(config: Any, workdir: str, corpus: Callable[[], list[str]]):
  """The tokenizer; the demo BPE is trained once on `corpus()` (task files and teacher episodes)."""
  if config.data.tokenizer == "demo-bpe":
    path = RunDir(workdir).tokenizer
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
      log.info("training the demo BPE tokenizer (vocab %d)", config.model.vocab_size)
      tokenizer_lib.train_demo_tokenizer(corpus(), path, vocab_size=config.model.vocab_size)
  tok = tokenizer_lib.load_tokenizer(config.data, workdir)
  if len(tok) > config.model.vocab_size:
    raise ConfigError(f"the tokenizer has {len(tok)} tokens but config.model.vocab_size="
                      f"{config.model.vocab_size}")
  return tok


def tokenizer_corpus(config: Any, train_tasks: list[dict],
                     progress: bool = True) -> Callable[[], list[str]]:
  """What the demo tokenizer learns from: what it will see, i.e. teacher-only episodes on
  training tasks (up to 32, ungraded) and the tasks' repository files."""

  def corpus() -> list[str]:
    tasks = _round_tasks(train_tasks, 0, min(config.dagger.episodes_per_round, 32))
    trajs, _ = collector.collect(tasks, config=config, round_index=0, beta=1.0,
                                 teacher=OracleTeacher(), student=None, grade=False,
                                 progress=progress)
    texts = [m["content"] for t in trajs for m in t.messages]
    texts += [text for t in train_tasks for text in (t.get("repo_files") or {}).values()]
    return texts

  return corpus


def _collect_round(config, workdir, round_index, beta, train_tasks, start, teacher, student,
                   tokenizer, label_target=None):
  """Round r's episodes, in order: `config.dagger.episodes_per_round` of them, or, with a label
  budget, the shortest prefix of episodes whose teacher labels reach `label_target`.

  With a budget the episodes are collected in waves: a first estimate from the labels per
  episode seen so far (this round, else `config.env.max_turns`), then top-ups, so a method whose
  episodes are short (teacher-only) runs more of them. Every episode is appended to the round's
  file as it finishes; the prefix is a function of that file, so a resumed round keeps the same
  episodes. Returns (trajectories kept, stats of this process's collection).
  """
  path = parent_of(RunDir(workdir).trajectories(round_index))
  seed = config.seed * 1_000_003 + round_index * 10_007
  kw = dict(config=config, round_index=round_index, beta=beta, teacher=teacher, student=student,
            out_path=path, tokenizer=tokenizer, grade=True)
  if label_target is None:
    n = int(config.dagger.episodes_per_round)
    _, stats = collector.collect(_round_tasks(train_tasks, start, n), seed=seed, **kw)
    paths.barrier(f"collected_{round_index}")  # multi-host: process 0 wrote the file
    return read_jsonl(path), stats
  total = collector.CollectStats()
  before = None
  while True:
    cut_torn_tail(path)  # a killed append's last line (the collector cuts it too, later)
    paths.barrier(f"collected_{round_index}")  # multi-host: process 0 wrote the file
    trajs = read_jsonl(path) if paths.exists(path) else []
    labels = [0 if t.outcome.failure else len(t.turns) for t in trajs]  # failed: never trained
    have = sum(labels)
    if have == before:  # the last wave brought no label: stop here if too many failed
      check_failures(config, path, total, f"round {round_index}")
    before = have
    if have >= label_target:
      keep, acc = 0, 0
      while acc < label_target:
        acc += labels[keep]
        keep += 1
      kept = trajs[:keep]
      if acc > label_target:  # stop the last episode at the budget: its first k labelled states
        kept[-1] = _first_turns(kept[-1], labels[keep - 1] - (acc - label_target))
      return kept, total
    per_episode = have / len(trajs) if trajs else float(config.env.max_turns)
    n = max(1, math.ceil((label_target - have) / max(per_episode, 1.0)))
    n = min(n, max(1, int(config.rollout.concurrency)))
    _, stats = collector.collect(_round_tasks(train_tasks, start + len(trajs), n),
                                 seed=seed + len(trajs), **kw)
    total.merge(stats)


def _first_turns(traj: Trajectory, k: int) -> Trajectory:
  """The trajectory cut after its k-th assistant turn: the states it visited up to there, each
  with its label (what is trained is unchanged for those turns; the outcome is the episode's)."""
  return dataclasses.replace(traj, turns=traj.turns[:k], messages=traj.messages[:1 + 2 * k])


class RoundFailedError(DaggerJaxError, RuntimeError):
  """More than `config.rollout.max_failure_rate` of a round's episodes failed (module doc)."""


def check_failures(config, path: str, stats: collector.CollectStats, what: str) -> dict:
  """The failed episodes among those in `path` and those this process lost (`stats.failed`: not
  written), as the metrics row's fields. Raises RoundFailedError, after moving the failed ones
  aside (`set_aside`), when their share exceeds `config.rollout.max_failure_rate`.

  Reasons come from `stats.failure_reasons`; failed episodes in `path` that this process did not
  collect (a round resumed after a crash) count under "earlier_run" (their messages are in the
  file's `outcome.failure`).
  """
  trajs = read_jsonl(path) if paths.exists(path) else []
  failed = [t for t in trajs if t.outcome.failure is not None]
  reasons = collections.Counter(stats.failure_reasons)
  earlier = len(failed) - sum(n for k, n in reasons.items() if not k.startswith("env:"))
  if earlier > 0:
    reasons["earlier_run"] += earlier
  n_failed, attempted = len(failed) + stats.failed, len(trajs) + stats.failed
  rate = n_failed / attempted if attempted else 0.0
  limit = float(config.rollout.max_failure_rate)
  if rate > limit:
    aside = set_aside(path, {t.id for t in failed})
    by_reason = ", ".join(f"{k} {n}" for k, n in reasons.most_common())
    example = f"; e.g. {failed[0].outcome.failure[:400]!r}" if failed else " (see the log)"
    raise RoundFailedError(
        f"{what}: {n_failed} of {attempted} episodes failed ({rate:.0%} > "
        f"config.rollout.max_failure_rate={limit:g}; by reason: {by_reason}){example}. Stopped "
        f"before using what is left, a biased sample. Fix the fault and run the same command "
        f"again: the {len(trajs) - len(failed)} other episode(s) collected are kept and the "
        f"failed ones are collected again (they were moved to {aside}); or raise "
        f"config.rollout.max_failure_rate")
  return {"failed_episodes": n_failed, "failure_rate": round(rate, 4),
          "failure_reasons": dict(reasons.most_common())}


def set_aside(path: str, ids: set[str]) -> str:
  """Moves the episodes `ids` of the JSON Lines file `path` to `<name>.failed.jsonl` beside it
  (appended: earlier failures stay), so that `collector.collect` runs them again; returns that
  file. The failed ones are written there first, then `path` is rewritten without them whole."""
  aside = (path[:-len(".jsonl")] if path.endswith(".jsonl") else path) + ".failed.jsonl"
  if not ids or not paths.is_chief():
    return aside
  keep, move = [], []
  for line in paths.read_text(path).splitlines(keepends=True):
    if line.strip():
      (move if json.loads(line)["id"] in ids else keep).append(line)
  paths.append(aside, "".join(move))
  paths.write_atomic(path, "".join(keep))  # a crash before this: moved again, no loss
  return aside


def evaluate(config, workdir, round_index, student, tokenizer, eval_tasks) -> dict:
  """The student alone (beta = 0, no teacher) on the held-out tasks; cached per round."""
  summary_path = parent_of(RunDir(workdir).eval_summary(round_index))
  if paths.exists(summary_path):
    return json.loads(paths.read_text(summary_path))
  faults.point("evaluate")
  tasks = eval_tasks[:config.dagger.eval_episodes]
  traj_path = parent_of(RunDir(workdir).eval_episodes(round_index))
  _, stats = collector.collect(tasks, config=config, round_index=round_index, beta=0.0,
                               teacher=None, student=student, seed=10_000_000,
                               out_path=traj_path, tokenizer=tokenizer)
  paths.barrier(f"evaluated_{round_index}")  # multi-host: process 0 wrote the file
  failures = check_failures(config, traj_path, stats, f"round {round_index}'s evaluation")
  trajs = [t for t in read_jsonl(traj_path) if t.outcome.failure is None]  # scored: the rest
  resolved = sum(bool(t.outcome.resolved) for t in trajs)
  summary = {"round": round_index, "episodes": len(trajs), "resolved": resolved,
             "failed": failures["failed_episodes"],
             "resolve_rate": resolved / max(1, len(trajs)),
             "submitted": sum(t.outcome.submitted for t in trajs),
             "mean_turns": sum(t.outcome.turns for t in trajs) / max(1, len(trajs))}
  if paths.is_chief():  # whole or absent: a cached summary is trusted
    paths.write_atomic(summary_path, json.dumps(summary, indent=1))
  return summary


def acting_model(config, workdir, round_index):
  """The student acting in round r: round r-1's last checkpoint, for round 0 the base model
  (`config.model.init_from`: HF or Orbax) or a random init from `config.seed` (the model round 0's
  training starts from; equal up to jit rounding)."""

  model_config = Qwen3Config.from_config(config.model)
  source = (RunDir(workdir).checkpoints(round_index - 1) if round_index > 0
            else config.model.init_from)
  return loader.load_model(source, model_config, seed=int(config.seed))


def weights_version(round_index: int) -> str:
  """The name of the student weights trained in round r (`-1`: the base model round 0 acts
  with); a rollout server loads and reports this version."""
  return "base" if round_index < 0 else f"round_{round_index:03d}"


def _evaluated(config, round_index: int) -> bool:
  """Whether round r is evaluated: every `config.dagger.eval_every`-th round, and the last."""
  every = int(config.dagger.eval_every)
  if every < 1:
    raise ConfigError(f"config.dagger.eval_every={every}: must be >= 1")
  return round_index % every == 0 or round_index == int(config.dagger.rounds) - 1


def _label_target(config, round_index: int) -> int | None:
  """Cumulative teacher labels round r must reach (`config.dagger.label_budget`), if set."""
  budget = tuple(config.dagger.label_budget)
  if not budget:
    return None
  if len(budget) != int(config.dagger.rounds):
    raise ConfigError(f"config.dagger.label_budget has {len(budget)} entries for "
                      f"config.dagger.rounds={config.dagger.rounds}: give one cumulative label "
                      f"count per round")
  return int(budget[round_index])


def run(config: Any, *, progress: bool = True) -> list[dict]:
  """Runs (or resumes) every round in `config.workdir`; returns one metrics dict per round."""
  check_available(config.env)  # a missing tool fails the run here, not once per episode
  teacher = policies.make_teacher(config)  # a bad teacher config fails here too
  if config.rollout.engine == "jax" and config.rollout.mesh:
    reshard.rollout_mesh(config)  # and a bad rollout mesh
  workdir = config.workdir
  paths.makedirs(workdir)
  d = config.dagger
  train_tasks, eval_tasks = load_or_make_tasks(config, workdir)
  betas = [schedule.beta(r, d) for r in range(d.rounds)]

  tokenizer = ensure_tokenizer(config, workdir, tokenizer_corpus(config, train_tasks, progress))
  run_dir = RunDir(workdir)
  run_dir.write_run_file(config, tokenizer_lib.files_dir(tokenizer))
  writer = paths.summary_writer(run_dir.tensorboard, chief_only=True)
  engine = policies.make_student(config, tokenizer, run_dir)
  metrics_path = run_dir.metrics
  done_rows: dict[int, dict] = {}
  if paths.exists(metrics_path):
    if cut_torn_tail(metrics_path):  # killed while appending a row: that round is redone
      log.warning("%s: dropped a torn last row left by an interrupted run", metrics_path)
    with paths.open(metrics_path, "r") as f:
      done_rows = {row["round"]: row for row in map(json.loads, filter(str.strip, f))}
  model = None  # the student after the last round trained in this process
  results = []
  used_tasks, labels_before, trained_tokens = 0, 0, 0
  try:
    for r, beta in enumerate(betas):
      if r in done_rows:  # finished before (resumed run): its checkpoint feeds round r+1
        row = done_rows[r]
        results.append(row)
        used_tasks += row.get("episodes_this_round", d.episodes_per_round)
        labels_before += row["labels_this_round"]
        trained_tokens = row.get("trained_tokens_aggregate", 0)
        model = None
        log.info("round %d: done before (%s)", r, metrics_path)
        continue
      t0 = time.time()
      student = None
      if beta < 1:
        student = engine.policy(model or acting_model(config, workdir, r),
                                weights_version(r - 1))
      target = _label_target(config, r)
      trajs, stats = _collect_round(config, workdir, r, beta, train_tasks, used_tasks, teacher,
                                    student, tokenizer,
                                    None if target is None else target - labels_before)
      collect_s = time.time() - t0
      failures = check_failures(config, run_dir.trajectories(r), stats, f"round {r}")
      failed_trajs = [t for t in trajs if t.outcome.failure is not None]
      trajs = [t for t in trajs if t.outcome.failure is None]  # a missing label is never trained
      shard = run_dir.shards(r)
      manifest = paths.join(shard, shards_lib.MANIFEST)
      if paths.is_chief() and not paths.exists(manifest):  # multi-host: one writes, all read
        shards_lib.build_shards(trajs, tokenizer, config.data, shard, round=r)
      paths.barrier(f"shard_{r}")
      round_tokens = json.loads(paths.read_text(manifest))["trained_tokens"]
      trained_tokens += round_tokens
      render_s = time.time() - t0 - collect_s
      result = trainer.train(config, [run_dir.shards(i) for i in range(r + 1)],
                             workdir=workdir, round_index=r, progress=progress,
                             log=lambda m: log.info("%s", m))
      model = model_from_params(Qwen3Config.from_config(config.model), result.state.params)
      train_s = time.time() - t0 - collect_s - render_s
      ev = {"resolve_rate": None, "resolved": None, "episodes": None, "submitted": None}
      if _evaluated(config, r):
        ev = evaluate(config, workdir, r, engine.policy(model, weights_version(r)), tokenizer,
                      eval_tasks)
      labels = sum(len(t.turns) for t in trajs)
      episodes = len(trajs) + len(failed_trajs)  # the failed ones used their tasks too
      used_tasks += episodes
      labels_before += labels
      teacher_turns = sum(t.actor == "teacher" for tr in trajs for t in tr.turns)
      row = {"round": r, "beta": beta, "labels_this_round": labels,
             "labels_cumulative": labels_before, "episodes_this_round": episodes,
             "teacher_acted": teacher_turns, "student_acted": labels - teacher_turns,
             "trained_tokens_round": round_tokens,
             "trained_tokens_aggregate": trained_tokens, "steps": int(config.train.steps),
             "train_loss": result.history[-1]["loss"] if result.history else None,
             "train_resolved": sum(bool(t.outcome.resolved) for t in trajs),
             "train_submitted": sum(bool(t.outcome.submitted) for t in trajs),
             "interventions": dict(collections.Counter(
                 t.intervention for tr in trajs for t in tr.turns if t.intervention)),
             "eval_resolve_rate": ev["resolve_rate"], "eval_resolved": ev["resolved"],
             "eval_episodes": ev["episodes"], "eval_submitted": ev["submitted"],
             "eval_split": config.dagger.eval_split, "collect": stats.summary(),
             "teacher_calls": sum(t.outcome.teacher_calls for t in trajs + failed_trajs),
             "teacher_usage": teacher.reset_stats(),
             "label_failures": len(failed_trajs), **failures,
             "collect_s": round(collect_s, 1), "render_s": round(render_s, 1),
             "train_s": round(train_s, 1),
             "eval_s": round(time.time() - t0 - collect_s - render_s - train_s, 1)}
      results.append(row)
      log.info("round %d: beta %.3f, %d labels (%d cumulative), eval resolved %s/%s; "
               "collect %.0f s, render %.0f s, train %.0f s, eval %.0f s", r, beta, labels,
               labels_before, ev["resolved"], ev["episodes"], collect_s, render_s, train_s,
               row["eval_s"])
      append_lines(metrics_path, [json.dumps(row)])
      writer.add_scalar("dagger/beta", beta, r)
      if ev["resolve_rate"] is not None:
        writer.add_scalar("dagger/eval_resolve_rate", ev["resolve_rate"], r)
      writer.add_scalar("dagger/labels_this_round", labels, r)
      writer.add_scalar("dagger/labels_cumulative", labels_before, r)
      for k, v in row["interventions"].items():
        writer.add_scalar(f"dagger/interventions/{k}", v, r)
  finally:
    engine.close()
    writer.close()
  return results
