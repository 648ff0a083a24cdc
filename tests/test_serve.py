"""`dagger-jax serve` over real HTTP with a tiny real model: SGLang's /generate contract (judged by
SGLang's own generated schema, tests/sglang_contract.py), equality with `sampler.generate`,
batching, weight updates, pause, API keys, OpenAI chat, and the CLI verb in a subprocess."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx

import sglang_contract
import support
from configs import base
from dagger_jax import cli, configlib
from dagger_jax.data import tokenizer as tokenizers
from dagger_jax.data.render import prompt_ids
from dagger_jax.model import hf, loader, params_io, sampler
from dagger_jax.model.qwen3 import Qwen3
from dagger_jax.policies.serve import Server, ServeError

CFG = support.model_config(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=256)
NEW = 6  # max_new_tokens of most requests (every call compiles for the buffer 8)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
MISSING = "/nonexistent/dagger_jax_model"


def peaked(config, seed: int) -> Qwen3:
  """A random model with params x5 (std 0.1, not 0.02): logits spread over several units, so
  greedy choices are not near-ties that float rounding between batch shapes could flip."""
  model = Qwen3(config, rngs=nnx.Rngs(seed))
  nnx.update(model, jax.tree.map(lambda x: x * 5.0, nnx.state(model, nnx.Param)))
  return model


@pytest.fixture(scope="module")
def api():
  return sglang_contract.require()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """Two HF exports of one architecture (with a demo BPE tokenizer), one of another, an Orbax
  checkpoint; and the models as loaded back (what the server serves)."""
  root = tmp_path_factory.mktemp("serve")
  tokenizers.train_demo_tokenizer(["hello world, a small corpus for a tiny tokenizer"] * 8,
                                  str(root / "tok"), vocab_size=300)
  d = {"tok": str(root / "tok")}
  for name, config, seed in (("a", CFG, 0), ("b", CFG, 1),
                             ("wrong", dataclasses.replace(CFG, hidden_size=48), 2)):
    hf.save_pretrained(peaked(config, seed), str(root / name), extras_from=d["tok"])
    d[name] = str(root / name)
  d["orbax"] = params_io.save_params(loader.load_model(d["a"], None), str(root / "orbax"))
  d["model_a"], d["model_b"] = loader.load_model(d["a"], None), loader.load_model(d["b"], None)
  d["tokenizer"] = tokenizers.load_tokenizer_dir(os.path.abspath(d["a"]))
  with open(os.path.join(d["a"], "generation_config.json")) as f:  # what an engine stops at
    d["stops"] = sorted(set(json.load(f)["eos_token_id"]))
  return d


def config():
  c = base.get_config()
  c.sampler.max_new_tokens, c.sampler.length_buckets = NEW, (32, 64)
  c.sampler.temperature, c.sampler.top_p, c.sampler.top_k = 0.0, 1.0, 0
  return c


@pytest.fixture(scope="module")
def server(dirs):
  with Server(dirs["a"], config()).start() as s:
    yield s


def call(url, body=None, headers=None, method=None):
  """-> (status, JSON or text body)."""
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data, {"Content-Type": "application/json",
                                               **(headers or {})}, method=method)
  try:
    with urllib.request.urlopen(request, timeout=120) as r:
      status, raw, kind = r.status, r.read(), r.headers.get("Content-Type")
  except urllib.error.HTTPError as e:
    status, raw, kind = e.code, e.read(), e.headers.get("Content-Type")
  return status, (json.loads(raw) if kind == "application/json" else raw.decode())


def generate(api, url, body, headers=None):
  """POST /generate with a body SGLang's schema accepts; checks the answer against it too."""
  sglang_contract.check_generate_request(api, body)
  status, out = call(url + "/generate", body, headers)
  assert status == 200, out
  sglang_contract.decode_generate_response(api, out)
  return out


def greedy(model, prompts, n=NEW, stops=()):
  """The sampler called directly, with the server's length buckets (the same padding)."""
  return sampler.generate(model, prompts, n, stop_token_ids=stops,
                          length_buckets=config().sampler.length_buckets)


# ----------------------------------------------------------------------------- /generate

