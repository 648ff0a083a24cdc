"""The sharded trainer on 8 simulated CPU devices: mesh parity, accumulation, overfitting."""

import glob
import json
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_data
import support
from dagger_jax.data.shards import ShardReader
from dagger_jax.rundir import RunDir
from dagger_jax.train import optim
from dagger_jax.train import trainer as T


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("data"))
  config = train_data.tiny_config(workdir)
  return config, train_data.build(workdir, config)


def _losses(config, shard_dirs, mesh=(1, 1, 1), steps=5, **train_changes):
  config = config.copy_and_resolve_references()
  config.train.update(train_changes)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  devices = jax.devices()[:int(np.prod(mesh))]
  trainer = T.Trainer(config, T.mesh_from_config(config.mesh, devices))
  reader = ShardReader.from_config(shard_dirs, config)
  state = trainer.init_state(config.seed)
  losses = []
  for _ in range(steps):
    state, metrics = trainer.step(state, trainer.global_batch(reader.next_batch()))
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state.params), trainer


@pytest.fixture(scope="module")
def single_device(data):
  return _losses(*data)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_losses_equal_the_single_device_run(data, single_device, mesh):
  losses, _, trainer = _losses(*data, mesh=mesh)
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  assert losses[-1] < losses[0]  # it trains
  # The parameters really are sharded as the rules say (fsdp over `embed`, tensor over `mlp`).
  up_spec = trainer.state_shardings.params["layers"][0]["mlp"]["up_proj"].spec
  assert tuple(up_spec) == ("fsdp", "tensor")
  assert trainer.mesh.shape == dict(zip(("data", "fsdp", "tensor"), mesh))


def test_gradient_accumulation_equals_the_whole_batch(data, single_device):
  losses, params, _ = _losses(*data, mesh=(2, 2, 1), grad_accum=2)
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params,
               single_device[1])  # Adam divides by sqrt(v): 1e-7 in a gradient is 1e-4 here


def test_chunked_loss_switch_trains_identically(data, single_device):
  losses, _, _ = _losses(*data, loss_chunked=True, loss_chunk_size=48)
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)


@pytest.mark.slow
def test_same_seed_same_run_different_seed_different_run(data, single_device):
  again, params, _ = _losses(*data)
  np.testing.assert_array_equal(again, single_device[0])
  jax.tree.map(np.testing.assert_array_equal, params, single_device[1])
  config = data[0].copy_and_resolve_references()
  config.seed = 1
  other, _, _ = _losses(config, data[1])
  assert not np.allclose(other, single_device[0])


def test_bfloat16_compute_stays_close_to_float32(data, single_device):
  config = data[0].copy_and_resolve_references()
  config.model.dtype = "bfloat16"
  losses, params, _ = _losses(config, data[1], steps=2)
  # bf16 has an 8-bit mantissa: 1e-2 relative is its parity level (STYLE.md).
  np.testing.assert_allclose(losses, single_device[0][:2], rtol=1e-2)
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))  # fp32 master params


def test_learning_rate_warms_up_then_decays_to_the_floor(data):
  t = data[0].train
  lr = optim.learning_rate(t)
  assert float(lr(0)) == 0.0
  assert float(lr(t.warmup_steps)) == pytest.approx(t.lr)
  assert float(lr(t.steps)) == pytest.approx(t.lr * t.min_lr_ratio)
  assert float(lr(t.warmup_steps + 1)) < t.lr


def test_weight_decay_skips_embeddings_and_norms(data):
  params = T.Trainer(data[0], T.mesh_from_config(data[0].mesh)).abstract_state.params
  mask = optim.decay_mask(params)
  assert not mask["embedding"] and not mask["final_norm"]["scale"]
  layer = mask["layers"][0]
  assert layer["mlp"]["up_proj"] and layer["attn"]["q_proj"]
  assert not layer["attn"]["q_norm"]["scale"] and not layer["input_norm"]["scale"]
  assert all(jax.tree.leaves(optim.decay_mask(params, decay_norms_and_embeddings=True)))


