"""The student acting through an SGLang server (`config.rollout.engine = "sglang"`).

The prompt is exactly the in-process student's (`JaxPolicy`): `render.prompt_ids`, cut to the last
`max_prompt_len` ids, sent as token ids to SGLang's native `POST /generate`; the action is the
sampled `output_ids` with the end-of-turn id stripped, decoded here with the same tokenizer. So
with greedy sampling both students give the same `Action(text, ids)` on the same weights (up to
the engines' float rounding).

    export_for_server(model, "run/rollout/round_000", tokenizer_dir)  # HF safetensors, renamed in
    with launch.LaunchedServer("{python} -m sglang.launch_server --model-path {model} --port {port}",
                        "run/rollout/round_000", url, "run/sglang.log", 600.0).start():
      student = SGLangPolicy(url, tokenizer, config.sampler, config.rollout)
      student.update_weights("run/rollout/round_000", "round_000")  # every answer now carries it
      actions = student.act(views)                 # one batched /generate per act call
      export_for_server(trained, "run/rollout/round_001", tokenizer_dir)
      student.update_weights("run/rollout/round_001", "round_001")  # between rounds

Requests. At most `rollout.concurrency` prompts go in one /generate body; a larger batch is sent
as consecutive chunks and the answers are joined in order. Each call must be answered in full
within `rollout.request_timeout_s` (one deadline, body included: `policies/remote.py`). A refused
or dropped connection (also half-way through the answer), a timeout, 408, 429, 5xx, and a 200
that is not /generate's answer (garbage or truncated JSON, fewer answers than prompts, a row
without `output_ids` or with none: with `no_stop_trim` a finished row holds at least its stop id)
are retried `rollout.request_retries` times, after the server's `Retry-After` (capped at
`RETRY_AFTER_CAP_S`) or a capped exponential backoff with jitter. After the last try
`RolloutUnavailableError`, a `LabelError` with the fault's `reason`: the collector ends the
episodes of that batch as failed and the round goes on. A 4xx is not retried and its error names
the refused field (it would fail every call: the run stops); so does an aborted row and a stale
weight version.
The body holds only `input_ids`, `sampling_params` (from `config.sampler`: temperature, top_p,
top_k with the project's 0 = off sent as SGLang's -1, max_new_tokens, the tokenizer's eos as
`stop_token_ids`, `no_stop_trim` and `skip_special_tokens: false` so that nothing is cut from the
ids, and with temperature > 0 a per-prompt `sampling_seed` from (seed, episode, turn), as `JaxPolicy`
draws (`policies.base.sampling_seed`), which the server honours when started with `--enable-deterministic-inference`) and `return_logprob: false`.

Stops. SGLang also stops on the model's own eos ids (`generation_config.json`'s `eos_token_id`,
which an export lists as <|im_end|> and <|endoftext|>), where the in-process sampler stops only on
the tokenizer's eos. A turn that ends on <|endoftext|> keeps it as its last id (exactly what was
sampled); only the tokenizer's eos is stripped, as `JaxPolicy` does.

Weight sync between rounds (`update_weights`, the order of SGLang's RL docs and slime): wait until
this policy's requests have returned, `POST /pause_generation`, `POST /update_weights_from_disk
{model_path, weight_version, flush_cache: true}` (on failure the server keeps its old weights),
`/flush_cache` until it answers 200, `POST /continue_generation` (always, even after a failure: a
paused server hangs every later request), then `GET /model_info` must report the new version.
Afterwards every /generate answer must carry it in `meta_info.weight_version`; another version is
refused (`StaleWeightsError`).

A failed update is never half-applied silently. Whatever failed (a refusal, an error status, no
answer), `GET /model_info` is asked which version the server serves, before it is continued, and
the `WeightUpdateError` names the server, the version asked for and the version it reports: the
previous one (it keeps serving its previous weights; this policy goes on expecting them), or
another (its state is unknown: restart it). One exception: when the answer to
`/update_weights_from_disk` was lost (no connection, a timeout) but the server reports the new
version, the update was applied, and it goes on (flush, continue) with a warning.

A server can be started from `config.rollout.sglang_launch` (`launch.LaunchedServer`: its own
process group, its log in a file, stopped on every way out).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.parse
from typing import Any, Sequence

import requests

from dagger_jax import redact
from dagger_jax.data.trajectory import Action
from dagger_jax.errors import ConfigError
from dagger_jax.model import hf
from dagger_jax.policies import remote
from dagger_jax.policies.base import (EpisodeView, LabelError, Policy, sampling_seed,
                                      student_actions, student_prompts)
from dagger_jax.policies.launch import FIX, SGLangError, connection_reason

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # seconds to open a connection (capped by the request timeout)
BACKOFF_S = 0.5  # first retry delay (x U(0.5, 1)); doubles per retry
MAX_BACKOFF_S = 8.0
RETRY_AFTER_CAP_S = 120.0  # the longest wait a server's Retry-After may ask for


class StaleWeightsError(SGLangError):
  """A /generate answer came from other weights than the ones this run expects."""


class RolloutUnavailableError(SGLangError, LabelError):
  """No usable answer after every retry; `reason` is the last fault's (`remote.REASONS`). A
  `LabelError`: the episodes that waited for it end as failed, the round goes on."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


