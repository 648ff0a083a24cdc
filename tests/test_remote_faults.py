"""Remote faults are bounded: every fault of a remote teacher or rollout server is retried with
capped backoff (honouring Retry-After) and a per-request deadline, then ends only the episodes
that needed the answer, with the fault as their reason; a round with too many failed episodes
stops before it trains; a failed weight update leaves the server on the old weights and says so.

The faults come from `fault_server.FaultServer`, a real HTTP proxy in front of real servers: the
scripted teacher (`scripted_teacher_server.py`) for `OpenAICompatPolicy`, `dagger-jax serve` over
a tiny random model for `SGLangPolicy` (it runs on CPU: the same SGLang-native subset the
project's SGLang client is tested against in `test_sglang_policy.py`)."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import pytest

import support
from configs import base as base_config
from dagger_jax import configlib
from dagger_jax.dagger import collector, loop
from dagger_jax.data import shards as shards_lib
from dagger_jax.data.tokenizer import load_tokenizer_dir
from dagger_jax.data.trajectory import read_jsonl
from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.errors import ConfigError
from dagger_jax.model.loader import init_model
from dagger_jax.policies import sglang
from dagger_jax.policies.base import EpisodeView, LabelError
from dagger_jax.policies.oracle import OracleTeacher
from dagger_jax.policies.openai_teacher import (OpenAICompatPolicy, TeacherProtocolError,
                                                TeacherUnavailableError)
from dagger_jax.policies.serve import Server
from dagger_jax.policies.sglang import (RolloutUnavailableError, SGLangPolicy, StaleWeightsError,
                                        WeightUpdateError, export_for_server)
from dagger_jax.rundir import RunDir
from fault_server import (FaultServer, chat_completion, drop, drop_mid_body, edit, garbage, hang,
                          reply, status, trickle)
from scripted_teacher_server import MALFORMED, MODEL, ScriptedTeacherServer

log = logging.getLogger(__name__)  # measured timings: pytest --log-cli-level=INFO
TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "assets", "demo_base",
                             "tokenizer")
CHAT = "/v1/chat/completions"
TIMEOUT_S = 0.5  # the teacher's per-request limit here; a fault's hang or trickle outlasts it
SLOW_S = 2.0  # how long a hanging or trickling answer takes
# The rollout server's: its answers come from a real (tiny) sampler on 2 shared cores.
ROLLOUT_TIMEOUT_S, ROLLOUT_SLOW_S = 2.0, 4.0


@pytest.fixture(scope="module")
def tasks():
  return toy.generate(6, 5, split="train")


def first_view(task: dict) -> EpisodeView:
  return EpisodeView(task, [{"role": "system", "content": protocol.system_prompt()},
                            {"role": "user",
                             "content": protocol.instance_prompt(task["problem_statement"])}], [])


def statement_names(task: dict):
  """A fault rule's predicate: the request is about `task` (its function is named)."""
  needle = f"def {toy.named_function(task['problem_statement'])}("
  return lambda body: needle in json.dumps(body)


# ----------------------------------------------------------------------------- the teacher


@pytest.fixture
def teacher_proxy():
  with ScriptedTeacherServer() as upstream, FaultServer(upstream.url.removesuffix("/v1")) as fs:
    yield fs


def make_teacher(fs: FaultServer, *, retry_after_cap_s: float = 5.0, backoff_base_s=0.01,
                 backoff_cap_s=0.05, **fields) -> OpenAICompatPolicy:
  t = base_config.get_config().teacher
  t.kind, t.url, t.model = "openai", f"{fs.url}/v1", MODEL
  t.timeout_s, t.request_retries = TIMEOUT_S, 2
  t.update(fields)
  return OpenAICompatPolicy(t, backoff_base_s=backoff_base_s, backoff_cap_s=backoff_cap_s,
                            retry_after_cap_s=retry_after_cap_s)


