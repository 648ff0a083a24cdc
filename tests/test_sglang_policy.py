"""SGLangPolicy and its server plumbing, over real HTTP.

Two kinds of server answer the client here: `FakeSGLang`, a small HTTP server in this file that
judges every /generate body with SGLang's own generated schema (`tests/sglang_contract.py`, the
check SGLang's server runs: a violation is its HTTP 400), answers from the real JAX sampler,
loads weights from disk like SGLang's `/update_weights_from_disk`, and injects faults on request;
and `dagger-jax serve` (`dagger_jax.policies.serve`). Actions must equal the in-process
`JaxPolicy`'s on the same views, token for token. A `gpu` test does the same against real SGLang.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import pytest
from flax import nnx

import sglang_contract as contract
import support
from configs import base as base_config
from dagger_jax.data.tokenizer import load_tokenizer_dir
from dagger_jax.envs import protocol
from dagger_jax.errors import ConfigError
from dagger_jax.envs.tasks import toy
from dagger_jax.model import hf, sampler
from dagger_jax.model.loader import init_model
from dagger_jax.policies import sglang
from dagger_jax.policies.base import EpisodeView, sampling_seed
from dagger_jax.policies.jax_policy import JaxPolicy
from dagger_jax.policies.serve import Server
from dagger_jax.policies.launch import LaunchedServer, wait_healthy
from dagger_jax.policies.sglang import (SGLangError, SGLangPolicy, StaleWeightsError,
                                        export_for_server)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "assets", "demo_base", "tokenizer")


# ----------------------------------------------------------------------------- fixtures


def tiny_model(seed: int, hidden: int = 32, head_dim: int = 16):
  """A random 2-layer student whose params are scaled x3, so that greedy outputs depend on the
  prompt (at the init scale every prompt decodes to one repeated token) and are not near-ties."""
  config = support.model_config(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_layers=2, num_heads=2, num_kv_heads=1, head_dim=head_dim,
                                max_position_embeddings=2048)
  model = init_model(config, jax.random.PRNGKey(seed))
  nnx.update(model, jax.tree.map(lambda x: x * 3, nnx.state(model, nnx.Param)))
  return model


def make_config(**rollout):
  c = base_config.get_config()
  c.sampler.max_new_tokens, c.sampler.length_buckets = 12, (512, 1024)
  c.rollout.concurrency, c.rollout.request_retries, c.rollout.request_timeout_s = 2, 2, 60.0
  c.rollout.update(rollout)
  return c


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer_dir(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def model():
  return tiny_model(1)


@pytest.fixture(scope="module")
def views(tok):
  """Three first turns and two later ones (one after a student turn given as ids, one after a
  text-only teacher turn)."""
  tasks = toy.generate(3, 7, split="train")
  out = []
  for t in tasks:
    out.append(EpisodeView(t, [{"role": "system", "content": protocol.system_prompt()},
                               {"role": "user",
                                "content": protocol.instance_prompt(t["problem_statement"])}], []))
  for i, ids in enumerate((tuple(tok.encode("THOUGHT: look.\n```bash\nls\n```")), None)):
    first = out[i]
    said = protocol.format_action("ls -la", "THOUGHT: list the files.")
    out.append(EpisodeView(first.task, first.messages + [
        {"role": "assistant", "content": tok.decode(ids) if ids else said},
        {"role": "user", "content": f"<returncode>0</returncode>\n<output>file{i}.py</output>"}],
        [ids]))
  return out


def jax_actions(model, tok, config, views, max_prompt_len=None):
  return JaxPolicy(model, tok, config.sampler, max_prompt_len=max_prompt_len).act(views)


# ----------------------------------------------------------------------------- a fake SGLang


def io_struct_fields(name: str) -> set[str]:
  """The fields of SGLang's request struct `name` (`srt/managers/io_struct.py` in the wheel, read
  as source: importing it needs SGLang's GPU stack)."""
  path = os.path.join(os.path.dirname(contract.api_types_path()), "..", "..", "srt", "managers",
                      "io_struct.py")
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
  return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}


