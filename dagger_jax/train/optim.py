"""AdamW with warm-up + cosine, global-norm clipping and a weight-decay mask (`config.train`).

The learning rate is applied by the train step from the round-local step (`learning_rate(t)(step)`)
rather than by an optax schedule counter, so a new DAgger round that continues from the previous
round's optimizer state starts its own warm-up and cosine while keeping Adam's moments:

    tx = optimizer(config.train)
    updates, opt_state = tx.update(grads, opt_state, params)     # Adam direction + decay
    params = params - learning_rate(config.train)(step) * updates

This is exactly `optax.adamw` (scale_by_adam -> add_decayed_weights -> scale by -lr).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

ADAM_EPS = 1e-8


def learning_rate(t: Any) -> optax.Schedule:
  """Linear warm-up from 0 to `t.lr` over `t.warmup_steps`, then cosine to `t.lr * min_lr_ratio`
  at `t.steps`."""
  warmup = min(int(t.warmup_steps), int(t.steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(t.lr), warmup_steps=warmup,
      decay_steps=max(int(t.steps), warmup + 1), end_value=float(t.lr) * float(t.min_lr_ratio))


def decay_mask(params: Any, decay_norms_and_embeddings: bool = False) -> Any:
  """True for leaves that get weight decay: matrices, but not the token embedding (nor the
  1-d norm scales) unless `decay_norms_and_embeddings`."""

  def one(path, leaf):
    if decay_norms_and_embeddings:
      return True
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return leaf.ndim >= 2 and "embedding" not in names

  return jax.tree.map_with_path(one, params)


def optimizer(t: Any) -> optax.GradientTransformation:
  """Clip -> Adam direction -> decoupled weight decay; multiply by -learning_rate afterwards."""
  parts = []
  if t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
  parts.append(optax.scale_by_adam(b1=float(t.b1), b2=float(t.b2), eps=ADAM_EPS))
  if t.weight_decay > 0:
    parts.append(optax.add_decayed_weights(
        float(t.weight_decay),
        mask=lambda p: decay_mask(p, bool(t.decay_norms_and_embeddings))))
  return optax.chain(*parts)
