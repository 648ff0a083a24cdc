"""A scripted expert that knows the task's gold patch and acts sensibly from any state.

It is what makes DAgger testable and demonstrable without a GPU: it labels every state a student
visits, including states the student broke. It is privileged: besides the conversation it looks
at the working tree's current diff (`env.submission()`, read-only).

Policy, by the state of the working tree and the last command:

    changed, tests not run since        -> run the tests (commands that only read, like `ls` or
                                           `grep`, do not count as changes)
    changed, tests ran: passed and the
      change is the fix                 -> submit
    changed, tests ran: anything else   -> restore the files (`git checkout -- .`), and with
                                           `config.env.issue_file` read the issue again
                                           (`git checkout -- . && cat ~/ISSUE.md`)
    clean after an edit (one that changed
      nothing; the conversation cannot
      tell it from one that did)        -> the same: run the tests, then restore (and re-read)
    clean                               -> the first step not yet taken of
                                           find the function -> show its lines (not for `toy`)
                                           -> apply the fix
                                           (each command built only from what the conversation
                                           shows by then, so a student can imitate it; after a
                                           restore the lines are shown again before the edit)

So after a student's bad edit the teacher's labels are: run the tests, restore
(`git checkout -- .`), fix, test, submit; every decision can be read off the conversation (the
test output says whether the change worked). On `toy-rewrite` with an issue file, the fix after
a restore is the careful one: the shell reads the substitution from the issue file
(`sed -i "/def f(/{n;$(grep -o 's|.*|' ~/ISSUE.md)}" ./f.py`), so the retry copies only the
function and the path, not the span that the failed edit got wrong. A teacher that never fails
never shows this path: only a student's own mistakes lead to it (the DAgger demo's point). Worked example (a `toy` task whose statement quotes
`def join_rate(m, n)` and the correct line `r = m + n`; grep answers `./timing.py:1:def ...`):

    THOUGHT: Find the function the issue names.    grep -rn "def join_rate(" .
    THOUGHT: Replace the line after the def.       sed -i '/def join_rate(/{n;s/.*/    r = m + n/}' ./timing.py
    THOUGHT: Run the tests to check the change.    python3 run_tests.py
    THOUGHT: The tests pass. Submit.               echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT

Every token of those commands is fixed text or a copy of a span the conversation shows right
after the same token (`def join_rate(` after `def ` in the statement, the new line after its
indentation, the path after `./` in grep's answer), which is what a small transformer learns
to copy first.

The fix is the task's one-line `bug.fix_cmd` when it has one (toy tasks); otherwise the gold
patch applied with `git apply` from a heredoc.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from dagger_jax.data.trajectory import Action
from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.policies.base import EpisodeView, Policy

DEFAULT_TEST_CMD = "python3 -m pytest -rA -q -p no:cacheprovider"
_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@")


def changed_lines(patch: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
  """{file: (removed lines, added lines)} of a unified diff, ignoring context and headers."""
  out: dict[str, tuple[list[str], list[str]]] = {}
  current = None
  for line in patch.splitlines():
    if line.startswith("diff --git "):
      current = line.split(" b/", 1)[-1]
      out.setdefault(current, ([], []))
    elif line.startswith(("---", "+++", "index ", "@@", "new file", "deleted file")):
      continue
    elif current is not None and line.startswith("-"):
      out[current][0].append(line[1:])
    elif current is not None and line.startswith("+"):
      out[current][1].append(line[1:])
  return {f: (tuple(r), tuple(a)) for f, (r, a) in out.items() if r or a}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the oracle knows about a task: where the bug is and how to fix it."""
  file: str
  line: int
  function: str | None
  def_line: int | None  # the line of `def function(`
  fix_cmd: str
  test_cmd: str
  gold: dict
  show_lines: bool  # show the lines before editing (not for `toy.IMITABLE`: no line number)
  family: str | None = None

  @classmethod
  def of(cls, task: dict) -> "Plan":
    test_cmd = task.get("test_cmd") or DEFAULT_TEST_CMD
    gold = changed_lines(task["patch"])
    if not gold:
      raise ValueError(f"{task['instance_id']}: the gold patch changes no line")
    bug = task.get("bug")
    if bug:
      file, line, fix_cmd = bug["file"], int(bug["line"]), bug["fix_cmd"]
    else:
      file, line = _first_hunk(task["patch"])
      fix_cmd = _git_apply_cmd(task["patch"])
    function, def_line = _function_at(task, file, line)
    return cls(file, line, function, def_line, fix_cmd, test_cmd, gold,
               show_lines=task.get("family") not in toy.IMITABLE, family=task.get("family"))


def _first_hunk(patch: str) -> tuple[str, int]:
  file = None
  for line in patch.splitlines():
    if line.startswith("diff --git "):
      file = line.split(" b/", 1)[-1]
    m = _HUNK_RE.match(line)
    if m and file:
      return file, int(m.group(1))
  raise ValueError("the gold patch has no hunk")


def _git_apply_cmd(patch: str) -> str:
  tag = "DAGGER_PATCH_EOF"
  return f"git apply <<'{tag}'\n{patch.rstrip(chr(10))}\n{tag}"


def _function_at(task: dict, file: str, line: int) -> tuple[str | None, int | None]:
  """The name and line of the `def` enclosing `line` in the task's own copy of `file`, when it
  has one."""
  text = (task.get("repo_files") or {}).get(file)
  if text is None:
    return None, None
  name, where = None, None
  for i, src in enumerate(text.splitlines(), start=1):
    if i > line:
      break
    m = re.match(r"\s*def (\w+)\(", src)
    if m:
      name, where = m.group(1), i
  return name, where


