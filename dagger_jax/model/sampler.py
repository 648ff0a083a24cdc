"""Batched KV-cache sampling from the Qwen3 student: one compiled program per shape bucket.

    result = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=16, stop_token_ids=(2,))
    result.tokens        # [[11, 2], [4, 4, ..., 4]]: new ids per prompt; a hit stop token is last
    result.logprobs      # same shape: log-probability of each token (see `SampleResult`)
    result.finish_reasons  # ["stop", "length"]

How a call runs. Prompts are left-padded to a length bucket P (the smallest of `length_buckets`
that fits the longest prompt; past the largest, a multiple of it), the batch is padded to a power
of two B with dummy rows, and `max_new_tokens` is rounded up to a power of two N >= 8 (the output
buffer). The compiled program for (B, P, N, sampling mode) prefills a KV cache of P + N slots with
the whole prompt, samples the first token from the last position, then runs a `lax.while_loop`
of one-token decode steps that exits as soon as every row has produced a stop token or
`max_new_tokens` tokens. Another call with the same buckets (any prompt lengths, batch size,
temperature, top-k/top-p values, stop ids, seed, `max_new_tokens` up to N) reuses it; the
sampling modes are greedy, sampling, and sampling with top-k/top-p. Nothing is donated: the
cache lives and dies inside the program, and the params stay the caller's.

Positions: row i with prompt length L_i sits in slots P - L_i .. P - 1 with positions 0 .. L_i - 1
(padding is masked out through `KVCache.valid`), and its n-th new token has position L_i + n, so a
row's output does not depend on the padding around it.

Randomness is stateless: the token at step n of row i uses `fold_in(fold_in(key(seed), n), r_i)`,
where r_i is the row's `row_seeds` entry, else i. A caller that derives r_i from what the row is
(the policies: episode and turn, `policies.base.sampling_seed`) gets draws that do not depend on
which other rows share the call.

Multi-turn conversations (`PrefixCache`). An agent's prompt at turn k is its prompt at turn k-1,
the tokens it sampled, and an observation. With a `prefix_cache`, each row's keys and values are
kept in host memory after the call, and a row whose prompt extends its entry by at least
`min_reuse` tokens runs in a second program: its cached prefix is placed in slots P - L_i .. P - 1
(P a length bucket), only its new tokens (left-padded to a power of two M >= 32) run through the
model as one chunk over the cache, and decoding goes on from slot P + M. A turn then costs the new
tokens times the context instead of the context squared. Rows without a usable entry run in the
first program as above; both write their entries back. Tokens and logprobs equal those of
prefilling whole prompts up to float rounding (`tests/test_sampler.py`).

Why one file of ~470 lines: the two compiled programs (`_generate_padded`, `_generate_extend`)
share the decode loop, the bucketing and the sampling code, and `PrefixCache` is only read by them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dagger_jax.errors import DaggerJaxError
from dagger_jax.model.qwen3 import KVCache, Qwen3

_PAD = -1  # marks output slots after a row finished (never returned)


class SampleError(DaggerJaxError, ValueError):
  """`generate` was given prompts or sampling settings it cannot run; the message names which."""


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """New tokens per prompt, in prompt order.

  tokens[i]: the ids sampled for prompt i; when a stop token is hit it is included as the last
    id. logprobs[i][j]: the log-probability of tokens[i][j] under the distribution it was drawn
    from: with temperature > 0, the temperature-scaled, top-k and top-p filtered, renormalised
    distribution; with greedy decoding (temperature 0), the model's plain softmax (temperature 1,
    unfiltered), so the figure still says how sure the model was.
  finish_reasons[i]: "stop" (ended on a stop token) or "length" (reached max_new_tokens).
  steps: model steps the call ran (the prefill counts as one); the loop exits when every row is
    done, so this is the longest row's length, not `max_new_tokens`.
  """
  tokens: list[list[int]]
  logprobs: list[list[float]]
  finish_reasons: list[str]
  steps: int


def bucket(n: int, buckets: Sequence[int] | None) -> int:
  """The smallest bucket >= n; past the largest, the next multiple of the largest. With no
  buckets (a library call without `config.sampler.length_buckets`): powers of two from 128.

  >>> bucket(300, (128, 256, 512)), bucket(1100, (128, 256, 512)), bucket(300, None)
  (512, 1536, 512)
  """
  if not buckets:
    return max(128, pow2(n))
  for b in sorted(buckets):
    if b >= n:
      return b
  top = max(buckets)
  return -(-n // top) * top


def pow2(n: int) -> int:
  """The smallest power of two >= n (batch sizes are padded to one: one program per size)."""
  return 1 << max(n - 1, 0).bit_length()


def filter_logits(logits_bv: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Sets logits outside the top-k, then outside the top-p nucleus, to -inf.

  `top_k` <= 0 keeps every token; the nucleus is the smallest set of most likely tokens whose
  probability (renormalised over the top-k) reaches `top_p`; the most likely token always stays.
  Tokens tied with the last kept one are kept too. Example: probabilities [.5, .3, .15, .05] with
  top_k=3, top_p=0.7 -> the top-3 renormalise to [.53, .32, .16]; cumulative mass before each is
  [0, .53, .84], so tokens 0 and 1 (mass before them < 0.7) are kept.
  """
  v = logits_bv.shape[-1]
  sorted_bv = -jnp.sort(-logits_bv, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  rank_v = jnp.arange(v)
  sorted_bv = jnp.where(rank_v < k, sorted_bv, -jnp.inf)
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  kept_b = jnp.sum((mass_before_bv < top_p) & (rank_v < k), axis=-1)
  threshold_b1 = jnp.take_along_axis(sorted_bv, jnp.maximum(kept_b, 1)[:, None] - 1, axis=-1)
  return jnp.where(logits_bv >= threshold_b1, logits_bv, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class _Mode:
  """The static part of the sampling settings (each combination compiles once per bucket)."""
  greedy: bool
  filtered: bool  # top-k or top-p is active


def _sample(logits_bv, key, step, row_ids_b, temperature, top_k, top_p, allowed_v, mode: _Mode):
  """-> (token_b, logprob_b) for one decode step (see `SampleResult` for which logprob).

  `row_ids_b`: each row's seed (`generate`'s `row_seeds`, else its index), its randomness.
  """
  logits_bv = jnp.where(allowed_v, logits_bv, -jnp.inf)  # ids the tokenizer has no text for
  if mode.greedy:
    token_b = jnp.argmax(logits_bv, axis=-1)
    logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
  else:
    scaled_bv = logits_bv / temperature
    if mode.filtered:
      scaled_bv = filter_logits(scaled_bv, top_k, top_p)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, step), row_ids_b)
    token_b = jax.vmap(jax.random.categorical)(row_keys, scaled_bv)
    logp_bv = jax.nn.log_softmax(scaled_bv, axis=-1)
  logprob_b = jnp.take_along_axis(logp_bv, token_b[:, None], axis=-1)[:, 0]
  return token_b.astype(jnp.int32), logprob_b


