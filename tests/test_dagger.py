"""DAgger collection on real toy tasks in the real bubblewrap sandbox: the teacher's policy, the
turn-level mix, labels on every visited state, interventions, resumable collection files."""

import json

import pytest

import support
from dagger_jax.dagger import collector, intervention, schedule
from dagger_jax.data.trajectory import read_jsonl
from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.errors import ConfigError
from dagger_jax.policies.base import EpisodeView, LabelError
from dagger_jax.policies.oracle import OracleTeacher


@pytest.fixture(scope="module")
def tasks():
  return toy.generate(6, 3, split="train")


@pytest.fixture
def config():
  return support.config()


_cmd, Scripted = support.command, support.Scripted


@pytest.mark.parametrize("kind,expected", [
    ("exponential", [1.0, 0.5, 0.25, 0.125]),
    ("linear", [1.0, 2 / 3, 1 / 3, 0.0]),
    ("constant", [1.0, 1.0, 1.0, 1.0]),
])
def test_beta_schedules(config, kind, expected):
  config.dagger.beta_schedule = kind
  config.dagger.rounds = 4
  assert [schedule.beta(r, config.dagger) for r in range(4)] == pytest.approx(expected)


def test_beta_schedule_names_a_bad_kind(config):
  config.dagger.beta_schedule = "cosine"
  with pytest.raises(ValueError, match="config.dagger.beta_schedule='cosine'"):
    schedule.beta(0, config.dagger)


def test_teacher_alone_resolves_every_task(tasks, config):
  trajs, stats = collector.collect(tasks, config=config, round_index=0, beta=1.0,
                                   teacher=OracleTeacher(), student=None, progress=False)
  assert stats.episodes == len(tasks) and stats.failed == 0
  assert stats.resolved == len(tasks), [t.outcome for t in trajs]
  for t in trajs:
    assert t.outcome.submitted and t.outcome.patch.strip()
    assert all(turn.actor == "teacher" and turn.reason == "coin" for turn in t.turns)
    assert t.outcome.teacher_calls == len(t.turns) == t.outcome.turns
    assert 4 <= len(t.turns) <= config.env.max_turns


class _GivesUpOn(OracleTeacher):
  """The oracle, except that on one task, from its third state on, it cannot label (what a remote
  teacher does whose labels keep breaking the protocol: `policies.base.LabelError`)."""

  def __init__(self, task_id: str):
    super().__init__()
    self.task_id = task_id

  def act(self, views):
    for v in views:
      if v.task["instance_id"] == self.task_id and len(v.assistant_ids) >= 2:
        raise LabelError(f"{self.task_id}: 3 labels broke the action protocol")
    return super().act(views)


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_an_episode_without_a_label_ends_failed_and_the_others_go_on(tasks, config, tmp_path,
                                                                     beta):
  bad = tasks[1]["instance_id"]
  out = str(tmp_path / "round.jsonl")
  trajs, stats = collector.collect(tasks[:3], config=config, round_index=0, beta=beta,
                                   teacher=_GivesUpOn(bad), student=Scripted(_cmd("ls")),
                                   out_path=out, progress=False)
  by_task = {t.task_id: t for t in read_jsonl(out)}
  assert set(by_task) == {t["instance_id"] for t in tasks[:3]}  # every episode written
  failed = by_task.pop(bad)
  assert failed.outcome.failure == f"{bad}: 3 labels broke the action protocol"
  assert len(failed.turns) == 2 and all(t.label is not None or t.actor == "teacher"
                                        for t in failed.turns)  # the states before keep labels
  assert failed.outcome.resolved is False and stats.exit_status["label_failed"] == 1
  assert all(t.outcome.failure is None for t in by_task.values())
  if beta == 1.0:
    assert all(t.outcome.resolved for t in by_task.values())


def test_without_interventions_a_bad_student_ends_its_episodes(tasks, config):
  config.env.max_format_errors = 2
  trajs, stats = collector.collect(tasks[:2], config=config, round_index=1, beta=0.0,
                                   teacher=OracleTeacher(), student=Scripted("nothing"),
                                   interventions=(), progress=False)
  assert stats.exit_status["format_errors"] == 2 and stats.resolved == 0
  assert all(turn.actor == "student" and turn.label is not None
             for t in trajs for turn in t.turns)


