"""Collects DAgger episodes: a turn-level stochastic mix of student and teacher, labelled.

Episodes run in lockstep waves of `config.rollout.concurrency`, so the student samples one batch
per turn for the whole wave; sandbox commands, teacher calls and grading run in
`config.rollout.env_workers` threads, and what does not wait for the student (labels, and the
steps of teacher-coin turns) runs while it samples (`_turn`). At every turn of every episode:

    label    = teacher(state)                       (the teacher labels every visited state)
    coin     = U(0, 1) < beta                       (seeded by seed, episode and turn)
    proposal = student(state)                       (only when the coin says student)
    rule     = first intervention rule that fires on (proposal, label), if any
    executed = label if coin or rule else proposal

and the turn is recorded as `Turn(actor, action=executed, label, reason, intervention)`. With
`beta = 0` and no teacher this is the evaluation collector (the student alone).

Each wave's episodes are appended to `out_path` (JSON Lines) together, in one write, as soon as
the wave ends, so a crash loses at most the wave in flight; `collect` called again with the same
arguments skips those already there, and the episodes left form the same waves as before (the
student's batches, hence its numerics, are those of an uninterrupted run).
An episode whose sandbox fails (to start, in a step, or in grading) is logged, counted in
`failure_reasons` (`env:start`, `env:step`, `env:grade`) and left out, never fatal to the others. An
episode a policy cannot act on (a `LabelError`: the teacher's labels kept breaking the protocol,
or a remote teacher or rollout server failed every retry; for the student, every episode of its
batch) ends there, is written with `outcome.failure` = the error's message, and is counted in
`CollectStats.failure_reasons` by its reason; the others go on.

Only a submitted episode is graded. This is the convention of mini-swe-agent's SWE-bench runner
(mini-swe-agent 2.4.6, `minisweagent/run/benchmarks/swebench.py::process_instance`): it writes
`info["submission"]` of `DefaultAgent.run()` as the instance's `model_patch` in preds.json, and
`minisweagent/agents/default.py` sets that submission to "" on every stop that is not a submission
(`LimitsExceeded` at the step or cost limit, `TimeExceeded`, `RepeatedFormatError`, an uncaught
exception), so the harness grades an empty patch and the instance does not resolve, whatever the
working tree holds. Here an episode that ends on `max_turns` or `format_errors`:

    outcome.submitted = False
    outcome.resolved  = False     (None when grade=False), without running the grader
    outcome.patch     = the working tree's diff when it stopped, kept for inspection only;
                        it is not a submission: a SWE-bench prediction of it carries "", as
                        mini-swe-agent's preds.json would

so "resolved" never exceeds "submitted", and no grading sandbox is spent on unsubmitted episodes.
`CollectStats.resolve_rate` is resolved / episodes with a verdict (unsubmitted ones count as
unresolved), SWE-bench's "% resolved".
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import random
import time
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from dagger_jax import faults, paths, redact
from dagger_jax.dagger import intervention
from dagger_jax.data.trajectory import (Action, Outcome, Trajectory, TrajectoryError, Turn,
                                        append_lines, cut_torn_tail)
from dagger_jax.envs.swe import SweEnv
from dagger_jax.policies.base import EpisodeView, LabelError, Policy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CollectStats:
  episodes: int = 0
  failed: int = 0  # episodes lost to a sandbox / environment error
  skipped: int = 0  # already in the output file (resumed)
  submitted: int = 0
  resolved: int = 0
  graded: int = 0  # submitted patches run through the grader
  scored: int = 0  # episodes with a verdict: the graded ones and, when grading, the unsubmitted
  turns: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  interventions: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  exit_status: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  # Failed episodes (written as failed, or lost) by reason: "teacher:R" / "student:R" when that
  # policy raised a LabelError (R its `reason`: `policies.remote.REASONS`, "protocol",
  # "rejected", or "error"), "env:start" (the sandbox did not start), "env:grade" (the submission
  # could not be taken or graded). The loop stops a round where too many failed.
  failure_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  # Wall seconds the collecting thread waited on each phase: "open" (sandbox starts), "student"
  # (its batches), "teacher" and "env" (what is left of labels and steps once the student's batch
  # is done: they overlap it, see `_turn`), "finish" (diffs, grading), "close".
  seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @contextlib.contextmanager
  def timed(self, phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[phase] += time.perf_counter() - start

  def merge(self, other: "CollectStats") -> None:
    """Adds `other`'s counts to these (one round collected in several calls)."""
    for f in dataclasses.fields(self):
      mine, theirs = getattr(self, f.name), getattr(other, f.name)
      if isinstance(mine, collections.Counter):
        mine.update(theirs)
      else:
        setattr(self, f.name, mine + theirs)

  @property
  def resolve_rate(self) -> float:
    return self.resolved / self.scored if self.scored else 0.0

  def summary(self) -> dict[str, Any]:
    return {"episodes": self.episodes, "failed": self.failed, "skipped": self.skipped,
            "submitted": self.submitted, "graded": self.graded, "scored": self.scored,
            "resolved": self.resolved,
            "resolve_rate": self.resolve_rate, "turns": dict(self.turns),
            "interventions": dict(self.interventions), "exit_status": dict(self.exit_status),
            "failure_reasons": dict(self.failure_reasons),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


@dataclasses.dataclass
class _Episode:
  id: str
  task: dict
  seed: int
  env: SweEnv
  messages: list[dict[str, str]]
  assistant_ids: list[tuple[int, ...] | None] = dataclasses.field(default_factory=list)
  turns: list[Turn] = dataclasses.field(default_factory=list)
  teacher_calls: int = 0
  teacher_tokens: int = 0
  done: bool = False
  failure: str | None = None  # the LabelError that ended it (redacted)
  env_error: bool = False  # its sandbox failed mid-episode: left out, counted as env:step

  def view(self) -> EpisodeView:
    return EpisodeView(self.task, self.messages, self.assistant_ids, self.env, self.id)


def episode_id(task: dict, round_index: int, seed: int) -> str:
  return f"{task['instance_id']}/r{round_index}/s{seed}"


def _already_collected(path: str | None) -> set[str]:
  """Ids of the episodes already in `path`. A torn last line (a crash mid-write) is cut off, so
  that episode is collected again and appends start on a fresh line."""
  if not path or not paths.exists(path):
    return set()
  dropped = cut_torn_tail(path)  # a local file or a bucket's object (`dagger_jax.paths`)
  if dropped:
    log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", path,
                dropped)
  with paths.open(path, "rb") as f:
    data = f.read()
  keep = data.rfind(b"\n") + 1  # other processes than 0 do not cut: they skip the tail
  done = set()
  # Split on b"\n" only, as `iter_jsonl` reads: str.splitlines would also cut at U+2028 or NEL,
  # which `write_jsonl` (ensure_ascii=False) leaves raw inside a record.
  for n, line in enumerate(data[:keep].split(b"\n"), 1):
    if not line.strip():
      continue
    try:
      done.add(json.loads(line)["id"])
    except (ValueError, KeyError, TypeError) as e:  # JSON, UTF-8, not an object, no id
      raise TrajectoryError(f"{path}:{n}: not an episode record ({type(e).__name__}: {e}); move "
                            f"the file away to collect this round again") from None
  return done


