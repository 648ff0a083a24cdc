"""The batched KV-cache sampler against transformers' `generate`, and its sampling rules.

The reference is a random tiny transformers Qwen3ForCausalLM (fp32, CPU), saved with
transformers and loaded into Flax by `hf.load_pretrained`: greedy decoding of a left-padded batch
with different prompt lengths must equal `generate(do_sample=False)` token for token.
"""

import json
import math

import jax

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import support
from dagger_jax import cli, configlib
from dagger_jax.data import tokenizer
from dagger_jax.data.render import prompt_ids
from dagger_jax.model import hf, params_io, sampler, sharding
from dagger_jax.model.qwen3 import KVCache

VOCAB = 512
BUCKETS = (16, 32)  # small prompt-length buckets keep compiles cheap


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(transformers model, the directory it is saved in)."""
  torch.manual_seed(0)
  config = transformers.Qwen3Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10_000.0,
      rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=True,
      # 0.1, not 0.02: logits spread over several units, so greedy choices are not near-ties.
      initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  reference = transformers.Qwen3ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("hf_tiny"))
  reference.save_pretrained(path)
  return reference, path


@pytest.fixture(scope="module")
def pair(saved):
  """(transformers model, the same weights as our Qwen3)."""
  reference, path = saved
  return reference, hf.load_pretrained(path)


def assert_close_rel(got, want, rel: float = 1e-5) -> None:
  """max |got - want| <= rel * max |want| (fp32 parity, relative to the logit scale)."""
  err, scale = np.abs(np.asarray(got) - np.asarray(want)).max(), np.abs(np.asarray(want)).max()
  assert err <= rel * scale, f"max abs diff {err:.3e} > {rel} * max |ref| {scale:.3e}"


_forward = nnx.jit(lambda m, x: m(x))
_prefill = nnx.jit(lambda m, x, pos, ok, slots, last_only=False:
                   m.prefill(x, pos, ok, slots, last_only=last_only), static_argnums=(4, 5))
_decode = nnx.jit(lambda m, x, pos, ok, cache: m.decode(x, pos, ok, cache))


def next_token_logits(model, prompt):
  return np.asarray(_forward(model, jnp.asarray([prompt]))[0, -1])


def prompts_of(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


def hf_greedy(reference, prompts, max_new_tokens, eos=None):
  """transformers' batched greedy generate on left-padded prompts -> (new ids per row, scores)."""
  t = max(map(len, prompts))
  ids = torch.zeros((len(prompts), t), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):] = torch.tensor(p)
    mask[i, t - len(p):] = 1
  with torch.inference_mode():
    out = reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
  new = out.sequences[:, t:].tolist()
  rows = []
  for row in new:  # cut after the first eos (transformers pads the rest)
    rows.append(row[:row.index(eos) + 1] if eos is not None and eos in row else row)
  logits = torch.stack(out.logits, dim=1).numpy()  # [b, steps, v]
  return rows, logits


def test_greedy_equals_transformers_generate(pair):
  reference, model = pair
  prompts = prompts_of((3, 17, 9, 1, 12))  # 5 rows: padded to a batch bucket of 8
  want, logits = hf_greedy(reference, prompts, max_new_tokens=24)
  top2 = np.sort(logits, axis=-1)[..., -2:]
  assert np.min(top2[..., 1] - top2[..., 0]) > 1e-3, "near-tie in the reference: pick another seed"
  assert len({tuple(r) for r in want}) == len(want)  # rows differ, so a row mix-up would show

  got = sampler.generate(model, prompts, max_new_tokens=24, length_buckets=BUCKETS)
  assert got.tokens == want
  assert got.finish_reasons == ["length"] * len(prompts)
  # Greedy logprobs are under the model's plain softmax (SampleResult): check against transformers.
  want_logp = [[float(torch.log_softmax(torch.from_numpy(logits[i, j]), -1)[tok])
                for j, tok in enumerate(row)] for i, row in enumerate(want)]
  np.testing.assert_allclose(np.array(got.logprobs), np.array(want_logp), atol=1e-5)


