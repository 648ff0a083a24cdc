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

Everything a run writes lives under `config.workdir`, laid out by `dagger_jax.rundir.RunDir`
(tasks, tokenizer, trajectories, shards, checkpoints, eval, metrics.jsonl, tensorboard, and
run.json, which records the config and the tokenizer directory).

Runs resume: a stage whose output is complete is skipped, a collection continues where its file
ends, training resumes from its last checkpoint. Killing a run loses at most the episodes in
flight and the steps since the last checkpoint.
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

from tensorboardX import SummaryWriter

from dagger_jax import policies
from dagger_jax.dagger import collector, schedule
from dagger_jax.data import shards as shards_lib
from dagger_jax.data import tokenizer as tokenizer_lib
from dagger_jax.data.trajectory import Trajectory, read_jsonl
from dagger_jax.envs import tasks as tasks_lib
from dagger_jax.envs.sandbox import check_available
from dagger_jax.envs.tasks import toy
from dagger_jax.errors import ConfigError
from dagger_jax.model import loader, reshard
from dagger_jax.model.params_io import model_from_params
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.policies.oracle import OracleTeacher
from dagger_jax.rundir import RunDir, parent_of
from dagger_jax.train import trainer

log = logging.getLogger(__name__)


def load_or_make_tasks(config: Any, workdir: str) -> tuple[list[dict], list[dict]]:
  """Training and evaluation tasks: from `config.tasks.{train,eval}_file`, or generated once.

  The evaluation tasks are the held-out ones (`config.dagger.eval_split="test"`), or the
  validation ones (`"validation"`: tasks of the test split drawn with another seed, none of them
  held out) on which a config is chosen, so that the held-out split is never tuned on.
  """
  t = config.tasks
  eval_split = config.dagger.eval_split
  if eval_split not in ("test", "validation"):
    raise ConfigError(f"config.dagger.eval_split={eval_split!r}: not 'test' or 'validation'")
  wanted = [("train", t.train_file, t.n_train, t.seed), ("eval", t.eval_file, t.n_eval, t.seed + 1)]
  if eval_split == "validation":
    wanted.append(("validation", "", t.n_eval, t.seed + 2))
  out = {}
  for split, file, n, seed in wanted:
    path = file or RunDir(workdir).tasks(split)
    if not os.path.exists(path):
      if file:
        raise ConfigError(f"config.tasks.{split}_file={file}: no such file")
      if t.source not in toy.FAMILIES:
        raise ConfigError(f"config.tasks.source={t.source!r}: generate the tasks first "
                          f"(dagger-jax tasks generate) and set config.tasks.{split}_file")
      split_name = "train" if split == "train" else "test"
      tasks = toy.generate(n + (n if split == "validation" else 0), seed, split=split_name,
                           family=t.source)
      if split == "validation":  # never a held-out task
        held_out = {x["instance_id"] for x in out["eval"]}
        tasks = [x for x in tasks if x["instance_id"] not in held_out][:n]
      tasks_lib.save_tasks(parent_of(path), tasks)
    out[split] = tasks_lib.load_tasks(path)
  return out["train"], out["validation" if eval_split == "validation" else "eval"]


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
    return read_jsonl(path), stats
  total = collector.CollectStats()
  while True:
    trajs = read_jsonl(path) if os.path.exists(path) else []
    labels = [len(t.turns) for t in trajs]
    have = sum(labels)
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


def evaluate(config, workdir, round_index, student, tokenizer, eval_tasks) -> dict:
  """The student alone (beta = 0, no teacher) on the held-out tasks; cached per round."""
  summary_path = parent_of(RunDir(workdir).eval_summary(round_index))
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      return json.load(f)
  tasks = eval_tasks[:config.dagger.eval_episodes]
  traj_path = parent_of(RunDir(workdir).eval_episodes(round_index))
  collector.collect(tasks, config=config, round_index=round_index, beta=0.0, teacher=None,
                    student=student, seed=10_000_000, out_path=traj_path, tokenizer=tokenizer)
  trajs = read_jsonl(traj_path)
  resolved = sum(bool(t.outcome.resolved) for t in trajs)
  summary = {"round": round_index, "episodes": len(trajs), "resolved": resolved,
             "resolve_rate": resolved / max(1, len(trajs)),
             "submitted": sum(t.outcome.submitted for t in trajs),
             "mean_turns": sum(t.outcome.turns for t in trajs) / max(1, len(trajs))}
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
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
  os.makedirs(workdir, exist_ok=True)
  d = config.dagger
  train_tasks, eval_tasks = load_or_make_tasks(config, workdir)
  betas = [schedule.beta(r, d) for r in range(d.rounds)]

  tokenizer = ensure_tokenizer(config, workdir, tokenizer_corpus(config, train_tasks, progress))
  run_dir = RunDir(workdir)
  run_dir.write_run_file(config, tokenizer_lib.files_dir(tokenizer))
  writer = SummaryWriter(run_dir.tensorboard)
  engine = policies.make_student(config, tokenizer, run_dir)
  metrics_path = run_dir.metrics
  done_rows: dict[int, dict] = {}
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
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
      shard = run_dir.shards(r)
      if not os.path.exists(os.path.join(shard, shards_lib.MANIFEST)):
        shards_lib.build_shards(trajs, tokenizer, config.data, shard, round=r)
      with open(os.path.join(shard, shards_lib.MANIFEST)) as f:
        round_tokens = json.load(f)["trained_tokens"]
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
      used_tasks += len(trajs)
      labels_before += labels
      teacher_turns = sum(t.actor == "teacher" for tr in trajs for t in tr.turns)
      row = {"round": r, "beta": beta, "labels_this_round": labels,
             "labels_cumulative": labels_before, "episodes_this_round": len(trajs),
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
             "teacher_calls": sum(t.outcome.teacher_calls for t in trajs),
             "teacher_usage": teacher.reset_stats(),
             "label_failures": sum(t.outcome.failure is not None for t in trajs),
             "collect_s": round(collect_s, 1), "render_s": round(render_s, 1),
             "train_s": round(train_s, 1),
             "eval_s": round(time.time() - t0 - collect_s - render_s - train_s, 1)}
      results.append(row)
      log.info("round %d: beta %.3f, %d labels (%d cumulative), eval resolved %s/%s; "
               "collect %.0f s, render %.0f s, train %.0f s, eval %.0f s", r, beta, labels,
               labels_before, ev["resolved"], ev["episodes"], collect_s, render_s, train_s,
               row["eval_s"])
      with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
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
