"""In-memory weight sync: the trainer's params, resharded device to device onto the rollout mesh.

The in-process sampler may run on a mesh of its own (`config.rollout.mesh`, e.g.
"data=4,tensor=2": batch rows over `data`, heads / MLP / vocabulary over `tensor`), while the
trainer shards params ZeRO-3 style over `config.mesh`. Each round the trained params move to the
rollout layout in device memory (as Tunix syncs its trainer and rollout models), with no
checkpoint round trip:

    mesh = rollout_mesh(config)                   # config.rollout.mesh, "" = the training mesh
    student = reshard_model(trained_model, mesh)  # params on `mesh` per the logical rules
    with sampling_mesh(student):                  # jax.set_mesh(mesh): batch rows, activations
      result = sampler.generate(student, prompts, max_new_tokens=64)  # and KV cache over `data`

How the bytes move. `jax.device_put` is the obvious tool, but between two NamedShardings over the
same devices whose blocks differ (fsdp=8 -> data=4,tensor=2) it gathers each whole array to the
host and scatters it again (`jax._src.array.shard_sharded_device_array_slow_path`). So each param
is resharded by a compiled identity whose output sharding is the target: XLA moves the blocks with
collectives, device to device. A direct identity can still replicate a whole leaf on every device
first (XLA's "involuntary full rematerialization", e.g. rows over 8 devices -> columns over 2
devices x 4 replicas), so where the target replicates over some mesh axes the leaf first goes,
by an all-to-all, to the target's blocks split further over those axes, then by an all-gather to
the target (the idea of Tunix's intermediate sharding). That two-program plan is kept when its
per-device scratch (XLA's memory analysis) fits in one target block, else the plan with the
smaller scratch; plans are compiled once per (shape, dtype, source, target). Arrays already
placed as the target asks are kept (shared buffers, unless `copy=True`); params on one device
are sliced there and each block copied to its device. Nothing is donated: the source stays valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dagger_jax.errors import ConfigError, DaggerJaxError
from dagger_jax.model import params_io, sharding
from dagger_jax.model.qwen3 import Qwen3

_log = logging.getLogger(__name__)

_ITEM = re.compile(r"^\s*([a-z_]+)\s*=\s*(-?\d+)\s*$")


class ReshardError(DaggerJaxError, ValueError):
  """Params cannot be moved onto the requested shardings; the message says why."""


# ----------------------------------------------------------------------------- the rollout mesh


def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
  """"data=4,tensor=2" -> {'data': 4, 'fsdp': 1, 'tensor': 2} for `num_devices` devices
  (default: all of JAX's).

  Axes are `sharding.MESH_AXES`. An axis not named is 1, except `data`, which takes the devices
  left over (as `config.mesh.data=-1` does), and one size may be -1 to do the same. The sizes must
  use every device: "tensor=2" on 8 devices is data=4,tensor=2; "tensor=3" is an error.

  >>> parse_mesh("data=4,tensor=2", 8)
  {'data': 4, 'fsdp': 1, 'tensor': 2}
  >>> parse_mesh("tensor=2", 8)  # data takes the rest
  {'data': 4, 'fsdp': 1, 'tensor': 2}
  >>> parse_mesh("fsdp=-1", 8)
  {'data': 1, 'fsdp': 8, 'tensor': 1}
  """
  n = len(jax.devices()) if num_devices is None else int(num_devices)
  where = f"config.rollout.mesh={spec!r}"
  how = ("write comma-separated AXIS=SIZE items over the axes data, fsdp, tensor, e.g. "
         "'data=4,tensor=2' ('' = the training mesh)")
  if not isinstance(spec, str) or not spec.strip():
    raise ConfigError(f"{where}: {'empty' if isinstance(spec, str) else 'not a string'}; {how}")
  sizes: dict[str, int] = {}
  for item in spec.split(","):
    match = _ITEM.match(item)
    if match is None:
      raise ConfigError(f"{where}: {item.strip()!r} is not AXIS=SIZE; {how}")
    axis, size = match.group(1), int(match.group(2))
    if axis not in sharding.MESH_AXES:
      raise ConfigError(f"{where}: unknown axis {axis!r}; {how}")
    if axis in sizes:
      raise ConfigError(f"{where}: axis {axis!r} is given twice")
    if size == 0 or size < -1:
      raise ConfigError(f"{where}: {axis}={size}: a size is a positive int, or -1 to take the "
                        f"devices left over")
    sizes[axis] = size
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"{where}: at most one axis may be -1 (fill), got {fill}")
  if not fill and "data" not in sizes:
    sizes["data"], fill = -1, ["data"]
  known = math.prod(s for s in sizes.values() if s != -1)
  if n % known:
    raise ConfigError(f"{where}: the sizes multiply to {known}, which does not divide the {n} "
                      f"devices JAX sees")
  if fill:
    sizes[fill[0]] = n // known
  elif known != n:
    raise ConfigError(f"{where}: the sizes multiply to {known}, but the mesh must span all {n} "
                      f"devices JAX sees (leave `data` out, or set one axis to -1, to fill)")
  return {a: sizes.get(a, 1) for a in sharding.MESH_AXES}


def rollout_mesh(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh the in-process sampler runs on: `config.rollout.mesh`, or with "" the training
  mesh (`config.mesh`, as `trainer.mesh_from_config` builds it)."""
  spec = str(config.rollout.get("mesh", "") or "")
  if not spec.strip():
    m = config.mesh
    return sharding.make_mesh(m.data, m.fsdp, m.tensor, devices)
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  return sharding.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices)


