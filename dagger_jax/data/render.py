"""Trajectory -> token rows with the teacher's labels as branches.

A row is seven aligned int arrays (DESIGN.md, "Token row"):

    tokens       the token at each row slot
    targets      the token the prediction made at this slot is trained toward
    positions    RoPE positions (a branch continues its prefix; the tokens after it restart there)
    segment_ids  1 for the trajectory (packing renumbers 1, 2, ...; 0 = padding)
    branch_ids   0 on the main line, k > 0 on the k-th label branch
    loss_mask    1 where the prediction is trained (uint8)
    label_ids    for trained slots, 1 + the turn whose label the slot learns; 0 elsewhere (per-label
                 losses, `train.normalize = "turn"`)

Attention: slot i sees slot j iff j <= i, same segment, and branch_ids[j] in (0, branch_ids[i]).

Rendering. The chat template renders the messages; its text between assistant contents (the
"glue": system / user turns, then the assistant header) is tokenised, the assistant contents are
the token ids from the record, and each content is followed by the end-of-turn token `<|im_end|>`.
The main line (branch 0) is thus `apply_chat_template(messages)`, with the exact ids. Each label is
trained on exactly the prompt the policy was given at that state, `prompt_ids` (=
`apply_chat_template(messages_before, add_generation_prompt=True)`, exact ids):

- the label is trained in place (its content + end-of-turn, in the main line) when it is the
  executed content and the generation header equals the main line's header;
- otherwise it becomes a branch that forks where the two headers part: the rest of the generation
  header (context), then the label + end-of-turn (trained); the main line resumes at the fork with
  its own header rest and the executed tokens (the student's exact ids), untrained.
- a student turn without a label is context only.

With the Qwen3 template the headers part for `enable_thinking=False`: a generation prompt ends with
`<|im_start|>assistant\n<think>\n\n</think>\n\n`, but earlier turns render without the empty think
block, so every label is a branch except that of a conversation's final assistant message (rendered
with the block). With `enable_thinking=True` it is the other way round: labels are trained in place
except that final one (its history rendering has the empty think block, the prompt has not).

Worked example (shared header `H1 H2`, no header rest, label `L1 L2`, student `S1`, end-of-turn
`E`, next header `N`):

    slot        ..  H1  H2 | L1  L2  E  | S1  E   N ..
    positions   ..  7   8  | 9   10  11 | 9   10  11
    branch_ids  ..  0   0  | 1   1   1  | 0   0   0
    targets     ..  H2  L1 | L2  E   -  | E   N   ..
    loss_mask   ..  0   1  | 1   1   0  | 0   0   0

`H2` predicts the label's first token; `E` of the branch predicts nothing; `S1` sees `H1 H2` but
not the branch. With a generation-header rest `G1` the branch is `G1 L1 L2 E` and `G1` (untrained)
predicts `L1`. Each label's loss is exactly that of the separate sequence `prompt + label + E`
(`per_label_sequences`), at linear instead of quadratic token cost.

Too long (`> max_len` slots): `too_long="drop"` drops the trajectory; `"split"` groups consecutive
trained turns into rows greedily, each row re-rendering the whole prefix up to its last turn
(earlier turns as untrained context, without their branches); a single turn that does not fit even
alone is dropped. Rows without a trained slot are dropped. Every drop is counted in the stats.

Limitation: contents are placed verbatim. The Qwen3 template's stripping of `<think>` reasoning
from earlier assistant turns is not applied (the row keeps what the model produced).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from dagger_jax.data.trajectory import Action, Trajectory
from dagger_jax.errors import ConfigError, DaggerJaxError

FIELDS = ("tokens", "targets", "positions", "segment_ids", "branch_ids", "loss_mask", "label_ids")
DTYPES = {f: (np.uint8 if f == "loss_mask" else np.int32) for f in FIELDS}
# Assistant contents are rendered as placeholders `\ue000TAG.K\ue001` (private-use characters,
# never produced by a template); TAG is chosen per call so that no message holds one (`_tag`).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


class RenderError(DaggerJaxError, ValueError):
  """A trajectory cannot be rendered with this tokenizer / template; names the trajectory."""


@dataclasses.dataclass
class Row:
  """One rendered row (unpadded); the arrays are aligned, see the module docstring."""
  tokens: np.ndarray
  targets: np.ndarray
  positions: np.ndarray
  segment_ids: np.ndarray
  branch_ids: np.ndarray
  loss_mask: np.ndarray
  label_ids: np.ndarray
  source: str = ""  # the trajectory id

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def trained_tokens(self) -> int:
    return int(self.loss_mask.sum())

  def arrays(self) -> dict[str, np.ndarray]:
    return {f: getattr(self, f) for f in FIELDS}


@dataclasses.dataclass(frozen=True)
class Pieces:
  """A trajectory cut at the assistant contents: glue[k] precedes turn k's content.

  The first `shared[k]` tokens of glue[k] are also the start of the generation prompt's header for
  turn k; `gen_rest[k]` is the rest of that header (what the policy saw instead of
  glue[k][shared[k]:]). With the Qwen3 template and `enable_thinking=False`, glue[k] ends with
  `<|im_start|>assistant\n` and gen_rest[k] is `<think>\n\n</think>\n\n`.
  """
  glue: list[list[int]]  # n_turns + 1 token lists; glue[-1] is what follows the last turn
  shared: list[int]  # per turn: how many tokens of glue[k] the generation prompt shares
  gen_rest: list[list[int]]  # per turn: the generation prompt's header after the shared part
  eot: list[int]  # the end-of-turn token(s)
  executed: list[list[int]]  # per turn: the executed content ids
  labels: list[list[int] | None]  # per turn: the trained content ids (None: nothing to train)

  def in_place(self, k: int) -> bool:
    """Turn k's label is trained in the main line (same header, same content)."""
    return (self.labels[k] == self.executed[k] and not self.gen_rest[k]
            and self.shared[k] == len(self.glue[k]))

  def header_end(self) -> list[int]:
    """Main-line length up to (excluding) each turn's content."""
    out, n = [], 0
    for k in range(len(self.executed)):
      n += len(self.glue[k])
      out.append(n)
      n += len(self.executed[k]) + len(self.eot)
    return out

  def branch_len(self, k: int) -> int:
    if self.labels[k] is None or self.in_place(k):
      return 0
    return len(self.gen_rest[k]) + len(self.labels[k]) + len(self.eot)