def _decode_loop(model: Qwen3, cache, logits_bv, prompt_lens_b, done_b, max_new_tokens,
                 is_stop_v, sample, buffer: int):
  """Samples from the prompt's last logits, then one-token decode steps in a `lax.while_loop`
  until every row is done -> (tokens [b, buffer], logprobs [b, buffer], steps, final cache).

  Row i's n-th new token has position prompt_lens_b[i] + n and is written to slot
  cache.index + n when it is fed (the last sampled token of the call is never fed). Output slots
  after a row finished (and every slot of a row done from the start) hold _PAD.
  """
  b = logits_bv.shape[0]

  def record(n, token_b, logprob_b, done_b, out_tokens_bn, out_logprobs_bn):
    """Writes step n's samples for rows still running; updates which rows are done."""
    token_b = jnp.where(done_b, _PAD, token_b)
    logprob_b = jnp.where(done_b, 0.0, logprob_b)
    out_tokens_bn = out_tokens_bn.at[:, n].set(token_b)
    out_logprobs_bn = out_logprobs_bn.at[:, n].set(logprob_b)
    done_b = done_b | is_stop_v[jnp.maximum(token_b, 0)] | (n + 1 >= max_new_tokens)
    return token_b, done_b, out_tokens_bn, out_logprobs_bn

  token_b, logprob_b = sample(logits_bv, step=0)
  token_b, done_b, out_tokens_bn, out_logprobs_bn = record(
      0, token_b, logprob_b, done_b, jnp.full((b, buffer), _PAD, jnp.int32),
      jnp.zeros((b, buffer), jnp.float32))

  def cond(carry):
    n, _, _, done_b, _, _ = carry
    return (n < max_new_tokens) & ~jnp.all(done_b)

  def body(carry):
    n, cache, token_b, done_b, out_tokens_bn, out_logprobs_bn = carry
    positions_b1 = (prompt_lens_b + n - 1)[:, None]
    logits_b1v, cache = model.decode(jnp.maximum(token_b, 0)[:, None], positions_b1,
                                     jnp.ones((b, 1), bool), cache)
    new_b, logprob_b = sample(logits_b1v[:, 0], step=n)
    new_b, done_b, out_tokens_bn, out_logprobs_bn = record(n, new_b, logprob_b, done_b,
                                                           out_tokens_bn, out_logprobs_bn)
    return n + 1, cache, new_b, done_b, out_tokens_bn, out_logprobs_bn

  carry = (jnp.ones((), jnp.int32), cache, token_b, done_b, out_tokens_bn, out_logprobs_bn)
  steps, cache, _, _, out_tokens_bn, out_logprobs_bn = jax.lax.while_loop(cond, body, carry)
  return out_tokens_bn, out_logprobs_bn, steps, cache


