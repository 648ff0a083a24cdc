"""Every config runs, small: `--config configs/NAME.py:tiny` (configs/base.py: `tiny`) keeps every
component of the full config and changes only sizes; the paper configs at `:tiny` run one whole
DAgger round from the command line on CPU.

In that round nothing is swapped for a test double except what a laptop cannot reach: the
teacher is an OpenAI-compatible endpoint (tests/scripted_teacher_server.py, real HTTP, with an
API key), the student is served over SGLang's API by `dagger-jax serve`, which the run launches
itself from `rollout.sglang_launch`; the tokenizer is Qwen3's; the tasks come from the committed
tiny file. The sandbox is docker where a docker engine answers (`docker` variant), and the
project's bubblewrap sandbox elsewhere.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

import support
from dagger_jax import cli, configlib
from dagger_jax.envs import tasks as tasks_lib
from dagger_jax.rundir import RunDir

CONFIGS = os.path.join(configlib.REPO_ROOT, "configs")
PAPER = ("qwen3_4b_swe", "qwen3_8b_swe")

# What `:tiny` may change: sizes, the run directory, and where the tasks come from (a tiny file).
# Any other key that differs from the full config is a component the tiny run would not test.
SIZES = {
    "workdir",
    "model.hidden_size", "model.intermediate_size", "model.num_layers", "model.num_heads",
    "model.num_kv_heads", "model.head_dim", "model.max_position_embeddings", "model.init_from",
    "mesh.data", "mesh.fsdp", "mesh.tensor", "rollout.mesh",
    "data.max_len",
    "train.batch_size", "train.grad_accum", "train.steps", "train.warmup_steps", "train.log_every",
    "train.checkpoint_every", "train.loss_chunk_size",
    "sampler.max_new_tokens",
    "env.max_turns", "env.command_timeout",
    "tasks.train_file", "tasks.eval_file", "tasks.n_train", "tasks.n_eval",
    "rollout.concurrency", "rollout.env_workers", "teacher.concurrency",
    "dagger.rounds", "dagger.episodes_per_round", "dagger.eval_episodes", "dagger.label_budget",
    "pretrain.repos", "pretrain.turns", "pretrain.copy_steps", "pretrain.steps",
    "pretrain.warmup_steps",
}


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _spec(name: str, arg: str = "") -> str:
  path = os.path.join(CONFIGS, f"{name}.py")
  return f"{path}:{arg}" if arg else path


def _fill_axis(c) -> list[str]:
  return [a for a in ("data", "fsdp", "tensor") if c.mesh[a] == -1]


@pytest.mark.parametrize("name", ["base", *PAPER])
def test_tiny_keeps_every_component_and_shrinks_the_sizes(name):
  full, tiny = configlib.load(_spec(name)), configlib.load(_spec(name, "tiny"))
  f, t = _flat(full.to_dict()), _flat(tiny.to_dict())
  assert set(f) == set(t)
  changed = {k for k in f if f[k] != t[k]}
  assert not changed - SIZES, {k: (f[k], t[k]) for k in changed - SIZES}
  # The mesh keeps its layout: the axis that filled the devices fills the local ones.
  assert _fill_axis(tiny) == (_fill_axis(full) or ["fsdp"])
  assert tiny.workdir != full.workdir  # a tiny run never resumes into the full run's directory
  assert tiny.model.hidden_size < full.model.hidden_size
  assert tiny.train.steps <= 4 and tiny.dagger.rounds == 1
  assert tiny.dagger.episodes_per_round <= 4 and tiny.dagger.eval_episodes <= 2
  if name in PAPER:  # their tasks file (SWE-Gym) becomes the committed tiny one
    for split in ("train_file", "eval_file"):
      assert os.path.isfile(tiny.tasks[split]), tiny.tasks[split]
  else:  # toy tasks stay generated in the run, fewer
    assert tiny.tasks.source == "toy" and not tiny.tasks.train_file


def test_the_paper_configs_name_the_components_the_tiny_round_runs():
  """What the slow test below exercises: if a paper config stops naming these, it must change."""
  for name in PAPER:
    c = configlib.load(_spec(name, "tiny"))
    assert (c.rollout.engine, c.teacher.kind, c.env.sandbox, c.data.tokenizer) == (
        "sglang", "openai", "docker", "qwen3"), name
    assert c.train.loss_chunked and c.model.dtype == "bfloat16"


def test_tiny_knows_which_task_sources_are_generated():
  from configs import base
  from dagger_jax.envs.tasks import toy
  assert base.TOY_FAMILIES == toy.FAMILIES


def test_the_tiny_tasks_are_a_small_local_file():
  c = configlib.load(_spec("qwen3_4b_swe", "tiny"))
  train = tasks_lib.load_tasks(c.tasks.train_file)
  held_out = tasks_lib.load_tasks(c.tasks.eval_file)
  assert (len(train), len(held_out)) == (c.tasks.n_train, c.tasks.n_eval) == (4, 2)
  assert not {t["instance_id"] for t in train} & {t["instance_id"] for t in held_out}
  assert all(t["repo_files"] for t in train + held_out)  # self-contained: no clone, no image
  assert os.path.getsize(c.tasks.train_file) + os.path.getsize(c.tasks.eval_file) < 64_000


@pytest.mark.parametrize("name", ["base", *PAPER])
def test_an_unknown_config_argument_is_refused(name):
  with pytest.raises(configlib.ConfigError, match=rf"configs/{name}.py:tinny.*'tiny'"):
    cli.load_config(["--config", _spec(name, "tinny")])


def _run_tiny(name: str, sandbox: str, tmp_path) -> tuple[RunDir, dict, object]:
  """`dagger-jax dagger --config configs/NAME.py:tiny` in a subprocess started in tmp_path (not
  the project root), with overrides only for where things are: the run directory, the teacher
  endpoint, the rollout server, and (bwrap) the sandbox. Returns the run, its one metrics row,
  and the teacher server (what it saw)."""
  from scripted_teacher_server import MODEL, ScriptedTeacherServer

  spec = _spec(name, "tiny")
  run = RunDir(str(tmp_path / "run"))
  port = support.free_port()
  launch = f"{{python}} -m dagger_jax.cli serve --config {spec} --model {{model}} --port {{port}}"
  overrides = [
      f"--config.workdir={run.root}",
      f"--config.rollout.sglang_url=http://127.0.0.1:{port}",
      f"--config.rollout.sglang_launch={launch}",
      f"--config.teacher.model={MODEL}",
      "--config.teacher.api_key_env=DAGGER_JAX_TINY_TEACHER_KEY",
  ]
  if sandbox != "docker":
    overrides.append(f"--config.env.sandbox={sandbox}")
  env = dict(os.environ, DAGGER_JAX_TINY_TEACHER_KEY="sk-tiny")
  with ScriptedTeacherServer(api_key="sk-tiny") as teacher:
    cmd = [sys.executable, "-m", "dagger_jax.cli", "dagger", "--config", spec,
           f"--config.teacher.url={teacher.url}", *overrides]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=900)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
  assert "round 0: beta=1.000" in proc.stdout, proc.stdout
  rows = [json.loads(line) for line in open(run.metrics, encoding="utf-8")]
  assert len(rows) == 1, rows
  return run, rows[0], teacher


@pytest.mark.slow
@pytest.mark.parametrize("name,sandbox", [
    # the sandbox the paper configs name, for each; and bwrap once, for machines without docker
    *[pytest.param(name, "docker", marks=pytest.mark.docker) for name in PAPER],
    (PAPER[0], "bwrap"),
])
def test_one_dagger_round_of_a_paper_config_at_tiny(name, sandbox, tmp_path):
  c = configlib.load(_spec(name, "tiny"))
  run, row, teacher = _run_tiny(name, sandbox, tmp_path)

  # Collected: every training task once, the remote teacher acting (beta 1) and resolving.
  trajs = [json.loads(line) for line in open(run.trajectories(0), encoding="utf-8")]
  assert len(trajs) == row["episodes_this_round"] == c.dagger.episodes_per_round
  assert all(t["outcome"]["resolved"] for t in trajs) and row["train_resolved"] == len(trajs)
  assert {turn["actor"] for t in trajs for turn in t["turns"]} == {"teacher"}
  assert row["teacher_calls"] == row["labels_this_round"] == row["teacher_usage"]["calls"]
  assert row["teacher_usage"]["calls"] == teacher.requests > 0
  assert set(teacher.authorizations) == {"Bearer sk-tiny"}

  # Rendered with the real Qwen3 tokenizer (its special tokens sit above 151 000).
  with open(os.path.join(run.shards(0), "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  assert manifest["trained_tokens"] == row["trained_tokens_round"] > 0
  assert manifest["data_config"]["tokenizer"] == "qwen3" and manifest["max_token_id"] > 151_000

  # Trained the config's steps and checkpointed the last.
  assert row["steps"] == c.train.steps and row["train_loss"] > 0
  assert os.path.isdir(os.path.join(run.checkpoints(0), str(c.train.steps)))

  # Evaluated the student alone, served by the launched `dagger-jax serve` with round 0's
  # weights, exported in the config's architecture (the 8B's embeddings are untied).
  with open(run.eval_summary(0), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["episodes"] == row["eval_episodes"] == c.dagger.eval_episodes
  evals = [json.loads(line) for line in open(run.eval_episodes(0), encoding="utf-8")]
  assert {turn["actor"] for t in evals for turn in t["turns"]} == {"student"}
  assert "version 'round_000'" in open(run.sglang_log, encoding="utf-8").read()
  with open(os.path.join(run.rollout_weights("round_000"), "config.json"), encoding="utf-8") as f:
    exported = json.load(f)
  assert exported["tie_word_embeddings"] == c.model.tie_word_embeddings
  assert (exported["hidden_size"], exported["vocab_size"]) == (c.model.hidden_size,
                                                              c.model.vocab_size)

  # Logged: metrics.jsonl (read above), TensorBoard events, run.json.
  assert glob.glob(os.path.join(run.tensorboard, "events.out.tfevents.*"))
  assert run.read_run_file()["config"]["name"] == name
  assert "sk-tiny" not in open(run.run_file, encoding="utf-8").read()