def mesh_spec(mesh: Mesh) -> str:
  """'data=4,fsdp=1,tensor=2' (for logs)."""
  return ",".join(f"{a}={s}" for a, s in mesh.shape.items())


# ----------------------------------------------------------------------------- moving params


@dataclasses.dataclass(frozen=True)
class ReshardStats:
  """What one `reshard_params` call did.

  bytes_total: the params' size (each array counted once).
  bytes_moved: the bytes that had to reach a device which did not hold them: for each device,
    its target block minus the part of it that device already held (a lower bound on traffic).
  bytes_kept: arrays already placed as asked, kept as they were (no program ran for them).
  temp_bytes: the largest per-device scratch one resharding program needed (XLA's estimate; 0
    when none ran or the backend has no memory analysis).
  seconds: wall time until every target array was ready (the first call includes compiling).
  """
  leaves: int
  bytes_total: int
  bytes_moved: int
  bytes_kept: int
  temp_bytes: int
  seconds: float

  def summary(self) -> str:
    return (f"{self.leaves} arrays, {self.bytes_total / 2**20:.1f} MiB, "
            f"{self.bytes_moved / 2**20:.1f} MiB moved between devices, "
            f"{self.bytes_kept / 2**20:.1f} MiB kept in place, scratch "
            f"{self.temp_bytes / 2**20:.1f} MiB/device, {self.seconds:.3f} s")


def _identity(x):
  return x


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(d)[:2] for s, d in zip(index, shape))


def _volume(box) -> int:
  return math.prod(max(0, hi - lo) for lo, hi in box)


@functools.lru_cache(maxsize=1024)
def _moved_elements(shape: tuple[int, ...], src: Any, dst: Any) -> int:
  """Elements of the target blocks that their devices do not already hold under `src`."""
  src_map = src.devices_indices_map(shape)
  moved = 0
  for device, index in dst.devices_indices_map(shape).items():
    want = _box(index, shape)
    have = _box(src_map[device], shape) if device in src_map else tuple((0, 0) for _ in shape)
    both = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(want, have))
    moved += _volume(want) - _volume(both)
  return moved


