"""OpenAICompatPolicy over real HTTP.

Against the scripted teacher server (`scripted_teacher_server.py`): labels, re-asks, retries that
honour Retry-After, errors, the cache, stats, the key, the concurrency limit, and whole
collections in the bwrap sandbox with it as the teacher. Against `dagger-jax serve` hosting a
tiny random model: malformed labels end in LabelError, never a crash."""

from __future__ import annotations

import email.utils
import logging
import os
import threading
import time

import jax
import pytest

import support
from configs import base as base_config
from dagger_jax.dagger import collector
from dagger_jax.data import render
from dagger_jax.data.tokenizer import load_tokenizer_dir
from dagger_jax.data.trajectory import read_jsonl
from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.errors import ConfigError, DaggerJaxError
from dagger_jax.model import params_io
from dagger_jax.model.loader import init_model
from dagger_jax.policies import serve
from dagger_jax.policies.base import EpisodeView, LabelError
from dagger_jax.policies.openai_teacher import (OpenAICompatPolicy, TeacherHTTPError,
                                                TeacherRejectedError, cache_key, normalise,
                                                retry_after_s)
from scripted_teacher_server import MALFORMED, MODEL, ScriptedTeacherServer, scripted_label


DEMO_TOKENIZER = os.path.join(os.path.dirname(__file__), os.pardir, "assets", "demo_base",
                              "tokenizer")
SECRET = "sk-test-5ecret-never-logged"


@pytest.fixture(scope="module")
def tasks():
  return toy.generate(8, 5, split="train")


@pytest.fixture
def server():
  with ScriptedTeacherServer() as s:
    yield s


def teacher_config(url: str, **fields):
  """configs/base.py's teacher section pointed at `url`, with `fields` changed."""
  t = base_config.get_config().teacher
  t.kind, t.url, t.model = "openai", url, MODEL
  t.update(fields)
  return t


def make_policy(url: str, *, api_key: str | None = None, **fields) -> OpenAICompatPolicy:
  """A policy with short backoffs (waits asked for by Retry-After are kept)."""
  return OpenAICompatPolicy(teacher_config(url, **fields), api_key=api_key,
                            backoff_base_s=0.01, backoff_cap_s=0.05)


def first_view(task: dict) -> EpisodeView:
  """The state at an episode's first turn (no sandbox needed: the teacher reads text only)."""
  return EpisodeView(task, [{"role": "system", "content": protocol.system_prompt()},
                            {"role": "user",
                             "content": protocol.instance_prompt(task["problem_statement"])}], [])



# --- labels and the protocol


def test_labels_are_the_servers_texts_and_parse(server, tasks):
  view = first_view(tasks[0])
  policy = make_policy(server.url)
  action, = policy.act([view])
  assert action.ids is None and action.text == server.labels[0]
  function = toy.named_function(tasks[0]["problem_statement"])
  assert protocol.parse_action(action.text).command == f'grep -rn "def {function}(" .'
  body = server.bodies[0]
  assert body["messages"] == view.messages and body["model"] == MODEL
  t = teacher_config(server.url)
  assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (
      t.temperature, t.top_p, t.max_tokens, 0)
  assert server.authorizations == [None]  # no key, no header


def test_reasoning_and_surrounding_whitespace_are_dropped(tasks):
  with ScriptedTeacherServer(think=True) as server:
    view = first_view(tasks[0])
    action, = make_policy(server.url).act([view])
    assert server.labels[0].startswith("<think>") and server.labels[0].endswith("\n")
    assert action.text == scripted_label(view.messages)
  assert normalise("  <think>a</think>\n\nTHOUGHT: x\n") == "THOUGHT: x"
  assert normalise("reasoning without an opening tag</think>THOUGHT: x") == "THOUGHT: x"
  fenced = f"THOUGHT: x\n\n```{protocol.ACTION_FENCE}\ngrep -rn '</think>' .\n```"
  assert normalise(fenced + "\n") == fenced  # a command that mentions the tag is kept
  assert normalise(None) == ""