@pytest.mark.slow
def test_overfits_a_small_real_dataset(data, tmp_path):
  config = data[0].copy_and_resolve_references()
  # 200 steps: the demo BPE now splits identifiers and punctuation apart (more tokens per
  # episode); the loss is still falling at 150 (0.059) and reaches 0.002 at 250, so the data is
  # learnable to ~0 and the bar stays where it was.
  config.train.update(steps=200, lr=3e-3, warmup_steps=10, log_every=10, checkpoint_every=1000)
  result = T.train(config, data[1], workdir=str(tmp_path), progress=False, log=lambda _: None)
  assert result.steps == 200
  final = result.history[-1]
  assert final["loss"] < 0.05, result.history
  with open(f"{data[1][0]}/manifest.json") as f:
    manifest = json.load(f)
  assert manifest["rows"] == config.train.batch_size  # every step sees the whole dataset
  assert final["trained_tokens"] == manifest["trained_tokens"]
  assert final["tokens_per_s"] > 0 and 0 < final["mfu"] < 1
  assert glob.glob(f"{tmp_path}/tensorboard/events.out.tfevents.*")
  assert (tmp_path / "checkpoints" / "round_000" / "200").is_dir()  # the final save


def _tensorboard_events(logdir: str) -> list:
  """Every event of every event file under `logdir`, in the order they were written.

  The `tensorboard` package is not a dependency, so this reads TFRecords itself: per record a
  uint64 length, a uint32 CRC, the serialized `Event` and another CRC (CRCs not checked).
  """
  from tensorboardX.proto.event_pb2 import Event
  events = []
  for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      events.append(Event.FromString(data[i + 12:i + 12 + n]))
      i += 12 + n + 4
  return sorted(events, key=lambda e: e.wall_time)


def _scalar_steps(events, tag: str) -> list[tuple[int, float]]:
  return [(e.step, v.simple_value) for e in events for v in e.summary.value if v.tag == tag]


class _Killed(Exception):
  pass


@pytest.mark.slow  # four short training runs: ~30 s on 2 cores
def test_tensorboard_steps_continue_across_rounds_and_resume(data, tmp_path, monkeypatch):
  # Round 0 trains 6 steps, round 1 ten: round 1's global steps start after round 0's 6 (what it
  # trained, not round 1's config.train.steps). Then round 1 again in a copy of the run with
  # round 0 done, killed after step 7 and resumed from its step-5 checkpoint: the same global
  # steps, the same values, and the resumed writer purges what comes after the checkpoint.
  config = data[0].copy_and_resolve_references()
  config.train.update(steps=6, log_every=5, checkpoint_every=5)
  quiet = dict(progress=False, log=lambda _: None)
  run, other = str(tmp_path / "run"), str(tmp_path / "resumed")
  round0 = T.train(config, data[1], workdir=run, round_index=0, **quiet)
  config.train.steps = 10
  round1 = T.train(config, data[1], workdir=run, round_index=1, **quiet)
  assert [(h["step"], h["global_step"]) for h in round0.history] == [(1, 1), (5, 5), (6, 6)]
  assert [(h["step"], h["global_step"]) for h in round1.history] == [(1, 7), (5, 11), (10, 16)]
  assert (round0.step_offset, round1.step_offset) == (0, 6)
  loss = _scalar_steps(_tensorboard_events(f"{run}/tensorboard"), "train/loss")
  assert [s for s, _ in loss] == [1, 5, 6, 7, 11, 16]  # in the order written: one rising axis
  np.testing.assert_allclose([v for _, v in loss],
                             [h["loss"] for h in round0.history + round1.history], rtol=1e-6)

  shutil.copytree(RunDir(run).checkpoints(0), RunDir(other).checkpoints(0))
  step = T.Trainer.step
  calls = []

  def dies_after_step_7(self, state, batch):
    if len(calls) == 7:
      raise _Killed
    calls.append(1)
    return step(self, state, batch)

  monkeypatch.setattr(T.Trainer, "step", dies_after_step_7)
  with pytest.raises(_Killed):
    T.train(config, data[1], workdir=other, round_index=1, **quiet)
  monkeypatch.setattr(T.Trainer, "step", step)
  resumed = T.train(config, data[1], workdir=other, round_index=1, **quiet)
  # the rows logged before the checkpoint come back from its meta; the resumed process adds its
  # first step (6) and the last
  assert [(h["step"], h["global_step"]) for h in resumed.history] == [(1, 7), (5, 11), (6, 12),
                                                                      (10, 16)]
  assert [h["loss"] for h in resumed.history[:2]] == [h["loss"] for h in round1.history[:2]]
  assert resumed.history[-1]["loss"] == round1.history[-1]["loss"]
  events = _tensorboard_events(f"{other}/tensorboard")
  assert [s for s, _ in _scalar_steps(events, "train/loss")] == [7, 11, 12, 16]
  purges = [e.step for e in events if e.HasField("session_log")]
  assert purges == [12]  # TensorBoard hides what a killed run logged after its checkpoint (>= 12)