def _spec_axes(entry) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _intermediate(shape: tuple[int, ...], src: NamedSharding,
                  dst: NamedSharding) -> NamedSharding | None:
  """The target's blocks split further over the mesh axes the target replicates on, or None.

  Reaching it from a sharded source is an all-to-all (every device holds 1/N of the array before
  and after); the target is then an all-gather over the added axes. Each added axis goes minor
  on a dimension it divides, preferring dimensions the source shards most.
  """
  if src.is_fully_replicated:
    return None  # every device holds everything: a direct reshard only slices
  spec = [list(_spec_axes(e)) for e in tuple(dst.spec) + (None,) * (len(shape) - len(dst.spec))]
  used = {a for axes in spec for a in axes}
  free = [a for a in dst.mesh.axis_names if a not in used and dst.mesh.shape[a] > 1]
  if not free:
    return None
  src_spec = tuple(src.spec) + (None,) * (len(shape) - len(src.spec))
  src_split = [math.prod(src.mesh.shape[a] for a in _spec_axes(e)) for e in src_spec]
  order = sorted(range(len(shape)), key=lambda i: -src_split[i])
  added = False
  for axis in free:
    for i in order:
      split = math.prod(dst.mesh.shape[a] for a in spec[i]) * dst.mesh.shape[axis]
      if shape[i] % split == 0:
        spec[i].append(axis)
        added = True
        break
  if not added:
    return None
  mid = NamedSharding(dst.mesh, P(*[None if not a else a[0] if len(a) == 1 else tuple(a)
                                    for a in spec]), memory_kind=dst.memory_kind)
  return None if mid.is_equivalent_to(dst, len(shape)) else mid


def _temp_bytes(compiled) -> float:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # a backend without memory analysis  # noqa: BLE001
    stats = None
  return math.inf if stats is None else float(stats.temp_size_in_bytes)


@functools.lru_cache(maxsize=512)
def _plan(shape: tuple[int, ...], dtype: np.dtype, src: NamedSharding,
          dst: NamedSharding) -> tuple[tuple[Any, ...], int]:
  """Compiled identities that take an array from `src` to `dst`, and their largest scratch."""

  def compile_chain(targets):
    steps, here = [], src
    for target in targets:
      aval = jax.ShapeDtypeStruct(shape, dtype, sharding=here)
      steps.append(jax.jit(_identity, out_shardings=target).lower(aval).compile())
      here = target
    return tuple(steps), max(_temp_bytes(s) for s in steps)

  block = math.prod(dst.shard_shape(shape)) * np.dtype(dtype).itemsize
  mid = _intermediate(shape, src, dst)
  candidates = [[mid, dst], [dst]] if mid is not None else [[dst]]
  best = None
  for targets in candidates:  # the split plan first: compiling a direct one that replicates
    steps, temp = compile_chain(targets)  # makes XLA warn, even when it is not used
    if best is None or temp < best[1]:
      best = (steps, temp)
    if temp <= block:
      break
  return best[0], int(best[1]) if math.isfinite(best[1]) else 0


def _reshard_leaf(x: jax.Array, dst: NamedSharding, copy: bool) -> tuple[jax.Array, bool, int]:
  """-> (x on `dst`, whether it was kept in place, the program's scratch bytes)."""
  src = x.sharding
  if src.is_equivalent_to(dst, x.ndim):  # same blocks on the same devices
    return jax.device_put(x, dst, may_alias=not copy), not copy, 0
  if src.device_set != dst.device_set:
    if len(src.device_set) == 1 and x.is_fully_addressable:
      return jax.device_put(x, dst), False, 0  # sliced on its device, blocks copied out
    raise ReshardError(
        f"cannot reshard an array on devices {sorted(d.id for d in src.device_set)} onto "
        f"devices {sorted(d.id for d in dst.device_set)}: the rollout mesh must use the devices "
        f"of the training mesh (or the params must be on one device)")
  if (not isinstance(src, NamedSharding)
      or tuple(src.mesh.devices.flat) != tuple(dst.mesh.devices.flat)):
    return jax.device_put(x, dst), False, 0  # another device order: JAX reorders, then jits
  steps, temp = _plan(tuple(x.shape), np.dtype(x.dtype), src, dst)
  for step in steps:
    x = step(x)
  return x, False, temp