def test_generate_equals_the_sampler_batch_single_logprobs_and_seeded(server, dirs, api):
  stops, tok = dirs["stops"], dirs["tokenizer"]
  want = greedy(dirs["model_a"], PROMPTS, stops=stops)
  out = generate(api, server.url, {"input_ids": PROMPTS, "return_logprob": True,
                                   "sampling_params": {"temperature": 0, "max_new_tokens": NEW}})
  assert isinstance(out, list) and [o["output_ids"] for o in out] == want.tokens
  for o, tokens, logprobs, reason in zip(out, want.tokens, want.logprobs, want.finish_reasons):
    meta = o["meta_info"]
    assert [e[1] for e in meta["output_token_logprobs"]] == tokens
    assert all(e[2] is None for e in meta["output_token_logprobs"])  # no return_text_in_logprobs
    np.testing.assert_allclose([e[0] for e in meta["output_token_logprobs"]], logprobs, rtol=1e-6)
    assert meta["input_token_logprobs"] == []  # logprob_start_len unset: outputs only
    assert meta["weight_version"] == "default" and meta["prompt_tokens"] > 0
    assert meta["completion_tokens"] == len(tokens) and reason == "length"
    assert meta["finish_reason"] == {"type": "length", "length": NEW}
    assert o["text"] == tok.decode(tokens, skip_special_tokens=True)
  assert len({o["meta_info"]["id"] for o in out}) == 3

  single = generate(api, server.url, {"input_ids": PROMPTS[0], "rid": "r1",
                                      "sampling_params": {"max_new_tokens": 3}})
  assert isinstance(single, dict) and single["meta_info"]["id"] == "r1"
  assert single["output_ids"] == greedy(dirs["model_a"], PROMPTS[:1], 3, stops).tokens[0]

  # input-token logprobs from logprob_start_len: log p(token | the tokens before it)
  out = generate(api, server.url, {"input_ids": PROMPTS[2], "return_logprob": True,
                                   "logprob_start_len": 1, "return_text_in_logprobs": True,
                                   "sampling_params": {"max_new_tokens": 1}})
  entries = out["meta_info"]["input_token_logprobs"]
  assert [e[1] for e in entries] == PROMPTS[2][1:]
  logp = jax.nn.log_softmax(dirs["model_a"](np.asarray(PROMPTS[2:3]))[0], axis=-1)
  for k, (lp, token, text) in enumerate(entries, start=1):
    assert lp == pytest.approx(float(logp[k - 1, token]), rel=1e-5, abs=1e-6)
    assert text == tok.decode([token])

  # sampling with a seed: each row draws by its seed alone (row_seeds under seed 0), as JaxPolicy
  # does in process, so a row gives the same tokens whatever rows share its call
  buckets = config().sampler.length_buckets
  body = {"input_ids": PROMPTS[:2], "sampling_params": {"temperature": 1.0, "sampling_seed": 7,
                                                         "max_new_tokens": NEW, "top_k": -1}}
  want = sampler.generate(dirs["model_a"], PROMPTS[:2], NEW, temperature=1.0, seed=0,
                          row_seeds=[7, 7], stop_token_ids=stops, length_buckets=buckets)
  assert want.tokens[0] != want.tokens[1]  # the seed is the row's, the prompts differ
  assert [o["output_ids"] for o in generate(api, server.url, body)] == want.tokens
  assert [o["output_ids"] for o in generate(api, server.url, body)] == want.tokens
  # a seed per row (as SGLangPolicy sends them): one call, the same request repeats, and a row
  # sent alone draws what it drew beside the other
  body["sampling_params"] = [{**body["sampling_params"], "sampling_seed": s} for s in (1, 2)]
  before = server.sampler_calls
  first = [o["output_ids"] for o in generate(api, server.url, body)]
  assert server.sampler_calls == before + 1
  assert first == sampler.generate(dirs["model_a"], PROMPTS[:2], NEW, temperature=1.0, seed=0,
                                   row_seeds=[1, 2], stop_token_ids=stops,
                                   length_buckets=buckets).tokens
  assert [o["output_ids"] for o in generate(api, server.url, body)] == first
  alone = {"input_ids": PROMPTS[1], "sampling_params": body["sampling_params"][1]}
  assert generate(api, server.url, alone)["output_ids"] == first[1]


