"""Rollout servers as processes: start one from a command template, wait until it answers,
stop it on every way out. Used for SGLang (`config.rollout.sglang_launch`) and for
`dagger-jax serve`, which speaks the same API.

    with LaunchedServer("{python} -m dagger_jax.cli serve --model {model} --port {port}",
                        "run/rollout/round_000", "http://127.0.0.1:30000", "run/sglang.log",
                        600.0) as server:
      ...                                   # GET /health answered 200
    wait_healthy("http://127.0.0.1:30000", 30.0)   # a server someone else started

A launched server runs in its own process group with its log in a file; `close()` (also the
context manager, garbage collection and interpreter exit) sends SIGTERM to the group, then
SIGKILL; a watchdog in the group stops it when the launching process dies by SIGKILL.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import weakref

import requests

from dagger_jax import redact
from dagger_jax.errors import ConfigError, DaggerJaxError

log = logging.getLogger(__name__)

FIX = ("start one with `dagger-jax serve --model DIR --port P` (or `python -m "
       "sglang.launch_server --model-path DIR --port P`), or set config.rollout.sglang_launch so "
       "that the run starts it")


class SGLangError(DaggerJaxError, RuntimeError):
  """An SGLang server is unreachable, refused a request or answered something unusable; the
  message names the URL, what it said, and the fix."""


def connection_reason(error: Exception | None) -> str:
  """The innermost cause of a requests connection error (e.g. 'Connection refused')."""
  text = str(error)
  for marker in ("Connection refused", "Name or service not known", "timed out",
                 "Connection reset", "Remote end closed"):
    if marker in text:
      return marker
  return redact.redact_text(text[:300])


# ----------------------------------------------------------------------------- servers


def wait_healthy(url: str, timeout_s: float, *, process: subprocess.Popen | None = None,
                 log_path: str | None = None) -> None:
  """Returns once `GET url/health` answers 200; raises SGLangError after `timeout_s` seconds,
  or as soon as `process` (a server being launched) exits."""
  endpoint = url.rstrip("/")
  url = redact.display_url(endpoint)  # in messages
  deadline = time.monotonic() + timeout_s
  last = "no answer yet"
  with requests.Session() as session:
    while True:
      if process is not None and process.poll() is not None:
        raise SGLangError(f"the server command exited with code {process.returncode} before "
                          f"{url}/health answered{_log_tail(log_path)}")
      try:
        response = session.get(f"{endpoint}/health", timeout=(2.0, 10.0))
        if response.status_code == 200:
          return
        last = f"HTTP {response.status_code}"
      except requests.exceptions.RequestException as e:
        last = connection_reason(e)
      if time.monotonic() > deadline:
        if process is not None:
          raise SGLangError(f"the launched server did not answer {url}/health with 200 within "
                            f"{timeout_s:g} s (last: {last}): raise "
                            f"config.rollout.startup_timeout_s or read its log"
                            f"{_log_tail(log_path)}")
        raise SGLangError(f"no SGLang server answered {url}/health with 200 within "
                          f"{timeout_s:g} s (last: {last}): {FIX}")
      time.sleep(0.25)


def _log_tail(log_path: str | None, lines: int = 20) -> str:
  if not log_path or not os.path.isfile(log_path):
    return ""
  with open(log_path, "rb") as f:
    f.seek(max(0, os.path.getsize(log_path) - 16_000))
    tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
  return f". Last lines of {log_path}:\n" + redact.redact_text("\n".join(tail))


def _port_in_use(host: str, port: int) -> bool:
  try:
    with socket.create_connection((host, port), timeout=1.0):
      return True
  except OSError:
    return False


# The process a launch starts: it runs the server command as its child, exits with its code, and
# stops the whole process group (SIGTERM, then SIGKILL) once the process that launched it is gone,
# even by SIGKILL, where no atexit hook runs. It ignores SIGTERM itself, so that `close()`'s
# SIGTERM to the group reaches the server while the watchdog waits for it to exit.
# argv: launcher pid, grace seconds, the server command.
WATCHDOG = r"""
import os, signal, subprocess, sys, time
launcher, grace, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
server = subprocess.Popen(argv)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while server.poll() is None:
  if os.getppid() != launcher:
    print(f"watchdog: the launcher (pid {launcher}) is gone; stopping the server", flush=True)
    os.killpg(0, signal.SIGTERM)
    try:
      server.wait(grace)
    finally:
      os.killpg(0, signal.SIGKILL)
  time.sleep(0.2)
