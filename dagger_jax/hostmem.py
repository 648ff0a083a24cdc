"""Host allocator settings: reuse freed host memory instead of faulting in fresh pages every step.

XLA:CPU allocates each execution's buffers anew: for the `benchmarks/train_step.py` step that is
hundreds of MiB, mostly in blocks above glibc's mmap threshold (at most 32 MiB). glibc serves such
blocks with a fresh `mmap` and returns them with `munmap` on free, so every step the kernel faults
in and zeroes every page again: measured on the 2-core CPU machine, 170k minor page faults and
0.30-0.36 s of kernel time per ~1.0 s training step (transformers' PyTorch step in the same process:
42k faults, 0.14 s).

`keep_host_memory()` tells glibc (`mallopt`) to serve every size from the main arena's heap and to
never hand freed memory back, so once the heap has grown to the process's peak (a few steps) the
same pages are reused: 0 faults, and the step takes ~0.81 s instead of ~1.0 s (PyTorch's ~0.97
-> ~0.84 s in the same process). The cost: the process keeps its peak heap (RSS does not shrink
after a peak) and all threads share one arena (allocation-heavy threads may contend; XLA and
PyTorch allocate few, large blocks).

Call it before the JAX backend starts (before the first `jax.devices()` or computation): a thread
keeps the arena it first allocated from, and XLA's worker threads start with the backend. The
`dagger-jax` CLI calls it first thing; library users call it themselves. It does nothing (and
returns False) where the C library is not glibc, or when the environment sets
`DAGGER_JAX_MALLOC=system`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV_VAR = "DAGGER_JAX_MALLOC"

_applied = False


def keep_host_memory() -> bool:
  """Makes glibc reuse freed host memory (see the module docstring); True if the settings hold.

  Idempotent. Raises RuntimeError if glibc refuses a setting (it should not on Linux/glibc).
  """
  global _applied
  if _applied:
    return True
  if os.environ.get(ENV_VAR, "").lower() == "system":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  settings = ((_M_ARENA_MAX, 1),          # one arena: big blocks are never forced into mmap
              (_M_MMAP_MAX, 0),           # no block is served by mmap (so none is munmapped)
              (_M_TRIM_THRESHOLD, 2**31 - 1))  # never return the heap's top to the kernel
  for param, value in settings:
    if libc.mallopt(param, value) != 1:
      raise RuntimeError(f"glibc mallopt({param}, {value}) failed; set {ENV_VAR}=system to run "
                         f"with the default allocator")
  _applied = True
  return True
