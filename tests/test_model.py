"""The Flax Qwen3 student: shapes, dtypes, GQA, RoPE, the packed/branch attention rule, KV cache.

Parity with transformers' Qwen3 as a whole is in test_hf.py; here each piece is pinned on its own,
and the attention rule of DESIGN.md ("Token row") against its definition: a packed row gives the
same logits as separate rows, and a row with label branches the same as one sequence per label.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.qwen3 import modeling_qwen3

import support
from dagger_jax.model import params_io
from dagger_jax.model.qwen3 import KVCache, Qwen3, Qwen3Config, attention_mask, rope

CONFIG = support.model_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def init_params(config: Qwen3Config, seed: int, scramble: bool) -> dict:
  """Params of `Qwen3(config, rngs=nnx.Rngs(seed))`; with `scramble`, every param random, norm
  scales included (not ones), at a scale that gives O(1) logits."""
  params = params_io.pure_params(Qwen3(config, rngs=nnx.Rngs(seed)))
  if not scramble:
    return params
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  out = []
  for (path, x), key in zip(leaves, keys):
    if getattr(path[-1], "key", None) == "scale":
      out.append((1.0 + 0.5 * jax.random.normal(key, x.shape)).astype(x.dtype))
    else:
      out.append((0.1 * jax.random.normal(key, x.shape)).astype(x.dtype))
  return jax.tree.unflatten(treedef, out)


def make_model(config: Qwen3Config = CONFIG, seed: int = 0, scramble: bool = True) -> Qwen3:
  return params_io.model_from_params(config, init_params(config, seed, scramble))


_call = nnx.jit(lambda m, *args: m(*args))


def run(model: Qwen3, *args) -> np.ndarray:
  """jit-compiled `model(tokens, [positions, segment_ids, branch_ids])` -> numpy logits."""
  return np.asarray(_call(model, *(jnp.asarray(a, jnp.int32) for a in args)))


@pytest.fixture(scope="module")
def model() -> Qwen3:
  return make_model()


@pytest.fixture(scope="module")
def forward(model):
  return lambda *args: run(model, *args)


def tokens(length: int, seed: int, batch: int | None = None) -> np.ndarray:
  shape = (length,) if batch is None else (batch, length)
  return np.random.RandomState(seed).randint(0, CONFIG.vocab_size, shape).astype(np.int32)


def assert_close_rel(got, want, rel: float = 1e-5) -> None:
  """max |got - want| <= rel * max |want| (fp32 parity, relative to the logit scale)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  assert err <= rel * scale, f"max abs diff {err:.3e} > {rel} * max |ref| {scale:.3e}"


def single(forward, seq: np.ndarray) -> np.ndarray:
  """Logits [t, v] of one unpacked sequence with default positions."""
  t = len(seq)
  return forward(seq[None], np.arange(t)[None], np.ones((1, t)), np.zeros((1, t)))[0]


# ----------------------------------------------------------------------------- shapes and dtypes


def test_shapes_dtypes_and_defaults(model):
  x = jnp.asarray(tokens(7, seed=0, batch=3))
  logits = model(x)  # the public contract: tokens only -> float32 [B, T, V]
  assert logits.shape == (3, 7, CONFIG.vocab_size) and logits.dtype == jnp.float32
  hidden = model(x, return_hidden=True)
  assert hidden.shape == (3, 7, CONFIG.hidden_size)
  explicit = run(model, x, np.broadcast_to(np.arange(7), (3, 7)), np.ones((3, 7)),
                 np.zeros((3, 7)))
  assert_close_rel(explicit, np.asarray(logits))  # jit vs eager: same math, fused differently


@pytest.mark.parametrize("tied", [True, False])
def test_params_count_and_logical_axes(tied):
  config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
  state = nnx.state(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))), nnx.Param)
  leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert sum(v.get_value().size for v in leaves) == config.num_params()
  for v in leaves:
    assert len(v.get_metadata()["logical_axes"]) == v.get_value().ndim
  assert hasattr(state, "lm_head") != tied