class _Builder:
  """Appends main-line and branch tokens; fills targets and the mask as it goes."""

  def __init__(self):
    self.cols = {f: [] for f in ("tokens", "targets", "positions", "branch_ids", "loss_mask",
                                 "label_ids")}
    self.last_main = -1
    self.next_pos = 0
    self.branches = 0

  def _predict(self, prev: int, token: int, learned: bool, label: int) -> None:
    if prev < 0 or self.cols["targets"][prev] >= 0:  # no predecessor, or a branch took it
      return
    self.cols["targets"][prev] = token
    self.cols["loss_mask"][prev] = int(learned)
    self.cols["label_ids"][prev] = label if learned else 0

  def _push(self, token: int, position: int, branch: int) -> int:
    for f, v in (("tokens", token), ("targets", -1), ("positions", position),
                 ("branch_ids", branch), ("loss_mask", 0), ("label_ids", 0)):
      self.cols[f].append(v)
    return len(self.cols["tokens"]) - 1

  def main(self, ids: Sequence[int], learned: bool = False, label: int = 0) -> None:
    for t in ids:
      self._predict(self.last_main, t, learned, label)
      self.last_main = self._push(t, self.next_pos, 0)
      self.next_pos += 1

  def branch(self, ids: Sequence[int], label: int, learn_from: int = 0) -> None:
    """A branch after the current main-line end; the main line resumes at its start.

    ids[learn_from:] are learned (ids[:learn_from] is the generation header: context only).
    """
    self.branches += 1
    prev, pos = self.last_main, self.next_pos
    for i, t in enumerate(ids):
      self._predict(prev, t, i >= learn_from, label)
      prev = self._push(t, pos, self.branches)
      pos += 1

  def row(self, pad_id: int, source: str) -> Row:
    cols = {f: np.asarray(v, DTYPES[f]) for f, v in self.cols.items()}
    cols["targets"][cols["targets"] < 0] = pad_id
    return Row(segment_ids=np.ones(len(cols["tokens"]), np.int32), source=source, **cols)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _content_ids(action: Action, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> list[int]:
  ids = list(action.ids) if action.ids is not None else _encode(tokenizer, action.text)
  return ids[:-1] if ids and ids[-1] == eos_id else ids


def _tag(messages) -> str:
  """The smallest number n such that no message content holds U+E000 followed by `n.`, so that
  no message text can pass for a placeholder. Text can hold these characters: a student that
  emits U+E000 0 U+E001 as a command gets it back in bash's "command not found" observation."""
  n = 0
  while any(f"{_MARK_OPEN}{n}." in m["content"] for m in messages):
    n += 1
  return str(n)


def _assistant_placeholders(messages, tag: str) -> list[dict[str, str]]:
  out, k = [], 0
  for m in messages:
    if m["role"] == "assistant":
      out.append({"role": "assistant", "content": f"{_MARK_OPEN}{tag}.{k}{_MARK_CLOSE}"})
      k += 1
    else:
      out.append(dict(m))
  return out


def _glue_texts(messages, n_assistant: int, tokenizer: PreTrainedTokenizerBase,
                enable_thinking: bool, add_generation_prompt: bool, where: str) -> list[str]:
  """The template's text between assistant contents (n_assistant + 1 pieces), each piece after
  the first starting after the end-of-turn text."""
  tag = _tag(messages)
  text = tokenizer.apply_chat_template(_assistant_placeholders(messages, tag), tokenize=False,
                                       enable_thinking=enable_thinking,
                                       add_generation_prompt=add_generation_prompt)
  placeholder = re.compile(f"{_MARK_OPEN}{tag}\\.(\\d+){_MARK_CLOSE}")
  parts = placeholder.split(text)  # glue0, "0", glue1, "1", ...
  found = [int(p) for p in parts[1::2]]
  if found != list(range(n_assistant)):
    raise RenderError(f"{where}: the chat template did not render each assistant message exactly "
                      f"once in order (found {found})")
  eos = tokenizer.eos_token
  glue = parts[0::2]
  for j, g in enumerate(glue[1:]):
    if not g.startswith(eos):
      raise RenderError(f"{where}: the chat template does not end assistant turn {j} with the eos "
                        f"token {eos!r} (got {g[:20]!r})")
  return [glue[0]] + [g[len(eos):] for g in glue[1:]]


def prompt_ids(messages: Sequence[dict[str, str]], assistant_ids: Sequence[Sequence[int] | None],
               tokenizer: PreTrainedTokenizerBase, enable_thinking: bool = False) -> list[int]:
  """The generation prompt for the next assistant turn, as token ids, exactly as rows see it.

  That is `apply_chat_template(messages, add_generation_prompt=True)`, except that each earlier
  assistant content is its given ids (the exact sampled ids; None = tokenise its text), less a
  trailing end-of-turn, followed by the end-of-turn token. A row trains the label of this state
  on exactly these ids.
  """
  contents = [m["content"] for m in messages if m["role"] == "assistant"]
  if len(assistant_ids) != len(contents):
    raise ValueError(f"prompt_ids: {len(contents)} assistant messages but {len(assistant_ids)} "
                     f"id lists")
  glue = _glue_texts(messages, len(contents), tokenizer, enable_thinking, True, "prompt_ids")
  eos_id = tokenizer.eos_token_id
  ids = _encode(tokenizer, glue[0])
  for j, content in enumerate(contents):
    given = assistant_ids[j]
    # As the rows have it (`_content_ids`): a trailing end-of-turn of the content is dropped,
    # so that a turn of ids (or text) ending in it is not seen twice here and once in training.
    action = Action(content, None if given is None else tuple(given))
    ids += _content_ids(action, tokenizer, eos_id) + [eos_id]
    ids += _encode(tokenizer, glue[j + 1])
  return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def pieces(traj: Trajectory, tokenizer: PreTrainedTokenizerBase,
           enable_thinking: bool = False) -> Pieces:
  """Cuts the template rendering of `traj` at its assistant contents (see the module docstring)."""
  where = f"trajectory {traj.id}"
  n = len(traj.turns)
  glue_texts = _glue_texts(traj.messages, n, tokenizer, enable_thinking, False, where)
  glue = [_encode(tokenizer, g) for g in glue_texts]
  shared, gen_rest = [], []
  for k, index in enumerate(traj.assistant_indices()):
    # The prompt the policy saw at turn k: the conversation before it + the generation header.
    gen = _glue_texts(traj.messages[:index], k, tokenizer, enable_thinking, True, where)
    if gen[:k] != glue_texts[:k]:
      raise RenderError(f"{where}: the chat template renders turns before {k} differently once "
                        f"the conversation goes on; a shared prefix cannot hold both")
    gen_ids = _encode(tokenizer, gen[k])
    shared.append(_common_prefix(glue[k], gen_ids))
    gen_rest.append(gen_ids[shared[-1]:])
  eos_id = tokenizer.eos_token_id
  vocab = len(tokenizer)
  for k, turn in enumerate(traj.turns):
    for name, action in (("action", turn.action), ("label", turn.label)):
      if action is not None and action.ids is not None and max(action.ids, default=0) >= vocab:
        raise RenderError(f"{where}: turns[{k}].{name}.ids has token id {max(action.ids)} >= "
                          f"the tokenizer's {vocab} tokens (another tokenizer?)")
  executed, labels = [], []
  for turn in traj.turns:
    ids = _content_ids(turn.action, tokenizer, eos_id)
    executed.append(ids)
    if turn.actor == "teacher":
      labels.append(ids)
    elif turn.label is None:
      labels.append(None)
    else:
      labels.append(_content_ids(turn.label, tokenizer, eos_id))
  return Pieces(glue, shared, gen_rest, [eos_id], executed, labels)


def _build(p: Pieces, trained: set[int], last_turn: int, with_tail: bool, pad_id: int,
           source: str) -> Row:
  """Main line through `last_turn` (and the trailing glue if asked); `trained` turns learn."""
  b = _Builder()
  for k in range(last_turn + 1):
    learn = k in trained
    b.main(p.glue[k][:p.shared[k]])
    if learn and not p.in_place(k):
      b.branch(p.gen_rest[k] + p.labels[k] + p.eot, label=k + 1, learn_from=len(p.gen_rest[k]))
    b.main(p.glue[k][p.shared[k]:])
    b.main(p.executed[k] + p.eot, learned=learn and p.in_place(k), label=k + 1)
  if with_tail:
    b.main(p.glue[last_turn + 1])
  return b.row(pad_id, source)


def render(traj: Trajectory, tokenizer: PreTrainedTokenizerBase, max_len: int,
           too_long: str = "split", enable_thinking: bool = False
           ) -> tuple[list[Row], collections.Counter]:
  """Renders one trajectory into rows of at most `max_len` slots; returns (rows, stats).

  stats counts: trajectories, rows, trained_turns, branches, split_trajectories,
  dropped_too_long_trajectories, dropped_too_long_turns, dropped_untrained_rows.
  """
  if too_long not in ("split", "drop"):
    raise ConfigError(f"config.data.too_long={too_long!r}: must be 'split' or 'drop'")
  stats = collections.Counter(trajectories=1)
  p = pieces(traj, tokenizer, enable_thinking)
  pad_id = tokenizer.pad_token_id
  n = len(p.executed)
  trainable = [k for k in range(n) if p.labels[k] is not None]
  if not trainable:
    stats["dropped_untrained_rows"] += 1
    return [], stats
  total = sum(map(len, p.glue)) + sum(len(e) + len(p.eot) for e in p.executed) + sum(
      p.branch_len(k) for k in range(n))
  if total <= max_len:
    groups = [(trainable, n - 1, True)]
  elif too_long == "drop":
    stats["dropped_too_long_trajectories"] += 1
    return [], stats
  else:
    stats["split_trajectories"] += 1
    header_end = p.header_end()
    groups, current, branches = [], [], 0

    def length(last: int, extra_branches: int) -> int:
      return header_end[last] + len(p.executed[last]) + len(p.eot) + extra_branches

    for k in trainable:
      if current and length(k, branches + p.branch_len(k)) <= max_len:
        current.append(k)
        branches += p.branch_len(k)
        continue
      if current:
        groups.append((current, current[-1], False))
      if length(k, p.branch_len(k)) > max_len:
        stats["dropped_too_long_turns"] += 1
        current, branches = [], 0
      else:
        current, branches = [k], p.branch_len(k)
    if current:
      groups.append((current, current[-1], False))
  rows = []
  for turns, last, tail in groups:
    row = _build(p, set(turns), last, tail, pad_id, traj.id)
    if row.trained_tokens == 0:
      stats["dropped_untrained_rows"] += 1
      continue
    rows.append(row)
    stats["trained_turns"] += len(turns)
    stats["branches"] += int(row.branch_ids.max(initial=0))
  stats["rows"] += len(rows)
  return rows, stats


def render_with_config(traj: Trajectory, tokenizer: PreTrainedTokenizerBase, data_config
                       ) -> tuple[list[Row], collections.Counter]:
  """`render` with `config.data` (max_len, too_long, enable_thinking)."""
  return render(traj, tokenizer, data_config.max_len, data_config.too_long,
                data_config.enable_thinking)


def per_label_sequences(traj: Trajectory, tokenizer: PreTrainedTokenizerBase,
                        enable_thinking: bool = False) -> list[Row]:
  """The naive alternative to branches: one row `prefix + label + end-of-turn` per trained label.

  The prefix is the generation prompt of turn k (`prompt_ids`: earlier turns as executed); only the
  label is trained (label_ids = turn + 1). The exactness test and the benchmark compare to these.
  """
  p = pieces(traj, tokenizer, enable_thinking)
  out = []
  for k in range(len(p.executed)):
    if p.labels[k] is None:
      continue
    b = _Builder()
    for j in range(k):
      b.main(p.glue[j])
      b.main(p.executed[j] + p.eot)
    b.main(p.glue[k][:p.shared[k]] + p.gen_rest[k])
    b.main(p.labels[k] + p.eot, learned=True, label=k + 1)
    out.append(b.row(tokenizer.pad_token_id, traj.id))
  return out
