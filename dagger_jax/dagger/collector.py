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

Each finished episode is appended to `out_path` at once (JSON Lines), so a crash loses at most
the episodes in flight; `collect` called again with the same arguments skips those already there.
An episode whose sandbox fails is logged, counted and left out, never fatal to the others.

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
import os
import random
import time
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from dagger_jax import redact
from dagger_jax.dagger import intervention
from dagger_jax.data.trajectory import Action, Outcome, Trajectory, TrajectoryError, Turn
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

  def view(self) -> EpisodeView:
    return EpisodeView(self.task, self.messages, self.assistant_ids, self.env)


def episode_id(task: dict, round_index: int, seed: int) -> str:
  return f"{task['instance_id']}/r{round_index}/s{seed}"


def _already_collected(path: str | None) -> set[str]:
  """Ids of the episodes already in `path`. A torn last line (a crash mid-write) is cut off, so
  that episode is collected again and appends start on a fresh line."""
  if not path or not os.path.exists(path):
    return set()
  with open(path, "rb+") as f:
    data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
      log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path,
                  len(data) - keep)
      f.truncate(keep)
  done = set()
  for n, line in enumerate(data[:keep].decode().splitlines(), 1):
    try:
      done.add(json.loads(line)["id"])
    except (json.JSONDecodeError, KeyError) as e:
      raise TrajectoryError(f"{path}:{n}: not an episode record ({e}); move the file away to "
                            f"collect this round again") from None
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
      for traj in _run_wave(todo[start:start + wave], config, round_index, beta, teacher, student,
                            rules, pool, stats, grade, tokenizer):
        out.append(traj)
        if out_path:
          with open(out_path, "a") as f:
            f.write(json.dumps(traj.to_dict()) + "\n")
        bar.update(1)
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
  try:
    while True:
      active = [e for e in episodes if not e.done]
      if not active:
        break
      _turn(active, config, beta, teacher, student, rules, pool, stats, tokenizer)
    out = []
    with stats.timed("finish"):
      finished = list(pool.map(lambda e: _finish(e, round_index, beta, grade), episodes))
    for traj in finished:
      if traj is None:
        stats.failed += 1
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
  coins = [random.Random(f"{e.seed}/{len(e.turns)}").random() < beta for e in active]
  student_idx = [i for i, c in enumerate(coins) if not c]

  def label(e: _Episode) -> Action | LabelError:
    try:
      return teacher.act([e.view()])[0]
    except LabelError as err:  # this episode ends (failed, with the reason); the others go on
      return err

  def label_and_step(e: _Episode):
    action = label(e)
    return action, None if isinstance(action, LabelError) else e.env.step(action.text)

  labels: dict[int, concurrent.futures.Future] = {}  # student-coin episodes: the label
  chained: dict[int, concurrent.futures.Future] = {}  # teacher-coin episodes: (label, step)
  stepped: dict[int, concurrent.futures.Future] = {}  # student-coin episodes: step result
  executed: dict[int, tuple[Turn, str]] = {}
  try:
    if teacher is not None:  # the labels the student's turns wait for are queued first
      labels = {i: pool.submit(label, active[i]) for i in student_idx}
      chained = {i: pool.submit(label_and_step, e) for i, e in enumerate(active) if coins[i]}
    proposals: dict[int, Action] = {}
    if student_idx:
      with stats.timed("student"):
        proposals = dict(zip(student_idx, student.act([active[i].view() for i in student_idx])))
    with stats.timed("teacher"):  # what is left of the labels; each step starts once decided
      for i in student_idx:
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
        stepped[i] = pool.submit(e.env.step, executed[i][1])
  finally:  # after an error too: no worker may still use a sandbox when the wave closes them
    with stats.timed("env"):
      concurrent.futures.wait([*labels.values(), *chained.values(), *stepped.values()])
  for i, e in enumerate(active):
    if coins[i]:
      label_i, result = chained[i].result()
    else:
      label_i = labels[i].result() if i in labels else None
    if isinstance(label_i, LabelError):  # its text is kept: nothing shaped like a key in it
      e.done, e.failure = True, redact.redact_text(str(label_i))
      log.error("episode %s: ended without a label at turn %d: %s", e.id, len(e.turns), e.failure)
      stats.exit_status["label_failed"] += 1
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
  """The episode's trajectory; grades its patch only if it submitted (module docstring)."""
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
