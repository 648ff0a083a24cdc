"""One small Orbax wrapper: named items, keep the last N, asynchronous saves, sharded restore.

A checkpoint holds `params` and `opt_state` (arrays, restored into the abstract sharded state the
trainer builds) and `meta` (JSON: `step`, `round`, `data_cursor`, `rng` as a list of uint32, and,
when given, `history`: the training rows logged up to that step):

    ckpt = Checkpointer(f"{workdir}/checkpoints/round_001", keep=3)
    ckpt.save(TrainState(...), data_cursor=reader.state(), round_index=1)   # returns at once
    state, meta = ckpt.restore(abstract_state)       # latest; arrays land with their shardings
    reader.restore(meta["data_cursor"])

Orbax writes into a temporary directory and renames it when complete, so a killed process
leaves either a whole checkpoint or none; on `gs://` (no atomic rename) it writes in place and
marks a complete step with `commit_success.txt`. The directory goes through `dagger_jax.paths`
(a bucket's URI stays a URI). Multi-host: every process calls `save` and writes its own array
shards (`ocdbt.process_N`); Orbax's primary host (process 0) writes the metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from dagger_jax import paths
from dagger_jax.model.params_io import CheckpointError, damaged

ARRAY_ITEMS = ("params", "opt_state")


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = paths.abspath(directory)  # (os.path.abspath would mangle gs://)
    # cleanup_tmp_directories: a process killed during a save leaves Orbax's temporary
    # directory (`<step>.orbax-checkpoint-tmp`); it is never a checkpoint (Orbax lists and
    # restores finished steps only), and goes here rather than when that step is saved again.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state: Any, *, data_cursor: Any, round_index: int, force: bool = False,
           history: list[dict] | None = None) -> bool:
    """Starts saving `state` (a TrainState) under its step; returns whether a save started.
    `history` (the rows logged so far this round, JSON) goes into meta, so that a round resumed
    from its last checkpoint still reports its logged loss."""
    step = int(state.step)
    items = {name: ocp.args.StandardSave(getattr(state, name)) for name in ARRAY_ITEMS}
    meta = {"step": step, "round": int(round_index), "data_cursor": data_cursor,
            "rng": np.asarray(state.rng).tolist()}
    if history is not None:  # copied now: the caller goes on appending while Orbax writes
      meta["history"] = list(history)
    return self._manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items),
                              force=force)

  def restore(self, abstract_state: Any, step: int | None = None,
              items: tuple[str, ...] = ARRAY_ITEMS) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores `items` (default: all array items) of `step` (default: the latest) into the
    shapes, dtypes and shardings of `abstract_state`; returns (arrays by item name, meta)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    args = {name: ocp.args.StandardRestore(getattr(abstract_state, name)) for name in items}
    where = f"{self.directory}/{step}"
    fix = f"delete {where} to resume from the step before it, or restore it from a copy"
    for name in ("meta", *items):  # a missing index file reads as a pytree mismatch otherwise
      index = f"{where}/{name}/{'metadata' if name == 'meta' else '_METADATA'}"
      if not paths.exists(index):
        raise CheckpointError(f"{index}: missing, the checkpoint is damaged or incomplete; {fix}")
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
    except Exception as e:
      # A missing or cut file surfaces as FileNotFoundError, ValueError (TensorStore) or a bare
      # Exception (Orbax's array read); anything else is a bug and keeps its traceback.
      if not isinstance(e, (OSError, ValueError, KeyError)) and type(e) is not Exception:
        raise
      raise CheckpointError(damaged(where, e, fix)) from e
    meta = restored["meta"]
    missing = [k for k in ("step", "round", "data_cursor", "rng")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
      raise CheckpointError(f"{where}/meta: no {', '.join(missing)}: the checkpoint is damaged; "
                            f"{fix}")
    return {name: restored[name] for name in items}, dict(meta)

  def meta(self, step: int | None = None) -> dict[str, Any]:
    """The meta item alone of `step` (default: the latest), no arrays read."""
    return self.restore(None, step, items=())[1]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
