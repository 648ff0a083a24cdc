"""The student: a Qwen3 decoder in Flax NNX.

Architecture (as `transformers`' Qwen3): token embedding -> N x [RMSNorm -> grouped-query
attention with per-head q/k RMSNorm and RoPE -> residual -> RMSNorm -> SwiGLU MLP -> residual]
-> RMSNorm -> unembedding (tied to the embedding or a separate `lm_head`).

Shapes in names: b batch, t query length, s key length, d model dim, n query heads,
k kv heads, g queries per kv head (n = k * g), h head dim, f MLP dim, v vocabulary.

Every parameter carries `logical_axes` metadata (see `sharding.py`), its storage dtype is
`param_dtype`, and matmuls run in `dtype` (float32 or bfloat16). Logits are always float32.

Packed rows with label branches (DESIGN.md, "Token row"): token i attends to j iff j <= i in row
order, `segment_ids[i] == segment_ids[j]`, and `branch_ids[j] in (0, branch_ids[i])`. The
training attention's implementations (XLA blocks on CPU, flash in JAX or Pallas for long rows)
live in `attention.py`; `Qwen3(..., attention=, remat=)` chooses them and the per-layer remat.

    model = Qwen3(Qwen3Config(...), rngs=nnx.Rngs(0))
    logits_btv = model(tokens_bt)                       # defaults: positions 0..T-1, no packing
    hidden_btd = model(tokens_bt, positions_bt, segment_ids_bt, branch_ids_bt, return_hidden=True)

Decoding with a KV cache (used by `sampler.py`) goes through `Qwen3.decode`.

Why one file of ~470 lines: the config, the layers and the cached decode path share shapes and
conventions that are read together; the training attention kernels are a subject of their own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dagger_jax.model import attention as attention_lib
from dagger_jax.model.attention import (  # noqa: F401  (re-exported: the model's public names)
    RowMask, attention_bias, attention_mask, causal_block_attention)
from dagger_jax.model.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """The architecture, from `config.model` (`from_config`) or an HF config.json
  (`hf.config_from_hf`). No field has a default: `configs/base.py` is the one place that has
  them, commented."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  rms_norm_eps: float
  tie_word_embeddings: bool
  max_position_embeddings: int
  param_dtype: str
  dtype: str

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    for field in ("param_dtype", "dtype"):
      if getattr(self, field) not in _DTYPES:
        raise ValueError(f"{field}={getattr(self, field)!r}: must be one of {tuple(_DTYPES)}")

  @classmethod
  def from_config(cls, model_config: Any) -> "Qwen3Config":
    """From `config.model` (ml-collections); keys that are not architecture are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(model_config).items() if k in names})

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  def num_params(self) -> int:
    d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * h
    layer = attn + 3 * d * f + 2 * d
    return self.num_layers * layer + v * d * (1 if self.tie_word_embeddings else 2) + d


def _param(rngs: nnx.Rngs, shape, logical_axes, dtype, std: float = 0.02) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=logical_axes)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 (as transformers' Qwen3RMSNorm)."""

  def __init__(self, dim: int, eps: float, logical_axis: str, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(logical_axis,))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale.get_value().astype(jnp.float32) * y.astype(x.dtype)).astype(x.dtype)


