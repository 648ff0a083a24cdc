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
as consecutive chunks and the answers are joined in order. Each call has the timeout
`rollout.request_timeout_s`; connection errors and 5xx answers are retried `rollout.request_retries`
times with capped exponential backoff; a 4xx is not retried and its error names the refused field.
The body holds only `input_ids`, `sampling_params` (from `config.sampler`: temperature, top_p,
top_k with the project's 0 = off sent as SGLang's -1, max_new_tokens, the tokenizer's eos as
`stop_token_ids`, `no_stop_trim` and `skip_special_tokens: false` so that nothing is cut from the
ids, and with temperature > 0 a per-prompt `sampling_seed` from (seed, call, row), which the server
honours when started with `--enable-deterministic-inference`) and `return_logprob: false`.

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

A server can be started from `config.rollout.sglang_launch` (`launch.LaunchedServer`: its own
process group, its log in a file, stopped on every way out).
"""

from __future__ import annotations

import hashlib
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
from dagger_jax.policies.base import EpisodeView, Policy, student_actions, student_prompts
from dagger_jax.policies.launch import FIX, SGLangError, connection_reason

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # seconds to open a connection (capped by the request timeout)
BACKOFF_S = 0.5  # first retry delay; doubles per retry
MAX_BACKOFF_S = 8.0


class StaleWeightsError(SGLangError):
  """A /generate answer came from other weights than the ones this run expects."""


# ----------------------------------------------------------------------------- HTTP


def _error_text(response: requests.Response) -> str:
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
  """Requests to one server: timeouts, retries with capped exponential backoff on connection
  errors and 5xx, and errors that name the URL (`url`: without user:password@, which only
  `endpoint` holds). The key goes in `Authorization: Bearer KEY` and nowhere else."""

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
              timeout_s: float | None = None) -> requests.Response:
    """The response (any status below 500), after retries; raises SGLangError otherwise."""
    url = self.url + path  # what messages show
    timeout = self.timeout_s if timeout_s is None else timeout_s
    tries = 1 + (self.retries if retry else 0)
    last: Exception | requests.Response | None = None
    for attempt in range(tries):
      if attempt:
        time.sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1)))
      try:
        response = self.session.request(
            method, self.endpoint + path, json=body, headers=self.headers,
            timeout=(min(CONNECT_TIMEOUT_S, timeout), timeout))
      except requests.exceptions.ReadTimeout:
        raise SGLangError(
            f"{method} {url}: no answer within {timeout:g} s (config.rollout.request_timeout_s): "
            f"the server is overloaded or hung; raise the timeout, lower "
            f"config.rollout.concurrency, or check the server's log") from None
      except requests.exceptions.RequestException as e:
        if not isinstance(e, requests.exceptions.ConnectionError):
          raise SGLangError(f"{method} {url}: {redact.redact_text(str(e))}") from None
        last = e
        log.warning("%s %s: %s (try %d of %d)", method, url, connection_reason(e), attempt + 1, tries)
        continue
      if response.status_code >= 500:
        last = response
        log.warning("%s %s: HTTP %d %s (try %d of %d)", method, url, response.status_code,
                    _error_text(response), attempt + 1, tries)
        continue
      if response.status_code in (401, 403):
        raise SGLangError(f"{method} {url}: HTTP {response.status_code} "
                          f"{_error_text(response)}: the server wants an API key; export the "
                          f"one it was started with (SGLang's --api-key, dagger-jax serve's "
                          f"--api-key-env) in the variable config.rollout.api_key_env names")
      return response
    if isinstance(last, requests.Response):
      raise SGLangError(f"{method} {url}: HTTP {last.status_code} after {tries} tries: "
                        f"{_error_text(last)}; see the server's log")
    raise SGLangError(f"no SGLang server answers at {self.url} ({method} {path} failed {tries} "
                      f"times: {connection_reason(last)}): {FIX}, or fix config.rollout.sglang_url")

  def json(self, method: str, path: str, body: Any = None, **kwargs) -> Any:
    """The JSON body of a 2xx answer; a 4xx raises SGLangError with the server's message."""
    response = self.request(method, path, body, **kwargs)
    if not 200 <= response.status_code < 300:
      raise SGLangError(f"{method} {self.url}{path}: HTTP {response.status_code}: "
                        f"{_error_text(response)}")
    try:
      return response.json()
    except ValueError:
      raise SGLangError(f"{method} {self.url}{path}: the answer is not JSON "
                        f"({response.text[:200]!r}); is this an SGLang server?") from None

  def close(self) -> None:
    self.session.close()


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
    self.calls = 0
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

  def sampling_params(self, rows: Sequence[int]) -> dict | list[dict]:
    """The `sampling_params` of one /generate body for the batch rows `rows` of this call: one
    object when greedy, else one per row (each with its own `sampling_seed`)."""
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
    return [{**params, "sampling_seed": row_seed(self.seed, self.calls, row)} for row in rows]

  def prompts(self, views: Sequence[EpisodeView]) -> list[list[int]]:
    """The prompt ids of each view, exactly as `JaxPolicy` builds them."""
    return student_prompts(views, self.tokenizer, self.enable_thinking, self.max_prompt_len)

  def act(self, views: Sequence[EpisodeView]) -> list[Action]:
    if not views:
      return []
    prompts = self.prompts(views)
    with self._gate:
      while self._updating:
        self._gate.wait()
      self._in_flight += 1
    try:
      outputs: list[list[int]] = []
      for start in range(0, len(prompts), self.concurrency):
        chunk = prompts[start:start + self.concurrency]
        outputs += self._generate(chunk, range(start, start + len(chunk)))
    finally:
      with self._gate:
        self._in_flight -= 1
        self._gate.notify_all()
    self.calls += 1
    return student_actions(outputs, self.tokenizer)

  def _generate(self, prompts: list[list[int]], rows: Sequence[int]) -> list[list[int]]:
    body = {"input_ids": prompts, "sampling_params": self.sampling_params(rows),
            "return_logprob": False}
    response = self.client.request("POST", "/generate", body)
    if response.status_code != 200:
      raise SGLangError(
          f"POST {self.url}/generate refused the request (HTTP {response.status_code}): "
          f"{_error_text(response)}. If it names a field, this client and the server disagree "
          f"on SGLang's /generate schema: use the SGLang version this project is tested with "
          f"(sglang==0.5.23, see the Makefile) or check config.sampler")
    try:
      answers = response.json()
    except ValueError:
      raise SGLangError(f"POST {self.url}/generate: the answer is not JSON "
                        f"({response.text[:200]!r}); is this an SGLang server?") from None
    if isinstance(answers, dict):
      answers = [answers]
    if not isinstance(answers, list) or len(answers) != len(prompts):
      raise SGLangError(f"POST {self.url}/generate: sent {len(prompts)} prompts, got "
                        f"{len(answers) if isinstance(answers, list) else type(answers).__name__}"
                        f" answers; is this an SGLang server?")
    outputs = []
    for row, answer in zip(rows, answers):
      meta = answer.get("meta_info") or {}
      finish = meta.get("finish_reason") or {}
      if isinstance(finish, dict) and finish.get("type") == "abort":
        raise SGLangError(
            f"POST {self.url}/generate: the server aborted prompt {row} of this batch: "
            f"{finish.get('message') or 'no message'} (a pause, weight update or overload on the "
            f"server while this call ran; only this policy's update_weights may update it)")
      if self.weight_version is not None and meta.get("weight_version") != self.weight_version:
        raise StaleWeightsError(
            f"POST {self.url}/generate answered with weight version "
            f"{meta.get('weight_version')!r}, but this run expects {self.weight_version!r}: the "
            f"server is sampling from stale weights (and KV cache). Apply this round's export "
            f"with SGLangPolicy.update_weights(dir, {self.weight_version!r}) or restart the "
            f"server from it, and make sure no other run shares this server")
      ids = answer.get("output_ids")
      if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise SGLangError(f"POST {self.url}/generate: answer {row} has no output_ids list "
                          f"(keys: {sorted(answer)}); is this an SGLang server?")
      outputs.append(ids)
    return outputs

  # -- weights

  def server_version(self) -> str | None:
    """The weight version the server reports (`GET /model_info`)."""
    return self.client.json("GET", "/model_info").get("weight_version")

  def update_weights(self, hf_dir: str, version: str) -> None:
    """Loads the HF export in `hf_dir` (see `export_for_server`) into the server under the weight
    version `version`, after every request of this policy has returned; raises SGLangError when
    the server refused it (it then still serves its old weights)."""
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
      self._load(model_path, version)
      self._flush_cache()
    except BaseException:
      try:  # a paused server hangs every later request: continue it whatever went wrong
        self.client.json("POST", "/continue_generation", {})
      except SGLangError as e:
        log.error("%s: /continue_generation after a failed weight update: %s", self.url, e)
      raise
    self.client.json("POST", "/continue_generation", {})
    served = self.server_version()
    if served != version:
      raise StaleWeightsError(f"{self.url} loaded {model_path} but /model_info reports weight "
                              f"version {served!r}, not {version!r}; restart the server")
    self.weight_version = version
    log.info("%s: weights %s loaded as version %r", self.url, model_path, version)

  def _load(self, model_path: str, version: str) -> None:
    """POST /update_weights_from_disk; raises with the server's reason when it refuses."""
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
    old = f" (version {self.weight_version!r})" if self.weight_version is not None else ""
    raise SGLangError(
        f"{self.url} refused the weights in {model_path} (version {version!r}): {message}. It "
        f"keeps serving its previous weights{old}. The directory must be a complete HF export "
        f"of the served model's architecture (export_for_server), readable by the server")

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


def row_seed(seed: int, call: int, row: int) -> int:
  """The `sampling_seed` of batch row `row` in call `call` of a policy seeded `seed`: distinct
  per row (episodes of one task share a first prompt), in [0, 2**31)."""
  digest = hashlib.blake2b(f"{seed}/{call}/{row}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") % (2 ** 31)


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
