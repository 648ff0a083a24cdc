"""`dagger-jax serve`: the in-process JAX sampler behind SGLang's native HTTP API and OpenAI's chat.

    dagger-jax serve --model runs/demo/dagger_seed0/checkpoints/round_002 --port 30000

    with Server("assets/demo_base/params", config).start() as s:    # port 0: a free port
      body = {"input_ids": [[5, 6, 7], [8]], "sampling_params": {"max_new_tokens": 8}}
      request = urllib.request.Request(s.url + "/generate", json.dumps(body).encode(),
                                       {"Content-Type": "application/json"})
      outs = json.load(urllib.request.urlopen(request))  # one object per prompt, in order

Routes, with SGLang 0.5.23's request, response and error shapes (its `srt/entrypoints/
http_server.py`, `srt/managers/io_struct.py` and the generated schema `api/v1/api_types.py`;
sglang is never imported): POST /generate, POST /update_weights_from_disk, POST /pause_generation,
POST /continue_generation, GET|POST /flush_cache, GET /health, /health_generate, /model_info,
/get_model_info; OpenAI's POST /v1/chat/completions (prompt = `render.prompt_ids`, the ids the
student is trained on) and GET /v1/models.

Batching: a request's prompts become rows on a queue. One worker thread takes what queued while
the previous call ran or, when idle, what arrives until no request came for `batch_window_s` (at
most `batch_wait_max_s`): whole requests, up to `max_batch` rows. It groups the rows that can
share a call and calls `sampler.generate` once per group. Rows share a call when their stop ids
and the power-of-two bucket of max_new_tokens match and they are greedy, or sampled with the
same temperature/top-p/top-k, seeded or not. Unseeded rows get a seed the call draws; a row with
a `sampling_seed` draws with that seed alone (`sampler.generate`'s `row_seeds`, under seed 0), so
the same request gives the same samples whatever else runs, and the same as `JaxPolicy` draws in
process for that seed (`policies.base.sampling_seed`). Greedy and seeded rows equal a call with that
prompt alone (up to float rounding of other batch shapes).

Where this differs from SGLang, and why: unset sampling params take `config.sampler`'s values
(shown as `preferred_sampling_params` in /model_info); a sampler call in flight cannot be cut
short, so /pause_generation (any mode) lets it finish, aborts (mode "abort", the default) only
the queued rows, and returns once no call runs; a weight update loads the new model beside the
old one (the old serves meanwhile) and swaps it in between calls; parameters the sampler has no
code for (penalties, min_p, grammars, logit_bias, n > 1, streaming, top_logprobs...) are a 400
naming the field, never silently ignored; without a tokenizer a /generate response has no "text"
key (as SGLang's skip_tokenizer_init); logprobs are the sampler's (`SampleResult`). /health*
needs no API key (as SGLang: probes carry no secrets). There is no prefix (radix) cache, so
/flush_cache has nothing to flush and always succeeds.

Why one file of ~830 lines: it is one HTTP contract. The copy of SGLang's schema checks, the
request-to-row translation, the batcher and the routes all read the same rows and error shapes;
split, each part would be read only by the next.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import logging
import math
import os
import secrets
import sys
import threading
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dagger_jax.data import tokenizer as tokenizers
from dagger_jax.data.render import RenderError, prompt_ids
from dagger_jax.errors import DaggerJaxError
from dagger_jax.model import loader, params_io, sampler
from dagger_jax.model.qwen3 import Qwen3

log = logging.getLogger(__name__)

DEFAULT_WEIGHT_VERSION = "default"  # SGLang's --weight-version default
_TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary" (api_types' top_k default)
_FLUSHED = ("Cache flushed.\nPlease check backend logs for more details. (When there are running "
            "or waiting requests, the operation will not be performed.)\n")


class ServeError(DaggerJaxError, RuntimeError):
  """The server cannot start (port in use, no tokenizer...); the message names the fix."""


class _Invalid(ValueError):
  """A request the server refuses (400). `contract`: a violation of SGLang's JSON schema, whose
  /generate body is `{"error": MESSAGE}`; otherwise `{"error": {"message": MESSAGE}}`."""

  def __init__(self, message: str, contract: bool = False, status: int = 400):
    super().__init__(message)
    self.contract, self.status = contract, status


# ----------------------------------------------------------------------------- SGLang's schema
# A copy of the checks of api_types.py's decoders that /generate relies on (same serde messages).

def _unexpected(v: Any) -> str:
  if v is None:
    return "null"
  if isinstance(v, bool):
    return f"boolean `{'true' if v else 'false'}`"
  kinds = ((int, "integer `{}`"), (float, "floating point `{}`"), (str, 'string "{}"'))
  for kind, text in kinds:
    if isinstance(v, kind):
      return text.format(v)
  return "sequence" if isinstance(v, list) else "map" if isinstance(v, dict) else type(v).__name__


_SCALARS = {"i64": (lambda v: isinstance(v, int) and not isinstance(v, bool), "i64"),
            "f64": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "f64"),
            "bool": (lambda v: isinstance(v, bool), "a boolean"),
            "str": (lambda v: isinstance(v, str), "a string")}
_UNIONS = {"StringOrList": "str", "BoolOrList": "bool", "Int64OrList": "i64"}


def _check(v: Any, kind: str, expected: str | None = None) -> None:
  """Raises the schema's 400 unless `v` has the JSON shape `kind` (see `_SAMPLING_FIELDS`)."""
  def invalid(expected_text):
    return _Invalid(f"invalid type: {_unexpected(v)}, expected {expected_text}", contract=True)
  if kind in _SCALARS:
    test, name = _SCALARS[kind]
    if not test(v):
      raise invalid(expected or name)
  elif kind in _UNIONS:
    if isinstance(v, list):
      _check(v, f"[{_UNIONS[kind]}]")
    else:
      _check(v, _UNIONS[kind], f"a value or an array of values for {kind}")
  elif kind.startswith("["):
    if not isinstance(v, list):
      raise invalid("a sequence")
    for e in v:
      _check(e, kind[1:-1])
  elif kind.startswith("{") or kind.startswith("struct "):
    if not isinstance(v, dict):
      raise invalid("a map" if kind.startswith("{") else kind)
    for e in v.values() if kind.startswith("{") else ():
      _check(e, kind[1:-1])