def collect(tasks: Sequence[dict], *, config: Any, round_index: int, beta: float,
            teacher: Policy | None, student: Policy | None, seed: int = 0,
            out_path: str | None = None, grade: bool = True, tokenizer=None,
            interventions: Sequence[str] | None = None, progress: bool = True
            ) -> tuple[list[Trajectory], CollectStats]:
  """Runs one episode per task (see the module docstring); returns trajectories and stats.

  `grade`: grade the patch of each submitted episode (unsubmitted ones are unresolved without
  grading); False leaves every `outcome.resolved` None.
  """

  if beta > 0 and teacher is None:
    raise ValueError(f"beta={beta} needs a teacher")
  if beta < 1 and student is None:
    raise ValueError(f"beta={beta} needs a student")
  rules = tuple(config.dagger.interventions if interventions is None else interventions)
  if teacher is None:
    rules = ()
  stats = CollectStats()
  done_ids = _already_collected(out_path)
  todo = []
  for i, task in enumerate(tasks):
    eid = episode_id(task, round_index, seed + i)
    if eid in done_ids:
      stats.skipped += 1
    else:
      todo.append((eid, task, seed + i))
  out: list[Trajectory] = []
  wave = max(1, int(config.rollout.concurrency))
  workers = max(1, int(config.rollout.env_workers))
  bar = tqdm(total=len(todo), desc=f"collect r{round_index} beta={beta:.2f}", disable=not progress,
             dynamic_ncols=True)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, len(todo), wave):
      trajs = _run_wave(todo[start:start + wave], config, round_index, beta, teacher, student,
                        rules, pool, stats, grade, tokenizer)
      faults.point("collect_write")
      if out_path and trajs:  # the wave in one write: a resumed run re-forms the same waves
        append_lines(out_path, [json.dumps(t.to_dict()) for t in trajs])
      out += trajs
      bar.update(len(trajs))
  bar.close()
  return out, stats