@functools.lru_cache(maxsize=16)
def rope_table(head_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin of every position's rotary angles: two float32 [max_positions, head_dim / 2].

  Angles are the float32 products `position * inv_freq`, as transformers computes them; their cos
  and sin are taken here once, on the host (float64, rounded to float32). Computing them in the
  graph instead costs ~4% of a CPU training step (`benchmarks/train_step.py`): XLA fuses the cos
  and sin into every consumer, so each layer's q and k, forward and backward, evaluate them again
  per element. The tables are compile-time constants: 2 x 1 MiB for 4096 positions x head_dim 128
  (2 x 10 MiB at Qwen3's 40960 positions). Read-only: the cache hands out the same arrays.
  """
  inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                           / np.float32(head_dim)))).astype(np.float32)
  angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
  tables = (np.cos(angles.astype(np.float64)).astype(np.float32),
            np.sin(angles.astype(np.float64)).astype(np.float32))
  for table in tables:
    table.flags.writeable = False
  return tables


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float,
         max_positions: int) -> jax.Array:
  """Rotary embedding, half-split layout (`rotate_half`), as Qwen3.

  Positions index `rope_table(h, theta, max_positions)`: one at or beyond `max_positions`
  (`config.max_position_embeddings`) gives NaN, not a silently wrong rotation.
  """
  h = x_btnh.shape[-1]
  cos_table, sin_table = rope_table(h, float(theta), int(max_positions))
  cos = jnp.take(jnp.asarray(cos_table), positions_bt, axis=0, mode="fill",
                 fill_value=jnp.nan)[:, :, None, :]
  sin = jnp.take(jnp.asarray(sin_table), positions_bt, axis=0, mode="fill",
                 fill_value=jnp.nan)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of every layer for `s` slots, shared write index (prompts are left-padded).

  k, v: one [b, k, s, h] array per layer (a tuple, so a decode step updates each layer's buffer
  in place instead of re-stacking all layers; heads before slots, see `cached_attention`);
  valid: [b, s] slot holds a real token; index: next slot to write.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, config: Qwen3Config, batch: int, slots: int) -> "KVCache":
    shape = (batch, config.num_kv_heads, slots, config.head_dim)
    layers = range(config.num_layers)
    return cls(k=tuple(jnp.zeros(shape, config.jnp_dtype) for _ in layers),
               v=tuple(jnp.zeros(shape, config.jnp_dtype) for _ in layers),
               valid=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))


def cached_attention(q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array,
                     mask_b1ts: jax.Array) -> jax.Array:
  """`Attention.attend` over keys/values in the cache layout [b, k, s, h].

  (b, k) are the einsums' batch dimensions and (s, h) stay contiguous: for one query token
  XLA:CPU runs this about 2.5x faster than the [b, s, k, h] layout.
  """
  b, t, n, h = q_btnh.shape
  kv = k_bksh.shape[1]
  q_bkgth = q_btnh.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
  scores = jnp.einsum("bkgth,bksh->bkgts", q_bkgth, k_bksh,
                      preferred_element_type=jnp.float32) * (h ** -0.5)
  scores = jnp.where(mask_b1ts[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bksh.dtype)
  out_bkgth = jnp.einsum("bkgts,bksh->bkgth", probs, v_bksh)
  return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nnx.Module):

  def __init__(self, c: Qwen3Config, rngs: nnx.Rngs):
    pd = c.jnp_param_dtype
    d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
    self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd)
    self.q_norm = RMSNorm(h, c.rms_norm_eps, "head_dim", pd)
    self.k_norm = RMSNorm(h, c.rms_norm_eps, "head_dim", pd)
    self.config = c

  def project_qkv(self, x_btd, positions_bt):
    c, dt = self.config, self.config.jnp_dtype
    q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.q_proj.get_value().astype(dt))
    k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.k_proj.get_value().astype(dt))
    v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.v_proj.get_value().astype(dt))
    q_btnh = rope(self.q_norm(q_btnh), positions_bt, c.rope_theta, c.max_position_embeddings)
    k_btkh = rope(self.k_norm(k_btkh), positions_bt, c.rope_theta, c.max_position_embeddings)
    return q_btnh, k_btkh, v_btkh

  def output(self, out_btnh):
    o = self.o_proj.get_value().astype(self.config.jnp_dtype)
    return jnp.einsum("btnh,nhd->btd", out_btnh, o)

  def __call__(self, x_btd, positions_bt, mask: RowMask):
    """Self-attention of whole rows (training), with `mask.implementation` (attention.py)."""
    q, k, v = self.project_qkv(x_btd, positions_bt)
    return self.output(attention_lib.attend(q, k, v, mask))

  def prefill(self, x_btd, positions_bt, bias_b1tt, last_only: bool = False):
    """Causal self-attention of a prompt -> (output [b, t, d], keys and values [b, k, t, h]).

    With `last_only` the output is the last position's only ([b, 1, d]).
    """
    q, k, v = self.project_qkv(x_btd, positions_bt)
    k_bkth, v_bkth = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if last_only:
      out = cached_attention(q[:, -1:], k_bkth, v_bkth, bias_b1tt[:, :, -1:] == 0)
    else:
      out = causal_block_attention(q, k, v, bias_b1tt)
    return self.output(out), k_bkth, v_bkth

  def decode(self, x_btd, positions_bt, mask_b1ts, k_bksh, v_bksh, index):
    """Writes this step's keys/values at slot `index` and attends over the whole cache."""
    q, k, v = self.project_qkv(x_btd, positions_bt)
    k_bksh = jax.lax.dynamic_update_slice_in_dim(
        k_bksh, k.transpose(0, 2, 1, 3).astype(k_bksh.dtype), index, 2)
    v_bksh = jax.lax.dynamic_update_slice_in_dim(
        v_bksh, v.transpose(0, 2, 1, 3).astype(v_bksh.dtype), index, 2)
    return self.output(cached_attention(q, k_bksh, v_bksh, mask_b1ts)), k_bksh, v_bksh


@jax.custom_vjp
def _dense(x_nd: jax.Array, w_dm: jax.Array) -> jax.Array:
  """x @ w, with the weight gradient computed as x^T @ dy.

  Left to itself XLA:CPU transposes the [n, m] output gradient for the weight gradient; with
  n tokens and m >= d (the MLP) transposing x is cheaper: ~9% off a training step.
  """
  return x_nd @ w_dm


def _dense_fwd(x_nd, w_dm):
  return x_nd @ w_dm, (x_nd, w_dm)


def _dense_bwd(residuals, dy_nm):
  x_nd, w_dm = residuals
  return dy_nm @ w_dm.T, jnp.transpose(x_nd) @ dy_nm


_dense.defvjp(_dense_fwd, _dense_bwd)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, c: Qwen3Config, rngs: nnx.Rngs):
    pd = c.jnp_param_dtype
    self.gate_proj = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd)
    self.up_proj = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd)
    self.down_proj = _param(rngs, (c.intermediate_size, c.hidden_size), ("mlp", "embed"), pd)
    self.dtype = c.jnp_dtype

  def __call__(self, x_btd):
    dt = self.dtype
    gate_btf = x_btd @ self.gate_proj.get_value().astype(dt)
    up_btf = x_btd @ self.up_proj.get_value().astype(dt)
    h_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "mlp"))
    return h_btf @ self.down_proj.get_value().astype(dt)

  def fused(self, x_btd):
    """The same for whole rows (training), faster on XLA:CPU: gate and up as one matmul against
    their weights interleaved column by column ([d, f, 2] -> [d, 2f], so a tensor-sharded `f`
    stays contiguous), and weight gradients as x^T @ dy (`_dense`). Stacking copies both weights
    once per call: negligible against t x d x f work, not for a one-token decode step."""
    dt = self.dtype
    b, t, d = x_btd.shape
    f = self.gate_proj.get_value().shape[1]
    w_d2f = jnp.stack([self.gate_proj.get_value(), self.up_proj.get_value()], axis=-1)
    gate_up_nf2 = _dense(x_btd.reshape(b * t, d), w_d2f.reshape(d, 2 * f).astype(dt))
    gate_up_nf2 = gate_up_nf2.reshape(b * t, f, 2)
    h_nf = jax.nn.silu(gate_up_nf2[..., 0]) * gate_up_nf2[..., 1]
    h_btf = constrain(h_nf.reshape(b, t, f), ("batch", "length", "mlp"))
    out_nd = _dense(h_btf.reshape(b * t, f), self.down_proj.get_value().astype(dt))
    return out_nd.reshape(b, t, d)


