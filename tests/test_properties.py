"""Malformed model output is ordinary: property-based tests (hypothesis) of the protocol parser,
the renderer and the collector's handling of a student turn.

A student samples any token ids: text with nested, unbalanced or several fences, special tokens
(an end-of-turn in the middle), bytes that are not UTF-8 on their own, an empty turn, a huge one,
a turn that is the submit sentinel alone. Each must end as a format error or an ordinary
observation, never an exception, and the rendered rows must hold the student's exact ids and
train each label on exactly the prompt the policy saw.

Everything is real: the parser, mini-swe-agent's regex (the oracle for the linear-time scan), the
demo's byte-level BPE and the real Qwen3 tokenizer with its chat template, and for the collector
`collector.collect` itself with the oracle teacher and a toy task in the bubblewrap sandbox. Only
the student is scripted: it returns the drawn ids as `JaxPolicy` would (`student_actions`).
Examples are derandomized (the same ones every run) and modest in number, so the file runs in
well under a minute on 2 cores.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import support
from dagger_jax.configlib import REPO_ROOT
from dagger_jax.dagger import collector, intervention
from dagger_jax.data import render
from dagger_jax.data.tokenizer import load_tokenizer_dir, qwen3_tokenizer_dir
from dagger_jax.data.trajectory import Action, Trajectory, Turn, read_jsonl, write_jsonl
from dagger_jax.envs import protocol
from dagger_jax.envs.sandbox import ExecResult
from dagger_jax.envs.tasks import toy
from dagger_jax.policies.base import Policy, student_actions
from dagger_jax.policies.oracle import OracleTeacher

DEMO_TOKENIZER = os.path.join(REPO_ROOT, "assets", "demo_base", "tokenizer")


def _settings(n: int):
  return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def demo_tok():
  return load_tokenizer_dir(DEMO_TOKENIZER)


# ---------------------------------------------------------------------------------- strategies

FENCE = f"```{protocol.ACTION_FENCE}"
# What a malformed turn is made of: fences whole and broken, white space the regex's `\s` takes
# (and some it does not), the sentinel, the chat format's special tokens, the renderer's
# placeholder shape (private-use U+E000 .. U+E001), a replacement character, a NUL.
PIECES = (FENCE, FENCE + "\n", "```", "\n```", "```bash\n", "``", "`", "\n", "\r\n", " ", "\t",
          "\x0b", "\u2028", "\u00a0", "\x00", "ls -la", "echo hi", "cat <<'EOF'\n", "\nEOF",
          f"echo {protocol.SUBMIT_SENTINEL}", protocol.SUBMIT_SENTINEL, "THOUGHT: ", "<|im_end|>",
          "<|im_start|>", "<|endoftext|>", "<think>", "</think>", "<tool_response>",
          "</tool_response>", "\ue0000\ue001", "\ue0000.0\ue001", "\ue000", "\ufffd", "é", "🙂")
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=12)), max_size=24).map(
    "".join)


_PARTIAL: dict[int, list[int]] = {}


def token_ids(tok, max_size: int = 40):
  """Ids a sampler may return: any id, the special ones (end-of-turn included, anywhere),
  partial UTF-8 byte tokens, and encodings of malformed text, mixed."""
  special = list(tok.all_special_ids)
  if id(tok) not in _PARTIAL:  # byte tokens that are not UTF-8 alone (they decode to U+FFFD)
    _PARTIAL[id(tok)] = [i for i in range(min(len(tok), 4096)) if tok.decode([i]) == "\ufffd"]
  partial = _PARTIAL[id(tok)]
  raw = st.lists(st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(special + partial)),
                 max_size=max_size)
  encoded = texts.map(lambda t: tok.encode(t, add_special_tokens=False)[:max_size])
  return st.one_of(raw, encoded, st.tuples(encoded, raw).map(lambda p: p[0] + p[1]),
                   st.tuples(raw, encoded).map(lambda p: p[0] + p[1]))


# ------------------------------------------------------------------------------------ protocol


@_settings(1000)
@given(texts)
@example("")
@example(protocol.SUBMIT_SENTINEL)
@example(f"{FENCE}\n{FENCE}\nls\n```\n```")  # nested
@example(f"{FENCE}\nls\n```{FENCE}\npwd\n```")  # a closer that opens the next block
@example(f"{FENCE}\n\n```")  # the regex backs off to the first newline: an empty command
@example(f"{FENCE}  \n \n```")
def test_parser_is_total_and_agrees_with_the_regex(text):
  """Any text parses: exactly one block is an action, anything else a format error, and the
  linear scan finds exactly the blocks of mini-swe-agent's regex."""
  found = protocol.find_actions(text)
  assert found == protocol._ACTION_RE.findall(text)
  parsed = protocol.parse_action(text)
  assert parsed.n_actions == len(found)
  if len(found) == 1:
    assert parsed.ok and parsed.command == found[0].strip()
  else:
    assert not parsed.ok and parsed.command is None
    error = protocol.format_error(parsed.n_actions)
    assert f"Expected exactly 1 action, found {len(found)}." in error