def _stack_kv(cache: KVCache) -> jax.Array:
  """The cache's keys and values as one array [layers, 2, b, k, slots, h]."""
  return jnp.stack([jnp.stack(cache.k), jnp.stack(cache.v)], axis=1)


def _sampler_fn(key, row_ids_b, temperature, top_k, top_p, allowed_v, mode):
  return functools.partial(_sample, key=key, row_ids_b=row_ids_b, temperature=temperature,
                           top_k=top_k, top_p=top_p, allowed_v=allowed_v, mode=mode)


@functools.partial(jax.jit, static_argnames=("graphdef", "buffer", "mode", "keep_cache"))
def _generate_padded(graphdef, state, tokens_bp, prompt_lens_b, row_ids_b, active_b,
                     max_new_tokens, is_stop_v, temperature, top_k, top_p, key, allowed_v, *,
                     buffer: int, mode: _Mode, keep_cache: bool = False):
  """Prefill + while-loop decode on padded arrays -> (tokens [b, buffer], logprobs [b, buffer],
  steps run, and with `keep_cache` the cache's keys and values [layers, 2, b, k, P + buffer, h]).
  """
  model: Qwen3 = nnx.merge(graphdef, state)
  b, p = tokens_bp.shape
  pad_b = p - prompt_lens_b
  slot_p = jnp.arange(p)
  valid_bp = slot_p[None] >= pad_b[:, None]
  positions_bp = jnp.maximum(slot_p[None] - pad_b[:, None], 0)
  logits_b1v, cache = model.prefill(tokens_bp, positions_bp, valid_bp, p + buffer,
                                    last_only=True)
  out = _decode_loop(model, cache, logits_b1v[:, 0], prompt_lens_b, ~active_b, max_new_tokens,
                     is_stop_v,
                     _sampler_fn(key, row_ids_b, temperature, top_k, top_p, allowed_v, mode),
                     buffer)
  return out[:3] + ((_stack_kv(out[3]),) if keep_cache else ())


