"""Rendering: the real Qwen3 template, exact student ids, label branches, too-long policies."""

import numpy as np
import pytest

from configs import base
from dagger_jax.data import render, synthetic
from dagger_jax.data.tokenizer import (TokenizerError, load_tokenizer, qwen3_chat_template,
                                       train_demo_tokenizer)
from dagger_jax.data.trajectory import Action, Trajectory, Turn

MESSAGES = (
    {"role": "system", "content": "You are a helpful assistant that can run bash commands."},
    {"role": "user", "content": "Fix add() in src/calc.py: add(1, 1) returns 0."},
    {"role": "assistant", "content": "THOUGHT: look first.\n\n```bash\ncat src/calc.py\n```"},
    {"role": "user", "content": "<returncode>0</returncode>\n<output>\ndef add(a, b):\n"
                                "    return a - b\n</output>"},
    {"role": "assistant", "content": "```bash\nsed -i 's/a - b/a + b/' src/calc.py\n```"},
    {"role": "user", "content": "<returncode>0</returncode>\n<output>\n</output>"},
    {"role": "assistant", "content": "```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```"},
)


def _teacher_only(messages) -> Trajectory:
  turns = tuple(Turn("teacher", Action(m["content"]), None, "coin") for m in messages
                if m["role"] == "assistant")
  return Trajectory("t/r0/s0", "t", 0, 0, 1.0, tuple(messages), turns)


def _data_config(**changes):
  c = base.get_config().data
  c.update(changes)
  return c


