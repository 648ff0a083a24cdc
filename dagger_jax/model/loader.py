"""The one way to turn `config.model.init_from` (or a `--ckpt`) into a model.

`load_model(init_from, config)` is what the trainer (round 0's base), the DAgger loop (the
acting student of round 0) and `dagger-jax generate` call; `init_from` may be

    ""                  a random init from `seed` (`init_model`: the same model the trainer's
                        `Trainer.init_state(seed)` starts from)
    an HF directory     config.json + *.safetensors (`hf.load_pretrained`), e.g. a downloaded
                        Qwen3-4B, or what `dagger-jax export-hf` wrote
    a params checkpoint what `save_params`, `dagger-jax import-hf` and `dagger-jax pretrain`
                        write, or a trainer checkpoint directory (its latest step)

    model = load_model("", config, seed=0)                       # random, single device
    model = load_model("assets/demo_base/params", config)        # Orbax, checked against config
    model = load_model("/ckpts/Qwen3-4B", config, mesh=mesh)     # HF, created sharded
    model = load_model(ckpt, None)                               # the checkpoint's own config

With a `config`, the checkpoint's architecture must equal it (every `Qwen3Config` field but the
dtypes, which `config` chooses); a difference is a `CheckpointError` naming each differing field.
With `config=None` the checkpoint's own config is used (model_config.json or config.json).

Lives apart from `params_io` because it reads both formats and `hf` builds on `params_io`.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
from flax import nnx
from jax.sharding import Mesh

from dagger_jax.model import hf, params_io
from dagger_jax.model.params_io import CheckpointError
from dagger_jax.model.qwen3 import Qwen3, Qwen3Config

_DTYPE_FIELDS = ("param_dtype", "dtype")


def init_model(config: Qwen3Config, rng: jax.Array) -> Qwen3:
  """The random student a run starts from (`Trainer.init_state` and the DAgger loop's round-0
  student both call this, so they are the same model)."""
  return Qwen3(config, rngs=nnx.Rngs(params=rng))


def is_hf_dir(path: str) -> bool:
  """An HF checkpoint directory: config.json and at least one *.safetensors file."""
  return (os.path.isfile(os.path.join(path, "config.json"))
          and bool(glob.glob(os.path.join(path, "*.safetensors"))))


def check_architecture(stored: Qwen3Config, wanted: Qwen3Config, source: str) -> None:
  """Raises `CheckpointError` naming every field (but the dtypes) where `stored` and `wanted`
  differ."""
  diff = [f"{f.name}: checkpoint {getattr(stored, f.name)!r}, config {getattr(wanted, f.name)!r}"
          for f in dataclasses.fields(Qwen3Config)
          if f.name not in _DTYPE_FIELDS and getattr(stored, f.name) != getattr(wanted, f.name)]
  if diff:
    raise CheckpointError(f"{source}: the checkpoint's architecture differs from config.model "
                          f"({'; '.join(diff)}); set those config.model keys or choose another "
                          f"checkpoint")


def load_model(init_from: str | None, config: Qwen3Config | None, *, seed: int = 0,
               mesh: Mesh | None = None, rules=None) -> Qwen3:
  """The model `init_from` names (see the module doc), with `config`'s dtypes; sharded over
  `mesh` per its params' logical axes when given, else on one device."""
  if not init_from:
    if config is None:
      raise CheckpointError("a random init needs a model config (config.model)")
    model = init_model(config, jax.random.PRNGKey(seed))
    if mesh is not None:
      params = jax.device_put(params_io.pure_params(model),
                              params_io.param_shardings(config, mesh, rules))
      model = params_io.model_from_params(config, params)
    return model
  if not os.path.isdir(init_from):
    raise CheckpointError(f"{init_from}: no such checkpoint directory (expected an HF directory "
                          f"with config.json + *.safetensors, or an Orbax params checkpoint)")
  if is_hf_dir(init_from):
    dtypes = {} if config is None else {f: getattr(config, f) for f in _DTYPE_FIELDS}
    model = hf.load_pretrained(init_from, mesh=mesh, rules=rules, **dtypes)
    if config is not None:
      check_architecture(model.config, config, init_from)
    return model
  params_dir = params_io.resolve_params_dir(init_from)
  stored = params_io.read_model_config(params_dir)
  if config is not None:
    check_architecture(stored, config, init_from)
  wanted = stored if config is None else dataclasses.replace(
      stored, **{f: getattr(config, f) for f in _DTYPE_FIELDS})
  return params_io.load_params(params_dir, mesh=mesh, rules=rules, config=wanted)
