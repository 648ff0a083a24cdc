"""Sharding is data: logical axis names on parameters, one rule table to mesh axes.

Every parameter of the student carries `logical_axes` metadata (e.g. `('embed', 'mlp')`).
`RULES` maps each logical name to mesh axes of the mesh `('data', 'fsdp', 'tensor')`:

    embed     -> fsdp      parameters are fully sharded along the model dimension (ZeRO-3 style)
    mlp/heads -> tensor    Megatron-style tensor parallelism inside blocks
    batch     -> (data, fsdp)   activations: the batch is split over both data axes

Example (a 2x2x2 mesh): the MLP up-projection `('embed', 'mlp')` of shape [256, 768] becomes
`PartitionSpec('fsdp', 'tensor')`: each device holds a [128, 384] block.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dagger_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "norm": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh: sizes {sizes}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"config.mesh: sizes {sizes} do not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} needs "
                      f"{int(np.prod(sizes))} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules=None) -> P:
  """('embed', 'mlp') -> P('fsdp', 'tensor') under `rules` (default RULES)."""
  rules = RULES if rules is None else rules
  if logical_axes is None:
    return P()
  used: set[str] = set()
  out = []
  for name in logical_axes:
    axes = rules.get(name) if name is not None else None
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes_t = tuple(a for a in axes_t if a not in used)  # a mesh axis may shard one dim only
    used.update(axes_t)
    out.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
  return P(*out)


def _fits(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
  """Drops mesh axes that do not divide a dimension (e.g. 2 kv heads on a tensor axis of 4)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in axes_t])) if axes_t else 1
    out.append(axes if dim % size == 0 else None)
  return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None) -> Any:
  """NamedShardings for every leaf of an (abstract) nnx.State, from its `logical_axes` metadata.

  Leaves without logical axes (step counters, RNG keys, optimizer scalars) are replicated.
  """

  def one(variable):
    logical = variable.get_metadata().get("logical_axes") if isinstance(
        variable, nnx.Variable) else None
    value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    shape = getattr(value, "shape", ())
    spec = _fits(shape, logical_to_spec(logical, rules), mesh) if logical else P()
    sharding = NamedSharding(mesh, spec)
    return variable.replace(sharding) if isinstance(variable, nnx.Variable) else sharding

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=None) -> jax.Array:
  """Activation sharding hint under the mesh set by `jax.set_mesh`; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  spec = _fits(x.shape, logical_to_spec(logical_axes, rules), mesh)
  return jax.lax.with_sharding_constraint(x, spec)
