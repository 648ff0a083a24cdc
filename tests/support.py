"""Shared pieces of the DAgger tests: the demo config at test size, a tiny random student, and a
scripted stand-in student (the environment, teacher and grading around it are always real)."""

from __future__ import annotations

import dataclasses
import random
import socket

from configs import base as base_config
from configs import demo as demo_config
from dagger_jax.data.trajectory import Action
from dagger_jax.envs import protocol
from dagger_jax.envs.sandbox import SandboxLimits
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.policies.base import Policy


def config(in_flight: int = 3, env_workers: int = 3, **env):
  """configs/demo.py with `in_flight` episodes per wave, `env_workers` threads and `env` changes."""
  c = demo_config.get_config()
  c.rollout.concurrency, c.rollout.env_workers = in_flight, env_workers
  c.env.update(env)
  return c


def model_config(**fields) -> Qwen3Config:
  """`configs/base.py`'s model (the one place with defaults), with `fields` changed."""
  return dataclasses.replace(Qwen3Config.from_config(base_config.get_config().model), **fields)


def limits(**fields) -> SandboxLimits:
  """Sandbox limits from `configs/base.py`'s env section, with `fields` changed."""
  return SandboxLimits.from_config(base_config.get_config().env, **fields)


def tiny_student(c, vocab: int = 512, max_len: int = 2048):
  """A random 2-layer, 32-wide student with a BPE trained in the run (not the demo's base)."""
  m = c.model
  m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = vocab, 32, 64, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.init_from = 2, 1, 16, ""
  m.max_position_embeddings = max(m.max_position_embeddings, max_len)
  c.data.tokenizer, c.data.max_len = "demo-bpe", max_len
  return c


def tiny_loop(rounds: int, episodes: int, steps: int, n_train: int, n_eval: int):
  """The DAgger loop at toy scale: `tiny_student`, 3-turn episodes, 16 new tokens per turn,
  `steps` steps per round (one checkpoint at the end), `n_eval` tasks evaluated."""
  c = tiny_student(config())
  c.sampler.max_new_tokens, c.sampler.length_buckets = 16, (512, 1024, 2048)
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 8, steps, 1  # 8 simulated devices
  c.train.checkpoint_every = steps
  c.env.max_turns, c.rollout.concurrency = 3, 3
  c.tasks.n_train, c.tasks.n_eval = n_train, n_eval
  c.dagger.rounds, c.dagger.episodes_per_round, c.dagger.eval_episodes = rounds, episodes, n_eval
  return c


def command(text: str) -> str:
  """An assistant turn that runs `text`."""
  return protocol.format_action(text, "THOUGHT: scripted.")


class Scripted(Policy):
  """A stand-in student that always proposes the same text (ids are its bytes), so the
  collector's bookkeeping can be checked turn by turn."""

  name = "student"

  def __init__(self, text: str):
    self.text = text
    self.calls = 0

  def act(self, views):
    self.calls += 1
    return [Action(self.text, tuple(self.text.encode())) for _ in views]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now, below the kernel's ephemeral
  range: a server that binds port 0 later (the scripted teacher, ...) is never given it, as it
  was once between this call and the launch of a server on the port."""
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
      low = int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    low = 0
  rng = random.Random()
  for _ in range(200 if low > 2048 else 0):
    port = rng.randrange(1024, low)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return port
  with socket.socket() as s:  # no range to stay below: any free port
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
