"""mini-swe-agent trajectory files -> this project's trajectory records (teacher-only episodes).

    data = load_miniswe("runs/mswea/toy__ledger-1a2b/toy__ledger-1a2b.traj.json")
    traj = to_trajectory(data, task_id="toy__ledger-1a2b")    # a `Trajectory` of round 0
    traj = convert_file(path, round_index=0)                  # the same; the id from the file

`dagger-jax import-trajectories` (data/cli.py) runs `convert_file` over files and folders and
appends the records to a round's JSONL, so teacher runs made with mini-swe-agent can seed round 0.

What is read. The file `DefaultAgent.save` writes: `{"trajectory_format": "mini-swe-agent-1.1",
"info": {"exit_status", "submission", "model_stats", "config", ...}, "messages": [...]}`, and
the older "mini-swe-agent-1" (v1.x) or files without a format field of the same shape. A message
is `{"role", "content", "extra"?}`; `content` is a string, null (read as ""), or a list of text
parts (`[{"type": "text", "text": ...}]`, as Anthropic cache-control leaves it), which are joined.
Refused with `MiniSweError` naming the file and the field: another `trajectory_format`, image
parts, a tool-calling run (`tool_calls`, role "tool", Responses-API items: mini-swe-agent's
default `mini.yaml` / `swebench.yaml`; this project's protocol is its text mode,
`mini_textbased.yaml` / `swebench_backticks.yaml`), a run whose recorded `action_regex` is not
`ACTION_REGEX` (v1's ```bash blocks: its commands would not parse here), a format-error message
that lost the reply it answers, anything after the `exit` message, no system + user opening.
A file that holds nothing to import (not a trajectory at all, e.g. the batch runner's
`preds.json`; or a run that ended before the model's first reply) raises `NotImportableError`:
the verb lists it as refused and goes on.

The mapping (the record has the shape the collector writes, `dagger/collector.py`):

  system, user                      kept verbatim (the teacher's own prompts, not
                                    `envs.protocol`'s: its replies were conditioned on them)
  assistant                         an assistant message and a teacher turn: actor "teacher",
                                    reason "coin", action = label = the text (ids null: the
                                    renderer tokenises it), since a teacher model wrote it
  user (observation)                kept verbatim, format errors included (the text-mode templates
                                    print what `envs.protocol` prints)
  format error (v2)                 mini-swe-agent 2 does not keep the reply that broke the format
                                    as a message: it is the error message's `extra.model_response`.
                                    It is put back as the assistant message before the error, so
                                    the record reads as our env would have shown it (v1 kept it)
  after the last assistant message  dropped, as the collector ends a record with its last turn
                                    (the final observation, v1's closing submission message)
  exit / info                       the outcome: `submitted` iff exit_status is "Submitted",
                                    `patch` = info.submission, `resolved` null (not graded),
                                    `turns` = `teacher_calls` = the turns, `teacher_tokens` =
                                    whitespace-separated words of the replies (as the collector
                                    counts without a tokenizer), `failure` = the exit status when
                                    it is not a normal end (Submitted, LimitsExceeded,
                                    TimeExceeded, RepeatedFormatError): an exception, or a run
                                    that never finished (the agent saves after every step)

Replies that do not parse under the protocol (zero or several command blocks) are KEPT as teacher
turns, with the format-error observation that followed them. They are the teacher's actions at
those states, and what comes after them only makes sense with them: our env shows a student the
same format-error observation after its own slip, and the teacher's next reply there is the
recovery label DAgger wants learned. Cutting the episode at the first slip would throw away every
later label (usually the fix and the submit) and bias the seed data toward episodes without one.
The price is that the student also imitates the teacher's rare slips, at the teacher's rate;
`unparsed_turns` counts them (the verb prints it per import, so a run full of them stands out).
Known difference for v2 files: the reply after a format error was written without the bad reply
in its context (v2 drops it), while the record shows it there, as our env would.

Record ids are `{task_id}/r{round}/mswea-{digest}`, the digest a hash of the converted
conversation and outcome: re-importing a file gives the same id (the verb skips it), two
different runs of one task get two ids. `beta` is 1.0 (every turn is the teacher's).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from dagger_jax import redact
from dagger_jax.data.trajectory import Action, Outcome, Trajectory, Turn
from dagger_jax.errors import DaggerJaxError

FORMATS = ("mini-swe-agent-1", "mini-swe-agent-1.1")  # absent is read as the same shape
# mini-swe-agent's text-mode action regex (LitellmTextbasedModelConfig.action_regex), which is
# `envs.protocol.ACTION_REGEX` (the data room may not import envs/; tests/test_miniswe.py checks
# that the three agree).
ACTION_FENCE = "mswea_bash_command"
ACTION_REGEX = r"```mswea_bash_command\s*\n(.*?)\n```"
_ACTION_RE = re.compile(ACTION_REGEX, re.DOTALL)
SUBMITTED = "Submitted"
NORMAL_EXITS = (SUBMITTED, "LimitsExceeded", "TimeExceeded", "RepeatedFormatError")
_FAILURE_CHARS = 300  # of an exception's message kept in `Outcome.failure`


class MiniSweError(DaggerJaxError, ValueError):
  """A mini-swe-agent trajectory file cannot be imported; names the file and the field."""


class NotImportableError(MiniSweError):
  """A well-formed file with nothing to import: not a trajectory, or no reply of the model."""


def load_miniswe(path: str | os.PathLike) -> dict:
  """The JSON object of a trajectory file; `MiniSweError` when it is not one this module reads.

  Checks only the envelope (an object, a known `trajectory_format`, a `messages` list);
  `to_trajectory` checks the messages.
  """
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise MiniSweError(f"{path}: no such file") from None
  except UnicodeDecodeError as e:
    raise MiniSweError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise MiniSweError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno}); a "
                       "trajectory cut off by a crash? re-run that instance") from None
  if not isinstance(data, dict):
    raise NotImportableError(f"{path}: not a mini-swe-agent trajectory (a JSON "
                             f"{type(data).__name__}, not an object)")
  fmt = data.get("trajectory_format")
  if fmt is not None and fmt not in FORMATS:
    raise MiniSweError(f"{path}: trajectory_format {fmt!r} is not one this importer reads "
                       f"({', '.join(FORMATS)}, or none)")
  if not isinstance(data.get("messages"), list):
    if fmt is None:
      raise NotImportableError(f"{path}: not a mini-swe-agent trajectory (no `messages` list)")
    raise MiniSweError(f"{path}: messages: must be a list (trajectory_format {fmt!r})")
  if not isinstance(data.get("info", {}), dict):
    raise MiniSweError(f"{path}: info: must be an object")
  return data


def task_id_of(data: dict, path: str | os.PathLike | None = None) -> str | None:
  """The task (SWE-bench instance) id a trajectory names, or None.

  In order: the top-level `instance_id` (the swebench batch runner writes it), `info.instance_id`,
  then the runner's file layout `<out>/<instance_id>/<instance_id>.traj.json`.
  """
  for value in (data.get("instance_id"), data.get("info", {}).get("instance_id")):
    if isinstance(value, str) and value:
      return value
  if path is not None:
    name = os.path.basename(os.fspath(path))
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if name.endswith(".traj.json") and name[:-len(".traj.json")] == parent and parent:
      return parent
  return None


def _content(message: dict, field: str) -> str:
  content = message.get("content")
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    texts = []
    for j, part in enumerate(content):
      if not (isinstance(part, dict) and part.get("type") == "text"
              and isinstance(part.get("text"), str)):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise MiniSweError(f"{field}.content[{j}]: a {kind!r} part; only text parts can be "
                           "imported (the record holds text)")
      texts.append(part["text"])
    return "".join(texts)
  raise MiniSweError(f"{field}.content: must be a string or a list of text parts, got "
                     f"{type(content).__name__}")


def _check_protocol(data: dict) -> None:
  """Refuses a run whose recorded action regex is not the project's (v1's ```bash)."""
  config = data.get("info", {}).get("config")
  if not isinstance(config, dict):
    return
  for section in ("model", "agent"):  # v2 keeps it with the model, v1 with the agent
    part = config.get(section)
    regex = part.get("action_regex") if isinstance(part, dict) else None
    if isinstance(regex, str) and regex != ACTION_REGEX:
      raise MiniSweError(
          f"info.config.{section}.action_regex: {regex!r} is not this project's action protocol "
          f"{ACTION_REGEX!r}: the commands of these replies would not parse here (mini-swe-agent "
          "1.x used ```bash blocks); run the teacher with mini-swe-agent 2's mini_textbased.yaml "
          "or swebench_backticks.yaml")


