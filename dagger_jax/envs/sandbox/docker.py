"""`DockerSandbox`: one container per sandbox from an image; `docker_client` for an engine.

One container per sandbox from an image, `--network none`, memory/CPU/pids limits, one `exec` per
command; the container is removed on close, on garbage collection, at interpreter exit, and,
should the process be SIGKILLed, by the next DockerSandbox of this host on that engine (orphan
reaping by label); its PID 1 also exits by itself `max_lifetime_s` after creation. Images are
never pulled: the base image is built offline by `images.ensure_base_image`.

The engine is any the docker SDK reaches: `docker_host` (a URL of `config.env.docker_hosts`,
picked per sandbox by `engines.EnginePool`), else DOCKER_HOST, else the local socket. Everything
goes through the engine's API (the task tree is copied in with `put_archive`), so a remote engine
works as a local one does.

Containment of a hostile command (tests/hostile_corpus.py tries each):
- what it leaves running is killed when it ends (`kill -9 -1` in the exec; then, if `docker top`
  still shows a process, by PID 1); past the deadline, or past the disk limit, every process but
  PID 1 is killed by PID 1, on a signal from the engine (`_kill_all`): no exec, which a fork bomb
  holding every pid would stop, and no program of the image, which the agent may have replaced;
- disk: the engine's own quota (`--storage-opt size=`) where its storage driver has one
  (overlay2 on xfs with pquota, btrfs, zfs; `_quota_mb`: btrfs counts the image's files in the
  quota, the others only the container's own); elsewhere `fallocate(2)` refused and the writable
  layer's size (`SizeRw`) polled while commands run, as bubblewrap's DiskGuard does, with
  RLIMIT_FSIZE (the container's, and 0 per command while over the limit) for single files. The
  per-command limit of 0 runs in the image's bash, which the agent may replace: so a command
  that starts over the limit is sized every 50 ms and killed once the files grow, and the third
  such kill closes the sandbox (the episode is left out). The poll, the container's limit and
  the profile below are the engine's, out of the agent's reach;
- system calls: the container's seccomp profile (`seccomp.docker_profile()`: fallocate, and what
  docker's default profile refuses), given to the engine when the container is created: the
  engine applies it to every process of the container, so the agent, root in its container,
  cannot take it off by replacing the image's programs (tests/test_hostile.py::
  test_docker_replaced_tools_then_fallocate). An engine that refuses custom profiles (no seccomp
  in its kernel) gets the container without it, fallocate allowed, and a warning says so;
- commands run with oom_score_adj 500, so at the memory limit the kernel kills them before PID 1
  (whose death would remove the container).

The `docker` SDK is an optional extra (`pip install 'dagger_jax[docker]'`) and is imported only
inside the functions that talk to the engine, so the other sandboxes work without it.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
import threading
import time
import weakref

from dagger_jax.envs.sandbox import disk, seccomp
from dagger_jax.envs.sandbox.base import (SANDBOX_ENV, ExecResult, Sandbox, SandboxError,
                                          SandboxLimits, no_nul)
from dagger_jax.envs.sandbox.engines import EnginePool
from dagger_jax.envs.sandbox.process import OutputCap, pid_alive, readable

log = logging.getLogger(__name__)

LABEL = "dagger-jax.sandbox"  # every container we create carries it (orphan reaping)
_DISK_POLL_S = 0.5  # how often a running command's writable layer is sized (an API call)
# A command that starts over the disk limit has a file size limit of 0, set by the image's bash.
# An agent that replaced bash writes anyway: such a command is sized every _OVER_POLL_S and
# killed once the layer grew by _OVER_GROWTH; the _OVER_STRIKES-th such kill ends the sandbox.
_OVER_POLL_S, _OVER_GROWTH, _OVER_STRIKES = 0.05, 1 << 20, 3
_REAPED: set[str] = set()  # engines whose orphans this process has reaped
_STORAGE_QUOTA: dict[str, bool] = {}  # engine -> whether it takes `storage_opt={"size": ...}`
_DRIVER: dict[str, str] = {}  # engine -> its storage driver ("overlay2", "btrfs", ...)
_SECCOMP: dict[str, bool] = {}  # engine -> whether it takes our seccomp profile
_STATE_LOCK = threading.Lock()


def _engine_name(docker_host: str | None) -> str:
  return docker_host or os.environ.get("DOCKER_HOST") or "the local docker engine"


def docker_client(docker_host: str | None = None):
  """A docker SDK client of `docker_host` (a URL: unix://, tcp://, ssh://; None: DOCKER_HOST or
  the local socket) that has answered a ping, or SandboxError saying what to install / start.

  TLS for tcp:// comes from DOCKER_TLS_VERIFY / DOCKER_CERT_PATH as for the docker CLI; ssh://
  runs the system `ssh` (its keys, agent and ~/.ssh/config), so no paramiko is needed."""
  try:
    import docker  # lazy: the optional docker SDK (see the module docstring)
  except ImportError as e:
    raise SandboxError("config.env.sandbox=docker needs the docker SDK: "
                       "`pip install 'dagger_jax[docker]'` (or `pip install docker`)") from e
  environment = dict(os.environ)
  if docker_host:
    environment["DOCKER_HOST"] = docker_host
  url = environment.get("DOCKER_HOST", "")
  try:
    client = docker.from_env(timeout=120, environment=environment,
                             use_ssh_client=url.startswith("ssh://"))
    client.ping()
  except Exception as e:  # docker.errors.DockerException and socket errors alike
    where = f" at {url}" if url else ""
    if docker_host:
      hint = f"does `docker -H {url} info` answer? (it is in config.env.docker_hosts)"
    elif url:
      hint = f"does `docker -H {url} info` answer? (DOCKER_HOST is set to it)"
    else:
      hint = "is dockerd running? (`docker info`; in CI: `bash .ci/start_dockerd.sh`)"
    raise SandboxError(f"cannot reach the docker engine{where} ({e}); {hint}") from e
  return client


def reap_orphan_containers(client=None) -> list[str]:
  """Removes sandbox containers of this host whose creating process is gone; returns their ids."""
  client = client or docker_client()
  host = socket.gethostname()
  removed = []
  # The low-level list: one call, no inspect per container (one removed meanwhile, as
  # auto-removed sandboxes are all the time, would fail that inspect).
  for c in client.api.containers(all=True, filters={"label": f"{LABEL}.host={host}"}):
    pid = int((c.get("Labels") or {}).get(f"{LABEL}.pid", "0") or 0)
    if pid and not pid_alive(pid):
      _remove_container(client, c["Id"])
      removed.append(c["Id"])
  return removed


def _remove_container(client, container_id: str) -> None:
  import docker  # lazy: optional SDK
  try:
    client.api.remove_container(container_id, force=True)
  except docker.errors.NotFound:
    pass
  except docker.errors.APIError as e:
    if "already in progress" not in str(e):
      log.warning("could not remove container %s: %s", container_id[:12], e)


def _cleanup(client, container_id: str, pool: EnginePool | None, docker_host: str | None):
  _remove_container(client, container_id)
  if pool is not None:
    pool.release(docker_host)


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
  info.uid = info.gid = 0  # commands run as root in the container: no "dubious ownership" for git
  info.uname = info.gname = "root"
  return info


def _tar_directory(host_dir: str) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    tar.add(host_dir, arcname=".", filter=_root_owned)
  return buf.getvalue()


# PID 1 of a sandbox container: survives `kill -9 -1`, on SIGUSR1 kills every other process of
# the container, and exits, removing the container, at the epoch second `end` whatever happens.
# It waits with builtins only (`read -t` on the open, silent stdin of `stdin_open=True`;
# `printf %(...)T`, bash >= 4.2), so it still answers SIGUSR1 when a fork bomb holds every pid
# (`sleep` only if stdin were closed). Bash reaps the orphans it inherits between two builtins,
# not while `read` waits: hence the 0.2 s tick, so that the zombies of killed commands give their
# pids back at once.
_DOCKER_INIT = ("trap 'kill -9 -1' USR1; end={end}; "
                "while printf -v now '%(%s)T' -1 && [ \"$now\" -lt \"$end\" ]; do "
                "read -t 0.2 -u 0 _; [ $? -gt 128 ] || { sleep 1 & wait $!; }; done")
# One command ($1), with RLIMIT_FSIZE $2 KB (SIGXFSZ ignored: writes past it fail with EFBIG) and
# oom_score_adj 500; stderr into stdout (one ordered stream); then, as the bwrap PID namespace
# does, kill what the command left running so the exec's stream closes when the command ends.
_DOCKER_EXEC = ('{ ulimit -f "$2"; echo 500 >/proc/self/oom_score_adj; } 2>/dev/null; '
                "trap '' XFSZ; bash -lc \"$1\" 2>&1; rc=$?; kill -9 -1 2>/dev/null; exit $rc")


class DockerSandbox(Sandbox):
  """One container per sandbox; one `docker exec` of `bash -lc` per command.

  The container runs a reaping `bash` as PID 1 (it exits `max_lifetime_s` after creation) with
  auto-removal, `--network none`, memory (no swap), CPU and pids limits, and the disk limit of
  the module docstring. `host_workdir_to_copy_in` (e.g. a materialized task repo) is copied to
  `workdir_in_container`; without it the image must already hold the tree there.

  The engine: `docker_host`, else DOCKER_HOST or the local socket. `engine_pool`: the pool
  `docker_host` was leased from (one is leased here when `docker_host` is None); the lease is
  given back when the sandbox closes, or fails to start.
  """

  def __init__(self, image: str, workdir_in_container: str = "/testbed", *,
               limits: SandboxLimits, host_workdir_to_copy_in: str | None = None,
               max_lifetime_s: int = 24 * 3600, docker_host: str | None = None,
               engine_pool: EnginePool | None = None):
    import docker  # lazy: optional SDK
    self.limits = limits
    self.workdir = workdir_in_container
    self._closed = False
    pool = engine_pool
    if docker_host is None and pool is not None:
      docker_host = pool.acquire()
    self.docker_host = docker_host
    engine = docker_host or ""
    try:
      self._client = docker_client(docker_host)
      with _STATE_LOCK:
        reap = engine not in _REAPED
        _REAPED.add(engine)
      if reap:
        reaped = reap_orphan_containers(self._client)
        if reaped:
          log.warning("removed %d orphaned sandbox containers of dead processes from %s",
                      len(reaped), _engine_name(docker_host))
      try:
        image_bytes = int(self._client.images.get(image).attrs.get("Size") or 0)
      except docker.errors.ImageNotFound:
        raise SandboxError(f"docker image {image!r} not found on {_engine_name(docker_host)} "
                           "(images are never pulled; build the base one with dagger_jax.envs."
                           "sandbox.images.ensure_base_image, load task images on every engine)"
                           ) from None
      container = self._create(image, engine, max_lifetime_s, image_bytes)
    except BaseException:
      if pool is not None:
        pool.release(docker_host)
      raise
    self.container_id = container.id
    self._finalizer = weakref.finalize(self, _cleanup, self._client, container.id, pool,
                                       docker_host)
    self._disk_watch = not _STORAGE_QUOTA[engine]  # no engine quota: poll the writable layer
    self._disk_over = False
    self._disk_size = 0
    self._strikes = 0  # commands killed for writing while over the limit (_OVER_STRIKES)
    self._checked_at = 0.0  # when the writable layer was last sized (monotonic)
    self._unchecked_s = 0.0  # command time since then
    try:
      container.start()
      if host_workdir_to_copy_in is not None:
        self._put_tar(_tar_directory(host_workdir_to_copy_in))
    except BaseException:
      self.close()
      raise

  def _create(self, image: str, engine: str, max_lifetime_s: int, image_bytes: int):
    """Creates the container, with the engine's disk quota and our seccomp profile where the
    engine takes them (each probed once per engine: an engine that refuses one gets the
    container without it, and a log line says what that leaves out)."""
    import docker  # lazy: optional SDK
    mem = f"{self.limits.memory_mb}m"
    end = str(int(time.time() + max_lifetime_s))
    kwargs = dict(
        command=["bash", "-c", _DOCKER_INIT.replace("{end}", end)], working_dir=self.workdir,
        network_mode="none", mem_limit=mem, memswap_limit=mem,
        nano_cpus=int(self.limits.cpus * 1e9), pids_limit=self.limits.pids, auto_remove=True,
        stdin_open=True, environment=SANDBOX_ENV,
        ulimits=[docker.types.Ulimit(name="fsize", soft=self.limits.disk_mb * 2**20,
                                     hard=self.limits.disk_mb * 2**20)],
        labels={LABEL: "1", f"{LABEL}.host": socket.gethostname(),
                f"{LABEL}.pid": str(os.getpid()), f"{LABEL}.engine": engine})
    # (what we know of the engine, the option, the word its refusal names, the log level and
    # line without it: a disk quota is rare, the poll is the usual bound; a profile is the norm)
    options = [
        (_STORAGE_QUOTA, {"storage_opt": {"size": f"{self._quota_mb(engine, image_bytes)}M"}},
         "storage",
         logging.INFO, "has no disk quota for containers ({e}); sandboxes poll their "
         "writable layer against config.env.disk_mb instead"),
        (_SECCOMP, {"security_opt": [f"seccomp={seccomp.docker_profile_json()}"]}, "seccomp",
         logging.WARNING, "refuses a seccomp profile ({e}): fallocate(2) is not refused in "
         "its sandboxes, only the writable-layer poll bounds their disk"),
    ]
    while True:
      tried = [o for o in options if o[0].get(engine, True)]
      try:
        container = self._client.containers.create(
            image, **kwargs, **{k: v for o in tried for k, v in o[1].items()})
      except docker.errors.APIError as e:
        refused = [o for o in tried if o[2] in str(e).lower()]
        if not refused:
          raise
        for known, _, _, level, lost in refused:
          known[engine] = False
          log.log(level, "%s %s", _engine_name(engine or None), lost.format(e=e))
        continue
      for known, *_ in tried:
        known[engine] = True
      return container

  def _quota_mb(self, engine: str, image_bytes: int) -> int:
    """The engine quota that leaves the container `disk_mb` of its own: btrfs limits what the
    container's subvolume references, the image's files included (a quota below them refuses
    the container: "Failed to limit qgroup ... disk quota exceeded"); overlay2 on xfs and zfs
    count only what the container writes."""
    if engine not in _DRIVER:
      _DRIVER[engine] = str(self._client.info().get("Driver") or "")
    if _DRIVER[engine] == "btrfs":
      return self.limits.disk_mb + -(-image_bytes // 2**20)
    return self.limits.disk_mb

  def _put_tar(self, data: bytes, dest: str | None = None) -> None:
    if not self._client.api.put_archive(self.container_id, dest or self.workdir, data):
      raise SandboxError(f"copying files into container {self.container_id[:12]} failed")

  def run(self, command: str, timeout: float | None = None) -> ExecResult:
    if self._closed:
      raise SandboxError("run() on a closed sandbox")
    import docker  # lazy: optional SDK
    timeout = timeout or self.limits.command_timeout
    api = self._client.api
    start = time.monotonic()
    if self._disk_over:  # still over the limit? (deleting files is what the agent should do)
      self._disk_over = self._size_rw() > self._disk_limit
    started_over, size_at_start = self._disk_over, self._disk_size
    fsize = 0 if self._disk_over else self.limits.disk_mb * 1024
    try:
      exec_id = api.exec_create(self.container_id, ["bash", "-c", _DOCKER_EXEC, "bash",
                                                    no_nul(command), str(fsize)],
                                workdir=self.workdir, environment=SANDBOX_ENV, stdout=True,
                                stderr=True)["Id"]
      sock = api.exec_start(exec_id, socket=True)
    except docker.errors.APIError as e:
      raise SandboxError(f"docker exec in container {self.container_id[:12]} failed: {e}") from e
    raw = getattr(sock, "_sock", sock)
    cap = OutputCap(self.limits.max_output_chars)
    check, every = (self._over_disk if self._disk_watch else None), _DISK_POLL_S
    if started_over:  # it may only shrink the files; growth means its limit of 0 did not hold
      check, every = (lambda: self._size_rw() > size_at_start + _OVER_GROWTH), _OVER_POLL_S
    try:
      stop = _read_docker_stream(raw, cap, start + timeout, check, every)
      if stop:  # the deadline, or the disk limit: every process of the command dies
        self._kill_all(stream=raw)
    finally:
      raw.close()
    returncode = -9 if stop else self._exit_code(exec_id)
    if not stop and self._left_running():  # the exec's shell was killed (or replaced) before
      self._kill_all()                     # its own sweep
    # Sizing the layer costs an API call (~10-50 ms): after a command, only once the commands run
    # since the last look add up to half a poll period, which bounds what they can have written.
    self._unchecked_s += time.monotonic() - max(start, self._checked_at)
    over = stop == "disk" or (self._disk_watch and self._unchecked_s >= _DISK_POLL_S / 2
                              and self._over_disk())
    if started_over and stop == "disk":
      self._strikes += 1
      if self._strikes >= _OVER_STRIKES:
        self.close()
        raise SandboxError(
            f"container {self.container_id[:12]}: {self._strikes} commands wrote files while "
            f"the sandbox was over its disk limit of {self.limits.disk_mb} MB, past the file "
            f"size limit of 0 (the image's bash, which sets it, was replaced?); the sandbox is "
            f"closed")
      cap.feed(f"\n[sandbox] the command wrote files while the sandbox was over its disk "
               f"limit and was killed (strike {self._strikes}; at {_OVER_STRIKES} the sandbox "
               f"closes and the episode ends).".encode())
    if over:
      cap.feed(disk.note(self._disk_size, self._disk_limit, killed=stop == "disk").encode())
    output, elided = cap.result()
    return ExecResult(returncode=returncode, output=output, timed_out=stop == "timeout",
                      duration_s=time.monotonic() - start, elided_chars=elided,
                      over_limit="disk" if over else "")

  @property
  def _disk_limit(self) -> int:
    return self.limits.disk_mb * 1024 * 1024

  def _size_rw(self) -> int:
    """Bytes in the container's writable layer (the engine walks it; ~10 ms for small ones)."""
    rows = self._client.api.containers(all=True, filters={"id": self.container_id}, size=True)
    self._disk_size = int(rows[0].get("SizeRw") or 0) if rows else 0
    return self._disk_size

  def _over_disk(self) -> bool:
    self._disk_over = self._size_rw() > self._disk_limit
    self._checked_at, self._unchecked_s = time.monotonic(), 0.0
    return self._disk_over

  def _left_running(self) -> list[str]:
    """Pids of the container's live processes but PID 1, from the engine's `docker top` (ps
    run by the engine on its host: nothing of the image, which the agent may have replaced)."""
    procs = self._client.api.top(self.container_id, ps_args="-o pid,stat")["Processes"] or []
    return [p[0] for p in procs[1:] if not p[1].startswith("Z")]

  def _kill_all(self, stream: socket.socket | None = None) -> None:
    """SIGKILLs every process of the container but PID 1 and returns once `docker top` shows
    none left, so the next command starts in an empty container.

    PID 1 does the killing, on SIGUSR1 from the engine: no exec (which could not start while a
    fork bomb holds every pid) and no program of the image (which the agent may have replaced).
    `stream`: the killed command's output stream, read to its end (and dropped) after the
    signal: the engine reports no exec's exit while output it still holds goes unread."""
    import docker  # lazy: optional SDK
    api = self._client.api
    deadline = time.monotonic() + 15.0
    while True:
      try:
        api.kill(self.container_id, signal="SIGUSR1")
      except docker.errors.APIError as e:
        raise SandboxError(f"container {self.container_id[:12]} is gone: {e}") from e
      if stream is not None:
        _drain(stream, time.monotonic() + 10.0)
        stream = None
      resend = time.monotonic() + 1.0  # a process forked while PID 1 swept: sweep again
      while time.monotonic() < resend:
        if not self._left_running():
          time.sleep(0.05)  # PID 1 back in its `read` before the next exec starts
          return
        time.sleep(0.05)
      if time.monotonic() > deadline:
        raise SandboxError(f"could not kill the commands of container {self.container_id[:12]} "
                           f"within 15 s: {self._left_running()} are left")

  def _exit_code(self, exec_id: str) -> int:
    """The exit code of an exec whose output stream has ended (it may lag by a few ms)."""
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


