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
# `env.docker_hosts` entries: the URL schemes the docker SDK's `DockerClient(base_url=...)` takes.
DOCKER_HOST_RE = re.compile(r"(unix|tcp|ssh|http|https|npipe)://\S+")


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


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n[ \t]*([^\n]*)')


def config_file_error(message: str) -> str | None:
  """`FILE:LINE: CODE: ERROR` for ml_collections' "Error whilst parsing config file" message,
  which carries the whole traceback of a config file that raised (say, `c.train.lr = "3e-4"`
  into a float field): the last frame outside site-packages is the config's own line. None for
  any other message."""
  if "Traceback (most recent call last)" not in message:
    return None
  frames = [f for f in _FRAME_RE.findall(message) if "site-packages" not in f[0]]
  error = message.strip().splitlines()[-1].strip()
  if not frames:
    return error
  file, line, code = frames[-1]
  return f"{file}:{line}: {code.strip()}: {error}"


_CHOICES = {
    "model.param_dtype": ("float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "xla_blocks", "flash_jax", "pallas"),
    "train.remat": ("none", "dots", "full"),
    "train.normalize": ("token", "turn"),
    "train.continue_from": ("last", "base"),
    "data.too_long": ("split", "drop"),
    "env.sandbox": ("bwrap", "docker", "unsafe_local"),
    "rollout.engine": ("jax", "sglang"),
    "teacher.kind": ("oracle", "openai"),
    "dagger.beta_schedule": ("exponential", "linear", "constant"),
    "dagger.eval_split": ("test", "validation"),
}

_POSITIVE = (
    "model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_layers",
    "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.rope_theta",
    "data.max_len", "train.batch_size", "train.grad_accum", "train.steps", "train.lr",
    "train.loss_chunk_size", "train.keep_checkpoints", "sampler.max_new_tokens",
    "env.command_timeout", "env.output_limit", "env.max_turns", "env.max_format_errors",
    "env.disk_mb",
    "rollout.request_timeout_s", "rollout.startup_timeout_s", "teacher.max_tokens",
    "teacher.concurrency", "teacher.timeout_s",
    # divisors (`step % log_every`), sizes and limits a zero would break later, not here
    "train.log_every", "train.checkpoint_every", "dagger.eval_every", "model.rms_norm_eps",
    "model.max_position_embeddings", "env.memory_mb", "env.cpus", "env.pids", "env.grade_timeout",
    "rollout.concurrency", "rollout.env_workers",
)
_NON_NEGATIVE = ("train.weight_decay", "sampler.prefix_cache", "dagger.episodes_per_round",
                 "dagger.eval_episodes", "tasks.n_train", "tasks.n_eval")
# `dagger.interventions` entries: the rules of `dagger_jax.dagger.intervention.RULES` (named here
# so that validating a config imports no policy code; tests/test_bad_input.py pins the two).
INTERVENTIONS = ("repeat_command", "format_errors", "premature_submit")
_MISSING = object()


def _number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _seq(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
  """A tuple (or list) whose every entry is `ok`."""
  return lambda v: isinstance(v, (tuple, list)) and all(ok(x) for x in v)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node:
      return _MISSING
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key. Keys a config does not have are not checked."""
  checks: list[tuple[str, Callable[[Any], bool], str]] = []
  for key, choices in _CHOICES.items():
    checks.append((key, lambda v, c=choices: v in c, f"must be one of {choices}"))
  for key in _POSITIVE:
    checks.append((key, lambda v: _number(v) and v > 0, "must be > 0"))
  for key in _NON_NEGATIVE:
    checks.append((key, lambda v: _number(v) and v >= 0, "must be >= 0"))
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
      ("rollout.max_failure_rate", lambda v: 0 <= v < 1,
       "must be in [0, 1): the largest share of a round's episodes that may fail before the "
       "round stops (0 = none may fail; 1 would let a round in which every episode failed go "
       "on)"),
      ("teacher.request_retries", lambda v: v >= 0, "must be >= 0"),
      ("teacher.max_retries", lambda v: v >= 0, "must be >= 0"),
      ("teacher.temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
      ("teacher.top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
      ("train.b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
      ("train.b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
      ("sampler.length_buckets", _seq(lambda x: isinstance(x, int) and x > 0),
       "must be a tuple of prompt lengths (ints > 0), e.g. (512, 1024, 2048); () for powers of 2"),
      ("data.round_weights", _seq(lambda x: _number(x) and x >= 0),
       "must be a tuple of per-round weights (numbers >= 0), e.g. (0.5, 1.0); () for equal"),
      ("dagger.interventions", _seq(lambda x: x in INTERVENTIONS),
       f"must be a tuple of rule names from {INTERVENTIONS}; () for none"),
      ("dagger.label_budget", lambda v: _seq(lambda x: isinstance(x, int) and x >= 0)(v)
       and all(a <= b for a, b in zip(v, v[1:])),
       "must be a tuple of cumulative teacher-label counts, one per round (ints >= 0, never "
       "decreasing); () for episodes_per_round episodes a round"),
      ("env.issue_file", lambda v: v == "" or ISSUE_FILE_RE.fullmatch(v),
       "must be '' or a plain path under the sandbox's home or an absolute one, "
       "such as '~/ISSUE.md'"),
      ("env.docker_hosts", lambda v: isinstance(v, (tuple, list)) and len(set(v)) == len(v)
       and all(isinstance(h, str) and DOCKER_HOST_RE.match(h) for h in v),
       "must be a tuple of distinct docker engine URLs (unix://PATH, tcp://HOST:PORT, "
       "ssh://[USER@]HOST), e.g. ('unix:///var/run/docker.sock', 'ssh://me@box2'); () for "
       "DOCKER_HOST or the local engine"),
  ]
  for key, ok, why in checks:
    value = _get(config, key)
    if value is _MISSING:
      continue
    try:
      good = ok(value)
    except TypeError:  # a value of another type (a string for a number, ...)
      good = False
    if not good and not isinstance(value, (int, float, str, tuple, list)):
      why = f"{why} (got {type(value).__name__})"
    if not good:
      raise ConfigError(f"config.{key}={value!r}: {why}")
  budget, rounds = _get(config, "dagger.label_budget"), _get(config, "dagger.rounds")
  if budget is not _MISSING and budget and rounds is not _MISSING and len(budget) != rounds:
    raise ConfigError(f"config.dagger.label_budget={tuple(budget)!r}: has {len(budget)} entries "
                      f"for config.dagger.rounds={rounds}: give one cumulative count per round")
  tasks = config.get("tasks")
  if tasks is not None:
    from dagger_jax.envs.tasks import sources  # light: swebench loads only to name an image
    for key in ("train_images", "eval_images"):
      value = tasks.get(key)
      why = sources.images_spec_error(value) if isinstance(value, str) else "must be a string"
      if value is not None and why:
        raise ConfigError(f"config.tasks.{key}={value!r}: {why}")
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