def test_greedy_equals_transformers_generate_base_tiny_model(tmp_path):
  """The same at the size of `configs/base.py`'s student (hidden 256, 4 layers, vocab 2048) with
  prompts that cross the prefill's 128-token query chunks and a 512 length bucket."""
  torch.manual_seed(1)
  config = dict(hf.config_to_hf(support.model_config()), initializer_range=0.1)
  reference = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config)).eval()
  reference.save_pretrained(str(tmp_path))
  model = hf.load_pretrained(str(tmp_path))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 2048, n).tolist() for n in (300, 40, 129)]
  want, logits = hf_greedy(reference, prompts, max_new_tokens=32)
  top2 = np.sort(logits, axis=-1)[..., -2:]
  assert np.min(top2[..., 1] - top2[..., 0]) > 1e-3, "near-tie in the reference: pick another seed"
  assert sampler.generate(model, prompts, max_new_tokens=32).tokens == want


def test_stop_token_ends_its_row_and_is_included(pair):
  reference, model = pair
  prompts = prompts_of((5, 11, 8), seed=1)
  free, _ = hf_greedy(reference, prompts, max_new_tokens=20)
  stop = free[1][6]  # a token row 1 produces at step 6 (it may also occur in other rows)
  want, _ = hf_greedy(reference, prompts, max_new_tokens=20, eos=stop)
  got = sampler.generate(model, prompts, max_new_tokens=20, stop_token_ids=[stop],
                         length_buckets=BUCKETS)
  assert got.tokens == want
  assert got.tokens[1][-1] == stop and len(got.tokens[1]) <= 7
  assert got.finish_reasons == ["stop" if row[-1] == stop else "length" for row in want]


def test_loop_exits_when_every_row_is_done(pair):
  _, model = pair
  prompts = prompts_of((4, 9), seed=9)
  free = sampler.generate(model, prompts, max_new_tokens=30, length_buckets=BUCKETS)
  assert free.steps == 30
  stops = [free.tokens[0][2], free.tokens[1][4]]  # row 0 stops by step 3, row 1 by step 5
  got = sampler.generate(model, prompts, max_new_tokens=30, stop_token_ids=stops,
                         length_buckets=BUCKETS)
  assert got.steps == max(map(len, got.tokens)) <= 5
  assert got.finish_reasons == ["stop", "stop"]


def test_max_new_tokens_and_padding_invariance(pair):
  _, model = pair
  prompts = prompts_of((4, 20, 7), seed=2)
  batch = sampler.generate(model, prompts, max_new_tokens=5, length_buckets=BUCKETS)
  assert [len(r) for r in batch.tokens] == [5, 5, 5] and batch.steps == 5
  for prompt, row in zip(prompts, batch.tokens):  # alone: another batch and prompt bucket
    assert sampler.generate(model, [prompt], max_new_tokens=5, length_buckets=(32,)).tokens == [row]


def test_sharded_model_samples_the_same(saved, pair):
  """Params sharded over a 2x2x2 (data, fsdp, tensor) mesh of CPU devices, under `jax.set_mesh`
  (so the model's activation constraints apply): the same tokens and logprobs."""
  _, model = pair
  mesh = sharding.make_mesh(2, 2, 2)
  sharded = hf.load_pretrained(saved[1], mesh=mesh)
  prompts = prompts_of((3, 17, 9, 1), seed=8)
  want = sampler.generate(model, prompts, max_new_tokens=8, length_buckets=BUCKETS)
  with jax.set_mesh(mesh):
    got = sampler.generate(sharded, prompts, max_new_tokens=8, length_buckets=BUCKETS)
  assert got.tokens == want.tokens
  np.testing.assert_allclose(np.array(got.logprobs), np.array(want.logprobs), atol=1e-5)


