"""Named crash points: a process SIGKILLs itself at a chosen moment, for fault-injection tests.

    DAGGER_JAX_FAULT_POINT=train_step:7 dagger-jax dagger ...    # dies at its 7th train step
    DAGGER_JAX_FAULT_POINT=shard_write:2,evaluate:1 ...          # whichever comes first

`point(name)` is placed at a few moments of a run that a crash must survive; with the variable
set, the process kills itself with SIGKILL (no `finally`, no flush, no atexit: what a power cut or
the OOM killer does) the `count`-th time it reaches `name`, after one line on stderr
(`dagger-jax: fault point NAME:COUNT reached, SIGKILL`) so that a harness knows where it died.
Unset (always, outside tests), `point` is one test of an empty dict. The variable is read once,
at import. `benchmarks/fault_injection.py` and `tests/test_fault_injection.py` use it.

The points (where they are and what a kill there leaves behind):

    collect_turn     each lockstep turn of a collection wave (training or evaluation episodes):
                     sandboxes, the student and the teacher are busy; the wave is lost
    collect_write    a wave's episodes are done, before they are appended to the round's file
    shard_render     before each trajectory of a round is rendered into rows
    shard_write      after each field file of a shard lands in its temporary directory
    train_step       after each optimizer step, before its checkpoint (if any) starts
    checkpoint_save  just after an asynchronous checkpoint save starts (Orbax is still writing)
    evaluate         before a round's evaluation collects its episodes
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "DAGGER_JAX_FAULT_POINT"
POINTS = ("collect_turn", "collect_write", "shard_render", "shard_write", "train_step",
          "checkpoint_save", "evaluate")


def parse(spec: str) -> dict[str, int]:
  """`"name:count,name:count"` -> {name: count}; names must be in `POINTS`, counts >= 1.

  >>> parse("train_step:7, evaluate:1")
  {'train_step': 7, 'evaluate': 1}
  """
  armed = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, count = item.partition(":")
    if name not in POINTS or not count.isdigit() or int(count) < 1:
      raise ValueError(f"{ENV}={spec!r}: {item!r} is not NAME:COUNT with NAME one of "
                       f"{', '.join(POINTS)} and COUNT >= 1")
    armed[name] = int(count)
  return armed


_ARMED = parse(os.environ.get(ENV, ""))
_SEEN: dict[str, int] = {}


def point(name: str) -> None:
  """SIGKILLs this process if `name` is armed and this is its `count`-th arrival here."""
  if not _ARMED or name not in _ARMED:
    return
  _SEEN[name] = _SEEN.get(name, 0) + 1
  if _SEEN[name] == _ARMED[name]:
    sys.stderr.write(f"dagger-jax: fault point {name}:{_ARMED[name]} reached, SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
