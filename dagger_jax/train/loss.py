"""Masked cross-entropy toward stored teacher targets, returned as `(sum, count)`.

A token row (DESIGN.md, "Token row") stores `targets[i]`, the token the prediction made at `i` is
trained toward, and `loss_mask[i]`, whether it is. Targets are stored rather than derived by
shifting because label branches break the shift. Example (one row, a branch label `L1 L2` inserted
before the student's own turn `S1 S2`, both restarting after the header `H`):

    tokens     = [u, H, L1, L2, S1, S2]
    targets    = [H, L1, L2, E, S2, x]     # H predicts the label's first token
    loss_mask  = [0, 1,  1,  1,  0,  0]    # the student's tokens are kept, untrained
    -> loss_sum = nll(H->L1) + nll(L1->L2) + nll(L2->E),  count = 3 (per token)

The loss returns `(sum, count)`: the trainer adds both over the whole global batch (all
micro-batches and devices) and divides once, so packing and gradient accumulation weigh every
trained token (or turn) alike.

Normalisation (`config.train.normalize`):
  token  each trained token weighs 1; count = number of trained tokens.
  turn   each teacher label weighs 1, spread evenly over its trained slots (`label_ids`, which
         the shards number uniquely within a row); count = number of labels.

Two forms with equal value and gradient: `plain` materialises [B, T, V] float32 logits; the
chunked form (`chunk_size` > 0) walks the length axis in chunks of `chunk_size` positions and
computes the loss and its gradient chunk by chunk (custom VJP), so at most [B, chunk, V] logits
exist at any time and the unembedding matmul runs once forward and twice backward, as the plain
form does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dagger_jax.errors import ConfigError


def token_weights(loss_mask_bt: jax.Array, label_ids_bt: jax.Array,
                  normalize: str = "token") -> jax.Array:
  """Float32 [B, T] weights of each position's loss; their sum is the loss's `count`.

  `label_ids` (from the shards) number the teacher label each trained slot learns, unique within
  a row. Per turn, each label's slots share a weight of 1:

  >>> token_weights(jnp.array([[0, 1, 1, 0, 1, 1, 1, 1]]),
  ...               jnp.array([[0, 1, 1, 0, 2, 2, 2, 2]]), "turn")
  [[0, .5, .5, 0, .25, .25, .25, .25]]     # two labels -> count 2
  """
  mask_bt = loss_mask_bt.astype(jnp.float32)
  if normalize == "token":
    return mask_bt
  if normalize != "turn":
    raise ConfigError(f"config.train.normalize={normalize!r}: must be 'token' or 'turn'")
  trained_bt = loss_mask_bt > 0
  labels_bt = jnp.where(trained_bt, label_ids_bt, -1)

  def label_sizes(labels_t):  # for each slot, how many trained slots share its label
    sorted_t = jnp.sort(labels_t)
    return (jnp.searchsorted(sorted_t, labels_t, side="right")
            - jnp.searchsorted(sorted_t, labels_t, side="left"))

  sizes_bt = jax.vmap(label_sizes)(labels_bt).astype(jnp.float32)
  return jnp.where(trained_bt, mask_bt / jnp.maximum(sizes_bt, 1.0), 0.0)


def _nll(logits_btv: jax.Array, targets_bt: jax.Array, z_loss: float):
  """Per-position -log p(target) + z_loss * logsumexp^2, and the softmax (for the gradient)."""
  lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return lse_bt - target_logit_bt + z_loss * lse_bt * lse_bt, lse_bt


def plain_loss_sum(hidden_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array,
                   weights_bt: jax.Array, z_loss: float = 0.0) -> jax.Array:
  """sum_i weights[i] * (nll_i + z_loss * lse_i^2), through full [B, T, V] float32 logits."""
  logits_btv = jnp.einsum("btd,dv->btv", hidden_btd, w_dv, preferred_element_type=jnp.float32)
  nll_bt, _ = _nll(logits_btv, targets_bt, z_loss)
  return jnp.sum(nll_bt * weights_bt)


def _chunks(x_bt_, chunk: int):
  """[B, T, ...] -> [T/chunk, B, chunk, ...] (T already padded to a multiple of chunk)."""
  b, t = x_bt_.shape[:2]
  x = x_bt_.reshape(b, t // chunk, chunk, *x_bt_.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunk(x_cb_):
  c, b, chunk = x_cb_.shape[:3]
  return jnp.moveaxis(x_cb_, 0, 1).reshape(b, c * chunk, *x_cb_.shape[3:])


def _chunked_value_and_grads(hidden_btd, w_dv, targets_bt, weights_bt, z_loss, chunk):
  """Loss sum, d/dhidden and d/dw, one [B, chunk, V] logits block at a time."""
  h_cbkd = _chunks(hidden_btd, chunk)
  y_cbk = _chunks(targets_bt, chunk)
  w_cbk = _chunks(weights_bt, chunk)
  v = w_dv.shape[1]

  def body(carry, xs):
    loss_sum, dw_dv = carry
    h_bkd, y_bk, wt_bk = xs
    logits_bkv = jnp.einsum("bkd,dv->bkv", h_bkd, w_dv, preferred_element_type=jnp.float32)
    nll_bk, lse_bk = _nll(logits_bkv, y_bk, z_loss)
    # d(nll + z*lse^2)/dlogits = softmax * (1 + 2 z lse) - onehot(target)
    probs_bkv = jnp.exp(logits_bkv - lse_bk[..., None])
    dlogits_bkv = probs_bkv * (1.0 + 2.0 * z_loss * lse_bk)[..., None]
    dlogits_bkv = dlogits_bkv - jax.nn.one_hot(y_bk, v, dtype=jnp.float32)
    dlogits_bkv = (dlogits_bkv * wt_bk[..., None]).astype(w_dv.dtype)
    dh_bkd = jnp.einsum("bkv,dv->bkd", dlogits_bkv, w_dv, preferred_element_type=jnp.float32)
    dw_dv = dw_dv + jnp.einsum("bkd,bkv->dv", h_bkd, dlogits_bkv,
                               preferred_element_type=jnp.float32)
    return (loss_sum + jnp.sum(nll_bk * wt_bk), dw_dv), dh_bkd.astype(hidden_btd.dtype)

  init = (jnp.zeros((), jnp.float32), jnp.zeros(w_dv.shape, jnp.float32))
  (loss_sum, dw_dv), dh_cbkd = jax.lax.scan(body, init, (h_cbkd, y_cbk, w_cbk))
  return loss_sum, _unchunk(dh_cbkd), dw_dv.astype(w_dv.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_loss_sum(hidden_btd, w_dv, targets_bt, weights_bt, z_loss, chunk):
  return _chunked_value_and_grads(hidden_btd, w_dv, targets_bt, weights_bt, z_loss, chunk)[0]


def _chunked_fwd(hidden_btd, w_dv, targets_bt, weights_bt, z_loss, chunk):
  loss_sum, dh_btd, dw_dv = _chunked_value_and_grads(hidden_btd, w_dv, targets_bt, weights_bt,
                                                     z_loss, chunk)
  return loss_sum, (dh_btd, dw_dv, targets_bt, weights_bt)


def _chunked_bwd(z_loss, chunk, residuals, g):
  del z_loss, chunk
  dh_btd, dw_dv, targets_bt, weights_bt = residuals
  # Targets are integers (float0 cotangent); weights come from the mask and are not trained.
  d_targets = jnp.zeros(targets_bt.shape, jax.dtypes.float0)
  return (g.astype(dh_btd.dtype) * dh_btd, g.astype(dw_dv.dtype) * dw_dv, d_targets,
          jnp.zeros_like(weights_bt))


_chunked_loss_sum.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_loss_sum(hidden_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array,
                     weights_bt: jax.Array, z_loss: float = 0.0, chunk: int = 1024) -> jax.Array:
  """As `plain_loss_sum`, never materialising more than [B, chunk, V] logits."""
  t = hidden_btd.shape[1]
  chunk = min(chunk, t)
  pad = -t % chunk
  if pad:  # padded positions have weight 0: no loss, no gradient
    hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
    targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))
  return _chunked_loss_sum(hidden_btd, w_dv, targets_bt.astype(jnp.int32),
                           weights_bt.astype(jnp.float32), float(z_loss), int(chunk))


def loss_sum_and_count(hidden_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array,
                       loss_mask_bt: jax.Array, label_ids_bt: jax.Array, *,
                       normalize: str = "token", z_loss: float = 0.0,
                       chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted per-position losses, sum of weights) for one (micro-)batch.

  `hidden_btd` are final-normed hidden states, `w_dv` the unembedding in the compute dtype;
  `chunk_size` > 0 selects the chunked form. Divide the global sums once: loss = sum / count.
  """
  weights_bt = token_weights(loss_mask_bt, label_ids_bt, normalize)
  if chunk_size > 0:
    total = chunked_loss_sum(hidden_btd, w_dv, targets_bt, weights_bt, z_loss, chunk_size)
  else:
    total = plain_loss_sum(hidden_btd, w_dv, targets_bt, weights_bt, z_loss)
  return total, jnp.sum(weights_bt)
