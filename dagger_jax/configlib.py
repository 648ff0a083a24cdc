"""Loading and validating ml-collections configs.

The CLI loads `--config FILE[:arg]` with `config_flags` (so `--config.a.b=value` overrides work),
then calls `validate` before any work starts: a bad value fails with a message naming its key.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import Any, Callable

import ml_collections

from dagger_jax.errors import ConfigError  # noqa: F401  (re-exported: configlib.ConfigError)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.py")
# `env.issue_file`: a plain path under the sandbox's home or an absolute one (it goes into a
# shell command unquoted, so that `~` expands).
ISSUE_FILE_RE = re.compile(r"(~/|/)[\w.-]+(/[\w.-]+)*")


def ensure_configs_importable(path: str) -> None:
  # Config files do `from configs import base`: put the folder above `configs/` on sys.path.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)


def load(spec: str = DEFAULT_CONFIG) -> ml_collections.ConfigDict:
  """Loads `FILE[:arg]` (the same syntax as `--config`) without command-line overrides."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  ensure_configs_importable(path)
  module_spec = importlib.util.spec_from_file_location("_dagger_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  validate(config)
  return config


_CHOICES = {
    "model.param_dtype": ("float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16"),
    "train.normalize": ("token", "turn"),
    "train.continue_from": ("last", "base"),
    "data.too_long": ("split", "drop"),
    "env.sandbox": ("bwrap", "docker", "unsafe_local"),
    "rollout.engine": ("jax", "sglang"),
    "teacher.kind": ("oracle", "openai"),
    "dagger.beta_schedule": ("exponential", "linear", "constant"),
}

_POSITIVE = (
    "model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_layers",
    "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.rope_theta",
    "data.max_len", "train.batch_size", "train.grad_accum", "train.steps", "train.lr",
    "train.loss_chunk_size", "train.keep_checkpoints", "sampler.max_new_tokens",
    "env.command_timeout", "env.output_limit", "env.max_turns", "env.max_format_errors",
    "rollout.request_timeout_s", "rollout.startup_timeout_s", "teacher.max_tokens",
    "teacher.concurrency", "teacher.timeout_s",
)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key. Keys a config does not have are not checked."""
  checks: list[tuple[str, Callable[[Any], bool], str]] = []
  for key, choices in _CHOICES.items():
    checks.append((key, lambda v, c=choices: v in c, f"must be one of {choices}"))
  for key in _POSITIVE:
    checks.append((key, lambda v: v > 0, "must be > 0"))
  checks += [
      ("train.warmup_steps", lambda v: v >= 0, "must be >= 0"),
      ("train.grad_clip", lambda v: v >= 0, "must be >= 0 (0 disables clipping)"),
      ("train.z_loss", lambda v: v >= 0, "must be >= 0"),
      ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
      ("sampler.temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
      ("sampler.top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
      ("sampler.top_k", lambda v: v >= 0, "must be >= 0 (0 = off)"),
      ("dagger.beta0", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
      ("dagger.beta_decay", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
      ("dagger.rounds", lambda v: v >= 1, "must be >= 1"),
      ("rollout.request_retries", lambda v: v >= 0, "must be >= 0"),
      ("teacher.request_retries", lambda v: v >= 0, "must be >= 0"),
      ("teacher.max_retries", lambda v: v >= 0, "must be >= 0"),
      ("teacher.temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
      ("teacher.top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
      ("env.issue_file", lambda v: v == "" or ISSUE_FILE_RE.fullmatch(v),
       "must be '' or a plain path under the sandbox's home or an absolute one, "
       "such as '~/ISSUE.md'"),
  ]
  for key, ok, why in checks:
    value = _get(config, key)
    if value is None:
      continue
    try:
      good = ok(value)
    except TypeError:
      good = False
    if not good:
      raise ConfigError(f"config.{key}={value!r}: {why}")
  m = config.get("model")
  if m is not None and m.num_heads % m.num_kv_heads:
    raise ConfigError(
        f"config.model.num_heads={m.num_heads} must be a multiple of "
        f"config.model.num_kv_heads={m.num_kv_heads} (grouped-query attention)")
  data = config.get("data")
  if (m is not None and data is not None and data.get("max_len")
      and data.max_len > m.max_position_embeddings):
    raise ConfigError(
        f"config.data.max_len={data.max_len} exceeds config.model.max_position_embeddings="
        f"{m.max_position_embeddings} (a row's positions must have rotary embeddings)")
  mesh = config.get("mesh")
  if mesh is not None:
    for axis in ("data", "fsdp", "tensor"):
      v = mesh.get(axis)
      if not isinstance(v, int) or not (v == -1 or v >= 1):
        raise ConfigError(f"config.mesh.{axis}={v!r}: must be a positive int or -1 (fill)")
    if sum(mesh.get(a) == -1 for a in ("data", "fsdp", "tensor")) > 1:
      raise ConfigError("config.mesh: at most one axis may be -1 (fill)")
