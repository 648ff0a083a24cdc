"""Sandboxes that run an agent's bash commands: bubblewrap (local), docker, and an unsafe local one.

One interface for all three, so episode code never knows which it runs on:

    with make_sandbox(config.env, host_workdir="/tmp/task-repo") as sb:
      r = sb.run("python -m pytest -q")      # `bash -lc` in sb.workdir
      r.returncode, r.output, r.timed_out    # output = stdout+stderr interleaved, capped

Every command gets a wall-clock limit (`SandboxLimits.command_timeout`, or `run(..., timeout=)`):
past it the whole command is killed (its process group / PID namespace / every process in the
container but init), and `ExecResult.timed_out` is set. Output is captured up to
`max_output_chars`; past that only the first and last `max_output_chars // 2` characters are kept
and `ExecResult.elided_chars` says how many were dropped in between (no marker is inserted:
`protocol.format_observation` writes the note the agent sees).

- `BwrapSandbox`: bubblewrap. Read-only system dirs (/usr, /etc with /etc/shadow masked, ...;
  nothing else of the host: no /home, /root, /work, /var, /run), the task tree bound writable at
  `workdir` (default /testbed, like the SWE-bench images), a private /tmp that persists across the
  episode's commands, no network, own PID/IPC/UTS namespaces, killed when the parent dies. One
  bubblewrap lives as long as the sandbox and runs each command as a fresh `bash -lc`; what a
  command leaves running is killed when it ends. Memory/CPU/process limits use a cgroup per
  sandbox when the cgroup tree is writable (root, or a delegated cgroup v2), else rlimits
  (`ulimit -v/-t/-u`; note RLIMIT_NPROC does not bind processes that map to host root).
- `DockerSandbox`: one container per sandbox from an image, `--network none`, memory/CPU/pids
  limits, one `exec` per command; the container is removed on close, on garbage collection, at
  interpreter exit, and, should the process be SIGKILLed, by the next DockerSandbox of this host
  (orphan reaping by label); its PID 1 also exits by itself after `max_lifetime_s`.
- `UnsafeLocalSandbox`: a plain subprocess in the host tree, no isolation; warns loudly.
"""

from __future__ import annotations

import abc
import codecs
import collections
import concurrent.futures
import dataclasses
import io
import logging
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from typing import Any

log = logging.getLogger(__name__)

# Environment every sandboxed command sees (the same on every backend; mini-swe-agent's text-mode
# config sets the pager/progress variables the same way).
SANDBOX_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "dumb",
    "PAGER": "cat",
    "MANPAGER": "cat",
    "GIT_PAGER": "cat",
    "LESS": "-R",
    "PIP_PROGRESS_BAR": "off",
    "TQDM_DISABLE": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}

BWRAP_INSTALL_HINT = (
    "bubblewrap (`bwrap`) is not installed. Install it with `sudo apt-get install -y bubblewrap` "
    "(Debian/Ubuntu), `sudo dnf install -y bubblewrap` (Fedora) or `make sysdeps`; or run with "
    "`--config.env.sandbox=docker`, or, with no isolation at all, "
    "`--config.env.sandbox=unsafe_local`.")