def _reason(name: str) -> str:
  """The reason a request that keeps getting the fault `name` fails with (its prefix)."""
  return next(r for r in ("http_5xx", "http_429", "connection", "bad_response", "timeout")
              if name.startswith(r))


# Each transient fault, by the reason a request that keeps getting it fails with.
TRANSIENT = {
    "http_5xx": status(503),
    "http_429": status(429, retry_after="0"),
    "connection": drop(),
    "connection_mid_body": drop_mid_body(),
    "bad_response": garbage(),
    "timeout": hang(SLOW_S),
    "timeout_trickle": trickle(SLOW_S),
}


@pytest.mark.parametrize("name", TRANSIENT)
def test_teacher_retries_each_fault_then_labels(teacher_proxy, tasks, name):
  fs = teacher_proxy
  fs.script(CHAT, TRANSIENT[name])
  policy = make_teacher(fs)
  action, = policy.act([first_view(tasks[0])])
  assert protocol.parse_action(action.text).ok
  assert [str(r.fault) for r in fs.requests(CHAT)] == [str(TRANSIENT[name]), "None"]
  assert policy.stats()["request_retries"] == 1 and policy.stats()["calls"] == 1


@pytest.mark.parametrize("name", TRANSIENT)
def test_teacher_gives_up_after_the_retries_with_the_fault_as_reason(teacher_proxy, tasks, name):
  fs = teacher_proxy
  fs.always(CHAT, TRANSIENT[name])
  policy = make_teacher(fs, request_retries=2)
  start = time.monotonic()
  with pytest.raises(TeacherUnavailableError, match="no completion after 3 attempts") as e:
    policy.act([first_view(tasks[0])])
  assert isinstance(e.value, LabelError) and e.value.reason == _reason(name)
  assert f"{fs.url}/v1/chat/completions" in str(e.value)
  assert len(fs.requests(CHAT)) == 3 and policy.stats()["failed"] == 1
  # three attempts, each cut at the deadline at the latest (slack: 2 shared cores)
  assert time.monotonic() - start < 3 * (TIMEOUT_S + 0.5)


def test_the_deadline_covers_the_whole_answer(teacher_proxy, tasks):
  """An answer trickled over 2 s, 0.1 s per piece, never leaves a socket read idle for 0.5 s (what
  requests' own timeout bounds), yet the attempt ends at the 0.5 s deadline."""
  fs = teacher_proxy
  fs.always(CHAT, trickle(SLOW_S))
  policy = make_teacher(fs, request_retries=0)
  start = time.monotonic()
  with pytest.raises(TeacherUnavailableError, match=r"no answer within 0.5 s") as e:
    policy.act([first_view(tasks[0])])
  elapsed = time.monotonic() - start
  log.info("an answer trickled over %g s, timeout_s %g: the attempt ended after %.3f s", SLOW_S,
           TIMEOUT_S, elapsed)
  assert e.value.reason == "timeout" and TIMEOUT_S <= elapsed < TIMEOUT_S + 0.4, elapsed


def test_retry_after_is_honoured_and_capped(teacher_proxy, tasks):
  fs = teacher_proxy
  fs.script(CHAT, status(429, retry_after="0.6"), status(503, retry_after="3600"))
  policy = make_teacher(fs, retry_after_cap_s=0.3)  # the backoff alone would wait <= 0.05 s
  policy.act([first_view(tasks[0])])
  first, second = fs.gaps(CHAT)
  log.info("teacher, Retry-After 0.6 s and 3600 s, cap 0.3 s: waited %.3f s and %.3f s", first,
           second)
  assert 0.3 <= first < 0.3 + 0.3, "a Retry-After over the cap waits the cap"
  assert 0.3 <= second < 0.3 + 0.3
  policy = make_teacher(fs, retry_after_cap_s=5.0)
  fs.script(CHAT, status(429, retry_after="0.6"))
  policy.act([first_view(tasks[1])])
  log.info("teacher, Retry-After 0.6 s, cap 5 s: waited %.3f s", fs.gaps(CHAT)[-1])
  assert 0.6 <= fs.gaps(CHAT)[-1] < 0.6 + 0.3, "a Retry-After under the cap is waited in full"