sys.exit(server.returncode)
"""


def _stop_group(process: subprocess.Popen, log_file, grace_s: float) -> None:
  """SIGTERM to the process group, SIGKILL to what is left after `grace_s` seconds. Not a method:
  weakref.finalize must not hold the server object."""
  try:
    if process.poll() is None:
      try:
        os.killpg(process.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
      try:
        process.wait(grace_s)
      except subprocess.TimeoutExpired:
        pass
    try:  # the group's other processes (SGLang's scheduler and detokenizer), and a stuck leader
      os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    if process.poll() is None:
      process.kill()
    try:
      process.wait(30)
    except subprocess.TimeoutExpired:
      log.error("server pid %d did not exit after SIGKILL", process.pid)
  finally:
    log_file.close()


class LaunchedServer:
  """A server started from a command template (`config.rollout.sglang_launch`).

    with LaunchedServer(config.rollout.sglang_launch, hf_dir, config.rollout.sglang_url,
                        os.path.join(workdir, "sglang.log"),
                        config.rollout.startup_timeout_s).start() as server:
      ...

  The template's `{model}` is `model_dir`, `{port}` the URL's port, `{host}` its host and
  `{python}` this interpreter (values are shell-quoted; the command runs without a shell).
  """

  GRACE_S = 20.0  # seconds between SIGTERM and SIGKILL

  def __init__(self, template: str, model_dir: str, url: str, log_path: str,
               startup_timeout_s: float):
    self.template = template
    self.model_dir = os.path.abspath(model_dir)
    self.url = url.rstrip("/")
    self.log_path = os.path.abspath(log_path)
    self.startup_timeout_s = float(startup_timeout_s)
    parsed = urllib.parse.urlparse(self.url)
    if not parsed.hostname or not parsed.port:
      raise ConfigError(f"config.rollout.sglang_url={redact.display_url(url)!r}: a launched "
                        f"server needs an explicit host and port, e.g. 'http://127.0.0.1:30000'")
    self.host, self.port = parsed.hostname, parsed.port
    self.process: subprocess.Popen | None = None
    self._finalizer: weakref.finalize | None = None

  def command(self) -> list[str]:
    """The command line: the template formatted and split like a shell would."""
    values = {"model": shlex.quote(self.model_dir), "port": str(self.port),
              "host": shlex.quote(self.host), "python": shlex.quote(sys.executable)}
    try:
      line = self.template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
      raise ConfigError(f"config.rollout.sglang_launch={redact.redact_text(self.template)!r}: "
                        f"cannot fill it in ({type(e).__name__}: {e}); it may use {{model}}, "
                        f"{{port}}, {{host}} and {{python}} (write a literal brace as {{{{ or "
                        f"}}}})") from None
    argv = shlex.split(line)
    if not argv:
      raise ConfigError("config.rollout.sglang_launch is empty")
    return argv

  def start(self) -> "LaunchedServer":
    if self.process is not None:
      raise SGLangError(f"the server for {redact.display_url(self.url)} is already started "
                        f"(pid {self.process.pid})")
    argv = self.command()
    if _port_in_use(self.host, self.port):
      raise SGLangError(f"{self.host}:{self.port} is already in use, so a server launched from "
                        f"config.rollout.sglang_launch could not listen there (and another one "
                        f"would answer in its place): stop what runs there, or choose another "
                        f"port in config.rollout.sglang_url")
    os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
    log_file = open(self.log_path, "ab")
    shown = redact.redact_text(shlex.join(argv))  # the log is in the run: no --api-key KEY
    log_file.write(f"\n==> {shown}\n".encode())
    log_file.flush()
    try:
      self.process = subprocess.Popen(
          [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(self.GRACE_S), *argv],
          stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
          start_new_session=True)
    except OSError as e:
      log_file.close()
      raise SGLangError(f"config.rollout.sglang_launch: cannot run {argv[0]!r}: "
                        f"{redact.redact_text(str(e))}") from None
    self._finalizer = weakref.finalize(self, _stop_group, self.process, log_file, self.GRACE_S)
    log.info("started %s (pid %d), log %s", shown, self.process.pid, self.log_path)
    try:
      wait_healthy(self.url, self.startup_timeout_s, process=self.process,
                   log_path=self.log_path)
    except BaseException:
      self.close()
      raise
    return self

  @property
  def pid(self) -> int | None:
    """The launched process (the watchdog running the command): the process group's id."""
    return None if self.process is None else self.process.pid

  def close(self) -> None:
    """Stops the server and every process of its group (idempotent)."""
    if self._finalizer is not None:
      self._finalizer()

  def __enter__(self) -> "LaunchedServer":
    return self if self.process is not None else self.start()

  def __exit__(self, *exc) -> None:
    self.close()