# Every SamplingParams key (api_types' _FIELDS_SamplingParams, in its order) and its JSON shape.
_SAMPLING_FIELDS = {
    "max_new_tokens": "i64", "stop": "StringOrList", "stop_token_ids": "[i64]",
    "stop_regex": "StringOrList", "temperature": "f64", "top_p": "f64", "top_k": "i64",
    "min_p": "f64", "frequency_penalty": "f64", "presence_penalty": "f64",
    "repetition_penalty": "f64", "min_new_tokens": "i64", "n": "i64", "json_schema": "str",
    "regex": "str", "ebnf": "str", "structural_tag": "str", "ignore_eos": "bool",
    "skip_special_tokens": "bool", "spaces_between_special_tokens": "bool", "no_stop_trim": "bool",
    "stream_interval": "i64", "logit_bias": "{f64}", "sampling_seed": "i64", "custom_params": "any",
    "beam_width": "i64", "watermark": "struct WatermarkRequestConfig", "choice": "[str]"}
# Accepted only at the value that turns them off: the sampler has no code for them.
_SAMPLING_OFF = {"stop_regex": (None, "", []), "min_p": (None, 0), "frequency_penalty": (None, 0),
                 "presence_penalty": (None, 0), "repetition_penalty": (None, 1),
                 "min_new_tokens": (None, 0), "json_schema": (None, ""), "regex": (None, ""),
                 "ebnf": (None, ""), "structural_tag": (None, ""), "logit_bias": (None, {}),
                 "beam_width": (None, 1), "watermark": (None,), "choice": (None, [])}
# /generate's top-level fields that this server reads, and their JSON shapes.
_GENERATE_FIELDS = {"rid": "StringOrList", "text": "StringOrList", "stream": "bool",
                    "return_logprob": "BoolOrList", "logprob_start_len": "Int64OrList",
                    "top_logprobs_num": "Int64OrList", "return_text_in_logprobs": "bool"}
# /generate fields for features this server does not have: refused unless off (None/False/0/[]).
_GENERATE_REFUSED = ("input_embeds", "image_data", "video_data", "audio_data", "lora_path",
                     "session_params", "custom_logit_processor", "token_ids_logprob",
                     "return_hidden_states", "return_sampling_mask", "max_thinking_tokens")


def check_generate_request(body: Any) -> None:
  """Raises `_Invalid(contract=True)` where SGLang's schema rejects a /generate body."""
  _check(body, "struct GenerateRequest")
  for key, value in body.items():
    if key == "return_prompt_token_ids":
      _check(value, "bool")
    elif value is None:
      continue
    elif key in _GENERATE_FIELDS:
      _check(value, _GENERATE_FIELDS[key])
    elif key == "input_ids":
      if not isinstance(value, list):
        _check(value, "[i64]", "a value or an array of values for TokenIdsOrList")
      flat = not value or isinstance(value[0], (int, float)) and not isinstance(value[0], bool)
      _check(value, "[i64]" if flat else "[[i64]]")
    elif key == "sampling_params":
      if not isinstance(value, list):
        _check(value, "struct SamplingParams", "a value or an array of values for "
               "SamplingParamsOrList")
      for params in value if isinstance(value, list) else [value]:
        _check(params, "struct SamplingParams")
        for name, x in params.items():
          if name not in _SAMPLING_FIELDS:
            listed = ", ".join(f"`{f}`" for f in _SAMPLING_FIELDS)
            raise _Invalid(f"unknown field `{name}`, expected one of {listed}", contract=True)
          if x is not None:
            _check(x, _SAMPLING_FIELDS[name])


# ----------------------------------------------------------------------------- rows