def test_same_bucket_does_not_recompile(pair):
  _, model = pair
  # max_new_tokens 33..64 share the 64-token buffer, which no other test here uses.
  prompts = prompts_of((5, 9, 14), seed=3)
  sampler.generate(model, prompts, max_new_tokens=40, length_buckets=BUCKETS)
  compiled = sampler.compiled_programs()
  # Other prompt lengths (same 16-bucket), batch 4 (same batch bucket), max_new_tokens 64 (same
  # buffer), other stop ids and seed: the same program.
  sampler.generate(model, prompts_of((2, 16, 7, 11), seed=4), max_new_tokens=64,
                   stop_token_ids=[5, 6], seed=9, length_buckets=BUCKETS)
  assert sampler.compiled_programs() == compiled
  # Sampling with other temperature / top-k / top-p values shares one program.
  for temperature, top_k, top_p in ((0.7, 5, 0.9), (1.3, 50, 0.5)):
    sampler.generate(model, prompts, max_new_tokens=40, temperature=temperature, top_k=top_k,
                     top_p=top_p, length_buckets=BUCKETS)
  assert sampler.compiled_programs() == compiled + 1
  # A longer prompt (next length bucket) compiles a new program.
  sampler.generate(model, prompts_of((20, 3)), max_new_tokens=40, length_buckets=BUCKETS)
  assert sampler.compiled_programs() == compiled + 2


def test_sampling_is_seeded_and_filters_apply(pair):
  _, model = pair
  prompts = prompts_of((6, 13), seed=5)
  kw = dict(max_new_tokens=12, temperature=1.0, length_buckets=BUCKETS)
  a = sampler.generate(model, prompts, seed=1, **kw)
  assert sampler.generate(model, prompts, seed=1, **kw) == a
  assert sampler.generate(model, prompts, seed=2, **kw).tokens != a.tokens
  greedy = sampler.generate(model, prompts, max_new_tokens=12, length_buckets=BUCKETS)
  top1 = sampler.generate(model, prompts, top_k=1, seed=3, **kw)
  assert top1.tokens == greedy.tokens
  np.testing.assert_allclose(np.array(top1.logprobs), 0.0, atol=1e-6)  # a one-token distribution
  nucleus = sampler.generate(model, prompts, top_p=1e-6, seed=3, **kw)
  assert nucleus.tokens == greedy.tokens


def test_row_seeds_make_a_row_draw_alone(pair):
  """With `row_seeds` a row draws the same tokens whatever rows share its call, in whatever
  order, in a whole prefill or over a prefix cache; the same prompt under two seeds draws two
  ways (which is how a batch of one task's episodes differ)."""
  _, model = pair
  prompts = prompts_of((6, 13, 9), seed=5)
  kw = dict(max_new_tokens=12, temperature=1.0, length_buckets=BUCKETS, seed=0)
  together = sampler.generate(model, prompts, row_seeds=[11, 22, 33], **kw).tokens
  assert sampler.generate(model, prompts[2:], row_seeds=[33], **kw).tokens == together[2:]
  assert sampler.generate(model, prompts[::-1], row_seeds=[33, 22, 11],
                          **kw).tokens == together[::-1]
  cache = sampler.PrefixCache(max_entries=4, min_reuse=4)
  sampler.generate(model, prompts[1:2], row_seeds=[5], prefix_cache=cache, cache_keys=["b"], **kw)
  longer = [prompts[0], prompts[1] + [7, 8, 9]]
  cached = sampler.generate(model, longer, row_seeds=[11, 22], prefix_cache=cache,
                            cache_keys=["a", "b"], **kw).tokens
  assert cache.reused_tokens == len(prompts[1])  # row b ran in the extend program
  assert cached == sampler.generate(model, longer, row_seeds=[11, 22], **kw).tokens
  twice = sampler.generate(model, [prompts[0]] * 2, row_seeds=[1, 2], **kw).tokens
  assert twice[0] != twice[1]
  with pytest.raises(ValueError, match="row_seeds needs one seed"):
    sampler.generate(model, prompts, row_seeds=[1, 2], **kw)
  with pytest.raises(ValueError, match="row_seeds needs one seed"):
    sampler.generate(model, prompts, row_seeds=[1, 2, 2 ** 31], **kw)