class _Refused(SGLangError):
  """The server answered /update_weights_from_disk with a refusal (success: false)."""


class WeightUpdateError(SGLangError):
  """A weight update did not complete; `served` is the version the server reports after it
  (None when it did not say). Not a `LabelError`: the run stops, the server is not left paused."""

  def __init__(self, message: str, served: str | None):
    super().__init__(message)
    self.served = served


# ----------------------------------------------------------------------------- HTTP


def _error_text(response: remote.Answer) -> str:
  """The server's own error message from a JSON or text body (SGLang uses several shapes),
  without anything shaped like a key (`redact.redact_text`)."""
  try:
    body = response.json()
  except ValueError:
    return redact.redact_text((response.text or response.reason or "").strip()[:1000])
  if isinstance(body, dict):
    for key in ("error", "message", "detail"):
      value = body.get(key)
      if isinstance(value, dict):
        value = value.get("message", value)
      if value:
        return redact.redact_text(str(value)[:1000])
  return redact.redact_text(str(body)[:1000])


class _Client:
  """Requests to one server: one deadline per request, retries of what a retry may fix
  (`remote`: connection faults, timeouts, 408, 429, 5xx, answers a parser refuses), and errors
  that name the URL (`url`: without user:password@, which only `endpoint` holds). The key goes in
  `Authorization: Bearer KEY` and nowhere else."""

  def __init__(self, url: str, timeout_s: float, retries: int, api_key: str | None = None):
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
      raise ConfigError(f"config.rollout.sglang_url={redact.display_url(url)!r}: expected e.g. "
                        f"'http://127.0.0.1:30000'")
    if timeout_s <= 0:
      raise ConfigError(f"config.rollout.request_timeout_s={timeout_s}: must be > 0")
    if retries < 0:
      raise ConfigError(f"config.rollout.request_retries={retries}: must be >= 0")
    self.endpoint = url.rstrip("/")
    self.url = redact.display_url(self.endpoint)
    self.timeout_s = float(timeout_s)
    self.retries = int(retries)
    self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    self.session = requests.Session()

  def request(self, method: str, path: str, body: Any = None, *, retry: bool = True,
              timeout_s: float | None = None, parse=None) -> remote.Answer:
    """The answer (any status that is not retried), after retries; `parse(answer)` of a 2xx
    answer goes in `answer.data`, and a `remote.BadAnswer` it raises is retried. Raises
    `RolloutUnavailableError` when the last try failed too."""
    url = self.url + path  # what messages show
    timeout = self.timeout_s if timeout_s is None else timeout_s
    tries = 1 + (self.retries if retry else 0)
    last: Exception | remote.Answer | None = None
    reason, wait = "", 0.0
    for attempt in range(tries):
      if attempt:
        time.sleep(wait)
      wait = remote.backoff_s(attempt, BACKOFF_S, MAX_BACKOFF_S)  # unless Retry-After says
      try:
        answer = remote.send(self.session, method, self.endpoint + path, json=body,
                             headers=self.headers, timeout_s=timeout,
                             connect_timeout_s=CONNECT_TIMEOUT_S)
      except requests.exceptions.RequestException as e:
        reason = remote.error_reason(e)
        if reason is None:
          raise SGLangError(f"{method} {url}: {redact.redact_text(str(e))}") from None
        last = e
        log.warning("%s %s: %s (try %d of %d)", method, url,
                    f"no answer within {timeout:g} s" if reason == "timeout"
                    else connection_reason(e), attempt + 1, tries)
        continue
      status = answer.status_code
      retried = remote.status_reason(status)
      if retried is not None:
        last, reason = answer, retried
        wait = remote.wait_s(status, answer.headers, attempt, base_s=BACKOFF_S,
                             cap_s=MAX_BACKOFF_S, retry_after_cap_s=RETRY_AFTER_CAP_S)
        log.warning("%s %s: HTTP %d %s (try %d of %d)", method, url, status, _error_text(answer),
                    attempt + 1, tries)
        continue
      if status in (401, 403):
        raise SGLangError(f"{method} {url}: HTTP {status} "
                          f"{_error_text(answer)}: the server wants an API key; export the "
                          f"one it was started with (SGLang's --api-key, dagger-jax serve's "
                          f"--api-key-env) in the variable config.rollout.api_key_env names")
      if parse is not None and 200 <= status < 300:
        try:
          answer.data = parse(answer)
        except remote.BadAnswer as e:
          last, reason = e, "bad_response"
          log.warning("%s %s: %s (try %d of %d)", method, url, e, attempt + 1, tries)
          continue
      return answer
    raise RolloutUnavailableError(self._gave_up(method, path, tries, timeout, last, reason),
                                  reason)

  def _gave_up(self, method: str, path: str, tries: int, timeout: float,
               last: Exception | remote.Answer | None, reason: str) -> str:
    url = self.url + path
    if isinstance(last, remote.Answer):
      return (f"{method} {url}: HTTP {last.status_code} after {tries} tries: "
              f"{_error_text(last)}; see the server's log")
    if reason == "timeout":
      return (f"{method} {url}: no answer within {timeout:g} s (config.rollout.request_timeout_s) "
              f"in {tries} tries: the server is overloaded or hung; raise the timeout, lower "
              f"config.rollout.concurrency, or check the server's log")
    if reason == "bad_response":
      return (f"{method} {url}: {last} ({tries} tries); is this an SGLang server? See its log")
    if isinstance(last, requests.exceptions.ChunkedEncodingError):
      return (f"{method} {url}: the connection broke before the answer was complete, "
              f"{tries} times ({connection_reason(last)}); see the server's log")
    return (f"no SGLang server answers at {self.url} ({method} {path} failed {tries} "
            f"times: {connection_reason(last)}): {FIX}, or fix config.rollout.sglang_url")

  def json(self, method: str, path: str, body: Any = None, **kwargs) -> Any:
    """The JSON body of a 2xx answer (one that is not JSON is retried); a 4xx raises SGLangError
    with the server's message."""
    answer = self.request(method, path, body, parse=_json_body, **kwargs)
    if not 200 <= answer.status_code < 300:
      raise SGLangError(f"{method} {self.url}{path}: HTTP {answer.status_code}: "
                        f"{_error_text(answer)}")
    return answer.data

  def close(self) -> None:
    self.session.close()