@dataclasses.dataclass(eq=False)
class _Row:
  """One prompt of a request, on its way through the batcher."""
  prompt: list[int]
  max_new_tokens: int
  sampling: dict  # sampler.generate's temperature, top_p, top_k, stop_token_ids, seed
  key: tuple  # rows with equal keys share one sampler call
  stop_strs: tuple[str, ...] = ()
  skip_special_tokens: bool = True
  no_stop_trim: bool = False
  logprob_start: int | None = None  # input-token logprobs from this position
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  input_logprobs: list[float] = dataclasses.field(default_factory=list)
  weight_version: str = ""
  abort: str | None = None  # a finish_reason "abort" message (paused in mode "abort", closed)
  error: Exception | None = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)


@functools.partial(jax.jit, static_argnames="graphdef")
def _token_logprobs(graphdef, state, tokens_bt):
  """log p(token t | tokens before t) for t >= 1 (right padding is never attended to)."""
  logits_btv = nnx.merge(graphdef, state)(tokens_bt)
  logp_btv = jax.nn.log_softmax(logits_btv[:, :-1], axis=-1)
  return jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]


def prompt_logprobs(model: Qwen3, prompts: list[list[int]], buckets) -> list[list[float]]:
  """Each prompt's token logprobs from its second token on: one forward over the batch, padded
  as the sampler pads (it holds [batch, length, vocab] logits: ~2.5 GB per 4k-token row of a
  Qwen3 vocabulary)."""
  tokens_bt = np.zeros((sampler.pow2(len(prompts)), sampler.bucket(max(map(len, prompts)), buckets)),
                       np.int32)
  for i, p in enumerate(prompts):
    tokens_bt[i, :len(p)] = p
  graphdef, state = nnx.split(model)
  out = np.asarray(_token_logprobs(graphdef, state, tokens_bt))
  return [out[i, :len(p) - 1].tolist() for i, p in enumerate(prompts)]


# ----------------------------------------------------------------------------- the server