def _open(eid: str, task: dict, seed: int, config: Any) -> _Episode:
  env = SweEnv(task, config.env)
  first = env.reset()
  return _Episode(eid, task, seed, env, [{"role": "system", "content": env.system_prompt},
                                         {"role": "user", "content": first}])


def _run_wave(items, config, round_index, beta, teacher, student, rules, pool, stats, grade,
              tokenizer) -> list[Trajectory]:
  opened = [pool.submit(_open, eid, task, s, config) for eid, task, s in items]
  episodes: list[_Episode] = []
  with stats.timed("open"):
    for (eid, _, _), fut in zip(items, opened):
      try:
        episodes.append(fut.result())
      except Exception as e:  # a sandbox that cannot start costs this episode only
        log.error("episode %s: could not start: %s", eid, e)
        stats.failed += 1
        stats.failure_reasons["env:start"] += 1
  try:
    while True:
      active = [e for e in episodes if not e.done]
      if not active:
        break
      _turn(active, config, beta, teacher, student, rules, pool, stats, tokenizer)
    out = []
    with stats.timed("finish"):
      finished = list(pool.map(lambda e: _finish(e, round_index, beta, grade), episodes))
    for e, traj in zip(episodes, finished):
      if traj is None:
        stats.failed += 1
        stats.failure_reasons["env:step" if e.env_error else "env:grade"] += 1
        continue
      stats.episodes += 1
      stats.submitted += int(traj.outcome.submitted)
      if traj.outcome.resolved is not None:
        stats.scored += 1
        stats.graded += int(traj.outcome.submitted)
        stats.resolved += int(traj.outcome.resolved)
      out.append(traj)
    return out
  finally:
    with stats.timed("close"):
      list(pool.map(lambda e: e.env.close(), episodes))


@dataclasses.dataclass
class _EnvFailure:
  error: Exception


def _step(e: _Episode, text: str):
  """`e.env.step(text)`, or an `_EnvFailure` when the sandbox fails (the episode is left out;
  a policy's or the collector's own error is not caught here)."""
  try:
    return e.env.step(text)
  except Exception as err:
    return _EnvFailure(err)


