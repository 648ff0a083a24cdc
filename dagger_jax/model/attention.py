"""Training self-attention over packed rows with label branches: one rule, three implementations.

The rule (DESIGN.md, "Token row"): query i sees key j iff j <= i in row order,
`segment_ids[i] == segment_ids[j]`, and `branch_ids[j]` is 0 (the shared prefix) or
`branch_ids[i]` (`visible`). Chosen by `config.model.attention` (`resolve`):

  xla_blocks  `causal_block_attention`: 128-query blocks against the keys up to the block's end,
              the mask as one [b, 1, t, t] float32 bias, the backward pass from the saved float32
              probabilities. The fastest on XLA:CPU at the demo's rows; memory grows with t^2.
  flash_jax   `flash_attention`: online softmax over key blocks in plain JAX (while loops), the
              mask made inside each tile from the ids, the backward pass recomputed tile by tile
              from the saved log-sum-exp (custom VJP). Memory O(t x block); no [t, t] array.
  pallas      `pallas_attention`: the same algorithm as Pallas kernels, Mosaic on TPU (the key
              blocks are the grid's sequential axis, accumulators in VMEM) and Triton on GPU (a
              loop over key blocks inside the kernel).
  auto        xla_blocks on CPU (so CPU steps are what they were), flash_jax on GPU and TPU.
              The Pallas kernels are tested here in interpret mode only; auto picks them once a
              run on the hardware has checked them.

Skipping. A tile (query block, key block) is computed only if it is *live*: some pair in it may
be visible (`live_tiles`, from per-block id ranges and each segment's first position: never
False for a visible pair, exact for packed rows without branches). That skips the causal upper
half, every tile between two packed sequences, and key blocks that hold only other branches.

Shapes in names as in `qwen3.py`: b batch, t length, n query heads, k kv heads, g = n / k, h head
dim; r = t x g rows (each kv head's g queries of a position adjacent), s keys. Scores, softmax
and accumulators are float32 whatever the compute dtype (bf16 at scale).

Why one file of ~830 lines: the implementations share the rule, the padding, the live tiles and
the tile math (`_softmax_step`, `_grad_tile`), and are tested against each other; each section
below is one implementation and reads on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMPLEMENTATIONS = ("auto", "xla_blocks", "flash_jax", "pallas")
XLA_BLOCK = 128  # `causal_block_attention`'s query block
FLASH_BLOCK = 512  # flash_jax's query and key block: few, large while-loop steps on an accelerator
TPU_BLOCKS = (512, 512)  # Mosaic (query, key) blocks; keys in lanes: a multiple of 128
GPU_BLOCKS = (64, 64)  # Triton (query, key) blocks: powers of two within shared memory
# A masked score: finite, so that a running max over masked scores only never meets inf - inf.
MASKED = -0.7 * float(np.finfo(np.float32).max)
# The segment of padding added to reach a whole number of blocks: no real token has it, so a
# padded query sees only padded keys (at least itself) and no real query sees a padded key.
PAD_SEGMENT = int(np.iinfo(np.int32).min)


# ------------------------------------------------------------------------------------ the rule


def visible(q_pos, q_seg, q_br, k_pos, k_seg, k_br):
  """The rule on broadcastable query and key index arrays -> bool (every implementation's)."""
  return (k_pos <= q_pos) & (k_seg == q_seg) & ((k_br == 0) | (k_br == q_br))


def attention_mask(segment_ids_bt: jax.Array, branch_ids_bt: jax.Array) -> jax.Array:
  """[b, 1, t, t] bool: causal, same segment, and key branch 0 or the query's own branch."""
  t = segment_ids_bt.shape[1]
  pos = jnp.arange(t)
  mask_btt = visible(pos[None, :, None], segment_ids_bt[:, :, None], branch_ids_bt[:, :, None],
                     pos[None, None, :], segment_ids_bt[:, None, :], branch_ids_bt[:, None, :])
  return mask_btt[:, None]


def attention_bias(segment_ids_bt: jax.Array, branch_ids_bt: jax.Array) -> jax.Array:
  """[b, 1, t, t] float32: 0 where `attention_mask` allows, the float32 minimum elsewhere.

  Added to the scores (once per layer, no select in the forward or the backward pass). Every
  query sees at least itself, so a masked score's exp is exactly 0, as with a select.
  """
  return jnp.where(attention_mask(segment_ids_bt, branch_ids_bt), 0.0,
                   jnp.finfo(jnp.float32).min).astype(jnp.float32)


def masked_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, branch_ids_bt) -> jax.Array:
  """The plain reference: all t x t scores, masked by `attention_mask`, one softmax (tests)."""
  b, t, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
  s = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_btkh,
                 preferred_element_type=jnp.float32) * h ** -0.5
  s = jnp.where(attention_mask(segment_ids_bt, branch_ids_bt)[:, :, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v_btkh.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", p, v_btkh, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q_btnh.dtype)


# ---------------------------------------------------------------------- xla_blocks (CPU path)


def _block_ranges(t: int, block: int):
  return [(start, min(start + block, t)) for start in range(0, t, block)]


def _block_attention_fwd_core(q_bkrh, k_bkhs, v_bksh, bias_btt, groups, block):
  """Output [b, k, r, h] and each query block's probabilities [b, k, rows, end] (rows r = t x g,
  query-major); q is pre-scaled, keys come transposed ([b, k, h, s])."""
  b, kv, r, h = q_bkrh.shape
  outs, probs = [], []
  for start, end in _block_ranges(r // groups, block):
    rows = slice(start * groups, end * groups)
    scores = jnp.einsum("bkrh,bkhs->bkrs", q_bkrh[:, :, rows], k_bkhs[:, :, :, :end],
                        preferred_element_type=jnp.float32)
    bias = jnp.broadcast_to(bias_btt[:, None, start:end, None, :end],
                            (b, kv, end - start, groups, end))
    p = jax.nn.softmax(scores + bias.reshape(scores.shape), axis=-1)
    probs.append(p)
    outs.append(jnp.einsum("bkrs,bksh->bkrh", p.astype(v_bksh.dtype), v_bksh[:, :, :end],
                           preferred_element_type=jnp.float32).astype(v_bksh.dtype))
  return jnp.concatenate(outs, axis=2), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _block_attention(q_bkrh, k_bkhs, v_bksh, bias_btt, groups, block):
  return _block_attention_fwd_core(q_bkrh, k_bkhs, v_bksh, bias_btt, groups, block)[0]


def _block_attention_fwd(q_bkrh, k_bkhs, v_bksh, bias_btt, groups, block):
  out, probs = _block_attention_fwd_core(q_bkrh, k_bkhs, v_bksh, bias_btt, groups, block)
  return out, (q_bkrh, k_bkhs, v_bksh, out, probs, bias_btt)


def _block_attention_bwd(groups, block, residuals, dout_bkrh):
  """Softmax attention backward from the saved probabilities, block by block; every matmul
  takes both operands in row-major order (x^T operands are small [h, rows] transposes)."""
  q_bkrh, k_bkhs, v_bksh, out_bkrh, probs, bias_btt = residuals
  f32 = jnp.float32
  b, kv, r, h = q_bkrh.shape
  t = r // groups
  delta_bkr = jnp.sum(dout_bkrh.astype(f32) * out_bkrh.astype(f32), axis=-1)
  dout_t = jnp.swapaxes(dout_bkrh, 2, 3)  # [b, k, h, r]
  q_t = jnp.swapaxes(q_bkrh, 2, 3)
  v_t = jnp.swapaxes(v_bksh, 2, 3)  # [b, k, h, s]
  k_bksh = jnp.swapaxes(k_bkhs, 2, 3)
  dq, dk_t, dv_t = [], jnp.zeros((b, kv, h, t), f32), jnp.zeros((b, kv, h, t), f32)
  for (start, end), p in zip(_block_ranges(t, block), probs):
    rows = slice(start * groups, end * groups)
    pad = ((0, 0), (0, 0), (0, 0), (0, t - end))
    dv_t = dv_t + jnp.pad(jnp.einsum("bkhr,bkrs->bkhs", dout_t[..., rows], p.astype(dout_t.dtype),
                                     preferred_element_type=f32), pad)
    dp = jnp.einsum("bkrh,bkhs->bkrs", dout_bkrh[:, :, rows], v_t[..., :end],
                    preferred_element_type=f32)
    ds = (p * (dp - delta_bkr[:, :, rows, None])).astype(q_bkrh.dtype)
    dq.append(jnp.einsum("bkrs,bksh->bkrh", ds, k_bksh[:, :, :end], preferred_element_type=f32))
    dk_t = dk_t + jnp.pad(jnp.einsum("bkhr,bkrs->bkhs", q_t[..., rows], ds,
                                     preferred_element_type=f32), pad)
  return (jnp.concatenate(dq, axis=2).astype(q_bkrh.dtype), dk_t.astype(k_bkhs.dtype),
          jnp.swapaxes(dv_t, 2, 3).astype(v_bksh.dtype), jnp.zeros_like(bias_btt))


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


def causal_block_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                           bias_b1tt: jax.Array, block: int = XLA_BLOCK) -> jax.Array:
  """Training self-attention over a (packed, branched) row, skipping the upper-right blocks.

  The mask is causal in row order, so queries [i, j) only need keys [0, j): with t = 4 blocks
  this does 10/16 of the t x t work, in the backward pass too. (b, k) are the einsums' batch
  dimensions and each kv head's g queries of a position are adjacent rows ([b, k, t x g, h]), so
  a query block is a contiguous row range. Scores and softmax in float32; `bias_b1tt` from
  `attention_bias`. A custom VJP computes the backward pass from the saved probabilities with
  row-major matmul operands only (XLA:CPU runs transposed-operand batch matmuls slowly).
  """
  b, t, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  g = n // kv
  q_bkrh = (q_btnh * (h ** -0.5)).reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4)
  q_bkrh = q_bkrh.reshape(b, kv, t * g, h)
  k_bkhs, v_bksh = k_btkh.transpose(0, 2, 3, 1), v_btkh.transpose(0, 2, 1, 3)
  out_bkrh = _block_attention(q_bkrh, k_bkhs, v_bksh, bias_b1tt[:, 0], g, block)
  return out_bkrh.reshape(b, kv, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


# ------------------------------------------------------------------ tiles: padding and skipping


def padded_length(t: int, block_q: int, block_k: int) -> int:
  """t rounded up to a whole number of query blocks and of key blocks."""
  whole = math.lcm(block_q, block_k)
  return -(-t // whole) * whole


def _pad_ids(ids_bt: jax.Array, t_pad: int, value: int) -> jax.Array:
  return jnp.pad(ids_bt.astype(jnp.int32), ((0, 0), (0, t_pad - ids_bt.shape[1])),
                 constant_values=value)


def _first_positions(ids_bt: jax.Array) -> jax.Array:
  """[b, t]: the first position in the row that holds each position's id (a stable sort)."""
  order = jnp.argsort(ids_bt, axis=1, stable=True)
  first = jax.vmap(jnp.searchsorted)(jnp.take_along_axis(ids_bt, order, axis=1), ids_bt)
  return jnp.take_along_axis(order, first, axis=1)


def live_tiles(segment_ids_bt, branch_ids_bt, block_q: int, block_k: int) -> jax.Array:
  """[b, t / block_q, t / block_k] bool: the tiles where some query may see some key (t a
  multiple of both blocks). Never False where a pair is visible, which is causal, shares a
  segment (so the blocks' segment ranges overlap, and the key is at or after the query's
  segment's first position) and has its key in the prefix (the key block's smallest branch is 0)
  or in the query's branch (so the branch ranges overlap). For a packed row, whose segments
  (padding included) are contiguous runs, and no branches, it is exact."""
  b, t = segment_ids_bt.shape
  nq, nk = t // block_q, t // block_k

  def ranges(ids_bt, block):
    blocks = ids_bt.reshape(b, -1, block)
    return blocks.min(-1), blocks.max(-1)

  qs_lo, qs_hi = ranges(segment_ids_bt, block_q)
  ks_lo, ks_hi = ranges(segment_ids_bt, block_k)
  qb_lo, qb_hi = ranges(branch_ids_bt, block_q)
  kb_lo, kb_hi = ranges(branch_ids_bt, block_k)
  first_key, _ = ranges(_first_positions(segment_ids_bt), block_q)  # [b, nq]
  q_, k_ = (slice(None), slice(None), None), (slice(None), None, slice(None))
  same_segment = (qs_lo[q_] <= ks_hi[k_]) & (ks_lo[k_] <= qs_hi[q_])
  key_ends = (np.arange(nk) + 1) * block_k
  after_start = key_ends[None, None, :] > first_key[q_]
  branch = (kb_lo[k_] == 0) | ((qb_lo[q_] <= kb_hi[k_]) & (kb_lo[k_] <= qb_hi[q_]))
  causal = (np.arange(nk)[None, :] * block_k) <= (np.arange(nq)[:, None] + 1) * block_q - 1
  return same_segment & after_start & branch & causal[None]


def _spans(live: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and last True along the last axis (int32; every row has one)."""
  n = live.shape[-1]
  first = jnp.argmax(live, axis=-1)
  last = n - 1 - jnp.argmax(live[..., ::-1], axis=-1)
  return first.astype(jnp.int32), last.astype(jnp.int32)


# ---------------------------------------------------------------- the tile math (all but XLA)


def _scores(q_rh, k_ch, scale):
  """[..., r, c] float32 scores of a query tile against a key tile."""
  return jnp.einsum("...rh,...ch->...rc", q_rh, k_ch, preferred_element_type=jnp.float32) * scale


def _mm(a_rc, b_ch):
  return jnp.einsum("...rc,...ch->...rh", a_rc, b_ch, preferred_element_type=jnp.float32)


def _mm_tn(a_rc, b_rh):
  """a^T b, as an explicit transpose and a plain product (what Mosaic lowers)."""
  return _mm(jnp.swapaxes(a_rc, -1, -2), b_rh)


def _softmax_step(s_rc, mask_rc, m_r1, l_r1, acc_rh, v_ch):
  """One key tile of the online softmax: running max m, sum l and unnormalised output acc
  (float32, m and l with a trailing axis of 1). Masked scores give exactly 0."""
  s_rc = jnp.where(mask_rc, s_rc, MASKED)
  m_new = jnp.maximum(m_r1, jnp.max(s_rc, axis=-1, keepdims=True))
  p_rc = jnp.where(mask_rc, jnp.exp(s_rc - m_new), 0.0)
  alpha = jnp.exp(m_r1 - m_new)
  l_new = alpha * l_r1 + jnp.sum(p_rc, axis=-1, keepdims=True)
  return m_new, l_new, alpha * acc_rh + _mm(p_rc.astype(v_ch.dtype), v_ch)


def _grad_tile(s_rc, mask_rc, lse_r1, delta_r1, do_rh, v_ch):
  """Probabilities p and score gradients ds of a tile, recomputed from the log-sum-exp
  (delta = rowsum(dout * out)); ds is d loss / d (q k^T x scale), before the scale."""
  p_rc = jnp.where(mask_rc, jnp.exp(s_rc - lse_r1), 0.0)
  dp_rc = jnp.einsum("...rh,...ch->...rc", do_rh, v_ch, preferred_element_type=jnp.float32)
  return p_rc, p_rc * (dp_rc - delta_r1)


# ------------------------------------------------------------------------ flash_jax (plain JAX)


def _to_rows(x_btnh, kv):
  """[b, t, n, h] -> [b, k, t x g, h], each kv head's g queries of a position adjacent."""
  b, t, n, h = x_btnh.shape
  x_bktgh = x_btnh.reshape(b, t, kv, n // kv, h).transpose(0, 2, 1, 3, 4)
  return x_bktgh.reshape(b, kv, t * (n // kv), h)


def _from_rows(x_bkrh, t):
  b, kv, r, h = x_bkrh.shape
  g = r // t
  return x_bkrh.reshape(b, kv, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, kv * g, h)


def _row_tile_mask(ids, i, j, block_q, block_k, groups):
  """The rule on query block i x key block j, as [b, 1, block_q x g, block_k]."""
  seg_bt, br_bt = ids
  q_pos = i * block_q + jnp.arange(block_q)
  k_pos = j * block_k + jnp.arange(block_k)
  q_seg, q_br = (lax.dynamic_slice_in_dim(x, i * block_q, block_q, 1) for x in (seg_bt, br_bt))
  k_seg, k_br = (lax.dynamic_slice_in_dim(x, j * block_k, block_k, 1) for x in (seg_bt, br_bt))
  mask_bqk = visible(q_pos[None, :, None], q_seg[:, :, None], q_br[:, :, None],
                     k_pos[None, None, :], k_seg[:, None, :], k_br[:, None, :])
  b = mask_bqk.shape[0]
  mask = jnp.broadcast_to(mask_bqk[:, None, :, None, :], (b, 1, block_q, groups, block_k))
  return mask.reshape(b, 1, block_q * groups, block_k)


def _flash_fwd_core(q_bkrh, k_bksh, v_bksh, seg_bt, br_bt, groups, block_q, block_k):
  """Output [b, k, r, h] and log-sum-exp [b, k, r, 1] (float32); t a multiple of the blocks."""
  b, kv, r, h = q_bkrh.shape
  t = r // groups
  rows = block_q * groups
  scale = h ** -0.5
  live = jnp.any(live_tiles(seg_bt, br_bt, block_q, block_k), axis=0)  # [nq, nk]: any row's
  first, last = _spans(live)

  def q_block(i, carry):
    out, lse = carry
    q_i = lax.dynamic_slice_in_dim(q_bkrh, i * rows, rows, 2)

    def k_block(j, state):
      def step(state):
        k_j, v_j = (lax.dynamic_slice_in_dim(x, j * block_k, block_k, 2) for x in (k_bksh, v_bksh))
        mask = _row_tile_mask((seg_bt, br_bt), i, j, block_q, block_k, groups)
        return _softmax_step(_scores(q_i, k_j, scale), mask, *state, v_j)
      return lax.cond(live[i, j], step, lambda state: state, state)

    init = (jnp.full((b, kv, rows, 1), MASKED, jnp.float32),
            jnp.zeros((b, kv, rows, 1), jnp.float32), jnp.zeros((b, kv, rows, h), jnp.float32))
    m, l, acc = lax.fori_loop(first[i], last[i] + 1, k_block, init)
    out = lax.dynamic_update_slice_in_dim(out, (acc / l).astype(out.dtype), i * rows, 2)
    lse = lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i * rows, 2)
    return out, lse

  init = (jnp.zeros_like(q_bkrh), jnp.zeros((b, kv, r, 1), jnp.float32))
  return lax.fori_loop(0, t // block_q, q_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q_bkrh, k_bksh, v_bksh, seg_bt, br_bt, groups, block_q, block_k):
  return _flash_fwd_core(q_bkrh, k_bksh, v_bksh, seg_bt, br_bt, groups, block_q, block_k)[0]


def _flash_fwd(q_bkrh, k_bksh, v_bksh, seg_bt, br_bt, groups, block_q, block_k):
  out, lse = _flash_fwd_core(q_bkrh, k_bksh, v_bksh, seg_bt, br_bt, groups, block_q, block_k)
  return out, (q_bkrh, k_bksh, v_bksh, seg_bt, br_bt, out, lse)


def _flash_bwd(groups, block_q, block_k, residuals, dout_bkrh):
  """One pass over the live tiles: dq of a query block in the inner loop's carry, dk and dv
  (float32, [b, k, t, h]) in the outer loop's; O(t) memory."""
  q_bkrh, k_bksh, v_bksh, seg_bt, br_bt, out_bkrh, lse = residuals
  f32 = jnp.float32
  b, kv, r, h = q_bkrh.shape
  t = r // groups
  rows = block_q * groups
  scale = h ** -0.5
  delta = jnp.sum(dout_bkrh.astype(f32) * out_bkrh.astype(f32), axis=-1, keepdims=True)
  live = jnp.any(live_tiles(seg_bt, br_bt, block_q, block_k), axis=0)
  first, last = _spans(live)

  def q_block(i, carry):
    dq, dk, dv = carry
    q_i, do_i = (lax.dynamic_slice_in_dim(x, i * rows, rows, 2) for x in (q_bkrh, dout_bkrh))
    lse_i, delta_i = (lax.dynamic_slice_in_dim(x, i * rows, rows, 2) for x in (lse, delta))

    def k_block(j, state):
      def step(state):
        dq_i, dk, dv = state
        k_j, v_j = (lax.dynamic_slice_in_dim(x, j * block_k, block_k, 2) for x in (k_bksh, v_bksh))
        mask = _row_tile_mask((seg_bt, br_bt), i, j, block_q, block_k, groups)
        p, ds = _grad_tile(_scores(q_i, k_j, scale), mask, lse_i, delta_i, do_i, v_j)
        ds = (ds * scale).astype(q_bkrh.dtype)
        dq_i = dq_i + _mm(ds, k_j)

        def add(acc, x):
          return lax.dynamic_update_slice_in_dim(
              acc, lax.dynamic_slice_in_dim(acc, j * block_k, block_k, 2) + x, j * block_k, 2)
        return (dq_i, add(dk, _mm_tn(ds, q_i)),
                add(dv, _mm_tn(p.astype(dout_bkrh.dtype), do_i)))
      return lax.cond(live[i, j], step, lambda state: state, state)

    dq_i, dk, dv = lax.fori_loop(first[i], last[i] + 1, k_block,
                                 (jnp.zeros((b, kv, rows, h), f32), dk, dv))
    return lax.dynamic_update_slice_in_dim(dq, dq_i.astype(dq.dtype), i * rows, 2), dk, dv

  zeros = jnp.zeros((b, kv, t, h), f32)
  dq, dk, dv = lax.fori_loop(0, t // block_q, q_block, (jnp.zeros_like(q_bkrh), zeros, zeros))
  return dq, dk.astype(k_bksh.dtype), dv.astype(v_bksh.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                    segment_ids_bt: jax.Array, branch_ids_bt: jax.Array, *,
                    block_q: int = FLASH_BLOCK, block_k: int = FLASH_BLOCK) -> jax.Array:
  """Flash attention in plain JAX: online softmax over the live key tiles of each query block.

  Rows are padded to a whole number of blocks (blocks larger than the row shrink to it, in
  multiples of 8). Residuals for the backward pass: q, k, v, the output and a float32
  log-sum-exp per query; nothing of size t x t exists in either pass (tests/test_attention.py
  checks every intermediate's shape).
  """
  b, t, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  block_q, block_k = (min(x, -(-t // 8) * 8) for x in (block_q, block_k))
  t_pad = padded_length(t, block_q, block_k)
  pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q_btnh, k_btkh, v_btkh))
  seg = _pad_ids(segment_ids_bt, t_pad, PAD_SEGMENT)
  br = _pad_ids(branch_ids_bt, t_pad, 0)
  out = _flash(_to_rows(q, kv), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg, br,
               n // kv, block_q, block_k)
  return _from_rows(out, t_pad)[:, :t]


# ------------------------------------------------------------------------------ Pallas kernels


def _pallas():
  from jax.experimental import pallas as pl  # imported on use: CPU-only runs never need it
  return pl


def _tile_ids(i, j, block_q, block_k, q_seg, q_br, k_seg, k_br):
  """The rule on one tile, from [block_q, 1] query ids and [1, block_k] key ids."""
  shape = (block_q, block_k)
  q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
  return visible(q_pos, q_seg, q_br, k_pos, k_seg, k_br)


def _any(mask_rc):
  """Whether a 2-D mask has a True, as two one-axis reductions (what Triton lowers)."""
  return jnp.max(jnp.max(mask_rc.astype(jnp.int32), axis=1), axis=0) > 0


# Mosaic (TPU): grid (b, n, query block, key block) with the last axis sequential. Scalar-prefetched
# spans of live key blocks per (row, query block) gate the compute, and the key index maps clamp
# into the span so that a skipped step fetches nothing new.


def _tpu_fwd_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, qs_ref, qb_ref, ks_ref, kb_ref,
                    o_ref, lse_ref, m_scr, l_scr, acc_scr, *, scale, block_q, block_k):
  pl = _pallas()
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASKED, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= first_ref[b, i]) & (j <= last_ref[b, i]))
  def _step():
    mask = _tile_ids(i, j, block_q, block_k, qs_ref[...], qb_ref[...], ks_ref[...], kb_ref[...])
    m, l, acc = _softmax_step(_scores(q_ref[...], k_ref[...], scale), mask, m_scr[...],
                              l_scr[...], acc_scr[...], v_ref[...])
    m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _store():
    o_ref[...] = (acc_scr[...] / l_scr[...]).astype(o_ref.dtype)
    lse_ref[...] = m_scr[...] + jnp.log(l_scr[...])


def _tpu_dq_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref,
                   qb_ref, ks_ref, kb_ref, dq_ref, dq_scr, *, scale, block_q, block_k):
  pl = _pallas()
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when((j >= first_ref[b, i]) & (j <= last_ref[b, i]))
  def _step():
    mask = _tile_ids(i, j, block_q, block_k, qs_ref[...], qb_ref[...], ks_ref[...], kb_ref[...])
    _, ds = _grad_tile(_scores(q_ref[...], k_ref[...], scale), mask, lse_ref[...],
                       delta_ref[...], do_ref[...], v_ref[...])
    dq_scr[...] += _mm((ds * scale).astype(k_ref.dtype), k_ref[...])

  @pl.when(j == pl.num_programs(3) - 1)
  def _store():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _tpu_dkv_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref,
                    qb_ref, ks_ref, kb_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, scale, block_q,
                    block_k):
  pl = _pallas()
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when((i >= first_ref[b, j]) & (i <= last_ref[b, j]))
  def _step():
    q, do = q_ref[...], do_ref[...]
    mask = _tile_ids(i, j, block_q, block_k, qs_ref[...], qb_ref[...], ks_ref[...], kb_ref[...])
    p, ds = _grad_tile(_scores(q, k_ref[...], scale), mask, lse_ref[...], delta_ref[...], do,
                       v_ref[...])
    dv_scr[...] += _mm_tn(p.astype(do.dtype), do)
    dk_scr[...] += _mm_tn((ds * scale).astype(q.dtype), q)

  @pl.when(i == pl.num_programs(3) - 1)
  def _store():
    dk_ref[...] = dk_scr[...]
    dv_ref[...] = dv_scr[...]


def _tpu_call(kernel, spans, inputs, specs, outputs, scratch, grid, interpret):
  """One Mosaic call: `specs` are (block shape, index map over (b, n, outer, inner, first,
  last)) for `inputs` then `outputs` (ShapeDtypeStructs); `scratch` float32 VMEM shapes."""
  pl = _pallas()
  from jax.experimental.pallas import tpu as pltpu
  block_specs = [pl.BlockSpec(shape, index) for shape, index in specs]
  return pl.pallas_call(
      kernel, out_shape=outputs,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=grid, in_specs=block_specs[:len(inputs)],
          out_specs=block_specs[len(inputs):],
          scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in scratch]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(*spans, *inputs)


def _tpu_specs(groups, block_q, block_k, h, *, keys_outer: bool):
  """Block specs of q, k, v, dout, lse, delta and the ids for the TPU grids: (b, n, i, j) with
  key blocks inner (forward, dq) or (b, n, j, i) with query blocks inner (dk, dv). The inner
  index is clamped into the live span, so a skipped step keeps the block it has."""
  sq = _pallas().squeezed

  def clamp(inner, first, last, b, outer):
    return jnp.minimum(jnp.maximum(inner, first[b, outer]), last[b, outer])

  if keys_outer:
    def q_blk(b, n, j, i, first, last):
      return clamp(i, first, last, b, j)

    def k_blk(b, n, j, i, first, last):
      return j
  else:
    def q_blk(b, n, i, j, first, last):
      return i

    def k_blk(b, n, i, j, first, last):
      return clamp(j, first, last, b, i)

  def q_map(*a):
    return a[0], a[1], q_blk(*a), 0

  def k_map(*a):
    return a[0], a[1] // groups, k_blk(*a), 0

  def qid_map(*a):
    return a[0], q_blk(*a), 0

  def kid_map(*a):
    return a[0], 0, k_blk(*a)

  return {"by_query": ((sq, sq, block_q, h), q_map), "kv_head": ((sq, sq, block_k, h), k_map),
          "by_query_1": ((sq, sq, block_q, 1), q_map),
          "query_ids": ((sq, block_q, 1), qid_map), "key_ids": ((sq, 1, block_k), kid_map),
          "by_key": ((sq, sq, block_k, h), lambda *a: (a[0], a[1], k_blk(*a), 0))}


# Triton (GPU): grid (b, n, block); the kernel loops over the other side's blocks up to (or
# from) the diagonal and skips a tile whose mask is all False (cond on the ids alone).


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, qs_ref, qb_ref, ks_ref, kb_ref, o_ref, lse_ref, *, scale,
                    block_q, block_k):
  pl = _pallas()
  i = pl.program_id(2)
  q, q_seg, q_br = q_ref[...], qs_ref[...], qb_ref[...]

  def k_block(j, state):
    keys = pl.ds(j * block_k, block_k)
    mask = _tile_ids(i, j, block_q, block_k, q_seg, q_br, ks_ref[:, keys], kb_ref[:, keys])

    def step(state):
      return _softmax_step(_scores(q, k_ref[keys, :], scale), mask, *state, v_ref[keys, :])
    return lax.cond(_any(mask), step, lambda state: state, state)

  init = (jnp.full((block_q, 1), MASKED, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = lax.fori_loop(0, ((i + 1) * block_q - 1) // block_k + 1, k_block, init)
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _gpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, qb_ref, ks_ref, kb_ref,
                   dq_ref, *, scale, block_q, block_k):
  pl = _pallas()
  i = pl.program_id(2)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_seg, q_br = qs_ref[...], qb_ref[...]

  def k_block(j, dq):
    keys = pl.ds(j * block_k, block_k)
    mask = _tile_ids(i, j, block_q, block_k, q_seg, q_br, ks_ref[:, keys], kb_ref[:, keys])

    def step(dq):
      k = k_ref[keys, :]
      _, ds = _grad_tile(_scores(q, k, scale), mask, lse, delta, do, v_ref[keys, :])
      return dq + _mm((ds * scale).astype(k.dtype), k)
    return lax.cond(_any(mask), step, lambda dq: dq, dq)

  dq = lax.fori_loop(0, ((i + 1) * block_q - 1) // block_k + 1, k_block,
                     jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _gpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, qb_ref, ks_ref,
                    kb_ref, dk_ref, dv_ref, *, scale, block_q, block_k):
  pl = _pallas()
  j = pl.program_id(2)
  k, v, k_seg, k_br = k_ref[...], v_ref[...], ks_ref[...], kb_ref[...]

  def q_block(i, state):
    queries = pl.ds(i * block_q, block_q)
    mask = _tile_ids(i, j, block_q, block_k, qs_ref[queries, :], qb_ref[queries, :], k_seg, k_br)

    def step(state):
      dk, dv = state
      q, do = q_ref[queries, :], do_ref[queries, :]
      p, ds = _grad_tile(_scores(q, k, scale), mask, lse_ref[queries, :], delta_ref[queries, :],
                         do, v)
      return (dk + _mm_tn((ds * scale).astype(q.dtype), q),
              dv + _mm_tn(p.astype(do.dtype), do))
    return lax.cond(_any(mask), step, lambda state: state, state)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop((j * block_k) // block_q, pl.num_programs(2) * block_k // block_q,
                         q_block, (zeros, zeros))
  dk_ref[...], dv_ref[...] = dk, dv


def _gpu_call(kernel, inputs, specs, outputs, grid, interpret):
  pl = _pallas()
  block_specs = [pl.BlockSpec(shape, index) for shape, index in specs]
  return pl.pallas_call(kernel, out_shape=outputs, grid=grid,
                        in_specs=block_specs[:len(inputs)], out_specs=block_specs[len(inputs):],
                        interpret=interpret)(*inputs)


def _gpu_specs(groups, block_q, block_k, t, h, *, keys_outer: bool):
  """Block specs for the GPU grids (b, n, block): the grid's side in blocks, the other side
  whole (the kernel slices it)."""
  sq = _pallas().squeezed
  q_len, k_len = (t, block_k) if keys_outer else (block_q, t)

  def q_map(b, n, x):
    return b, n, (0 if keys_outer else x), 0

  def k_map(b, n, x):
    return b, n // groups, (x if keys_outer else 0), 0

  return {"by_query": ((sq, sq, q_len, h), q_map), "kv_head": ((sq, sq, k_len, h), k_map),
          "by_query_1": ((sq, sq, q_len, 1), q_map),
          "query_ids": ((sq, q_len, 1), lambda b, n, x: (b, 0 if keys_outer else x, 0)),
          "key_ids": ((sq, 1, k_len), lambda b, n, x: (b, 0, x if keys_outer else 0)),
          "by_key": ((sq, sq, k_len, h), lambda b, n, x: (b, n, x if keys_outer else 0, 0))}


def _kernel_ids(seg_bt, br_bt):
  """The ids as the kernels read them: queries [b, t, 1], keys [b, 1, t]."""
  return seg_bt[:, :, None], br_bt[:, :, None], seg_bt[:, None, :], br_bt[:, None, :]


# The operands' block specs by name (`_tpu_specs`, `_gpu_specs`): the forward pass reads q, k, v
# and the ids; the backward passes q, k, v, dout, lse, delta and the ids.
_FWD_OPERANDS = ("by_query", "kv_head", "kv_head", "query_ids", "query_ids", "key_ids", "key_ids")
_BWD_OPERANDS = ("by_query", "kv_head", "kv_head", "by_query", "by_query_1", "by_query_1",
                 "query_ids", "query_ids", "key_ids", "key_ids")


def _run_kernel(backend, kernel, inputs, operands, outputs, results, *, live, blocks, scratch,
                keys_outer, interpret):
  """One pallas_call over (b, n, outer blocks[, inner blocks]): `operands` and `results` name
  the block specs of `inputs` and `outputs` (ShapeDtypeStructs); `live` the [b, nq, nk] tiles,
  whose spans gate and clamp the TPU grid's inner axis; `scratch` the float32 VMEM accumulators
  (TPU; a Triton kernel keeps them in its loop's carry)."""
  b, n, t, h = inputs[0].shape
  groups = n // inputs[1].shape[1]
  block_q, block_k = blocks
  outer, inner = (t // block_k, t // block_q) if keys_outer else (t // block_q, t // block_k)
  if backend == "tpu":
    s = _tpu_specs(groups, block_q, block_k, h, keys_outer=keys_outer)
    spans = _spans(jnp.swapaxes(live, 1, 2) if keys_outer else live)
    return _tpu_call(kernel, spans, inputs, [s[x] for x in operands + results], outputs,
                     scratch, (b, n, outer, inner), interpret)
  s = _gpu_specs(groups, block_q, block_k, t, h, keys_outer=keys_outer)
  return _gpu_call(kernel, inputs, [s[x] for x in operands + results], outputs, (b, n, outer),
                   interpret)


def _pallas_fwd_core(q_bnth, k_bkth, v_bkth, seg_bt, br_bt, backend, block_q, block_k, interpret):
  b, n, t, h = q_bnth.shape
  kernel = _tpu_fwd_kernel if backend == "tpu" else _gpu_fwd_kernel
  outputs = [jax.ShapeDtypeStruct(q_bnth.shape, q_bnth.dtype),
             jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)]
  return _run_kernel(
      backend, functools.partial(kernel, scale=h ** -0.5, block_q=block_q, block_k=block_k),
      [q_bnth, k_bkth, v_bkth, *_kernel_ids(seg_bt, br_bt)], _FWD_OPERANDS, outputs,
      ("by_query", "by_query_1"), live=live_tiles(seg_bt, br_bt, block_q, block_k),
      blocks=(block_q, block_k), scratch=[(block_q, 1), (block_q, 1), (block_q, h)],
      keys_outer=False, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _pallas_flash(q_bnth, k_bkth, v_bkth, seg_bt, br_bt, backend, block_q, block_k, interpret):
  return _pallas_fwd_core(q_bnth, k_bkth, v_bkth, seg_bt, br_bt, backend, block_q, block_k,
                          interpret)[0]


def _pallas_flash_fwd(q_bnth, k_bkth, v_bkth, seg_bt, br_bt, backend, block_q, block_k,
                      interpret):
  out, lse = _pallas_fwd_core(q_bnth, k_bkth, v_bkth, seg_bt, br_bt, backend, block_q, block_k,
                              interpret)
  return out, (q_bnth, k_bkth, v_bkth, seg_bt, br_bt, out, lse)


def _pallas_flash_bwd(backend, block_q, block_k, interpret, residuals, dout_bnth):
  """Two kernels: dq (query blocks outer, keys inner) and dk, dv per query head (key blocks
  outer, queries inner), summed over each kv head's g query heads here."""
  q, k, v, seg_bt, br_bt, out, lse = residuals
  b, n, t, h = q.shape
  kv = k.shape[1]
  delta = jnp.sum(dout_bnth.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  inputs = [q, k, v, dout_bnth, lse, delta, *_kernel_ids(seg_bt, br_bt)]
  common = dict(live=live_tiles(seg_bt, br_bt, block_q, block_k), blocks=(block_q, block_k),
                interpret=interpret)
  static = dict(scale=h ** -0.5, block_q=block_q, block_k=block_k)
  dq_kernel, dkv_kernel = ((_tpu_dq_kernel, _tpu_dkv_kernel) if backend == "tpu" else
                           (_gpu_dq_kernel, _gpu_dkv_kernel))
  (dq,) = _run_kernel(backend, functools.partial(dq_kernel, **static), inputs, _BWD_OPERANDS,
                      [jax.ShapeDtypeStruct(q.shape, q.dtype)], ("by_query",),
                      scratch=[(block_q, h)], keys_outer=False, **common)
  dk, dv = _run_kernel(backend, functools.partial(dkv_kernel, **static), inputs, _BWD_OPERANDS,
                       [jax.ShapeDtypeStruct((b, n, t, h), jnp.float32)] * 2,
                       ("by_key", "by_key"), scratch=[(block_k, h)] * 2, keys_outer=True,
                       **common)

  def per_kv_head(x_bnth, like):
    return x_bnth.reshape(b, kv, n // kv, t, h).sum(axis=2).astype(like.dtype)
  return dq, per_kv_head(dk, k), per_kv_head(dv, v), None, None


_pallas_flash.defvjp(_pallas_flash_fwd, _pallas_flash_bwd)


def pallas_backend(platform: str | None = None) -> str:
  """"tpu" (Mosaic) or "gpu" (Triton) for a JAX platform name (default: the default backend)."""
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  raise ValueError(f"config.model.attention='pallas' needs a TPU or a GPU; JAX runs on "
                   f"{platform!r}: use 'xla_blocks' or 'flash_jax' there (or 'auto')")


def pallas_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     segment_ids_bt: jax.Array, branch_ids_bt: jax.Array, *,
                     backend: str | None = None, block_q: int | None = None,
                     block_k: int | None = None, interpret: bool = False) -> jax.Array:
  """Flash attention as Pallas kernels (forward, dq, dk/dv), per query head ([b, n, t, h]);
  `backend` "tpu" or "gpu" (default: the platform's). `interpret=True` runs the kernels on any
  platform through Pallas' interpreter (TPU semantics for "tpu"): how the tests check them."""
  backend = backend or pallas_backend()
  if backend not in ("tpu", "gpu"):
    raise ValueError(f"pallas_attention: backend={backend!r}, must be 'tpu' or 'gpu'")
  b, t, n, h = q_btnh.shape
  default_q, default_k = TPU_BLOCKS if backend == "tpu" else GPU_BLOCKS
  block_q, block_k = block_q or default_q, block_k or default_k
  if backend == "tpu":  # keys are the lanes: whole multiples of 128; queries of 8
    block_q = min(block_q, -(-t // 8) * 8)
    block_k = min(block_k, -(-t // 128) * 128)
  t_pad = padded_length(t, block_q, block_k)
  pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q_btnh, k_btkh, v_btkh))
  seg = _pad_ids(segment_ids_bt, t_pad, PAD_SEGMENT)
  br = _pad_ids(branch_ids_bt, t_pad, 0)
  out = _pallas_flash(q, k, v, seg, br, backend, block_q, block_k, bool(interpret))
  return out.transpose(0, 2, 1, 3)[:, :t]


# ---------------------------------------------------------------------------------- selection


def resolve(name: str, platform: str | None = None) -> str:
  """The implementation `name` (`config.model.attention`) means on `platform` (a JAX platform
  name; default: the default backend). `auto`: xla_blocks on CPU, flash_jax elsewhere."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention={name!r}: must be one of {IMPLEMENTATIONS}")
  if name != "auto":
    return name
  return "xla_blocks" if (platform or jax.default_backend()) == "cpu" else "flash_jax"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowMask:
  """What every layer's training attention reads about a row, made once per forward pass
  (`row_mask`): the ids, the resolved implementation (static), and for xla_blocks the
  [b, 1, t, t] bias (None otherwise, so that no t x t array exists)."""
  segment_ids: jax.Array  # [b, t]
  branch_ids: jax.Array  # [b, t]
  bias: jax.Array | None  # [b, 1, t, t] float32, xla_blocks only
  implementation: str = dataclasses.field(metadata=dict(static=True))


def row_mask(segment_ids_bt: jax.Array, branch_ids_bt: jax.Array, implementation: str) -> RowMask:
  """The RowMask for `implementation` (a config value; `auto` is resolved here)."""
  implementation = resolve(implementation)
  bias = (attention_bias(segment_ids_bt, branch_ids_bt) if implementation == "xla_blocks"
          else None)
  return RowMask(segment_ids_bt, branch_ids_bt, bias, implementation)


def attend(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, mask: RowMask) -> jax.Array:
  """Training self-attention of whole rows with `mask.implementation` -> [b, t, n, h]."""
  if mask.implementation == "xla_blocks":
    return causal_block_attention(q_btnh, k_btkh, v_btkh, mask.bias)
  if mask.implementation == "flash_jax":
    return flash_attention(q_btnh, k_btkh, v_btkh, mask.segment_ids, mask.branch_ids)
  if mask.implementation == "pallas":
    return pallas_attention(q_btnh, k_btkh, v_btkh, mask.segment_ids, mask.branch_ids)
  raise ValueError(f"attend: implementation={mask.implementation!r}, must be one of "
                   f"{IMPLEMENTATIONS[1:]} (make the RowMask with row_mask)")