class Server:
  """The HTTP server (see the module doc). Public: `url`, `weight_version`, `model_path`,
  `sampler_calls` (how many `sampler.generate` calls ran), and the batching knobs below.

  The socket is bound here, before the model loads, so a port in use fails at once."""

  max_batch = 64  # rows per sampler call (whole requests: a bigger request still goes alone)
  # An idle worker starts a call once no request arrived for batch_window_s (a burst of clients
  # joins one call), or batch_wait_max_s after the first: the latency batching may add.
  batch_window_s = 0.005
  batch_wait_max_s = 0.05

  def __init__(self, model_path: str, config, *, host: str = "127.0.0.1", port: int = 0,
               api_key: str | None = None, tokenizer_dir: str | None = None):
    try:
      self._httpd = _HTTPServer((host, port), _Handler)
    except OSError as e:
      raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}): stop what holds the "
                       f"port or choose another --port") from None
    self._httpd.app = self
    self.url = f"http://{host}:{self._httpd.server_address[1]}"
    try:
      self._model: Qwen3 = loader.load_model(model_path, None, seed=config.seed)
      self._tok, self.tokenizer_path = self._load_tokenizer(model_path, tokenizer_dir)
    except BaseException:
      self._httpd.server_close()
      raise
    self.model_path = self.served_model_name = model_path
    self.weight_version = DEFAULT_WEIGHT_VERSION
    self.sampler_calls = 0
    self._config, self._api_key = config, api_key
    self._eos = self._default_stops(model_path)
    self._buckets = tuple(config.sampler.length_buckets)
    self._seeds = np.random.default_rng(config.seed)
    self._cond = threading.Condition()  # guards the queue, pause, busy, closed and the model
    self._queue: list[list[_Row]] = []  # requests, each its rows
    self._arrivals = 0  # requests queued so far (the batching window restarts on each)
    self._paused = self._busy = self._closed = False
    self._update_lock, self._tok_lock = threading.Lock(), threading.Lock()
    self._threads: list[threading.Thread] = []

  def _load_tokenizer(self, model_path: str, tokenizer_dir: str | None):
    """--tokenizer, else the model dir's tokenizer files, else its hf_files (Orbax); or none."""
    dirs = [tokenizer_dir] if tokenizer_dir else [model_path, params_io.hf_files_dir(model_path)]
    for d in dirs:
      if d and (tokenizer_dir or os.path.isfile(os.path.join(d, "tokenizer.json"))):
        tok = tokenizers.load_tokenizer_dir(os.path.abspath(d))
        if len(tok) > self._model.config.vocab_size:
          raise ServeError(f"the tokenizer in {d} has {len(tok)} tokens but the model's "
                           f"vocab_size is {self._model.config.vocab_size}: use --tokenizer DIR "
                           f"with the tokenizer the model was trained with")
        return tok, os.path.abspath(d)
    log.info("no tokenizer in %s: /generate takes input_ids only, chat is off", model_path)
    return None, model_path

  def _default_stops(self, model_path: str) -> tuple[int, ...]:
    """The end-of-sequence ids SGLang stops at: the tokenizer's eos and config.json's and
    generation_config.json's eos_token_id (those inside the vocabulary)."""
    ids = {self._tok.eos_token_id} if self._tok is not None else set()
    for d in (model_path, params_io.hf_files_dir(model_path)):
      for name in ("config.json", "generation_config.json"):
        path = os.path.join(d or "", name)
        if d and os.path.isfile(path):
          with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
          ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(sorted(i for i in ids if i is not None and 0 <= i < self._model.config.vocab_size))

  # --------------------------------------------------------------------------- lifecycle

  def start(self) -> "Server":
    for target in (self._httpd.serve_forever, self._work):
      self._threads.append(threading.Thread(target=target, daemon=True, name="serve"))
      self._threads[-1].start()
    log.info("dagger-jax serve: %s (weights %r) at %s", self.model_path, self.weight_version,
             self.url)
    return self

  def close(self) -> None:
    with self._cond:
      if self._closed:
        return
      self._closed = True
      self._abort_queued("the server is shutting down")
      self._cond.notify_all()
    if self._threads:
      self._httpd.shutdown()
    self._httpd.server_close()
    for t in self._threads:
      t.join(timeout=60)

  def __enter__(self) -> "Server":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # --------------------------------------------------------------------------- the batcher

  def _submit(self, rows: list[_Row]) -> None:
    """Queues one request's rows (after a pause ends) and waits until each is done."""
    with self._cond:
      self._cond.wait_for(lambda: not self._paused or self._closed)
      if self._closed:
        raise _Invalid("the server is shutting down", status=503)
      self._queue.append(rows)
      self._arrivals += 1
      self._cond.notify_all()
    for row in rows:
      row.done.wait()

  def _abort_queued(self, message: str) -> None:  # holding self._cond
    for row in (r for request in self._queue for r in request):
      row.abort, row.weight_version = message, self.weight_version
      row.done.set()
    self._queue.clear()

  def _take(self) -> tuple[list[list[_Row]], Qwen3, str] | None:
    """Waits for work and lets more join (see `batch_window_s`); None once closed."""
    with self._cond:
      while True:
        self._cond.wait_for(lambda: self._closed or (self._queue and not self._paused))
        if self._closed:
          return None
        cap = time.monotonic() + self.batch_wait_max_s
        arrivals, quiet_until = self._arrivals, time.monotonic() + self.batch_window_s
        while (not self._closed and sum(map(len, self._queue)) < self.max_batch
               and time.monotonic() < min(quiet_until, cap)):
          self._cond.wait(max(min(quiet_until, cap) - time.monotonic(), 0))
          if self._arrivals != arrivals:
            arrivals, quiet_until = self._arrivals, time.monotonic() + self.batch_window_s
        if self._closed or self._paused or not self._queue:
          continue
        taken, rows = [], 0
        while self._queue and (not taken or rows + len(self._queue[0]) <= self.max_batch):
          rows += len(self._queue[0])
          taken.append(self._queue.pop(0))
        self._busy = True
        return taken, self._model, self.weight_version

  def _work(self) -> None:
    while (work := self._take()) is not None:
      requests, model, version = work
      groups: dict[tuple, list[_Row]] = {}
      for row in (r for request in requests for r in request):
        groups.setdefault(row.key, []).append(row)
      try:
        for group in groups.values():
          try:
            self._run(group, model)
          except sampler.SampleError as e:  # settings the checks above let through: a 400
            for row in group:
              row.error = _Invalid(str(e))
          except Exception as e:  # a bug or a device failure: these rows get a 500, serving goes on
            log.exception("sampler call for %d rows failed", len(group))
            for row in group:
              row.error = e
          for row in group:
            row.weight_version = version
            row.done.set()
      finally:
        with self._cond:
          self._busy = False
          self._cond.notify_all()

  def _run(self, group: list[_Row], model: Qwen3) -> None:
    n = max(row.max_new_tokens for row in group)
    if n > 0:
      sampling = dict(group[0].sampling)
      seeds = [row.sampling["seed"] for row in group]
      if seeds[0] is None:  # unseeded rows: a fresh seed per call
        sampling["seed"] = int(self._seeds.integers(2**31))
      else:  # each row draws by its own seed, whatever rows share the call
        sampling["seed"], sampling["row_seeds"] = 0, seeds
      out = sampler.generate(model, [row.prompt for row in group], n,
                             length_buckets=self._buckets, **sampling)
      self.sampler_calls += 1
      for row, tokens, logprobs in zip(group, out.tokens, out.logprobs):
        row.tokens, row.logprobs = tokens[:row.max_new_tokens], logprobs[:row.max_new_tokens]
    scored = [r for r in group if r.logprob_start is not None and r.logprob_start < len(r.prompt)]
    if scored:
      for row, lps in zip(scored, prompt_logprobs(model, [r.prompt for r in scored],
                                                  self._buckets)):
        row.input_logprobs = [math.nan] + lps  # the first token has none (null)

  # --------------------------------------------------------------------------- requests -> rows

  def _row(self, prompt: list[int], sp: dict, logprob_start: int | None) -> _Row:
    """A row from SGLang sampling params (unset ones: config.sampler); `_Invalid` if refused."""
    vocab, limit = self._model.config.vocab_size, self._model.config.max_position_embeddings
    if not prompt:
      raise _Invalid("input_ids cannot be empty.")
    if min(prompt) < 0 or max(prompt) >= vocab:
      raise _Invalid(f"token id {max(prompt) if max(prompt) >= vocab else min(prompt)} is "
                     f"outside the model's vocabulary [0, {vocab})")
    for name, off in _SAMPLING_OFF.items():
      if sp.get(name) not in off:
        raise _Invalid(f"sampling param {name}={sp[name]!r} is not supported by dagger-jax serve "
                       f"(the JAX sampler has no such feature); leave it out")
    if sp.get("n") not in (None, 1):
      raise _Invalid(f"n={sp['n']}: parallel sampling is not supported; send the prompt n times")
    s = self._config.sampler
    get = lambda name, default: default if sp.get(name) is None else sp[name]  # noqa: E731
    max_new, temperature = get("max_new_tokens", s.max_new_tokens), get("temperature",
                                                                         s.temperature)
    top_p, top_k = get("top_p", s.top_p), get("top_k", s.top_k or -1)
    if not math.isfinite(temperature) or temperature < 0:
      raise _Invalid(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0 < top_p <= 1:
      raise _Invalid(f"top_p must be in (0, 1], got {top_p}.")
    if top_k < 1 and top_k != -1:
      raise _Invalid(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if max_new < 0:
      raise _Invalid(f"max_new_tokens must be at least 0, got {max_new}.")
    if len(prompt) + max_new > limit:
      raise _Invalid(f"Requested token count exceeds the model's maximum context length of "
                     f"{limit} tokens. You requested a total of {len(prompt) + max_new} tokens: "
                     f"{len(prompt)} tokens from the input messages and {max_new} tokens for the "
                     f"completion. Please reduce the number of tokens in the input messages or "
                     f"the completion to fit within the limit.")
    stops = set(get("stop_token_ids", [])) | (set() if get("ignore_eos", False) else set(self._eos))
    if any(not 0 <= t < vocab for t in stops):
      raise _Invalid(f"stop_token_ids {sorted(stops)} has an id outside [0, {vocab})")
    stop_strs = tuple([sp["stop"]] if isinstance(sp.get("stop"), str) else get("stop", []))
    if any(stop_strs) and self._tok is None:
      raise _Invalid(f"stop={list(stop_strs)!r} needs a tokenizer: start the server with "
                     f"--tokenizer DIR, or use stop_token_ids")
    greedy = temperature < 1e-6  # SGLang: top_k = 1
    seed = None if sp.get("sampling_seed") is None else sp["sampling_seed"] % 2**31
    sampling = dict(temperature=0.0 if greedy else float(temperature), top_p=float(top_p),
                    top_k=0 if top_k == -1 or top_k >= min(vocab, _TOP_K_ALL) else top_k,
                    stop_token_ids=tuple(sorted(stops)), seed=seed)
    mode = ("greedy",) if greedy else (sampling["temperature"], top_p, sampling["top_k"],
                                       seed is not None)
    return _Row(prompt=list(prompt), max_new_tokens=max_new, sampling=sampling,
                key=(mode, sampling["stop_token_ids"], max_new and max(sampler.pow2(max_new), 8)),
                stop_strs=tuple(x for x in stop_strs if x),
                skip_special_tokens=get("skip_special_tokens", True),
                no_stop_trim=get("no_stop_trim", False), logprob_start=logprob_start)

  def _decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
    with self._tok_lock:
      return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def _finish(self, row: _Row) -> tuple[dict, str | None]:
    """(SGLang's finish_reason, the text) of a done row; cuts it at the first stop string."""
    if row.error is not None:
      raise row.error
    if row.abort is not None:
      return {"type": "abort", "message": row.abort}, "" if self._tok else None
    tokens, matched = row.tokens, None
    if row.stop_strs and tokens:
      def first_hit(k):  # the stop string decode(tokens[:k]) contains first, or None
        text = self._decode(tokens[:k])
        hits = [(text.find(s), s) for s in row.stop_strs if s in text]
        return min(hits)[1] if hits else None
      if first_hit(len(tokens)) is not None:
        lo, hi = 1, len(tokens)  # the fewest tokens whose text holds a stop string
        while lo < hi:
          mid = (lo + hi) // 2
          lo, hi = (lo, mid) if first_hit(mid) is not None else (mid + 1, hi)
        matched = first_hit(lo)
        row.tokens, row.logprobs = tokens[:lo], row.logprobs[:lo]
    if matched is None and row.tokens and row.tokens[-1] in row.sampling["stop_token_ids"]:
      matched = row.tokens[-1]
    reason = ({"type": "length", "length": row.max_new_tokens} if matched is None else
              {"type": "stop", "matched": matched})
    if self._tok is None:
      return reason, None
    trim = isinstance(matched, int) and not row.no_stop_trim
    text = self._decode(row.tokens[:-1] if trim else row.tokens, row.skip_special_tokens)
    if isinstance(matched, str) and matched in text:
      text = text[:text.find(matched) + (len(matched) if row.no_stop_trim else 0)]
    return reason, text

  # --------------------------------------------------------------------------- routes

  def generate(self, body: Any) -> Any:
    """POST /generate: SGLang's GenerateReqInput -> one response object, or a list for a batch."""
    start = time.perf_counter()
    check_generate_request(body)
    for key in _GENERATE_REFUSED:
      if body.get(key) not in (None, False, 0, [], ""):
        raise _Invalid(f"{key} is not supported by dagger-jax serve (the JAX sampler has no such "
                       f"feature); leave it out")
    if body.get("stream"):
      raise _Invalid("stream=true is not supported by dagger-jax serve; send stream=false")
    if (body.get("text") is None) == (body.get("input_ids") is None):
      raise _Invalid("Either text, input_ids or input_embeds should be provided.")
    if body.get("text") is not None and self._tok is None:
      raise _Invalid("text input needs a tokenizer: start the server with --tokenizer DIR, or "
                     "send input_ids")
    single = isinstance(body.get("text"), str) or (body.get("input_ids") is not None and (
        not body["input_ids"] or not isinstance(body["input_ids"][0], list)))
    if single:
      prompts = [body["input_ids"] if body.get("text") is None else self._encode(body["text"])]
    elif body.get("text") is not None:
      prompts = [self._encode(t) for t in body["text"]]
    else:
      prompts = body["input_ids"]
    n = len(prompts)

    def per_prompt(name, default):
      value = body.get(name)
      if not isinstance(value, list):
        return [default if value is None else value] * n
      if len(value) != n:
        raise _Invalid(f"{name} has {len(value)} entries for {n} prompts")
      return value
    params = per_prompt("sampling_params", {})
    if any(per_prompt("top_logprobs_num", 0)):
      raise _Invalid("top_logprobs_num > 0 is not supported by dagger-jax serve; leave it out")
    rid = body.get("rid")
    rids = (per_prompt("rid", "") if isinstance(rid, list) else [rid or uuid.uuid4().hex] if single
            else [f"{rid}_{i}" if rid else uuid.uuid4().hex for i in range(n)])
    want_lp, starts = per_prompt("return_logprob", False), per_prompt("logprob_start_len", -1)
    for prompt, start_len, want in zip(prompts, starts, want_lp):
      if want and start_len > len(prompt):
        raise _Invalid(f"logprob_start_len={start_len} is higher than the number of input tokens "
                       f"{len(prompt)}. Please use a smaller logprob_start_len.")
    rows = [self._row(p, sp, s if want and s >= 0 else None)
            for p, sp, s, want in zip(prompts, params, starts, want_lp)]
    self._submit(rows)
    outs = []
    for i, row in enumerate(rows):
      reason, text = self._finish(row)
      meta = {"id": rids[i], "finish_reason": reason, "prompt_tokens": len(row.prompt),
              "completion_tokens": len(row.tokens), "cached_tokens": 0,
              "weight_version": row.weight_version, "e2e_latency": time.perf_counter() - start}
      if want_lp[i]:
        texts = body.get("return_text_in_logprobs") and self._tok is not None
        entry = lambda lp, t: [None if math.isnan(lp) else lp, t,  # noqa: E731
                               self._decode([t]) if texts else None]
        first = len(row.prompt) if row.logprob_start is None else row.logprob_start
        meta["input_token_logprobs"] = [entry(lp, t) for lp, t in zip(
            row.input_logprobs[first:], row.prompt[first:])]
        meta["output_token_logprobs"] = [entry(lp, t) for lp, t in zip(row.logprobs, row.tokens)]
        meta["output_token_logprobs_length"] = len(row.tokens)
      out = {"output_ids": row.tokens, "meta_info": meta}
      if text is not None:
        out = {"text": text, **out}
      if body.get("return_prompt_token_ids"):
        out["prompt_token_ids"] = row.prompt
      outs.append(out)
    return outs[0] if single else outs

  def _encode(self, text: str) -> list[int]:
    with self._tok_lock:
      return list(self._tok.encode(text))

  def chat_completions(self, body: Any) -> dict:
    """POST /v1/chat/completions: one choice; the prompt is `render.prompt_ids(messages)`."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
      raise _Invalid("messages: a list of {role, content} objects is required")
    off = {"n": (None, 1), "stream": (None, False), "logprobs": (None, False),
           "top_logprobs": (None, 0), "tools": (None, []),
           "response_format": (None, {"type": "text"}),
           "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
           "logit_bias": (None, {}), "min_p": (None, 0), "repetition_penalty": (None, 1),
           "regex": (None,), "ebnf": (None,), "stop_regex": (None,), "min_tokens": (None, 0),
           "continue_final_message": (None, False), "lora_path": (None,)}
    for name, values in off.items():
      if body.get(name) not in values:
        raise _Invalid(f"{name}={body[name]!r} is not supported by dagger-jax serve; leave it out")
    if body.get("input_ids") is not None:  # SGLang's extension: the prompt's ids, no template
      _check(body["input_ids"], "[i64]")
      prompt = body["input_ids"]
    elif self._tok is None:
      raise _Invalid("chat needs a tokenizer: start the server with --tokenizer DIR")
    else:
      messages = []
      for m in body["messages"]:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # text parts
          content = "".join(p.get("text", "") for p in content if isinstance(p, dict)
                            and p.get("type") == "text")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or content is None:
          raise _Invalid(f"each message needs a role and a text content; got {m!r}")
        messages.append({"role": m["role"], "content": content})
      kwargs = body.get("chat_template_kwargs") or {}
      if not isinstance(kwargs, dict):
        raise _Invalid("chat_template_kwargs: must be an object, e.g. {\"enable_thinking\": false}")
      thinking = bool(kwargs.get("enable_thinking", self._config.data.enable_thinking))
      try:
        with self._tok_lock:
          prompt = prompt_ids(messages, [None] * sum(m["role"] == "assistant" for m in messages),
                              self._tok, thinking)
      except (RenderError, ValueError) as e:
        raise _Invalid(f"messages cannot be rendered with the chat template: {e}") from None
    sp = {"max_new_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
          **{k: body.get(k) for k in ("temperature", "top_p", "top_k", "stop", "stop_token_ids",
                                      "ignore_eos", "skip_special_tokens", "no_stop_trim")},
          "sampling_seed": body.get("seed")}
    for name, x in sp.items():
      if x is not None:
        _check(x, _SAMPLING_FIELDS[name])
    row = self._row(prompt, sp, None)
    self._submit([row])
    reason, text = self._finish(row)
    choice = {"index": 0, "message": {"role": "assistant", "content": text,
                                      "reasoning_content": None},
              "logprobs": None, "finish_reason": reason["type"],
              "matched_stop": reason.get("matched")}
    response = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model") or self.served_model_name,
                "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(row.tokens),
                          "total_tokens": len(prompt) + len(row.tokens)},
                "metadata": {"weight_version": row.weight_version}}
    if body.get("return_token_ids") or body.get("return_prompt_token_ids"):
      choice["prompt_token_ids"] = response["prompt_token_ids"] = list(prompt)  # SGLang, vLLM
    if body.get("return_token_ids"):
      choice["response_token_ids"] = choice["token_ids"] = row.tokens  # SGLang, vLLM
    return response

  def update_weights_from_disk(self, body: Any) -> tuple[int, dict]:
    """Loads `model_path` with the served architecture; on any failure the old weights stay."""
    if not isinstance(body, dict) or not isinstance(body.get("model_path"), str):
      raise _Invalid("model_path: a string is required")
    path, version = body["model_path"], body.get("weight_version")
    with self._update_lock:
      try:
        model = loader.load_model(path, self._model.config, seed=self._config.seed)
      except Exception as e:  # whatever the reason, the old weights stay and the client is told
        message = f"Failed to update weights: {e}.\nRolling back to original weights."
        log.warning("update_weights_from_disk %s failed: %s", path, e,
                    exc_info=not isinstance(e, DaggerJaxError))
        return 400, {"success": False, "message": message, "num_paused_requests": 0}
      with self._cond:
        if body.get("abort_all_requests"):
          self._abort_queued("Abort before the weight update")
        self._model, self.model_path, self.served_model_name = model, path, path
        if version is not None:
          self.weight_version = str(version)
    message = "Succeeded to update model weights."
    if version is not None:
      message += f" Weight version updated to {version}."
    log.info("weights updated from %s (version %r)", path, self.weight_version)
    return 200, {"success": True, "message": message, "num_paused_requests": 0}

  def pause_generation(self, body: Any) -> dict:
    mode = (body or {}).get("mode", "abort") if isinstance(body, dict) else None
    if mode not in ("abort", "retract", "in_place"):
      raise _Invalid(f"mode={mode!r}: must be 'abort', 'retract' or 'in_place'")
    with self._cond:
      self._paused = True
      if mode == "abort":
        self._abort_queued("Abort in waiting queue")
      self._cond.wait_for(lambda: not self._busy)  # a call in flight finishes first
    return {"message": "Generation paused successfully.", "status": "ok"}

  def continue_generation(self, body: Any) -> dict:
    with self._cond:
      self._paused = False
      self._cond.notify_all()
    return {"message": "Generation continued successfully.", "status": "ok"}

  def model_info(self) -> dict:
    s = self._config.sampler
    return {"model_path": self.model_path, "served_model_name": self.served_model_name,
            "tokenizer_path": self.tokenizer_path, "is_generation": True,
            "preferred_sampling_params": {"max_new_tokens": s.max_new_tokens,
                                          "temperature": s.temperature, "top_p": s.top_p,
                                          "top_k": s.top_k or -1},
            "weight_version": self.weight_version, "load_format": "auto",
            "reasoning_parser": None, "tool_call_parser": None, "disaggregation_mode": "null",
            "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}

  def models(self) -> dict:
    card = {"id": self.served_model_name, "object": "model", "created": int(time.time()),
            "owned_by": "dagger-jax", "root": self.served_model_name, "parent": None,
            "max_model_len": self._model.config.max_position_embeddings}
    return {"object": "list", "data": [card]}

  def health_generate(self) -> dict:
    """GET /health_generate: one greedy token through the batcher (not while paused)."""
    if not self._paused:
      self._submit([self._row([0], {"max_new_tokens": 1, "temperature": 0}, None)])
    return {"healthy": True}

  def handle(self, method: str, path: str, headers, raw: bytes) -> tuple[int, Any]:
    """Routes one request -> (status, JSON value or text). Errors take the route's shape."""
    openai = path.startswith("/v1/")
    if self._api_key is not None and not path.startswith("/health"):
      scheme, _, token = (headers.get("Authorization") or "").partition(" ")
      if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(),
                                                                   self._api_key.encode()):
        return 401, ({"error": {"message": "Unauthorized: send Authorization: Bearer <api key>",
                                "type": "authentication_error", "param": None, "code": 401}}
                     if openai else {"error": "Unauthorized"})
    get = {"/health": lambda: {"healthy": True}, "/health_generate": self.health_generate,
           "/model_info": self.model_info, "/get_model_info": self.model_info,
           "/v1/models": self.models, "/flush_cache": lambda: _FLUSHED}
    post = {"/generate": self.generate, "/v1/chat/completions": self.chat_completions,
            "/update_weights_from_disk": self.update_weights_from_disk,
            "/pause_generation": self.pause_generation,
            "/continue_generation": self.continue_generation, "/flush_cache": lambda _: _FLUSHED}
    routes = get if method == "GET" else post
    if path not in routes:
      known = path in get or path in post
      return (405, {"detail": "Method Not Allowed"}) if known else (404, {"detail": "Not Found"})
    try:
      if method == "GET":
        return 200, routes[path]()
      try:
        body = json.loads(raw or b"{}")
      except ValueError as e:
        raise _Invalid(f"the request body is not JSON: {e}") from None
      result = routes[path](body)
      return result if isinstance(result, tuple) else (200, result)
    except _Invalid as e:
      if openai:
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return e.status, {"error": {"message": str(e), "type": kind, "param": None,
                                    "code": e.status}}
      if path == "/generate":
        return e.status, {"error": str(e)} if e.contract else {"error": {"message": str(e)}}
      return e.status, {"object": "error", "message": str(e), "type": "Bad Request",
                        "param": None, "code": e.status}
    except Exception as e:  # a bug: the client gets a 500, the traceback goes to the log
      log.exception("%s %s failed", method, path)
      message = f"internal error: {type(e).__name__}: {e}"
      return 500, ({"error": {"message": message, "type": "server_error", "param": None,
                              "code": 500}} if openai else {"error": {"message": message}})


class _HTTPServer(http.server.ThreadingHTTPServer):
  daemon_threads = True  # a handler waiting on a row never blocks shutdown
  request_queue_size = 1024  # listen backlog (default 5): a burst of rollout clients is not reset

  def handle_error(self, request, client_address) -> None:
    """A client that went away is not news; anything else here is a bug (`handle` answers every
    request error itself)."""
    if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
      log.debug("client %s went away", client_address)
    else:
      log.exception("serving %s failed", client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
  """Reads one HTTP request, lets `Server.handle` answer it, logs it at DEBUG (never headers)."""
  protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
  server_version = "dagger-jax-serve"

  def _answer(self, method: str) -> None:
    start = time.perf_counter()
    raw = self._body()
    path = self.path.split("?")[0]
    status, payload = self.server.app.handle(method, path, self.headers, raw)
    text = isinstance(payload, str)
    data = payload.encode() if text else json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)
    log.debug("%s %s -> %d (%d bytes in, %.1f ms)", method, path, status, len(raw),
              1000 * (time.perf_counter() - start))

  def _body(self) -> bytes:
    if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
      return self.rfile.read(int(self.headers.get("Content-Length") or 0))
    chunks = []
    while size := int(self.rfile.readline().split(b";")[0], 16):
      chunks.append(self.rfile.read(size))
      self.rfile.readline()
    while self.rfile.readline().strip():  # trailers, up to the empty line
      pass
    return b"".join(chunks)

  def do_GET(self) -> None:  # noqa: N802 (http.server's names)
    self._answer("GET")

  def do_POST(self) -> None:  # noqa: N802
    self._answer("POST")

  def log_message(self, format: str, *args) -> None:  # noqa: A002  (logged in _answer instead)
    pass
