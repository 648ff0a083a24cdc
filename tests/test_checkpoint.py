"""Checkpoints: sharded round trip, keep-last-N, rounds, and a SIGKILLed `dagger-jax train`
that resumes to the same parameters, bit for bit, as an uninterrupted run."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import train_data
from dagger_jax.data.shards import ShardReader
from dagger_jax.model import hf, params_io
from dagger_jax.model.qwen3 import Qwen3
from dagger_jax.rundir import RunDir
from dagger_jax.train import checkpoint as C
from dagger_jax.train import trainer as T


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("data"))
  config = train_data.tiny_config(workdir)
  return config, train_data.build(workdir, config)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_into_the_sharded_state_keeps_last_n(data, tmp_path):
  config = data[0].copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  trainer = T.Trainer(config, T.mesh_from_config(config.mesh))
  reader = ShardReader.from_config(data[1], config)
  state = trainer.init_state(0)
  ckpt = C.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  for step in range(1, 4):
    reader.next_batch()
    state = dataclasses.replace(state, step=step)
    ckpt.save(state, data_cursor=reader.state(), round_index=4)
  ckpt.wait()
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3"]
  arrays, meta = ckpt.restore(trainer.abstract_state)
  assert meta == {"step": 3, "round": 4, "data_cursor": reader.state(),
                  "rng": np.asarray(state.rng).tolist()}
  _assert_trees_equal(arrays["params"], jax.device_get(state.params))
  _assert_trees_equal(arrays["opt_state"], jax.device_get(state.opt_state))
  shardings = jax.tree.map(lambda x: x.sharding, arrays["params"])
  assert shardings == trainer.state_shardings.params
  ckpt.close()
  with pytest.raises(params_io.CheckpointError, match="no checkpoint in .*empty"):
    C.Checkpointer(str(tmp_path / "empty")).restore(trainer.abstract_state)


@pytest.mark.slow
def test_rounds_continue_from_last_or_restart_from_base(data, tmp_path):
  config = data[0].copy_and_resolve_references()
  config.train.update(steps=3, checkpoint_every=100)
  workdir = str(tmp_path)
  quiet = dict(progress=False, log=lambda _: None)
  round0 = T.train(config, data[1], workdir=workdir, round_index=0, **quiet)
  final0 = jax.device_get(round0.state.params)
  trainer = T.Trainer(config, T.mesh_from_config(config.mesh))

  def start_of(round_index, continue_from):
    config.train.continue_from = continue_from
    reader = ShardReader.from_config(data[1], config)
    ckpt = C.Checkpointer(RunDir(workdir).checkpoints(round_index))
    state = T.initial_state(trainer, config, workdir, round_index, reader, ckpt, lambda _: None)
    return jax.device_get(state)

  exported = params_io.load_params(RunDir(workdir).checkpoints(0))  # what the sampler loads
  _assert_trees_equal(jax.device_get(params_io.pure_params(exported)), final0)

  last = start_of(1, "last")
  _assert_trees_equal(last.params, final0)
  _assert_trees_equal(last.opt_state, jax.device_get(round0.state.opt_state))
  assert int(last.step) == 0  # a new round: its own warm-up and cosine
  base = start_of(1, "base")
  _assert_trees_equal(base.params, jax.device_get(trainer.init_state(config.seed).params))
  with pytest.raises(params_io.CheckpointError, match="round_002.*continue_from=base"):
    start_of(3, "last")


@pytest.mark.parametrize("kind", ["params", "hf"])
def test_base_model_from_init_from(data, tmp_path, kind):
  config = data[0].copy_and_resolve_references()
  trainer = T.Trainer(config, T.mesh_from_config(config.mesh))
  base = Qwen3(trainer.model_config, rngs=nnx.Rngs(7))
  if kind == "params":
    config.model.init_from = params_io.save_params(base, str(tmp_path / "base"))
  else:
    config.model.init_from = str(tmp_path / "hf")
    hf.save_pretrained(base, config.model.init_from)
  reader = ShardReader.from_config(data[1], config)
  ckpt = C.Checkpointer(RunDir(str(tmp_path)).checkpoints(0))
  state = T.initial_state(trainer, config, str(tmp_path), 0, reader, ckpt, lambda _: None)
  _assert_trees_equal(jax.device_get(state.params), jax.device_get(params_io.pure_params(base)))
  assert state.params["embedding"].sharding == trainer.state_shardings.params["embedding"]


def _train_command(shard_dir, workdir, steps):
  overrides = {
      "model.vocab_size": 512, "model.hidden_size": 64, "model.intermediate_size": 128,
      "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 16,
      "data.tokenizer": "demo-bpe", "data.max_len": 384, "train.lr": 3e-3, "train.steps": steps,
      "train.warmup_steps": 5, "train.weight_decay": 0.01, "train.checkpoint_every": 4,
      "train.log_every": 4, "train.keep_checkpoints": 2,
  }
  return [sys.executable, "-m", "dagger_jax.cli", "train", "--config", "configs/base.py",
          *(f"--config.{k}={v}" for k, v in overrides.items()),
          "--shards", shard_dir, f"--config.workdir={workdir}"]


def _finished_steps(workdir):
  d = os.path.join(workdir, "checkpoints", "round_000")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _final_params(workdir, steps, trainer):
  ckpt = C.Checkpointer(RunDir(workdir).checkpoints(0))
  arrays, meta = ckpt.restore(trainer.abstract_state, step=steps)
  ckpt.close()
  assert meta["step"] == steps
  return jax.device_get(arrays)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(data, tmp_path):
  steps = 60
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = dict(cwd=repo, capture_output=True, text=True, timeout=600)
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  out = subprocess.run(_train_command(data[1][0], whole, steps), **run)
  assert out.returncode == 0, out.stderr[-3000:]

  proc = subprocess.Popen(_train_command(data[1][0], killed, steps), cwd=repo,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not _finished_steps(killed) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before a checkpoint landed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  landed = _finished_steps(killed)
  assert landed and landed[-1] < steps, landed

  out = subprocess.run(_train_command(data[1][0], killed, steps), **run)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resuming round 0 at step {landed[-1]}" in out.stdout + out.stderr

  trainer = T.Trainer(data[0], T.mesh_from_config(data[0].mesh))
  _assert_trees_equal(_final_params(killed, steps, trainer), _final_params(whole, steps, trainer))
