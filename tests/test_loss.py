"""The masked loss: value against a float64 reference, chunked == plain (value and gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dagger_jax.train import loss as L

B, T, D, V = 2, 37, 16, 53  # T is not a multiple of the chunk sizes used: padding is exercised


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, T, D)).astype(np.float32)
  w = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
  targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
  mask = (rng.random((B, T)) < 0.6).astype(np.uint8)
  labels = np.where(mask > 0, 1 + np.arange(T) // 5, 0).astype(np.int32)  # labels of 1-5 slots
  return hidden, w, targets, mask, labels


def _reference(hidden, w, targets, weights, z_loss):
  logits = hidden.astype(np.float64) @ w.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return float(np.sum((lse - target_logit + z_loss * lse ** 2) * weights))


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_plain_matches_float64_reference(z_loss):
  hidden, w, targets, mask, _ = _batch()
  got = L.plain_loss_sum(hidden, w, targets, mask.astype(np.float32), z_loss)
  want = _reference(hidden, w, targets, mask, z_loss)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_docstring_example_only_masked_positions_count():
  # Changing the target of an untrained position changes nothing; of a trained one, the loss.
  hidden, w, targets, mask, labels = _batch()
  s0, c0 = L.loss_sum_and_count(hidden, w, targets, mask, labels)
  assert float(c0) == mask.sum()
  untrained = np.argwhere(mask == 0)[0]
  trained = np.argwhere(mask == 1)[0]
  t1 = targets.copy()
  t1[tuple(untrained)] = (t1[tuple(untrained)] + 1) % V
  t2 = targets.copy()
  t2[tuple(trained)] = (t2[tuple(trained)] + 1) % V
  assert float(L.loss_sum_and_count(hidden, w, t1, mask, labels)[0]) == float(s0)
  assert float(L.loss_sum_and_count(hidden, w, t2, mask, labels)[0]) != float(s0)


def test_turn_weights_one_per_label():
  mask = jnp.array([[0, 1, 1, 0, 1, 1, 1, 1, 0, 1],
                    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
  labels = jnp.array([[0, 1, 1, 0, 2, 2, 2, 2, 0, 3],
                      [4, 4, 4, 7, 7, 7, 0, 0, 0, 0]])  # adjacent labels stay apart
  w = np.asarray(L.token_weights(mask, labels, "turn"))
  np.testing.assert_allclose(w[0], [0, .5, .5, 0, .25, .25, .25, .25, 0, 1])
  np.testing.assert_allclose(w[1], [1 / 3] * 6 + [0] * 4, rtol=1e-6)
  assert float(w.sum()) == pytest.approx(5.0)  # 3 + 2 labels
  np.testing.assert_array_equal(L.token_weights(mask, labels, "token"), mask)
  with pytest.raises(ValueError, match="normalize"):
    L.token_weights(mask, labels, "row")


@pytest.mark.parametrize("normalize", ["token", "turn"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_equals_plain_value_and_gradient(normalize, z_loss, chunk):
  hidden, w, targets, mask, labels = _batch(1)

  def mean_loss(h, w_, chunk_size):
    s, c = L.loss_sum_and_count(h, w_, targets, mask, labels, normalize=normalize,
                                z_loss=z_loss, chunk_size=chunk_size)
    return s / c

  plain, (gh_p, gw_p) = jax.value_and_grad(mean_loss, argnums=(0, 1))(hidden, w, 0)
  chunked, (gh_c, gw_c) = jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1)),
                                  static_argnums=2)(hidden, w, chunk)
  np.testing.assert_allclose(chunked, plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gh_c, gh_p, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw_c, gw_p, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(gw_p).max()) > 1e-3  # the gradient is not trivially zero


def test_chunked_gradient_under_a_scaled_cotangent():
  # The custom VJP must scale by the incoming cotangent (here 3.0 and a division by count).
  hidden, w, targets, mask, labels = _batch(2)
  wts = mask.astype(np.float32)
  f_p = lambda h: 3.0 * L.plain_loss_sum(h, w, targets, wts) / 7.0
  f_c = lambda h: 3.0 * L.chunked_loss_sum(h, w, targets, wts, chunk=10) / 7.0
  np.testing.assert_allclose(jax.grad(f_c)(hidden), jax.grad(f_p)(hidden), rtol=1e-5, atol=1e-6)


def test_bfloat16_hidden_states():
  hidden, w, targets, mask, labels = _batch(3)
  h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  plain = L.loss_sum_and_count(h16, w16, targets, mask, labels)[0]
  chunked = L.loss_sum_and_count(h16, w16, targets, mask, labels, chunk_size=16)[0]
  assert chunked.dtype == jnp.float32
  # bf16 inputs, float32 accumulation in both forms: equal to float32 rounding.
  np.testing.assert_allclose(chunked, plain, rtol=1e-5)
  gh = jax.grad(lambda h: L.chunked_loss_sum(h, w16, targets, mask.astype(np.float32), chunk=16))(
      h16)
  assert gh.dtype == jnp.bfloat16
