"""The `toy` family is imitable: a teacher that reads only the conversation (no task record, no
gold patch, no working tree) resolves every generated task from a clean start, in the real
bubblewrap sandbox, graded like the swebench harness. So a perfect imitator of the oracle
resolves every task, and the demo measures imitation, not arithmetic.
"""

from __future__ import annotations

import re

import pytest

from configs import demo as demo_config
from dagger_jax.data.trajectory import Action
from dagger_jax.dagger import collector, demo
from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.policies.base import Policy
from dagger_jax.policies.oracle import OracleTeacher


class ConversationTeacher(Policy):
  """Acts from the messages alone: the function and its correct line from the statement, the
  file and line from grep's answer; tests after an edit, submit when they pass."""

  name = "conversation"

  def act(self, views):
    return [Action(protocol.format_action(self.command(v.messages))) for v in views]

  @staticmethod
  def command(messages) -> str:
    statement = messages[1]["content"]
    function = re.search(r"`def (\w+)\(", statement).group(1)
    new_line = re.search(r"\n\n    (.+)\n", statement).group(1)
    commands = [protocol.parse_action(m["content"]).command for m in messages
                if m["role"] == "assistant"]
    if not commands:
      return f'grep -rn "def {function}(" .'
    last = commands[-1]
    if last.startswith("grep"):
      path = re.search(r"^(\./\S+\.py):\d+:def ", messages[-1]["content"], re.M).group(1)
      return f"sed -i '/def {function}(/{{n;s/.*/    {new_line}/}}' {path}"
    if last.startswith("sed -i"):
      return "python3 run_tests.py"
    return f"echo {protocol.SUBMIT_SENTINEL}"


@pytest.fixture(scope="module")
def config():
  c = demo_config.get_config()
  c.rollout.env_workers = 4
  return c


@pytest.mark.parametrize("split,seed", [("train", 0), ("test", 1)])
def test_a_conversation_only_teacher_resolves_every_task(config, split, seed):
  tasks = toy.generate(40, seed, split=split)
  trajs, stats = collector.collect(tasks, config=config, round_index=0, beta=1.0,
                                   teacher=ConversationTeacher(), student=None, progress=False,
                                   interventions=())
  assert stats.failed == 0 and len(trajs) == len(tasks)
  unresolved = [t.task_id for t in trajs if not t.outcome.resolved]
  assert not unresolved, unresolved
  assert all(t.outcome.turns == 4 for t in trajs)
  # the demo's account of what a student did, on a perfect one
  assert demo.behaviour(trajs) == {"right_function": 40, "first_edit_ok": 40, "restored": 0,
                                   "recovered": 0, "submitted_red": 0, "not_submitted": 0}


def test_the_oracle_takes_the_same_path_from_a_clean_start(config):
  """The privileged oracle's straight path is the conversation-only teacher's, command for
  command, so imitating the oracle is imitating a conversation-only policy."""
  tasks = toy.generate(12, 2, split="train")
  oracle, _ = collector.collect(tasks, config=config, round_index=0, beta=1.0,
                                teacher=OracleTeacher(), student=None, progress=False, grade=False)
  for t in oracle:
    msgs = list(t.messages)
    for k, turn in enumerate(t.turns):
      upto = msgs[:2 + 2 * k]
      assert protocol.parse_action(turn.action.text).command == ConversationTeacher.command(upto)


def test_the_oracle_recovers_from_a_bad_edit(config):
  """After a wrong edit the oracle tests, restores, fixes again, tests and submits:
  the recovery a DAgger student sees labels for and an SFT student never does."""
  from dagger_jax.envs.swe import SweEnv
  from dagger_jax.policies.base import EpisodeView

  task = toy.generate(1, 4, split="train")[0]
  bug = task["bug"]
  oracle = OracleTeacher()
  with SweEnv(task, config.env) as env:
    messages = [{"role": "system", "content": env.system_prompt},
                {"role": "user", "content": env.reset()}]

    def step(text):
      result = env.step(text)
      messages.extend([{"role": "assistant", "content": text},
                       {"role": "user", "content": result.observation}])
      return result

    step(oracle.next_action(EpisodeView(task, messages, [], env)))  # grep
    step(protocol.format_action(f"sed -i '{bug['line']}s/.*/    return 0/' {bug['file']}"))
    path = []
    for _ in range(6):
      action = oracle.next_action(EpisodeView(task, messages, [], env))
      path.append(protocol.parse_action(action).command.split()[0])
      if step(action).done:
        break
    assert path == ["python3", "git", "sed", "python3", "echo"]
    assert env.exit_status == "submitted" and env.grade().resolved


def test_the_family_is_varied():
  tasks = toy.generate(200, 0, split="train")
  names = {t["FAIL_TO_PASS"][0].split("::test_")[1] for t in tasks}
  assert len(names) > 150  # generated verb_noun names: copying pays more than memorising
  assert {t["bug"]["kind"] for t in tasks} == set(toy.BUG_KINDS)
  for t in tasks[:20]:
    assert f"\n\n    {t['bug']['new']}\n" in t["problem_statement"]
    assert t["test_cmd"] == toy.TEST_CMD
    assert t["bug"]["file"] not in t["problem_statement"]
