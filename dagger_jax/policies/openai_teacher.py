"""The teacher behind any OpenAI-compatible chat-completions endpoint (`teacher.kind = "openai"`).

It labels a state by POSTing the episode's conversation, as it is, to `{url}/chat/completions`
(a hosted model, vLLM, SGLang, `dagger-jax serve`) and returns the reply as a text-only `Action`
(ids=None: the renderer tokenises it with the student's tokenizer, whatever the teacher's is).

    policy = OpenAICompatPolicy.from_config(config)   # the key from $config.teacher.api_key_env
    action, = policy.act([view])                      # one request (or a cache hit) per view
    policy.reset_stats()  # {"calls": 1, "prompt_tokens": 812, "completion_tokens": 41, ...}

Requests. The body holds `model`, `messages`, `temperature`, `top_p`, `max_tokens` and `seed`
(the constructor's); `Authorization: Bearer KEY` is sent when there is a key. At most
`teacher.concurrency` requests are in flight across all threads (a semaphore around the HTTP
call; waits between retries do not hold a slot), each with a `teacher.timeout_s` limit.

Retries (`teacher.request_retries` after the first attempt; `policies/remote.py` says which
fault is which). A refused or dropped connection (also half-way through the answer), no complete
answer within `teacher.timeout_s` (one deadline for the whole request, body included), a 2xx
that is not a chat completion (garbage or truncated JSON), 408, 429 and 5xx are retried: after
the server's `Retry-After` (seconds or an HTTP date, capped at `retry_after_cap_s`) when it sends
one, else after a capped exponential backoff with jitter, `min(backoff_cap_s, backoff_base_s *
2**k) * U(0.5, 1)`. When every attempt fails the episode gets a `TeacherUnavailableError` (a
`LabelError`) naming the URL and the last error, with the last fault as its `reason`
(`connection`, `timeout`, `http_408`, `http_429`, `http_5xx`, `bad_response`). Other statuses
are not retried:

  400, 413, 422   `TeacherRejectedError` (a `LabelError`, reason `rejected`): the endpoint
                  refused this request (e.g. the conversation is over the model's context);
                  only that episode ends.
  401, 403, 404, other 3xx/4xx
                  `TeacherHTTPError` (not a `LabelError`): the key, the URL or the model is
                  wrong for every request, so the run stops with the status and the server's
                  message.

The action protocol. A label must hold exactly one command block (`protocol.parse_action`). One
that does not is re-asked up to `teacher.max_retries` times the way the episode itself would go
on: the bad reply is appended as an assistant message and `protocol.format_error(n,
finish_reason)` (mini-swe-agent's format-error observation) as a user message, so a greedy
teacher sees a different prompt. The label kept for the state is the first reply that parses;
the correction exchange is not part of the trajectory. An empty reply, and one cut off at
`max_tokens` (`finish_reason: "length"`), are such labels too. After the last re-ask:
`TeacherProtocolError` (a `LabelError`, reason `protocol`) naming how many blocks the last reply
had and its start.

What is normalised (nothing else is touched): a leading reasoning block that some servers leave
in `content` (`<think>...</think>`, or everything up to a first `</think>` that no command fence
precedes) is dropped, because it is the teacher's private reasoning, not its turn (the protocol's
`THOUGHT:` text stays); then surrounding whitespace is stripped (it changes no command). A
`reasoning_content` field is ignored; a null `content` is an empty label (re-asked).

Cache. Labels are cached by the sha256 of the exact request (model, sampling parameters, seed,
messages), in memory (LRU, `cache_entries`). A cached label costs no request and counts a cache
hit; a request that is already in flight for the same state is waited for, not repeated. With
temperature > 0 the cache still keys on the exact prompt: a state seen again gets the label
sampled the first time (one draw per distinct state), not a fresh sample.

Stats (cumulative, thread-safe; `reset_stats` returns and zeroes them): `calls` (completions
received, re-asks included: the billed requests), `prompt_tokens` and `completion_tokens` (from
the responses' `usage`; a response without one counts 0 and `usage_missing` 1, warned once),
`cache_hits`, `protocol_retries` (re-asks), `failed` (views that got no label), and
`request_retries` (HTTP attempts retried).

The API key is never logged or put in an error message (a server message that echoes it, or the
URL's password, or anything shaped like a key, is redacted: `dagger_jax.redact`), nor shown by
`repr`; the URL is shown without its user:password@.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import hashlib
import json
import logging
import re
import threading
import time
import urllib.parse
import weakref
from typing import Any, Sequence

import requests

from dagger_jax import redact
from dagger_jax.data.trajectory import Action
from dagger_jax.envs import protocol
from dagger_jax.errors import ConfigError, DaggerJaxError
from dagger_jax.policies import remote
from dagger_jax.policies.base import EpisodeView, LabelError, Policy
from dagger_jax.policies.remote import retry_after_s  # noqa: F401  (this module's API too)

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 1.0  # the first retry's backoff (without Retry-After)
BACKOFF_CAP_S = 30.0  # the longest backoff
RETRY_AFTER_CAP_S = 120.0  # the longest wait a server's Retry-After may ask for
CACHE_ENTRIES = 100_000  # labels kept (LRU)
RETRY_STATUSES = (408, 429)  # and every 5xx
REJECTED_STATUSES = (400, 413, 422)  # this request only: the episode ends, the run goes on
STAT_KEYS = ("calls", "prompt_tokens", "completion_tokens", "cache_hits", "protocol_retries",
             "failed", "request_retries", "usage_missing")


class TeacherHTTPError(DaggerJaxError, RuntimeError):
  """The teacher's endpoint answered with a status a retry cannot fix; `status` holds it."""

  def __init__(self, message: str, status: int | None = None):
    super().__init__(message)
    self.status = status