class SandboxError(RuntimeError):
  """The sandbox itself failed (could not start, lost its container, ...); not a command failure."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  """Per-command and per-sandbox resource limits.

  `max_output_chars` is the capture cap of the sandbox (memory safety), not what the agent sees:
  the observation is cut further by `protocol.format_observation(output_limit=...)` with
  `config.env.output_limit`.
  """
  command_timeout: float = 30.0  # wall-clock seconds per command
  max_output_chars: int = 1_000_000
  memory_mb: int = 2048
  cpus: float = 1.0
  pids: int = 256

  def __post_init__(self):
    for name in ("command_timeout", "max_output_chars", "memory_mb", "cpus", "pids"):
      if not getattr(self, name) > 0:
        raise ValueError(f"SandboxLimits.{name}={getattr(self, name)!r}: must be > 0")

  @classmethod
  def from_config(cls, env_config: Any, **overrides) -> SandboxLimits:
    """From `config.env` (command_timeout, memory_mb, cpus, pids); the capture cap is at least
    4 x `config.env.output_limit` so the observation's head and tail are always exact."""
    cap = max(cls.max_output_chars, 4 * int(env_config.get("output_limit", 0)))
    kw = dict(command_timeout=float(env_config.command_timeout), max_output_chars=cap,
              memory_mb=int(env_config.memory_mb), cpus=float(env_config.cpus),
              pids=int(env_config.pids))
    kw.update(overrides)
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class ExecResult:
  returncode: int  # the command's exit status; -9 (SIGKILL) after a timeout
  output: str  # stdout+stderr interleaved, decoded as UTF-8 (invalid bytes replaced), capped
  timed_out: bool
  duration_s: float
  elided_chars: int = 0  # characters dropped from the middle of `output` by the capture cap


class Sandbox(abc.ABC):
  """Runs bash commands in a task's working tree. A context manager; `close()` is idempotent."""

  workdir: str  # the task working tree as commands see it (the cwd of `run`)
  limits: SandboxLimits

  @abc.abstractmethod
  def run(self, command: str, timeout: float | None = None) -> ExecResult:
    """Runs `bash -lc command` in `workdir`; `timeout` defaults to `limits.command_timeout`."""

  @abc.abstractmethod
  def write_file(self, path: str, data: bytes) -> None:
    """Writes `data` to `path` (relative to `workdir`), creating parent directories."""

  @abc.abstractmethod
  def close(self) -> None:
    """Kills whatever still runs and releases every resource; safe to call twice."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------------------------
# Output capture: incremental UTF-8 decoding, head + tail kept past the cap.


class _OutputCap:
  """Keeps the first and last `limit // 2` characters of a byte stream once it exceeds `limit`.

  >>> cap = _OutputCap(limit=6); cap.feed(b"abcdefghij"); cap.result()
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


def _readable(fd: int, timeout_s: float) -> bool:
  """Waits until `fd` is readable (or at EOF); poll(), not select(): no 1024-descriptor limit."""
  poller = select.poll()
  poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
  return bool(poller.poll(max(0, timeout_s) * 1000))


