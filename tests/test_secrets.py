"""Secrets and exposure: an API key reaches the endpoint as a Bearer token and no file of the run.

A key planted in an environment variable (`teacher.api_key_env`) drives a real DAgger round
against the scripted OpenAI-compatible teacher, which fails some requests with messages that
echo the key; every file of the run directory (TensorBoard events, checkpoints and shards
included) is then searched for it, and for keys written by mistake into config values. Then
`dagger-jax serve`: bound to 127.0.0.1 by default, a key from `--api-key-env` required on every
route but /health*, and the project's SGLang client sending it (`config.rollout.api_key_env`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from flax import nnx

import support
from configs import base
from dagger_jax import configlib, redact
from dagger_jax.dagger import loop
from dagger_jax.data.trajectory import read_jsonl
from dagger_jax.errors import ConfigError
from dagger_jax.model import hf
from dagger_jax.model.qwen3 import Qwen3
from dagger_jax.policies import cli as policies_cli
from dagger_jax.policies import factory
from dagger_jax.policies.launch import SGLangError
from dagger_jax.policies.serve import Server
from dagger_jax.policies.sglang import SGLangPolicy
from dagger_jax.rundir import RunDir
from scripted_teacher_server import MODEL, ScriptedTeacherServer

TEACHER_VAR = "DAGGER_TEST_KEY"
SERVE_VAR = "DAGGER_TEST_SERVE_KEY"


def planted(prefix: str = "sk-planted-") -> str:
  return prefix + secrets.token_hex(16)


def call(url: str, headers: dict | None = None) -> tuple[int, dict]:
  """GET `url` -> (status, JSON body)."""
  try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_redact_masks_what_looks_like_a_key_and_keeps_the_rest():
  key = planted()
  cases = {
      f"http://user:{key}@h:8000/v1": "http://***@h:8000/v1",
      "sglang.launch_server --model-path /m --api-key abc123xyz --port 30000":
          "sglang.launch_server --model-path /m --api-key *** --port 30000",
      "dagger-jax serve --api-key-env MY_KEY --port 1": "dagger-jax serve --api-key-env MY_KEY "
                                                        "--port 1",
      f"upstream said Authorization: Bearer {key}": "upstream said Authorization: Bearer ***",
      f"Incorrect API key provided: '{key}'.": "Incorrect API key provided: '***'.",
      '{"api_key": "abc123", "password": "hunter22"}': '{"api_key": "***", "password": "***"}',
      "--max-new-tokens 16 max_tokens=5 http://127.0.0.1:30000/generate":
          "--max-new-tokens 16 max_tokens=5 http://127.0.0.1:30000/generate",
  }
  for text, want in cases.items():
    assert redact.redact_text(text) == want, text
  assert redact.redact_text("the key plainvalue9 is here", ["plainvalue9"]) == "the key *** is here"
  assert redact.display_url(f"https://u:{key}@host:8/v1") == "https://host:8/v1"


def test_run_json_holds_no_key(tmp_path, monkeypatch):
  key, in_url, in_flag = planted(), planted("sk-url-"), planted("opaque")
  monkeypatch.setenv(TEACHER_VAR, key)
  c = base.get_config()
  c.teacher.api_key_env = TEACHER_VAR
  c.teacher.url = f"https://me:{in_url}@api.example.com/v1"
  c.rollout.sglang_launch = f"python -m sglang.launch_server --api-key {in_flag} --port {{port}}"
  c.teacher.model = key  # a key where no pattern would find it: masked because it is known
  run_dir = RunDir(str(tmp_path))
  run_dir.write_run_file(c, None)
  text = open(run_dir.run_file, encoding="utf-8").read()
  for secret in (key, in_url, in_flag):
    assert secret not in text
  written = run_dir.read_run_file()["config"]
  assert written["teacher"]["url"] == "https://***@api.example.com/v1"
  assert written["teacher"]["api_key_env"] == TEACHER_VAR  # the name is no secret
  assert written["rollout"]["sglang_launch"].endswith("--api-key *** --port {port}")


def _files(root: str) -> list[str]:
  return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def test_a_planted_key_reaches_the_teacher_and_no_file_of_the_run(tmp_path, monkeypatch, caplog,
                                                                   capfd):
  """A real DAgger round (collect with the HTTP teacher, shard, train, checkpoint, evaluate)
  whose teacher fails requests with messages that echo the key: the server got the key as a
  Bearer token on every request, the error paths ran (a retry logged, an episode ended with the
  server's message), and no byte of the key is in any file of the run, the logs or the output."""
  caplog.set_level(logging.INFO)
  for name in ("dagger_jax", "urllib3"):  # urllib3's request lines too
    caplog.set_level(logging.DEBUG, logger=name)
  key, in_url, in_flag = planted(), planted("sk-config-"), planted("opaque")
  monkeypatch.setenv(TEACHER_VAR, key)
  with ScriptedTeacherServer(api_key=key) as server:
    server.fail(400, message=f"prompt too long (request authorized by {key})")  # ends an episode
    server.fail(503, times=2, retry_after="0",
                message=f"upstream refused Authorization: Bearer {key}")  # retried, logged
    c = support.tiny_loop(rounds=1, episodes=3, steps=2, n_train=6, n_eval=1)
    c.workdir = str(tmp_path / "run")
    c.env.max_turns = 6
    c.rollout.max_failure_rate = 0.5  # one of the three episodes fails on purpose
    c.teacher.kind, c.teacher.url, c.teacher.model = "openai", server.url, MODEL
    c.teacher.api_key_env = TEACHER_VAR
    # keys written by mistake into config values the run records (unused with engine=jax)
    c.rollout.sglang_url = f"http://user:{in_url}@127.0.0.1:1"
    c.rollout.sglang_launch = f"python -m sglang.launch_server --api-key {in_flag}"
    row, = loop.run(c, progress=False)

  assert server.authorizations and set(server.authorizations) == {f"Bearer {key}"}
  assert {400, 503, 200} <= set(server.statuses) and row["label_failures"] == 1
  assert row["teacher_usage"]["request_retries"] == 2
  failed, = [t for t in read_jsonl(RunDir(c.workdir).trajectories(0)) if t.outcome.failure]
  assert "HTTP 400" in failed.outcome.failure and "***" in failed.outcome.failure
  assert "retry 1 of" in caplog.text and "ended without a label" in caplog.text

  files = _files(c.workdir)
  for part in ("run.json", "metrics.jsonl", "trajectories", "shards", "checkpoints",
               "tensorboard"):
    assert any(part in os.path.relpath(f, c.workdir) for f in files), f"no {part} was written"
  out, err = capfd.readouterr()
  for secret in (key, in_url, in_flag):
    for path in files:
      with open(path, "rb") as f:
        assert secret.encode() not in f.read(), f"{secret} is in {path}"
    assert secret not in caplog.text and secret not in out and secret not in err


# ----------------------------------------------------------------------------- dagger-jax serve


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
  """A tiny random model as an HF directory (no tokenizer: /generate takes ids)."""
  path = str(tmp_path_factory.mktemp("secrets") / "tiny")
  config = support.model_config(vocab_size=320, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                max_position_embeddings=256)
  hf.save_pretrained(Qwen3(config, rngs=nnx.Rngs(0)), path)
  return path


def test_serve_binds_loopback_by_default(tiny_model):
  parser = argparse.ArgumentParser()
  policies_cli.serve_args(parser)
  assert parser.parse_args([]).host == "127.0.0.1" and parser.parse_args([]).api_key_env is None
  with Server(tiny_model, base.get_config()) as s:  # Server's own default
    assert s._httpd.server_address[0] == "127.0.0.1" and s.url.startswith("http://127.0.0.1:")


def test_serve_key_from_the_environment_401_without_it(tiny_model, tmp_path):
  """`dagger-jax serve --api-key-env VAR` (a real process): 401 in OpenAI's shape without the
  key or with a wrong one, 200 with it, /health open; the key is in no output."""
  key, port = planted("serve-"), support.free_port()
  argv = [sys.executable, "-m", "dagger_jax.cli", "serve", "--config",
          f"{configlib.REPO_ROOT}/configs/base.py", "--model", tiny_model, "--port", str(port),
          "--api-key-env", SERVE_VAR, "--log-requests"]
  proc = subprocess.Popen(argv, cwd=configlib.REPO_ROOT, env={**os.environ, SERVE_VAR: key},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 120
    while True:
      assert proc.poll() is None, proc.stdout.read()
      assert time.time() < deadline, "the server did not answer /health in 120 s"
      try:
        if call(url + "/health")[0] == 200:  # no key: probes carry none
          break
      except OSError:
        time.sleep(0.2)
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": key}):
      status, out = call(url + "/v1/models", headers)
      assert status == 401, out
      assert out["error"]["type"] == "authentication_error" and out["error"]["code"] == 401
      assert call(url + "/model_info", headers) == (401, {"error": "Unauthorized"})
    status, out = call(url + "/v1/models", {"Authorization": f"Bearer {key}"})
    assert status == 200 and out["data"][0]["id"] == tiny_model
    assert call(url + "/model_info", {"Authorization": f"Bearer {key}"})[0] == 200
  finally:
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, output
  assert f"listening on {url}" in output and "GET /v1/models -> 401" in output
  assert key not in output and key not in " ".join(argv)


def test_the_sglang_client_sends_the_rollout_key(tiny_model, tmp_path, monkeypatch):
  """`config.rollout.api_key_env` is read when the engine is built (an unset variable fails
  before any server is launched) and sent by `SGLangPolicy` as a Bearer token."""
  key = planted("rollout-")
  c = support.config()
  c.rollout.engine, c.rollout.api_key_env = "sglang", SERVE_VAR
  monkeypatch.delenv(SERVE_VAR, raising=False)
  with pytest.raises(ConfigError, match=f"config.rollout.api_key_env='{SERVE_VAR}'.* unset"):
    factory.make_student(c, None, RunDir(str(tmp_path)))
  monkeypatch.setenv(SERVE_VAR, key)
  assert factory.make_student(c, None, RunDir(str(tmp_path))).api_key == key
  with Server(tiny_model, base.get_config(), api_key=key).start() as s:
    with pytest.raises(SGLangError, match="HTTP 401.*config.rollout.api_key_env") as e:
      SGLangPolicy(s.url, None, c.sampler, c.rollout).server_version()
    assert key not in str(e.value)
    keyed = SGLangPolicy(s.url, None, c.sampler, c.rollout, api_key=key)
    assert keyed.server_version() == "default"
