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

- `BwrapSandbox` (bwrap.py, limits through cgroup.py): bubblewrap over the host task tree;
  read-only system, private /tmp, no network, own namespaces.
- `DockerSandbox` (docker.py; base image from images.py): one container per sandbox, on the
  engine `config.env.docker_hosts` assigns (engines.py: the least loaded of the list), else on
  DOCKER_HOST / the local socket.
- `UnsafeLocalSandbox` (local.py): a plain subprocess in the host tree, no isolation.

The interface, limits and errors are in base.py; output capture, process groups and the reaping
of state left by SIGKILLed processes in process.py; the disk limit in disk.py and seccomp.py.
This module picks one (`make_sandbox`) and re-exports the public names.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from dagger_jax.envs.sandbox import engines, images
from dagger_jax.envs.sandbox.base import (SANDBOX_ENV, ExecResult, Sandbox, SandboxError,
                                          SandboxLimits)
from dagger_jax.envs.sandbox.bwrap import BWRAP_INSTALL_HINT, BwrapSandbox, check_bwrap
from dagger_jax.envs.sandbox.docker import (LABEL, DockerSandbox, docker_client,
                                            reap_orphan_containers)
from dagger_jax.envs.sandbox.local import UnsafeLocalSandbox
from dagger_jax.envs.sandbox.process import reap_stale
from dagger_jax.errors import ConfigError

__all__ = [
    "BWRAP_INSTALL_HINT", "LABEL", "SANDBOX_ENV", "BwrapSandbox", "DockerSandbox", "ExecResult",
    "Sandbox", "SandboxError", "SandboxLimits", "UnsafeLocalSandbox", "check_bwrap",
    "check_available", "docker_client", "make_sandbox", "reap_orphan_containers", "reap_stale",
    "scratch_dir",
]


def check_available(env_config: Any) -> None:
  """Raises `SandboxError` (what to install or start) unless `config.env.sandbox` can run here:
  bwrap installed and allowed, or the docker engine answering. Long jobs call it first, so a
  missing tool fails the command at once instead of every task one by one."""
  if env_config.sandbox == "bwrap":
    check_bwrap()
  elif env_config.sandbox == "docker":
    for host in tuple(env_config.docker_hosts) or (None,):
      docker_client(host)
  scratch_dir(env_config)


def scratch_dir(env_config: Any) -> str:
  """Where sandbox state and task checkouts go: `config.env.scratch_dir`, else the system's
  temporary directory. A tmpfs (`/dev/shm`) makes the many small files of toy episodes cheap to
  create and remove (a grading ~35% faster on this project's CI machine); keep real repositories,
  which can be large, on disk."""
  path = env_config.scratch_dir or tempfile.gettempdir()
  if not os.path.isdir(path):
    raise SandboxError(f"config.env.scratch_dir={path!r} is not a directory")
  return path


def make_sandbox(env_config: Any, host_workdir: str | None = None, *, image: str | None = None,
                 workdir: str = "/testbed", **limit_overrides) -> Sandbox:
  """The sandbox `config.env.sandbox` names (bwrap | docker | unsafe_local), limits from config.env.

  bwrap / unsafe_local run over `host_workdir`; docker starts `image` (the base image when None)
  and copies `host_workdir` in when given, on the least loaded engine of `config.env.docker_hosts`
  (DOCKER_HOST / the local socket when it is empty).
  """
  limits = SandboxLimits.from_config(env_config, **limit_overrides)
  kind = env_config.sandbox
  scratch = scratch_dir(env_config)
  if kind == "bwrap":
    if host_workdir is None:
      raise ValueError("make_sandbox: config.env.sandbox=bwrap needs a host_workdir")
    return BwrapSandbox(host_workdir, limits, workdir=workdir, scratch_dir=scratch)
  if kind == "docker":
    hosts = tuple(env_config.docker_hosts)
    pool = engines.pool_for(hosts) if hosts else None
    host = pool.acquire() if pool else None
    try:
      if image is None:
        image = images.ensure_base_image(docker_host=host)
    except BaseException:
      if pool is not None:
        pool.release(host)
      raise
    return DockerSandbox(image, workdir, limits=limits, host_workdir_to_copy_in=host_workdir,
                         docker_host=host, engine_pool=pool)  # it gives the lease back
  if kind == "unsafe_local":
    if host_workdir is None:
      raise ValueError("make_sandbox: config.env.sandbox=unsafe_local needs a host_workdir")
    return UnsafeLocalSandbox(host_workdir, limits, scratch_dir=scratch)
  raise ConfigError(f"config.env.sandbox={kind!r}: must be one of "
                    "('bwrap', 'docker', 'unsafe_local')")
