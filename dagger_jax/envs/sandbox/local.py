"""`UnsafeLocalSandbox`: a plain subprocess in the host tree, no isolation; warns loudly.

For trusted, scripted commands only (`config.env.sandbox=unsafe_local`, an explicit opt-in).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings

from dagger_jax.envs.sandbox.base import (SANDBOX_ENV, ExecResult, Sandbox, SandboxError,
                                          SandboxLimits, no_nul, write_host_file)
from dagger_jax.envs.sandbox.process import run_process

log = logging.getLogger(__name__)


class UnsafeLocalSandbox(Sandbox):
  """Runs commands as plain subprocesses in `host_workdir`: NO isolation. Explicit opt-in only."""

  def __init__(self, host_workdir: str, limits: SandboxLimits, *,
               scratch_dir: str | None = None):
    msg = ("UNSAFE SANDBOX: config.env.sandbox=unsafe_local runs agent commands directly on this "
           f"machine in {host_workdir}, with no isolation (no read-only root, network on). Use it "
           "only for trusted, scripted commands.")
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    log.warning(msg)
    self.workdir = os.path.abspath(host_workdir)
    self.limits = limits
    self._tmp = tempfile.mkdtemp(prefix=f"dagger-jax-tmp-{os.getpid()}-", dir=scratch_dir)
    self._env = dict(SANDBOX_ENV, HOME=self._tmp, TMPDIR=self._tmp)
    self._closed = False

  def run(self, command: str, timeout: float | None = None) -> ExecResult:
    if self._closed:
      raise SandboxError("run() on a closed sandbox")
    return run_process(["bash", "-lc", no_nul(command)], env=self._env, cwd=self.workdir,
                       timeout=timeout or self.limits.command_timeout,
                       max_output_chars=self.limits.max_output_chars)

  def write_file(self, path: str, data: bytes) -> None:
    write_host_file(self.workdir, path, data)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      shutil.rmtree(self._tmp, ignore_errors=True)