def test_sampled_distribution_and_logprobs(pair):
  """One new token for 256 copies of a prompt at temperature 2, top-k 20, top-p 0.8: every token
  is in the nucleus computed here in numpy, its logprob is that of the renormalised nucleus, and
  the frequencies match the nucleus probabilities."""
  _, model = pair
  prompt = prompts_of((10,), seed=6)[0]
  temperature, top_k, top_p, n = 2.0, 20, 0.8, 256
  out = sampler.generate(model, [prompt] * n, max_new_tokens=1, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=0, length_buckets=BUCKETS)
  logits = next_token_logits(model, prompt).astype(np.float64) / temperature
  order = np.argsort(-logits)[:top_k]
  p = np.exp(logits[order] - logits[order].max())
  p /= p.sum()
  kept = int(np.sum(np.cumsum(p) - p < top_p))
  nucleus = {int(t): q for t, q in zip(order[:kept], p[:kept] / p[:kept].sum())}
  assert 2 <= len(nucleus) < top_k  # both filters matter for this prompt
  tokens = [row[0] for row in out.tokens]
  assert set(tokens) <= set(nucleus)
  for row, logp in zip(out.tokens, out.logprobs):
    assert logp[0] == pytest.approx(math.log(nucleus[row[0]]), abs=1e-5)
  for t, q in nucleus.items():  # binomial counts within 4.5 standard deviations
    assert abs(tokens.count(t) - n * q) <= 4.5 * math.sqrt(n * q * (1 - q)) + 1


def test_buckets():
  assert [sampler.bucket(n, (16, 32)) for n in (1, 16, 17, 32, 33, 70)] == [16, 16, 32, 32, 64, 96]


def test_filter_logits_docstring_example():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  out = sampler.filter_logits(logits, jnp.int32(3), jnp.float32(0.7))
  assert np.isfinite(np.asarray(out)).tolist() == [[True, True, False, False]]
  everything = sampler.filter_logits(logits, jnp.int32(0), jnp.float32(1.0))
  assert np.isfinite(np.asarray(everything)).all()


def test_prefill_then_decode_equals_full_forward(pair):
  """`Qwen3.prefill` (causal block skipping over the prompt) + one-token `decode` steps give the
  logits of the plain forward pass of each unpadded sequence; prompts span two query chunks.
  `last_only` gives the same last logits and the same cache."""
  _, model = pair
  lengths, steps, t = (150, 37), 3, 160
  seqs = prompts_of([n + steps for n in lengths], seed=7)
  tokens = np.zeros((2, t), np.int32)
  valid = np.zeros((2, t), bool)
  positions = np.zeros((2, t), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, t - n:], valid[i, t - n:], positions[i, t - n:] = seqs[i][:n], True, np.arange(n)
  tokens, positions, valid = map(jnp.asarray, (tokens, positions, valid))
  logits, cache = _prefill(model, tokens, positions, valid, t + steps)
  full = [np.asarray(_forward(model, jnp.asarray([s]))[0]) for s in seqs]
  for i, n in enumerate(lengths):
    assert_close_rel(np.asarray(logits)[i, t - n:], full[i][:n])
  last, last_cache = _prefill(model, tokens, positions, valid, t + steps, True)
  assert_close_rel(np.asarray(last)[:, 0], np.asarray(logits)[:, -1])
  for a, b in zip(last_cache.k + last_cache.v, cache.k + cache.v):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  same, _ = _decode(model, tokens, positions, valid, KVCache.zeros(model.config, 2, t + steps))
  valid = np.asarray(valid)  # (outputs at padding positions are never used)
  assert_close_rel(np.asarray(logits)[valid], np.asarray(same)[valid])
  for step in range(steps):
    x = jnp.asarray([[s[n + step]] for s, n in zip(seqs, lengths)])
    pos = jnp.asarray([[n + step] for n in lengths])
    logits, cache = _decode(model, x, pos, jnp.ones((2, 1), bool), cache)
    for i, n in enumerate(lengths):
      assert_close_rel(np.asarray(logits)[i, 0], full[i][n + step])


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, VOCAB]]), "prompt 0 has a token id outside"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(stop_token_ids=[VOCAB]), "stop_token_ids"),
    (dict(prompts=[[1] * 250], max_new_tokens=7), "exceeds the model's max_position_embeddings"),
])
def test_bad_arguments_are_named(pair, kwargs, message):
  _, model = pair
  args = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | kwargs
  with pytest.raises(ValueError, match=message):
    sampler.generate(model, **args)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def hf_dir_with_tokenizer(pair, tmp_path_factory):
  """The reference model saved with transformers, plus a demo BPE tokenizer (vocab < 512)."""
  reference, _ = pair
  path = str(tmp_path_factory.mktemp("hf_tok"))
  reference.save_pretrained(path)
  tokenizer.train_demo_tokenizer(["hello world, a small corpus for a tiny tokenizer"] * 8, path,
                                 vocab_size=300)
  return path