CONTROL_BODIES = {"/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
                  "/pause_generation": "PauseGenerationReqInput",
                  "/continue_generation": "ContinueGenerationReqInput"}


class FakeSGLang:
  """SGLang's native HTTP API as far as SGLangPolicy uses it, answered from the JAX sampler.

  Every /generate body is decoded by SGLang's generated schema (a violation is a 400 with its
  message, as SGLang does) and recorded in `bodies`. `faults` holds what the next /generate
  calls get instead of an answer: "drop" (the connection closes unanswered), an int (that HTTP
  status), "abort" (an abort finish reason), or a dict merged into each answer's meta_info.
  """

  def __init__(self, model, tok, version: str = "default"):
    self.api = contract.require()
    self.model, self.tok, self.version = model, tok, version
    self.faults: collections.deque = collections.deque()
    self.bodies: list[dict] = []
    self.calls: list[str] = []  # "METHOD /path" of every request, in order
    self.flush_refusals = 0
    self.paused = False
    self.api_key: str | None = None  # when set, requests must carry it (SGLang's --api-key)
    fake = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n)) if n else None

      def _answer(self, status, payload):
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def do_GET(self):
        self.do_POST()

      def do_POST(self):
        body = self._body() if self.command == "POST" else None
        fake.calls.append(f"{self.command} {self.path}")
        if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
          self._answer(401, {"error": "Unauthorized"})
          return
        answer = fake.handle(self.command, self.path, body)
        if answer is None:  # drop the connection unanswered
          self.close_connection = True
          return
        self._answer(*answer)

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()

  def handle(self, method, path, body):
    if path in CONTROL_BODIES:  # SGLang parses these bodies into its io_struct request types
      fields = io_struct_fields(CONTROL_BODIES[path])
      if not isinstance(body, dict) or not set(body) <= fields:
        return 422, {"detail": f"{path}: {body!r} is not a {CONTROL_BODIES[path]} ({fields})"}
      if path == "/update_weights_from_disk" and "model_path" not in body:
        return 422, {"detail": "model_path is required"}
    if path == "/health":
      return 200, {}
    if path == "/model_info":
      return 200, {"model_path": "fake", "weight_version": self.version, "is_generation": True}
    if path == "/pause_generation":
      self.paused = True
      return 200, {"message": "Generation paused successfully.", "status": "ok"}
    if path == "/continue_generation":
      self.paused = False
      return 200, {"message": "Generation continued successfully.", "status": "ok"}
    if path == "/flush_cache":
      if self.flush_refusals:
        self.flush_refusals -= 1
        return 400, "Flush cache failed.\n"
      return 200, "Cache flushed.\n"
    if path == "/update_weights_from_disk":
      return self.update(body)
    if path == "/generate":
      return self.generate(body)
    return 404, {"detail": "Not Found"}

  def update(self, body):
    path = body["model_path"]
    try:
      loaded = hf.load_pretrained(path)
    except Exception as e:  # SGLang answers any load failure with success=false
      return 400, {"success": False, "message": f"Failed to update weights: {e}",
                   "num_paused_requests": 0}
    if loaded.config != self.model.config:
      return 400, {"success": False, "num_paused_requests": 0,
                   "message": f"Failed to update weights: {path} is another architecture"}
    self.model = loaded
    if body.get("weight_version") is not None:
      self.version = body["weight_version"]
    return 200, {"success": True, "message": "Succeeded to update model weights.",
                 "num_paused_requests": 0}

  def generate(self, body):
    try:
      contract.check_generate_request(self.api, body)
    except self.api.JsonContractError as e:
      return 400, {"error": str(e)}
    self.bodies.append(body)
    fault = self.faults.popleft() if self.faults else None
    if fault == "drop":
      return None
    if isinstance(fault, int):
      return fault, {"error": {"message": f"injected HTTP {fault}"}}
    prompts, params = body["input_ids"], body["sampling_params"]
    params = params if isinstance(params, list) else [params] * len(prompts)
    answers = []
    for prompt, p in zip(prompts, params):  # one row at a time: each has its own seed
      result = sampler.generate(
          self.model, [prompt], p["max_new_tokens"], temperature=p["temperature"],
          top_p=p["top_p"], top_k=max(p["top_k"], 0), stop_token_ids=p["stop_token_ids"],
          seed=0, row_seeds=[p.get("sampling_seed") or 0], length_buckets=(512, 1024))
      ids = result.tokens[0]
      finish = ({"type": "stop", "matched": ids[-1]} if result.finish_reasons[0] == "stop"
                else {"type": "length", "length": len(ids)})
      if fault == "abort":
        finish = {"type": "abort", "message": "Abort before prefill", "status_code": None,
                  "err_type": None}
      meta = {"id": "x", "finish_reason": finish, "prompt_tokens": len(prompt),
              "completion_tokens": len(ids), "weight_version": self.version}
      if isinstance(fault, dict):
        meta.update(fault)
      answers.append({"text": self.tok.decode(ids), "output_ids": ids, "meta_info": meta})
    contract.decode_generate_response(self.api, answers)  # what we serve is SGLang's shape
    return 200, answers