class Block(nnx.Module):

  def __init__(self, c: Qwen3Config, rngs: nnx.Rngs):
    pd = c.jnp_param_dtype
    self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "norm", pd)
    self.attn = Attention(c, rngs)
    self.post_attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "norm", pd)
    self.mlp = MLP(c, rngs)

  def __call__(self, x_btd, positions_bt, mask: RowMask):
    x_btd = x_btd + self.attn(self.input_norm(x_btd), positions_bt, mask)
    x_btd = x_btd + self.mlp.fused(self.post_attention_norm(x_btd))
    return constrain(x_btd, ("batch", "length", "embed"))

  def prefill(self, x_btd, positions_bt, bias_b1tt, last_only: bool = False):
    a, k_bkth, v_bkth = self.attn.prefill(self.input_norm(x_btd), positions_bt, bias_b1tt,
                                          last_only)
    x_btd = (x_btd[:, -1:] if last_only else x_btd) + a
    return x_btd + self.mlp(self.post_attention_norm(x_btd)), k_bkth, v_bkth

  def decode(self, x_btd, positions_bt, mask_b1ts, k_bksh, v_bksh, index):
    a, k_bksh, v_bksh = self.attn.decode(self.input_norm(x_btd), positions_bt, mask_b1ts,
                                         k_bksh, v_bksh, index)
    x_btd = x_btd + a
    return x_btd + self.mlp(self.post_attention_norm(x_btd)), k_bksh, v_bksh