def test_the_backoff_doubles_up_to_its_cap(teacher_proxy, tasks):
  """Without Retry-After: retry k waits min(cap, base * 2**k) * U(0.5, 1); uncapped, the 5th of
  base 0.05 s would wait 0.8-1.6 s."""
  fs = teacher_proxy
  fs.always(CHAT, status(502))
  policy = make_teacher(fs, request_retries=5, backoff_base_s=0.05, backoff_cap_s=0.2)
  with pytest.raises(TeacherUnavailableError):
    policy.act([first_view(tasks[0])])
  gaps = fs.gaps(CHAT)
  log.info("teacher backoff, base 0.05 s, cap 0.2 s: waits %s s", [round(g, 3) for g in gaps])
  assert len(gaps) == 5
  for k, gap in enumerate(gaps):
    bound = min(0.2, 0.05 * 2 ** k)
    assert 0.5 * bound <= gap < bound + 0.15, (k, gaps)


@pytest.mark.slow
def test_the_default_retries_give_up_within_their_bound(teacher_proxy, tasks):
  """configs/base.py's teacher (5 retries, backoff 1 s doubling to a 30 s cap, jitter 0.5-1)
  against a server that always answers 503: waits of 0.5-1, 1-2, 2-4, 4-8 and 8-16 s, so the
  label fails after 15.5-31 s, never sooner, never later."""
  fs = teacher_proxy
  fs.always(CHAT, status(503))
  t = base_config.get_config().teacher
  t.kind, t.url, t.model = "openai", f"{fs.url}/v1", MODEL
  policy = OpenAICompatPolicy(t)
  start = time.monotonic()
  with pytest.raises(TeacherUnavailableError, match="after 6 attempts") as e:
    policy.act([first_view(tasks[0])])
  elapsed = time.monotonic() - start
  log.info("default teacher retries on 503s: waits %s s; gave up after %.1f s",
           [round(g, 2) for g in fs.gaps(CHAT)], elapsed)
  assert e.value.reason == "http_5xx" and 15.5 <= elapsed < 31 + 1.0
  for k, gap in enumerate(fs.gaps(CHAT)):
    assert 0.5 * 2 ** k <= gap < 2 ** k + 0.3


def test_empty_truncated_and_broken_labels_are_reasked(teacher_proxy, tasks):
  """An empty completion, one cut off at max_tokens, and one without a command block are labels
  that break the protocol: re-asked with the format-error observation, then TeacherProtocolError
  (reason `protocol`)."""
  fs = teacher_proxy
  cut = "THOUGHT: fix it.\n\n```mswea_bash_command\nsed -i 's/a/"
  fs.script(CHAT, reply(chat_completion("")), reply(chat_completion(cut, "length")),
            reply(chat_completion(None)))
  policy = make_teacher(fs, max_retries=3)
  action, = policy.act([first_view(tasks[0])])
  assert protocol.parse_action(action.text).ok
  assert policy.stats()["protocol_retries"] == 3 and policy.stats()["request_retries"] == 0
  asked = [r.body["messages"] for r in fs.requests(CHAT)]
  assert asked[1][-1] == {"role": "user", "content": protocol.format_error(0, "stop")}
  assert asked[2][-2] == {"role": "assistant", "content": cut}
  assert asked[2][-1] == {"role": "user", "content": protocol.format_error(0, "length")}

  fs.always(CHAT, edit(lambda answer: chat_completion(MALFORMED)))
  policy = make_teacher(fs, max_retries=1)
  with pytest.raises(TeacherProtocolError, match="2 labels in a row broke") as e:
    policy.act([first_view(tasks[1])])
  assert e.value.reason == "protocol"