@pytest.fixture
def fake(model, tok):
  server = FakeSGLang(model, tok)
  yield server
  server.close()


@pytest.fixture
def fast_backoff(monkeypatch):
  monkeypatch.setattr(sglang, "BACKOFF_S", 0.01)



# ----------------------------------------------------------------------------- acting


def test_greedy_actions_equal_jax_policy_in_sglang_bodies(fake, model, tok, views):
  """5 views, concurrency 2: three /generate calls in order, each body exactly the fields we
  mean and valid under SGLang's schema; the actions are JaxPolicy's, also with prompts cut to
  max_prompt_len."""
  c = make_config()
  for max_prompt_len in (None, 300):
    fake.bodies.clear()
    policy = SGLangPolicy(fake.url, tok, c.sampler, c.rollout, max_prompt_len=max_prompt_len)
    actions = policy.act(views)
    assert actions == jax_actions(model, tok, c, views, max_prompt_len)
    assert len({a.ids for a in actions}) > 1  # the outputs depend on the prompt
    assert [len(b["input_ids"]) for b in fake.bodies] == [2, 2, 1]
    sent = [ids for b in fake.bodies for ids in b["input_ids"]]
    assert sent == policy.prompts(views)
    if max_prompt_len:
      assert {len(p) for p in sent} == {300}
    for body in fake.bodies:
      assert set(body) == {"input_ids", "sampling_params", "return_logprob"}
      assert body["return_logprob"] is False
      assert body["sampling_params"] == {
          "max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
          "stop_token_ids": [tok.eos_token_id], "no_stop_trim": True,
          "skip_special_tokens": False}
  assert policy.act([]) == []


