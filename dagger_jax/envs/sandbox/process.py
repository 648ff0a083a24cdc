"""Host-side process plumbing the sandboxes share: output capture, process trees, stale state.

- `OutputCap`: incremental UTF-8 decoding of a command's output, head + tail kept past the cap;
  `readable`, `read_into` and `drain_to_eof` feed it from a descriptor.
- `run_process`: one command in a new session, its whole process group killed at the deadline.
- `reap_stale`: removes the state dirs, task checkouts and cgroups of SIGKILLed processes.
"""

from __future__ import annotations

import codecs
import collections
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import time

from dagger_jax.envs.sandbox.base import ExecResult

log = logging.getLogger(__name__)


class OutputCap:
  """Keeps the first and last `limit // 2` characters of a byte stream once it exceeds `limit`.

  >>> cap = OutputCap(limit=6); cap.feed(b"abcdefghij"); cap.result()
  ('abchij', 4)
  """

  def __init__(self, limit: int):
    self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    self._limit = limit
    self._head: list[str] = []
    self._head_len = 0
    self._tail: collections.deque[str] = collections.deque()
    self._tail_len = 0
    self._total = 0

  def feed(self, data: bytes, final: bool = False) -> None:
    text = self._decoder.decode(data, final)
    if not text:
      return
    self._total += len(text)
    if self._head_len < self._limit:  # until the cap is reached everything goes to the head
      take = text[:self._limit - self._head_len]
      self._head.append(take)
      self._head_len += len(take)
      text = text[len(take):]
    if text:
      self._tail.append(text)
      self._tail_len += len(text)
      while self._tail_len - len(self._tail[0]) >= self._limit:  # keep >= limit chars of tail
        self._tail_len -= len(self._tail.popleft())

  def result(self) -> tuple[str, int]:
    """(output, elided_chars)."""
    self.feed(b"", final=True)
    head = "".join(self._head)
    tail = "".join(self._tail)
    if self._total <= self._limit:
      return head + tail, 0
    keep_head, keep_tail = self._limit - self._limit // 2, self._limit // 2
    full_tail = (head + tail)[-keep_tail:] if keep_tail else ""
    return head[:keep_head] + full_tail, self._total - keep_head - keep_tail


def readable(fd: int, timeout_s: float) -> bool:
  """Waits until `fd` is readable (or at EOF); poll(), not select(): no 1024-descriptor limit."""
  poller = select.poll()
  poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
  return bool(poller.poll(max(0, timeout_s) * 1000))


def read_into(fd: int, cap: OutputCap) -> bool:
  """Reads what is available from a non-blocking fd into cap; False at EOF."""
  try:
    chunk = os.read(fd, 1 << 16)
  except BlockingIOError:
    return True
  if not chunk:
    return False
  cap.feed(chunk)
  return True


def drain_to_eof(fd: int, cap: OutputCap, limit_s: float = 5.0) -> None:
  """Reads a FIFO whose writers are all dead (or dying) until EOF."""
  deadline = time.monotonic() + limit_s
  while time.monotonic() < deadline:
    if readable(fd, 0.1) and not read_into(fd, cap):
      return
  log.warning("output FIFO still open %.0f s after its command ended", limit_s)


def run_process(argv: list[str], *, timeout: float, max_output_chars: int,
                env: dict[str, str] | None = None, cwd: str | None = None) -> ExecResult:
  """Runs argv in a new session; reads the merged output until EOF or the deadline.

  Past the deadline, and after the main process exits (to end stragglers that hold the pipe),
  the process group gets SIGKILL.
  """
  def kill(p: subprocess.Popen) -> None:
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
  start = time.monotonic()
  deadline = start + timeout
  proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
  cap = OutputCap(max_output_chars)
  fd = proc.stdout.fileno()
  timed_out = False
  try:
    while True:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        timed_out = True
        kill(proc)
        break
      ready = readable(fd, min(remaining, 0.5))
      if ready:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
          break
        cap.feed(chunk)
      elif proc.poll() is not None:
        kill(proc)  # the command is done; background children still hold the pipe open
    # Drain what is left after a kill (the pipe closes once every holder is dead).
    drain_deadline = time.monotonic() + 2.0
    while time.monotonic() < drain_deadline:
      ready = readable(fd, 0.1)
      if not ready:
        if proc.poll() is not None:
          break
        continue
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        break
      cap.feed(chunk)
    returncode = proc.wait(timeout=10)
  except BaseException:
    kill(proc)
    proc.wait()
    raise
  finally:
    proc.stdout.close()
  output, elided = cap.result()
  return ExecResult(returncode=returncode, output=output, timed_out=timed_out,
                    duration_s=time.monotonic() - start, elided_chars=elided)


_STALE_NAME = re.compile(r"^dagger-jax-(?:bwrap-|tmp-|task-)?(\d+)-")
_REAPED_DIRS: set[str] = set()


def reap_stale(parent: str, rmtree: bool) -> None:
  """Once per process and folder: removes sandbox state dirs, task checkouts and cgroups that a
  SIGKILLed process (named by the pid in their name) left behind."""
  if parent in _REAPED_DIRS:
    return
  _REAPED_DIRS.add(parent)
  try:
    names = os.listdir(parent)
  except OSError:
    return
  for name in names:
    m = _STALE_NAME.match(name)
    if m is None or pid_alive(int(m.group(1))):
      continue
    path = os.path.join(parent, name)
    if rmtree:
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.rmdir(path)  # a cgroup whose processes are all gone
      except OSError:
        pass


def pid_alive(pid: int) -> bool:
  """Whether a process with this pid exists (one of another user counts as alive)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
