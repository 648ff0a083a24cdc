"""The collector's resolve convention, on real toy tasks in the real bubblewrap sandbox: only a
submitted episode is graded (mini-swe-agent's SWE-bench runner writes model_patch "" for an
episode that stops on a limit), so an episode cut at max_turns never resolves, even with the fix
in its working tree. Also the intervention rules, whose tests need episodes long enough for the
teacher to reach its submit."""

import os

import jax
import pytest

import support
from dagger_jax.dagger import collector
from dagger_jax.data.tokenizer import load_tokenizer_dir
from dagger_jax.data.trajectory import Action
from dagger_jax.envs import grading, protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.policies.base import Policy
from dagger_jax.policies.jax_policy import JaxPolicy
from dagger_jax.policies.oracle import OracleTeacher
from dagger_jax.model.loader import init_model


@pytest.fixture(scope="module")
def tasks():
  return toy.generate(2, 11, split="train")


@pytest.fixture
def config():
  return support.config(2, 2, max_turns=2)


class FixThenMaybeSubmit(Policy):
  """Turn 1 applies the task's gold patch with `git apply`; turn 2 submits for the tasks named in
  `submit_ids` and runs `git status` for the others (which then stop at max_turns = 2)."""

  name = "student"

  def __init__(self, submit_ids=()):
    self.submit_ids = set(submit_ids)

  def act(self, views):
    actions = []
    for v in views:
      if not any(m["role"] == "assistant" for m in v.messages):
        command = f"git apply <<'PATCH_EOF'\n{v.task['patch']}PATCH_EOF"
      elif v.task["instance_id"] in self.submit_ids:
        command = f"echo {protocol.SUBMIT_SENTINEL}"
      else:
        command = "git status --short"
      text = protocol.format_action(command, "THOUGHT: scripted.")
      actions.append(Action(text, tuple(text.encode())))
    return actions


@pytest.fixture
def grade_calls(monkeypatch):
  """Counts the patches `grading.grade` is asked to grade (the real grader still runs)."""
  calls = []
  real = grading.grade

  def counting(task, patch, *args, **kwargs):
    calls.append(task["instance_id"])
    return real(task, patch, *args, **kwargs)

  monkeypatch.setattr(grading, "grade", counting)
  return calls


def test_only_submitted_episodes_are_graded(tasks, config, grade_calls):
  """Both episodes fix the bug; only the first submits. The second stops at max_turns: it is not
  graded and does not resolve, although grading its working-tree diff would resolve it."""
  submitter, quitter = tasks[0]["instance_id"], tasks[1]["instance_id"]
  trajs, stats = collector.collect(tasks, config=config, round_index=0, beta=0.0, teacher=None,
                                   student=FixThenMaybeSubmit({submitter}), progress=False)
  by_task = {t.task_id: t for t in trajs}
  assert stats.episodes == 2 and stats.failed == 0
  assert dict(stats.exit_status) == {"submitted": 1, "max_turns": 1}
  assert (stats.submitted, stats.graded, stats.resolved, stats.scored) == (1, 1, 1, 2)
  assert stats.resolve_rate == 0.5 and stats.summary()["scored"] == 2
  assert grade_calls == [submitter]  # no grading sandbox spent on the unsubmitted episode

  sub, cut = by_task[submitter].outcome, by_task[quitter].outcome
  assert sub.submitted and sub.resolved and sub.turns == 2
  assert not cut.submitted and cut.resolved is False and cut.turns == 2
  # The diff stays in the trajectory for inspection, but it is not the episode's prediction,
  # and grading it would have resolved the task (the old rule counted this as resolved).
  assert _fixed_in_tree(tasks[1], cut.patch)
  assert grading.grade(tasks[1], cut.patch, grading.sandbox_factory(config.env)).resolved