def test_premature_submit_rule(tasks, config):
  student = Scripted(_cmd(f"echo {protocol.SUBMIT_SENTINEL}"))
  trajs, stats = collector.collect(tasks[:2], config=config, round_index=1, beta=0.0,
                                   teacher=OracleTeacher(), student=student, progress=False)
  assert stats.interventions["premature_submit"] > 0 and stats.resolved == 2
  for t in trajs:  # the student's submit is executed only once the teacher would submit too
    assert [turn.actor for turn in t.turns][-1] == "student"
    assert t.turns[-1].label is not None


def test_the_coin_mixes_actors_per_turn_reproducibly(tasks, config):
  def run():
    return collector.collect(tasks, config=config, round_index=2, beta=0.5,
                             teacher=OracleTeacher(), student=Scripted(_cmd("ls")), seed=7,
                             interventions=(), grade=False, progress=False)[0]
  first, second = run(), run()
  actors = [[turn.actor for turn in t.turns] for t in first]
  assert actors == [[turn.actor for turn in t.turns] for t in second]
  flat = [a for row in actors for a in row]
  assert 0.2 < flat.count("teacher") / len(flat) < 0.8


def test_collection_appends_and_resumes(tasks, config, tmp_path):
  out = tmp_path / "round.jsonl"
  kw = dict(config=config, round_index=0, beta=1.0, teacher=OracleTeacher(), student=None,
            out_path=str(out), grade=False, progress=False)
  collector.collect(tasks[:2], **kw)
  with open(out, "a") as f:
    f.write('{"id": "torn li')  # a crash mid-write
  trajs, stats = collector.collect(tasks[:4], **kw)
  assert stats.skipped == 2 and stats.episodes == 2 and len(trajs) == 2
  ids = [t.id for t in read_jsonl(str(out))]  # the torn line is gone, every line parses
  assert len(ids) == 4 and len(set(ids)) == 4
  _, stats = collector.collect(tasks[:4], **kw)
  assert stats.skipped == 4 and stats.episodes == 0


def test_a_task_whose_sandbox_cannot_start_costs_only_that_episode(tasks, config):
  broken = dict(tasks[0], instance_id="broken", repo_files=None, base_commit="0" * 40)
  trajs, stats = collector.collect([broken, tasks[1]], config=config, round_index=0, beta=1.0,
                                   teacher=OracleTeacher(), student=None, grade=False,
                                   progress=False)
  assert stats.failed == 1 and [t.task_id for t in trajs] == [tasks[1]["instance_id"]]


def test_needs_the_policies_its_beta_uses(tasks, config):
  with pytest.raises(ValueError, match="needs a teacher"):
    collector.collect(tasks, config=config, round_index=0, beta=0.5, teacher=None,
                      student=Scripted("x"), progress=False)
  with pytest.raises(ValueError, match="needs a student"):
    collector.collect(tasks, config=config, round_index=0, beta=0.5, teacher=OracleTeacher(),
                      student=None, progress=False)


def test_unknown_intervention_rule_is_named():
  view = EpisodeView({}, [], [])
  with pytest.raises(ValueError, match="unknown rule 'bogus'"):
    intervention.check(["bogus"], view, "a", "b", None)


def _tiny(config, tmp_path):
  """The demo at toy scale: 2 rounds of 4 episodes, 6 steps each, a 2-layer 32-wide student."""
  support.tiny_student(config)
  config.train.batch_size, config.train.steps, config.train.warmup_steps = 8, 6, 2  # 8 devices
  config.train.checkpoint_every, config.train.log_every = 3, 3
  config.sampler.max_new_tokens = 16
  config.sampler.length_buckets = (512, 1024, 2048)
  config.env.max_turns = 4
  config.rollout.concurrency = 4
  config.tasks.n_train, config.tasks.n_eval = 16, 3
  config.dagger.rounds, config.dagger.episodes_per_round, config.dagger.eval_episodes = 2, 4, 3
  config.workdir = str(tmp_path / "demo")
  return config