def _run_process(argv: list[str], *, timeout: float, max_output_chars: int,
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
  cap = _OutputCap(max_output_chars)
  fd = proc.stdout.fileno()
  timed_out = False
  try:
    while True:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        timed_out = True
        kill(proc)
        break
      ready = _readable(fd, min(remaining, 0.5))
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
      ready = _readable(fd, 0.1)
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
    if m is None or _pid_alive(int(m.group(1))):
      continue
    path = os.path.join(parent, name)
    if rmtree:
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.rmdir(path)  # a cgroup whose processes are all gone
      except OSError:
        pass


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _no_nul(command: str) -> str:
  """Commands are bash strings, which cannot hold NUL: drop them (as bash would ignore them)."""
  return command.replace("\0", "")


def _safe_join(root: str, relpath: str) -> str:
  """root/relpath, refusing paths that leave root (absolute paths, `..`, symlinks out)."""
  if os.path.isabs(relpath):
    raise ValueError(f"write_file: path must be relative to the workdir, got {relpath!r}")
  root_real = os.path.realpath(root)
  target = os.path.realpath(os.path.join(root_real, relpath))
  if os.path.commonpath([root_real, target]) != root_real:
    raise ValueError(f"write_file: {relpath!r} resolves outside the workdir {root}")
  return target


def _write_host_file(root: str, relpath: str, data: bytes) -> None:
  target = _safe_join(root, relpath)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with open(target, "wb") as f:
    f.write(data)


# ---------------------------------------------------------------------------------------------
# Unsafe local


class UnsafeLocalSandbox(Sandbox):
  """Runs commands as plain subprocesses in `host_workdir`: NO isolation. Explicit opt-in only."""

  def __init__(self, host_workdir: str, limits: SandboxLimits | None = None):
    msg = ("UNSAFE SANDBOX: config.env.sandbox=unsafe_local runs agent commands directly on this "
           f"machine in {host_workdir}, with no isolation (no read-only root, network on). Use it "
           "only for trusted, scripted commands.")
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    log.warning(msg)
    self.workdir = os.path.abspath(host_workdir)
    self.limits = limits or SandboxLimits()
    self._tmp = tempfile.mkdtemp(prefix=f"dagger-jax-tmp-{os.getpid()}-")
    self._env = dict(SANDBOX_ENV, HOME=self._tmp, TMPDIR=self._tmp)
    self._closed = False

  def run(self, command: str, timeout: float | None = None) -> ExecResult:
    if self._closed:
      raise SandboxError("run() on a closed sandbox")
    return _run_process(["bash", "-lc", _no_nul(command)], env=self._env, cwd=self.workdir,
                        timeout=timeout or self.limits.command_timeout,
                        max_output_chars=self.limits.max_output_chars)

  def write_file(self, path: str, data: bytes) -> None:
    _write_host_file(self.workdir, path, data)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      shutil.rmtree(self._tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Bubblewrap


_OPTIONAL_CGROUP_FILES = ("memory.swap.max", "memory.memsw.limit_in_bytes")


class _Cgroup:
  """One cgroup per sandbox with pids/memory/cpu limits (cgroup v2, or v1 controllers).

  `create` returns None when this process may not create cgroups (then rlimits are used).
  Processes join by writing their pid to every `procs_files` entry before exec'ing bwrap.
  """

  def __init__(self, dirs: list[str]):
    self.dirs = dirs
    self.procs_files = [os.path.join(d, "cgroup.procs") for d in dirs]

  @classmethod
  def create(cls, limits: SandboxLimits) -> _Cgroup | None:
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


_BWRAP_CHECKED: dict[str, str | None] = {}
_BWRAP_LOCK = threading.Lock()


def check_bwrap(executable: str = "bwrap") -> str:
  """Path of a working bubblewrap, or SandboxError with how to install / enable it. Cached."""
  with _BWRAP_LOCK:
    if executable in _BWRAP_CHECKED:
      err = _BWRAP_CHECKED[executable]
      if err:
        raise SandboxError(err)
      return shutil.which(executable)
    path = shutil.which(executable)
    err = None
    if path is None:
      err = BWRAP_INSTALL_HINT
    else:
      probe = subprocess.run([path, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/",
                              "--proc", "/proc", "--dev", "/dev", "true"],
                             capture_output=True, text=True, timeout=30)
      if probe.returncode != 0:
        err = (f"bubblewrap is installed ({path}) but cannot create a sandbox here: "
               f"{probe.stderr.strip()}. Unprivileged user namespaces may be disabled "
               "(`sysctl kernel.unprivileged_userns_clone=1`, or on Ubuntu 24.04+ "
               "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`); inside a container, "
               "run it with --privileged or use `--config.env.sandbox=docker`.")
    _BWRAP_CHECKED[executable] = err
    if err:
      raise SandboxError(err)
    return path


# System directories bound read-only into every bubblewrap sandbox (those that exist).
_BWRAP_RO_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_BWRAP_MASKED_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-")
_BWRAP_IO_DIR = "/.dagger_jax_io"  # where the sandbox sees the per-command output FIFOs

# The program bubblewrap runs for the life of the sandbox, as PID 1 of its namespaces. It reads
# (output FIFO, command) pairs, each NUL-terminated, from stdin and runs each command with
# `bash -lc`, stdin from /dev/null, stdout+stderr into the FIFO; then it kills every other process
# of the namespace (whatever the command left running, which also closes the FIFO for good) and
# writes the exit status as one line to the status descriptor given as $1.
# The status pipe arrives as fd $1 and is moved to fd 9 (unless it already is 9: `9>&9 9>&-` would
# close it, which happened whenever the pipe's write end was fd 9 in this process).
_BWRAP_EXECUTOR = r"""
[ "$1" = 9 ] || eval "exec 9>&$1 $1>&-"
while IFS= read -r -d '' fifo && IFS= read -r -d '' cmd; do
  bash -lc "$cmd" </dev/null >"$fifo" 2>&1 9>&-
  rc=$?
  kill -9 -1 2>/dev/null
  printf '%d\n' "$rc" >&9
done
"""

# Executors are spawned from this one long-lived thread: bwrap's --die-with-parent fires when the
# *thread* that forked it ends, and callers (worker pools) may come and go.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bwrap-spawn")


class _Executor:
  """One running bubblewrap (namespaces + executor loop) and its pipes."""

  def __init__(self, argv: list[str], log_path: str, cgroup: _Cgroup | None):
    status_r, status_w = os.pipe()
    try:
      with open(log_path, "ab") as log_file:
        self.proc = _SPAWNER.submit(
            subprocess.Popen, argv + [str(status_w)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=log_file, pass_fds=(status_w,), env={},
            start_new_session=True).result()
    except BaseException:
      os.close(status_r)
      raise
    finally:
      os.close(status_w)
    self.status_fd = status_r
    self.cgroup = cgroup
    self.commands_done = 0

  def alive(self) -> bool:
    return self.proc.poll() is None

  def kill(self) -> None:
    """SIGKILLs bwrap (its namespace goes down with it) and everything left in the cgroup."""
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    if self.cgroup is not None:
      self.cgroup.kill_all()
    self.proc.wait()
    try:
      self.proc.stdin.close()
    except OSError:  # BrokenPipe while flushing: nobody reads any more
      pass
    if self.status_fd >= 0:
      os.close(self.status_fd)
      self.status_fd = -1


class BwrapSandbox(Sandbox):
  """Bubblewrap sandbox over a host working tree (see the module docstring for what it isolates).

  One bubblewrap process lives as long as the sandbox and runs the commands one after the other
  (a fresh `bash -lc` each, as a plain subprocess would), so a command costs about what it costs
  outside the sandbox. After each command every process it left behind is killed; a command past
  its time limit takes the whole sandbox process down, and the next command starts a new one over
  the same working tree and /tmp.

  >>> with BwrapSandbox("/tmp/repo", SandboxLimits(command_timeout=5)) as sb:  # doctest: +SKIP
  ...   sb.run("pwd; touch /usr/x").output
  '/testbed\\ntouch: cannot touch \\'/usr/x\\': Read-only file system\\n'
  """

  def __init__(self, host_workdir: str, limits: SandboxLimits | None = None, *,
               workdir: str = "/testbed", executable: str = "bwrap", use_cgroups: bool = True):
    self._bwrap = check_bwrap(executable)
    if not os.path.isdir(host_workdir):
      raise SandboxError(f"BwrapSandbox: host_workdir {host_workdir!r} is not a directory")
    if not os.path.isabs(workdir):
      raise ValueError(f"BwrapSandbox: workdir must be absolute, got {workdir!r}")
    self.host_workdir = os.path.realpath(host_workdir)
    self.workdir = workdir
    self.limits = limits or SandboxLimits()
    self._closed = False
    self._lock = threading.Lock()  # one command at a time
    self._seq = 0
    reap_stale(tempfile.gettempdir(), rmtree=True)
    self._state = tempfile.mkdtemp(prefix=f"dagger-jax-bwrap-{os.getpid()}-")
    self._tmp = os.path.join(self._state, "tmp")  # the sandbox's private /tmp
    self._io = os.path.join(self._state, "io")  # per-command output FIFOs
    self._empty = os.path.join(self._state, "empty")  # bound over files the sandbox must not read
    self._log = os.path.join(self._state, "bwrap.log")
    os.mkdir(self._tmp)
    os.mkdir(self._io)
    open(self._empty, "w").close()
    self._cgroup = _Cgroup.create(self.limits) if use_cgroups else None
    self._executor: list[_Executor | None] = [None]  # a box the finalizer shares
    self._finalizer = weakref.finalize(self, BwrapSandbox._cleanup, self._state, self._cgroup,
                                       self._executor)
    self._argv = self._build_argv()

  def _build_argv(self) -> list[str]:
    argv: list[str] = []
    if self._cgroup is not None:  # join the cgroup(s) first, then become bwrap (no extra fork)
      argv += ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; '
               'shift; exec "$@"', "sh", *self._cgroup.procs_files, "--"]
    argv += [self._bwrap, "--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session"]
    for d in _BWRAP_RO_DIRS:
      if os.path.islink(d):
        argv += ["--symlink", os.readlink(d), d]
      elif os.path.isdir(d):
        argv += ["--ro-bind", d, d]
    for secret in _BWRAP_MASKED_FILES:  # readable by the sandbox's (mapped) root otherwise
      if os.path.exists(secret):
        argv += ["--ro-bind", self._empty, secret]
    argv += ["--proc", "/proc", "--dev", "/dev", "--bind", self._tmp, "/tmp",
             "--ro-bind", self._io, _BWRAP_IO_DIR,
             "--bind", self.host_workdir, self.workdir, "--chdir", self.workdir, "--clearenv"]
    for k, v in SANDBOX_ENV.items():
      argv += ["--setenv", k, v]
    script = _BWRAP_EXECUTOR
    if self._cgroup is None:  # rlimits instead: address space, CPU seconds, processes
      cpu_s = math.ceil(self.limits.command_timeout * self.limits.cpus) + 1
      script = (f"ulimit -v {self.limits.memory_mb * 1024} -t {cpu_s} -u {self.limits.pids} "
                f"|| exit 125\n{script}")
    return argv + ["bash", "--noprofile", "--norc", "-c", script, "bash"]

  def run(self, command: str, timeout: float | None = None) -> ExecResult:
    if self._closed:
      raise SandboxError("run() on a closed sandbox")
    timeout = timeout or self.limits.command_timeout
    data = _no_nul(command).encode("utf-8", "replace")
    with self._lock:
      self._seq += 1
      name = f"out-{self._seq}"
      fifo = os.path.join(self._io, name)
      os.mkfifo(fifo, 0o600)
      out_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
      keeper = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # no EOF until we say so
      try:
        start = time.monotonic()
        executor = self._ensure_executor()
        try:
          executor.proc.stdin.write(f"{_BWRAP_IO_DIR}/{name}\0".encode() + data + b"\0")
          executor.proc.stdin.flush()
        except BrokenPipeError:
          pass  # the executor died just now; _collect finds its status pipe closed
        return self._collect(executor, out_fd, keeper, start, timeout)
      finally:
        os.close(out_fd)
        os.unlink(fifo)

  def _ensure_executor(self) -> _Executor:
    executor = self._executor[0]
    if executor is None or not executor.alive():
      if executor is not None:
        executor.kill()
      executor = self._executor[0] = _Executor(self._argv, self._log, self._cgroup)
    return executor

  def _collect(self, executor: _Executor, out_fd: int, keeper: int, start: float,
               timeout: float) -> ExecResult:
    """Reads the command's output until its status line (or the deadline, or the executor dies),
    then, once every writer is gone, the rest of the FIFO to EOF."""
    cap = _OutputCap(self.limits.max_output_chars)
    poller = select.poll()
    poller.register(out_fd, select.POLLIN)
    poller.register(executor.status_fd, select.POLLIN | select.POLLHUP)
    status = b""
    returncode, timed_out, died = -9, False, False
    try:
      while not died and b"\n" not in status:
        remaining = start + timeout - time.monotonic()
        if remaining <= 0:
          timed_out = True
          break
        for fd, _ in poller.poll(remaining * 1000):
          if fd == out_fd:
            _read_into(out_fd, cap)
          else:
            chunk = os.read(executor.status_fd, 64)
            died = not chunk  # the executor is gone (killed from outside, failed to start)
            status += chunk
    finally:
      if b"\n" in status:
        returncode = int(status.split(b"\n", 1)[0])
        executor.commands_done += 1
      else:  # timed out or died: take the whole sandbox down; the next run() restarts it
        executor.kill()
        self._executor[0] = None
      os.close(keeper)
    if died:
      if executor.commands_done == 0:
        raise SandboxError(f"bubblewrap could not start the sandbox over {self.host_workdir}:\n"
                           f"{_tail(self._log)}")
      log.warning("bubblewrap sandbox died during a command; the next one restarts it. %s",
                  _tail(self._log))
    _drain_to_eof(out_fd, cap)
    output, elided = cap.result()
    return ExecResult(returncode=returncode, output=output, timed_out=timed_out,
                      duration_s=time.monotonic() - start, elided_chars=elided)

  def write_file(self, path: str, data: bytes) -> None:
    _write_host_file(self.host_workdir, path, data)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      with self._lock:
        self._finalizer()

  @staticmethod
  def _cleanup(state_dir: str, cgroup: _Cgroup | None, executor: list[_Executor | None]) -> None:
    if executor[0] is not None:
      executor[0].kill()
      executor[0] = None
    if cgroup is not None:
      cgroup.remove()
    shutil.rmtree(state_dir, ignore_errors=True)


def _read_into(fd: int, cap: _OutputCap) -> bool:
  """Reads what is available from a non-blocking fd into cap; False at EOF."""
  try:
    chunk = os.read(fd, 1 << 16)
  except BlockingIOError:
    return True
  if not chunk:
    return False
  cap.feed(chunk)
  return True


def _drain_to_eof(fd: int, cap: _OutputCap, limit_s: float = 5.0) -> None:
  """Reads a FIFO whose writers are all dead (or dying) until EOF."""
  deadline = time.monotonic() + limit_s
  while time.monotonic() < deadline:
    if _readable(fd, 0.1) and not _read_into(fd, cap):
      return
  log.warning("output FIFO still open %.0f s after its command ended", limit_s)


def _tail(path: str, n: int = 2000) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()[-n:]
  except OSError:
    return ""


# ---------------------------------------------------------------------------------------------
# Docker

LABEL = "dagger-jax.sandbox"  # every container we create carries it (orphan reaping)
_REAPED_ONCE = threading.Event()


def _docker_client():
  try:
    import docker
  except ImportError as e:
    raise SandboxError("config.env.sandbox=docker needs the docker SDK: "
                       "`pip install 'dagger_jax[docker]'` (or `pip install docker`)") from e
  try:
    client = docker.from_env(timeout=120)
    client.ping()
  except Exception as e:  # docker.errors.DockerException and socket errors alike
    raise SandboxError(f"cannot reach the docker engine ({e}); is dockerd running? "
                       "(`docker info`; in CI: `bash .ci/start_dockerd.sh`)") from e
  return client


def reap_orphan_containers(client=None) -> list[str]:
  """Removes sandbox containers of this host whose creating process is gone; returns their ids."""
  client = client or _docker_client()
  host = socket.gethostname()
  removed = []
  for c in client.containers.list(all=True, filters={"label": f"{LABEL}.host={host}"}):
    pid = int(c.labels.get(f"{LABEL}.pid", "0") or 0)
    if pid and not _pid_alive(pid):
      _remove_container(client, c.id)
      removed.append(c.id)
  return removed


def _remove_container(client, container_id: str) -> None:
  import docker
  try:
    client.api.remove_container(container_id, force=True)
  except docker.errors.NotFound:
    pass
  except docker.errors.APIError as e:
    if "already in progress" not in str(e):
      log.warning("could not remove container %s: %s", container_id[:12], e)


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
  info.uid = info.gid = 0  # commands run as root in the container: no "dubious ownership" for git
  info.uname = info.gname = "root"
  return info


def _tar_directory(host_dir: str) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    tar.add(host_dir, arcname=".", filter=_root_owned)
  return buf.getvalue()


# PID 1 of a sandbox container: reaps orphans (bash reaps any child on SIGCHLD), survives
# `kill -9 -1`, and exits, removing the container, after `lifetime` seconds whatever happens.
_DOCKER_INIT = ("end=$((SECONDS + {lifetime})); "
                "while [ $SECONDS -lt $end ]; do sleep {tick} & wait $!; done")
# One command: stderr into stdout (one ordered stream), then, as the bwrap PID namespace does,
# kill what the command left running so the exec's stream closes when the command ends.
_DOCKER_EXEC = 'bash -lc "$1" 2>&1; rc=$?; kill -9 -1 2>/dev/null; exit $rc'


class DockerSandbox(Sandbox):
  """One container per sandbox; one `docker exec` of `bash -lc` per command.

  The container runs a reaping `bash` as PID 1 (it exits after `max_lifetime_s`) with
  auto-removal, `--network none`, memory (no swap), CPU and pids limits.
  `host_workdir_to_copy_in` (e.g. a materialized task repo) is copied to `workdir_in_container`;
  without it the image must already hold the tree there.
  """

  def __init__(self, image: str, workdir_in_container: str = "/testbed",
               limits: SandboxLimits | None = None, host_workdir_to_copy_in: str | None = None,
               *, max_lifetime_s: int = 24 * 3600):
    import docker
    self.limits = limits or SandboxLimits()
    self.workdir = workdir_in_container
    self._closed = False
    self._client = _docker_client()
    if not _REAPED_ONCE.is_set():
      _REAPED_ONCE.set()
      reaped = reap_orphan_containers(self._client)
      if reaped:
        log.warning("removed %d orphaned sandbox containers of dead processes", len(reaped))
    try:
      self._client.images.get(image)
    except docker.errors.ImageNotFound:
      raise SandboxError(f"docker image {image!r} not found locally (images are never pulled; "
                         "build the base one with dagger_jax.envs.images.ensure_base_image)"
                         ) from None
    mem = f"{self.limits.memory_mb}m"
    container = self._client.containers.create(
        image, command=["bash", "-c", _DOCKER_INIT.format(
            lifetime=int(max_lifetime_s), tick=min(10, int(max_lifetime_s)))],
        working_dir=self.workdir,
        network_mode="none", mem_limit=mem, memswap_limit=mem,
        nano_cpus=int(self.limits.cpus * 1e9), pids_limit=self.limits.pids, auto_remove=True,
        environment=SANDBOX_ENV, labels={LABEL: "1", f"{LABEL}.host": socket.gethostname(),
                                         f"{LABEL}.pid": str(os.getpid())})
    self.container_id = container.id
    self._finalizer = weakref.finalize(self, _remove_container, self._client, container.id)
    try:
      container.start()
      if host_workdir_to_copy_in is not None:
        self._put_tar(_tar_directory(host_workdir_to_copy_in))
    except BaseException:
      self.close()
      raise

  def _put_tar(self, data: bytes, dest: str | None = None) -> None:
    if not self._client.api.put_archive(self.container_id, dest or self.workdir, data):
      raise SandboxError(f"copying files into container {self.container_id[:12]} failed")

  def run(self, command: str, timeout: float | None = None) -> ExecResult:
    if self._closed:
      raise SandboxError("run() on a closed sandbox")
    import docker
    timeout = timeout or self.limits.command_timeout
    api = self._client.api
    start = time.monotonic()
    try:
      exec_id = api.exec_create(self.container_id, ["bash", "-c", _DOCKER_EXEC, "bash",
                                                    _no_nul(command)],
                                workdir=self.workdir,
                                environment=SANDBOX_ENV, stdout=True, stderr=True)["Id"]
      sock = api.exec_start(exec_id, socket=True)
    except docker.errors.APIError as e:
      raise SandboxError(f"docker exec in container {self.container_id[:12]} failed: {e}") from e
    raw = getattr(sock, "_sock", sock)
    cap = _OutputCap(self.limits.max_output_chars)
    timed_out = False
    try:
      timed_out = not _read_docker_stream(raw, cap, start + timeout)
    finally:
      raw.close()
    if timed_out:
      self._kill_all_commands()
    returncode = self._exit_code(exec_id)
    output, elided = cap.result()
    return ExecResult(returncode=-9 if timed_out else returncode, output=output,
                      timed_out=timed_out, duration_s=time.monotonic() - start,
                      elided_chars=elided)

  def _kill_all_commands(self) -> None:
    """SIGKILL every process in the container but PID 1 (the whole command tree, setsid or not)."""
    api = self._client.api
    exec_id = api.exec_create(self.container_id, ["sh", "-c", "kill -9 -1"])["Id"]
    api.exec_start(exec_id)

  def _exit_code(self, exec_id: str) -> int:
    for _ in range(100):
      info = self._client.api.exec_inspect(exec_id)
      if not info.get("Running") and info.get("ExitCode") is not None:
        return int(info["ExitCode"])
      time.sleep(0.01)
    raise SandboxError(f"docker exec {exec_id[:12]} did not report an exit code")

  def write_file(self, path: str, data: bytes) -> None:
    if os.path.isabs(path) or ".." in path.split("/"):
      raise ValueError(f"write_file: path must be relative to the workdir, got {path!r}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
      info = tarfile.TarInfo(path)
      info.size = len(data)
      info.mode = 0o644
      info.mtime = int(time.time())
      tar.addfile(info, io.BytesIO(data))
    self._put_tar(buf.getvalue())

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._finalizer()


def _read_docker_stream(sock: socket.socket, cap: _OutputCap, deadline: float) -> bool:
  """Reads a multiplexed (non-tty) exec stream into `cap`; False when the deadline passed first.

  Each frame is an 8-byte header (stream id, 3 zero bytes, big-endian payload size) + payload.
  """
  pending = b""
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return False
    ready = _readable(sock.fileno(), remaining)
    if not ready:
      continue
    chunk = sock.recv(1 << 16)
    if not chunk:
      return True
    pending += chunk
    while len(pending) >= 8:
      size = int.from_bytes(pending[4:8], "big")
      if len(pending) < 8 + size:
        break
      cap.feed(pending[8:8 + size])
      pending = pending[8 + size:]


# ---------------------------------------------------------------------------------------------


def make_sandbox(env_config: Any, host_workdir: str | None = None, *, image: str | None = None,
                 workdir: str = "/testbed", **limit_overrides) -> Sandbox:
  """The sandbox `config.env.sandbox` names (bwrap | docker | unsafe_local), limits from config.env.

  bwrap / unsafe_local run over `host_workdir`; docker starts `image` (the base image when None)
  and copies `host_workdir` in when given.
  """
  limits = SandboxLimits.from_config(env_config, **limit_overrides)
  kind = env_config.sandbox
  if kind == "bwrap":
    if host_workdir is None:
      raise ValueError("make_sandbox: config.env.sandbox=bwrap needs a host_workdir")
    return BwrapSandbox(host_workdir, limits, workdir=workdir)
  if kind == "docker":
    if image is None:
      from dagger_jax.envs import images
      image = images.ensure_base_image()
    return DockerSandbox(image, workdir, limits, host_workdir_to_copy_in=host_workdir)
  if kind == "unsafe_local":
    if host_workdir is None:
      raise ValueError("make_sandbox: config.env.sandbox=unsafe_local needs a host_workdir")
    return UnsafeLocalSandbox(host_workdir, limits)
  raise ValueError(f"config.env.sandbox={kind!r}: must be one of "
                   "('bwrap', 'docker', 'unsafe_local')")