def _commands(view: EpisodeView) -> list[str]:
  """The commands executed so far (assistant turns that parsed), in order."""
  out = []
  for m in view.messages:
    if m["role"] == "assistant":
      parsed = protocol.parse_action(m["content"])
      out.append(parsed.command if parsed.ok else "")
  return out


# Commands that look and do not touch the tree (`_last_test`): what may stand between a passing
# test run and the submit. A redirect (`>`) or an in-place edit (`-i`) is never read-only.
_READ_ONLY = ("grep", "nl", "cat", "ls", "head", "tail", "pwd", "wc", "git diff", "git status",
              "git log", "git show", "echo")


def _read_only(command: str) -> bool:
  """Whether `command` only reads (see `_READ_ONLY`).

  >>> _read_only("nl -ba x.py | sed -n '1,4p'"), _read_only("sed -i 's/a/b/' x.py")
  (True, False)
  """
  return not command or (command.startswith(_READ_ONLY) and ">" not in command
                         and " -i" not in command)


def _last_test(view: EpisodeView, commands: list[str], test_cmd: str) -> bool | None:
  """Whether the tests passed on the tree as it is now: the result of the last test run when
  every command after it only read (None when there is no such run: the tree may have changed).
  """
  for k in range(len(commands) - 1, -1, -1):
    if commands[k] == test_cmd:
      observation = view.messages[3 + 2 * k]["content"] if 3 + 2 * k < len(view.messages) else ""
      return observation.startswith("<returncode>0</returncode>")
    if not _read_only(commands[k]):
      return None
  return None


def _restored_at(commands: list[str]) -> int:
  """Index of the first command after the last `git checkout` (0 when there was none)."""
  for i in range(len(commands) - 1, -1, -1):
    if commands[i].startswith("git checkout"):
      return i + 1
  return 0


def _run_tests(plan: Plan) -> str:
  return protocol.format_action(plan.test_cmd, "THOUGHT: Run the tests to check the change.")


def _restore(issue_file: str) -> str:
  """After the tests failed: restore the files, and re-read the issue when there is an issue
  file, so that the retry copies from the newest observation rather than from the failed edit."""
  if issue_file:
    return protocol.format_action(
        f"git checkout -- . && cat {issue_file}",
        "THOUGHT: The tests fail. Restore the files and read the issue again.")
  return protocol.format_action("git checkout -- .",
                                "THOUGHT: The change broke the tests. Restore the files.")


def _careful_fix(plan: Plan, issue_file: str) -> str:
  """The fix of a `toy-rewrite` task after a failed one: the shell reads the substitution from
  the issue file, so nothing but the function and the path is copied. (`s|.*|` is greedy: the
  statement's one `s|old|new|` is the only text between `s|` and the line's last `|`.)"""
  grep = f"grep -o 's|.*|' {issue_file}"
  return f'sed -i "/def {plan.function}(/{{n;$({grep})}}" ./{plan.file}'


class OracleTeacher(Policy):
  """The scripted expert (see the module docstring)."""

  name = "oracle"

  def act(self, views: Sequence[EpisodeView]) -> list[Action]:
    return [Action(self.next_action(v)) for v in views]

  def next_action(self, view: EpisodeView) -> str:
    plan = Plan.of(view.task)
    diff = changed_lines(view.env.submission()) if view.env is not None else {}
    issue_file = getattr(view.env.config, "issue_file", "") if view.env is not None else ""
    commands = _commands(view)
    if diff:
      passed = _last_test(view, commands, plan.test_cmd)
      if passed is None:  # the tree may have changed since the tests last ran: run them
        return _run_tests(plan)
      if diff == plan.gold and passed:
        return protocol.format_action(f"echo {protocol.SUBMIT_SENTINEL}",
                                      "THOUGHT: The tests pass. Submit.")
      return _restore(issue_file)
    # A clean tree after an edit that changed nothing. The conversation does not show that it
    # changed nothing (sed prints nothing either way), so the labels are those after any edit:
    # run the tests, and when they fail, restore and re-read.
    if any(not _read_only(c) and c != plan.test_cmd and not c.startswith("git checkout")
           for c in commands[_restored_at(commands):]):
      passed = _last_test(view, commands, plan.test_cmd)
      if passed is None:
        return _run_tests(plan)
      if passed is False and commands[-1] == plan.test_cmd:
        return _restore(issue_file)
    # A clean tree: the first step not yet taken. Each one only uses what the conversation
    # already shows (the function name is in the issue, the file and line in grep's answer), so
    # a student can learn to take it; after a restore the lines are shown again before the edit.
    since_restore = commands[_restored_at(commands):]
    steps = []
    if plan.function and plan.def_line:
      steps.append((f'grep -rn "def {plan.function}(" .', commands,
                    "THOUGHT: Find the function the issue names."))
      if plan.show_lines:
        steps.append((f"nl -ba {plan.file} | sed -n '{plan.def_line},+3p'", since_restore,
                      "THOUGHT: Show the function."))
    else:
      lo, hi = max(1, plan.line - 2), plan.line + 2
      steps.append((f"nl -ba {plan.file} | sed -n '{lo},{hi}p'", since_restore,
                    f"THOUGHT: Show the lines around line {plan.line} of {plan.file}."))
    for command, done, thought in steps:
      if command not in done:
        return protocol.format_action(command, thought)
    if _restored_at(commands) and plan.family == "toy-rewrite" and issue_file:
      return protocol.format_action(_careful_fix(plan, issue_file),
                                    "THOUGHT: Apply the issue's substitution.")
    return protocol.format_action(plan.fix_cmd, "THOUGHT: Replace the line after the def.")