def test_bf16_compute_is_close_to_fp32():
  params = init_params(CONFIG, 0, False)  # the default init: std 0.02, unit norm scales
  x = tokens(16, seed=1, batch=2)
  fp32 = run(params_io.model_from_params(CONFIG, params), x)
  bf16_compute = params_io.model_from_params(dataclasses.replace(CONFIG, dtype="bfloat16"), params)
  got = run(bf16_compute, x)
  assert got.dtype == np.float32  # logits stay float32
  # bfloat16 keeps 8 significant bits (step 2^-8 = 4e-3 relative) and two layers of matmuls
  # accumulate several such roundings: transformers' own bf16 forward deviates ~1e-2 from fp32
  # (test_hf.py::test_bf16_forward_error_is_transformers_own compares the two directly).
  assert_close_rel(got, fp32, rel=2e-2)
  bf16_params = params_io.model_from_params(
      dataclasses.replace(CONFIG, dtype="bfloat16", param_dtype="bfloat16"),
      jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
  assert bf16_params.layers[0].attn.q_proj.get_value().dtype == jnp.bfloat16
  assert_close_rel(run(bf16_params, x), fp32, rel=2e-2)


# ----------------------------------------------------------------------------- GQA and RoPE


def test_gqa_equals_multi_head_with_repeated_kv_heads(model):
  """Query head j reads kv head j // (n / k): with k/v weights repeated that way, an n-kv-head
  model computes the same function."""
  mha_config = dataclasses.replace(CONFIG, num_kv_heads=CONFIG.num_heads)
  group = CONFIG.num_heads // CONFIG.num_kv_heads
  params = params_io.pure_params(model)
  for layer in params["layers"].values():
    for name in ("k_proj", "v_proj"):  # [d, k, h] -> [d, n, h]
      layer["attn"][name] = jnp.repeat(layer["attn"][name], group, axis=1)
  mha = params_io.model_from_params(mha_config, params)
  x = tokens(12, seed=2, batch=2)
  assert_close_rel(run(mha, x), run(model, x))


def test_rope_matches_transformers():
  b, t, n, h = 2, 9, 3, 16
  rng = np.random.RandomState(0)
  q, k = rng.randn(2, b, t, n, h).astype(np.float32)
  # a row ending at the table's last position, and one with a branch
  positions = np.stack([np.arange(4096 - t, 4096), [0, 1, 2, 3, 4, 2, 3, 4, 5]]).astype(np.int32)
  hf_config = transformers.Qwen3Config(head_dim=h, num_attention_heads=n,
                                       rope_parameters={"rope_type": "default",
                                                        "rope_theta": 1_000_000.0})
  emb = modeling_qwen3.Qwen3RotaryEmbedding(hf_config)
  cos, sin = emb(torch.zeros(1), torch.from_numpy(positions.astype(np.int64)))
  to_bnth = lambda x: torch.from_numpy(x).transpose(1, 2)
  want_q, want_k = modeling_qwen3.apply_rotary_pos_emb(to_bnth(q), to_bnth(k), cos, sin)
  assert_close_rel(rope(jnp.asarray(q), jnp.asarray(positions), 1_000_000.0, 4096),
                   want_q.transpose(1, 2).numpy())
  assert_close_rel(rope(jnp.asarray(k), jnp.asarray(positions), 1_000_000.0, 4096),
                   want_k.transpose(1, 2).numpy())


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.RandomState(1)
  q, k = (jnp.asarray(rng.randn(1, 1, 1, 16).astype(np.float32)) for _ in range(2))

  def score(m, n):
    at = lambda x, p: rope(x, jnp.full((1, 1), p, jnp.int32), 10_000.0, 128)
    return float(jnp.sum(at(q, m) * at(k, n)))

  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-5)
  assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
  np.testing.assert_allclose(rope(q, jnp.zeros((1, 1), jnp.int32), 10_000.0, 128), q)  # identity at 0


def test_rope_position_beyond_the_table_is_nan_not_a_wrong_rotation():
  q = jnp.ones((1, 2, 1, 8), jnp.float32)
  out = rope(q, jnp.array([[15, 16]], jnp.int32), 10_000.0, 16)
  assert np.isfinite(np.asarray(out[0, 0])).all() and np.isnan(np.asarray(out[0, 1])).all()


# ----------------------------------------------------------------------------- the attention rule


def test_attention_mask_worked_example():
  """Row: prefix p0 p1 | label L0 L1 (branch 1) | student S0 (branch 0) | next segment x0 x1."""
  segment_ids = jnp.asarray([[1, 1, 1, 1, 1, 2, 2]])
  branch_ids = jnp.asarray([[0, 0, 1, 1, 0, 0, 0]])
  want = np.array([
      # p0 p1 L0 L1 S0 x0 x1     (keys)
      [1, 0, 0, 0, 0, 0, 0],  # p0
      [1, 1, 0, 0, 0, 0, 0],  # p1
      [1, 1, 1, 0, 0, 0, 0],  # L0: prefix and its own branch
      [1, 1, 1, 1, 0, 0, 0],  # L1
      [1, 1, 0, 0, 1, 0, 0],  # S0: prefix, never the label
      [0, 0, 0, 0, 0, 1, 0],  # x0: a new segment sees nothing before it
      [0, 0, 0, 0, 0, 1, 1],  # x1
  ], bool)
  got = attention_mask(segment_ids, branch_ids)
  assert got.shape == (1, 1, 7, 7)
  np.testing.assert_array_equal(np.asarray(got[0, 0]), want)


