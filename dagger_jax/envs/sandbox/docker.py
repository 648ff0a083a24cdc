"""`DockerSandbox`: one container per sandbox from an image; `docker_client` for the engine.

One container per sandbox from an image, `--network none`, memory/CPU/pids limits, one `exec` per
command; the container is removed on close, on garbage collection, at interpreter exit, and,
should the process be SIGKILLed, by the next DockerSandbox of this host (orphan reaping by label);
its PID 1 also exits by itself after `max_lifetime_s`. Images are never pulled: the base image is
built offline by `images.ensure_base_image`.

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

from dagger_jax.envs.sandbox.base import (SANDBOX_ENV, ExecResult, Sandbox, SandboxError,
                                          SandboxLimits, no_nul)
from dagger_jax.envs.sandbox.process import OutputCap, pid_alive, readable

log = logging.getLogger(__name__)

LABEL = "dagger-jax.sandbox"  # every container we create carries it (orphan reaping)
_REAPED_ONCE = threading.Event()


def docker_client():
  """A docker SDK client that has answered a ping, or SandboxError saying what to install/start."""
  try:
    import docker  # lazy: the optional docker SDK (see the module docstring)
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
  client = client or docker_client()
  host = socket.gethostname()
  removed = []
  for c in client.containers.list(all=True, filters={"label": f"{LABEL}.host={host}"}):
    pid = int(c.labels.get(f"{LABEL}.pid", "0") or 0)
    if pid and not pid_alive(pid):
      _remove_container(client, c.id)
      removed.append(c.id)
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

  def __init__(self, image: str, workdir_in_container: str = "/testbed", *,
               limits: SandboxLimits, host_workdir_to_copy_in: str | None = None,
               max_lifetime_s: int = 24 * 3600):
    import docker  # lazy: optional SDK
    self.limits = limits
    self.workdir = workdir_in_container
    self._closed = False
    self._client = docker_client()
    if not _REAPED_ONCE.is_set():
      _REAPED_ONCE.set()
      reaped = reap_orphan_containers(self._client)
      if reaped:
        log.warning("removed %d orphaned sandbox containers of dead processes", len(reaped))
    try:
      self._client.images.get(image)
    except docker.errors.ImageNotFound:
      raise SandboxError(f"docker image {image!r} not found locally (images are never pulled; "
                         "build the base one with dagger_jax.envs.sandbox.images.ensure_base_image)"
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
    import docker  # lazy: optional SDK
    timeout = timeout or self.limits.command_timeout
    api = self._client.api
    start = time.monotonic()
    try:
      exec_id = api.exec_create(self.container_id, ["bash", "-c", _DOCKER_EXEC, "bash",
                                                    no_nul(command)],
                                workdir=self.workdir,
                                environment=SANDBOX_ENV, stdout=True, stderr=True)["Id"]
      sock = api.exec_start(exec_id, socket=True)
    except docker.errors.APIError as e:
      raise SandboxError(f"docker exec in container {self.container_id[:12]} failed: {e}") from e
    raw = getattr(sock, "_sock", sock)
    cap = OutputCap(self.limits.max_output_chars)
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


def _read_docker_stream(sock: socket.socket, cap: OutputCap, deadline: float) -> bool:
  """Reads a multiplexed (non-tty) exec stream into `cap`; False when the deadline passed first.

  Each frame is an 8-byte header (stream id, 3 zero bytes, big-endian payload size) + payload.
  """
  pending = b""
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return False
    ready = readable(sock.fileno(), remaining)
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

