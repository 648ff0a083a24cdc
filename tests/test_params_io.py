"""Params-only Orbax checkpoints: exact round trip, sharded restore, trainer-layout restore."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import support
from dagger_jax.model import params_io
from dagger_jax.model.qwen3 import Qwen3
from dagger_jax.model.sharding import make_mesh

CONFIG = support.model_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False)


def assert_same_params(a: Qwen3, b: Qwen3) -> None:
  pa, pb = params_io.pure_params(a), params_io.pure_params(b)
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_load_roundtrip_is_exact(tmp_path):
  model = Qwen3(CONFIG, rngs=nnx.Rngs(3))
  ckpt = params_io.save_params(model, str(tmp_path / "ckpt"))
  assert json.load(open(os.path.join(ckpt, params_io.MODEL_CONFIG_FILE))) == dataclasses.asdict(
      CONFIG)
  restored = params_io.load_params(ckpt)
  assert restored.config == CONFIG
  assert_same_params(model, restored)
  x = jnp.arange(10, dtype=jnp.int32).reshape(1, 10)
  np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))
  with pytest.raises(params_io.CheckpointError, match="already exists"):
    params_io.save_params(model, ckpt)


def test_load_sharded_over_a_mesh(tmp_path):
  model = Qwen3(CONFIG, rngs=nnx.Rngs(3))
  ckpt = params_io.save_params(model, str(tmp_path / "ckpt"))
  restored = params_io.load_params(ckpt, mesh=make_mesh(2, 2, 2))
  up = restored.layers[0].mlp.up_proj.get_value()  # ('embed', 'mlp') [64, 128]
  assert up.sharding.spec == P("fsdp", "tensor")
  assert {s.data.shape for s in up.addressable_shards} == {(32, 64)}
  assert restored.lm_head.get_value().sharding.spec == P("fsdp", "tensor")  # ('embed', 'vocab')
  assert_same_params(model, restored)


def test_restore_from_a_trainer_step_directory(tmp_path):
  """A CheckpointManager root whose steps hold a `params` item (the trainer's layout) works,
  with model_config.json beside the steps; the latest step is taken."""
  root = str(tmp_path / "run")
  models = {step: Qwen3(CONFIG, rngs=nnx.Rngs(step)) for step in (10, 20)}
  with ocp.CheckpointManager(root) as manager:
    for step, m in models.items():
      manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params_io.pure_params(m)),
          meta=ocp.args.JsonSave({"step": step})))
  params_io.write_model_config(CONFIG, root)
  assert params_io.resolve_params_dir(root) == os.path.join(root, "20")
  assert_same_params(params_io.load_params(root), models[20])
  assert_same_params(params_io.load_params(os.path.join(root, "10")), models[10])


def test_bad_checkpoints_name_the_problem(tmp_path):
  with pytest.raises(params_io.CheckpointError, match="no such checkpoint directory"):
    params_io.load_params(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(params_io.CheckpointError, match="holds no 'params' item"):
    params_io.load_params(str(tmp_path / "empty"))
  ckpt = params_io.save_params(Qwen3(CONFIG, rngs=nnx.Rngs(0)), str(tmp_path / "ckpt"))
  os.remove(os.path.join(ckpt, params_io.MODEL_CONFIG_FILE))
  with pytest.raises(params_io.CheckpointError, match="model_config.json: not found"):
    params_io.load_params(ckpt)
  wider = dataclasses.replace(CONFIG, hidden_size=128)
  with pytest.raises(params_io.CheckpointError,
                     match=r"param embedding is stored with shape \(512, 64\), the model needs "
                           r"\(512, 128\)"):
    params_io.load_params(ckpt, config=wider)
  tied = dataclasses.replace(CONFIG, tie_word_embeddings=True)
  with pytest.raises(params_io.CheckpointError, match="param lm_head is stored with shape "
                                                      r"\(64, 512\), the model needs absent"):
    params_io.load_params(ckpt, config=tied)
