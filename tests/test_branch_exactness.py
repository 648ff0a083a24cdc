"""Branch packing is exact: each label's loss on a packed row equals its separate sequence's loss.

The reference is built independently of the renderer: for label k, the chat template's generation
prompt for the state before turn k (`apply_chat_template(messages[:k], add_generation_prompt=True)`,
what the policy was given), then the label's ids and `<|im_end|>`; all reference sequences run right-padded in one plain causal batch (no segments, no
branches, positions 0..n). The branch-packed side packs several trajectories into each row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
import support
from dagger_jax.data import render, shards, synthetic
from dagger_jax.data.tokenizer import load_tokenizer, train_demo_tokenizer
from dagger_jax.model.qwen3 import Qwen3



@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train_demo_tokenizer(synthetic.CORPUS * 4, f"{workdir}/tokenizer", vocab_size=512)
  c = base.get_config().data
  c.tokenizer = "demo-bpe"
  return load_tokenizer(c, workdir=workdir)


@pytest.fixture(scope="module")
def model(tok):
  cfg = support.model_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0)
  assert len(tok) <= cfg.vocab_size
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  # Weights 3x the 0.02 init make the logits depend clearly on the context (a wrong mask moves the
  # losses by ~0.4, see the negative controls) while the losses stay O(ln V) ~ 7, where fp32
  # round-off is ~1e-6 absolute.
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x * 3.0, state))


@nnx.jit
def _nll_bt(model, tokens_bt, targets_bt, positions_bt, segment_ids_bt, branch_ids_bt):
  logits_btv = model(tokens_bt, positions_bt, segment_ids_bt, branch_ids_bt)
  logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
  return -jnp.take_along_axis(logp_btv, targets_bt[..., None], -1)[..., 0]


def _token_nll(model, batch):
  return np.asarray(_nll_bt(model, *(jnp.asarray(batch[f]) for f in (
      "tokens", "targets", "positions", "segment_ids", "branch_ids"))))


def _packed_label_losses(model, rows, max_len, pad_id, **overrides):
  """{(trajectory id, turn): mean nll over the label's trained slots} from branch-packed rows."""
  batch = shards.pack_rows(rows, max_len, pad_id)
  batch.update(overrides)
  nll_bt = _token_nll(model, batch)
  out = {}
  for b, members in enumerate(shards.first_fit([len(r) for r in rows], max_len)):
    for segment, i in enumerate(members, start=1):
      where = np.flatnonzero(batch["segment_ids"][b] == segment)
      assert batch["tokens"][b, where].tolist() == rows[i].tokens.tolist()
      for turn in np.unique(rows[i].label_ids[rows[i].label_ids > 0]):
        slots = where[rows[i].label_ids == turn]
        out[(rows[i].source, int(turn) - 1)] = float(nll_bt[b, slots].mean())
  return out


def _reference_sequences(traj, tok):
  """{(trajectory id, turn): (prompt + label + <|im_end|>, len(prompt))}.

  The prompt is the real template's generation prompt for the state before turn k, tokenised in
  one piece from the messages' text (synthetic ids are the tokenizer's own encodings).
  """
  out = {}
  for k, (turn, index) in enumerate(zip(traj.turns, traj.assistant_indices())):
    if turn.actor == "student" and turn.label is None:
      continue
    prompt = tok.apply_chat_template(list(traj.messages[:index]), tokenize=True,
                                     add_generation_prompt=True, enable_thinking=False)
    prompt = prompt["input_ids"]
    label = list(turn.label.ids) if turn.actor == "student" else list(turn.action.ids)
    out[(traj.id, k)] = (prompt + label + [tok.eos_token_id], len(prompt))
  return out


def _reference_losses(model, refs, pad_id):
  keys = sorted(refs)
  length = max(len(refs[k][0]) for k in keys)
  tokens = np.full((len(keys), length), pad_id, np.int32)
  for i, k in enumerate(keys):
    tokens[i, :len(refs[k][0])] = refs[k][0]
  targets = np.concatenate([tokens[:, 1:], np.full((len(keys), 1), pad_id, np.int32)], 1)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
  batch = dict(tokens=tokens, targets=targets, positions=positions,
               segment_ids=np.ones_like(tokens), branch_ids=np.zeros_like(tokens))
  nll_bt = _token_nll(model, batch)
  return {k: float(nll_bt[i, refs[k][1] - 1:len(refs[k][0]) - 1].mean())
          for i, k in enumerate(keys)}


@pytest.mark.parametrize("seed", [0, 1])
def test_branch_packed_losses_equal_separate_sequences(tok, model, seed):
  rng = np.random.default_rng(seed)
  trajs = [synthetic.random_trajectory(rng, tok, turns=int(rng.integers(2, 7)), obs_tokens=24,
                                       action_tokens=8, student_fraction=0.6,
                                       disagree_fraction=0.7, unlabeled_fraction=0.2,
                                       id=f"s{seed}-{i}") for i in range(6)]
  rows, refs = [], {}
  for t in trajs:
    r, _ = render.render(t, tok, max_len=1024)
    rows += r
    refs.update(_reference_sequences(t, tok))
    # render's own per-label baseline (used by the benchmark) is the same token sequences.
    assert [s.tokens.tolist() for s in render.per_label_sequences(t, tok)] == [
        refs[(t.id, k)][0] for k in sorted(k for (i, k) in refs if i == t.id)]
  assert sum(int(r.branch_ids.max()) for r in rows) >= 4  # the draw has branches to check
  packed = _packed_label_losses(model, rows, 1024, tok.pad_token_id)
  assert len(shards.pack_rows(rows, 1024, tok.pad_token_id)["tokens"]) < len(rows)  # packed
  reference = _reference_losses(model, refs, tok.pad_token_id)
  assert sorted(packed) == sorted(reference)
  diff = max(abs(packed[k] - reference[k]) for k in reference)
  assert diff <= 1e-5, diff

  # Negative controls: the comparison is sensitive to exactly what branches get right.
  batch = shards.pack_rows(rows, 1024, tok.pad_token_id)
  no_branches = _packed_label_losses(model, rows, 1024, tok.pad_token_id,
                                     branch_ids=np.zeros_like(batch["branch_ids"]))
  row_positions = np.broadcast_to(np.arange(1024, dtype=np.int32), batch["positions"].shape)
  shifted = _packed_label_losses(model, rows, 1024, tok.pad_token_id, positions=row_positions)
  for wrong in (no_branches, shifted):
    assert max(abs(wrong[k] - reference[k]) for k in reference) > 1e-2