def test_malformed_labels_are_reasked_with_the_format_error(server, tasks):
  view = first_view(tasks[0])
  server.malformed(2)
  policy = make_policy(server.url, max_retries=2)
  action, = policy.act([view])
  assert protocol.parse_action(action.text).ok and action.text == server.labels[2]
  assert server.requests == 3 and policy.stats()["protocol_retries"] == 2
  error = {"role": "user", "content": protocol.format_error(0, "stop")}
  bad = {"role": "assistant", "content": MALFORMED}
  assert server.bodies[1]["messages"] == view.messages + [bad, error]
  assert server.bodies[2]["messages"] == view.messages + [bad, error, bad, error]


def test_labels_that_keep_breaking_the_protocol_end_the_episode(server, tasks):
  server.malformed(100)
  policy = make_policy(server.url, max_retries=2)
  with pytest.raises(LabelError, match="3 labels in a row broke the action protocol") as e:
    policy.act([first_view(tasks[0])])
  assert "had 0 ```mswea_bash_command blocks" in str(e.value) and "I forgot" in str(e.value)
  assert server.requests == 3
  assert policy.stats()["failed"] == 1 and policy.stats()["protocol_retries"] == 2
  with pytest.raises(LabelError):  # a failure is not cached: the state is asked again
    policy.act([first_view(tasks[0])])
  assert server.requests == 6


# --- retries


def _gap(server: ScriptedTeacherServer) -> float:
  return server.arrivals[1] - server.arrivals[0]


def test_a_503_is_retried_after_its_retry_after_seconds(server, tasks):
  server.fail(503, retry_after="1")
  policy = make_policy(server.url)  # its own backoff would wait ~0.01 s
  action, = policy.act([first_view(tasks[0])])
  assert protocol.parse_action(action.text).ok
  assert server.statuses == [503, 200] and _gap(server) >= 1.0
  assert policy.stats()["request_retries"] == 1 and policy.stats()["calls"] == 1


def test_a_429_is_retried_after_its_retry_after_date(server, tasks):
  # An HTTP date has 1 s resolution: floor(now + 2) is more than 1 s away.
  server.fail(429, retry_after=lambda: email.utils.formatdate(time.time() + 2, usegmt=True),
              message="rate limit reached")
  make_policy(server.url).act([first_view(tasks[0])])
  assert server.statuses == [429, 200] and 1.0 <= _gap(server) < 5.0


def test_a_long_retry_after_is_capped(server, tasks):
  server.fail(503, retry_after="3600")
  policy = OpenAICompatPolicy(teacher_config(server.url), backoff_base_s=0.01,
                              retry_after_cap_s=0.3)
  policy.act([first_view(tasks[0])])
  assert server.statuses == [503, 200] and 0.3 <= _gap(server) < 5.0