def test_without_grading_nothing_gets_a_verdict(tasks, config, grade_calls):
  trajs, stats = collector.collect(tasks, config=config, round_index=0, beta=0.0, teacher=None,
                                   student=FixThenMaybeSubmit({tasks[0]["instance_id"]}),
                                   grade=False, progress=False)
  assert [t.outcome.resolved for t in trajs] == [None, None] and grade_calls == []
  assert (stats.submitted, stats.graded, stats.scored, stats.resolve_rate) == (1, 0, 0, 0.0)


# ----------------------------------------------------------------------------- interventions
# The student only ever proposes `ls` or malformed text; the rules hand enough turns to the
# teacher that it fixes, tests and submits within max_turns (a student `ls` between its passing
# test run and its submit does not make it test again: `ls` only reads).


@pytest.fixture(scope="module")
def oracle_tasks():
  return toy.generate(3, 3, split="train")


@pytest.fixture
def demo_config3():
  return support.config()


def _fixed_in_tree(task, patch: str) -> bool:
  """Whether the working-tree diff holds every line the gold patch adds."""
  added = [line for line in task["patch"].splitlines()
           if line.startswith("+") and not line.startswith("+++")]
  return bool(added) and all(line in patch.splitlines() for line in added)


_cmd, Scripted = support.command, support.Scripted


def test_student_turns_are_labelled_and_interventions_keep_episodes_going(oracle_tasks,
                                                                          demo_config3):
  """beta = 0 with a student that only ever runs `ls`: the first `ls` is the student's (with the
  teacher's label beside it), every repeat is taken over by the teacher (repeat_command), so the
  episode still makes progress: the teacher fixes the bug, tests and submits, and it resolves."""
  student = Scripted(_cmd("ls"))
  trajs, stats = collector.collect(oracle_tasks, config=demo_config3, round_index=1, beta=0.0,
                                   teacher=OracleTeacher(), student=student, progress=False)
  assert stats.episodes == 3 and stats.resolved == 3
  assert stats.interventions["repeat_command"] > 0
  for t in trajs:
    for k, turn in enumerate(t.turns):
      if turn.actor == "student":
        assert turn.action.text == student.text
        assert turn.label is not None and turn.label.text != student.text
      else:
        assert turn.reason == "intervention" and turn.intervention == "repeat_command"
        assert turn.label is None
        # the turn before ran `ls` (student) and this proposal was `ls` again
        assert protocol.parse_action(t.messages[2 + 2 * (k - 1)]["content"]).command == "ls"
    assert any(turn.actor == "student" for turn in t.turns)
    assert t.outcome.teacher_calls == len(t.turns)


def test_format_errors_rule_takes_over_before_the_episode_would_end(oracle_tasks, demo_config3):
  demo_config3.env.max_format_errors = 2
  student = Scripted("no code block at all")
  trajs, stats = collector.collect(oracle_tasks[:2], config=demo_config3, round_index=1, beta=0.0,
                                   teacher=OracleTeacher(), student=student, progress=False)
  assert dict(stats.exit_status) == {"submitted": 2} and stats.resolved == 2
  assert stats.interventions["format_errors"] > 0
  for t in trajs:
    actors = [turn.actor for turn in t.turns]
    assert "student" in actors  # the first malformed turn is the student's, with its label
    assert actors.count("student") < len(actors)


def test_threads_and_waves_do_not_change_the_episodes(oracle_tasks, demo_config3):
  """Labels and teacher-coin steps overlap the student's batch in worker threads; the
  trajectories are the same with 1 or 3 threads and 1 or 3 episodes in flight."""
  def run(in_flight, workers):
    demo_config3.rollout.concurrency, demo_config3.rollout.env_workers = in_flight, workers
    trajs, stats = collector.collect(oracle_tasks, config=demo_config3, round_index=2, beta=0.5,
                                     teacher=OracleTeacher(), student=Scripted(_cmd("ls")),
                                     seed=5, grade=False, progress=False)
    return [t.to_dict() for t in trajs], stats

  (serial, stats), (overlapped, _) = run(1, 1), run(3, 3)
  assert serial == overlapped
  assert stats.turns["student"] and stats.turns["teacher"] and stats.seconds["student"] > 0
  assert all(t["outcome"]["teacher_calls"] == len(t["turns"]) for t in serial)