@pytest.fixture(scope="module")
def qwen():
  return load_tokenizer(_data_config(tokenizer="qwen3"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train_demo_tokenizer(synthetic.CORPUS * 4 + tuple(m["content"] for m in MESSAGES),
                       f"{workdir}/tokenizer", vocab_size=1024)
  return load_tokenizer(_data_config(tokenizer="demo-bpe"), workdir=workdir)


def _visible(row: render.Row, q: int) -> np.ndarray:
  """The slots the prediction at slot q attends to (the attention rule of DESIGN.md), in order."""
  j = np.arange(q + 1)
  ok = (row.segment_ids[j] == row.segment_ids[q]) & (
      (row.branch_ids[j] == 0) | (row.branch_ids[j] == row.branch_ids[q]))
  return j[ok]


@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("ends_with_user", [False, True])
@pytest.mark.parametrize("tok_name", ["qwen", "demo"])
def test_teacher_only_row_is_the_chat_template(request, tok_name, enable_thinking, ends_with_user):
  tok = request.getfixturevalue(tok_name)
  messages = MESSAGES + (({"role": "user", "content": "ok"},) if ends_with_user else ())
  config = _data_config(enable_thinking=enable_thinking)
  rows, stats = render.render_with_config(_teacher_only(messages), tok, config)
  assert len(rows) == 1 and stats["rows"] == 1 and stats["trained_turns"] == 3
  row = rows[0]
  # The main line is the conversation as the real template renders it.
  expected = tok.apply_chat_template(list(messages), tokenize=True,
                                     enable_thinking=enable_thinking)["input_ids"]
  assert row.tokens[row.branch_ids == 0].tolist() == expected
  # Each turn's content + <|im_end|> is learned on exactly the generation prompt of its state.
  eos = tok.eos_token_id
  learned = 0
  for k, index in enumerate(i for i, m in enumerate(messages) if m["role"] == "assistant"):
    prompt = tok.apply_chat_template(list(messages[:index]), tokenize=True,
                                     add_generation_prompt=True,
                                     enable_thinking=enable_thinking)["input_ids"]
    label = tok.encode(messages[index]["content"], add_special_tokens=False) + [eos]
    slots = np.flatnonzero((row.label_ids == k + 1) & (row.loss_mask == 1))
    assert row.targets[slots].tolist() == label
    seen = _visible(row, slots[-1])
    assert row.tokens[seen].tolist() + [row.targets[slots[-1]]] == prompt + label
    assert row.positions[seen].tolist() == list(range(len(seen)))
    assert slots.tolist() == seen[-len(label):].tolist()
    learned += len(label)
  assert row.loss_mask.sum() == learned
  # Qwen3: the generation header carries an empty think block without thinking, history turns do
  # not; the last assistant message renders with one. Labels whose headers differ are branches.
  if enable_thinking:
    assert stats["branches"] == (0 if ends_with_user else 1)
  else:
    assert stats["branches"] == (3 if ends_with_user else 2)


def test_demo_template_is_qwen3(demo, qwen):
  assert demo.chat_template == qwen3_chat_template()
  assert len(demo) <= 1024
  assert demo.pad_token_id == 0 and demo.eos_token == "<|im_end|>"
  for thinking in (False, True):
    kw = dict(tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    assert demo.apply_chat_template(list(MESSAGES[:2]), **kw) == qwen.apply_chat_template(
        list(MESSAGES[:2]), **kw)


def test_demo_tokenizer_missing_names_path(tmp_path):
  with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer")):
    load_tokenizer(_data_config(tokenizer="demo-bpe"), workdir=str(tmp_path))
  with pytest.raises(TokenizerError, match="nope"):
    load_tokenizer(_data_config(tokenizer=str(tmp_path / "nope")))


def _student_turn_trajectory(tok, student_ids, label):
  messages = MESSAGES[:2] + ({"role": "assistant", "content": tok.decode(student_ids)},
                             {"role": "user", "content": "<returncode>0</returncode>"})
  turns = (Turn("student", Action(messages[2]["content"], tuple(student_ids)), label),)
  return Trajectory("s/r1/s0", "s", 1, 0, 0.0, messages, turns)


def test_student_turn_with_differing_label_is_a_branch(demo):
  # With thinking on, the Qwen3 generation header equals the history header: the worked example
  # of render's docstring, exactly.
  eot = demo.eos_token_id
  # Non-canonical ids (one token per character): the row must keep them, never re-tokenise.
  student_text = "catsrc"
  student_ids = demo.convert_tokens_to_ids(list(student_text))
  assert student_ids != demo.encode(student_text, add_special_tokens=False)
  label_ids = demo.encode("```bash\ngit diff\n```", add_special_tokens=False)
  traj = _student_turn_trajectory(demo, student_ids, Action(demo.decode(label_ids)))
  (row,), stats = render.render(traj, demo, max_len=4096, enable_thinking=True)
  assert stats["branches"] == 1
  branch = np.flatnonzero(row.branch_ids == 1)
  assert row.tokens[branch].tolist() == label_ids + [eot]
  after = branch[-1] + 1
  student = np.arange(after, after + len(student_ids) + 1)
  assert row.tokens[student].tolist() == student_ids + [eot]
  # The branch continues the prefix's positions; the student's tokens restart at the same ones.
  header_last = branch[0] - 1
  assert row.positions[branch[0]] == row.positions[header_last] + 1
  assert row.positions[student].tolist() == row.positions[branch].tolist()[:len(student)]
  # Trained: the last header token toward the label's first token, then the label through <eot>.
  assert np.flatnonzero(row.loss_mask).tolist() == list(range(header_last, branch[-1]))
  assert row.targets[header_last] == label_ids[0]
  assert row.targets[branch[:-1]].tolist() == label_ids[1:] + [eot]
  assert (row.label_ids[row.loss_mask == 1] == 1).all()
  # The main line without the branch is the conversation as executed.
  expected = demo.apply_chat_template(list(traj.messages), tokenize=False, enable_thinking=True)
  assert demo.decode(row.tokens[row.branch_ids == 0].tolist()) == expected


def test_branch_starts_with_the_generation_header_rest(demo):
  # Without thinking, the prompt the student was given ends with an empty think block that the
  # history rendering lacks: the branch carries it (untrained), then the label (trained).
  student_ids = demo.encode("```bash\nls\n```", add_special_tokens=False)
  for label in (Action("```bash\ngit diff\n```"), Action(demo.decode(student_ids))):
    traj = _student_turn_trajectory(demo, student_ids, label)
    (row,), stats = render.render(traj, demo, max_len=4096, enable_thinking=False)
    assert stats["branches"] == 1  # also when the label agrees: the headers differ
    think = demo.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    label_ids = demo.encode(label.text, add_special_tokens=False)
    branch = np.flatnonzero(row.branch_ids == 1)
    assert row.tokens[branch].tolist() == think + label_ids + [demo.eos_token_id]
    assert np.flatnonzero(row.loss_mask).tolist() == list(range(branch[len(think) - 1],
                                                                 branch[-1]))
    assert demo.decode(row.tokens[:branch[0]].tolist()).endswith("<|im_start|>assistant\n")
    prompt = render.prompt_ids(traj.messages[:2], [], demo, enable_thinking=False)
    assert row.tokens[_visible(row, branch[-2])].tolist() == prompt + label_ids


def test_student_turn_with_agreeing_label_is_trained_in_place(demo):
  ids = demo.encode("```bash\nls\n```", add_special_tokens=False)
  traj = _student_turn_trajectory(demo, ids, Action(demo.decode(ids), tuple(ids)))
  (row,), stats = render.render(traj, demo, max_len=4096, enable_thinking=True)
  assert stats["branches"] == 0 and (row.branch_ids == 0).all()
  start = row.tokens.tolist().index(ids[0], len(row) - len(ids) - 20)
  trained = np.flatnonzero(row.loss_mask)
  assert (trained + 1).tolist() == list(range(start, start + len(ids) + 1))


def test_prompt_ids_keep_exact_ids(demo, qwen):
  ids = demo.convert_tokens_to_ids(list("catsrc"))
  messages = MESSAGES[:2] + ({"role": "assistant", "content": "catsrc"},
                             {"role": "user", "content": "out"})
  prompt = render.prompt_ids(messages, [ids], demo)
  text = demo.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False)
  assert demo.decode(prompt) == text and prompt != demo.encode(text) and ids[0] in prompt
  for thinking in (False, True):  # with text-only turns it is the real template's prompt
    assert render.prompt_ids(MESSAGES[:4], [None], qwen, thinking) == qwen.apply_chat_template(
        list(MESSAGES[:4]), tokenize=True, add_generation_prompt=True,
        enable_thinking=thinking)["input_ids"]


def test_student_ids_ending_with_eot_are_not_doubled(demo):
  ids = demo.encode("```bash\nls\n```", add_special_tokens=False)
  with_eot = _student_turn_trajectory(demo, ids + [demo.eos_token_id], Action("```bash\nx\n```"))
  without = _student_turn_trajectory(demo, ids, Action("```bash\nx\n```"))
  (a,), _ = render.render(with_eot, demo, 4096)
  (b,), _ = render.render(without, demo, 4096)
  assert a.tokens.tolist() == b.tokens.tolist()


def test_unlabelled_student_trajectory_is_dropped_and_counted(demo):
  ids = demo.encode("```bash\nls\n```", add_special_tokens=False)
  traj = _student_turn_trajectory(demo, ids, None)
  rows, stats = render.render(traj, demo, max_len=4096)
  assert rows == [] and stats["dropped_untrained_rows"] == 1


def _main_line(row):
  return row.tokens[row.branch_ids == 0].tolist()


@pytest.mark.parametrize("tight", [False, True])
def test_too_long_split_rerenders_prefixes(demo, tight):
  rng = np.random.default_rng(0)
  traj = synthetic.random_trajectory(rng, demo, turns=12, obs_tokens=30, action_tokens=10,
                                     student_fraction=0.5, unlabeled_fraction=0.3)
  (full,), _ = render.render(traj, demo, max_len=100_000)
  branch_lens = np.bincount(full.branch_ids)[1:]
  assert len(branch_lens) >= 2
  # Loose: every turn fits alone, not all together. Tight: the late turns cannot fit at all.
  max_len = len(full) // 2 if tight else len(_main_line(full)) + branch_lens.max()
  rows, stats = render.render(traj, demo, max_len=max_len, too_long="split")
  assert stats["split_trajectories"] == 1 and len(rows) >= 2 and stats["rows"] == len(rows)
  trained_full = sorted(set(full.label_ids[full.loss_mask == 1].tolist()))
  seen = []
  for row in rows:
    assert len(row) <= max_len
    assert _main_line(row) == _main_line(full)[:len(_main_line(row))]
    labels = sorted(set(row.label_ids[row.loss_mask == 1].tolist()))
    seen += labels
    for k in labels:  # the same trained tokens toward the same targets as in the full row
      assert row.targets[row.label_ids == k].tolist() == full.targets[full.label_ids == k].tolist()
  assert sorted(seen) == sorted(set(seen))  # each trained turn in at most one row
  if tight:
    assert stats["dropped_too_long_turns"] > 0
    assert len(seen) + stats["dropped_too_long_turns"] == len(trained_full)
    assert stats["trained_turns"] == len(seen)
  else:
    assert stats["dropped_too_long_turns"] == 0 and sorted(seen) == trained_full


def test_too_long_drop_and_unfittable_turns_are_counted(demo):
  rng = np.random.default_rng(1)
  traj = synthetic.random_trajectory(rng, demo, turns=6, obs_tokens=30, action_tokens=10)
  (full,), _ = render.render(traj, demo, max_len=100_000)
  rows, stats = render.render(traj, demo, max_len=len(full) - 1, too_long="drop")
  assert rows == [] and stats["dropped_too_long_trajectories"] == 1
  first_header = len(render.pieces(traj, demo).glue[0])
  rows, stats = render.render(traj, demo, max_len=first_header, too_long="split")
  assert rows == [] and stats["dropped_too_long_turns"] == 6


def test_ids_from_another_tokenizer_are_refused(demo):
  traj = _student_turn_trajectory(demo, [5, len(demo) + 7], Action("x"))
  with pytest.raises(render.RenderError, match=r"s/r1/s0: turns\[0\].action.ids has token id"):
    render.render(traj, demo, 4096)