@functools.partial(jax.jit, static_argnames=("graphdef", "buffer", "mode"))
def _generate_extend(graphdef, state, prefix_kv, prefix_lens_b, tokens_bm, new_lens_b,
                     row_ids_b, active_b, max_new_tokens, is_stop_v, temperature, top_k, top_p,
                     key, allowed_v, *, buffer: int, mode: _Mode):
  """Like `_generate_padded`, but each row's first tokens come as cached keys and values.

  prefix_kv [layers, 2, b, k, P, h]: row i's prefix right-aligned in slots P - L_i .. P - 1;
  tokens_bm: its new prompt tokens left-padded in M slots (slots P .. P + M - 1 of the cache),
  with positions L_i .. L_i + n_i - 1. They run through `Qwen3.decode` as one chunk over the
  cache, so the cost is the new tokens times the context, not the context squared. Returns the
  cache [layers, 2, b, k, P + M + buffer, h] too.
  """
  model: Qwen3 = nnx.merge(graphdef, state)
  _, _, b, _, p, _ = prefix_kv.shape
  m = tokens_bm.shape[1]
  pad = ((0, 0), (0, 0), (0, m + buffer), (0, 0))
  slot_p, slot_m = jnp.arange(p), jnp.arange(m)
  valid_bs = jnp.concatenate([slot_p[None] >= (p - prefix_lens_b)[:, None],
                              jnp.zeros((b, m + buffer), bool)], axis=1)
  cache = KVCache(k=tuple(jnp.pad(k, pad) for k in prefix_kv[:, 0]),
                  v=tuple(jnp.pad(v, pad) for v in prefix_kv[:, 1]),
                  valid=valid_bs, index=jnp.asarray(p, jnp.int32))
  pad_b = m - new_lens_b
  valid_bm = slot_m[None] >= pad_b[:, None]
  positions_bm = prefix_lens_b[:, None] + jnp.maximum(slot_m[None] - pad_b[:, None], 0)
  hidden_bmd, cache = model.decode(tokens_bm, positions_bm, valid_bm, cache, return_hidden=True)
  logits_bv = model.unembed(hidden_bmd[:, -1:])[:, 0]
  out = _decode_loop(model, cache, logits_bv, prefix_lens_b + new_lens_b, ~active_b,
                     max_new_tokens, is_stop_v,
                     _sampler_fn(key, row_ids_b, temperature, top_k, top_p, allowed_v, mode),
                     buffer)
  return out[:3] + (_stack_kv(out[3]),)


class PrefixCache:
  """The keys and values of earlier calls' rows, kept in host memory, so that the next turn of a
  conversation prefills only the tokens it added.

      cache = PrefixCache(max_entries=256)
      generate(model, prompts, 80, prefix_cache=cache, cache_keys=episode_ids)

  After a call, row i's entry under `cache_keys[i]` holds its prompt plus the tokens it sampled
  (except the last, which was never fed) and their keys and values. The next call with that key
  reuses the longest common prefix of the entry's ids and the new prompt, so a key is only a
  hint: a prompt that does not extend its entry (a truncated context, a reused key) just reuses
  less, never wrong keys. Rows that would reuse fewer than `min_reuse` tokens prefill from
  scratch. The least recently used entries go past `max_entries` (each holds layers x 2 x
  kv_heads x length x head_dim floats: 3.3 MB for a 1600-token row of the demo student).

  The cache belongs to one set of params: `clear()` it when they change (a new round).
  """

  def __init__(self, max_entries: int = 256, min_reuse: int = 32):
    if max_entries < 1:
      raise SampleError(f"PrefixCache: max_entries={max_entries} must be >= 1")
    self.max_entries = max_entries
    self.min_reuse = min_reuse
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self.reused_tokens = 0   # prompt tokens taken from the cache instead of prefilled
    self.prefilled_tokens = 0

  def __len__(self) -> int:
    return len(self._entries)

  def clear(self) -> None:
    self._entries.clear()

  def lookup(self, key, prompt: Sequence[int]) -> tuple[np.ndarray | None, int]:
    """-> (the entry's keys and values [layers, 2, k, L, h], how many leading tokens of `prompt`
    they cover), or (None, 0) when fewer than `min_reuse` would be reused."""
    entry = self._entries.get(key)
    if entry is None:
      return None, 0
    ids, kv = entry
    m = min(len(ids), len(prompt) - 1)  # at least one new token must run to give the logits
    if m <= 0:
      return None, 0
    diff = np.flatnonzero(ids[:m] != np.asarray(prompt[:m], np.int32))
    common = int(diff[0]) if diff.size else m
    if common < self.min_reuse:
      return None, 0
    self._entries.move_to_end(key)
    return kv, common

  def put(self, key, ids: np.ndarray, kv: np.ndarray) -> None:
    self._entries[key] = (ids, kv)
    self._entries.move_to_end(key)
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)