def _random_jax_student(c, tasks, temperature: float):
  """`run(beta)` -> (trajectory dicts, the student): a JAX student with random weights and the
  demo's tokenizer (seed 3), 4 turns of 16 tokens, beside the oracle teacher."""
  c.env.max_turns, c.env.max_format_errors, c.sampler.max_new_tokens = 4, 4, 16
  c.sampler.temperature, c.model.init_from = temperature, ""
  model = init_model(Qwen3Config.from_config(c.model), jax.random.PRNGKey(0))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tok = load_tokenizer_dir(os.path.join(root, c.data.tokenizer))

  def run(beta: float):
    student = JaxPolicy(model, tok, c.sampler, seed=3)
    trajs, _ = collector.collect(tasks, config=c, round_index=1, beta=beta,
                                 teacher=OracleTeacher(), student=student, seed=5, grade=False,
                                 progress=False, tokenizer=tok)
    return [t.to_dict() for t in trajs], student
  return run


def test_student_prefix_cache_changes_nothing_but_the_prefill(oracle_tasks, demo_config3):
  """The JAX student (random weights, the demo's tokenizer) acting alone for 4 turns: with its
  prefix cache on, turns after the first prefill only what they added, and the trajectories are
  the same as with every turn prefilled whole."""
  run = _random_jax_student(demo_config3, oracle_tasks, temperature=0.0)
  demo_config3.sampler.prefix_cache = 0
  plain, student = run(0.0)
  assert student.prefix_cache is None
  demo_config3.sampler.prefix_cache = 16
  cached, student = run(0.0)
  cache = student.prefix_cache
  assert cache.reused_tokens > cache.prefilled_tokens > 0
  assert cached == plain


def test_sampled_episodes_do_not_depend_on_their_batch(oracle_tasks, demo_config3):
  """The JAX student (random weights, the demo's tokenizer) sampling at temperature 1 draws each
  turn by (seed, episode, turn), with teacher turns mixed in (beta 0.5): the same trajectories
  with the three episodes in one wave (batches of three) and one per wave (batches of one), as
  a resumed run that plays an episode again beside other ones must."""
  run = _random_jax_student(demo_config3, oracle_tasks, temperature=1.0)
  demo_config3.rollout.concurrency = 3
  together, _ = run(0.5)
  demo_config3.rollout.concurrency = 1
  alone, _ = run(0.5)
  assert together == alone
  sampled = [tuple(t["action"]["ids"]) for traj in together for t in traj["turns"]
             if t["actor"] == "student"]
  assert len(sampled) >= 3 and len(set(sampled)) == len(sampled)  # each turn its own draw


class _Saboteur(support.Scripted):
  """Runs `ls`; at its second call closes the sandbox of the episode of task `victim` under it
  (as an engine that loses a container would), so that episode's next step fails."""

  def __init__(self, victim: str):
    super().__init__(_cmd("ls"))
    self.victim = victim

  def act(self, views):
    if self.calls == 1:
      next(v for v in views if v.task["instance_id"] == self.victim).env.sandbox.close()
    return super().act(views)


def test_a_sandbox_failing_mid_episode_costs_that_episode_only(oracle_tasks, demo_config3):
  demo_config3.env.max_turns = 3
  victim = oracle_tasks[1]["instance_id"]
  trajs, stats = collector.collect(oracle_tasks, config=demo_config3, round_index=1, beta=0.0,
                                   teacher=None, student=_Saboteur(victim), seed=5, grade=False,
                                   progress=False)
  assert sorted(t.task_id for t in trajs) == sorted(
      t["instance_id"] for t in oracle_tasks if t["instance_id"] != victim)
  assert all(len(t.turns) == 3 for t in trajs)  # the others went on to their turn limit
  assert stats.failed == 1 and stats.failure_reasons == {"env:step": 1}, stats.summary()