def test_sampled_bodies_seed_each_episode_and_turn(fake, tok, views, model):
  """With temperature > 0 each row's `sampling_seed` is `sampling_seed(policy seed, view)`: the
  same episode at the same turn draws the same, in any call and beside any other rows, and the
  draws are JaxPolicy's for that view (the fake answers with the JAX sampler, as `dagger-jax
  serve` does)."""
  c = make_config()
  c.sampler.temperature, c.sampler.top_p, c.sampler.top_k = 0.8, 0.9, 5
  c.rollout.concurrency = 8
  views = [dataclasses.replace(v, episode_id=f"e{i % 3}") for i, v in enumerate(views)]

  def run(seed, batch):
    fake.bodies.clear()
    policy = SGLangPolicy(fake.url, tok, c.sampler, c.rollout, seed=seed)
    actions = policy.act(batch)
    return actions, [p["sampling_seed"] for b in fake.bodies for p in b["sampling_params"]]

  (actions, seeds), (again, seeds_again), (_, other) = run(4, views), run(4, views), run(5, views)
  assert actions == again and seeds == seeds_again
  assert seeds == [sampling_seed(4, v) for v in views]
  assert len(set(seeds + other)) == 10  # distinct per episode, turn and policy seed
  assert all(0 <= s < 2 ** 31 for s in seeds + other)
  alone, alone_seeds = run(4, views[4:] + views[:1])
  assert alone == [actions[4], actions[0]] and alone_seeds == [seeds[4], seeds[0]]
  params = fake.bodies[0]["sampling_params"][0]
  assert (params["temperature"], params["top_p"], params["top_k"]) == (0.8, 0.9, 5)
  in_process = JaxPolicy(model, tok, c.sampler, seed=4).act(views)
  assert [a.ids for a in in_process] == [a.ids for a in actions]


def test_end_of_turn_id_is_stripped_like_jax_policy(fake, tok, views):
  """A turn that ended on the tokenizer's eos loses it; one that ended on another stop id (the
  model's generation_config eos) or on length keeps every id."""
  c = make_config(concurrency=8)
  eos, other = tok.eos_token_id, tok.pad_token_id
  policy = SGLangPolicy(fake.url, tok, c.sampler, c.rollout)
  fake_ids = [[5, 6, eos], [7, other], [8, 9]]
  fake.generate = lambda body: (200, [
      {"text": "", "output_ids": ids, "meta_info": {"finish_reason": {"type": "stop"},
                                                    "weight_version": "default"}}
      for ids in fake_ids])
  actions = policy.act(views[:3])
  assert [a.ids for a in actions] == [(5, 6), (7, other), (8, 9)]
  assert actions[0].text == tok.decode([5, 6], skip_special_tokens=False)


def test_bad_field_is_a_400_named_and_not_retried(fake, tok, views):
  class Bogus(SGLangPolicy):
    def sampling_params(self, rows):
      return {**super().sampling_params(rows), "bogus_knob": 1}

  c = make_config()
  with pytest.raises(SGLangError, match=r"HTTP 400.*unknown field `bogus_knob`"):
    Bogus(fake.url, tok, c.sampler, c.rollout).act(views[:1])
  assert fake.calls == ["POST /generate"]


def test_retries_connection_errors_and_5xx_then_answers(fake, model, tok, views, fast_backoff):
  c = make_config(concurrency=8, request_retries=2)
  fake.faults.extend(["drop", 503])
  actions = SGLangPolicy(fake.url, tok, c.sampler, c.rollout).act(views[:2])
  assert fake.calls == ["POST /generate"] * 3
  assert actions == jax_actions(model, tok, c, views[:2])


def test_5xx_after_every_retry_is_a_clear_error(fake, tok, views, fast_backoff):
  c = make_config(request_retries=1)
  fake.faults.extend([500, 500, 500])
  with pytest.raises(SGLangError, match=r"HTTP 500 after 2 tries: injected HTTP 500"):
    SGLangPolicy(fake.url, tok, c.sampler, c.rollout).act(views[:1])
  assert len(fake.calls) == 2


def test_unreachable_url_fails_fast_naming_the_fix(tok, views):
  url = f"http://127.0.0.1:{support.free_port()}"
  c = make_config(request_retries=2)
  start = time.monotonic()
  with pytest.raises(SGLangError) as e:
    SGLangPolicy(url, tok, c.sampler, c.rollout).act(views[:1])
  assert time.monotonic() - start < 5
  message = str(e.value)
  assert f"no SGLang server answers at {url}" in message and "3 times" in message
  assert "dagger-jax serve --model DIR --port P" in message
  assert "config.rollout.sglang_launch" in message
  with pytest.raises(SGLangError, match="no SGLang server answered .*/health"):
    wait_healthy(url, 0.5)