class TeacherRejectedError(TeacherHTTPError, LabelError):
  """The endpoint refused one request (400, 413, 422): that episode ends, the run goes on."""
  reason = "rejected"


class TeacherUnavailableError(LabelError):
  """No completion after every retry; `reason` is the last fault's (`remote.REASONS`)."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


class TeacherProtocolError(LabelError):
  """Every label asked for one state broke the action protocol (after the re-asks)."""
  reason = "protocol"


def normalise(text: str | None) -> str:
  """The label kept from a reply's content (see the module docstring).

  >>> normalise("<think>ls or grep?</think>\\n\\nTHOUGHT: look.\\n\\n```x\\nls\\n```\\n")
  'THOUGHT: look.\\n\\n```x\\nls\\n```'
  """
  text = text or ""
  head, sep, tail = text.partition("</think>")
  if sep and (head.lstrip().startswith("<think>") or
              ("<think>" not in head and "```" not in head)):
    text = tail
  return text.strip()


def cache_key(body: dict[str, Any]) -> str:
  """sha256 of a request body (canonical JSON: sorted keys, no whitespace)."""
  data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(data.encode()).hexdigest()


def _snippet(text: str, limit: int = 200) -> str:
  return repr(text if len(text) <= limit else text[:limit] + "...")


class OpenAICompatPolicy(Policy):
  """Labels states with an OpenAI-compatible chat-completions endpoint (module docstring)."""

  name = "teacher"

  def __init__(self, teacher_config: Any, *, api_key: str | None = None, seed: int = 0,
               backoff_base_s: float = BACKOFF_BASE_S, backoff_cap_s: float = BACKOFF_CAP_S,
               retry_after_cap_s: float = RETRY_AFTER_CAP_S,
               cache_entries: int = CACHE_ENTRIES):
    t = teacher_config
    url = str(t.url or "").strip().rstrip("/")
    if not url:
      raise ConfigError("config.teacher.url is empty: set the endpoint's base URL "
                        "(e.g. http://localhost:8000/v1) for teacher.kind='openai'")
    if not url.startswith(("http://", "https://")):
      raise ConfigError(f"config.teacher.url={redact.display_url(url)!r}: must start with http:// or "
                        f"https:// (e.g. http://localhost:8000/v1)")
    if url.endswith("/chat/completions"):
      raise ConfigError(f"config.teacher.url={redact.display_url(url)!r}: give the base URL (drop "
                        f"/chat/completions; the teacher appends it)")
    if not str(t.model or "").strip():
      raise ConfigError(f"config.teacher.model is empty: set the model name the endpoint serves "
                        f"(GET {redact.display_url(url)}/models lists them)")
    self.url = url
    self.endpoint = f"{url}/chat/completions"
    self.model = str(t.model).strip()
    self.where = f"teacher {self.model!r} at {redact.display_url(self.endpoint)}"
    self.temperature = float(t.temperature)
    self.top_p = float(t.top_p)
    self.max_tokens = int(t.max_tokens)
    self.concurrency = max(1, int(t.concurrency))
    self.timeout_s = float(t.timeout_s)
    self.request_retries = max(0, int(t.request_retries))
    self.max_retries = max(0, int(t.max_retries))
    self.seed = int(seed)
    self.backoff_base_s = float(backoff_base_s)
    self.backoff_cap_s = float(backoff_cap_s)
    self.retry_after_cap_s = float(retry_after_cap_s)
    self.cache_entries = int(cache_entries)
    self._api_key = api_key or None
    self._slots = threading.BoundedSemaphore(self.concurrency)
    self._lock = threading.Lock()
    self._cache: collections.OrderedDict[str, str] = collections.OrderedDict()
    self._pending: dict[str, concurrent.futures.Future] = {}
    self._stats = dict.fromkeys(STAT_KEYS, 0)
    # One HTTP session per thread (a requests.Session is not documented as thread-safe); a
    # thread's session goes with it, the weak set only lets close() reach the live ones.
    self._local = threading.local()
    self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
    self._warned_usage = False

  @classmethod
  def from_config(cls, config: Any) -> "OpenAICompatPolicy":
    """From the whole config: `config.teacher`, the key from the environment variable named by
    `teacher.api_key_env` ("" = no key), `config.seed` as the request seed."""
    t = config.teacher
    api_key = redact.key_from_env("config.teacher.api_key_env", t.api_key_env)
    return cls(t, api_key=api_key, seed=int(getattr(config, "seed", 0) or 0))

  def __repr__(self) -> str:  # no key
    return (f"OpenAICompatPolicy(url={redact.display_url(self.url)!r}, model={self.model!r}, "
            f"key={'set' if self._api_key else 'none'})")

  # --- the Policy API

  def act(self, views: Sequence[EpisodeView]) -> list[Action]:
    """One text-only Action per view; `LabelError` when a view cannot get a label (a batch
    raises the first failure, after every view was tried). Thread-safe."""
    if len(views) <= 1:
      return [Action(self.label(v.messages)) for v in views]
    with concurrent.futures.ThreadPoolExecutor(min(len(views), self.concurrency)) as pool:
      futures = [pool.submit(self.label, v.messages) for v in views]
      return [Action(f.result()) for f in futures]

  def label(self, messages: Sequence[dict[str, str]]) -> str:
    """The label for one conversation (cached; see the module docstring)."""
    try:
      return self._cached_label(messages)
    except DaggerJaxError:
      self._count("failed")
      raise

  def stats(self) -> dict[str, int]:
    with self._lock:
      return dict(self._stats)

  def reset_stats(self) -> dict[str, int]:
    with self._lock:
      out, self._stats = self._stats, dict.fromkeys(STAT_KEYS, 0)
    return out

  def close(self) -> None:
    """Closes the HTTP sessions (the policy still works: a later request opens a new one)."""
    with self._lock:
      sessions, self._sessions = list(self._sessions), weakref.WeakSet()
      self._local = threading.local()
    for s in sessions:
      s.close()

  # --- internals

  def body(self, messages: Sequence[dict[str, str]]) -> dict[str, Any]:
    """The request body for `messages` (also what the cache key hashes)."""
    return {"model": self.model, "messages": [dict(m) for m in messages],
            "temperature": self.temperature, "top_p": self.top_p,
            "max_tokens": self.max_tokens, "seed": self.seed}

  def _count(self, key: str, n: int = 1) -> None:
    with self._lock:
      self._stats[key] += n

  def _cached_label(self, messages: Sequence[dict[str, str]]) -> str:
    key = cache_key(self.body(messages))
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        self._stats["cache_hits"] += 1
        return self._cache[key]
      pending = self._pending.get(key)
      owner = pending is None
      if owner:
        pending = self._pending[key] = concurrent.futures.Future()
    if not owner:  # the same state is being labelled by another thread: share its answer
      try:
        text = pending.result()
      except DaggerJaxError as e:
        raise copy.copy(e) from None  # each thread raises its own exception object
      self._count("cache_hits")
      return text
    try:
      text = self._ask(messages)
    except BaseException as e:
      with self._lock:
        del self._pending[key]
      pending.set_exception(e)
      raise
    with self._lock:
      self._cache[key] = text
      while len(self._cache) > self.cache_entries:
        self._cache.popitem(last=False)
      del self._pending[key]
    pending.set_result(text)
    return text

  def _ask(self, messages: Sequence[dict[str, str]]) -> str:
    """A label that parses, re-asking with the format-error observation when one does not."""
    conversation = [dict(m) for m in messages]
    for ask in range(self.max_retries + 1):
      if ask:
        self._count("protocol_retries")
      content, finish_reason = self._complete(conversation)
      label = normalise(content)
      parsed = protocol.parse_action(label)
      if parsed.ok:
        return label
      log.warning("%s: a label broke the action protocol (%d command blocks, finish_reason=%s)%s",
                  self.where, parsed.n_actions, finish_reason,
                  "; re-asking" if ask < self.max_retries else "")
      conversation += [{"role": "assistant", "content": content or ""},
                       {"role": "user",
                        "content": protocol.format_error(parsed.n_actions, finish_reason)}]
    raise TeacherProtocolError(
        f"{self.where}: {self.max_retries + 1} labels in a row broke the action protocol (the "
        f"last had {parsed.n_actions} ```{protocol.ACTION_FENCE} blocks, exactly 1 is needed; "
        f"finish_reason={finish_reason}; it began {_snippet(label)}); use a model that follows "
        f"the format or raise config.teacher.max_retries (or teacher.max_tokens if cut off)")

  def _session(self) -> requests.Session:
    session = getattr(self._local, "session", None)
    if session is None:
      session = self._local.session = requests.Session()
      with self._lock:
        self._sessions.add(session)
    return session

  def _headers(self) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    return headers

  def _redact(self, text: str) -> str:
    """`text` without the key, the URL's user:password, nor anything shaped like a key."""
    text = text.replace(self._api_key, redact.MASK) if self._api_key else text
    return redact.redact_text(text, [urllib.parse.urlsplit(self.url).password or ""])

  def _backoff(self, attempt: int) -> float:
    return remote.backoff_s(attempt, self.backoff_base_s, self.backoff_cap_s)

  def _complete(self, messages: list[dict[str, str]]) -> tuple[str | None, str | None]:
    """One completion (content, finish_reason), retrying what a retry may fix."""
    body = self.body(messages)
    attempts = self.request_retries + 1
    last, reason, wait = "", "", 0.0
    for attempt in range(attempts):
      if attempt:
        self._count("request_retries")
        log.warning("%s: %s; retry %d of %d in %.1f s", self.where, last, attempt,
                    self.request_retries, wait)
        time.sleep(wait)
      try:
        with self._slots:
          response = remote.send(self._session(), "POST", self.endpoint, json=body,
                                 headers=self._headers(), timeout_s=self.timeout_s)
      except requests.Timeout as e:
        reason, wait = remote.error_reason(e), self._backoff(attempt)
        last = f"no answer within {self.timeout_s:g} s (config.teacher.timeout_s)"
        if reason == "connection":  # could not even connect in time
          last = f"{type(e).__name__}: {self._redact(str(e))}"
        continue
      except requests.RequestException as e:
        last, wait = f"{type(e).__name__}: {self._redact(str(e))}", self._backoff(attempt)
        reason = remote.error_reason(e) or "connection"
        continue
      status = response.status_code
      if 200 <= status < 300:
        try:
          return self._read(response)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
          last = (f"HTTP {status} but not a chat completion ({type(e).__name__}: {e}): "
                  f"{_snippet(self._redact(response.text))}")
          reason, wait = "bad_response", self._backoff(attempt)
          continue
      message = self._server_message(response)
      if status in RETRY_STATUSES or status >= 500:
        last, reason = f"HTTP {status}: {message}", remote.status_reason(status)
        wait = remote.wait_s(status, response.headers, attempt, base_s=self.backoff_base_s,
                             cap_s=self.backoff_cap_s, retry_after_cap_s=self.retry_after_cap_s)
        continue
      raise self._status_error(status, message)
    raise TeacherUnavailableError(
        f"{self.where}: no completion after {attempts} attempts; last error: {last} (check that "
        f"the server is up and answers; config.teacher.request_retries and timeout_s bound the "
        f"retries)", reason)

  def _read(self, response: remote.Answer) -> tuple[str | None, str | None]:
    data = response.json()
    choice = data["choices"][0]
    content = choice["message"].get("content")
    if content is not None and not isinstance(content, str):
      raise TypeError(f"message.content is {type(content).__name__}, not a string")
    usage = data.get("usage")
    counted = isinstance(usage, dict)
    tokens = ((int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
              if counted else (0, 0))
    with self._lock:
      self._stats["calls"] += 1
      self._stats["prompt_tokens"] += tokens[0]
      self._stats["completion_tokens"] += tokens[1]
      self._stats["usage_missing"] += int(not counted)
      warn = not counted and not self._warned_usage
      self._warned_usage |= warn
    if warn:
      log.warning("%s: a response has no `usage` field: its tokens count 0 in the teacher's "
                  "stats (stats()['usage_missing'] counts such responses)", self.where)
    return content, choice.get("finish_reason")

  def _server_message(self, response: remote.Answer) -> str:
    """The server's error text: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the
    body's start."""
    text = response.text or ""
    try:
      data = response.json()
    except ValueError:
      data = None
    if isinstance(data, dict):
      err = data.get("error")
      for m in (err.get("message") if isinstance(err, dict) else err, data.get("message"),
                data.get("detail")):
        if m:
          text = m if isinstance(m, str) else json.dumps(m)
          break
    text = self._redact(re.sub(r"\s+", " ", text).strip())
    return _snippet(text, 300) if text else "(no message)"

  def _status_error(self, status: int, message: str) -> TeacherHTTPError:
    fixes = {401: "check the API key (the variable config.teacher.api_key_env names)",
             403: "the key may not use this model",
             404: "check config.teacher.url (the base, ending in /v1) and config.teacher.model",
             413: "the conversation is too large for the endpoint",
             422: "the endpoint rejected the request's fields"}
    fix = fixes.get(status, "the endpoint refused the request; see its message")
    if status in REJECTED_STATUSES:
      return TeacherRejectedError(
          f"{self.where}: HTTP {status} (not retried): {message}; this episode gets no label "
          f"({fix}; e.g. a conversation over the model's context)", status)
    return TeacherHTTPError(f"{self.where}: HTTP {status} (not retried): {message}; {fix}",
                            status)