def test_cli_generate_text_prompt_matches_library(hf_dir_with_tokenizer, pair, capsys):
  _, model = pair
  path = hf_dir_with_tokenizer
  code = cli.main(["generate", "--config", f"{configlib.REPO_ROOT}/configs/demo.py", "--ckpt", path,
                   "--prompt", "hello world", "--max-new-tokens", "6", "--json"])
  assert code == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  tok = tokenizer.load_tokenizer_dir(path)
  prompt = prompt_ids([{"role": "user", "content": "hello world"}], [], tok)
  want = sampler.generate(model, [prompt], 6, stop_token_ids=[tok.eos_token_id])
  assert row["prompt_ids"] == prompt
  assert row["ids"] == want.tokens[0]
  assert row["text"] == tok.decode(want.tokens[0], skip_special_tokens=False)
  np.testing.assert_allclose(row["logprobs"], want.logprobs[0], rtol=1e-6)


def test_cli_generate_ids_from_orbax_checkpoint(pair, tmp_path, capsys):
  _, model = pair
  ckpt = params_io.save_params(model, str(tmp_path / "ckpt"))
  code = cli.main(["generate", "--config", f"{configlib.REPO_ROOT}/configs/demo.py", "--ckpt", ckpt,
                   "--ids", "5 6 7", "--ids", "9", "--max-new-tokens", "4", "--stop-id", "3"])
  assert code == 0
  lines = capsys.readouterr().out.strip().splitlines()[-2:]
  want = sampler.generate(model, [[5, 6, 7], [9]], 4, stop_token_ids=[3])
  assert [list(map(int, line.split())) for line in lines] == want.tokens


def test_cli_generate_names_bad_input(tmp_path, capsys):
  demo = f"{configlib.REPO_ROOT}/configs/demo.py"
  assert cli.main(["generate", "--config", demo, "--ids", "1 x"]) == 2
  assert "--ids takes integers" in capsys.readouterr().err
  assert cli.main(["generate", "--config", demo, "--ckpt", str(tmp_path / "nope"),
                   "--ids", "1"]) == 2
  assert "no such checkpoint directory" in capsys.readouterr().err
  assert cli.main(["generate", "--config", demo]) == 2
  assert "--prompt" in capsys.readouterr().err


def test_prefix_cache_turns_match_whole_prefills(pair):
  """Three turns of four conversations (the prompt grows by the sampled tokens and an
  'observation'): with a PrefixCache, turns 2 and 3 prefill only what was added, and tokens and
  logprobs equal those of prefilling every prompt whole. Turn 2 also starts a fifth conversation
  (no entry) and gives one key a prompt that does not extend its entry (reused less, still
  right); sampling at temperature 1 draws the same tokens, whichever program a row ran in."""
  _, model = pair
  rng = np.random.default_rng(7)
  stop = 2
  for temperature in (0.0, 1.0):
    cache = sampler.PrefixCache(max_entries=8, min_reuse=4)
    convs = prompts_of((9, 14, 5, 12), seed=8)
    keys = ["a", "b", "c", "d"]
    kw = dict(max_new_tokens=10, temperature=temperature, stop_token_ids=[stop],
              length_buckets=BUCKETS)
    for turn in range(3):
      want = sampler.generate(model, convs, seed=turn, **kw)
      got = sampler.generate(model, convs, seed=turn, prefix_cache=cache, cache_keys=keys, **kw)
      assert got.tokens == want.tokens, f"turn {turn}, temperature {temperature}"
      np.testing.assert_allclose(np.concatenate([np.array(x) for x in got.logprobs]),
                                 np.concatenate([np.array(x) for x in want.logprobs]),
                                 atol=2e-5, rtol=1e-5)
      if turn == 0:
        assert cache.reused_tokens == 0
      else:
        assert cache.reused_tokens > 0
      convs = [c + t + rng.integers(3, VOCAB, 3).tolist() for c, t in zip(convs, got.tokens)]
      if turn == 0:
        convs.append(prompts_of((7,), seed=9)[0])
        keys.append("e")
        convs[1] = convs[1][:6] + [5] + convs[1][7:]  # diverges from its entry at token 6
    assert len(cache) == 5