def compiled_programs() -> int:
  """How many (bucket, mode) programs are compiled so far (tests use it to catch recompiles)."""
  return _generate_padded._cache_size() + _generate_extend._cache_size()


def generate(model: Qwen3, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_token_ids: Sequence[int] = (), seed: int = 0,
             length_buckets: Sequence[int] | None = None,
             prefix_cache: "PrefixCache | None" = None,
             cache_keys: Sequence[Any] | None = None,
             vocab_limit: int | None = None,
             row_seeds: Sequence[int] | None = None) -> SampleResult:
  """Samples up to `max_new_tokens` new tokens for each prompt (a list of token-id lists).

  temperature 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature)
  restricted to the top-k (`top_k` > 0) and then the top-p nucleus (`top_p` < 1). A row stops
  after the first token in `stop_token_ids` (which it includes) or after `max_new_tokens`.
  With a `prefix_cache` (and one `cache_keys` entry per prompt), prompts that extend what their
  key's entry holds prefill only the tokens after it, and every row's entry is updated to its
  prompt + new tokens (see `PrefixCache`); the output is the same as without one, up to float
  rounding. With `vocab_limit`, ids >= it are never sampled: a model's embedding table is often
  larger than its tokenizer (Qwen3: 151936 rows, 151669 tokens), and those ids have no text.
  `row_seeds` (one per prompt, in [0, 2**31)): each row's randomness beside `seed` (default: its
  index in `prompts`; see the module docstring).
  """
  vocab = model.config.vocab_size
  if not prompts:
    raise SampleError("generate: no prompts")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise SampleError(f"generate: prompt {i} is empty")
    if min(prompt) < 0 or max(prompt) >= vocab:
      raise SampleError(f"generate: prompt {i} has a token id outside [0, {vocab})")
  if max_new_tokens < 1:
    raise SampleError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  longest, limit = max(len(x) for x in prompts), model.config.max_position_embeddings
  if longest + max_new_tokens > limit:
    raise SampleError(f"generate: a prompt of {longest} tokens + max_new_tokens={max_new_tokens} "
                      f"exceeds the model's max_position_embeddings={limit} (shorten the prompt)")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise SampleError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                      f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
  if any(not 0 <= t < vocab for t in stop_token_ids):
    raise SampleError(f"generate: stop_token_ids {list(stop_token_ids)} outside [0, {vocab})")
  if vocab_limit is not None and not 0 < vocab_limit <= vocab:
    raise SampleError(f"generate: vocab_limit={vocab_limit} outside (0, {vocab}]")

  if prefix_cache is not None and (cache_keys is None or len(cache_keys) != len(prompts)):
    raise SampleError("generate: prefix_cache needs one cache key per prompt (cache_keys)")
  n = len(prompts)
  ids = list(range(n)) if row_seeds is None else [int(r) for r in row_seeds]
  if len(ids) != n or not all(0 <= r < 2 ** 31 for r in ids):
    raise SampleError(f"generate: row_seeds needs one seed in [0, 2**31) per prompt ({n}); got "
                      f"{list(row_seeds)[:8]}")
  is_stop_v = np.zeros((vocab,), bool)
  is_stop_v[list(stop_token_ids)] = True
  allowed_v = np.arange(vocab) < (vocab if vocab_limit is None else vocab_limit)
  call = _Call(graphdef_state=nnx.split(model), max_new_tokens=np.int32(max_new_tokens),
               is_stop_v=is_stop_v, allowed_v=allowed_v, temperature=np.float32(temperature or 1.0),
               top_k=np.int32(top_k), top_p=np.float32(top_p), key=jax.random.key(seed),
               buffer=max(pow2(max_new_tokens), 8),
               mode=_Mode(greedy=temperature == 0, filtered=top_k > 0 or top_p < 1))

  if prefix_cache is None:
    tokens, logprobs, steps, _ = _run_padded(call, prompts, ids, length_buckets)
  else:
    hits = [prefix_cache.lookup(k, p) for k, p in zip(cache_keys, prompts)]
    fresh = [i for i in range(n) if hits[i][0] is None]
    cached = [i for i in range(n) if hits[i][0] is not None]
    groups = []  # (rows, what their program returned): one program per kind of row
    if fresh:
      groups.append((fresh, _run_padded(call, [prompts[i] for i in fresh],
                                        [ids[i] for i in fresh], length_buckets,
                                        keep_cache=True)))
    if cached:
      groups.append((cached, _run_extend(call, [prompts[i] for i in cached],
                                         [hits[i] for i in cached], [ids[i] for i in cached],
                                         length_buckets)))
    tokens, logprobs, steps = [None] * n, [None] * n, 0
    for rows, (rows_tokens, rows_logprobs, rows_steps, kv_of) in groups:
      steps = max(steps, rows_steps)
      for j, i in enumerate(rows):
        tokens[i], logprobs[i] = rows_tokens[j], rows_logprobs[j]
        fed = rows_tokens[j][:-1]  # the last sampled token was never fed to the model
        prefix_cache.put(cache_keys[i], np.asarray(list(prompts[i]) + fed, np.int32),
                         kv_of(j, len(fed)))
    prefix_cache.prefilled_tokens += sum(len(p) - common for p, (_, common) in zip(prompts, hits))
    prefix_cache.reused_tokens += sum(common for _, common in hits)
  reasons = ["stop" if row and is_stop_v[row[-1]] else "length" for row in tokens]
  return SampleResult(tokens=tokens, logprobs=logprobs, finish_reasons=reasons, steps=int(steps))


