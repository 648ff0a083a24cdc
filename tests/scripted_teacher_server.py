"""A scripted teacher served over a real OpenAI-compatible HTTP API, for tests.

A stdlib `ThreadingHTTPServer` in a background thread answers `POST /v1/chat/completions` and
`GET /v1/models` in OpenAI's shape. Its labels come from the conversation text alone
(`scripted_label`): the straight path of `policies/oracle.py` on a `toy` or `toy-rewrite` task
(find the function the statement names, edit the line after its def as the statement says, run
the tests, submit when they pass, restore and edit again when they fail). It can be told to misbehave:

    with ScriptedTeacherServer(api_key="sk-test") as server:   # 401 without that key
      server.fail(503, times=2, retry_after="1")               # the next 2 requests fail
      server.malformed(1)                                      # then 1 label without a block
      server.malformed_for.add("def shift(")                   # every label of that task
      server.reject_for.add("def shift(")                      # 400 for every request of it
      teacher.url = server.url                                 # http://127.0.0.1:PORT/v1
      ...
      server.arrivals, server.max_in_flight, server.labels     # what it saw and sent

It is a fixture, not the policy under test: `OpenAICompatPolicy` speaks real HTTP to it.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from typing import Any, Callable

from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from local_server import LocalServer

MODEL = "scripted-toy-teacher"
MALFORMED = "THOUGHT: I would list the files now, but I forgot the command block."


def _steps(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
  """(command, the observation that followed) of each assistant turn that parsed."""
  out = []
  for i, m in enumerate(messages):
    if m["role"] == "assistant":
      command = protocol.parse_action(m["content"]).command
      if command is not None:
        nxt = messages[i + 1]["content"] if i + 1 < len(messages) else ""
        out.append((command, nxt))
  return out


def scripted_label(messages: list[dict[str, str]]) -> str:
  """The next assistant turn on a `toy` or `toy-rewrite` task, read off the conversation alone.

  The function and its correct line (or span to replace) come from the statement (the first user
  message), the path from grep's answer; the test output says whether to submit or restore.
  """
  statement = next((m["content"] for m in messages if m["role"] == "user"), "")
  function = re.search(r"`def (\w+)\(", statement)
  span = re.search(r"`s\|([^|`]+)\|([^|`]+)\|`", statement)  # toy-rewrite
  new_line = re.search(r"\n\n    (.+)\n", statement)  # toy
  if not function or not (span or new_line):
    return protocol.format_action("ls", "THOUGHT: The issue names no function; look around.")
  function = function.group(1)
  edit = f"s|{span[1]}|{span[2]}|" if span else f"s/.*/    {new_line.group(1)}/"
  steps = _steps(messages)
  paths = [m.group(1) for c, obs in steps if c.startswith("grep")
           for m in [re.search(r"^(\./\S+\.py):\d+:def ", obs, re.M)] if m]
  grep = protocol.format_action(f'grep -rn "def {function}(" .',
                                "THOUGHT: Find the function the issue names.")
  fix = (protocol.format_action(f"sed -i '/def {function}(/{{n;{edit}}}' {paths[-1]}",
                                "THOUGHT: Replace the line after the def.")
         if paths else grep)
  if not steps:
    return grep
  last, observation = steps[-1]
  if last.startswith(("grep", "git checkout")):
    return fix
  if last.startswith("sed -i"):
    return protocol.format_action(toy.TEST_CMD, "THOUGHT: Run the tests to check the change.")
  if last == toy.TEST_CMD:
    if observation.startswith("<returncode>0</returncode>"):
      return protocol.format_action(f"echo {protocol.SUBMIT_SENTINEL}",
                                    "THOUGHT: The tests pass. Submit.")
    return protocol.format_action("git checkout -- .",
                                  "THOUGHT: The change broke the tests. Restore the files.")
  return grep


def _words(text: str) -> int:
  return len(text.split())


class ScriptedTeacherServer(LocalServer):
  """The server (module docstring). Everything it records is guarded by `lock`."""

  url_path, thread_name = "/v1", "scripted-teacher"

  def handler(self):
    return _Handler

  def __init__(self, *, api_key: str | None = None, delay_s: float = 0.0, usage: bool = True,
               think: bool = False, model: str = MODEL):
    self.api_key = api_key
    self.delay_s = delay_s  # each completion is held this long (to see requests overlap)
    self.usage = usage  # send the `usage` field
    self.think = think  # wrap each label in reasoning the client must drop
    self.model = model
    self.lock = threading.Lock()
    self._failures: list[tuple[int, Any, str]] = []
    self._malformed = 0
    self.malformed_for: set[str] = set()  # always malformed when the statement holds one
    self.reject_for: set[str] = set()  # always 400 (over the context) when it holds one
    self.bodies: list[dict] = []  # every chat request's body, in arrival order
    self.arrivals: list[float] = []  # time.monotonic() of each chat request
    self.statuses: list[int] = []  # the status each chat request got
    self.authorizations: list[str | None] = []  # each chat request's Authorization header
    self.labels: list[str] = []  # the content of each completion sent
    self.usage_sent = {"prompt_tokens": 0, "completion_tokens": 0}
    self.in_flight = 0
    self.max_in_flight = 0

  # --- control

  def fail(self, status: int, times: int = 1, *, retry_after: str | Callable[[], str] | None = None,
           message: str = "the server is overloaded") -> None:
    """The next `times` chat requests get `status` (with `Retry-After` when given; a callable is
    called when the response is sent, e.g. for an HTTP date)."""
    with self.lock:
      self._failures += [(status, retry_after, message)] * times

  def malformed(self, times: int) -> None:
    """The next `times` completions carry a label without a command block."""
    with self.lock:
      self._malformed += times

  @property
  def requests(self) -> int:
    with self.lock:
      return len(self.bodies)

  # --- answering

  def complete(self, body: dict, authorization: str | None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) for one chat request."""
    with self.lock:
      self.bodies.append(body)
      self.arrivals.append(time.monotonic())
      self.authorizations.append(authorization)
    if self.api_key is not None and authorization != f"Bearer {self.api_key}":
      given = (authorization or "").removeprefix("Bearer ")
      return 401, {}, _error(f"Incorrect API key provided: {given!r}.", "invalid_api_key")
    with self.lock:
      failure = self._failures.pop(0) if self._failures else None
    if failure is not None:
      status, retry_after, message = failure
      headers = {}
      if retry_after is not None:
        headers["Retry-After"] = retry_after() if callable(retry_after) else retry_after
      return status, headers, _error(message, str(status))
    if body.get("model") != self.model:
      return 404, {}, _error(f"The model `{body.get('model')}` does not exist.", "model_not_found")
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages or
        not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)):
      return 400, {}, _error("'messages' must be a non-empty list of {role, content}", "invalid")
    statement = next((m["content"] for m in messages if m["role"] == "user"), "")
    with self.lock:  # only a completion uses up a malformed label
      malformed = self._malformed > 0
      self._malformed -= int(malformed)
      malformed |= any(s in statement for s in self.malformed_for)
    if any(s in statement for s in self.reject_for):
      return 400, {}, _error("This model's maximum context length is 32 tokens.",
                             "context_length_exceeded")
    if self.delay_s:
      time.sleep(self.delay_s)
    label = MALFORMED if malformed else scripted_label(messages)
    if self.think:
      label = f"<think>\nThe statement names the function.\n</think>\n\n{label}\n"
    prompt_tokens = sum(_words(m["content"]) for m in messages)
    out = {"id": f"chatcmpl-{len(self.arrivals)}", "object": "chat.completion",
           "created": int(time.time()), "model": self.model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": label},
                        "finish_reason": "stop"}]}
    if self.usage:
      out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": _words(label),
                      "total_tokens": prompt_tokens + _words(label)}
    with self.lock:
      self.labels.append(label)
      if self.usage:
        self.usage_sent["prompt_tokens"] += prompt_tokens
        self.usage_sent["completion_tokens"] += _words(label)
    return 200, {}, out


def _error(message: str, code: str) -> dict:
  return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                    "code": code}}


class _Handler(http.server.BaseHTTPRequestHandler):
  owner: ScriptedTeacherServer
  protocol_version = "HTTP/1.1"

  def log_message(self, *args) -> None:  # quiet
    pass

  def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self) -> None:
    if self.path.rstrip("/") == "/v1/models":
      self._send(200, {"object": "list", "data": [{"id": self.owner.model, "object": "model",
                                                   "created": 0, "owned_by": "scripted"}]})
    else:
      self._send(404, _error(f"no route {self.path}", "not_found"))

  def do_POST(self) -> None:
    raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    if self.path.rstrip("/") != "/v1/chat/completions":
      self._send(404, _error(f"no route {self.path}", "not_found"))
      return
    owner = self.owner
    with owner.lock:
      owner.in_flight += 1
      owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
    try:
      try:
        body = json.loads(raw)
      except ValueError:
        status, headers, out = 400, {}, _error("the body is not JSON", "invalid_json")
      else:
        status, headers, out = owner.complete(body, self.headers.get("Authorization"))
      with owner.lock:
        owner.statuses.append(status)
    finally:
      with owner.lock:
        owner.in_flight -= 1
    self._send(status, out, headers)
