"""In-memory weight sync (model/reshard.py): trained params, resharded from the training mesh
(fsdp=8) onto a rollout mesh (data=4,tensor=2) on 8 simulated CPU devices, sample as on one device.

No host round trip is checked by spying on `ArrayImpl._value` (JAX's device-to-host gather):
`jax.transfer_guard` does not fire on CPU, where device memory is host memory.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax._src import array as jax_array  # private: the one place a host gather shows on CPU
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import base
from dagger_jax.errors import ConfigError
from dagger_jax.model import params_io, reshard, sampler, sharding
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.train import trainer as T

ROLLOUT = "data=4,tensor=2"
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3], [40, 41, 42, 43, 44, 45, 46], [7, 7, 7, 7]]


def tiny_config():
  c = base.get_config()
  c.model.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
                 tie_word_embeddings=False)  # an lm_head too: ('embed', 'vocab')
  c.mesh.update(data=1, fsdp=8, tensor=1)
  c.train.update(batch_size=8, lr=1e-2, warmup_steps=1, steps=3)
  c.rollout.mesh = ROLLOUT
  return c


def host_batch(step: int, rows: int = 8, length: int = 32) -> dict[str, np.ndarray]:
  """Random token rows: predict the next token everywhere."""
  rng = np.random.default_rng(step)
  tokens = rng.integers(0, 512, (rows, length + 1), dtype=np.int32)
  ones = np.ones((rows, length), np.int32)
  return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
              positions=np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
              segment_ids=ones, branch_ids=0 * ones, loss_mask=ones, label_ids=ones)


@pytest.fixture(scope="module")
def trained():
  """(config, trainer, params after 3 steps on fsdp=8, their host copy, the init's host copy)."""
  config = tiny_config()
  trainer = T.Trainer(config, T.mesh_from_config(config.mesh))
  state = trainer.init_state(config.seed)
  init = jax.device_get(state.params)
  for step in range(3):
    state, _ = trainer.step(state, trainer.global_batch(host_batch(step)))
  return config, trainer, state.params, jax.device_get(state.params), init


@pytest.fixture
def host_gathers(monkeypatch):
  """Shapes of the arrays gathered to the host (`ArrayImpl._value`) while the test runs."""
  calls = []
  value = jax_array.ArrayImpl._value

  def spy(self):
    calls.append(tuple(self.shape))
    return value.fget(self)

  monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(spy))
  return calls


def single_device_model(config, host_params):
  device = jax.devices()[0]
  return params_io.model_from_params(Qwen3Config.from_config(config.model),
                                     jax.device_put(host_params, device))


def test_trained_params_move_device_to_device_onto_the_rollout_mesh(trained, host_gathers):
  config, trainer, params, host, init = trained
  assert trainer.mesh.shape == {"data": 1, "fsdp": 8, "tensor": 1}
  mesh = reshard.rollout_mesh(config)
  assert mesh.shape == {"data": 4, "fsdp": 1, "tensor": 2}
  want = params_io.param_shardings(trainer.model_config, mesh)
  model = params_io.model_from_params(trainer.model_config, params)
  messages = []
  rollout = reshard.reshard_model(model, mesh, log=messages.append)
  assert host_gathers == []  # nothing went through the host
  got = params_io.pure_params(rollout)
  for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
    s = want
    for key in path:
      s = s[key.key]
    assert x.sharding == s and x.sharding.mesh == mesh, jax.tree_util.keystr(path)
  assert got["layers"][0]["mlp"]["up_proj"].sharding.spec == P("fsdp", "tensor")
  assert {b.data.shape for b in got["layers"][0]["mlp"]["up_proj"].addressable_shards} == {(64, 64)}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), host)  # bit-equal
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, host, init)))  # it trained
  # The trainer's arrays are untouched (nothing donated) and still on the training mesh.
  for x in jax.tree.leaves(params):
    assert not x.is_deleted() and x.sharding.mesh == trainer.mesh
  assert len(messages) == 1 and "onto data=4,fsdp=1,tensor=2" in messages[0]

  host_gathers.clear()  # (device_get above gathered, as it should)
  _, stats = reshard.reshard_params(params, want)
  assert host_gathers == []
  total = sum(x.nbytes for x in jax.tree.leaves(host))
  assert stats.bytes_total == total and stats.leaves == len(jax.tree.leaves(host))
  norms = sum(x.nbytes for x in jax.tree.leaves(host) if x.ndim == 1)  # replicated on both
  assert stats.bytes_kept == norms and stats.bytes_moved > 0 and stats.seconds > 0
  # What a plain `jax.device_put` between these shardings does: the spy sees the host gather.
  jax.device_put(params["layers"][0]["mlp"]["up_proj"], want["layers"][0]["mlp"]["up_proj"])
  assert host_gathers == [(64, 128)]


def test_resharding_splits_a_leaf_instead_of_replicating_it(trained):
  # fsdp rows over 8 devices -> tensor columns over 2 x 4 replicas. A direct identity has XLA
  # replicate the whole [64, 512] lm_head on each device first; the plan's largest scratch
  # stays within the target's block of [64, 256].
  config, trainer, params, _, _ = trained
  mesh = reshard.rollout_mesh(config)
  lm_head = params["lm_head"]
  target = params_io.param_shardings(trainer.model_config, mesh)["lm_head"]
  _, stats = reshard.reshard_params({"w": lm_head}, {"w": target})
  assert 0 < stats.temp_bytes <= 64 * 256 * 4
  # each of the 8 devices already held 8 of the 64 rows of its target block
  assert stats.bytes_moved == 8 * (64 - 8) * 256 * 4


def test_sampling_on_the_rollout_mesh_equals_one_device(trained):
  config, trainer, params, host, _ = trained
  mesh = reshard.rollout_mesh(config)
  model = params_io.model_from_params(trainer.model_config, params)
  rollout = reshard.reshard_model(model, mesh)
  want = sampler.generate(single_device_model(config, host), PROMPTS, 12, length_buckets=(16,))
  assert reshard.params_mesh(rollout) == mesh
  with reshard.sampling_mesh(rollout):  # batch rows and KV cache split over `data`
    assert jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
    got = sampler.generate(rollout, PROMPTS, 12, length_buckets=(16,))
  assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
  for g, w in zip(got.logprobs, want.logprobs):
    np.testing.assert_allclose(g, w, rtol=0, atol=5e-6)  # sharded sums add in another order
  assert len({tuple(t) for t in want.tokens}) > 1  # not one degenerate row
  # Sampling draws the same numbers however the batch is split (threefry is partitionable).
  kw = dict(temperature=0.8, top_k=40, seed=3, length_buckets=(16,))
  want = sampler.generate(single_device_model(config, host), PROMPTS, 12, **kw)
  with reshard.sampling_mesh(rollout):
    got = sampler.generate(rollout, PROMPTS, 12, **kw)
  assert got.tokens == want.tokens
  for g, w in zip(got.logprobs, want.logprobs):
    np.testing.assert_allclose(g, w, rtol=0, atol=5e-6)


def test_a_single_device_model_reshards_and_same_placement_is_kept(trained, host_gathers):
  config, trainer, params, host, _ = trained
  mesh = reshard.rollout_mesh(config)
  single = single_device_model(config, host)  # e.g. round 0's student, loaded without a mesh
  rollout = reshard.reshard_model(single, mesh)
  assert host_gathers == []
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_io.pure_params(rollout)),
               host)
  assert reshard.params_mesh(single) is None

  # rollout.mesh "" = the training mesh: the arrays are kept as they are, or copied on request.
  config = config.copy_and_resolve_references()
  config.rollout.mesh = ""
  same = reshard.rollout_mesh(config)
  assert same.shape == trainer.mesh.shape and same.devices.tolist() == trainer.mesh.devices.tolist()
  shardings = params_io.param_shardings(trainer.model_config, same)
  _, kept = reshard.reshard_params(params, shardings)
  assert kept.bytes_kept == kept.bytes_total and kept.bytes_moved == 0
  x = jax.device_put(params["lm_head"], params["lm_head"].sharding, may_alias=False)
  copied, stats = reshard.reshard_params({"w": x}, {"w": shardings["lm_head"]}, copy=True)
  assert stats.bytes_kept == 0
  x.delete()
  np.testing.assert_array_equal(jax.device_get(copied["w"]), host["lm_head"])


def test_devices_outside_the_source_mesh_are_refused(trained):
  _, trainer, params, _, _ = trained
  first, last = sharding.make_mesh(1, 4, 1, jax.devices()[:4]), jax.devices()[4:]
  x = jax.device_put(params["lm_head"], NamedSharding(first, params["lm_head"].sharding.spec))
  target = params_io.param_shardings(trainer.model_config, sharding.make_mesh(2, 1, 2, last))
  with pytest.raises(reshard.ReshardError, match="must use the devices of the training mesh"):
    reshard.reshard_params({"w": x}, {"w": target["lm_head"]})


@pytest.mark.parametrize("spec, sizes", [
    ("data=4,tensor=2", (4, 1, 2)), ("tensor=2", (4, 1, 2)), (" fsdp = -1 ", (1, 8, 1)),
    ("data=2,fsdp=2,tensor=2", (2, 2, 2)), ("data=1,fsdp=4,tensor=-1", (1, 4, 2)),
    ("tensor=8", (1, 1, 8))])
def test_parse_mesh(spec, sizes):
  assert reshard.parse_mesh(spec, 8) == dict(zip(sharding.MESH_AXES, sizes))


@pytest.mark.parametrize("spec, why", [
    ("tensor=3", "does not divide the 8 devices"),
    ("data=2,tensor=2", "must span all 8 devices"),
    ("model=2", "unknown axis 'model'"),
    ("data=4,data=2", "given twice"),
    ("data=0", "a size is a positive int"),
    ("data=four", "is not AXIS=SIZE"),
    ("data=4;tensor=2", "is not AXIS=SIZE"),
    ("data=4,", "'' is not AXIS=SIZE"),
    ("data=-1,fsdp=-1", "at most one axis may be -1"),
    ("  ", "empty"), (4, "not a string")])
def test_bad_mesh_specs_name_the_key(spec, why):
  with pytest.raises(ConfigError, match="config.rollout.mesh") as e:
    reshard.parse_mesh(spec, 8)
  assert why in str(e.value)


def test_rollout_mesh_checks_against_the_visible_devices():
  config = tiny_config()
  config.rollout.mesh = "data=3"
  with pytest.raises(ConfigError, match=r"config.rollout.mesh='data=3'.*8 devices"):
    reshard.rollout_mesh(config)
