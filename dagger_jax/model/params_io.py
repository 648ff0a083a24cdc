"""Params-only model checkpoints (Orbax) and building a model from arrays, sharded or not.

Layout of a params checkpoint (written by `save_params`, by `dagger-jax import-hf`, and restorable
from a trainer step directory that has the same `params` item):

    CKPT_DIR/
      params/              Orbax item "params": `nnx.to_pure_dict(nnx.state(model, nnx.Param))`,
                           e.g. {'embedding': [v, d], 'layers': {0: {'attn': {'q_proj': [d, n, h],
                           ...}}}, 'final_norm': {'scale': [d]}}
      _CHECKPOINT_METADATA Orbax's own (the directory is an Orbax composite checkpoint)
      model_config.json    the `Qwen3Config` fields, so nothing else is needed to rebuild the model
      hf_files/            optional: tokenizer files, generation_config.json and the source
                           config.json of an imported HF checkpoint, copied back by `export-hf`

    save_params(model, "ckpt")             # collective on multi-host; JSON by process 0
    model = load_params("ckpt")            # single device
    model = load_params("ckpt", mesh=make_mesh(2, 2, 2))  # params sharded per their logical axes

To restore the params into a trainer's own state, use `restore_params(dir, abstract_pure)` with
the abstract (sharded) pure dict of the state being restored. `load_params` also accepts a
CheckpointManager root (it takes the latest step directory that holds `params/`) and finds
`model_config.json` in the step directory or its parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dagger_jax import paths
from dagger_jax.errors import DaggerJaxError
from dagger_jax.model import sharding
from dagger_jax.model.qwen3 import Qwen3, Qwen3Config

PARAMS_ITEM = "params"
MODEL_CONFIG_FILE = "model_config.json"
HF_FILES_DIR = "hf_files"


class CheckpointError(DaggerJaxError, ValueError):
  """A checkpoint directory is missing a file or holds something else; the message names it."""


def damaged(where: str, error: BaseException, fix: str = "") -> str:
  """One line for a checkpoint that Orbax cannot read: where, the error in the chain that names a
  file under `where` (Orbax wraps TensorStore's, which does), and `fix`."""
  chain = [error]
  while len(chain) < 5 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  named = next((e for e in reversed(chain) if where in str(e)), error)  # the root cause first
  text = " ".join(str(named).split())
  text = text if len(text) <= 300 else text[:300] + "..."
  return (f"{where}: cannot read the checkpoint, it is damaged or incomplete "
          f"({type(named).__name__}: {text}); {fix or 'restore it from a copy'}")


# ----------------------------------------------------------------------------- building a model


def abstract_model(config: Qwen3Config) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its abstract param state (shapes/dtypes only, nothing allocated)."""
  return nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))


def param_shardings(config: Qwen3Config, mesh: Mesh, rules=None) -> dict:
  """Pure dict of `NamedSharding`s, one per param, from its `logical_axes` (see sharding.py)."""
  _, state = abstract_model(config)
  return nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))


def abstract_params(config: Qwen3Config, mesh: Mesh | None = None, rules=None) -> dict:
  """Pure dict of `jax.ShapeDtypeStruct`s (with shardings when `mesh` is given)."""
  _, state = abstract_model(config)
  shapes = nnx.to_pure_dict(state)
  if mesh is None:
    return shapes
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                      param_shardings(config, mesh, rules))


def model_from_params(config: Qwen3Config, params: dict) -> Qwen3:
  """A model whose params are the arrays of `params` (a pure dict shaped like the model's)."""
  graphdef, state = abstract_model(config)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def model_from_host_arrays(config: Qwen3Config, get: Callable[[tuple[Any, ...], Any], np.ndarray],
                           mesh: Mesh | None = None, rules=None) -> Qwen3:
  """Builds a model leaf by leaf from host arrays: `get(path, abstract_leaf) -> np.ndarray`.

  `path` is the leaf's key path in the pure dict, e.g. ('layers', 0, 'attn', 'q_proj'). With a
  mesh each leaf goes straight to its shards (`jax.make_array_from_callback`: each device gets
  only its block), so a large model is never whole on one device; one leaf at a time is on host.
  """
  target = abstract_params(config, mesh, rules)

  def one(key_path, leaf):
    path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)
    host = np.asarray(get(path, leaf))
    if host.shape != leaf.shape:
      raise ValueError(f"param {'.'.join(map(str, path))}: got shape {host.shape}, "
                       f"the model needs {leaf.shape}")
    host = host.astype(leaf.dtype, copy=False)
    if mesh is None:
      return jnp.asarray(host)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: host[index])

  return model_from_params(config, jax.tree_util.tree_map_with_path(one, target))