def test_block_skipping_attention_equals_full_masked_attention():
  # The training attention skips key blocks above the diagonal; with packing and branches the
  # mask is still causal in row order, so nothing it skips was visible. t = 300: 3 blocks of
  # 128, the last one partial.
  from dagger_jax.model.qwen3 import attention_bias, attention_mask, causal_block_attention
  b, t, n, kv, h = 2, 300, 4, 2, 16
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, kv, kv))
  segments = np.ones((b, t), np.int32)
  segments[0, 170:] = 2  # two packed sequences in row 0
  branches = np.zeros((b, t), np.int32)
  branches[1, 100:140], branches[1, 200:230] = 1, 2  # two label branches in row 1

  def full(q, k, v):
    s = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kv, n // kv, h), k) * h ** -0.5
    s = jnp.where(attention_mask(segments, branches)[:, :, None], s, -jnp.inf)
    return jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(s, -1), v).reshape(b, t, n, h)

  def blocked(q, k, v):
    return causal_block_attention(q, k, v, attention_bias(segments, branches), block=128)

  np.testing.assert_allclose(blocked(q, k, v), full(q, k, v), rtol=1e-5, atol=1e-6)
  probe = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  grads = [jax.grad(lambda *x: jnp.sum(f(*x) * probe), argnums=(0, 1, 2))(q, k, v)
           for f in (blocked, full)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_train_cli_names_a_bad_shard_directory(tmp_path):
  (tmp_path / "not_a_shard").mkdir()
  out = subprocess.run([sys.executable, "-m", "dagger_jax.cli", "train", "--shards",
                        str(tmp_path / "not_a_shard"), f"--config.workdir={tmp_path / 'run'}",
                        "--config.train.batch_size=8"],  # divisible by the 8 simulated devices
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert f"{tmp_path}/not_a_shard/manifest.json: no manifest" in out.stderr
  assert "Traceback" not in out.stderr


def test_fused_training_mlp_equals_the_plain_mlp():
  from flax import nnx

  from dagger_jax.model.qwen3 import MLP
  mlp = MLP(support.model_config(hidden_size=32, intermediate_size=48), nnx.Rngs(0))
  graphdef, params = nnx.split(mlp)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 32)), jnp.float32)
  probe = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 32)), jnp.float32)

  def loss(params, x, fused):
    m = nnx.merge(graphdef, params)
    return jnp.sum((m.fused(x) if fused else m(x)) * probe)

  np.testing.assert_allclose(loss(params, x, True), loss(params, x, False), rtol=1e-5)
  got, want = (jax.grad(loss, argnums=(0, 1))(params, x, fused) for fused in (True, False))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