def test_abort_fails_the_call_with_the_servers_message(fake, tok, views):
  c = make_config()
  fake.faults.append("abort")
  with pytest.raises(SGLangError, match="aborted prompt 0 .*Abort before prefill") as e:
    SGLangPolicy(fake.url, tok, c.sampler, c.rollout).act(views[:1])
  assert type(e.value) is SGLangError


def test_stale_weight_version_is_refused(fake, tok, views):
  c = make_config()
  policy = SGLangPolicy(fake.url, tok, c.sampler, c.rollout, expected_version="round_001")
  with pytest.raises(StaleWeightsError, match=r"'default'.*expects 'round_001'.*stale weights"):
    policy.act(views[:1])
  fake.version = "round_001"
  assert len(policy.act(views[:1])) == 1
  fake.faults.append({"weight_version": "round_000"})
  with pytest.raises(StaleWeightsError, match="update_weights"):
    policy.act(views[:1])


def test_api_key_is_sent_and_a_refusal_names_it(fake, tok, views):
  c = make_config()
  fake.api_key = "k-123"
  with pytest.raises(SGLangError, match=r"HTTP 401 Unauthorized: the server wants an API key"):
    SGLangPolicy(fake.url, tok, c.sampler, c.rollout).act(views[:1])
  keyed = SGLangPolicy(fake.url, tok, c.sampler, c.rollout, api_key="k-123")
  assert len(keyed.act(views[:1])) == 1


def test_config_errors_name_the_key(tok):
  c = make_config()
  with pytest.raises(ConfigError, match="config.rollout.sglang_url='localhost:1'"):
    SGLangPolicy("localhost:1", tok, c.sampler, c.rollout)
  c.rollout.concurrency = 0
  with pytest.raises(ConfigError, match="config.rollout.concurrency=0"):
    SGLangPolicy("http://127.0.0.1:1", tok, c.sampler, c.rollout)


# ----------------------------------------------------------------------------- weights


def test_update_weights_protocol_and_refusals(fake, model, tok, views, tmp_path):
  """pause -> update -> flush (until 200) -> continue -> model_info; the new weights act; a
  refused update (missing dir, other architecture) still continues, names the reason, and
  leaves the old weights and version."""
  c = make_config(concurrency=8)
  policy = SGLangPolicy(fake.url, tok, c.sampler, c.rollout)
  before = policy.act(views[:3])
  second = tiny_model(2)
  out = export_for_server(second, str(tmp_path / "round_001"), TOKENIZER_DIR)
  assert os.path.isfile(os.path.join(out, "tokenizer.json")) and os.path.isabs(out)
  fake.calls.clear()
  fake.flush_refusals = 2
  policy.update_weights(out, "round_001")
  assert fake.calls == ["POST /pause_generation", "POST /update_weights_from_disk",
                        "POST /flush_cache", "POST /flush_cache", "POST /flush_cache",
                        "POST /continue_generation", "GET /model_info"]
  assert policy.weight_version == fake.version == "round_001" and not fake.paused
  after = policy.act(views[:3])
  assert after == jax_actions(second, tok, c, views[:3]) and after != before

  wide = export_for_server(tiny_model(3, hidden=64), str(tmp_path / "wide"), None)
  for path, reason in ((str(tmp_path / "missing"), "missing"), (wide, "another architecture")):
    fake.calls.clear()
    with pytest.raises(SGLangError, match=rf"refused the weights in .*{reason}.*keeps serving "
                                          rf"its previous weights \(version 'round_001'\)"):
      policy.update_weights(path, "round_002")
    assert fake.calls[-1] == "POST /continue_generation" and not fake.paused
    assert policy.weight_version == fake.version == "round_001"
    assert policy.act(views[:3]) == after


