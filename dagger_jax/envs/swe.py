"""One SWE episode: a task's repository in a sandbox, driven by assistant turns.

    env = SweEnv(task, config.env)
    messages = [{"role": "system", "content": env.system_prompt},
                {"role": "user", "content": env.reset()}]       # the problem statement
    while True:
      text = policy(messages)
      step = env.step(text)       # parse one action, run it, format the observation
      if step.done: break         # submitted, too many format errors in a row, or max_turns
      messages += [{"role": "assistant", "content": text},
                   {"role": "user", "content": step.observation}]
    patch = env.submission()      # `git diff` of the working tree against base_commit
    result = env.grade()          # swebench-style grading in a fresh sandbox
    env.close()

The env never knows which sandbox it runs on (`config.env.sandbox`: bwrap, docker, unsafe_local);
by default it opens `grading.task_sandbox(task, config.env)`, the same repository the grader
rebuilds. `StepResult.info` says what happened:

  turn           1-based index of this assistant turn
  format_error   the turn did not hold exactly one action (`n_actions` says how many)
  command        the command that ran (None on a format error)
  returncode, timed_out, duration_s   of the command
  over_limit     "disk" when the sandbox's files passed config.env.disk_mb (the output says so)
  submitted      the command printed the submit sentinel (the episode ends)
  exit_status    None while the episode goes on; then "submitted", "format_errors" or "max_turns"

With `config.env.normalize_durations` the command output is passed through `normalize_durations`
before it becomes the observation (grading and `info` see the real output): pytest prints its run
time in its summary line, so two runs of one seed would otherwise show the agent different text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from typing import Any, Callable, ContextManager

from dagger_jax import configlib
from dagger_jax.envs import grading, protocol
from dagger_jax.envs.sandbox import Sandbox

log = logging.getLogger(__name__)

SandboxContext = Callable[[dict], ContextManager[Sandbox]]

# Build outputs that never belong in a submission (PYTHONDONTWRITEBYTECODE is set in sandboxes,
# but tests run by the agent may still write them).
_DIFF_EXCLUDES = (":(exclude,glob)**/__pycache__/**", ":(exclude,glob)**/*.pyc",
                  ":(exclude,glob)**/.pytest_cache/**")
_SUBMISSION_INDEX = "/tmp/.dagger_jax_submission_index"


# pytest's last line: counts, then the session's duration (`format_session_duration` in
# _pytest/terminal.py: "0.04s", from 60 s on "61.20s (0:01:01)"; pytest < 5.1: "0.04 seconds"),
# between "=" fills unless -q; with --color=yes every part is wrapped in ANSI colour codes.
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_PYTEST_WIDTH = 80  # shutil.get_terminal_size's fallback, when stdout is not a terminal
_ANSI = rf"(?:{_ANSI_RE.pattern})*"
_PYTEST_SUMMARY_RE = re.compile(
    rf"^(?P<lead>{_ANSI})(?:(?P<lfill>=+) )?(?P<stats>{_ANSI}(?:\d|no )[^\n]*?) in \d+\.\d+"
    rf"(?P<unit>s(?: \(\d+:\d\d:\d\d\))?| seconds)(?P<mid>{_ANSI})(?: (?P<rfill>=+))?"
    rf"(?P<tail>{_ANSI}[ \t\r]*)$", re.MULTILINE)


def normalize_durations(output: str) -> str:
  """`output` with the duration of every pytest summary line set to 0.00 s.

  Summary lines are those of pytest's shape (a count or "no ...", " in 1.23s" at the end,
  perhaps between "=" fills); the fills are re-centred to the line's width as pytest would have
  printed them for 0.00 s, so the result depends on the tests' outcome only. A line too long for
  its terminal (one "=" a side) does not tell the width: it is re-centred on 80 columns, pytest's
  width without a terminal (as in a sandbox).

  >>> normalize_durations("....F\\n1 failed, 4 passed in 0.04s\\n")
  '....F\\n1 failed, 4 passed in 0.00s\\n'
  >>> normalize_durations("========= 2 passed in 61.20s (0:01:01) =========")
  '============== 2 passed in 0.00s ==============='
  >>> normalize_durations("== 1 passed, 1 warnings in 0.31 seconds ==")  # pytest < 5.1
  '== 1 passed, 1 warnings in 0.00 seconds =='
  >>> normalize_durations("build done in 0.04s")  # not a pytest line
  'build done in 0.04s'
  """
  def zero(m: re.Match) -> str:
    duration = " in 0.00" + ("s" if m["unit"].startswith("s") else " seconds")
    title = m["stats"] + duration + m["mid"]
    if not (m["lfill"] and m["rfill"]):  # -q (no fills), or not a line pytest centred
      left = f"{m['lfill']} " if m["lfill"] else ""
      right = f" {m['rfill']}" if m["rfill"] else ""
      return f"{m['lead']}{left}{title}{right}{m['tail']}"
    # pytest's TerminalWriter.sep: N = (width - len(title) - 2) // 2 fills a side, one more "="
    # on the right when it fits.
    width = len(_ANSI_RE.sub("", m[0].rstrip(" \t\r")))
    if len(m["lfill"]) == 1:  # the title overflowed
      width = _PYTEST_WIDTH
    visible = len(_ANSI_RE.sub("", title))
    n = max((width - visible - 2) // 2, 1)
    right = "=" * (n + (2 * n + visible + 3 <= width))
    return f"{m['lead']}{'=' * n} {title} {right}{m['tail']}"

  return _PYTEST_SUMMARY_RE.sub(zero, output)


class EpisodeError(RuntimeError):
  """The env was used out of order (step before reset, or after the episode ended)."""


@dataclasses.dataclass(frozen=True)
class StepResult:
  observation: str  # the next user message ("" once the episode has ended by submission)
  done: bool
  info: dict


def submission_command(base_commit: str) -> str:
  """Shell command printing the working tree's diff against base_commit (new files included).

  A throw-away index keeps the agent's own index untouched; .gitignore'd and build files are left
  out; `--binary` so that any binary change still applies.
  """
  excludes = " ".join(f"'{p}'" for p in _DIFF_EXCLUDES)
  return (f"export GIT_INDEX_FILE={_SUBMISSION_INDEX} && rm -f $GIT_INDEX_FILE && "
          f"git -c safe.directory='*' read-tree {base_commit} && "
          f"git -c safe.directory='*' add -A -- . {excludes} && "
          f"git -c safe.directory='*' diff --cached --binary {base_commit}; "
          "rc=$?; rm -f $GIT_INDEX_FILE; exit $rc")


class SweEnv:
  """A SWE-bench task as a multi-turn bash environment (see the module docstring)."""

  def __init__(self, task: dict, env_config: Any, *, sandbox_context: SandboxContext | None = None):
    self.task = task
    self.config = env_config
    self.system_prompt = protocol.system_prompt()
    if sandbox_context is None:
      sandbox_context = lambda t: grading.task_sandbox(t, env_config)  # noqa: E731
    self._sandbox_context = sandbox_context
    self._stack: contextlib.ExitStack | None = None
    self._sandbox: Sandbox | None = None
    self._reset_state()

  def _reset_state(self) -> None:
    self.turn = 0
    self.consecutive_format_errors = 0
    self.exit_status: str | None = None
    self._patch: str | None = None

  @property
  def sandbox(self) -> Sandbox:
    if self._sandbox is None:
      raise EpisodeError(f"{self.task['instance_id']}: call reset() first")
    return self._sandbox

  @property
  def done(self) -> bool:
    return self.exit_status is not None

  def reset(self) -> str:
    """Opens a fresh sandbox of the task; returns the first user message (the problem statement)."""
    self.close()
    self._reset_state()
    stack = contextlib.ExitStack()
    try:
      self._sandbox = stack.enter_context(self._sandbox_context(self.task))
    except BaseException:
      stack.close()
      raise
    self._stack = stack
    issue_file = getattr(self.config, "issue_file", "")
    if issue_file:
      self._write_issue(issue_file)
    return protocol.instance_prompt(self.task["problem_statement"], self._sandbox.workdir)

  def _write_issue(self, path: str) -> None:
    """Writes the problem statement to `path` in the sandbox (`config.env.issue_file`)."""
    if not configlib.ISSUE_FILE_RE.fullmatch(path):
      raise ValueError(f"config.env.issue_file={path!r}: use a plain path under the sandbox's "
                       "home or an absolute one, such as '~/ISSUE.md'")
    statement = self.task["problem_statement"].rstrip("\n")
    tag = "DAGGER_JAX_ISSUE_EOF"
    result = self.sandbox.run(f'mkdir -p "$(dirname {path})" && cat > {path} <<\'{tag}\'\n'
                              f"{statement}\n{tag}", timeout=60.0)
    if result.returncode != 0:
      raise EpisodeError(f"{self.task['instance_id']}: could not write config.env.issue_file "
                         f"{path}: {result.output[-300:]}")

  def step(self, assistant_text: str, finish_reason: str | None = None) -> StepResult:
    """Parses one action from the assistant turn, runs it, and returns the observation.

    `finish_reason` ("length" when the turn hit the token limit) picks the format-error text.
    """
    sandbox = self.sandbox
    if self.done:
      raise EpisodeError(f"{self.task['instance_id']}: step() after the episode ended "
                         f"({self.exit_status})")
    self.turn += 1
    parsed = protocol.parse_action(assistant_text)
    info: dict[str, Any] = {"turn": self.turn, "format_error": not parsed.ok,
                            "n_actions": parsed.n_actions, "command": parsed.command,
                            "submitted": False}
    if not parsed.ok:
      self.consecutive_format_errors += 1
      observation = protocol.format_error(parsed.n_actions, finish_reason)
      if self.consecutive_format_errors >= self.config.max_format_errors:
        self.exit_status = "format_errors"
    else:
      self.consecutive_format_errors = 0
      timeout = float(self.config.command_timeout)
      result = sandbox.run(parsed.command, timeout=timeout)
      info.update(returncode=result.returncode, timed_out=result.timed_out,
                  duration_s=result.duration_s, over_limit=result.over_limit)
      if protocol.is_submission(result):
        info["submitted"] = True
        self.exit_status = "submitted"
        self._patch = self._diff()
        observation = ""
      else:
        if self.config.normalize_durations:  # the agent's view only
          result = dataclasses.replace(result, output=normalize_durations(result.output))
        observation = protocol.format_observation(
            result, output_limit=self.config.output_limit, command=parsed.command, timeout=timeout)
    if not self.done and self.turn >= self.config.max_turns:
      self.exit_status = "max_turns"
    info["exit_status"] = self.exit_status
    return StepResult(observation, self.done, info)

  def _diff(self) -> str:
    result = self.sandbox.run(submission_command(self.task["base_commit"]),
                              timeout=max(60.0, float(self.config.command_timeout)))
    if result.returncode != 0 or result.timed_out or result.elided_chars:
      # The agent may have broken the repository (deleted .git, ...): an empty submission.
      log.warning("%s: could not diff the working tree (rc=%s, timed_out=%s, elided=%d): %s",
                  self.task["instance_id"], result.returncode, result.timed_out,
                  result.elided_chars, result.output[-500:])
      return ""
    return result.output

  def submission(self) -> str:
    """The patch: `git diff` of the working tree against base_commit.

    Taken when the agent submits; before that (e.g. an episode cut at max_turns), the diff of
    the tree as it is now.
    """
    if self._patch is not None:
      return self._patch
    if self._sandbox is None:
      raise EpisodeError(f"{self.task['instance_id']}: no submission was taken before close()")
    return self._diff()

  def grade(self):
    """Grades `submission()` on a fresh sandbox of the task (`grading.grade`)."""
    return grading.grade(self.task, self.submission(), grading.sandbox_factory(self.config))

  def close(self) -> None:
    """Closes the sandbox (idempotent). A submitted patch stays available."""
    stack, self._stack, self._sandbox = self._stack, None, None
    if stack is not None:
      stack.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