def _is_format_error(message: dict) -> bool:
  extra = message.get("extra")
  return isinstance(extra, dict) and extra.get("interrupt_type") == "FormatError"


def _conversation(data: dict) -> tuple[list[dict[str, str]], dict | None]:
  """Our messages (system, user, then as the collector writes them) and the exit message."""
  raw = data["messages"]
  out: list[dict[str, str]] = []
  exit_message = None
  for i, m in enumerate(raw):
    field = f"messages[{i}]"
    if not isinstance(m, dict):
      raise MiniSweError(f"{field}: must be an object, got {type(m).__name__}")
    if exit_message is not None:
      raise MiniSweError(f"{field}: a message after the exit message (messages[{i - 1}])")
    role = m.get("role")
    if role is None and ("type" in m or "output" in m):
      raise MiniSweError(f"{field}: a Responses-API item ({m.get('type') or m.get('object')!r}), "
                         "from a tool-calling model class; only mini-swe-agent's text mode "
                         "(mini_textbased.yaml, swebench_backticks.yaml) can be imported")
    if role == "tool" or m.get("tool_calls"):
      key = "role" if role == "tool" else "tool_calls"
      raise MiniSweError(f"{field}.{key}: a tool-calling trajectory (mini-swe-agent's default "
                         "mini.yaml / swebench.yaml); only its text mode (mini_textbased.yaml, "
                         "swebench_backticks.yaml) is this project's protocol")
    if role not in ("system", "user", "assistant", "exit"):
      raise MiniSweError(f"{field}.role: must be system, user, assistant or exit, got {role!r}")
    if i < 2 and role != ("system", "user")[i]:
      raise MiniSweError(f"{field}.role: a trajectory opens with the system message and the task "
                         f"(user), got {role!r}")
    if role == "exit":
      exit_message = m
      continue
    content = _content(m, field)
    if role == "user" and _is_format_error(m) and out[-1]["role"] != "assistant":
      reply = m["extra"].get("model_response")  # v2: the reply is kept only here
      if not isinstance(reply, str):
        raise MiniSweError(f"{field}.extra.model_response: a format error without the reply it "
                           "answers (must be a string)")
      out.append({"role": "assistant", "content": reply})
    out.append({"role": role, "content": content})
  while out and out[-1]["role"] != "assistant":
    out.pop()
  return out, exit_message


def _exit(data: dict, exit_message: dict | None) -> tuple[str, str, str | None]:
  """(exit status, submission, exception text) from `info`, else from the exit message."""
  info = data.get("info", {})
  extra = (exit_message or {}).get("extra")
  extra = extra if isinstance(extra, dict) else {}
  status = info.get("exit_status") or extra.get("exit_status") or ""
  submission = info.get("submission")
  if submission is None:
    submission = extra.get("submission")
  submission = "" if submission is None else submission
  for key, value in (("exit_status", status), ("submission", submission)):
    if not isinstance(value, str):
      raise MiniSweError(f"info.{key}: must be a string, got {type(value).__name__}")
  exception = info.get("exception_str") or extra.get("exception_str")
  return status, submission, exception if isinstance(exception, str) else None


def unparsed_turns(traj: Trajectory) -> int:
  """How many of a record's assistant turns do not hold exactly one command block."""
  return sum(len(_ACTION_RE.findall(t.action.text)) != 1 for t in traj.turns)


def to_trajectory(data: dict, *, task_id: str, round_index: int = 0, seed: int = 0
                  ) -> Trajectory:
  """A teacher-only `Trajectory` of a loaded trajectory file (the mapping: module docstring).

  Raises `MiniSweError` naming the field (`convert_file` adds the file), `NotImportableError`
  when the model never replied.
  """
  if not isinstance(task_id, str) or not task_id:
    raise MiniSweError(f"task_id: must be a non-empty string, got {task_id!r}")
  _check_protocol(data)
  messages, exit_message = _conversation(data)
  status, submission, exception = _exit(data, exit_message)
  texts = [m["content"] for m in messages if m["role"] == "assistant"]
  if not texts:
    raise NotImportableError(f"no reply of the model to import (exit status {status or 'none'}"
                             + (f": {redact.redact_text(exception[:_FAILURE_CHARS])}"
                                if exception else "") + ")")
  turns = tuple(Turn("teacher", Action(t), Action(t), "coin") for t in texts)
  failure = None
  if status not in NORMAL_EXITS:
    failure = (f"mini-swe-agent exit status {status}" if status else
               "the mini-swe-agent run did not finish (no exit status)")
    if exception:
      failure += f": {redact.redact_text(' '.join(exception.split())[:_FAILURE_CHARS])}"
  outcome = Outcome(submitted=status == SUBMITTED, patch=submission, resolved=None,
                    turns=len(turns), teacher_calls=len(turns),
                    teacher_tokens=sum(len(t.split()) for t in texts), failure=failure)
  digest = hashlib.sha256(json.dumps([messages, outcome.to_dict()], sort_keys=True,
                                     ensure_ascii=False).encode()).hexdigest()[:12]
  return Trajectory(id=f"{task_id}/r{round_index}/mswea-{digest}", task_id=task_id,
                    round=round_index, seed=seed, beta=1.0, messages=tuple(messages),
                    turns=turns, outcome=outcome)


def convert_file(path: str | os.PathLike, *, task_id: str | None = None, round_index: int = 0,
                 seed: int = 0) -> Trajectory:
  """`load_miniswe` + `to_trajectory`, errors prefixed with the file; `task_id` (when given)
  wins over the id the file names (`task_id_of`)."""
  data = load_miniswe(path)
  task_id = task_id or task_id_of(data, path)
  if not task_id:
    raise MiniSweError(f"{path}: instance_id: the file names no task (no `instance_id`, top "
                       "level or in `info`, and not the batch runner's <id>/<id>.traj.json "
                       "layout); pass --task-id ID")
  try:
    return to_trajectory(data, task_id=task_id, round_index=round_index, seed=seed)
  except MiniSweError as e:
    raise type(e)(f"{path}: {e}") from None