def test_update_that_errors_still_continues_the_server(fake, tok, tmp_path, model, fast_backoff):
  c = make_config(request_retries=1)
  policy = SGLangPolicy(fake.url, tok, c.sampler, c.rollout)
  fake.update = lambda body: (500, {"error": {"message": "CUDA error: out of memory"}})
  with pytest.raises(SGLangError, match="HTTP 500 after 2 tries: CUDA error: out of memory"):
    policy.update_weights(export_for_server(model, str(tmp_path / "m"), None), "v1")
  assert fake.calls[-1] == "POST /continue_generation" and not fake.paused
  assert policy.weight_version is None


def test_update_waits_for_requests_in_flight(fake, tok, views, tmp_path, model):
  """An update started while act() runs pauses the server only after act's answers are in."""
  c = make_config(concurrency=1)
  policy = SGLangPolicy(fake.url, tok, c.sampler, c.rollout)
  out = export_for_server(model, str(tmp_path / "same"), None)
  generate, order = fake.generate, []

  def slow(body):
    order.append("generate")
    time.sleep(0.3)
    return generate(body)

  fake.generate = slow
  acting = threading.Thread(target=policy.act, args=(views[:3],))
  acting.start()
  time.sleep(0.1)
  policy.update_weights(out, "v2")
  acting.join()
  assert fake.calls.index("POST /pause_generation") > max(
      i for i, call in enumerate(fake.calls) if call == "POST /generate")
  assert order == ["generate"] * 3


# ----------------------------------------------------------------------------- launching