def _json_body(answer: remote.Answer) -> Any:
  try:
    return answer.json()
  except ValueError:
    raise remote.BadAnswer(f"the answer is not JSON ({answer.text[:200]!r})") from None


# ----------------------------------------------------------------------------- the policy


class SGLangPolicy(Policy):
  """The student's current weights, served by SGLang; one batched /generate per `act` call."""

  name = "student"

  def __init__(self, url: str, tokenizer, sampler_config: Any, rollout_config: Any, *,
               enable_thinking: bool = False, seed: int = 0, max_prompt_len: int | None = None,
               api_key: str | None = None, expected_version: str | None = None):
    self.tokenizer = tokenizer
    self.config = sampler_config
    self.enable_thinking = enable_thinking
    self.seed = int(seed)
    self.max_prompt_len = max_prompt_len
    # The version every /generate answer must carry (None: not checked until `update_weights`).
    self.weight_version: str | None = expected_version
    self.concurrency = int(rollout_config.concurrency)
    if self.concurrency < 1:
      raise ConfigError(f"config.rollout.concurrency={self.concurrency}: must be >= 1")
    self.client = _Client(url, float(rollout_config.request_timeout_s),
                          int(rollout_config.request_retries), api_key)
    self.url = self.client.url
    c = sampler_config
    if float(c.temperature) < 0 or not 0 < float(c.top_p) <= 1 or int(c.top_k) < 0:
      raise ConfigError(f"config.sampler: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                        f"got temperature={c.temperature}, top_p={c.top_p}, top_k={c.top_k}")
    if int(c.max_new_tokens) < 1:
      raise ConfigError(f"config.sampler.max_new_tokens={c.max_new_tokens}: must be >= 1")
    # act() and update_weights() exclude each other: an update waits for every request in
    # flight to return, and no request starts while the server is paused.
    self._gate = threading.Condition()
    self._in_flight = 0
    self._updating = False

  # -- acting

  def sampling_params(self, seeds: Sequence[int]) -> dict | list[dict]:
    """The `sampling_params` of one /generate body whose rows have the sampling seeds `seeds`:
    one object when greedy, else one per row (each with its own `sampling_seed`)."""
    c = self.config
    params = {
        "max_new_tokens": int(c.max_new_tokens),
        "temperature": float(c.temperature),
        "top_p": float(c.top_p),
        "top_k": int(c.top_k) if int(c.top_k) > 0 else -1,  # ours: 0 = off; SGLang's: -1
        "stop_token_ids": [int(self.tokenizer.eos_token_id)],
        "no_stop_trim": True,  # keep the stop id in the output (stripped below, as JaxPolicy)
        "skip_special_tokens": False,
    }
    if float(c.temperature) == 0:
      return params
    return [{**params, "sampling_seed": int(seed)} for seed in seeds]

  def prompts(self, views: Sequence[EpisodeView]) -> list[list[int]]:
    """The prompt ids of each view, exactly as `JaxPolicy` builds them."""
    return student_prompts(views, self.tokenizer, self.enable_thinking, self.max_prompt_len)

  def act(self, views: Sequence[EpisodeView]) -> list[Action]:
    if not views:
      return []
    prompts = self.prompts(views)
    seeds = [sampling_seed(self.seed, v) for v in views]
    with self._gate:
      while self._updating:
        self._gate.wait()
      self._in_flight += 1
    try:
      outputs: list[list[int]] = []
      for start in range(0, len(prompts), self.concurrency):
        chunk = prompts[start:start + self.concurrency]
        rows = range(start, start + len(chunk))
        outputs += self._generate(chunk, rows, [seeds[row] for row in rows])
    finally:
      with self._gate:
        self._in_flight -= 1
        self._gate.notify_all()
    return student_actions(outputs, self.tokenizer)

  def _generate(self, prompts: list[list[int]], rows: Sequence[int], seeds: Sequence[int]
                ) -> list[list[int]]:
    """One /generate call for the batch rows `rows` (their indices, for messages)."""
    body = {"input_ids": prompts, "sampling_params": self.sampling_params(seeds),
            "return_logprob": False}
    response = self.client.request("POST", "/generate", body,
                                   parse=lambda answer: self._answers(answer, len(prompts), rows))
    if response.status_code != 200:
      raise SGLangError(
          f"POST {self.url}/generate refused the request (HTTP {response.status_code}): "
          f"{_error_text(response)}. If it names a field, this client and the server disagree "
          f"on SGLang's /generate schema: use the SGLang version this project is tested with "
          f"(sglang==0.5.23, see the Makefile) or check config.sampler")
    outputs = []
    for row, answer in zip(rows, response.data):
      meta = answer.get("meta_info") or {}
      if self.weight_version is not None and meta.get("weight_version") != self.weight_version:
        raise StaleWeightsError(
            f"POST {self.url}/generate answered with weight version "
            f"{meta.get('weight_version')!r}, but this run expects {self.weight_version!r}: the "
            f"server is sampling from stale weights (and KV cache). Apply this round's export "
            f"with SGLangPolicy.update_weights(dir, {self.weight_version!r}) or restart the "
            f"server from it, and make sure no other run shares this server")
      outputs.append(answer["output_ids"])
    return outputs

  def _answers(self, response: remote.Answer, n: int, rows: Sequence[int]) -> list[dict]:
    """The `n` answers of a 200 from /generate; `remote.BadAnswer` (retried) when it is not one,
    SGLangError (not retried) when the server aborted a row."""
    try:
      answers = response.json()
    except ValueError:
      raise remote.BadAnswer(f"the answer is not JSON ({response.text[:200]!r}); is this an "
                             f"SGLang server?") from None
    if isinstance(answers, dict):
      answers = [answers]
    if not isinstance(answers, list) or len(answers) != n:
      got = len(answers) if isinstance(answers, list) else type(answers).__name__
      raise remote.BadAnswer(f"sent {n} prompts, got {got} answers")
    for row, answer in zip(rows, answers):
      if not isinstance(answer, dict):
        raise remote.BadAnswer(f"answer {row} is a {type(answer).__name__}, not an object")
      meta = answer.get("meta_info") or {}
      if not isinstance(meta, dict):
        raise remote.BadAnswer(f"answer {row} has a meta_info that is not an object")
      finish = meta.get("finish_reason") or {}
      if isinstance(finish, dict) and finish.get("type") == "abort":
        raise SGLangError(
            f"POST {self.url}/generate: the server aborted prompt {row} of this batch: "
            f"{finish.get('message') or 'no message'} (a pause, weight update or overload on the "
            f"server while this call ran; only this policy's update_weights may update it)")
      ids = answer.get("output_ids")
      if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise remote.BadAnswer(f"answer {row} has no output_ids list (keys: {sorted(answer)})")
      if not ids:  # max_new_tokens >= 1 and no_stop_trim: a finished row holds its stop id
        raise remote.BadAnswer(f"answer {row} has an empty output_ids list (finish_reason "
                               f"{finish!r}): the answer was cut short")
    return answers

  # -- weights

  def server_version(self) -> str | None:
    """The weight version the server reports (`GET /model_info`)."""
    return self.client.json("GET", "/model_info").get("weight_version")

  def update_weights(self, hf_dir: str, version: str) -> None:
    """Loads the HF export in `hf_dir` (see `export_for_server`) into the server under the weight
    version `version`, after every request of this policy has returned; raises
    `WeightUpdateError` when it did not complete, naming the version the server serves now
    (module docstring)."""
    version = str(version)
    model_path = os.path.abspath(hf_dir)
    with self._gate:
      while self._updating:
        self._gate.wait()
      self._updating = True
      while self._in_flight:
        self._gate.wait()
    try:
      self._update(model_path, version)
    finally:
      with self._gate:
        self._updating = False
        self._gate.notify_all()

  def _update(self, model_path: str, version: str) -> None:
    try:
      self.client.json("POST", "/pause_generation", {})
      try:
        self._load(model_path, version)
      except RolloutUnavailableError as e:  # no answer: the server may have loaded it all the same
        if self._reported_version()[0] != version:
          raise
        log.warning("%s: the answer to /update_weights_from_disk was lost (%s), but /model_info "
                    "reports version %r: the update was applied", self.url, e, version)
      self._flush_cache()
    except BaseException as e:
      served, unreadable = None, None
      if isinstance(e, SGLangError):  # asked before continuing, so nothing has moved yet
        served, unreadable = self._reported_version()
      try:  # a paused server hangs every later request: continue it whatever went wrong
        self.client.json("POST", "/continue_generation", {})
      except SGLangError as err:
        log.error("%s: /continue_generation after a failed weight update: %s", self.url, err)
      if not isinstance(e, SGLangError):
        raise
      raise WeightUpdateError(self._failed_update(model_path, version, e, served, unreadable),
                              served) from e
    self.client.json("POST", "/continue_generation", {})
    served = self.server_version()
    if served != version:
      raise StaleWeightsError(f"{self.url} loaded {model_path} but /model_info reports weight "
                              f"version {served!r}, not {version!r}; restart the server")
    self.weight_version = version
    log.info("%s: weights %s loaded as version %r", self.url, model_path, version)

  def _reported_version(self) -> tuple[str | None, str | None]:
    """(the version /model_info reports, None) or (None, why it could not be read)."""
    try:
      return self.server_version(), None
    except SGLangError as e:
      return None, str(e)

  def _failed_update(self, model_path: str, version: str, error: SGLangError,
                     served: str | None, unreadable: str | None) -> str:
    """What a failed update's error says: what failed, and which weights the server serves."""
    previous = self.weight_version
    what = (str(error) if isinstance(error, _Refused) else
            f"{self.url}: the weight update to {model_path} (version {version!r}) failed: {error}")
    if unreadable is not None:
      state = (f"The server did not say which version it serves now ({unreadable}): its weights "
               f"are unknown; restart it before going on")
    elif served != version and (previous is None or served == previous):
      state = (f"/model_info reports version {served!r}: it keeps serving its previous weights "
               f"(version {served!r}), and this run keeps expecting them")
    elif served == version:
      state = (f"/model_info reports the new version {served!r} although the update did not "
               f"complete: this run does not use it (its rollouts would be refused as stale); "
               f"restart the server or update it again")
    else:
      state = (f"/model_info reports version {served!r}, neither the previous {previous!r} nor "
               f"{version!r}: another client may be updating this server; its weights are "
               f"unknown, restart it")
    hint = (" The directory must be a complete HF export of the served model's architecture "
            "(export_for_server), readable by the server." if isinstance(error, _Refused) else "")
    return f"{what.rstrip('.')}. {state}.{hint}"

  def _load(self, model_path: str, version: str) -> None:
    """POST /update_weights_from_disk; raises `_Refused` with the server's reason when it
    refuses."""
    response = self.client.request(
        "POST", "/update_weights_from_disk",
        {"model_path": model_path, "weight_version": version, "flush_cache": True})
    try:
      result = response.json()
    except ValueError:
      result = None
    if response.status_code == 200 and isinstance(result, dict) and result.get("success"):
      return
    message = result.get("message") if isinstance(result, dict) else None
    message = " ".join(str(message or _error_text(response)).split()).rstrip(".")
    raise _Refused(f"{self.url} refused the weights in {model_path} (version {version!r}): "
                   f"{message}")

  def _flush_cache(self) -> None:
    """POST /flush_cache until 200 (it refuses while requests still run)."""
    deadline = time.monotonic() + min(self.client.timeout_s, 120.0)
    while True:
      response = self.client.request("POST", "/flush_cache")
      if response.status_code == 200:
        return
      if time.monotonic() > deadline:
        raise SGLangError(f"POST {self.url}/flush_cache kept refusing "
                          f"({_error_text(response)}): requests are still running on the "
                          f"server; does another client use it?")
      time.sleep(0.2)

  def close(self) -> None:
    self.client.close()


def export_for_server(model, out_dir: str, tokenizer_dir: str | None, *,
                      dtype: str | None = None) -> str:
  """Writes `model` as a HF checkpoint an SGLang server loads (`save_pretrained`: written to a
  temp directory beside `out_dir`, then renamed into place, so a server never reads half a
  checkpoint), with the tokenizer files of `tokenizer_dir` (a launched server needs them; a
  weight update does not). Returns the absolute directory."""
  if tokenizer_dir is not None and not os.path.isfile(os.path.join(tokenizer_dir,
                                                                   "tokenizer_config.json")):
    raise SGLangError(f"export_for_server: {tokenizer_dir} holds no tokenizer files "
                      f"(tokenizer_config.json); pass the run's tokenizer directory")
  hf.save_pretrained(model, out_dir, dtype=dtype, extras_from=tokenizer_dir)
  return os.path.abspath(out_dir)