@pytest.mark.slow
def test_demo_end_to_end_and_resume(config, tmp_path, capsys):
  """The whole experiment on a tiny budget: tasks, tokenizer, collect -> shards -> train ->
  evaluate for DAgger and SFT, the comparison, the plot; then a second run reads it all back."""
  import argparse

  from dagger_jax.dagger import cli as dagger_cli

  _tiny(config, tmp_path)
  parser = argparse.ArgumentParser()
  dagger_cli.demo_args(parser)
  args = parser.parse_args([])
  assert dagger_cli.demo(args, config) == 0
  out = capsys.readouterr().out
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["heldout_tasks"] == 3 and "verdict_seed0" in summary["dagger_minus_sft"]
  assert set(summary["methods"]) == {"dagger", "sft", "onpolicy"}
  runs = {m: [json.loads(line) for line in open(tmp_path / "demo" / f"{m}_seed0" / "metrics.jsonl")]
          for m in summary["methods"]}
  for m, rows in runs.items():
    run = tmp_path / "demo" / f"{m}_seed0"
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["beta"] == {"dagger": 0.5, "sft": 1.0, "onpolicy": 0.0}[m]
    assert all((run / "shards" / f"round_{r:03d}" / "manifest.json").exists() for r in (0, 1))
    assert (run / "eval" / "round_001.json").exists()
    r1 = read_jsonl(str(run / "trajectories" / "round_001.jsonl"))
    turns = [turn for t in r1 for turn in t.turns]
    actors = {turn.actor for turn in turns}
    assert actors == {"sft": {"teacher"}, "onpolicy": {"student"}}.get(m, actors)
    assert "student" in actors or m == "sft"
    assert all(turn.label is not None for turn in turns if turn.actor == "student")
    # equal label budgets: every method's cumulative labels within 5% of DAgger's, every round
    for r in (0, 1):
      want = runs["dagger"][r]["labels_cumulative"]
      assert abs(rows[r]["labels_cumulative"] - want) <= 0.05 * want, (m, r)
    assert summary["methods"][m]["teacher"]["calls"] == sum(r["teacher_calls"] for r in rows) > 0
    assert summary["methods"][m]["teacher"]["prompt_tokens"] == 0  # the oracle costs no tokens
    if m != "dagger":  # the three methods share round 0: copied, not redone
      assert rows[0]["copied_from"].endswith("dagger_seed0")
      assert {k: v for k, v in rows[0].items() if k != "copied_from"} == runs["dagger"][0]
  assert (tmp_path / "demo" / "demo.png").stat().st_size > 0
  # Run again: every round is read back, the same figures come out.
  assert dagger_cli.demo(args, config) == 0
  again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert {k: v for k, v in again.items() if k != "wall_s"} == {
      k: v for k, v in summary.items() if k != "wall_s"}


def test_wilson_interval_is_honest_at_zero():
  from dagger_jax.dagger.demo import wilson
  assert wilson(0.0, 50) == pytest.approx((0.0, 0.0713), abs=1e-4)  # not the plain s.e.'s 0
  assert wilson(0.5, 50) == pytest.approx((0.3664, 0.6336), abs=1e-4)


def test_an_openai_teacher_without_an_endpoint_is_refused_before_any_work(config, tmp_path):
  from dagger_jax.dagger import loop
  config.teacher.kind, config.workdir = "openai", str(tmp_path)
  with pytest.raises(ConfigError, match="config.teacher.url"):
    loop.run(config)
  assert not any(tmp_path.iterdir())


def test_round0_student_is_the_model_training_starts_from(config, tmp_path):
  import jax
  import numpy as np

  from dagger_jax.dagger import loop
  from dagger_jax.model.params_io import pure_params
  from dagger_jax.train.trainer import Trainer, mesh_from_config

  _tiny(config, tmp_path)
  acting = pure_params(loop.acting_model(config, str(tmp_path), 0))
  start = Trainer(config, mesh_from_config(config.mesh)).init_state(config.seed).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               acting, start)