def _drain(sock: socket.socket, deadline: float) -> None:
  """Reads `sock` to its end (or the deadline), dropping what it reads."""
  while time.monotonic() < deadline:
    if readable(sock.fileno(), min(0.5, max(0.0, deadline - time.monotonic()))):
      try:
        if not sock.recv(1 << 20):
          return
      except OSError:
        return


def _read_docker_stream(sock: socket.socket, cap: OutputCap, deadline: float,
                        check=None, every: float = 1.0) -> str:
  """Reads a multiplexed (non-tty) exec stream into `cap` until it ends; returns "" then,
  "timeout" when the deadline passed first, "disk" when `check()` (called every `every`
  seconds) said so first.

  Each frame is an 8-byte header (stream id, 3 zero bytes, big-endian payload size) + payload.
  """
  pending = b""
  next_check = time.monotonic() + every
  while True:
    now = time.monotonic()
    remaining = deadline - now
    if remaining <= 0:
      return "timeout"
    if check is not None and now >= next_check:
      next_check = now + every
      if check():
        return "disk"
    wait = remaining if check is None else min(remaining, max(0.0, next_check - now))
    if not readable(sock.fileno(), wait):
      continue
    chunk = sock.recv(1 << 16)
    if not chunk:
      return ""
    pending += chunk
    while len(pending) >= 8:
      size = int.from_bytes(pending[4:8], "big")
      if len(pending) < 8 + size:
        break
      cap.feed(pending[8:8 + size])
      pending = pending[8 + size:]