@dataclasses.dataclass(frozen=True)
class _Call:
  """What every compiled program of one `generate` call shares."""
  graphdef_state: tuple
  max_new_tokens: np.ndarray
  is_stop_v: np.ndarray
  allowed_v: np.ndarray
  temperature: np.ndarray
  top_k: np.ndarray
  top_p: np.ndarray
  key: jax.Array
  buffer: int
  mode: _Mode

  def args(self):
    return (self.max_new_tokens, self.is_stop_v, self.temperature, self.top_k, self.top_p,
            self.key, self.allowed_v)


def _rows_out(out_tokens_bn, out_logprobs_bn, n):
  """The first n rows' tokens and logprobs up to where each finished."""
  tokens, logprobs = [], []
  for i in range(n):
    length = int(np.sum(out_tokens_bn[i] != _PAD))
    tokens.append(out_tokens_bn[i, :length].tolist())
    logprobs.append(out_logprobs_bn[i, :length].tolist())
  return tokens, logprobs


# The most bytes one padded program's prefill may spend on a [B, P, P] float32 score array (the
# attention bias and each query block's scores scale with it). Larger batches of long prompts run
# as several programs, shortest prompts first: 200 conversations of ~3k tokens in one program
# would need ~10 GiB for the bias alone.
PREFILL_SCORE_BYTES = 1 << 30


def _prefill_chunks(lengths: Sequence[int], length_buckets) -> list[list[int]]:
  """Indices of the prompts, in groups whose padded [B, P, P] float32 fits
  `PREFILL_SCORE_BYTES` (one group, in order, when the whole batch fits).

  >>> _prefill_chunks([10, 3000, 20], None)
  [[0, 1, 2]]
  >>> [len(c) for c in _prefill_chunks([1500] * 200, (512, 1024, 1536, 2048))]  # 64 x 1536^2
  [64, 64, 64, 8]
  """
  def cost(n, longest):
    p = bucket(longest, length_buckets)
    return pow2(n) * p * p * 4

  if cost(len(lengths), max(lengths)) <= PREFILL_SCORE_BYTES:
    return [list(range(len(lengths)))]
  chunks: list[list[int]] = []
  for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):  # longest last in each chunk
    if chunks and cost(len(chunks[-1]) + 1, lengths[i]) <= PREFILL_SCORE_BYTES:
      chunks[-1].append(i)
    else:
      chunks.append([i])
  return chunks