SCRIPT = r"""
import http.server, signal, subprocess, sys
port, mode = int(sys.argv[1]), sys.argv[2]
child = subprocess.Popen(["sleep", "600"])
print(f"child {child.pid} model {sys.argv[3]}", flush=True)
if mode == "exit":
  sys.exit(3)
if mode == "stubborn":
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
class H(http.server.BaseHTTPRequestHandler):
  def do_GET(self):
    self.send_response(200 if self.path == "/health" else 404)
    self.end_headers()
  def log_message(self, fmt, *args):
    print("served", fmt % args, flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except FileNotFoundError:
    return False


def _child_pid(log_path: str) -> int:
  with open(log_path) as f:
    return int(next(line for line in f if line.startswith("child ")).split()[1])


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while _alive(pid) and time.monotonic() < deadline:
    time.sleep(0.05)
  return not _alive(pid)


@pytest.fixture
def script(tmp_path):
  path = tmp_path / "server.py"
  path.write_text(SCRIPT)
  return str(path)


def test_launched_server_starts_logs_and_is_gone_after_close(script, tmp_path):
  url, log_path = f"http://127.0.0.1:{support.free_port()}", str(tmp_path / "logs" / "sglang.log")
  template = "{python} " + script + " {port} serve {model}"
  with LaunchedServer(template, str(tmp_path / "my model"), url, log_path, 30.0) as server:
    assert server.command() == [sys.executable, script, url.rsplit(":", 1)[1], "serve",
                                str(tmp_path / "my model")]
    pid, child = server.pid, _child_pid(log_path)
    assert _alive(pid) and _alive(child) and os.getpgid(child) == pid
    wait_healthy(url, 1.0)
  assert _wait_gone(pid) and _wait_gone(child)  # the whole process group
  log_text = open(log_path).read()
  assert f"model {tmp_path / 'my model'}" in log_text and "GET /health" in log_text
  server.close()  # idempotent


def test_launched_server_that_ignores_sigterm_is_killed(script, tmp_path):
  url, log_path = f"http://127.0.0.1:{support.free_port()}", str(tmp_path / "sglang.log")
  server = LaunchedServer("{python} " + script + " {port} stubborn {model}", "m", url, log_path,
                          30.0)
  server.GRACE_S = 0.5
  server.start()
  pid = server.pid
  start = time.monotonic()
  server.close()
  assert time.monotonic() - start >= 0.5 and _wait_gone(pid)


def test_launched_server_dropped_without_close_is_stopped(script, tmp_path):
  import gc
  url, log_path = f"http://127.0.0.1:{support.free_port()}", str(tmp_path / "sglang.log")
  pid = LaunchedServer("{python} " + script + " {port} serve {model}", "m", url, log_path,
                       30.0).start().pid
  gc.collect()
  assert _wait_gone(pid)


def test_no_launched_server_outlives_a_killed_run(script, tmp_path):
  """The launching process dies by SIGKILL (no atexit, no finalizer): the watchdog in the
  server's process group stops the server and its children."""
  url, log_path = f"http://127.0.0.1:{support.free_port()}", str(tmp_path / "sglang.log")
  template = "{python} " + script + " {port} serve {model}"
  code = (f"import os, signal, sys\nsys.path[:0] = {sys.path!r}\n"
          f"from dagger_jax.policies.launch import LaunchedServer\n"
          f"s = LaunchedServer({template!r}, 'm', {url!r}, {log_path!r}, 30.0).start()\n"
          f"print(s.pid, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert run.returncode == -signal.SIGKILL, run.stderr
  pid, child = int(run.stdout.split()[0]), _child_pid(log_path)
  assert _wait_gone(pid) and _wait_gone(child)
  assert "the launcher" in open(log_path).read()


def test_launch_failures_are_clear(script, tmp_path, fake):
  log_path = str(tmp_path / "sglang.log")
  url = f"http://127.0.0.1:{support.free_port()}"
  start = time.monotonic()
  with pytest.raises(SGLangError, match=r"(?s)exited with code 3 .*Last lines of .*child \d+"):
    LaunchedServer("{python} " + script + " {port} exit {model}", "m", url, log_path,
                   30.0).start()
  assert time.monotonic() - start < 10
  with pytest.raises(SGLangError, match=r"already in use.*config.rollout.sglang_url"):
    LaunchedServer("{python} " + script + " {port} serve {model}", "m", fake.url, log_path,
                   30.0).start()
  with pytest.raises(ConfigError, match=r"sglang_launch=.*\{gpu\}"):
    LaunchedServer("{python} -m x --gpu {gpu}", "m", url, log_path, 30.0).command()
  with pytest.raises(SGLangError, match="did not answer .* within 1 s.*startup_timeout_s"):
    LaunchedServer("sleep 30", "m", url, log_path, 1.0).start()


# ----------------------------------------------------------------------------- dagger-jax serve


@pytest.fixture(scope="module")
def exports(tmp_path_factory, model):
  """The served model and a second one of its architecture, exported with the tokenizer; one of
  another architecture."""
  root = tmp_path_factory.mktemp("exports")
  return {"a": export_for_server(model, str(root / "a"), TOKENIZER_DIR),
          "b": export_for_server(tiny_model(2), str(root / "b"), TOKENIZER_DIR),
          "wide": export_for_server(tiny_model(3, hidden=64), str(root / "wide"), None)}


def no_other_stops(actions, export_dir, tok):
  """True when no action holds an id the server also stops at (generation_config's eos ids
  besides the tokenizer's): there JaxPolicy, which stops only at the tokenizer's eos, would go
  on, and the comparison would not be like for like."""
  with open(os.path.join(export_dir, "generation_config.json")) as f:
    stops = set(json.load(f)["eos_token_id"]) - {tok.eos_token_id}
  return stops and not any(stops & set(a.ids) for a in actions)


def test_against_dagger_jax_serve_equal_updated_refused_and_stale(exports, model, tok, views):
  c = make_config(concurrency=2)
  want_a = jax_actions(model, tok, c, views, max_prompt_len=300)
  want_b = jax_actions(tiny_model(2), tok, c, views, max_prompt_len=300)
  assert no_other_stops(want_a + want_b, exports["a"], tok) and want_a != want_b
  with Server(exports["a"], c).start() as server:
    policy = SGLangPolicy(server.url, tok, c.sampler, c.rollout, max_prompt_len=300,
                          expected_version="default")
    assert policy.act(views) == want_a
    policy.update_weights(exports["b"], "round_001")
    assert policy.weight_version == server.weight_version == policy.server_version()
    assert policy.act(views) == want_b

    for path, reason in ((exports["a"] + "-missing", "no such checkpoint directory"),
                         (exports["wide"], "hidden_size")):
      with pytest.raises(SGLangError, match=rf"refused the weights in {path} .*{reason}.*"
                                            rf"previous weights \(version 'round_001'\)"):
        policy.update_weights(path, "round_002")
      assert policy.weight_version == server.weight_version == "round_001"
      assert policy.act(views[:2]) == want_b[:2]

    other = SGLangPolicy(server.url, tok, c.sampler, c.rollout)  # e.g. another run's client
    other.update_weights(exports["a"], "theirs")
    with pytest.raises(StaleWeightsError, match="'theirs'.*expects 'round_001'"):
      policy.act(views[:1])


def test_launched_dagger_jax_serve_answers_logs_and_is_gone(exports, model, tok, views, tmp_path):
  url, log_path = f"http://127.0.0.1:{support.free_port()}", str(tmp_path / "sglang.log")
  template = "{python} -m dagger_jax.cli serve --model {model} --port {port}"
  c = make_config(concurrency=4)
  with LaunchedServer(template, exports["a"], url, log_path, 300.0).start() as server:
    pid = server.pid
    policy = SGLangPolicy(url, tok, c.sampler, c.rollout, expected_version="default")
    assert policy.act(views[:3]) == jax_actions(model, tok, c, views[:3])
  assert _wait_gone(pid)
  assert f"listening on {url}" in open(log_path).read()


# ----------------------------------------------------------------------------- real SGLang

SGLANG_RUNTIME = ("torch", "triton", "sgl_kernel", "fastapi", "uvicorn", "orjson", "zmq")
SGLANG_LAUNCH = ("{python} -m sglang.launch_server --model-path {model} --host {host} "
                 "--port {port} --dtype float32 --attention-backend triton "
                 "--mem-fraction-static 0.2 --disable-prefill-cuda-graph "
                 "--disable-decode-cuda-graph --skip-server-warmup")


@pytest.mark.gpu
def test_real_sglang_greedy_equals_our_sampler_and_updates(tmp_path, tok, views):
  """SGLang itself (float32, triton attention) on an exported tiny model: greedy ids equal the
  JAX sampler's (float32 matmuls), and one weight update switches the outputs and the version."""
  missing = [m for m in SGLANG_RUNTIME if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"sglang's runtime dependencies are missing ({', '.join(missing)}): "
                f"pip install 'sglang[all]' on a GPU machine")
  models = [tiny_model(seed, hidden=128, head_dim=64) for seed in (1, 2)]  # kernel-friendly
  dirs = [export_for_server(m, str(tmp_path / f"round_{i:03d}"), TOKENIZER_DIR)
          for i, m in enumerate(models)]
  c = make_config(concurrency=8)
  with jax.default_matmul_precision("float32"):
    want = [jax_actions(m, tok, c, views) for m in models]
  assert want[0] != want[1] and no_other_stops(want[0] + want[1], dirs[0], tok)
  url = f"http://127.0.0.1:{support.free_port()}"
  with LaunchedServer(SGLANG_LAUNCH, dirs[0], url, str(tmp_path / "sglang.log"), 600.0):
    policy = SGLangPolicy(url, tok, c.sampler, c.rollout, expected_version="default")
    assert [a.ids for a in policy.act(views)] == [a.ids for a in want[0]]
    policy.update_weights(dirs[1], "round_001")
    assert policy.server_version() == "round_001"
    assert [a.ids for a in policy.act(views)] == [a.ids for a in want[1]]
