"""The student's engines are interchangeable: a DAgger run whose student acts through a server
(`rollout.engine=sglang`, here `dagger-jax serve` launched by the run from
`rollout.sglang_launch`, weights synced by /update_weights_from_disk each round) writes the same
trajectories and evaluations as the in-process student (`rollout.engine=jax`) with the same seed
and greedy sampling. SGLang itself needs a GPU: tests/test_sglang_policy.py's `gpu` test runs it."""

from __future__ import annotations

import json
import os
import sys

import pytest

import support
from dagger_jax.dagger import loop
from dagger_jax.errors import DaggerJaxError
from dagger_jax.rundir import RunDir

pytestmark = pytest.mark.slow



def _config(workdir: str):
  c = support.tiny_loop(rounds=2, episodes=3, steps=3, n_train=6, n_eval=2)
  c.workdir = workdir
  return c


def _records(path: str) -> list[dict]:
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  return sorted(rows, key=lambda r: r["id"])


def test_a_served_student_writes_the_same_run_as_the_in_process_one(tmp_path):
  jax_run = RunDir(str(tmp_path / "jax"))
  loop.run(_config(jax_run.root), progress=False)

  served = RunDir(str(tmp_path / "sglang"))
  c = _config(served.root)
  c.rollout.engine = "sglang"
  c.rollout.sglang_url = f"http://127.0.0.1:{support.free_port()}"
  buckets = ",".join(str(b) for b in c.sampler.length_buckets)
  c.rollout.sglang_launch = (f"{sys.executable} -m dagger_jax.cli serve --model {{model}} "
                             f"--port {{port}} --config.sampler.length_buckets=({buckets})")
  rows = loop.run(c, progress=False)

  for r in range(2):
    assert (_records(served.trajectories(r)) ==
            _records(jax_run.trajectories(r))), f"round {r} trajectories differ"
    assert (_records(served.eval_episodes(r)) ==
            _records(jax_run.eval_episodes(r))), f"round {r} evaluation differs"
  assert any(t["actor"] == "student" for rec in _records(served.trajectories(1))
             for t in rec["turns"])  # the served student did act
  log = open(served.sglang_log, encoding="utf-8").read()  # the launched server's, in the run
  assert "version 'round_000'" in log and "version 'round_001'" in log, log[-2000:]
  assert [row["round"] for row in rows] == [0, 1]
  assert sorted(os.listdir(os.path.join(served.root, "rollout"))) == ["round_001"]  # latest only


def test_no_server_is_a_clear_error(tmp_path):
  c = _config(str(tmp_path))
  c.rollout.engine = "sglang"
  c.rollout.sglang_url = f"http://127.0.0.1:{support.free_port()}"
  c.rollout.startup_timeout_s = 1.0
  c.dagger.beta0 = 0.5  # round 0 needs the student at once
  with pytest.raises(DaggerJaxError, match="dagger-jax serve"):
    loop.run(c, progress=False)


def test_a_dagger_round_with_a_teacher_over_http(tmp_path, monkeypatch):
  """teacher.kind=openai through the config: the loop's teacher is an OpenAI-compatible endpoint
  (a scripted teacher served over HTTP, with a key in an environment variable); the round's
  episodes resolve, and its calls and tokens land in metrics.jsonl."""
  from scripted_teacher_server import MODEL, ScriptedTeacherServer
  monkeypatch.setenv("DAGGER_JAX_TEST_TEACHER_KEY", "sk-test")
  with ScriptedTeacherServer(api_key="sk-test") as server:
    c = _config(str(tmp_path))
    c.dagger.rounds, c.dagger.eval_episodes = 1, 1
    c.env.max_turns = 6
    c.teacher.kind, c.teacher.url, c.teacher.model = "openai", server.url, MODEL
    c.teacher.api_key_env = "DAGGER_JAX_TEST_TEACHER_KEY"
    row, = loop.run(c, progress=False)
  assert row["train_resolved"] == row["episodes_this_round"] == 3
  assert row["teacher_calls"] == row["labels_this_round"] == row["teacher_usage"]["calls"]
  assert row["teacher_usage"]["prompt_tokens"] == server.usage_sent["prompt_tokens"] > 0
  assert row["teacher_usage"]["completion_tokens"] == server.usage_sent["completion_tokens"]
  assert set(server.authorizations) == {"Bearer sk-test"}
