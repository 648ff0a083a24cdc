"""`DiskGuard`: keeps the host-side files of a sandbox under `config.env.disk_mb`.

A bubblewrap sandbox writes its task tree and private /tmp straight into host directories, which
no filesystem quota bounds for an unprivileged user. Three layers keep an agent from filling the
host's disk (the corpus entries `fill_disk_*` in tests/hostile_corpus.py try each way round):

- RLIMIT_FSIZE (`file_size_kb`): no single file grows past the limit (`dd`, `yes > f`);
- `fallocate(2)` fails (seccomp.py), so space is only taken by writing it, at disk speed;
- this watchdog, polled while a command runs: when the sandbox's files pass the limit the
  command is killed, and until files are deleted every later command runs with a file size limit
  of 0 (reads and `rm` work, writes fail), so the overshoot is what one command writes between
  two polls.

Walking a tree to size it costs ~10 ms per thousand files, too much to do every poll of every
sandbox. So the guard watches the filesystems' used space (statvfs, a few microseconds) and walks
only when the growth since its last exact size could have crossed the limit:

    known + (used_now - used_at_last_walk) > limit   ->   known = walk(); baseline = used_now

Growth of other processes on the same filesystem can trigger a walk, never a kill: the kill
follows the walk's exact figure.

On a tmpfs (the demo's `env.scratch_dir=/dev/shm`) files are memory, charged to the sandbox's
memory cgroup, and memory that files hold cannot be reclaimed: files up to the memory limit would
leave no room for the `rm` that frees them (every new process is OOM-killed, and the episode can
do nothing more). There the limit is `min(disk_mb, memory_mb / 4)` (`effective_limit_mb`), which
leaves room for a poll's overshoot (tmpfs takes writes at ~1.5 GB/s) and for the `rm`.
"""

from __future__ import annotations

import os
import threading


def tree_bytes(paths: list[str]) -> int:
  """Bytes allocated by the files under `paths` (st_blocks, so sparse files count what they
  use), each inode once, symlinks not followed."""
  seen: set[tuple[int, int]] = set()
  total = 0
  stack = list(paths)
  while stack:
    path = stack.pop()
    try:
      with os.scandir(path) as it:
        entries = list(it)
    except OSError:
      continue
    for e in entries:
      try:
        st = e.stat(follow_symlinks=False)
      except OSError:
        continue
      key = (st.st_dev, st.st_ino)
      if key in seen:
        continue
      seen.add(key)
      total += st.st_blocks * 512
      if e.is_dir(follow_symlinks=False):
        stack.append(e.path)
  return total


def _fs_used(paths: list[str]) -> int:
  """Used bytes of the distinct filesystems holding `paths`."""
  used, devs = 0, set()
  for p in paths:
    try:
      dev = os.stat(p).st_dev
      if dev in devs:
        continue
      devs.add(dev)
      s = os.statvfs(p)
    except OSError:
      continue
    used += (s.f_blocks - s.f_bfree) * s.f_frsize
  return used


def on_tmpfs(path: str) -> bool:
  """Whether `path` lies on a tmpfs (from /proc/self/mountinfo: the longest mount point that
  contains it)."""
  real, best, fstype = os.path.realpath(path), "", ""
  try:
    with open("/proc/self/mountinfo") as f:
      for line in f:
        left, _, right = line.partition(" - ")
        point = left.split()[4]
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
          best, fstype = point, right.split()[0]
  except OSError:
    return False
  return fstype == "tmpfs"


def effective_limit_mb(disk_mb: int, memory_mb: int, paths: list[str]) -> int:
  """`disk_mb`, or at most a quarter of `memory_mb` when a path is on a tmpfs (module
  docstring)."""
  if any(on_tmpfs(p) for p in paths):
    return max(1, min(int(disk_mb), int(memory_mb) // 4))
  return int(disk_mb)


class DiskGuard:
  """The size of a sandbox's host-side files against `limit_mb` (see the module docstring)."""

  def __init__(self, paths: list[str], limit_mb: int):
    self.paths = list(paths)
    self.limit = int(limit_mb) * 1024 * 1024
    self._lock = threading.Lock()
    self.known = tree_bytes(self.paths)
    self._baseline = _fs_used(self.paths)

  @property
  def file_size_kb(self) -> int:
    """RLIMIT_FSIZE for the next command, in the 1024-byte blocks of bash's `ulimit -f`:
    the whole limit, or 0 while the files are over it."""
    return 0 if self.known > self.limit else self.limit // 1024

  def over(self) -> bool:
    """Whether the files are over the limit now (walks the tree only when they may be)."""
    with self._lock:
      used = _fs_used(self.paths)
      if self.known + max(0, used - self._baseline) > self.limit:
        self.known = tree_bytes(self.paths)
        self._baseline = used
      return self.known > self.limit

  def note(self, killed: bool) -> str:
    """The line that ends the output of a command after which the files are over the limit."""
    return note(self.known, self.limit, killed)


def note(used: int, limit: int, killed: bool) -> str:
  """What the agent reads after a command that left the sandbox's files over the disk limit."""
  what = "the command was killed: " if killed else ""
  return (f"\n[sandbox] {what}the sandbox's files take {used / 2**20:.0f} MB, over its disk "
          f"limit of {limit / 2**20:.0f} MB (config.env.disk_mb; on a tmpfs at most a quarter of "
          "config.env.memory_mb). Until files are deleted, "
          "commands cannot write files (file size limit 0).\n")