def reshard_params(params: Any, shardings: Any, *, copy: bool = False) -> tuple[Any, ReshardStats]:
  """`params` (a pytree of jax.Arrays) placed as `shardings` (a matching pytree of
  NamedShardings), moved device to device; returns (new params, what moved).

  The source arrays are neither donated nor changed. With `copy=False` an array already placed
  as its target asks is returned as is (the result shares its buffers: if the trainer later
  donates them, e.g. its next `Trainer.step`, the result dies with them); `copy=True` copies it.
  """
  start = time.perf_counter()
  leaves, treedef = jax.tree.flatten(params)
  targets = treedef.flatten_up_to(shardings)
  out, total, moved, kept, temp = [], 0, 0, 0, 0
  for x, dst in zip(leaves, targets):
    if not isinstance(x, jax.Array):
      raise ReshardError(f"reshard_params: expected jax.Arrays, got a {type(x).__name__} (use "
                         f"jax.device_put or params_io.model_from_host_arrays for host arrays)")
    if not isinstance(dst, NamedSharding):
      raise ReshardError(f"reshard_params: expected NamedShardings, got a {type(dst).__name__}")
    size = x.size * x.dtype.itemsize
    total += size
    moved += _moved_elements(tuple(x.shape), x.sharding, dst) * x.dtype.itemsize
    y, in_place, leaf_temp = _reshard_leaf(x, dst, copy)
    kept += size if in_place else 0
    temp = max(temp, leaf_temp)
    out.append(y)
  out = jax.block_until_ready(out)
  stats = ReshardStats(len(leaves), total, moved, kept, temp, time.perf_counter() - start)
  return jax.tree.unflatten(treedef, out), stats


def reshard_model(model: Qwen3, mesh: Mesh, rules=None, *, copy: bool = False,
                  log: Callable[[str], None] | None = None) -> Qwen3:
  """A new model with `model`'s params on `mesh`, sharded by their logical axes under `rules`
  (default `sharding.RULES`); see `reshard_params` for `copy`. `model` stays usable. The
  transfer's `ReshardStats.summary()` goes to `log` (default: this module's logger, INFO)."""
  shardings = params_io.param_shardings(model.config, mesh, rules)
  params, stats = reshard_params(params_io.pure_params(model), shardings, copy=copy)
  (log or _log.info)(f"resharded params onto {mesh_spec(mesh)}: {stats.summary()}")
  return params_io.model_from_params(model.config, params)


# ----------------------------------------------------------------------------- sampling on it


def params_mesh(model: Qwen3) -> Mesh | None:
  """The mesh every param of `model` lives on, or None (one device, or mixed placements)."""
  leaves = jax.tree.leaves(params_io.pure_params(model))
  meshes = {getattr(x.sharding, "mesh", None) for x in leaves}
  mesh = meshes.pop() if len(meshes) == 1 else None
  if isinstance(mesh, Mesh) and set(sharding.MESH_AXES) <= set(mesh.axis_names):
    return mesh
  return None


def sampling_mesh(model: Qwen3) -> contextlib.AbstractContextManager:
  """`jax.set_mesh(params_mesh(model))` (a no-op context without one): what `sampler.generate`
  needs to split its batch rows, activations and KV cache over `data` (and the cache's kv heads
  over `tensor`). Without it the sampler still runs correctly on a resharded model, but every
  `data` replica computes the whole batch.

      with sampling_mesh(student):
        result = sampler.generate(student, prompts, 64)
  """
  mesh = params_mesh(model)
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
