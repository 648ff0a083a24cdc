"""`model.loader.load_model`: the one reader of `model.init_from`, for trainer, loop and sampler."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from dagger_jax.dagger import loop
from dagger_jax.model import hf, loader, params_io
from dagger_jax.model.params_io import CheckpointError, pure_params
from dagger_jax.model.qwen3 import Qwen3, Qwen3Config
from dagger_jax.model.sharding import make_mesh
from dagger_jax.train.trainer import Trainer, mesh_from_config

import support

CONFIG = support.model_config(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               pure_params(a) if isinstance(a, Qwen3) else a,
               pure_params(b) if isinstance(b, Qwen3) else b)


@pytest.fixture(scope="module")
def base():
  return Qwen3(CONFIG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def sources(base, tmp_path_factory):
  d = tmp_path_factory.mktemp("sources")
  orbax = params_io.save_params(base, str(d / "orbax"))
  hf.save_pretrained(base, str(d / "hf"))
  return {"orbax": orbax, "hf": str(d / "hf")}


@pytest.mark.parametrize("kind", ["orbax", "hf"])
def test_checkpoints_load_as_saved_on_one_device_and_sharded(base, sources, kind):
  _assert_same(loader.load_model(sources[kind], CONFIG), base)
  _assert_same(loader.load_model(sources[kind], None), base)  # the checkpoint's own config
  sharded = loader.load_model(sources[kind], CONFIG, mesh=make_mesh(2, 2, 2))
  _assert_same(sharded, base)
  assert len(pure_params(sharded)["embedding"].sharding.device_set) == 8


def test_random_init_follows_the_seed_and_sharding_keeps_values():
  """(That it is the model the trainer starts from: tests/test_dagger.py,
  test_round0_student_is_the_model_training_starts_from.)"""
  model = loader.load_model("", CONFIG, seed=5)
  other = pure_params(loader.load_model("", CONFIG, seed=6))["embedding"]
  assert not np.array_equal(np.asarray(pure_params(model)["embedding"]), np.asarray(other))
  sharded = loader.load_model("", CONFIG, seed=5, mesh=make_mesh(2, 2, 2))
  _assert_same(sharded, model)
  assert len(pure_params(sharded)["embedding"].sharding.device_set) == 8
  with pytest.raises(CheckpointError, match="needs a model config"):
    loader.load_model("", None)


@pytest.mark.parametrize("kind", ["orbax", "hf"])
def test_config_dtype_is_kept_and_architecture_checked(sources, kind):
  bf16 = dataclasses.replace(CONFIG, param_dtype="bfloat16", dtype="bfloat16")
  model = loader.load_model(sources[kind], bf16)
  assert model.config == bf16 and pure_params(model)["embedding"].dtype == jax.numpy.bfloat16
  other = dataclasses.replace(CONFIG, rope_theta=10_000.0, max_position_embeddings=512)
  with pytest.raises(CheckpointError, match=r"rope_theta: checkpoint 1000000.0, config 10000.0; "
                                            r"max_position_embeddings: checkpoint 256, config "
                                            r"512\); set those config.model keys"):
    loader.load_model(sources[kind], other)


def test_missing_directory_names_the_expected_formats(tmp_path):
  with pytest.raises(CheckpointError, match="no such checkpoint directory.*config.json"):
    loader.load_model(str(tmp_path / "nope"), CONFIG)
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="holds no 'params' item"):
    loader.load_model(str(tmp_path / "empty"), CONFIG)


@pytest.mark.parametrize("kind", ["orbax", "hf"])
def test_loop_round0_student_and_trainer_start_from_an_hf_or_orbax_base(tmp_path, kind):
  """The loop's round-0 acting student (used whenever round 0 has beta < 1) and the trainer's
  round-0 params are the same base, whichever format `model.init_from` has."""
  config = support.tiny_student(support.config())
  config.workdir, config.train.batch_size = str(tmp_path / "run"), 8  # 8 simulated devices
  mc = Qwen3Config.from_config(config.model)
  base = Qwen3(mc, rngs=nnx.Rngs(11))
  if kind == "orbax":
    config.model.init_from = params_io.save_params(base, str(tmp_path / "base"))
  else:
    config.model.init_from = str(tmp_path / "base")
    hf.save_pretrained(base, config.model.init_from)
  _assert_same(loop.acting_model(config, config.workdir, 0), base)
  trainer = Trainer(config, mesh_from_config(config.mesh))
  model = loader.load_model(config.model.init_from, trainer.model_config, mesh=trainer.mesh)
  state = trainer.state_from_params(pure_params(model), config.seed)
  _assert_same(jax.device_get(state.params), base)