def _continuation(server, dirs, api):
  """A prompt and its greedy continuation (no stops) with a position k >= 1 whose token is new
  and decodes to printable text not seen before it."""
  tok = dirs["tokenizer"]
  for start in range(3, 60):
    prompt = [start, start + 1]
    ids = generate(api, server.url, {"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 8, "ignore_eos": True}})["output_ids"]
    assert ids == greedy(dirs["model_a"], [prompt], 8).tokens[0]
    for k in range(1, len(ids)):
      piece = tok.decode(ids[k:k + 1])
      if (ids[k] not in ids[:k] and piece.strip() and piece.isprintable()
          and piece not in tok.decode(ids[:k]) and not piece.startswith(" ")):
        return prompt, ids, k, piece
  raise AssertionError("no greedy continuation with a fresh printable token")


def test_stop_token_and_stop_string_end_the_row_and_are_reported(server, dirs, api):
  tok = dirs["tokenizer"]
  prompt, ids, k, piece = _continuation(server, dirs, api)
  out = generate(api, server.url, {"input_ids": prompt, "sampling_params": {
      "max_new_tokens": 8, "ignore_eos": True, "stop_token_ids": [ids[k]]}})
  assert out["output_ids"] == ids[:k + 1]  # the stop token included
  assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
  assert out["text"] == tok.decode(ids[:k], skip_special_tokens=True)  # trimmed from the text
  kept = generate(api, server.url, {"input_ids": prompt, "sampling_params": {
      "max_new_tokens": 8, "ignore_eos": True, "stop_token_ids": [ids[k]], "no_stop_trim": True}})
  assert kept["text"] == tok.decode(ids[:k + 1], skip_special_tokens=True)

  out = generate(api, server.url, {"input_ids": prompt, "return_logprob": True,
                                   "sampling_params": {"max_new_tokens": 8, "ignore_eos": True,
                                                       "stop": [piece]}})
  assert out["output_ids"] == ids[:k + 1]
  assert len(out["meta_info"]["output_token_logprobs"]) == k + 1
  assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": piece}
  assert out["text"] == tok.decode(ids[:k])

  text = "hello world"  # text input is tokenized as SGLang does; prompt ids returned on request
  out = generate(api, server.url, {"text": text, "return_prompt_token_ids": True,
                                   "sampling_params": {"max_new_tokens": 4}})
  assert out["prompt_token_ids"] == tok.encode(text)
  assert out["output_ids"] == greedy(dirs["model_a"], [tok.encode(text)], 4,
                                     dirs["stops"]).tokens[0]


def test_refused_requests_have_sglang_error_shapes(server, api):
  for params in ({"max_new_tokenz": 4}, {"temperature": "hot"}):
    body = {"input_ids": [1, 2, 3], "sampling_params": params}
    with pytest.raises(api.JsonContractError) as contract:
      sglang_contract.check_generate_request(api, body)
    status, out = call(server.url + "/generate", body)
    assert (status, out) == (400, {"error": str(contract.value)})  # SGLang's exact body
  for params, needle in (({"frequency_penalty": 0.5}, "frequency_penalty"), ({"n": 2}, "n=2"),
                         ({"top_k": 0}, "top_k must be -1"), ({"max_new_tokens": 400}, "context")):
    body = {"input_ids": [1, 2, 3], "sampling_params": params}
    sglang_contract.check_generate_request(api, body)  # valid JSON for SGLang; refused by us
    status, out = call(server.url + "/generate", body)
    assert status == 400 and needle in out["error"]["message"], out
    api.ErrorBody.from_json_value(out["error"])
  for body, needle in (({"input_ids": [1, 999]}, "vocabulary"), ({"input_ids": []}, "empty"),
                       ({"input_ids": [1], "stream": True}, "stream"),
                       ({"input_ids": [1], "text": "a"}, "Either text")):
    status, out = call(server.url + "/generate", body)
    assert status == 400 and needle in out["error"]["message"], out
  assert call(server.url + "/nowhere")[0] == 404
  assert call(server.url + "/generate")[0] == 405  # GET


def test_concurrent_requests_share_sampler_calls_and_equal_one_by_one(server, dirs, api):
  prompts = [[20 + i, 30 + i, 40 + i][: 1 + i % 3] for i in range(8)]
  alone = [greedy(dirs["model_a"], [p], stops=dirs["stops"]).tokens[0] for p in prompts]
  before, results = server.sampler_calls, [None] * len(prompts)
  barrier = threading.Barrier(len(prompts))

  def one(i):
    barrier.wait()
    results[i] = generate(api, server.url, {"input_ids": prompts[i]})["output_ids"]
  threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  calls = server.sampler_calls - before
  assert results == alone
  assert 1 <= calls < len(prompts), f"{calls} sampler calls for {len(prompts)} requests"


# ----------------------------------------------------------------------------- control

def test_update_weights_changes_outputs_and_version_failures_keep_the_old(dirs, api):
  with Server(dirs["a"], config()).start() as s:
    body = {"input_ids": PROMPTS}
    want_a = greedy(dirs["model_a"], PROMPTS, stops=dirs["stops"]).tokens
    want_b = greedy(dirs["model_b"], PROMPTS, stops=dirs["stops"]).tokens
    assert want_a != want_b
    assert [o["output_ids"] for o in generate(api, s.url, body)] == want_a
    status, out = call(s.url + "/update_weights_from_disk",
                       {"model_path": dirs["b"], "weight_version": "v2"})
    assert (status, out["success"]) == (200, True)
    assert out["message"] == "Succeeded to update model weights. Weight version updated to v2."
    assert s.weight_version == "v2"
    out = generate(api, s.url, body)
    assert [o["output_ids"] for o in out] == want_b
    assert {o["meta_info"]["weight_version"] for o in out} == {"v2"}
    for bad, needle in ((MISSING, "no such checkpoint directory"),
                        (dirs["wrong"], "hidden_size")):
      status, out = call(s.url + "/update_weights_from_disk",
                         {"model_path": bad, "weight_version": "v3"})
      assert (status, out["success"]) == (400, False) and needle in out["message"], out
      assert "Rolling back to original weights" in out["message"]
      out = generate(api, s.url, body)
      assert [o["output_ids"] for o in out] == want_b
      assert {o["meta_info"]["weight_version"] for o in out} == {"v2"}
    status, info = call(s.url + "/model_info")
    assert (info["weight_version"], info["model_path"]) == ("v2", dirs["b"])


def test_pause_holds_requests_until_continue(dirs, api):
  with Server(dirs["a"], config()).start() as s:
    status, out = call(s.url + "/pause_generation", {"mode": "in_place"})
    assert (status, out) == (200, {"message": "Generation paused successfully.", "status": "ok"})
    result = {}
    t = threading.Thread(target=lambda: result.update(generate(api, s.url, {"input_ids": [5]})))
    t.start()
    time.sleep(1.0)
    assert t.is_alive() and not result and s.sampler_calls == 0
    assert call(s.url + "/health")[0] == 200
    assert call(s.url + "/pause_generation", {"mode": "later"})[0] == 400
    status, out = call(s.url + "/continue_generation", {})
    assert (status, out["status"]) == (200, "ok")
    t.join(60)
    assert result["output_ids"] == greedy(dirs["model_a"], [[5]], stops=dirs["stops"]).tokens[0]


def test_api_key_is_required_and_never_logged(dirs, api, caplog):
  caplog.set_level("DEBUG", logger="dagger_jax")
  with Server(dirs["a"], config(), api_key="sekret-123").start() as s:
    body = {"input_ids": [5], "sampling_params": {"max_new_tokens": 2}}
    assert call(s.url + "/generate", body) == (401, {"error": "Unauthorized"})
    assert call(s.url + "/generate", body, {"Authorization": "Bearer nope"})[0] == 401
    generate(api, s.url, body, {"Authorization": "Bearer sekret-123"})
    status, out = call(s.url + "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 401 and out["error"]["code"] == 401 and out["error"]["message"]
    assert call(s.url + "/health")[0] == 200  # probes carry no key (as SGLang)
  assert "sekret" not in caplog.text and "GET /health" in caplog.text


def test_model_info_health_flush_and_models(server, api):
  status, info = call(server.url + "/model_info")
  assert status == 200 and api.GetModelInfoResponse.from_json_value(info).is_generation
  assert call(server.url + "/get_model_info")[1] == info
  assert info["weight_version"] == "default" and info["tokenizer_path"]
  for path in ("/health", "/health_generate"):
    status, out = call(server.url + path)
    assert status == 200 and api.HealthCheckResponse.from_json_value(out).healthy
  for method in ("GET", "POST"):
    status, text = call(server.url + "/flush_cache", method=method)
    assert status == 200 and text.startswith("Cache flushed.")
  status, models = call(server.url + "/v1/models")
  assert models["data"][0]["id"] == server.served_model_name
  assert models["data"][0]["max_model_len"] == CFG.max_position_embeddings
  # one keep-alive connection, a chunked body, then a plain one
  connection = http.client.HTTPConnection(*server.url[len("http://"):].split(":"), timeout=60)
  body = [b'{"input_ids": [5], ', b'"sampling_params": {"max_new_tokens": 2}}']
  for kwargs in (dict(body=iter(body), encode_chunked=True), dict(body=b"".join(body))):
    connection.request("POST", "/generate", headers={"Content-Type": "application/json"},
                       **kwargs)
    response = connection.getresponse()
    assert response.status == 200 and len(json.loads(response.read())["output_ids"]) == 2
  connection.close()


# ----------------------------------------------------------------------------- OpenAI chat

def test_chat_completions_equal_the_sampler_on_the_chat_template(server, dirs):
  tok = dirs["tokenizer"]
  messages = [{"role": "system", "content": "be brief"},
              {"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
  status, out = call(server.url + "/v1/chat/completions",
                     {"model": "student", "messages": messages, "max_tokens": NEW,
                      "temperature": 0, "return_token_ids": True})
  assert status == 200, out
  rendered = [messages[0], {"role": "user", "content": "hello world"}]
  prompt = prompt_ids(rendered, [], tok)
  want = greedy(dirs["model_a"], [prompt], stops=dirs["stops"])
  choice = out["choices"][0]
  assert choice["prompt_token_ids"] == out["prompt_token_ids"] == prompt
  assert choice["response_token_ids"] == choice["token_ids"] == want.tokens[0]
  ids = want.tokens[0][:-1] if want.finish_reasons[0] == "stop" else want.tokens[0]
  assert choice["message"]["content"] == tok.decode(ids, skip_special_tokens=True)
  assert choice["finish_reason"] == want.finish_reasons[0] and out["model"] == "student"
  assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(want.tokens[0]),
                          "total_tokens": len(prompt) + len(want.tokens[0])}
  for bad, needle in (({"n": 2}, "n=2"), ({"stream": True}, "stream"),
                      ({"messages": "hi"}, "messages"), ({"temperature": "x"}, "f64")):
    status, out = call(server.url + "/v1/chat/completions", {"messages": messages, **bad})
    assert status == 400 and needle in out["error"]["message"], out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["code"] == 400


# ----------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_line(dirs, capsys):
  demo = f"{configlib.REPO_ROOT}/configs/demo.py"
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(ServeError, match="cannot listen"):
      Server(dirs["a"], config(), port=port)
    cases = [(["--model", MISSING, "--port", "0"], "no such checkpoint directory"),
             (["--model", dirs["a"], "--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
             (["--model", dirs["a"], "--api-key-env", "DAGGER_JAX_NO_SUCH_VAR"],
              "DAGGER_JAX_NO_SUCH_VAR")]
    for argv, needle in cases:
      assert cli.main(["serve", "--config", demo, *argv]) == 2
      lines = capsys.readouterr().err.strip().splitlines()
      assert len(lines) == 1 and lines[0].startswith("dagger-jax serve: ") and needle in lines[0]


def test_cli_serves_an_orbax_checkpoint_until_terminated(dirs):
  port = support.free_port()
  argv = [sys.executable, "-m", "dagger_jax.cli", "serve", "--config",
          f"{configlib.REPO_ROOT}/configs/base.py", "--model", dirs["orbax"], "--port", str(port),
          "--config.sampler.max_new_tokens=4"]
  proc = subprocess.Popen(argv, cwd=configlib.REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while True:
      assert proc.poll() is None, proc.stdout.read()
      assert time.time() < deadline, "the server did not answer /health in 120 s"
      try:
        if call(url + "/health")[0] == 200:
          break
      except OSError:  # not listening yet
        time.sleep(0.2)
    status, out = call(url + "/generate", {"input_ids": [5, 6, 7]})
    assert status == 200 and "text" not in out  # no tokenizer: ids only, as SGLang's
    assert out["output_ids"] == greedy(dirs["model_a"], [[5, 6, 7]], 4).tokens[0]
  finally:
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, output
  assert f"listening on {url}" in output
