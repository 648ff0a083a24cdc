"""`BwrapSandbox`: bubblewrap over a host working tree, with cgroup limits where it may.

A read-only root with read-only system dirs (/usr, /etc with /etc/shadow masked, ...; nothing
else of the host: no /home, /root, /work, /var, /run), the task tree bound writable at `workdir`
(default /testbed, like the SWE-bench images), a private /tmp that persists across the episode's
commands, a read-only /dev with a /dev/shm of at most `memory_mb`, no network, own
PID/IPC/UTS namespaces, no capabilities (even when root starts it), killed when the parent dies.
One bubblewrap lives as long as the
sandbox and runs each command as a fresh `bash -lc`; what a command leaves running is killed when
it ends. Memory/CPU/process limits use a cgroup per sandbox when the cgroup tree is writable
(root, or a delegated cgroup v2; `cgroup.Cgroup`), else rlimits (`ulimit -v/-t/-u`; note
RLIMIT_NPROC does not bind processes that map to host root). Disk: `fallocate(2)` fails
(seccomp.py), each command runs under RLIMIT_FSIZE, and `disk.DiskGuard` kills a command once the
tree and /tmp pass `limits.disk_mb`. Commands run with oom_score_adj 500, so at the memory limit
the kernel kills them before the sandbox's PID 1.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from typing import Callable

from dagger_jax.envs.sandbox.base import (SANDBOX_ENV, ExecResult, Sandbox, SandboxError,
                                          SandboxLimits, no_nul, write_host_file)
from dagger_jax.envs.sandbox import seccomp
from dagger_jax.envs.sandbox.cgroup import Cgroup
from dagger_jax.envs.sandbox.disk import DiskGuard, effective_limit_mb
from dagger_jax.envs.sandbox.process import OutputCap, drain_to_eof, read_into, reap_stale

log = logging.getLogger(__name__)

BWRAP_INSTALL_HINT = (
    "bubblewrap (`bwrap`) is not installed. Install it with `sudo apt-get install -y bubblewrap` "
    "(Debian/Ubuntu), `sudo dnf install -y bubblewrap` (Fedora) or `make sysdeps`; or run with "
    "`--config.env.sandbox=docker`, or, with no isolation at all, "
    "`--config.env.sandbox=unsafe_local`.")



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
# How often a running command's disk use is looked at (disk.DiskGuard: two statvfs calls, a walk
# only near the limit); writes to a tmpfs reach ~1.5 GB/s, so a poll lets ~75 MB past the limit.
_DISK_POLL_S = 0.05

# The program bubblewrap runs for the life of the sandbox, as PID 1 of its namespaces. It reads
# (output FIFO, file size limit in KB, command) triples, each NUL-terminated, from stdin and runs
# each command with `bash -lc`, stdin from /dev/null, stdout+stderr into the FIFO, under that
# RLIMIT_FSIZE (SIGXFSZ ignored: a write past it fails with EFBIG, "File too large", instead of
# killing the writer) and with oom_score_adj 500; then it kills every other process of the namespace
# (whatever the command left running, which also closes the FIFO for good) and writes the exit
# status as one line to the status descriptor given as $1 (where a first line, "ready", says that
# the sandbox is up: a death after it is a command's doing, not a failed start).
# The status pipe arrives as fd $1 and is moved to fd 9 (unless it already is 9: `9>&9 9>&-` would
# close it, which happened whenever the pipe's write end was fd 9 in this process).
_BWRAP_EXECUTOR = r"""
[ "$1" = 9 ] || eval "exec 9>&$1 $1>&-"
printf 'ready\n' >&9
while IFS= read -r -d '' fifo && IFS= read -r -d '' fsize && IFS= read -r -d '' cmd; do
  ( { ulimit -f "$fsize"; echo 500 >/proc/self/oom_score_adj; } 2>/dev/null; trap '' XFSZ
    exec bash -lc "$cmd" ) </dev/null >"$fifo" 2>&1 9>&-
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

  def __init__(self, argv: Callable[[int | None], list[str]], log_path: str,
               cgroup: Cgroup | None, seccomp_path: str | None):
    """`argv(seccomp_fd)` is bubblewrap's command line for a seccomp program open on that fd
    (None: no filter); the status pipe's fd number is appended."""
    status_r, status_w = os.pipe()
    filter_fd = os.open(seccomp_path, os.O_RDONLY) if seccomp_path else None
    fds = (status_w,) if filter_fd is None else (status_w, filter_fd)
    try:
      with open(log_path, "ab") as log_file:
        self.proc = _SPAWNER.submit(
            subprocess.Popen, argv(filter_fd) + [str(status_w)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=log_file, pass_fds=fds, env={},
            start_new_session=True).result()
    except BaseException:
      os.close(status_r)
      raise
    finally:
      os.close(status_w)
      if filter_fd is not None:
        os.close(filter_fd)
    self.status_fd = status_r
    self.cgroup = cgroup
    self.ready = False  # it wrote its "ready" line: bubblewrap set the sandbox up

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

  def __init__(self, host_workdir: str, limits: SandboxLimits, *,
               workdir: str = "/testbed", executable: str = "bwrap", use_cgroups: bool = True,
               scratch_dir: str | None = None):
    self._bwrap = check_bwrap(executable)
    if not os.path.isdir(host_workdir):
      raise SandboxError(f"BwrapSandbox: host_workdir {host_workdir!r} is not a directory")
    if not os.path.isabs(workdir):
      raise ValueError(f"BwrapSandbox: workdir must be absolute, got {workdir!r}")
    self.host_workdir = os.path.realpath(host_workdir)
    self.workdir = workdir
    self.limits = limits
    self._closed = False
    self._lock = threading.Lock()  # one command at a time
    self._seq = 0
    scratch_dir = scratch_dir or tempfile.gettempdir()
    reap_stale(scratch_dir, rmtree=True)
    self._state = tempfile.mkdtemp(prefix=f"dagger-jax-bwrap-{os.getpid()}-", dir=scratch_dir)
    self._tmp = os.path.join(self._state, "tmp")  # the sandbox's private /tmp
    self._io = os.path.join(self._state, "io")  # per-command output FIFOs
    self._empty = os.path.join(self._state, "empty")  # bound over files the sandbox must not read
    self._log = os.path.join(self._state, "bwrap.log")
    os.mkdir(self._tmp)
    os.mkdir(self._io)
    open(self._empty, "w").close()
    self._seccomp = os.path.join(self._state, "seccomp.bpf")
    program = seccomp.filter_bytes()
    if program:
      with open(self._seccomp, "wb") as f:
        f.write(program)
    else:
      log.warning("no seccomp table for %s: fallocate(2) is not refused in bubblewrap sandboxes",
                  os.uname().machine)
      self._seccomp = None
    self._cgroup = Cgroup.create(self.limits) if use_cgroups else None
    self._executor: list[_Executor | None] = [None]  # a box the finalizer shares
    self._finalizer = weakref.finalize(self, BwrapSandbox._cleanup, self._state, self._cgroup,
                                       self._executor)
    disk_paths = [self.host_workdir, self._tmp]
    self._disk = DiskGuard(disk_paths, effective_limit_mb(self.limits.disk_mb,
                                                          self.limits.memory_mb, disk_paths))

  @property
  def cgroup(self) -> Cgroup | None:
    """The cgroup that limits this sandbox; None where cgroups are not writable (rlimits)."""
    return self._cgroup

  def _argv(self, seccomp_fd: int | None) -> list[str]:
    argv: list[str] = []
    if self._cgroup is not None:  # join the cgroup(s) first, then become bwrap (no extra fork)
      argv += ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; '
               'shift; exec "$@"', "sh", *self._cgroup.procs_files, "--"]
    # --cap-drop ALL: bubblewrap started by root keeps every capability in the sandbox's user
    # namespace, and with CAP_SYS_ADMIN there `mount -o remount,bind,rw /usr` made the host's
    # /usr and /etc writable (tests/hostile_corpus.py: mount_over_system found it).
    argv += [self._bwrap, "--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session",
             "--cap-drop", "ALL"]
    if seccomp_fd is not None:
      argv += ["--seccomp", str(seccomp_fd)]
    for d in _BWRAP_RO_DIRS:
      if os.path.islink(d):
        argv += ["--symlink", os.readlink(d), d]
      elif os.path.isdir(d):
        argv += ["--ro-bind", d, d]
    for secret in _BWRAP_MASKED_FILES:  # readable by the sandbox's (mapped) root otherwise
      if os.path.exists(secret):
        argv += ["--ro-bind", self._empty, secret]
    # /dev read-only but for a /dev/shm of at most memory_mb (tmpfs pages are memory, which
    # without a cgroup nothing else would bound).
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(self.limits.memory_mb * 2**20),
             "--perms", "1777", "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--bind", self._tmp, "/tmp",
             "--ro-bind", self._io, _BWRAP_IO_DIR,
             "--bind", self.host_workdir, self.workdir,
             "--remount-ro", "/",  # bubblewrap's root is a tmpfs: no writes outside the binds
             "--chdir", self.workdir, "--clearenv"]
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
    data = no_nul(command).encode("utf-8", "replace")
    self._disk.over()  # refreshes the figure file_size_kb reads
    fsize = b"%d\0" % self._disk.file_size_kb
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
          executor.proc.stdin.write(f"{_BWRAP_IO_DIR}/{name}\0".encode() + fsize + data + b"\0")
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
      executor = self._executor[0] = _Executor(self._argv, self._log, self._cgroup,
                                               self._seccomp)
    return executor

  def _collect(self, executor: _Executor, out_fd: int, keeper: int, start: float,
               timeout: float) -> ExecResult:
    """Reads the command's output until its status line (or the deadline, or the executor dies),
    then, once every writer is gone, the rest of the FIFO to EOF."""
    cap = OutputCap(self.limits.max_output_chars)
    poller = select.poll()
    poller.register(out_fd, select.POLLIN)
    poller.register(executor.status_fd, select.POLLIN | select.POLLHUP)
    status = b""
    returncode, timed_out, died, over_disk = -9, False, False, False
    next_disk_check = start + _DISK_POLL_S
    try:
      while not died:
        if not executor.ready and status.startswith(b"ready\n"):
          executor.ready, status = True, status[len(b"ready\n"):]
        if b"\n" in status:
          break
        now = time.monotonic()
        remaining = start + timeout - now
        if remaining <= 0:
          timed_out = True
          break
        if now >= next_disk_check:
          next_disk_check = now + _DISK_POLL_S
          if self._disk.over():
            over_disk = True
            break
        for fd, _ in poller.poll(min(remaining, max(0.0, next_disk_check - now)) * 1000):
          if fd == out_fd:
            read_into(out_fd, cap)
          else:
            chunk = os.read(executor.status_fd, 64)
            died = not chunk  # the executor is gone (killed from outside, failed to start)
            status += chunk
    finally:
      if not executor.ready and status.startswith(b"ready\n"):
        executor.ready, status = True, status[len(b"ready\n"):]
      if b"\n" in status:
        returncode = int(status.split(b"\n", 1)[0])
      else:  # timed out or died: take the whole sandbox down; the next run() restarts it
        executor.kill()
        self._executor[0] = None
      os.close(keeper)
    if died:
      if not executor.ready:
        raise SandboxError(f"bubblewrap could not start the sandbox over {self.host_workdir}:\n"
                           f"{_tail(self._log)}")
      log.warning("bubblewrap sandbox died during a command; the next one restarts it. %s",
                  _tail(self._log))
    drain_to_eof(out_fd, cap)
    if died:
      cap.feed(b"\n[sandbox] every process of the sandbox was killed during this command (the "
               b"memory limit, config.env.memory_mb, is the usual cause); the next command "
               b"starts a new one over the same files.\n")
    if over_disk or self._disk.over():
      over_disk = True
      cap.feed(self._disk.note(killed=b"\n" not in status).encode())
    output, elided = cap.result()
    return ExecResult(returncode=returncode, output=output, timed_out=timed_out,
                      duration_s=time.monotonic() - start, elided_chars=elided,
                      over_limit="disk" if over_disk else "")

  def write_file(self, path: str, data: bytes) -> None:
    write_host_file(self.host_workdir, path, data)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      with self._lock:
        self._finalizer()

  @staticmethod
  def _cleanup(state_dir: str, cgroup: Cgroup | None, executor: list[_Executor | None]) -> None:
    if executor[0] is not None:
      executor[0].kill()
      executor[0] = None
    if cgroup is not None:
      cgroup.remove()
    shutil.rmtree(state_dir, ignore_errors=True)



def _tail(path: str, n: int = 2000) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()[-n:]
  except OSError:
    return ""