def _run_padded(call: _Call, prompts, rows, length_buckets, keep_cache=False):
  """Whole prompts, left-padded to one bucket -> (tokens, logprobs, steps, kv_of(j, fed) or
  None without `keep_cache`); `rows` are the prompts' row seeds (`generate`'s `row_seeds`). Runs as
  several programs when one would need too much memory (`_prefill_chunks`)."""
  chunks = _prefill_chunks([len(x) for x in prompts], length_buckets)
  if len(chunks) == 1:
    return _run_padded_one(call, prompts, rows, length_buckets, keep_cache)
  n = len(prompts)
  tokens, logprobs, steps, kv_fns = [None] * n, [None] * n, 0, [None] * n
  for chunk in chunks:
    out = _run_padded_one(call, [prompts[i] for i in chunk], [rows[i] for i in chunk],
                          length_buckets, keep_cache)
    steps = max(steps, out[2])
    for j, i in enumerate(chunk):
      tokens[i], logprobs[i] = out[0][j], out[1][j]
      if keep_cache:
        kv_fns[i] = functools.partial(out[3], j)
  kv_of = (lambda i, fed: kv_fns[i](fed)) if keep_cache else None
  return tokens, logprobs, steps, kv_of


def _run_padded_one(call: _Call, prompts, rows, length_buckets, keep_cache=False):
  n = len(prompts)
  b = pow2(n)
  p = bucket(max(len(x) for x in prompts), length_buckets)
  tokens_bp = np.zeros((b, p), np.int32)
  prompt_lens_b = np.ones((b,), np.int32)  # dummy rows: one token, never recorded
  row_ids_b = np.arange(b, dtype=np.int32)
  row_ids_b[:n] = rows
  for i, prompt in enumerate(prompts):
    tokens_bp[i, p - len(prompt):] = prompt
    prompt_lens_b[i] = len(prompt)
  graphdef, state = call.graphdef_state
  out = jax.device_get(_generate_padded(
      graphdef, state, tokens_bp, prompt_lens_b, row_ids_b, np.arange(b) < n, *call.args(),
      buffer=call.buffer, mode=call.mode, keep_cache=keep_cache))
  tokens, logprobs = _rows_out(out[0], out[1], n)

  def kv_of(j, fed):  # prompt j's slots, then the fed new tokens' (from slot p on)
    kv = out[3]
    return np.concatenate([kv[:, :, j, :, p - len(prompts[j]):p],
                           kv[:, :, j, :, p:p + fed]], axis=3)
  return tokens, logprobs, int(out[2]), kv_of if keep_cache else None


def _run_extend(call: _Call, prompts, hits, rows, length_buckets):
  """Prompts whose first tokens are cached (`hits`: PrefixCache.lookup's answers): only the rest
  is prefilled (`_generate_extend`) -> (tokens, logprobs, steps, kv_of(j, fed))."""
  n = len(prompts)
  b = pow2(n)
  lens = [common for _, common in hits]
  p = bucket(max(lens), length_buckets)
  m = max(pow2(max(len(x) - c for x, c in zip(prompts, lens))), 32)
  layers, two, kv_heads, _, head = hits[0][0].shape
  prefix_kv = np.zeros((layers, two, b, kv_heads, p, head), hits[0][0].dtype)
  tokens_bm = np.zeros((b, m), np.int32)
  prefix_lens_b = np.zeros((b,), np.int32)
  new_lens_b = np.ones((b,), np.int32)  # dummy rows: one token, never recorded
  row_ids_b = np.arange(b, dtype=np.int32)
  row_ids_b[:n] = rows
  for i, (prompt, (kv, common)) in enumerate(zip(prompts, hits)):
    prefix_kv[:, :, i, :, p - common:] = kv[:, :, :, :common]
    new = prompt[common:]
    tokens_bm[i, m - len(new):] = new
    prefix_lens_b[i], new_lens_b[i] = common, len(new)
  graphdef, state = call.graphdef_state
  out = jax.device_get(_generate_extend(
      graphdef, state, prefix_kv, prefix_lens_b, tokens_bm, new_lens_b, row_ids_b,
      np.arange(b) < n, *call.args(), buffer=call.buffer, mode=call.mode))
  tokens, logprobs = _rows_out(out[0], out[1], n)

  def kv_of(j, fed):  # the reused prefix, the new prompt tokens, then the fed new tokens
    kv = out[3]
    return np.concatenate([kv[:, :, j, :, p - lens[j]:p],
                           kv[:, :, j, :, p + m - new_lens_b[j]:p + m + fed]], axis=3)
  return tokens, logprobs, int(out[2]), kv_of