def test_packed_row_equals_separate_rows(forward):
  a, b, c = tokens(6, seed=3), tokens(9, seed=4), tokens(4, seed=5)
  row = np.concatenate([a, b, c])[None]
  positions = np.concatenate([np.arange(6), np.arange(9), np.arange(4)])[None]
  segment_ids = np.repeat([1, 2, 3], [6, 9, 4])[None]
  packed = forward(row, positions, segment_ids, np.zeros_like(row))[0]
  assert_close_rel(packed[:6], single(forward, a))
  assert_close_rel(packed[6:15], single(forward, b))
  assert_close_rel(packed[15:], single(forward, c))


def test_label_branches_equal_one_sequence_per_label(forward):
  """prefix P, label L1 (branch 1) | student S1, middle M, label L2 (branch 2) | student S2, tail:
  L1 sees P; S1 and later see P (not L1); L2 sees P S1 M (not L1); after S2 nothing sees L2."""
  p, l1, s1, m, l2, s2, tail = (tokens(n, seed=10 + i) for i, n in enumerate([5, 3, 4, 2, 3, 2, 2]))
  row = np.concatenate([p, l1, s1, m, l2, s2, tail])
  start_l1 = len(p)                       # L1 and S1 both start at this position
  start_l2 = len(p) + len(s1) + len(m)    # L2 and S2 both start at this position
  positions = np.concatenate([
      np.arange(len(p)), start_l1 + np.arange(len(l1)),
      start_l1 + np.arange(len(s1) + len(m)), start_l2 + np.arange(len(l2)),
      start_l2 + np.arange(len(s2) + len(tail))])
  branch_ids = np.concatenate([np.zeros(len(p)), np.ones(len(l1)), np.zeros(len(s1) + len(m)),
                               np.full(len(l2), 2), np.zeros(len(s2) + len(tail))])
  logits = forward(row[None], positions[None], np.ones((1, len(row))), branch_ids[None])[0]
  spans = np.cumsum([0, len(p), len(l1), len(s1) + len(m), len(l2), len(s2) + len(tail)])
  seq_l1 = single(forward, np.concatenate([p, l1]))
  seq_l2 = single(forward, np.concatenate([p, s1, m, l2]))
  seq_main = single(forward, np.concatenate([p, s1, m, s2, tail]))
  assert_close_rel(logits[spans[1]:spans[2]], seq_l1[len(p):])
  assert_close_rel(logits[spans[3]:spans[4]], seq_l2[start_l2:])
  main = np.concatenate([logits[:spans[1]], logits[spans[2]:spans[3]], logits[spans[4]:]])
  assert_close_rel(main, seq_main)


# ----------------------------------------------------------------------------- KV cache


def test_decode_with_cache_equals_full_forward(model, forward):
  """Left-padded prompts of lengths 5 and 8, prefilled together, then 4 decode steps (the next
  tokens fed in): every step's logits equal the full forward of the unpadded sequence."""
  prompt_lens, steps = (5, 8), 4
  t = max(prompt_lens)
  seqs = [tokens(n + steps, seed=20 + i) for i, n in enumerate(prompt_lens)]
  prompt = np.zeros((2, t), np.int32)
  valid = np.zeros((2, t), bool)
  positions = np.zeros((2, t), np.int32)
  for i, n in enumerate(prompt_lens):
    prompt[i, t - n:] = seqs[i][:n]
    valid[i, t - n:] = True
    positions[i, t - n:] = np.arange(n)
  decode = nnx.jit(lambda m, x, pos, ok, cache: m.decode(x, pos, ok, cache))
  cache = KVCache.zeros(CONFIG, batch=2, slots=t + steps)
  logits, cache = decode(model, jnp.asarray(prompt), jnp.asarray(positions), jnp.asarray(valid),
                         cache)
  full = [single(forward, s) for s in seqs]
  for i, n in enumerate(prompt_lens):
    assert_close_rel(np.asarray(logits)[i, t - n:], full[i][:n])
  for step in range(steps):
    x = np.array([[s[n + step]] for s, n in zip(seqs, prompt_lens)], np.int32)
    pos = np.array([[n + step] for n in prompt_lens], np.int32)
    logits, cache = decode(model, jnp.asarray(x), jnp.asarray(pos), jnp.ones((2, 1), bool), cache)
    for i, n in enumerate(prompt_lens):
      assert_close_rel(np.asarray(logits)[i, 0], full[i][n + step])
  assert int(cache.index) == t + steps
