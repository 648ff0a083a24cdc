"""The bash-only agent protocol: mini-swe-agent's text mode (v2, `mini_textbased.yaml`).

An assistant turn must hold exactly one fenced command block:

    THOUGHT: let me look at the repository first.

    ```mswea_bash_command
    ls -la
    ```

`parse_action` finds every block with mini-swe-agent's `action_regex`; zero or several blocks give a
`format_error` observation (the episode goes on; the caller counts consecutive errors). A command's
result becomes the next user message through `format_observation`:

    >>> from dagger_jax.envs.sandbox import ExecResult
    >>> print(format_observation(ExecResult(0, "a.py\\n", False, 0.01)))
    <returncode>0</returncode>
    <output>
    a.py
    </output>

Outputs of `output_limit` characters or more (10 000 by default, as mini-swe-agent) keep their
first `output_limit // 2` and last `output_limit - output_limit // 2` characters, with a warning and
the count of elided characters. A timed-out command reads like mini-swe-agent's: an `<exception>`
line and return code -1. A command whose first output line is `SUBMIT_SENTINEL` (return code 0)
ends the episode (`is_submission`).

The observation and format-error texts are byte-identical to mini-swe-agent's templates
(tests/test_protocol.py renders those templates with jinja2 and compares).
"""

from __future__ import annotations

import bisect
import dataclasses
import re

from dagger_jax.envs.sandbox import ExecResult

SUBMIT_SENTINEL = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
ACTION_FENCE = "mswea_bash_command"
# mini-swe-agent's LitellmTextbasedModelConfig.action_regex, applied with re.DOTALL.
ACTION_REGEX = r"```mswea_bash_command\s*\n(.*?)\n```"
_ACTION_RE = re.compile(ACTION_REGEX, re.DOTALL)
_OPENER, _CLOSER = f"```{ACTION_FENCE}", "\n```"
_SPACES_RE = re.compile(r"\s*")  # the regex's `\s`, whatever the engine counts as white space
# finish_reason values that mean the turn was cut off by the token limit.
TRUNCATED_FINISH_REASONS = ("length", "tool_calls")


@dataclasses.dataclass(frozen=True)
class ParsedAction:
  """What `parse_action` found. `command` is None unless there was exactly one block."""
  command: str | None
  n_actions: int

  @property
  def ok(self) -> bool:
    return self.command is not None


def parse_action(text: str) -> ParsedAction:
  """Finds the fenced command blocks of an assistant turn; exactly one is a valid action.

  >>> parse_action("THOUGHT: list.\\n\\n```mswea_bash_command\\nls -la\\n```")
  ParsedAction(command='ls -la', n_actions=1)
  >>> parse_action("no block here").ok
  False
  """
  actions = [a.strip() for a in find_actions(text)]
  return ParsedAction(actions[0] if len(actions) == 1 else None, len(actions))


def find_actions(text: str) -> list[str]:
  """`_ACTION_RE.findall(text)`, the same list, without the regex's quadratic worst case.

  Tried at each opener, the regex's lazy group scans to the end of the text when no closing
  fence follows, so a turn of many unclosed openers (a student repeating "```mswea_bash_command
  ls``` ") took 5 s at 112 000 characters and 74 s at 448 000. Here the closing fences (newline,
  three backticks) are listed once and each opener looks its fence up by bisection. At an opener
  the regex's white space and newline are greedy: the block starts after the last newline of the
  white space that follows the opener and ends at the first closing fence after that; when there
  is none, the regex backs off to the newline before, and then the only fence it can find is the
  one that the run's last newline makes with backticks right after it (backticks are not white
  space). tests/test_properties.py checks the two agree on random turns.
  """
  closers = []
  i = text.find(_CLOSER)
  while i >= 0:
    closers.append(i)
    i = text.find(_CLOSER, i + 1)
  actions = []
  p = text.find(_OPENER)
  while p >= 0:
    q = p + len(_OPENER)
    spaces_end = _SPACES_RE.match(text, q).end()
    newline = text.rfind("\n", q, spaces_end)
    block = None
    if newline >= 0:
      k = bisect.bisect_left(closers, newline + 1)
      if k < len(closers):
        block = (newline + 1, closers[k])
      else:
        before = text.rfind("\n", q, newline)
        if before >= 0 and newline == spaces_end - 1 and text.startswith("```", spaces_end):
          block = (before + 1, newline)
    if block is None:
      p = text.find(_OPENER, p + 1)
    else:
      actions.append(text[block[0]:block[1]])
      p = text.find(_OPENER, block[1] + len(_CLOSER))
  return actions


def format_action(command: str, thought: str = "") -> str:
  """An assistant turn that runs `command` (the inverse of `parse_action`), for scripted agents.

  >>> parse_action(format_action("pytest -q", "Run the tests.")).command
  'pytest -q'
  """
  block = f"```{ACTION_FENCE}\n{command}\n```"
  return f"{thought}\n\n{block}" if thought else block


