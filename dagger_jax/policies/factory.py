"""The one place that builds policies: the student's engine by `config.rollout.engine`, the
teacher by `config.teacher.kind`. The loop knows no backend.

    teacher = make_teacher(config)                      # oracle | openai
    with make_student(config, tokenizer, run_dir) as engine:
      student = engine.policy(model, "round_000")       # the acting student of a round
      ...                                               # collect with it
      student = engine.policy(trained, "round_001")     # new weights: same engine, synced

A `StudentEngine` turns the params of one round (a `Qwen3`) into a policy that samples them:

- `jax`: in process (`JaxPolicy`). With `config.rollout.mesh` set, the params are first resharded
  in memory from the trainer's layout onto the rollout mesh (`model/reshard.py`).
- `sglang`: a server. The weights are exported as a HF directory (`<workdir>/rollout/VERSION`,
  written beside and renamed) and loaded by `/update_weights_from_disk`; the server is the one at
  `config.rollout.sglang_url`, or one this engine launches from `config.rollout.sglang_launch`
  (its log in `<workdir>/sglang.log`) and stops on every way out. Rollouts carrying another weight
  version are refused (`SGLangPolicy`). The key of a server started with one (SGLang's --api-key,
  `dagger-jax serve --api-key-env VAR`) is read from the variable `config.rollout.api_key_env`
  names and sent as a Bearer token.

`version` names the weights (the loop uses the checkpoint's round); asking again for the version
the engine holds costs nothing.
"""

from __future__ import annotations

import abc
import logging
import shutil
from typing import Any

from transformers import PreTrainedTokenizerBase

from dagger_jax import redact
from dagger_jax.data import tokenizer as tokenizer_lib
from dagger_jax.errors import ConfigError
from dagger_jax.model import reshard
from dagger_jax.model.qwen3 import Qwen3
from dagger_jax.policies import launch, sglang
from dagger_jax.policies.base import Policy
from dagger_jax.policies.jax_policy import JaxPolicy
from dagger_jax.policies.openai_teacher import OpenAICompatPolicy
from dagger_jax.policies.oracle import OracleTeacher
from dagger_jax.rundir import RunDir

log = logging.getLogger(__name__)


def make_teacher(config: Any) -> Policy:
  """The teacher `config.teacher.kind` names: the scripted `oracle`, or `openai` (any
  OpenAI-compatible chat endpoint: `config.teacher.url`, `.model`, `.api_key_env`)."""
  kind = config.teacher.kind
  if kind == "oracle":
    return OracleTeacher()
  if kind == "openai":
    return OpenAICompatPolicy.from_config(config)
  raise ConfigError(f"config.teacher.kind={kind!r}: must be 'oracle' or 'openai'")


def make_student(config: Any, tokenizer: PreTrainedTokenizerBase, run_dir: RunDir
                 ) -> "StudentEngine":
  """The engine `config.rollout.engine` names (`jax` or `sglang`)."""
  engine = config.rollout.engine
  if engine == "jax":
    return JaxEngine(config, tokenizer)
  if engine == "sglang":
    return SGLangEngine(config, tokenizer, run_dir)
  raise ConfigError(f"config.rollout.engine={engine!r}: must be 'jax' or 'sglang'")


def _max_prompt_len(config: Any) -> int:
  """The most recent context a prompt keeps, so that prompt + new tokens fit the model."""
  return int(config.model.max_position_embeddings) - int(config.sampler.max_new_tokens)


class StudentEngine(abc.ABC):
  """Samples the student's params of one version at a time (module docstring)."""

  @abc.abstractmethod
  def policy(self, model: Qwen3, version: str) -> Policy:
    """A policy acting with `model`'s params, named `version`."""

  def close(self) -> None:
    """Releases what the engine holds (a launched server); idempotent."""

  def __enter__(self) -> "StudentEngine":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class JaxEngine(StudentEngine):
  """In-process sampling, on the rollout mesh when `config.rollout.mesh` names one."""

  def __init__(self, config: Any, tokenizer: PreTrainedTokenizerBase):
    self.config = config
    self.tokenizer = tokenizer
    self.mesh = reshard.rollout_mesh(config) if config.rollout.mesh else None

  def policy(self, model: Qwen3, version: str) -> Policy:
    if self.mesh is not None:
      model = reshard.reshard_model(model, self.mesh, log=log.info)
    c = self.config
    return JaxPolicy(model, self.tokenizer, c.sampler, enable_thinking=c.data.enable_thinking,
                     seed=c.seed, max_prompt_len=_max_prompt_len(c), mesh=self.mesh)


class SGLangEngine(StudentEngine):
  """An SGLang server (or `dagger-jax serve`) that loads each version from disk."""

  def __init__(self, config: Any, tokenizer: PreTrainedTokenizerBase, run_dir: RunDir):
    self.config = config
    self.tokenizer = tokenizer
    self.run_dir = run_dir
    self.server: launch.LaunchedServer | None = None
    self.client: sglang.SGLangPolicy | None = None
    self.version: str | None = None
    self.weights_dir: str | None = None
    # read now: an unset variable fails the run before a server is launched
    self.api_key = redact.key_from_env("config.rollout.api_key_env", config.rollout.api_key_env)

  def policy(self, model: Qwen3, version: str) -> Policy:
    if self.client is not None and version == self.version:
      return self.client
    r, c = self.config.rollout, self.config
    out = self.run_dir.rollout_weights(version)
    sglang.export_for_server(model, out, tokenizer_lib.files_dir(self.tokenizer))
    if self.client is None:
      if r.sglang_launch:
        self.server = launch.LaunchedServer(r.sglang_launch, out, r.sglang_url,
                                            self.run_dir.sglang_log,
                                            float(r.startup_timeout_s)).start()
      else:
        launch.wait_healthy(r.sglang_url, min(30.0, float(r.startup_timeout_s)))  # already up
      self.client = sglang.SGLangPolicy(
          r.sglang_url, self.tokenizer, c.sampler, r, enable_thinking=c.data.enable_thinking,
          seed=c.seed, max_prompt_len=_max_prompt_len(c), api_key=self.api_key)
    self.client.update_weights(out, version)  # after a launch too: every rollout is versioned
    if self.weights_dir and self.weights_dir != out:  # the server no longer reads the old one
      shutil.rmtree(self.weights_dir, ignore_errors=True)
    self.version, self.weights_dir = version, out
    log.info("student weights %s served by %s", version, r.sglang_url)
    return self.client

  def close(self) -> None:
    if self.server is not None:
      self.server.close()
      self.server = None

