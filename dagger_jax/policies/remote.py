"""Bounded HTTP calls to the remote policies: the OpenAI-compatible teacher and the SGLang student.

Both clients send every request through `send` and retry what a retry may fix, each with its own
counts and messages (`openai_teacher.OpenAICompatPolicy._complete`, `sglang._Client.request`).
What counts as which fault, the same for both:

  fault                                              reason        retried after
  no connection, or the connection closed before     connection    the backoff
    the answer was complete (also half-way through
    its body)
  no complete answer within the request's timeout    timeout       the backoff
  HTTP 408, 429, 5xx                                 http_408,     `Retry-After` (capped) when
                                                     http_429,     the server sends one, else
                                                     http_5xx      the backoff
  a 2xx that is not the API's answer (garbage or     bad_response  the backoff
    truncated JSON, a missing field)

The backoff is capped exponential with jitter, `min(cap_s, base_s * 2**k) * U(0.5, 1)` before
retry k + 1 (`backoff_s`). When the last try fails too, the client raises a `LabelError` carrying
the last fault's `reason`: the collector ends only the episodes that needed that answer, as failed
with the reason, and the round goes on (`dagger/collector.py`, `dagger/loop.py`).

The timeout is one deadline for the whole request, not per socket read (which is all that
requests' own `timeout` bounds): the connection and the status line must come within it, and
the body is then read piece by piece with the socket's timeout set to what is left of it. So a
server that stalls, or trickles its answer a few bytes at a time, is cut off at the deadline.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import json
import random
import socket
import time
from typing import Any, Mapping

import requests
import urllib3

CHUNK_BYTES = 64 * 1024  # the most one read of an answer's body asks for

REASONS = ("connection", "timeout", "http_408", "http_429", "http_5xx", "bad_response")


class BadAnswer(ValueError):
  """A 2xx answer that is not what the API returns (retried as `bad_response`)."""


@dataclasses.dataclass
class Answer:
  """One complete HTTP answer, read within its request's deadline. The attribute names are
  requests.Response's, so error helpers read either. `data` holds the body as a caller's parser
  returned it, when it gave one."""
  status_code: int
  reason: str
  headers: Mapping[str, str]
  content: bytes
  encoding: str | None = None
  data: Any = None

  @property
  def text(self) -> str:
    return self.content.decode(self.encoding or "utf-8", errors="replace")

  def json(self) -> Any:
    """The body as JSON; ValueError when it is not (empty, cut, or not JSON at all)."""
    return json.loads(self.content)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
  """Seconds a `Retry-After` header asks to wait (delay-seconds or an HTTP date), >= 0; None
  when absent or unreadable.

  >>> retry_after_s("3"), retry_after_s("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0)
  (3.0, 5.0)
  """
  if value is None or not value.strip():
    return None
  value = value.strip()
  try:
    seconds = float(value)
  except ValueError:
    try:
      when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
      return None
    if when is None:
      return None
    if when.tzinfo is None:
      when = when.replace(tzinfo=datetime.timezone.utc)
    seconds = when.timestamp() - (time.time() if now is None else now)
  return max(0.0, seconds) if seconds == seconds else None  # NaN reads as unreadable


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
  """The wait before retry `attempt + 1` without a `Retry-After`: capped exponential, with
  jitter so that clients that failed together do not retry together."""
  return min(cap_s, base_s * 2 ** attempt) * random.uniform(0.5, 1.0)


def wait_s(status: int, headers: Mapping[str, str], attempt: int, *, base_s: float, cap_s: float,
           retry_after_cap_s: float) -> float:
  """The wait before retrying an answer with a retried `status`: the server's `Retry-After`
  (capped at `retry_after_cap_s`) when it sends one, else the backoff."""
  after = retry_after_s(headers.get("Retry-After"))
  return backoff_s(attempt, base_s, cap_s) if after is None else min(after, retry_after_cap_s)


def status_reason(status: int) -> str | None:
  """The fault reason of a retried status (408, 429, 5xx); None for any other."""
  if status in (408, 429):
    return f"http_{status}"
  return "http_5xx" if status >= 500 else None


def error_reason(error: requests.RequestException) -> str | None:
  """The fault reason of a failed request: `timeout`, `connection`, or None (not retried: a bad
  URL, a redirect loop, ... that no retry fixes). A connect timeout is a connection fault."""
  if isinstance(error, requests.ConnectionError):
    return "connection"
  if isinstance(error, requests.Timeout):
    return "timeout"
  if isinstance(error, requests.exceptions.ChunkedEncodingError):
    return "connection"  # closed half-way through the body
  return None


def send(session: requests.Session, method: str, url: str, *, timeout_s: float,
         connect_timeout_s: float | None = None, **kwargs: Any) -> Answer:
  """One request whose whole answer must arrive within `timeout_s` (the module docstring).

  Raises requests' ReadTimeout past the deadline, ChunkedEncodingError when the connection
  breaks in the middle of the body, and whatever requests raises before the status line.
  """
  deadline = time.monotonic() + timeout_s
  connect = timeout_s if connect_timeout_s is None else min(connect_timeout_s, timeout_s)
  response = session.request(method, url, stream=True, timeout=(connect, timeout_s), **kwargs)
  try:
    chunks = []
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        raise requests.exceptions.ReadTimeout(
            f"{method} {url}: the answer was not complete within {timeout_s:g} s")
      connection = response.raw.connection
      if connection is not None and connection.sock is not None:
        connection.sock.settimeout(left)  # this read may take only what is left
      try:
        chunk = response.raw.read1(CHUNK_BYTES, decode_content=True)
      except (urllib3.exceptions.ReadTimeoutError, socket.timeout) as e:
        raise requests.exceptions.ReadTimeout(
            f"{method} {url}: the answer was not complete within {timeout_s:g} s") from e
      except (urllib3.exceptions.HTTPError, OSError) as e:  # cut short, reset, undecodable
        raise requests.exceptions.ChunkedEncodingError(
            f"{method} {url}: the connection broke while the answer was read ({e})") from e
      if not chunk:
        break
      chunks.append(chunk)
  except BaseException:
    response.close()  # a half-read connection cannot be reused
    raise
  response.raw.release_conn()  # read to the end: the connection may serve the next request
  return Answer(response.status_code, response.reason or "", response.headers, b"".join(chunks),
                response.encoding)
