"""The episode record: one JSON line per DAgger episode.

A `Trajectory` holds the whole conversation (`messages`, as the chat template renders it) plus one
`Turn` per assistant message, in order:

    {"version": 1, "id": "toy-3/r1/s7", "task_id": "toy-3", "round": 1, "seed": 7, "beta": 0.5,
     "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "<task>"},
                  {"role": "assistant", "content": "```bash\\nls\\n```"},
                  {"role": "user", "content": "<returncode>0</returncode>..."}, ...],
     "turns": [{"actor": "student",
                "action": {"text": "```bash\\nls\\n```", "ids": [74, 75, 76, ...]},
                "label": {"text": "```bash\\ngit status\\n```", "ids": null},
                "reason": null, "intervention": null}, ...],
     "outcome": {"submitted": true, "patch": "diff --git ...", "resolved": false, "turns": 6,
                 "teacher_calls": 6, "teacher_tokens": 412, "failure": null}}

Contract of a turn:

- `action` is what was executed; its text is the assistant message's content. `ids` are the exact
  content token ids that were sampled, *without* the end-of-turn token (a trailing end-of-turn id is
  tolerated and dropped by the renderer). A student action must carry its ids: they are trained on
  or kept in context exactly, never re-tokenised from text. A teacher action or a label may give
  `ids: null` (e.g. a text-only teacher); the renderer then tokenises its text.
- `label` is the teacher's action for the state (null when the teacher was not asked). For a
  teacher-acted turn the action *is* the label: `label` is null or equal to `action`.
- `reason` says why the teacher acted: "coin" (the beta coin) or "intervention" (then
  `intervention` names the rule, e.g. "repeat_command"); both are null for a student turn.

`read_jsonl` validates every line; a bad one raises `TrajectoryError` naming the file, the line and
the field, e.g. `runs/r1.jsonl:12: turns[3].actor: must be 'student' or 'teacher', got 'robot'`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator

from dagger_jax import paths
from dagger_jax.errors import DaggerJaxError

VERSION = 1
ACTORS = ("student", "teacher")
REASONS = ("coin", "intervention")
ROLES = ("system", "user", "assistant", "tool")


class TrajectoryError(DaggerJaxError, ValueError):
  """A trajectory record is malformed; the message names the field (and file:line when read)."""


@dataclasses.dataclass(frozen=True)
class Action:
  text: str
  ids: tuple[int, ...] | None = None

  def to_dict(self) -> dict[str, Any]:
    return {"text": self.text, "ids": None if self.ids is None else list(self.ids)}


@dataclasses.dataclass(frozen=True)
class Turn:
  actor: str  # "student" | "teacher"
  action: Action  # what was executed
  label: Action | None = None  # the teacher's action for this state
  reason: str | None = None  # teacher turns: "coin" | "intervention"
  intervention: str | None = None  # the rule's name when reason == "intervention"

  def to_dict(self) -> dict[str, Any]:
    return {"actor": self.actor, "action": self.action.to_dict(),
            "label": None if self.label is None else self.label.to_dict(),
            "reason": self.reason, "intervention": self.intervention}


@dataclasses.dataclass(frozen=True)
class Outcome:
  submitted: bool = False
  patch: str = ""
  resolved: bool | None = None  # None = not graded
  turns: int = 0
  teacher_calls: int = 0
  teacher_tokens: int = 0
  # Why the episode ended before its environment did, when a policy could not act on it (e.g. a
  # remote teacher's labels kept breaking the action protocol: `policies.base.LabelError`). Its
  # turns so far are kept: each visited state still has its label.
  failure: str | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Trajectory:
  id: str
  task_id: str
  round: int
  seed: int
  beta: float
  messages: tuple[dict[str, str], ...]
  turns: tuple[Turn, ...]
  outcome: Outcome = Outcome()
  version: int = VERSION

  def __post_init__(self):
    validate(self.to_dict())

  def to_dict(self) -> dict[str, Any]:
    return {"version": self.version, "id": self.id, "task_id": self.task_id, "round": self.round,
            "seed": self.seed, "beta": self.beta,
            "messages": [dict(m) for m in self.messages],
            "turns": [t.to_dict() for t in self.turns], "outcome": self.outcome.to_dict()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
    validate(d)

    def action(a):
      return None if a is None else Action(a["text"], None if a.get("ids") is None else
                                           tuple(a["ids"]))

    turns = tuple(Turn(t["actor"], action(t["action"]), action(t.get("label")), t.get("reason"),
                       t.get("intervention")) for t in d["turns"])
    outcome = Outcome(**d.get("outcome", {}))
    return cls(id=d["id"], task_id=d["task_id"], round=d["round"], seed=d["seed"],
               beta=float(d["beta"]), messages=tuple(dict(m) for m in d["messages"]),
               turns=turns, outcome=outcome, version=d["version"])

  def assistant_indices(self) -> list[int]:
    """Indices into `messages` of the assistant messages (one per turn)."""
    return [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]


def _check(ok: bool, field: str, why: str) -> None:
  if not ok:
    raise TrajectoryError(f"{field}: {why}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _check_action(a: Any, field: str, need_ids: bool) -> None:
  _check(isinstance(a, dict), field, f"must be an object, got {type(a).__name__}")
  _check(isinstance(a.get("text"), str), f"{field}.text", "must be a string")
  ids = a.get("ids")
  if ids is None:
    _check(not need_ids, f"{field}.ids",
           "a student action must carry the exact sampled token ids (got null)")
    return
  _check(isinstance(ids, list) and all(_is_int(i) and i >= 0 for i in ids), f"{field}.ids",
         "must be a list of non-negative ints")


def validate(d: Any) -> None:
  """Raises TrajectoryError naming the first bad field of a trajectory dict."""
  _check(isinstance(d, dict), "<record>", f"must be a JSON object, got {type(d).__name__}")
  _check(d.get("version") == VERSION, "version",
         f"unsupported version {d.get('version')!r} (this code reads version {VERSION})")
  for key in ("id", "task_id"):
    _check(isinstance(d.get(key), str) and d[key] != "", key, "must be a non-empty string")
  for key in ("round", "seed"):
    _check(_is_int(d.get(key)) and d[key] >= 0, key, f"must be an int >= 0, got {d.get(key)!r}")
  beta = d.get("beta")
  _check(isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta <= 1, "beta",
         f"must be a number in [0, 1], got {beta!r}")
  messages = d.get("messages")
  _check(isinstance(messages, list) and messages, "messages", "must be a non-empty list")
  for i, m in enumerate(messages):
    _check(isinstance(m, dict), f"messages[{i}]", "must be an object")
    _check(m.get("role") in ROLES, f"messages[{i}].role", f"must be one of {ROLES}, got "
           f"{m.get('role')!r}")
    _check(isinstance(m.get("content"), str), f"messages[{i}].content", "must be a string")
  assistant = [m["content"] for m in messages if m["role"] == "assistant"]
  turns = d.get("turns")
  _check(isinstance(turns, list), "turns", "must be a list")
  _check(len(turns) == len(assistant), "turns",
         f"has {len(turns)} entries but messages has {len(assistant)} assistant messages")
  for k, t in enumerate(turns):
    f = f"turns[{k}]"
    _check(isinstance(t, dict), f, "must be an object")
    actor = t.get("actor")
    _check(actor in ACTORS, f"{f}.actor", f"must be 'student' or 'teacher', got {actor!r}")
    _check_action(t.get("action"), f"{f}.action", need_ids=actor == "student")
    _check(t["action"]["text"] == assistant[k], f"{f}.action.text",
           f"differs from the content of assistant message {k}")
    if t.get("label") is not None:
      _check_action(t["label"], f"{f}.label", need_ids=False)
    if actor == "teacher":
      _check(t.get("reason") in REASONS, f"{f}.reason",
             f"a teacher turn must say why the teacher acted {REASONS}, got {t.get('reason')!r}")
      _check(t.get("label") is None or t["label"]["text"] == t["action"]["text"], f"{f}.label",
             "a teacher-acted turn's label must be null or equal its action")
      if t["reason"] == "intervention":
        _check(isinstance(t.get("intervention"), str) and t["intervention"], f"{f}.intervention",
               "must name the intervention rule")
    else:
      _check(t.get("reason") is None and t.get("intervention") is None, f"{f}.reason",
             "must be null for a student-acted turn")
  outcome = d.get("outcome", {})
  _check(isinstance(outcome, dict), "outcome", "must be an object")
  known = {f.name for f in dataclasses.fields(Outcome)}
  unknown = set(outcome) - known
  _check(not unknown, "outcome", f"unknown keys {sorted(unknown)}")
  for key in ("turns", "teacher_calls", "teacher_tokens"):
    if key in outcome:
      _check(_is_int(outcome[key]) and outcome[key] >= 0, f"outcome.{key}", "must be an int >= 0")
  for key in ("submitted",):
    if key in outcome:
      _check(isinstance(outcome[key], bool), f"outcome.{key}", "must be true or false")
  if "resolved" in outcome:
    _check(outcome["resolved"] is None or isinstance(outcome["resolved"], bool),
           "outcome.resolved", "must be true, false or null")
  if "patch" in outcome:
    _check(isinstance(outcome["patch"], str), "outcome.patch", "must be a string")


def iter_jsonl(path: str | os.PathLike) -> Iterator[Trajectory]:
  """Yields the trajectories of a JSON Lines file; blank lines are skipped.

  Raises TrajectoryError("FILE:LINE: field: why") at the first bad line.
  """
  # A local file or a bucket's object (`dagger_jax.paths`), read as bytes and split at b"\n"
  # only, then decoded line by line, so that a byte that is not UTF-8 names its line.
  with paths.open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise TrajectoryError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of "
                              f"the line)") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise TrajectoryError(f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno})"
                              ) from None
      try:
        yield Trajectory.from_dict(record)
      except TrajectoryError as e:
        raise TrajectoryError(f"{path}:{lineno}: {e}") from None


def read_jsonl(path: str | os.PathLike) -> list[Trajectory]:
  return list(iter_jsonl(path))


def cut_torn_tail(path: str | os.PathLike) -> int:
  """Cuts a torn last line (a process killed mid-append) off a JSON Lines file; returns the bytes
  dropped (0 when the file ends with a newline or does not exist), so appends start on a fresh
  line and every line left parses. Only process 0 cuts (see `append_lines`); on a bucket the
  object is rewritten without the tail."""
  if not paths.is_chief() or not paths.exists(path):
    return 0
  if paths.is_remote(path):
    data = paths.read_bytes(path)
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
      paths.write_atomic(path, data[:keep])
    return len(data) - keep
  with open(path, "rb+") as f:
    data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
      f.truncate(keep)
  return len(data) - keep


def append_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
  """Appends `lines` (each without its newline) to `path` in one `write` call, so that a batch
  (a collection wave's episodes, `dagger.collector`) lands together: a kill leaves all of it, or
  none, or (only if the kernel is stopped inside that one call) a prefix whose torn tail
  `cut_torn_tail` removes. One line per `write` would leave part of a wave for every kill
  between two of them.

  Multi-host: every process runs the same loop and would append the same lines, so only process 0
  (`paths.is_chief`) writes; the others return at once. On a bucket the object is rewritten with
  the lines at its end (`paths.append`: objects cannot be appended to), each version whole."""
  if paths.is_chief():
    paths.append(path, "".join(line + "\n" for line in lines))


def write_jsonl(path: str | os.PathLike, trajectories: Iterable[Trajectory],
                append: bool = False) -> int:
  """Writes one line per trajectory (appending if asked); returns the number written.

  Each line is flushed whole, so an interrupted append never leaves earlier lines damaged.
  `path` may be a bucket's object (`dagger_jax.paths`: written whole, appends rewrite it).
  """
  if paths.is_remote(path):
    lines = [json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in trajectories]
    (paths.append if append else paths.write_atomic)(path, "".join(lines))
    return len(lines)
  n = 0
  with open(path, "a" if append else "w", encoding="utf-8") as f:
    for t in trajectories:
      f.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")
      n += 1
    f.flush()
  return n
