"""One small Orbax wrapper: named items, keep the last N, asynchronous saves, sharded restore.

A checkpoint holds `params` and `opt_state` (arrays, restored into the abstract sharded state the
trainer builds) and `meta` (JSON: `step`, `round`, `data_cursor`, `rng` as a list of uint32):

    ckpt = Checkpointer(f"{workdir}/checkpoints/round_001", keep=3)
    ckpt.save(TrainState(...), data_cursor=reader.state(), round_index=1)   # returns at once
    state, meta = ckpt.restore(abstract_state)       # latest; arrays land with their shardings
    reader.restore(meta["data_cursor"])

Orbax writes into a temporary directory and renames it when complete, so a killed process
leaves either a whole checkpoint or none.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from dagger_jax.model.params_io import CheckpointError

ARRAY_ITEMS = ("params", "opt_state")


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: Any, *, data_cursor: Any, round_index: int, force: bool = False) -> bool:
    """Starts saving `state` (a TrainState) under its step; returns whether a save started."""
    step = int(state.step)
    items = {name: ocp.args.StandardSave(getattr(state, name)) for name in ARRAY_ITEMS}
    meta = {"step": step, "round": int(round_index), "data_cursor": data_cursor,
            "rng": np.asarray(state.rng).tolist()}
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
    restored = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
    return {name: restored[name] for name in items}, dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