def test_retry_after_values():
  now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
  assert retry_after_s("2") == 2.0 and retry_after_s(" 0 ") == 0.0
  assert retry_after_s("Wed, 21 Oct 2015 07:28:05 GMT", now=now) == 5.0
  assert retry_after_s("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0  # in the past
  assert retry_after_s("-3") == 0.0
  for junk in (None, "", "soon", "nan"):
    assert retry_after_s(junk) is None


def test_5xx_without_retry_after_backs_off_then_gives_up(server, tasks):
  server.fail(502, times=10, message="bad gateway")
  policy = make_policy(server.url, request_retries=2)
  with pytest.raises(LabelError) as e:
    policy.act([first_view(tasks[0])])
  assert not isinstance(e.value, TeacherHTTPError)
  assert server.requests == 3 and server.statuses == [502] * 3
  assert f"{server.url}/chat/completions" in str(e.value) and "HTTP 502" in str(e.value)
  assert "bad gateway" in str(e.value) and "after 3 attempts" in str(e.value)
  assert policy.stats() | {"request_retries": 2, "failed": 1, "calls": 0} == policy.stats()


def test_a_reply_that_is_not_a_chat_completion_is_retried(server, tasks):
  server.fail(200, message="<html>proxy error</html>")  # a 200 without `choices`
  policy = make_policy(server.url)
  action, = policy.act([first_view(tasks[0])])
  assert protocol.parse_action(action.text).ok and server.requests == 2
  assert policy.stats()["request_retries"] == 1 and policy.stats()["calls"] == 1


def test_connection_errors_are_retried_then_end_the_episode(tasks):
  url = f"http://127.0.0.1:{support.free_port()}/v1"  # nothing listens there
  policy = make_policy(url, request_retries=2)
  with pytest.raises(LabelError, match="ConnectionError") as e:
    policy.act([first_view(tasks[0])])
  assert f"{url}/chat/completions" in str(e.value) and "after 3 attempts" in str(e.value)
  assert policy.stats()["request_retries"] == 2


def test_a_request_that_times_out_is_retried(tasks):
  with ScriptedTeacherServer(delay_s=1.0) as server:
    policy = make_policy(server.url, request_retries=1, timeout_s=0.2)
    with pytest.raises(LabelError, match=r"no answer within 0.2 s \(config.teacher.timeout_s\)"):
      policy.act([first_view(tasks[0])])
    assert server.requests == 2


def test_a_400_is_not_retried_and_ends_only_the_episode(server, tasks):
  server.fail(400, times=5, message="This model's maximum context length is 8192 tokens")
  policy = make_policy(server.url)
  with pytest.raises(TeacherRejectedError) as e:
    policy.act([first_view(tasks[0])])
  assert isinstance(e.value, LabelError) and e.value.status == 400
  assert server.requests == 1
  assert "HTTP 400 (not retried)" in str(e.value) and "maximum context length" in str(e.value)


def test_a_wrong_model_is_not_retried_and_stops_the_run(server, tasks):
  policy = make_policy(server.url, model="no-such-model")
  with pytest.raises(TeacherHTTPError, match="HTTP 404.*does not exist.*config.teacher.model"
                     ) as e:
    policy.act([first_view(tasks[0])])
  assert not isinstance(e.value, LabelError) and isinstance(e.value, DaggerJaxError)
  assert server.requests == 1 and policy.stats()["failed"] == 1


# --- the key


def test_the_key_is_sent_and_never_logged(caplog, tasks):
  caplog.set_level(logging.DEBUG)
  wrong = "sk-wrong-key-echoed-by-the-server"
  with ScriptedTeacherServer(api_key=SECRET) as server:
    server.fail(503, retry_after="0")
    server.malformed(1)
    policy = make_policy(server.url, api_key=SECRET)
    policy.act([first_view(tasks[0])])
    assert server.authorizations == [f"Bearer {SECRET}"] * 3
    with pytest.raises(TeacherHTTPError, match="HTTP 401.*check the API key") as e:
      make_policy(server.url, api_key=wrong).act([first_view(tasks[1])])
    assert server.authorizations[-1] == f"Bearer {wrong}"
    assert wrong not in str(e.value) and "***" in str(e.value)  # the server echoed it
    with pytest.raises(TeacherHTTPError, match="HTTP 401"):
      make_policy(server.url).act([first_view(tasks[1])])  # no key
  assert "retry 1 of" in caplog.text and "broke the action protocol" in caplog.text
  assert SECRET not in caplog.text and wrong not in caplog.text
  assert SECRET not in repr(policy) and "key=set)" in repr(policy)


def test_from_config_reads_the_key_from_the_environment(monkeypatch, tasks):
  var = "DAGGER_JAX_TEST_TEACHER_KEY"
  with ScriptedTeacherServer(api_key=SECRET) as server:
    config = base_config.get_config()
    config.teacher.update(teacher_config(server.url, api_key_env=var))
    config.seed = 7
    monkeypatch.setenv(var, SECRET)
    policy = OpenAICompatPolicy.from_config(config)
    policy.act([first_view(tasks[0])])
    assert server.authorizations == [f"Bearer {SECRET}"] and server.bodies[0]["seed"] == 7
    monkeypatch.delenv(var)
    with pytest.raises(ConfigError, match=f"config.teacher.api_key_env='{var}'.* unset"):
      OpenAICompatPolicy.from_config(config)
  config.teacher.api_key_env = ""
  for key, value, match in (
      ("url", "", "config.teacher.url is empty"),
      ("url", "localhost:8000/v1", "must start with http"),
      ("url", "http://h:1/v1/chat/completions", "give the base URL"),
      ("model", "", "config.teacher.model is empty")):
    c = base_config.get_config()
    c.teacher.update(teacher_config("http://h:1/v1"))
    c.teacher[key] = value
    with pytest.raises(ConfigError, match=match):
      OpenAICompatPolicy.from_config(c)


# --- cache, stats, concurrency


def test_the_cache_answers_a_repeated_state_without_a_request(server, tasks):
  policy = make_policy(server.url)
  view = first_view(tasks[0])
  first, = policy.act([view])
  again, = policy.act([first_view(tasks[0])])
  assert again == first and server.requests == 1
  assert policy.stats()["cache_hits"] == 1 and policy.stats()["calls"] == 1
  later = EpisodeView(view.task, view.messages + [{"role": "assistant", "content": first.text},
                                                  {"role": "user", "content": "<returncode>0"}],
                      [None])
  policy.act([later])  # a new state: a new request
  assert server.requests == 2
  # the key is the exact request: sampling parameters and seed are part of it
  warm = make_policy(server.url, temperature=0.7)
  assert cache_key(warm.body(view.messages)) != cache_key(policy.body(view.messages))
  assert cache_key(policy.body(view.messages)) == cache_key(make_policy("http://x/v1").body(
      [dict(m) for m in view.messages]))


def test_one_request_for_a_state_asked_by_several_threads_at_once(tasks):
  with ScriptedTeacherServer(delay_s=0.3) as server:
    policy = make_policy(server.url)
    out = [None] * 4
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(
        i, policy.act([first_view(tasks[0])])[0])) for i in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert server.requests == 1 and len(set(out)) == 1 and out[0] is not None
    assert policy.stats()["cache_hits"] == 3
    # a state that gets no label: the waiters share the failure, not a request each
    server.malformed(100)
    errors = []

    def label():
      try:
        policy.act([first_view(tasks[1])])
      except LabelError as e:
        errors.append(e)

    threads = [threading.Thread(target=label) for _ in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert len(errors) == 4 and len({id(e) for e in errors}) == 4
    assert len({str(e) for e in errors}) == 1 and "broke the action protocol" in str(errors[0])
    assert server.requests == 1 + 3 and policy.stats()["failed"] == 4


def test_stats_count_calls_and_tokens(server, tasks):
  policy = make_policy(server.url)
  server.malformed(1)
  policy.act([first_view(tasks[0]), first_view(tasks[1])])  # a batch: one request each
  policy.act([first_view(tasks[0])])
  sent = dict(server.usage_sent)
  assert sent["prompt_tokens"] > 0 and sent["completion_tokens"] > 0
  stats = policy.reset_stats()
  assert stats == {"calls": 3, "prompt_tokens": sent["prompt_tokens"],
                   "completion_tokens": sent["completion_tokens"], "cache_hits": 1,
                   "protocol_retries": 1, "failed": 0, "request_retries": 0, "usage_missing": 0}
  assert set(policy.stats().values()) == {0}
  with ScriptedTeacherServer(usage=False) as bare:
    policy = make_policy(bare.url)
    policy.act([first_view(tasks[0])])
    assert policy.stats() | {"calls": 1, "prompt_tokens": 0, "completion_tokens": 0,
                             "usage_missing": 1} == policy.stats()


def test_concurrency_never_exceeds_the_limit(tasks):
  with ScriptedTeacherServer(delay_s=0.3) as server:
    policy = make_policy(server.url, concurrency=2)
    errors = []

    def label(task):
      try:
        policy.act([first_view(task)])
      except Exception as e:  # noqa: BLE001 - reported below
        errors.append(e)

    threads = [threading.Thread(target=label, args=(t,)) for t in tasks]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert not errors and server.requests == len(tasks) == 8
    assert server.max_in_flight == 2


# --- the collector with this teacher


def test_a_collection_with_this_teacher_resolves_every_task(server, tasks):
  config = support.config()
  server.malformed(2)  # re-asked within the episodes
  server.fail(503, retry_after="0")
  policy = make_policy(server.url, max_retries=2)
  trajs, stats = collector.collect(tasks[:4], config=config, round_index=0, beta=1.0,
                                   teacher=policy, student=None, progress=False)
  assert stats.episodes == 4 and stats.failed == 0
  assert stats.resolved == 4, [t.outcome for t in trajs]
  sent = set(server.labels)
  turns = [turn for t in trajs for turn in t.turns]
  for t in trajs:
    assert t.outcome.submitted and t.outcome.teacher_calls == len(t.turns) == 4
  for turn in turns:
    assert turn.actor == "teacher" and turn.reason == "coin"
    assert turn.action.text in sent and turn.action.ids is None
  assert [protocol.parse_action(turn.action.text).command.split()[0] for turn in
          trajs[0].turns] == ["grep", "sed", "python3", "echo"]
  teacher = policy.reset_stats()
  assert teacher["calls"] == len(turns) + 2 == server.requests - 1
  assert teacher["protocol_retries"] == 2 and teacher["request_retries"] == 1
  assert teacher["failed"] == 0


def test_an_episode_without_a_label_ends_failed_and_the_others_go_on(server, tasks, tmp_path):
  """Labels that keep breaking the protocol, and a request the endpoint rejects (400), each end
  their own episode with the teacher's message as the reason; the run goes on."""
  malformed, rejected, fine = tasks[:3]
  server.malformed_for.add(f"def {toy.named_function(malformed['problem_statement'])}(")
  server.reject_for.add(f"def {toy.named_function(rejected['problem_statement'])}(")
  policy = make_policy(server.url, max_retries=1)
  out = str(tmp_path / "round.jsonl")
  _, stats = collector.collect([malformed, rejected, fine], config=support.config(),
                               round_index=0, beta=1.0, teacher=policy, student=None,
                               out_path=out, progress=False)
  by_task = {t.task_id: t for t in read_jsonl(out)}
  assert stats.exit_status["label_failed"] == 2 and policy.stats()["failed"] == 2
  first = by_task[malformed["instance_id"]].outcome
  assert first.failure.startswith(f"teacher {MODEL!r} at {server.url}/chat/completions: 2 labels "
                                  f"in a row broke the action protocol")
  assert first.resolved is False and not first.submitted
  second = by_task[rejected["instance_id"]].outcome
  assert "HTTP 400 (not retried)" in second.failure and "maximum context length" in second.failure
  assert by_task[fine["instance_id"]].outcome.resolved
  assert by_task[fine["instance_id"]].outcome.failure is None


# --- `dagger-jax serve` hosting a tiny random model


def test_a_tiny_random_model_served_ends_in_label_error(tmp_path, tasks):
  """Over `dagger-jax serve` (another server, the JAX sampler behind it) a random model's labels
  break the protocol: each state ends in LabelError after the re-asks, and in the collector its
  episode ends `label_failed`, never a crash."""
  model = init_model(support.model_config(
      vocab_size=1024, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
      num_kv_heads=1, head_dim=16, max_position_embeddings=2048), jax.random.PRNGKey(0))
  params = params_io.save_params(model, str(tmp_path / "tiny"))
  config = support.config()
  config.sampler.length_buckets = (1024, 2048)
  with serve.Server(params, config, api_key=SECRET, tokenizer_dir=DEMO_TOKENIZER).start() as s:
    config.teacher.update(teacher_config(f"{s.url}/v1", model="tiny-random", max_tokens=16,
                                         max_retries=1, request_retries=0))
    policy = OpenAICompatPolicy(config.teacher, api_key=SECRET)
    with pytest.raises(LabelError, match="2 labels in a row broke the action protocol"):
      policy.act([first_view(tasks[0])])
    stats = policy.reset_stats()
    assert stats["calls"] == 2 and stats["protocol_retries"] == 1 and stats["failed"] == 1
    first = len(render.prompt_ids(first_view(tasks[0]).messages, [],
                                  load_tokenizer_dir(DEMO_TOKENIZER), config.data.enable_thinking))
    assert stats["completion_tokens"] == 2 * 16  # the re-ask's prompt is the longer one
    assert 2 * first < stats["prompt_tokens"] < 2 * first + 200
    trajs, collected = collector.collect(tasks[1:3], config=config, round_index=0, beta=1.0,
                                         teacher=policy, student=None, progress=False)
  assert collected.exit_status["label_failed"] == 2 and policy.stats()["failed"] == 2
  for t in trajs:
    assert "broke the action protocol" in t.outcome.failure and t.outcome.resolved is False