def format_error(n_actions: int, finish_reason: str | None = None) -> str:
  """The observation for a turn without exactly one action (mini-swe-agent's format error).

  `finish_reason` "length" (the turn hit the token limit) gives the cut-off message instead.
  """
  if finish_reason in TRUNCATED_FINISH_REASONS:
    return (f"Your previous response reached the output token limit (finish_reason={finish_reason})"
            " before you produced a complete action, so it was cut off. Respond more concisely and "
            "provide exactly one action in the required format. If you need to think more, do so "
            "briefly.")
  return (
      "Format error:\n\n"
      f"<error>\nExpected exactly 1 action, found {n_actions}.\n</error>\n\n"
      "Here is general guidance on how to format your response:\n\n"
      "Please always provide EXACTLY ONE action in triple backticks, "
      f"found {n_actions} actions.\n\n"
      "Please format your action in triple backticks as shown in <response_example>.\n\n"
      "<response_example>\n"
      "Here are some thoughts about why you want to perform the action.\n\n"
      f"```{ACTION_FENCE}\n<action>\n```\n"
      "</response_example>\n\n"
      "If you have completed your assignment, please consult the first message about how to\n"
      "submit your solution (you will not be able to continue working on this task after that).")


_TOO_LONG_WARNING = (
    "<warning>\n"
    "The output of your last command was too long.\n"
    "Please try a different command that produces less output.\n"
    "If you're looking at a file you can try use head, tail or sed to view a smaller number of "
    "lines selectively.\n"
    "If you're using grep or find and it produced too much output, you can use a more selective "
    "search pattern.\n"
    "If you really need to see something from the full command's output, you can redirect output "
    "to a file and then search in that file.\n"
    "</warning>")


def timeout_message(command: str, timeout: float) -> str:
  """mini-swe-agent's exception text for a command killed at its time limit."""
  return (f"An error occurred while executing the command: Command '{command}' timed out after "
          f"{timeout:g} seconds")


def format_observation(result: ExecResult, *, output_limit: int = 10_000, command: str = "",
                       timeout: float | None = None) -> str:
  """The user message that shows the agent `result` (see the module docstring).

  `command` and `timeout` (default: the measured duration) only appear in the text of a
  timed-out command. `result.elided_chars`
  (dropped by the sandbox's capture cap) count toward the length and the elided count.
  """
  out = result.output
  total = len(out) + result.elided_chars
  parts = []
  if result.timed_out:
    limit = timeout if timeout is not None else round(result.duration_s)
    parts.append(f"<exception>{timeout_message(command, limit)}</exception>\n")
  parts.append(f"<returncode>{-1 if result.timed_out else result.returncode}</returncode>\n")
  if total < output_limit:
    parts.append(f"<output>\n{out}</output>")
  else:
    n_head = output_limit // 2
    n_tail = output_limit - n_head
    # max(.., 0): a capture cap below the limit keeps fewer than n_tail characters, and a
    # negative start would show only the last few of those.
    parts.append(
        f"{_TOO_LONG_WARNING}<output_head>\n{out[:n_head]}\n</output_head>\n"
        f"<elided_chars>\n{total - n_head - n_tail} characters elided\n</elided_chars>\n"
        f"<output_tail>\n{out[max(len(out) - n_tail, 0):]}\n</output_tail>")
  return "".join(parts)


def is_submission(result: ExecResult) -> bool:
  """True when the command printed the submit sentinel as its first line and exited 0."""
  if result.returncode != 0 or result.timed_out:
    return False
  lines = result.output.lstrip().splitlines()
  return bool(lines) and lines[0].strip() == SUBMIT_SENTINEL


def system_prompt() -> str:
  """The system message of an episode (mini-swe-agent's text-mode rules, in our words)."""
  return (
      "You are a helpful assistant that can interact with a computer.\n\n"
      "Your response must contain exactly ONE bash code block with ONE command (or commands "
      "connected with && or ||).\n"
      "Include a THOUGHT section before your command where you explain your reasoning process.\n"
      "Format your response as shown in <format_example>.\n\n"
      "<format_example>\n"
      "THOUGHT: Your reasoning and analysis here. Explain why you want to perform the action.\n\n"
      f"```{ACTION_FENCE}\nyour_command_here\n```\n"
      "</format_example>\n\n"
      "Failure to follow these rules will cause your response to be rejected.")


def instance_prompt(problem_statement: str, workdir: str = "/testbed") -> str:
  """The first user message: the workflow, how to submit, then the task.

  The issue comes last, right before the agent's first turn: what the agent copies from it (a
  name, a line) sits a few dozen tokens back rather than behind the rules, which is what a small
  student's copying reaches first (see `dagger_jax/dagger/pretrain.py`).
  """
  return (
      f"The repository is checked out in {workdir} (the working directory of every command). "
      "You can execute bash commands and edit files to implement the necessary changes.\n\n"
      "## Recommended Workflow\n\n"
      "1. Find and read the relevant code\n"
      "2. Reproduce the issue with a small script\n"
      "3. Edit the source code to resolve the issue\n"
      "4. Run your script and the tests again to verify the fix\n"
      f"5. Submit with exactly this command, on its own: `echo {SUBMIT_SENTINEL}`. "
      "You cannot continue working on the task after it.\n\n"
      "## Important Rules\n\n"
      "1. Every response must contain exactly one action, in triple backticks as shown above.\n"
      "2. Every action runs in a new subshell: `cd` and environment variables do not persist; "
      "prefix the command instead (`cd /path && ...`).\n"
      "3. Commands run without a terminal or network, and processes they start in the background "
      "end with them; avoid interactive programs.\n\n"
      "## Example\n\n"
      + format_action("nl -ba src/module.py | sed -n '10,20p'",
                      "THOUGHT: I need to read lines 10-20 of the module first.")
      + f"\n\n## The issue\n\nPlease solve this issue: {problem_statement.strip()}\n")