@_settings(200)
@given(texts, st.sampled_from(["ls", "git status", f"echo {protocol.SUBMIT_SENTINEL}",
                               "cat <<'EOF' > a.py\nx = 1\nEOF"]))
def test_format_action_round_trips_under_any_thought(thought, command):
  """A scripted action parses back to its command whatever thought precedes it, unless the
  thought opens a block of its own (then the blocks differ, as for mini-swe-agent)."""
  parsed = protocol.parse_action(protocol.format_action(command, thought))
  if FENCE not in thought:
    assert parsed.command == command


@_settings(300)
@given(texts, st.integers(-9, 255), st.booleans(), st.integers(0, 50_000),
       st.integers(1, 3_000))
def test_any_command_output_is_an_ordinary_observation(output, returncode, timed_out, elided,
                                                       limit):
  result = ExecResult(returncode, output, timed_out, 0.5, elided_chars=elided)
  obs = protocol.format_observation(result, output_limit=limit, command="x", timeout=1.0)
  assert obs.startswith("<exception>" if timed_out else "<returncode>")
  if len(output) + elided < limit:
    assert obs.endswith(f"<output>\n{output}</output>")
  else:  # the head and the tail are exact
    assert f"<output_head>\n{output[:limit // 2]}\n</output_head>" in obs
    tail = output[-(limit - limit // 2):]  # all of it when the sandbox kept less
    assert obs.endswith(f"<output_tail>\n{tail}\n</output_tail>")
  assert protocol.is_submission(result) in (True, False)


@_settings(5)
@given(st.integers(100_000, 450_000), st.sampled_from([f"{FENCE}\nls``` ", f"{FENCE} ",
                                                       f"{FENCE}\n", "```\n", "\n```"]))
def test_a_huge_turn_parses_in_linear_time(size, unit):
  """mini-swe-agent's regex is quadratic in unclosed openers: 448 000 characters of
  "```mswea_bash_command\\nls``` " took it 74 s. The scan takes milliseconds (the bound leaves
  a wide margin for a loaded machine)."""
  text = unit * (size // len(unit))
  start = time.perf_counter()
  parsed = protocol.parse_action(text)
  assert time.perf_counter() - start < 1.0
  assert parsed.n_actions == len(protocol.find_actions(text))


# ------------------------------------------------------------------------------------ renderer


def _visible(row: render.Row, i: int) -> list[int]:
  """The tokens slot i attends to, in order (render's rule: j <= i, same segment, branch 0 or
  the slot's own branch)."""
  b, s = row.branch_ids[i], row.segment_ids[i]
  return [int(row.tokens[j]) for j in range(i + 1)
          if row.segment_ids[j] == s and row.branch_ids[j] in (0, b)]


def _label_ids(tok, action: Action) -> list[int]:
  """The trained ids of a label: its ids, else its text encoded; a trailing end-of-turn is the
  record's, not the content's (trajectory contract)."""
  ids = list(action.ids) if action.ids is not None else tok.encode(action.text,
                                                                   add_special_tokens=False)
  return ids[:-1] if ids and ids[-1] == tok.eos_token_id else ids


def check_rows(traj: Trajectory, tok, rows: list[render.Row], enable_thinking: bool,
               whole: bool = True) -> int:
  """The row invariants; returns how many labels the rows train.

  - every trained label's targets are exactly its ids + end-of-turn, and what its last slot
    sees is exactly the prompt the policy was given at that state (`render.prompt_ids`, which
    places earlier student turns as their exact ids) followed by the label;
  - `whole` (one row holds the trajectory): every student turn's exact ids + end-of-turn lie on
    the main line.
  """
  eos = tok.eos_token_id
  indices = traj.assistant_indices()
  all_ids = [t.action.ids for t in traj.turns]
  trained = 0
  for row in rows:
    assert len(row) == len(row.targets) == len(row.loss_mask)
    for k, turn in enumerate(traj.turns):
      slots = [i for i in range(len(row)) if row.label_ids[i] == k + 1]
      if not slots:
        continue
      trained += 1
      label = turn.action if turn.actor == "teacher" else turn.label
      want = _label_ids(tok, label) + [eos]
      assert [int(row.targets[i]) for i in slots] == want
      assert all(row.loss_mask[i] == 1 for i in slots)
      prompt = render.prompt_ids(traj.messages[:indices[k]], all_ids[:k], tok, enable_thinking)
      assert _visible(row, slots[-1]) + [int(row.targets[slots[-1]])] == prompt + want
  main_lines = [[int(t) for t, b in zip(r.tokens, r.branch_ids) if b == 0] for r in rows]
  for turn in traj.turns:
    if turn.actor == "student" and rows and whole:
      ids = _label_ids(tok, turn.action) + [eos]
      assert any(_contains(line, ids) for line in main_lines)
  return trained


def _contains(seq: list[int], sub: list[int]) -> bool:
  return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def observations():
  """A user message: an ordinary observation, a format error, or any text at all."""
  return st.one_of(
      st.builds(lambda o, rc: protocol.format_observation(ExecResult(rc, o, False, 0.1)), texts,
                st.integers(0, 2)),
      st.builds(protocol.format_error, st.integers(0, 3)),
      texts, texts.map(lambda t: f"<tool_response>{t}</tool_response>"))


@st.composite
def trajectories(draw, tok):
  """A conversation of 1-4 turns: student turns of drawn ids (their text decoded from them, a
  label or none), teacher turns of drawn text; drawn observations between them."""
  messages = [{"role": "system", "content": protocol.system_prompt()},
              {"role": "user", "content": protocol.instance_prompt(draw(texts))}]
  turns = []
  n = draw(st.integers(1, 4))
  for k in range(n):
    if draw(st.integers(0, 3)):
      ids = draw(token_ids(tok))
      action = Action(tok.decode(ids, skip_special_tokens=False), tuple(ids))
      label = draw(st.one_of(st.none(), texts.map(Action), token_ids(tok).map(
          lambda i: Action(tok.decode(i, skip_special_tokens=False), tuple(i)))))
      turns.append(Turn("student", action, label))
    else:
      action = Action(draw(texts))
      turns.append(Turn("teacher", action, draw(st.sampled_from([None, action])), "coin"))
    messages.append({"role": "assistant", "content": action.text})
    if k < n - 1 or draw(st.booleans()):
      messages.append({"role": "user", "content": draw(observations())})
  return Trajectory(id="prop/r0/s0", task_id="prop", round=0, seed=0, beta=0.5,
                    messages=tuple(messages), turns=tuple(turns))


@pytest.fixture(scope="module")
def qwen_tok():
  return load_tokenizer_dir(qwen3_tokenizer_dir())


@pytest.mark.parametrize("tok_name", ["demo_tok", "qwen_tok"])
def test_any_trajectory_renders_with_exact_ids(request, tok_name):
  tok = request.getfixturevalue(tok_name)

  @_settings(100 if tok_name == "demo_tok" else 40)
  @given(trajectories(tok), st.booleans(), st.sampled_from([100_000, 400, 120]),
         st.sampled_from(["split", "drop"]))
  def run(traj, enable_thinking, max_len, too_long):
    # The record survives JSON Lines as it is: the ids exactly, any text.
    line = json.dumps(traj.to_dict(), ensure_ascii=False)
    assert Trajectory.from_dict(json.loads(line)) == traj
    rows, stats = render.render(traj, tok, max_len, too_long, enable_thinking)
    assert all(len(r) <= max_len for r in rows) and stats["rows"] == len(rows)
    labelled = any(t.actor == "teacher" or t.label is not None for t in traj.turns)
    if not labelled:
      assert rows == [] and stats["dropped_untrained_rows"] == 1
    trained = check_rows(traj, tok, rows, enable_thinking, whole=not stats["split_trajectories"])
    assert trained == stats["trained_turns"]
    if max_len == 100_000 and labelled:  # nothing too long: every label is trained
      assert trained == sum(t.actor == "teacher" or t.label is not None for t in traj.turns)

  run()


def test_placeholder_shaped_text_renders(demo_tok):
  """Regression: the renderer cut the template's text at `\\ue000<k>\\ue001` placeholders, so a
  student command of those characters, echoed back by bash ("command not found"), made both
  `render` and the student's own next prompt (`prompt_ids`) fail with RenderError."""
  command = "\ue0000\ue001"
  text = protocol.format_action(command)
  ids = tuple(demo_tok.encode(text, add_special_tokens=False))
  messages = ({"role": "system", "content": "s"}, {"role": "user", "content": "u"},
              {"role": "assistant", "content": text},
              {"role": "user", "content": f"bash: line 1: {command}: command not found"},
              {"role": "assistant", "content": "x"})
  traj = Trajectory("p", "p", 0, 0, 0.0, messages, (
      Turn("student", Action(text, ids), Action("ls")),
      Turn("student", Action("x", tuple(demo_tok.encode("x"))), Action("pwd"))))
  rows, _ = render.render(traj, demo_tok, 4096)
  assert check_rows(traj, demo_tok, rows, False) == 2
  prompt = render.prompt_ids(list(messages[:4]), [ids], demo_tok)
  assert _contains(prompt, list(ids) + [demo_tok.eos_token_id])


# ----------------------------------------------------------------------------------- collector


class SampledIds(Policy):
  """The student: returns the drawn ids of each turn (the last ones again once they run out),
  through `student_actions`, as the JAX and SGLang students do (the end-of-turn that stopped
  the sampler stripped, the text decoded from exactly the ids)."""

  name = "student"

  def __init__(self, turns: list[list[int]], tok):
    self.turns, self.tok, self.calls = turns, tok, 0

  def act(self, views):
    ids = self.turns[min(self.calls, len(self.turns) - 1)]
    self.calls += 1
    return student_actions([ids] * len(views), self.tok)


@pytest.fixture(scope="module")
def toy_task():
  return toy.generate(1, 5, split="train")


def test_any_student_turn_ends_as_a_format_error_or_an_observation(demo_tok, toy_task):
  """`collector.collect` on a toy task in the real sandbox, the oracle labelling every state,
  with the intervention rules on or off: whatever ids the student samples (drawn ids, or a
  block around a drawn command, with or without the end-of-turn that stopped the sampler), the
  episode goes on or ends as an episode does (submitted, format errors, max turns); each turn
  gets an observation or a format error; each student turn is recorded with its exact ids and
  the text they decode to; the record survives JSON Lines; its rows hold the ids."""
  eos = demo_tok.eos_token_id
  seen = collections.Counter()  # what the examples exercised
  sentinel = demo_tok.encode(protocol.SUBMIT_SENTINEL, add_special_tokens=False)
  submit = demo_tok.encode(protocol.format_action(f"echo {protocol.SUBMIT_SENTINEL}"),
                           add_special_tokens=False)

  blocks = st.builds(protocol.format_action, texts, texts).map(
      lambda t: demo_tok.encode(t, add_special_tokens=False))
  turn = st.tuples(st.one_of(token_ids(demo_tok), blocks), st.booleans()).map(
      lambda p: p[0] + [eos] * p[1])
  rules = tuple(intervention.RULES)

  @_settings(30)
  @given(st.lists(turn, min_size=1, max_size=3), st.sampled_from([rules, ()]))
  @example([[]], rules)  # an empty turn
  @example([[eos]], rules)  # a turn that is only the end-of-turn
  @example([sentinel + [eos]], ())  # exactly the sentinel, no block: a format error
  @example([submit + [eos]], ())  # a real submission
  @example([demo_tok.encode(protocol.format_action("\ue0000\ue001"), add_special_tokens=False),
            [5, 6]], rules)  # the placeholder-shaped command, echoed back by bash
  def run(turns, interventions):
    c = support.config(1, 1, max_turns=len(turns) + 1, command_timeout=5)
    trajs, stats = collector.collect(toy_task, config=c, round_index=0, beta=0.0,
                                     teacher=OracleTeacher(), student=SampledIds(turns, demo_tok),
                                     grade=False, progress=False, interventions=interventions)
    assert stats.failed == 0 and stats.episodes == 1 and len(trajs) == 1
    traj = trajs[0]
    assert set(stats.exit_status) <= {"submitted", "format_errors", "max_turns"}
    seen.update(stats.exit_status)
    users = [m for m in traj.messages[2:] if m["role"] == "user"]
    for k, turn in enumerate(traj.turns):
      if turn.actor == "student":
        given_ids = turns[min(k, len(turns) - 1)]
        want = given_ids[:-1] if given_ids and given_ids[-1] == eos else given_ids
        assert list(turn.action.ids) == want
        assert turn.action.text == demo_tok.decode(want, skip_special_tokens=False)
        assert turn.label is not None  # the oracle labelled the state
      if k < len(users):  # what the turn got back: an observation, or a format error
        parsed = protocol.parse_action(turn.action.text)
        obs = users[k]["content"]
        seen["a command ran" if parsed.ok else "a format error"] += 1
        if parsed.ok:
          assert obs.startswith(("<returncode>", "<exception>")), obs[:200]
        else:
          assert obs == protocol.format_error(parsed.n_actions)
    with tempfile.TemporaryDirectory() as d:
      write_jsonl(os.path.join(d, "t.jsonl"), [traj])
      assert read_jsonl(os.path.join(d, "t.jsonl")) == [traj]
    rows, _ = render.render(traj, demo_tok, 100_000)
    assert check_rows(traj, demo_tok, rows, False) == len(traj.turns)

  run()  # and the examples reached every outcome
  assert all(seen[k] for k in ("a command ran", "a format error", "submitted", "max_turns",
                               "format_errors")), dict(seen)


def test_a_huge_student_turn_is_an_ordinary_turn(demo_tok, toy_task):
  """A 30 000-id turn (the sampler at a large max_new_tokens), of unclosed fences or of anything:
  the episode steps it like any other, and rendering drops or splits it, counted."""
  unit = demo_tok.encode(f"{FENCE}\nls``` ", add_special_tokens=False)

  @_settings(3)
  @given(st.sampled_from(["fences", "random"]), st.integers(0, 2**32 - 1))
  def run(kind, seed):
    import random
    rng = random.Random(seed)
    ids = (unit * (30_000 // len(unit)) if kind == "fences"
           else [rng.randrange(len(demo_tok)) for _ in range(30_000)])
    c = support.config(1, 1, max_turns=2, command_timeout=5)
    trajs, stats = collector.collect(toy_task, config=c, round_index=0, beta=0.0,
                                     teacher=OracleTeacher(), student=SampledIds([ids], demo_tok),
                                     grade=False, progress=False)
    assert stats.failed == 0 and len(trajs) == 1
    assert list(trajs[0].turns[0].action.ids) == ids
    rows, stats = render.render(trajs[0], demo_tok, 2048, "split")
    assert stats["dropped_too_long_turns"] >= 1  # the huge turn's own label no longer fits
    check_rows(trajs[0], demo_tok, rows, False, whole=False)

  run()
