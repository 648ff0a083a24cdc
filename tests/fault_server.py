"""A fault-injecting HTTP proxy for the remote policies' tests, scripted request by request.

It stands in front of a real server (`upstream`: the scripted teacher of
`scripted_teacher_server.py` for OpenAI's `/v1/chat/completions`, `dagger-jax serve` for SGLang's
`/generate`, `/update_weights_from_disk`, `/model_info`, ...) and passes each request through,
unless a fault is scripted for it:

    with FaultServer(upstream) as fs:
      fs.script("/generate", status(503, retry_after="1"), drop_mid_body())  # the next 2 calls
      fs.always("/v1/chat/completions", status(500), when=lambda body: "def shift(" in str(body))
      SGLangPolicy(fs.url, ...)            # or OpenAICompatPolicy with teacher.url = fs.url + "/v1"
      fs.requests("/generate")             # what each call got: Record(arrived, fault, status)

Faults (a `forward=True` one lets the upstream act on the request first, e.g. load the weights,
and then answers with the fault instead of the upstream's answer):

    status(code, retry_after=None)   that status with an OpenAI/SGLang-shaped error body
    hang(seconds)                    answers (504, or forward=True: the upstream's answer) only
                                     after `seconds`, past the client's timeout
    trickle(seconds)                 the upstream's answer, its body spread over `seconds`
    drop()                           closes the connection without an answer
    drop_mid_body()                  the upstream's status and headers, half its body, then closes
    garbage()                        200 with a body that is not JSON (a cut-off JSON object)
    reply(body, code=200)            that JSON body
    edit(fn)                         the upstream's JSON answer passed through `fn` (an empty or
                                     truncated completion, a label without a command block, ...)

It is a fixture, not code under test: the clients speak real HTTP to it over real sockets.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import http.server
import json
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable

from local_server import LocalServer

GARBAGE = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "THOU'


@dataclasses.dataclass(frozen=True)
class Fault:
  kind: str
  code: int = 200
  retry_after: str | None = None
  seconds: float = 0.0
  body: Any = None
  fn: Callable[[Any], Any] | None = None
  forward: bool = False  # the upstream acts on the request before the fault answers it

  def __str__(self) -> str:
    return self.kind if self.kind != "status" else f"status {self.code}"


def status(code: int, retry_after: str | None = None, *, message: str = "injected fault",
           forward: bool = False) -> Fault:
  return Fault("status", code=code, retry_after=retry_after, forward=forward,
               body={"error": {"message": f"{message} (HTTP {code})", "code": code}})


def hang(seconds: float, *, forward: bool = False) -> Fault:
  return Fault("hang", seconds=seconds, forward=forward)


def trickle(seconds: float) -> Fault:
  return Fault("trickle", seconds=seconds, forward=True)


def drop(*, forward: bool = False) -> Fault:
  return Fault("drop", forward=forward)


def drop_mid_body() -> Fault:
  return Fault("drop_mid_body", forward=True)


def garbage(*, forward: bool = False) -> Fault:
  return Fault("garbage", forward=forward)


def reply(body: Any, code: int = 200, *, forward: bool = False) -> Fault:
  return Fault("reply", code=code, body=body, forward=forward)


def edit(fn: Callable[[Any], Any]) -> Fault:
  return Fault("edit", fn=fn, forward=True)


def chat_completion(content: str | None, finish_reason: str = "stop") -> dict:
  """An OpenAI chat completion whose message is `content`."""
  return {"id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": "fault",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                       "finish_reason": finish_reason}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


@dataclasses.dataclass
class Record:
  method: str
  path: str
  body: Any
  arrived: float  # time.monotonic()
  fault: Fault | None
  status: int | None = None  # None: no status line was sent


class FaultServer(LocalServer):
  """The proxy (module docstring); `url` is its base, e.g. http://127.0.0.1:PORT."""

  url_path, thread_name = "", "fault-server"

  def handler(self):
    return _Handler

  def __init__(self, upstream: str | None = None, upstream_timeout_s: float = 120.0):
    self.upstream = urllib.parse.urlsplit(upstream) if upstream else None
    self.upstream_timeout_s = upstream_timeout_s
    self.lock = threading.Lock()
    self.log: list[Record] = []
    self._scripts: dict[str, collections.deque[Fault]] = collections.defaultdict(
        collections.deque)
    self._rules: list[tuple[str, Fault, Callable[[Any], bool]]] = []

  # --- scripting

  def script(self, path: str, *faults: Fault) -> None:
    """The next requests to `path` get `faults`, one each, in order; later ones pass."""
    with self.lock:
      self._scripts[path].extend(faults)

  def always(self, path: str, fault: Fault, when: Callable[[Any], bool] = lambda body: True
             ) -> None:
    """Every request to `path` whose JSON body satisfies `when` gets `fault` (before scripts)."""
    with self.lock:
      self._rules.append((path, fault, when))

  def clear(self) -> None:
    """No more faults: every request passes."""
    with self.lock:
      self._scripts.clear()
      self._rules.clear()

  def requests(self, path: str) -> list[Record]:
    with self.lock:
      return [r for r in self.log if r.path == path]

  def gaps(self, path: str) -> list[float]:
    """Seconds between consecutive arrivals of requests to `path`."""
    times = [r.arrived for r in self.requests(path)]
    return [b - a for a, b in zip(times, times[1:])]

  def _take(self, path: str, body: Any) -> Fault | None:
    with self.lock:
      for rule_path, fault, when in self._rules:
        if rule_path == path and when(body):
          return fault
      queue = self._scripts.get(path)
      return queue.popleft() if queue else None

  # --- lifecycle

  # --- the upstream

  def forward(self, method: str, path: str, raw: bytes, headers) -> tuple[int, dict, bytes]:
    """(status, headers, body) of the upstream's answer to the same request."""
    if self.upstream is None:
      return 502, {"Content-Type": "application/json"}, b'{"error": "no upstream"}'
    conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port,
                                      timeout=self.upstream_timeout_s)
    try:
      sent = {k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization")}
      conn.request(method, path, body=raw if method == "POST" else None, headers=sent)
      answer = conn.getresponse()
      data = answer.read()
      kept = {k: v for k, v in answer.getheaders()
              if k.lower() in ("content-type", "retry-after")}
      return answer.status, kept, data
    finally:
      conn.close()


class _Handler(http.server.BaseHTTPRequestHandler):
  owner: FaultServer
  protocol_version = "HTTP/1.1"

  def log_message(self, *args) -> None:  # quiet
    pass

  def do_GET(self) -> None:  # noqa: N802
    self._serve()

  def do_POST(self) -> None:  # noqa: N802
    self._serve()

  def _serve(self) -> None:
    owner = self.owner
    raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    path = urllib.parse.urlsplit(self.path).path
    try:
      body = json.loads(raw) if raw else None
    except ValueError:
      body = None
    fault = owner._take(path, body)
    record = Record(self.command, path, body, time.monotonic(), fault)
    with owner.lock:
      owner.log.append(record)
    try:
      self._answer(fault, record, raw)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up first (its timeout)
      self.close_connection = True

  def _answer(self, fault: Fault | None, record: Record, raw: bytes) -> None:
    owner = self.owner
    upstream = None
    if fault is None or fault.forward or fault.kind in ("trickle", "drop_mid_body", "edit"):
      upstream = owner.forward(self.command, self.path, raw, self.headers)
    if fault is None:
      self._send(record, *upstream)
      return
    kind = fault.kind
    if kind == "hang":  # the client has given up by now; the upstream never saw it unless forward
      time.sleep(fault.seconds)
      self._send(record, *(upstream or (504, {}, b"")))
    elif kind == "status":
      headers = {"Content-Type": "application/json"}
      if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
      self._send(record, fault.code, headers, json.dumps(fault.body).encode())
    elif kind == "reply":
      self._send(record, fault.code, {"Content-Type": "application/json"},
                 json.dumps(fault.body).encode())
    elif kind == "garbage":
      self._send(record, 200, {"Content-Type": "application/json"}, GARBAGE)
    elif kind == "edit":
      code, headers, data = upstream
      self._send(record, code, headers, json.dumps(fault.fn(json.loads(data))).encode())
    elif kind == "drop":
      self._hang_up()
    elif kind == "drop_mid_body":
      code, headers, data = upstream
      self._send(record, code, headers, data, cut=len(data) // 2)
      self._hang_up()
    elif kind == "trickle":
      self._send(record, *upstream, spread_s=fault.seconds)
    else:
      raise ValueError(f"unknown fault {kind!r}")

  def _send(self, record: Record, code: int, headers: dict, data: bytes, *,
            cut: int | None = None, spread_s: float = 0.0) -> None:
    record.status = code
    self.send_response(code)
    for k, v in headers.items():
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))  # the whole body's, even when cut
    self.end_headers()
    if cut is not None:
      self.wfile.write(data[:cut])
      self.wfile.flush()
      return
    if not spread_s:
      self.wfile.write(data)
      return
    pieces = max(1, min(len(data), 20))
    step = -(-len(data) // pieces)
    for start in range(0, len(data), step):
      time.sleep(spread_s / pieces)
      self.wfile.write(data[start:start + step])
      self.wfile.flush()

  def _hang_up(self) -> None:
    self.close_connection = True
    try:
      self.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass
