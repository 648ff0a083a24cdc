"""The `toy` and `toy-rewrite` families are imitable: a teacher that reads only the conversation
(no task record, no gold patch, no working tree) resolves every generated task from a clean
start, and recovers from a bad edit, in the real bubblewrap sandbox, graded like the swebench
harness. So a perfect imitator of the oracle resolves every task, and the demo measures
imitation, not arithmetic.
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
  """Acts from the messages alone: the function and its correct line from the statement (or
  from the issue file, once re-read), the file from grep's answer; tests after an edit, submit
  when they pass, restore and re-read the issue when they fail. On `toy-rewrite`, the retry
  after a restore has the shell read the substitution from the issue file."""

  name = "conversation"

  def act(self, views):
    return [Action(protocol.format_action(self.command(v.messages))) for v in views]

  @staticmethod
  def command(messages) -> str:
    statement = messages[1]["content"]
    function = re.search(r"`def (\w+)\(", statement).group(1)
    commands = [protocol.parse_action(m["content"]).command for m in messages
                if m["role"] == "assistant"]
    if not commands:
      return f'grep -rn "def {function}(" .'
    last, answer = commands[-1], messages[-1]["content"]
    if last.startswith(("grep", "git checkout")):
      # the new line from the newest copy of the issue: the statement, or the re-read file
      new_line = re.search(r"\n\n    (.+)\n", answer if last.startswith("git") else statement)
      grep_answer = messages[3 + 2 * commands.index(f'grep -rn "def {function}(" .')]["content"]
      path = re.search(r"^(\./\S+\.py):\d+:def ", grep_answer, re.M).group(1)
      span = re.search(r"`s\|([^|`]+)\|([^|`]+)\|`", statement)  # toy-rewrite
      if span and last.startswith("git"):  # a retry: the shell reads the span from the file
        grep = "grep -o 's|.*|' ~/ISSUE.md"
        return f'sed -i "/def {function}(/{{n;$({grep})}}" {path}'
      if span:
        return f"sed -i '/def {function}(/{{n;s|{span[1]}|{span[2]}|}}' {path}"
      return f"sed -i '/def {function}(/{{n;s/.*/    {new_line.group(1)}/}}' {path}"
    if last.startswith("sed -i"):
      return "python3 run_tests.py"
    if answer.startswith("<returncode>0</returncode>"):
      return f"echo {protocol.SUBMIT_SENTINEL}"
    return "git checkout -- . && cat ~/ISSUE.md"


@pytest.fixture(scope="module")
def config():
  c = demo_config.get_config()
  c.rollout.env_workers = 4
  return c


@pytest.mark.parametrize("family", toy.IMITABLE)
@pytest.mark.parametrize("split,seed", [("train", 0), ("test", 1)])
def test_a_conversation_only_teacher_resolves_every_task(config, split, seed, family):
  tasks = toy.generate(40, seed, split=split, family=family)
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


class ClumsyConversationTeacher(ConversationTeacher):
  """The conversation-only teacher, except that its first edit breaks the line."""

  @staticmethod
  def command(messages) -> str:
    command = ConversationTeacher.command(messages)
    edits = [m for m in messages if m["role"] == "assistant" and "sed -i" in m["content"]]
    if command.startswith("sed -i") and not edits:
      return command.split("{n;")[0] + "{n;s|.*|    return None|}' " + command.split()[-1]
    return command


@pytest.mark.parametrize("family", toy.IMITABLE)
def test_a_conversation_only_teacher_recovers_on_every_task(config, family):
  """After a bad first edit: test, restore and re-read, fix again, test, submit, on 40 tasks."""
  tasks = toy.generate(40, 3, split="train", family=family)
  trajs, stats = collector.collect(tasks, config=config, round_index=0, beta=1.0,
                                   teacher=ClumsyConversationTeacher(), student=None,
                                   progress=False, interventions=())
  assert stats.failed == 0 and len(trajs) == len(tasks)
  assert [t.task_id for t in trajs if not t.outcome.resolved] == []
  assert all(t.outcome.turns == 7 for t in trajs)
  assert demo.behaviour(trajs) == {"right_function": 40, "first_edit_ok": 0, "restored": 40,
                                   "recovered": 40, "submitted_red": 0, "not_submitted": 0}


@pytest.mark.parametrize("family", toy.IMITABLE)
def test_the_oracle_takes_the_same_path_from_a_clean_start(config, family):
  """The privileged oracle's straight path is the conversation-only teacher's, command for
  command, so imitating the oracle is imitating a conversation-only policy."""
  tasks = toy.generate(12, 2, split="train", family=family)
  oracle, _ = collector.collect(tasks, config=config, round_index=0, beta=1.0,
                                teacher=OracleTeacher(), student=None, progress=False, grade=False)
  for t in oracle:
    msgs = list(t.messages)
    for k, turn in enumerate(t.turns):
      upto = msgs[:2 + 2 * k]
      assert protocol.parse_action(turn.action.text).command == ConversationTeacher.command(upto)


@pytest.mark.parametrize("noop", [False, True], ids=["bad-edit", "edit-that-changes-nothing"])
@pytest.mark.parametrize("family", toy.IMITABLE)
def test_the_oracle_recovers_from_a_bad_edit(config, family, noop):
  """After a wrong edit the oracle tests, restores and re-reads the issue, fixes again, tests
  and submits: the recovery a DAgger student sees labels for and an SFT student never does."""
  from dagger_jax.envs.swe import SweEnv
  from dagger_jax.policies.base import EpisodeView

  task = toy.generate(1, 4, split="train", family=family)[0]
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
    step(protocol.format_action(f"sed -i '{bug['line']}s/{'no such text' if noop else '.*'}/"
                                f"    return 0/' {bug['file']}"))
    assert bool(env.submission()) != noop  # the conversation looks the same either way
    path = []
    for _ in range(6):
      action = oracle.next_action(EpisodeView(task, messages, [], env))
      command = protocol.parse_action(action).command
      assert command == ConversationTeacher.command(messages)  # recovery too: conversation only
      path.append(command)
      if step(action).done:
        break
    assert [c.split()[0] for c in path] == ["python3", "git", "sed", "python3", "echo"]
    assert path[1] == "git checkout -- . && cat ~/ISSUE.md"
    if family == "toy-rewrite":  # the retry copies nothing but the function and the path
      function = re.search(r"`def (\w+)\(", task["problem_statement"]).group(1)
      assert path[2] == (f'sed -i "/def {function}(/{{n;'
                         f"$(grep -o 's|.*|' ~/ISSUE.md)}}\" ./{bug['file']}")
    assert messages[9]["content"] == ("<returncode>0</returncode>\n<output>\n"
                                      f"{task['problem_statement'].rstrip()}\n</output>")
    assert env.exit_status == "submitted" and env.grade().resolved


def test_without_an_issue_file_the_restore_only_restores(config):
  from dagger_jax.envs.swe import SweEnv
  from dagger_jax.policies.base import EpisodeView

  task = toy.generate(1, 4, split="train")[0]
  env_config = config.env.copy_and_resolve_references()
  env_config.issue_file = ""
  with SweEnv(task, env_config) as env:
    messages = [{"role": "system", "content": env.system_prompt},
                {"role": "user", "content": env.reset()}]
    for text in (protocol.format_action(f"sed -i '{task['bug']['line']}s/.*/    return 0/' "
                                        f"{task['bug']['file']}"),
                 protocol.format_action("python3 run_tests.py")):
      messages += [{"role": "assistant", "content": text},
                   {"role": "user", "content": env.step(text).observation}]
    action = OracleTeacher().next_action(EpisodeView(task, messages, [], env))
    assert protocol.parse_action(action).command == "git checkout -- ."
    assert "No such file" in env.sandbox.run("cat ~/ISSUE.md").output


def test_a_bad_issue_file_path_is_refused(config):
  from dagger_jax.envs.swe import SweEnv

  env_config = config.env.copy_and_resolve_references()
  env_config.issue_file = "~/a b; rm -rf ."
  with SweEnv(toy.generate(1, 4, split="train")[0], env_config) as env:
    with pytest.raises(ValueError, match="config.env.issue_file"):
      env.reset()


def test_the_rewrite_family_names_one_short_span():
  tasks = toy.generate(200, 0, split="train", family="toy-rewrite")
  assert {t["bug"]["kind"] for t in tasks} == {"operator", "comparison", "constant"}
  assert len({t["FAIL_TO_PASS"][0] for t in tasks}) > 150
  for t in tasks:
    x, y = toy.rewrite(t["bug"]["old"], t["bug"]["new"])
    assert t["bug"]["old"].replace(x, y, 1) == t["bug"]["new"]
    assert f"`{x}` should be `{y}` (`s|{x}|{y}|`)" in t["problem_statement"]
    assert t["bug"]["new"] not in t["problem_statement"]  # the line itself is not given
  assert len({toy.rewrite(t["bug"]["old"], t["bug"]["new"]) for t in tasks}) >= 10


def test_the_family_is_varied():
  tasks = toy.generate(200, 0, split="train")
  names = {t["FAIL_TO_PASS"][0].split("::test_")[1] for t in tasks}
  assert len(names) > 150  # generated verb_noun names: copying pays more than memorising
  assert {t["bug"]["kind"] for t in tasks} == set(toy.BUG_KINDS)
  for t in tasks[:20]:
    assert f"\n\n    {t['bug']['new']}\n" in t["problem_statement"]
    assert t["test_cmd"] == toy.TEST_CMD
    assert t["bug"]["file"] not in t["problem_statement"]