def _turn(active: list[_Episode], config, beta, teacher, student, rules, pool, stats,
          tokenizer) -> None:
  """One lockstep turn of every active episode, overlapped around the student's batch.

  The coins are drawn first (they do not depend on the labels), so whatever does not need the
  student runs in the worker threads while it samples: the labels, and for a teacher-coin episode
  its step too (label -> step chained in one task). Then each student-coin episode's turn is
  decided (proposal, label, rules) and stepped. Every episode still sees label, then step, on the
  same state, so the trajectories are those of running the phases one after another.

      worker threads:  [labels of student-coin episodes][label -> step of teacher-coin ones]
      this thread:     [student.act(student-coin episodes)] [rules] [steps of student-coin ones]
  """
  faults.point("collect_turn")
  coins = [random.Random(f"{e.seed}/{len(e.turns)}").random() < beta for e in active]
  student_idx = [i for i, c in enumerate(coins) if not c]

  def label(e: _Episode) -> Action | LabelError:
    try:
      return teacher.act([e.view()])[0]
    except LabelError as err:  # this episode ends (failed, with the reason); the others go on
      return err

  def label_and_step(e: _Episode):
    action = label(e)
    return action, None if isinstance(action, LabelError) else _step(e, action.text)

  labels: dict[int, concurrent.futures.Future] = {}  # student-coin episodes: the label
  chained: dict[int, concurrent.futures.Future] = {}  # teacher-coin episodes: (label, step)
  stepped: dict[int, concurrent.futures.Future] = {}  # student-coin episodes: step result
  executed: dict[int, tuple[Turn, str]] = {}
  try:
    if teacher is not None:  # the labels the student's turns wait for are queued first
      labels = {i: pool.submit(label, active[i]) for i in student_idx}
      chained = {i: pool.submit(label_and_step, e) for i, e in enumerate(active) if coins[i]}
    proposals: dict[int, Action] = {}
    student_failed: LabelError | None = None  # no answer for the batch: its episodes end
    if student_idx:
      with stats.timed("student"):
        try:
          proposals = dict(zip(student_idx,
                               student.act([active[i].view() for i in student_idx])))
        except LabelError as err:  # e.g. the rollout server failed every retry
          student_failed = err
    with stats.timed("teacher"):  # what is left of the labels; each step starts once decided
      for i in student_idx if student_failed is None else ():
        e, proposal = active[i], proposals[i]
        label_i = labels[i].result() if i in labels else None
        if isinstance(label_i, LabelError):
          continue  # no label for this state: the episode ends here
        rule = intervention.check(rules, e.view(), proposal.text, label_i.text,
                                  config.env) if label_i is not None else None
        if rule is not None:
          stats.interventions[rule] += 1
          executed[i] = (Turn("teacher", label_i, None, "intervention", rule), label_i.text)
        else:
          executed[i] = (Turn("student", proposal, label_i), proposal.text)
        stepped[i] = pool.submit(_step, e, executed[i][1])
  finally:  # after an error too: no worker may still use a sandbox when the wave closes them
    with stats.timed("env"):
      concurrent.futures.wait([*labels.values(), *chained.values(), *stepped.values()])
  for i, e in enumerate(active):
    if coins[i]:
      label_i, result = chained[i].result()
    else:
      label_i = labels[i].result() if i in labels else None
      result = stepped[i].result() if i in stepped else None
    if isinstance(result, _EnvFailure):  # its sandbox failed (e.g. the engine lost it)
      e.done = e.env_error = True
      log.error("episode %s: its sandbox failed at turn %d, the episode is left out: %s", e.id,
                len(e.turns), redact.redact_text(str(result.error)))
      continue
    actor, error = "teacher", label_i
    if not coins[i] and student_failed is not None:
      actor, error = "student", student_failed
    if isinstance(error, LabelError):  # its text is kept: nothing shaped like a key in it
      e.done, e.failure = True, redact.redact_text(str(error))
      reason = f"{actor}:{getattr(error, 'reason', 'error')}"
      log.error("episode %s: ended without %s at turn %d (%s): %s", e.id,
                "a label" if actor == "teacher" else "the student's action", len(e.turns),
                reason, e.failure)
      stats.exit_status["label_failed" if actor == "teacher" else "student_failed"] += 1
      stats.failure_reasons[reason] += 1
      continue
    if coins[i]:
      turn, text = Turn("teacher", label_i, None, "coin"), label_i.text
    else:
      (turn, text), result = executed[i], stepped[i].result()
    if label_i is not None:
      e.teacher_calls += 1
      e.teacher_tokens += (len(tokenizer.encode(label_i.text, add_special_tokens=False))
                           if tokenizer is not None else len(label_i.text.split()))
    e.turns.append(turn)
    stats.turns[turn.actor] += 1
    e.messages.append({"role": "assistant", "content": text})
    e.assistant_ids.append(turn.action.ids)
    if result.done:
      e.done = True
      stats.exit_status[result.info["exit_status"]] += 1
    else:
      e.messages.append({"role": "user", "content": result.observation})


def _finish(e: _Episode, round_index: int, beta: float, grade: bool) -> Trajectory | None:
  """The episode's trajectory; grades its patch only if it submitted (module docstring). None
  when its sandbox failed mid-episode or its grading failed: it is left out."""
  if e.env_error:
    return None
  submitted = e.env.exit_status == "submitted"
  try:
    patch = e.env.submission()  # taken at submission; else the working tree's diff now
  except Exception as err:
    if submitted:  # cannot happen in practice: the patch was taken when the agent submitted
      log.error("episode %s: could not take the submission: %s", e.id, err)
      return None
    log.warning("episode %s (%s): could not take the working tree's diff for inspection: %s",
                e.id, e.env.exit_status, err)
    patch = ""
  resolved = None
  if grade and not submitted:
    resolved = False  # an unsubmitted episode's model_patch is "": it cannot resolve
  elif grade:
    try:
      resolved = e.env.grade().resolved
    except Exception as err:
      log.error("episode %s: could not grade the submission: %s", e.id, err)
      return None
  outcome = Outcome(submitted=submitted, patch=patch, resolved=resolved, turns=len(e.turns),
                    teacher_calls=e.teacher_calls, teacher_tokens=e.teacher_tokens,
                    failure=e.failure)
  return Trajectory(id=e.id, task_id=e.task["instance_id"], round=round_index, seed=e.seed,
                    beta=float(beta), messages=tuple(e.messages), turns=tuple(e.turns),
                    outcome=outcome)