def pure_params(model: Qwen3) -> dict:
  """The model's params as a pure dict of (possibly sharded) jax arrays."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def gather(x: jax.Array) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array as one host array; collective if multi-host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------- config JSON


def write_model_config(config: Qwen3Config, ckpt_dir: str) -> None:
  if jax.process_index() != 0:
    return
  paths.write_atomic(paths.join(ckpt_dir, MODEL_CONFIG_FILE),  # (a bucket too: dagger_jax.paths)
                     json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n")


def read_model_config(ckpt_dir: str) -> Qwen3Config:
  """`Qwen3Config` from CKPT_DIR/model_config.json (or the parent's, for a trainer step dir)."""
  candidates = [paths.join(ckpt_dir, MODEL_CONFIG_FILE),
                paths.join(paths.dirname(ckpt_dir), MODEL_CONFIG_FILE)]
  path = next((p for p in candidates if paths.isfile(p)), None)
  if path is None:
    raise CheckpointError(f"{candidates[0]}: not found (a params checkpoint keeps its model "
                          f"config there; write one with dagger_jax.model.params_io.save_params)")
  try:
    with paths.open(path, "r") as f:
      fields = json.load(f)
    return Qwen3Config(**fields)
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: not a valid model config: {e}") from None


def keep_hf_files(src_dir: str, ckpt_dir: str, names: tuple[str, ...]) -> list[str]:
  """Copies the files `names` found in `src_dir` to CKPT_DIR/hf_files; returns those copied."""
  kept = [n for n in names if os.path.isfile(os.path.join(src_dir, n))]
  if kept:
    paths.makedirs(paths.join(ckpt_dir, HF_FILES_DIR))
  for name in kept:
    src, dst = os.path.join(src_dir, name), paths.join(ckpt_dir, HF_FILES_DIR, name)
    if paths.is_remote(dst):
      paths.write_atomic(dst, paths.read_bytes(src))
    else:
      shutil.copy2(src, dst)
  return kept


def hf_files_dir(ckpt_dir: str) -> str | None:
  """CKPT_DIR/hf_files (or the parent's, for a trainer step dir), None if there is none."""
  for base in (ckpt_dir, os.path.dirname(os.path.abspath(ckpt_dir))):
    if os.path.isdir(os.path.join(base, HF_FILES_DIR)):
      return os.path.join(base, HF_FILES_DIR)
  return None


# ----------------------------------------------------------------------------- Orbax


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def resolve_params_dir(path: str) -> str:
  """The directory holding the `params` item: `path` itself or, for a CheckpointManager root,
  its latest numbered step directory that has one."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint directory")
  if os.path.isdir(os.path.join(path, PARAMS_ITEM)):
    return path
  steps = sorted((int(name) for name in os.listdir(path) if name.isdigit() and
                  os.path.isdir(os.path.join(path, name, PARAMS_ITEM))), reverse=True)
  if not steps:
    raise CheckpointError(f"{path}: holds no '{PARAMS_ITEM}' item (neither {path}/{PARAMS_ITEM} "
                          f"nor a step directory {path}/<step>/{PARAMS_ITEM})")
  return os.path.join(path, str(steps[0]))


def save_params(model: Qwen3, ckpt_dir: str) -> str:
  """Writes the model's params and config to a new directory `ckpt_dir`; returns its path.

  Collective: every process calls it with the same arguments (arrays may be sharded).
  """
  ckpt_dir = os.path.abspath(ckpt_dir)
  if os.path.exists(ckpt_dir):
    raise CheckpointError(f"{ckpt_dir}: already exists; choose a new directory")
  params = pure_params(model)
  _checkpointer().save(ckpt_dir, ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
  write_model_config(model.config, ckpt_dir)
  return ckpt_dir


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'layers.0.attn.q_proj': (64, 4, 16), ...} (int and str dict keys print alike)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


def restore_params(ckpt_dir: str, target: dict) -> dict:
  """Restores the `params` item into `target`, a pure dict of `ShapeDtypeStruct`s (with the
  shardings and dtypes wanted; they may differ from the stored dtype).

  The stored names and shapes are checked against `target` first, so a checkpoint of another
  architecture fails with the first differing param named.
  """
  params_dir = resolve_params_dir(ckpt_dir)
  item_dir = os.path.join(params_dir, PARAMS_ITEM)
  if not paths.exists(os.path.join(item_dir, "_METADATA")):  # else: a pytree mismatch, unnamed
    raise CheckpointError(f"{item_dir}/_METADATA: missing, the checkpoint is damaged or "
                          f"incomplete; restore {params_dir} from a copy")
  try:
    stored = _shapes_by_name(ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir)))
  except (OSError, ValueError, KeyError) as e:  # TensorStore: a missing manifest.ocdbt, ...
    raise CheckpointError(damaged(params_dir, e)) from e
  wanted = _shapes_by_name(target)
  for name in sorted(set(stored) | set(wanted)):
    if stored.get(name) != wanted.get(name):
      raise CheckpointError(
          f"{item_dir}: does not match the model config: param {name} is stored with shape "
          f"{stored.get(name, 'absent')}, the model needs {wanted.get(name, 'absent')}")
  args = ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)})
  try:
    return _checkpointer().restore(params_dir, args)[PARAMS_ITEM]
  except Exception as e:  # a cut or missing array file; see `damaged`
    if not isinstance(e, (OSError, ValueError, KeyError)) and type(e) is not Exception:
      raise
    raise CheckpointError(damaged(params_dir, e)) from e


def load_params(ckpt_dir: str, *, mesh: Mesh | None = None, rules=None,
                config: Qwen3Config | None = None) -> Qwen3:
  """The model saved in `ckpt_dir`; sharded over `mesh` per its params' logical axes if given.

  `config` overrides CKPT_DIR/model_config.json (e.g. to change `dtype`, or for a directory that
  has none); its architecture must match the stored params.
  """
  params_dir = resolve_params_dir(ckpt_dir)
  config = read_model_config(params_dir) if config is None else config
  target = abstract_params(config, mesh, rules)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), target)
  return model_from_params(config, restore_params(params_dir, target))