# `train.remat`: what each layer keeps for the backward pass (one checkpoint per layer).
#   none  everything (the fastest step, the most memory)
#   dots  its matmul outputs without batch dimensions (the q/k/v/o and MLP projections); norms,
#         rotary, activations and the attention are recomputed
#   full  only its input; the whole layer is recomputed
REMAT_POLICIES = {"none": None,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


def model_options(config: Any) -> dict[str, str]:
  """`Qwen3`'s run options from a whole config: `model.attention` and `train.remat` (neither is
  architecture, so neither is a `Qwen3Config` field or part of a checkpoint)."""
  return {"attention": str(config.model.get("attention", "auto")),
          "remat": str(config.train.get("remat", "none"))}


class Qwen3(nnx.Module):
  """The decoder. `attention` (`config.model.attention`) picks the training attention
  (`attention.resolve`); `remat` (`config.train.remat`) what each layer keeps for the backward
  pass (`REMAT_POLICIES`). Both apply to `__call__` only: `prefill` and `decode` serve sampling."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, attention: str = "auto",
               remat: str = "none"):
    c, pd = config, config.jnp_param_dtype
    attention_lib.resolve(attention, "cpu")  # a bad name fails here, not at the first step
    if remat not in REMAT_POLICIES:
      raise ValueError(f"config.train.remat={remat!r}: must be one of {tuple(REMAT_POLICIES)}")
    self.config = c
    self.attention = attention
    self.remat = remat
    self.embedding = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd)
    self.layers = nnx.List([Block(c, rngs) for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "norm", pd)
    if not c.tie_word_embeddings:
      self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), pd)

  def embed(self, tokens_bt: jax.Array) -> jax.Array:
    x_btd = jnp.take(self.embedding.get_value(), tokens_bt, axis=0).astype(self.config.jnp_dtype)
    return constrain(x_btd, ("batch", "length", "embed"))

  def unembedding(self) -> jax.Array:
    """The [d, v] unembedding matrix (the embedding's transpose when tied)."""
    if self.config.tie_word_embeddings:
      return self.embedding.get_value().T
    return self.lm_head.get_value()

  def unembed(self, hidden_btd: jax.Array) -> jax.Array:
    """Final hidden states (after the final norm) -> float32 logits [b, t, v]."""
    w_dv = self.unembedding().astype(self.config.jnp_dtype)
    return jnp.einsum("btd,dv->btv", hidden_btd, w_dv, preferred_element_type=jnp.float32)

  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None, branch_ids_bt: jax.Array | None = None,
               *, return_hidden: bool = False) -> jax.Array:
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones((b, t), jnp.int32)
    if branch_ids_bt is None:
      branch_ids_bt = jnp.zeros((b, t), jnp.int32)
    mask = attention_lib.row_mask(segment_ids_bt, branch_ids_bt, self.attention)
    run_layer = Block.__call__
    if self.remat != "none":
      run_layer = nnx.remat(run_layer, policy=REMAT_POLICIES[self.remat])
    x_btd = self.embed(tokens_bt)
    for layer in self.layers:
      x_btd = run_layer(layer, x_btd, positions_bt, mask)
    hidden_btd = self.final_norm(x_btd)
    return hidden_btd if return_hidden else self.unembed(hidden_btd)

  def prefill(self, tokens_bt: jax.Array, positions_bt: jax.Array, valid_bt: jax.Array,
              slots: int, *, return_hidden: bool = False,
              last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Runs a left-padded prompt into a fresh cache of `slots` >= t slots (then `decode`).

    Equivalent to `decode(tokens_bt, positions_bt, valid_bt, KVCache.zeros(config, b, slots))`,
    but attends over the prompt's own t keys with causal block skipping (see
    `causal_block_attention`) instead of over all slots. With `last_only`, returns the last
    position's logits (or hidden state) only, [b, 1, ...]: what sampling the next token needs;
    the last layer then runs its queries and MLP for that position alone (same cache).
    """
    b, t = tokens_bt.shape
    if slots < t:
      raise ValueError(f"prefill: {slots} cache slots cannot hold a prompt of {t} tokens")
    valid_segments_bt = valid_bt.astype(jnp.int32)  # padding is segment 0: sees no real token
    bias_b1tt = attention_bias(valid_segments_bt, jnp.zeros_like(valid_segments_bt))
    x_btd = self.embed(tokens_bt)
    ks, vs = [], []
    pad = ((0, 0), (0, 0), (0, slots - t), (0, 0))
    for i, layer in enumerate(self.layers):
      last = last_only and i == len(self.layers) - 1
      x_btd, k_bkth, v_bkth = layer.prefill(x_btd, positions_bt, bias_b1tt, last)
      ks.append(jnp.pad(k_bkth.astype(self.config.jnp_dtype), pad))
      vs.append(jnp.pad(v_bkth.astype(self.config.jnp_dtype), pad))
    hidden_btd = self.final_norm(x_btd)
    valid_bs = jnp.pad(valid_bt, ((0, 0), (0, slots - t)))
    cache = KVCache(k=tuple(ks), v=tuple(vs), valid=valid_bs, index=jnp.asarray(t, jnp.int32))
    return (hidden_btd if return_hidden else self.unembed(hidden_btd)), cache

  def decode(self, tokens_bt: jax.Array, positions_bt: jax.Array, valid_bt: jax.Array,
             cache: KVCache, *, return_hidden: bool = False) -> tuple[jax.Array, KVCache]:
    """Runs `t` new tokens (a prompt into an empty cache, or t = 1 per step after `prefill`).

    Tokens are written to slots `cache.index .. cache.index + t - 1`; `valid_bt` is False for
    left padding. A query sees every valid slot up to its own. Returns logits [b, t, v] (float32;
    or the final hidden states [b, t, d] with `return_hidden`, so a prefill can unembed only its
    last position) and the updated cache.
    """
    b, t = tokens_bt.shape
    s = cache.valid.shape[1]
    valid_bs = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid_bt, cache.index, 1)
    query_slot_t = cache.index + jnp.arange(t)
    mask_b1ts = (valid_bs[:, None, :] & (jnp.arange(s)[None, None, :] <= query_slot_t[None, :, None]))
    mask_b1ts = mask_b1ts[:, None]
    x_btd = self.embed(tokens_bt)
    ks, vs = [], []
    for layer, k_bksh, v_bksh in zip(self.layers, cache.k, cache.v):
      x_btd, k_bksh, v_bksh = layer.decode(x_btd, positions_bt, mask_b1ts, k_bksh, v_bksh,
                                           cache.index)
      ks.append(k_bksh)
      vs.append(v_bksh)
    hidden_btd = self.final_norm(x_btd)
    new_cache = KVCache(k=tuple(ks), v=tuple(vs), valid=valid_bs, index=cache.index + t)
    return (hidden_btd if return_hidden else self.unembed(hidden_btd)), new_cache
