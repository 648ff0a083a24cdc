"""The training attention's implementations against the plain masked reference, on packed rows
with label branches; flash_jax's memory (no t x t array anywhere); the model's choice of
implementation and remat. Pallas kernels run in interpret mode here (TPU semantics for Mosaic);
the `gpu`/`tpu` tests run them compiled where JAX sees that hardware.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dagger_jax import configlib
from dagger_jax.errors import ConfigError
from dagger_jax.model import attention as A
from dagger_jax.model.qwen3 import Qwen3, Qwen3Config, model_options
from dagger_jax.train import plan as plan_lib
from dagger_jax.train import trainer as trainer_lib

B, T, N, KV, H = 2, 300, 4, 2, 16  # T is no multiple of any block below


def packed_branched_rows(t: int = T) -> tuple[jax.Array, jax.Array]:
  """Row 0: two packed sequences, a label branch in the second, then padding (segment 0).
  Row 1: one sequence with three label branches, the main line going on after each."""
  seg = np.ones((B, t), np.int32)
  br = np.zeros((B, t), np.int32)
  seg[0, 130:] = 2
  seg[0, 270:] = 0
  br[0, 200:230] = 1
  br[1, 64:128], br[1, 192:256], br[1, 260:280] = 1, 2, 3
  return jnp.asarray(seg), jnp.asarray(br)


def qkv(dtype=jnp.float32, t: int = T, seed: int = 0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(B, t, m, H)), dtype) for m in (N, KV, KV))


IMPLEMENTATIONS = {
    "xla_blocks": lambda q, k, v, seg, br: A.causal_block_attention(
        q, k, v, A.attention_bias(seg, br), block=128),
    "flash_jax": lambda q, k, v, seg, br: A.flash_attention(q, k, v, seg, br, block_q=64,
                                                            block_k=32),
    "pallas_tpu": lambda q, k, v, seg, br: A.pallas_attention(
        q, k, v, seg, br, backend="tpu", block_q=64, block_k=128, interpret=True),
    "pallas_gpu": lambda q, k, v, seg, br: A.pallas_attention(
        q, k, v, seg, br, backend="gpu", block_q=32, block_k=64, interpret=True),
}


def value_and_grads(f, q, k, v, seg, br, probe):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v, seg, br) * probe),
                                    argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_implementation_matches_the_masked_reference(name):
  """Output and gradients (q, k, v) at float32 parity, 1e-5."""
  f = IMPLEMENTATIONS[name]
  q, k, v = qkv()
  seg, br = packed_branched_rows()
  probe = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32)
  np.testing.assert_allclose(jax.jit(f)(q, k, v, seg, br),
                             A.masked_attention(q, k, v, seg, br), rtol=1e-5, atol=1e-5)
  got = value_and_grads(f, q, k, v, seg, br, probe)
  want = value_and_grads(A.masked_attention, q, k, v, seg, br, probe)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w, which in zip(got[1], want[1], "qkv"):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"d{which}")


@pytest.mark.parametrize("name", ["flash_jax", "pallas_gpu"])
def test_bfloat16_compute_stays_close_to_float32(name):
  """bf16 q, k, v (scores, softmax and accumulators stay float32): within 2e-2 of the float32
  reference of the same (rounded) inputs; the bf16 output's own rounding is up to 2^-8 of
  values of a few units."""
  q, k, v = qkv(jnp.bfloat16)
  seg, br = packed_branched_rows()
  out = jax.jit(IMPLEMENTATIONS[name])(q, k, v, seg, br)
  assert out.dtype == jnp.bfloat16
  want = A.masked_attention(*(x.astype(jnp.float32) for x in (q, k, v)), seg, br)
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


def test_live_tiles_keep_every_visible_pair_and_skip_whole_tiles():
  seg, br = packed_branched_rows(320)  # 320 = 5 x 64 = 10 x 32
  bq, bk = 64, 32

  def exact(seg, br):
    mask = np.asarray(A.attention_mask(seg, br)[:, 0])
    return mask.reshape(mask.shape[0], 320 // bq, bq, 320 // bk, bk).any(axis=(2, 4))

  live = np.asarray(A.live_tiles(seg, br, bq, bk))
  assert (live | ~exact(seg, br)).all(), "a tile with a visible pair was skipped"
  causal = np.arange(10)[None, :] * bk <= (np.arange(5)[:, None] + 1) * bq - 1
  assert live.sum() < 2 * causal.sum()  # more than the causal upper half is skipped
  assert not live[0, 4, :4].any()  # the second sequence and the padding skip the first's keys
  assert not live[1, 3, 2:4].any()  # branch 2's queries [192, 256) skip branch 1's keys
  # packing alone (no branches, padding last) is skipped exactly
  no_branches = jnp.zeros_like(br)
  np.testing.assert_array_equal(np.asarray(A.live_tiles(seg, no_branches, bq, bk)),
                                exact(seg, no_branches))
  # segments that are not contiguous runs are still never skipped where visible
  scattered = jnp.asarray(np.tile(np.repeat([3, 1, 3, 2, 1], 64), (B, 1)), jnp.int32)
  assert (np.asarray(A.live_tiles(scattered, br, bq, bk)) | ~exact(scattered, br)).all()


def _largest_buffer(lowered: jax.stages.Lowered) -> int:
  """Elements of the largest tensor anywhere in a lowered program (StableHLO text)."""
  dims = re.findall(r"tensor<((?:\d+x)+)[a-z]", lowered.as_text())
  return max(math.prod(int(d) for d in x.rstrip("x").split("x")) for x in dims)


def test_flash_jax_never_materialises_a_t_by_t_array():
  """Forward and backward of a 1024-token row: no tensor in the program has t^2 / 4 elements
  (the largest are q, k, v and one [b, k, 128 x g, 128] score tile); the same program with
  xla_blocks has the [t, t] bias."""
  t = 1024
  q, k, v = qkv(t=t)
  seg, br = packed_branched_rows(t)
  probe = jnp.ones((B, t, N, H), jnp.float32)

  def lower(f):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v, seg, br) * probe),
                                      argnums=(0, 1, 2))).lower(q, k, v)

  flash = _largest_buffer(lower(lambda *a: A.flash_attention(*a, block_q=128, block_k=128)))
  assert flash < t * t // 4, flash
  assert _largest_buffer(lower(IMPLEMENTATIONS["xla_blocks"])) >= t * t


# --------------------------------------------------------------------------- the model's choice


TINY = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=4096,
                   param_dtype="float32", dtype="float32")


def model_inputs(t: int = T):
  seg, br = packed_branched_rows(t)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, TINY.vocab_size, (B, t)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
  return tokens, positions, seg, br


def model_loss(attention: str, remat: str, t: int = T, config: Qwen3Config = TINY):
  """(jitted value-and-grad of a loss over the final hidden states, params, inputs)."""
  graphdef, params = nnx.split(Qwen3(config, rngs=nnx.Rngs(0), attention=attention, remat=remat))
  inputs = model_inputs(t)

  def loss(params, *inputs):
    hidden = nnx.merge(graphdef, params)(*inputs, return_hidden=True)
    return jnp.mean(hidden * hidden)
  return jax.jit(jax.value_and_grad(loss)), params, inputs


def test_model_attention_choices_agree():
  runs = {}
  for name in ("xla_blocks", "flash_jax"):
    f, params, inputs = model_loss(name, "none")
    runs[name] = f(params, *inputs)
  (l0, g0), (l1, g1) = runs["xla_blocks"], runs["flash_jax"]
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["xla_blocks", "flash_jax"])
def test_remat_modes_give_the_same_loss_and_grads_in_less_memory(attention):
  """dots and full recompute in the backward pass what none keeps: the same numbers, and less
  temporary memory once compiled (XLA:CPU compiled as `dagger-jax plan` does, with remat's
  optimization barriers kept; see plan.py)."""
  config = dataclasses.replace(TINY, num_layers=4)
  results, temp = {}, {}
  for remat in ("none", "dots", "full"):
    f, params, inputs = model_loss(attention, remat, t=256, config=config)
    compiled = f.lower(params, *inputs).compile(compiler_options=plan_lib.FAST_CODEGEN)
    results[remat] = compiled(params, *inputs)
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  loss, grads = results["none"]
  for remat in ("dots", "full"):
    np.testing.assert_allclose(results[remat][0], loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[remat][1]), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert temp["full"] < temp["dots"] < temp["none"], temp


def test_flash_model_never_materialises_a_t_by_t_array():
  """The whole model's forward and backward with flash_jax: no [t, t] mask or bias either (the
  largest tensors are a 512 x 512 score tile and the MLP's [b x t, 2f])."""
  t = 4096
  for attention, small in (("flash_jax", True), ("xla_blocks", False)):
    f, params, inputs = model_loss(attention, "none", t=t)
    largest = _largest_buffer(f.lower(params, *inputs))
    assert (largest < t * t // 4) == small, (attention, largest)


def test_auto_and_the_config_keys():
  assert A.resolve("auto", "cpu") == "xla_blocks"
  assert A.resolve("auto", "tpu") == A.resolve("auto", "gpu") == "flash_jax"
  assert A.resolve("pallas", "cpu") == "pallas"
  with pytest.raises(ValueError, match=r"config.model.attention='flash'.*xla_blocks"):
    A.resolve("flash", "cpu")
  with pytest.raises(ValueError, match=r"config.model.attention='pallas' needs a TPU or a GPU"):
    A.pallas_backend("cpu")
  with pytest.raises(ValueError, match=r"config.train.remat='some'.*'dots'"):
    Qwen3(TINY, rngs=nnx.Rngs(0), remat="some")
  config = configlib.load(f"{configlib.REPO_ROOT}/configs/base.py")
  assert (config.model.attention, config.train.remat) == ("auto", "none")
  for key, bad, allowed in (("model.attention", "flash", "'flash_jax'"),
                            ("train.remat", "some", "'full'")):
    section, field = key.split(".")
    config[section][field] = bad
    with pytest.raises(ConfigError, match=rf"config.{key}='{bad}': must be one of .*{allowed}"):
      configlib.validate(config)
    config[section][field] = {"model": "auto", "train": "none"}[section]


def test_trainer_builds_the_model_the_config_names():
  config = configlib.load(f"{configlib.REPO_ROOT}/configs/base.py")
  config.model.attention, config.train.remat = "flash_jax", "dots"
  assert model_options(config) == {"attention": "flash_jax", "remat": "dots"}
  trainer = trainer_lib.Trainer(config, trainer_lib.mesh_from_config(config.mesh))
  model = trainer.model(trainer.abstract_state.params)
  assert (model.attention, model.remat) == ("flash_jax", "dots")


# ------------------------------------------------------------------------- on the real hardware


def hardware_check(backend: str):
  """The compiled kernels on 1000-token rows in bfloat16 (the dtype at scale) against the float32
  reference of the same inputs: 2e-2, bf16's tolerance (as in the interpret-mode bf16 test)."""
  q, k, v = qkv(jnp.bfloat16, t=1000)
  seg, br = packed_branched_rows(1000)
  probe = jnp.asarray(np.random.default_rng(1).normal(size=(B, 1000, N, H)), jnp.float32)
  got = value_and_grads(lambda *a: A.pallas_attention(*a, backend=backend).astype(jnp.float32),
                        q, k, v, seg, br, probe)
  want = value_and_grads(A.masked_attention, *(x.astype(jnp.float32) for x in (q, k, v)), seg,
                         br, probe)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g.astype(jnp.float32), w, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_pallas_triton_on_gpu_matches_the_reference():
  with jax.default_device(jax.devices("gpu")[0]):
    hardware_check("gpu")


@pytest.mark.tpu
def test_pallas_mosaic_on_tpu_matches_the_reference():
  with jax.default_device(jax.devices("tpu")[0]):
    hardware_check("tpu")
