"""The sandbox interface every backend implements, its limits, its result type and its error.

Also the two rules every backend applies the same way: a command is a bash string with no NUL
(`no_nul`), and `write_file` paths stay inside the working tree (`write_host_file` for backends
whose tree lives on the host).
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any

from dagger_jax.errors import DaggerJaxError

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


class SandboxError(DaggerJaxError, RuntimeError):
  """The sandbox itself failed (could not start, lost its container, ...); not a command failure."""


MIN_CAPTURE_CHARS = 1_000_000  # what a sandbox keeps of a command's output, at least


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  """Per-command and per-sandbox resource limits.

  `max_output_chars` is the capture cap of the sandbox (memory safety), not what the agent sees:
  the observation is cut further by `protocol.format_observation(output_limit=...)` with
  `config.env.output_limit`.
  """
  command_timeout: float  # wall-clock seconds per command
  max_output_chars: int
  memory_mb: int
  cpus: float
  pids: int
  disk_mb: int  # the sandbox's own files (task tree, /tmp, a container's writable layer)

  def __post_init__(self):
    for name in ("command_timeout", "max_output_chars", "memory_mb", "cpus", "pids", "disk_mb"):
      if not getattr(self, name) > 0:
        raise ValueError(f"SandboxLimits.{name}={getattr(self, name)!r}: must be > 0")

  @classmethod
  def from_config(cls, env_config: Any, **overrides) -> SandboxLimits:
    """From `config.env` (command_timeout, memory_mb, cpus, pids, disk_mb); the capture cap is at
    least 4 x `config.env.output_limit` so the observation's head and tail are always exact."""
    cap = max(MIN_CAPTURE_CHARS, 4 * int(env_config.output_limit))
    kw = dict(command_timeout=float(env_config.command_timeout), max_output_chars=cap,
              memory_mb=int(env_config.memory_mb), cpus=float(env_config.cpus),
              pids=int(env_config.pids), disk_mb=int(env_config.disk_mb))
    kw.update(overrides)
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class ExecResult:
  returncode: int  # the command's exit status; -9 (SIGKILL) after a timeout
  output: str  # stdout+stderr interleaved, decoded as UTF-8 (invalid bytes replaced), capped
  timed_out: bool
  duration_s: float
  elided_chars: int = 0  # characters dropped from the middle of `output` by the capture cap
  # "disk" when the sandbox's files were over `SandboxLimits.disk_mb` after the command (it was
  # killed if it was still running; `output` ends with a line saying so); "" otherwise.
  over_limit: str = ""


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


def no_nul(command: str) -> str:
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


def write_host_file(root: str, relpath: str, data: bytes) -> None:
  """Writes `data` to root/relpath (refused when it leaves root), creating parent directories."""
  target = _safe_join(root, relpath)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with open(target, "wb") as f:
    f.write(data)