def test_prefix_cache_evicts_and_checks(pair):
  cache = sampler.PrefixCache(max_entries=2, min_reuse=2)
  kv = np.zeros((1, 2, 1, 3, 4), np.float32)
  for key in "abc":
    cache.put(key, np.array([1, 2, 3], np.int32), kv)
  assert len(cache) == 2 and cache.lookup("a", [1, 2, 3, 4])[0] is None  # the oldest went
  assert cache.lookup("b", [1, 2, 3, 4])[1] == 3
  assert cache.lookup("b", [1, 2, 3])[1] == 2  # one token must stay new
  assert cache.lookup("b", [1, 9, 3, 4]) == (None, 0)  # below min_reuse
  with pytest.raises(ValueError, match="cache_keys"):
    sampler.generate(pair[1], [[1]], 1, prefix_cache=cache)


def test_large_batches_of_long_prompts_run_in_chunks(pair, monkeypatch):
  """Over `PREFILL_SCORE_BYTES` the batch runs as several programs, shortest prompts first: the
  same tokens and logprobs per row (greedy and sampled), and the prefix cache gets every row's
  keys and values."""
  _, model = pair
  convs = prompts_of((9, 30, 5, 17, 12, 26), seed=11)
  for temperature in (0.0, 1.0):
    kw = dict(max_new_tokens=6, temperature=temperature, length_buckets=BUCKETS, seed=3)
    want = sampler.generate(model, convs, **kw)
    monkeypatch.setattr(sampler, "PREFILL_SCORE_BYTES", 2 * 32 * 32 * 4)  # two rows of 32
    assert len(sampler._prefill_chunks([len(c) for c in convs], BUCKETS)) > 1
    cache = sampler.PrefixCache(max_entries=8, min_reuse=4)
    for got in (sampler.generate(model, convs, **kw),
                sampler.generate(model, convs, prefix_cache=cache, cache_keys=list("abcdef"), **kw)):
      assert got.tokens == want.tokens
      np.testing.assert_allclose(np.concatenate([np.array(x) for x in got.logprobs]),
                                 np.concatenate([np.array(x) for x in want.logprobs]),
                                 atol=2e-5, rtol=1e-5)
    assert len(cache) == 6 and cache.lookup("b", convs[1] + want.tokens[1][:-1] + [4])[1] > 0
    monkeypatch.undo()


def test_vocab_limit_is_never_sampled(pair):
  """Ids past the tokenizer (an embedding table larger than the tokenizer, as Qwen3's) are never
  drawn, greedy or sampled; below the limit the logprobs are those of the renormalised rest."""
  _, model = pair
  prompts = prompts_of((9, 14), seed=12)
  for temperature in (0.0, 1.0):
    free = sampler.generate(model, prompts, 12, temperature=temperature, seed=5,
                            length_buckets=BUCKETS)
    limit = min(min(row) for row in free.tokens)  # every id the free run drew is >= limit
    got = sampler.generate(model, prompts, 12, temperature=temperature, seed=5,
                           length_buckets=BUCKETS, vocab_limit=limit)
    assert all(t < limit for row in got.tokens for t in row)
  with pytest.raises(ValueError, match="vocab_limit"):
    sampler.generate(model, prompts, 2, vocab_limit=VOCAB + 1)