# ----------------------------------------------------------------------------- the SGLang student


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer_dir(TOKENIZER_DIR)


def tiny(seed: int):
  return init_model(support.model_config(
      vocab_size=1024, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
      num_kv_heads=1, head_dim=16, max_position_embeddings=2048), jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp("exports")
  return {name: export_for_server(tiny(seed), str(root / name), TOKENIZER_DIR)
          for name, seed in (("a", 1), ("b", 2))}


def rollout_config(**rollout):
  c = base_config.get_config()
  c.sampler.max_new_tokens, c.sampler.length_buckets = 8, (512, 1024)
  c.rollout.concurrency, c.rollout.request_retries = 4, 2
  c.rollout.request_timeout_s = 30.0
  c.rollout.update(rollout)
  return c


@pytest.fixture(scope="module")
def served(exports, tok, tasks):
  """`dagger-jax serve` on export "a", warmed up: its sampler compiled for the batches of one
  and two first views the tests send (a compile would outlast their short timeouts)."""
  with Server(exports["a"], rollout_config()).start() as server:
    c = rollout_config()
    warm = SGLangPolicy(server.url, tok, c.sampler, c.rollout)
    for n in (1, 2):
      warm.act([first_view(t) for t in tasks[:n]])
    yield server


@pytest.fixture
def rollout_proxy(served):
  with FaultServer(served.url) as fs:
    yield fs


@pytest.fixture
def fast(monkeypatch):
  monkeypatch.setattr(sglang, "BACKOFF_S", 0.01)


def student(fs, tok, **rollout) -> SGLangPolicy:
  c = rollout_config(**rollout)
  return SGLangPolicy(fs.url, tok, c.sampler, c.rollout, expected_version="default")


def _drop_last_row(answers):
  return answers[:-1]


def _empty_ids(answers):
  return [dict(a, output_ids=[]) for a in answers]


def _no_ids(answers):
  return [{k: v for k, v in a.items() if k != "output_ids"} for a in answers]


ROLLOUT_TRANSIENT = {
    "http_5xx": status(500),
    "http_429": status(429, retry_after="0"),
    "connection": drop(),
    "connection_mid_body": drop_mid_body(),
    "bad_response": garbage(),
    "bad_response_missing_row": edit(_drop_last_row),
    "bad_response_empty_ids": edit(_empty_ids),
    "bad_response_no_ids": edit(_no_ids),
    "timeout": hang(ROLLOUT_SLOW_S),
    "timeout_trickle": trickle(ROLLOUT_SLOW_S),
}


@pytest.mark.parametrize("name", ROLLOUT_TRANSIENT)
def test_rollout_retries_each_fault_then_acts(rollout_proxy, tok, tasks, fast, name):
  fs = rollout_proxy
  views = [first_view(t) for t in tasks[:2]]
  want = student(fs, tok).act(views)  # no fault
  fs.script("/generate", ROLLOUT_TRANSIENT[name])
  got = student(fs, tok, request_timeout_s=ROLLOUT_TIMEOUT_S).act(views)
  assert got == want
  assert [str(r.fault) for r in fs.requests("/generate")] == [
      "None", str(ROLLOUT_TRANSIENT[name]), "None"]


@pytest.mark.parametrize("name", ROLLOUT_TRANSIENT)
def test_rollout_gives_up_after_the_retries_with_the_fault_as_reason(rollout_proxy, tok, tasks,
                                                                     fast, name):
  fs = rollout_proxy
  fs.always("/generate", ROLLOUT_TRANSIENT[name])
  policy = student(fs, tok, request_timeout_s=ROLLOUT_TIMEOUT_S, request_retries=2)
  start = time.monotonic()
  with pytest.raises(RolloutUnavailableError) as e:
    policy.act([first_view(tasks[0])])
  assert isinstance(e.value, LabelError) and e.value.reason == _reason(name)
  assert fs.url in str(e.value) and len(fs.requests("/generate")) == 3
  assert time.monotonic() - start < 3 * (ROLLOUT_TIMEOUT_S + 0.5)


def test_rollout_retry_after_is_honoured_and_capped(rollout_proxy, tok, tasks, fast,
                                                    monkeypatch):
  fs = rollout_proxy
  fs.script("/generate", status(503, retry_after="0.6"))
  student(fs, tok).act([first_view(tasks[0])])
  log.info("rollout, Retry-After 0.6 s: waited %.3f s", fs.gaps("/generate")[-1])
  assert 0.6 <= fs.gaps("/generate")[-1] < 0.6 + 0.3
  monkeypatch.setattr(sglang, "RETRY_AFTER_CAP_S", 0.3)
  fs.script("/generate", status(429, retry_after="3600"))
  student(fs, tok).act([first_view(tasks[0])])
  log.info("rollout, Retry-After 3600 s, cap 0.3 s: waited %.3f s", fs.gaps("/generate")[-1])
  assert 0.3 <= fs.gaps("/generate")[-1] < 0.3 + 0.3


def test_an_aborted_row_or_a_4xx_is_not_retried(rollout_proxy, tok, tasks, fast):
  """What a retry cannot fix stops the run instead (not a LabelError): a refused request."""
  fs = rollout_proxy
  fs.always("/generate", status(400, message="unknown field"))
  with pytest.raises(sglang.SGLangError, match="HTTP 400") as e:
    student(fs, tok).act([first_view(tasks[0])])
  assert not isinstance(e.value, LabelError) and len(fs.requests("/generate")) == 1


# ----------------------------------------------------------------------------- weight updates


@pytest.fixture
def update_proxy(exports, tok):
  """A fresh `dagger-jax serve` (on export "a", version "default"), the proxy in front of it,
  and a student that already loaded export "b" as "round_000" through it."""
  with Server(exports["a"], rollout_config()).start() as server, FaultServer(server.url) as fs:
    policy = student(fs, tok)
    policy.update_weights(exports["b"], "round_000")
    assert server.weight_version == "round_000"
    yield server, fs, policy


UPDATE = "/update_weights_from_disk"


@pytest.mark.parametrize("fault", [status(500), hang(ROLLOUT_SLOW_S), drop()], ids=str)
def test_a_failed_update_leaves_the_old_version_and_names_it(update_proxy, exports, tasks, fast,
                                                             fault):
  server, fs, policy = update_proxy
  fs.always(UPDATE, fault)
  policy.client.timeout_s = ROLLOUT_TIMEOUT_S
  with pytest.raises(WeightUpdateError) as e:
    policy.update_weights(exports["a"], "round_001")
  message = str(e.value)
  assert fs.url in message and "'round_001'" in message
  assert "/model_info reports version 'round_000': it keeps serving its previous weights" in message
  assert e.value.served == "round_000" == server.weight_version == policy.weight_version
  paths = [r.path for r in fs.log]
  assert paths[-2:] == ["/model_info", "/continue_generation"]  # asked, then not left paused
  policy.client.timeout_s = 30.0
  assert len(policy.act([first_view(tasks[0])])) == 1  # still serving, still round_000


def test_an_update_whose_answer_was_lost_but_applied_goes_on(update_proxy, exports, tasks, fast,
                                                             caplog):
  server, fs, policy = update_proxy
  fs.always(UPDATE, drop(forward=True))  # the server loads the weights; its answer is lost
  with caplog.at_level(logging.WARNING):
    policy.update_weights(exports["a"], "round_001")
  assert "the update was applied" in caplog.text
  assert policy.weight_version == server.weight_version == "round_001"
  assert [r.path for r in fs.log][-3:] == ["/flush_cache", "/continue_generation", "/model_info"]
  assert len(policy.act([first_view(tasks[0])])) == 1


def test_an_update_that_failed_after_loading_is_never_used(update_proxy, exports, tasks, fast):
  """The weights loaded but the cache could not be flushed: the server reports the new version,
  the error says so, and this run keeps expecting the old one, so a rollout from the new weights
  is refused instead of trained on."""
  server, fs, policy = update_proxy
  fs.always("/flush_cache", status(500))
  with pytest.raises(WeightUpdateError, match="reports the new version 'round_001' although the "
                                              "update did not complete") as e:
    policy.update_weights(exports["a"], "round_001")
  assert e.value.served == server.weight_version == "round_001"
  assert policy.weight_version == "round_000"
  fs.clear()
  with pytest.raises(StaleWeightsError, match="'round_001'.*expects 'round_000'"):
    policy.act([first_view(tasks[0])])


# ----------------------------------------------------------------------------- the collector


def test_an_episode_whose_teacher_fails_ends_failed_with_its_reason(teacher_proxy, tasks):
  fs = teacher_proxy
  bad, fine = tasks[:2]
  fs.always(CHAT, status(503), when=statement_names(bad))
  policy = make_teacher(fs, request_retries=1)
  trajs, stats = collector.collect([bad, fine], config=support.config(), round_index=0,
                                   beta=1.0, teacher=policy, student=None, progress=False)
  by_task = {t.task_id: t for t in trajs}
  failed = by_task[bad["instance_id"]].outcome
  assert "no completion after 2 attempts" in failed.failure and "HTTP 503" in failed.failure
  assert stats.failure_reasons == {"teacher:http_5xx": 1}
  assert stats.summary()["failure_reasons"] == {"teacher:http_5xx": 1}
  assert by_task[fine["instance_id"]].outcome.resolved


def test_a_student_batch_without_an_answer_ends_its_episodes(rollout_proxy, tok, tasks, fast):
  """beta = 0: every episode's turn waits for the SGLang student; its server keeps dropping the
  connection, so each episode of the batch ends failed (reason student:connection)."""
  fs = rollout_proxy
  fs.always("/generate", drop())
  config = support.config()
  config.sampler.max_new_tokens, config.sampler.length_buckets = 8, (512, 1024)
  policy = student(fs, tok, request_retries=1)
  trajs, stats = collector.collect(tasks[:2], config=config, round_index=0, beta=0.0,
                                   teacher=OracleTeacher(), student=policy, progress=False)
  assert stats.failure_reasons == {"student:connection": 2}
  assert stats.exit_status["student_failed"] == 2
  assert all(not t.turns and f"no SGLang server answers at {fs.url}" in t.outcome.failure
             for t in trajs)


# ----------------------------------------------------------------------------- the round


def test_max_failure_rate_is_validated_naming_the_key():
  c = base_config.get_config()
  assert c.rollout.max_failure_rate == 0.1
  for bad in (1.0, -0.1):
    c.rollout.max_failure_rate = bad
    with pytest.raises(ConfigError, match=r"config.rollout.max_failure_rate=.*must be in \[0, 1\)"):
      configlib.validate(c)


def test_check_failures_counts_by_reason_and_sets_failed_episodes_aside(tmp_path, tasks):
  """The round's file: 2 episodes, one failed; this process also lost one (a sandbox)."""
  config = support.config()
  path = str(tmp_path / "round_000.jsonl")
  with ScriptedTeacherServer() as upstream, FaultServer(upstream.url.removesuffix("/v1")) as fs:
    fs.always(CHAT, status(503), when=statement_names(tasks[0]))
    _, stats = collector.collect(tasks[:2], config=config, round_index=0, beta=1.0,
                                 teacher=make_teacher(fs, request_retries=0), student=None,
                                 out_path=path, grade=False, progress=False)
  stats.failed += 1
  stats.failure_reasons["env:start"] += 1
  config.rollout.max_failure_rate = 0.7
  assert loop.check_failures(config, path, stats, "round 0") == {
      "failed_episodes": 2, "failure_rate": round(2 / 3, 4),
      "failure_reasons": {"teacher:http_5xx": 1, "env:start": 1}}
  config.rollout.max_failure_rate = 0.5  # a resumed process: reasons unknown; 0.5 is not above
  assert loop.check_failures(config, path, collector.CollectStats(), "round 0") == {
      "failed_episodes": 1, "failure_rate": 0.5, "failure_reasons": {"earlier_run": 1}}
  config.rollout.max_failure_rate = 0.4
  with pytest.raises(loop.RoundFailedError) as e:
    loop.check_failures(config, path, collector.CollectStats(), "round 0")
  message = str(e.value)
  assert message.startswith("round 0: 1 of 2 episodes failed (50% > "
                            "config.rollout.max_failure_rate=0.4; by reason: earlier_run 1)")
  assert "HTTP 503" in message and "round_000.failed.jsonl" in message
  assert [t.task_id for t in read_jsonl(path)] == [tasks[1]["instance_id"]]
  assert [t.task_id for t in read_jsonl(str(tmp_path / "round_000.failed.jsonl"))] == [
      tasks[0]["instance_id"]]


@pytest.mark.slow
def test_a_round_over_max_failure_rate_stops_before_training_then_resumes(tmp_path):
  """A DAgger round with the HTTP teacher behind the fault proxy: 2 of its 3 episodes' teacher
  keeps failing (67% > 50%): the round stops before shards or training, keeping the good
  episode. With one of the two faults gone, the same run resumes: the kept episode is not
  collected again, the failed ones are; one fails again (33% <= 50%), so the round trains, on
  the two others only, and its metrics row counts the failure by reason."""
  with ScriptedTeacherServer() as upstream, FaultServer(upstream.url.removesuffix("/v1")) as fs:
    c = support.tiny_loop(rounds=1, episodes=3, steps=2, n_train=6, n_eval=1)
    c.workdir = str(tmp_path / "run")
    c.env.max_turns = 6
    c.teacher.kind, c.teacher.url, c.teacher.model = "openai", f"{fs.url}/v1", MODEL
    c.teacher.request_retries, c.rollout.max_failure_rate = 0, 0.5
    train, _ = loop.load_or_make_tasks(c, c.workdir)
    first = train[:3]
    for task in first[:2]:
      fs.always(CHAT, status(500), when=statement_names(task))
    run = RunDir(c.workdir)
    with pytest.raises(loop.RoundFailedError, match=r"round 0: 2 of 3 episodes failed \(67% > "
                                                   r"config.rollout.max_failure_rate=0.5; by "
                                                   r"reason: teacher:http_5xx 2\)") as e:
      loop.run(c, progress=False)
    assert "Fix the fault and run the same command again" in str(e.value)
    assert not os.path.exists(run.shards(0)) and not os.path.exists(run.checkpoints(0))
    assert [t.task_id for t in read_jsonl(run.trajectories(0))] == [first[2]["instance_id"]]
    assert len(read_jsonl(run.trajectories(0).replace(".jsonl", ".failed.jsonl"))) == 2

    fs.clear()
    fs.always(CHAT, status(500), when=statement_names(first[0]))
    row, = loop.run(c, progress=False)
  assert row["collect"]["skipped"] == 1 and row["episodes_this_round"] == 3
  assert row["failed_episodes"] == 1 and row["failure_reasons"] == {"teacher:http_5xx": 1}
  assert row["failure_rate"] == round(1 / 3, 4) and row["label_failures"] == 1
  trajs = read_jsonl(run.trajectories(0))
  failed = {t.id for t in trajs if t.outcome.failure}
  assert len(trajs) == 3 and len(failed) == 1
  with open(os.path.join(run.shards(0), shards_lib.MANIFEST)) as f:
    sharded = set(json.load(f)["source_trajectories"])
  assert sharded == {t.id for t in trajs} - failed  # the failed episode never reaches a shard
  assert row["labels_this_round"] == sum(len(t.turns) for t in trajs if t.id not in failed)
