"""`Cgroup`: one cgroup per bubblewrap sandbox with pids/memory/cpu limits (v2, or v1 controllers).

Used when the cgroup tree is writable (root, or a delegated cgroup v2); otherwise bubblewrap's
limits fall back to rlimits. Cgroups left by SIGKILLed processes are removed by `reap_stale`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid

from dagger_jax.envs.sandbox.base import SandboxLimits
from dagger_jax.envs.sandbox.process import reap_stale

log = logging.getLogger(__name__)

_OPTIONAL_CGROUP_FILES = ("memory.swap.max", "memory.memsw.limit_in_bytes")


class Cgroup:
  """One cgroup per sandbox with pids/memory/cpu limits (cgroup v2, or v1 controllers).

  `create` returns None when this process may not create cgroups (then rlimits are used).
  Processes join by writing their pid to every `procs_files` entry before exec'ing bwrap.
  """

  def __init__(self, dirs: list[str]):
    self.dirs = dirs
    self.procs_files = [os.path.join(d, "cgroup.procs") for d in dirs]

  @classmethod
  def create(cls, limits: SandboxLimits) -> Cgroup | None:
    name = f"dagger-jax-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    period = 100_000
    quota = max(1000, int(limits.cpus * period))
    mem = str(limits.memory_mb * 1024 * 1024)
    own = cls._own_paths()
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # unified (v2) hierarchy
      plan = [("/sys/fs/cgroup", own.get("", "/"), {
          "pids.max": str(limits.pids), "memory.max": mem, "memory.swap.max": "0",
          "cpu.max": f"{quota} {period}"})]
    else:
      plan = [(f"/sys/fs/cgroup/{ctl}", own.get(ctl, "/"), files) for ctl, files in (
          ("pids", {"pids.max": str(limits.pids)}),
          ("memory", {"memory.limit_in_bytes": mem, "memory.memsw.limit_in_bytes": mem}),
          ("cpu", {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": str(quota)}))]
    made: list[str] = []
    try:
      for mount, own_path, files in plan:
        parent = os.path.join(mount, own_path.lstrip("/"))
        reap_stale(parent, rmtree=False)
        d = os.path.join(parent, name)
        os.mkdir(d)
        made.append(d)
        for fname, value in files.items():
          if fname in _OPTIONAL_CGROUP_FILES and not os.path.exists(os.path.join(d, fname)):
            continue  # no swap accounting on this kernel
          with open(os.path.join(d, fname), "w") as f:
            f.write(value)
    except OSError as e:
      log.info("no writable cgroups (%s); bubblewrap limits fall back to rlimits", e)
      for d in reversed(made):
        try:
          os.rmdir(d)
        except OSError:
          pass
      return None
    return cls(made)

  @staticmethod
  def _own_paths() -> dict[str, str]:
    """controller -> this process's cgroup path ('' key for v2), from /proc/self/cgroup."""
    out = {}
    with open("/proc/self/cgroup") as f:
      for line in f:
        _, ctls, path = line.rstrip("\n").split(":", 2)
        for ctl in ctls.split(",") if ctls else [""]:
          out[ctl] = path
    return out

  def kill_all(self) -> None:
    for procs in self.procs_files:
      try:
        with open(procs) as f:
          pids = [int(p) for p in f.read().split()]
      except OSError:
        continue
      for pid in pids:
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass

  def remove(self) -> None:
    for _ in range(50):
      self.kill_all()
      left = []
      for d in self.dirs:
        try:
          os.rmdir(d)
        except FileNotFoundError:
          pass
        except OSError:
          left.append(d)
      self.dirs = left
      self.procs_files = [os.path.join(d, "cgroup.procs") for d in left]
      if not left:
        return
      time.sleep(0.02)
    log.warning("could not remove cgroups %s", self.dirs)
