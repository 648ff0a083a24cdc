"""One error convention: every verb, given a bad config value, a missing file or an unreachable
server, exits 2 with one line on stderr that names the problem, and no traceback."""

from __future__ import annotations

import pytest

from dagger_jax import cli
from dagger_jax.envs import tasks as T
from dagger_jax.envs.tasks import toy

MISSING = "/nonexistent/dagger_jax"
BAD_LR = "--config.train.lr=-1"
UNREACHABLE = "127.0.0.1:9"  # the discard port: nothing listens, connections are refused


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tasks") / "toy.jsonl")
  T.save_tasks(path, toy.generate(1, 0))
  return path


def _cases(tmp: str, tasks_file: str) -> list[tuple[str, list[str], str]]:
  """(case, argv, what the one line must say)."""
  task_id = T.load_tasks(tasks_file)[0]["instance_id"]
  verbs = {  # each verb's required arguments, valid apart from what a case breaks
      "demo": ["demo", f"--config.workdir={tmp}/demo", "--no-plot"],
      "dagger": ["dagger", f"--config.workdir={tmp}/dagger"],
      "pretrain": ["pretrain", "--out", f"{tmp}/base"],
      "train": ["train", "--shards", tmp, f"--config.workdir={tmp}/train"],
      "import-hf": ["import-hf", "--hf", tmp, "--out", f"{tmp}/ckpt"],
      "export-hf": ["export-hf", "--ckpt", tmp, "--out", f"{tmp}/hf"],
      "generate": ["generate", "--ids", "1 2"],
      "serve": ["serve", "--model", tmp, "--port", "0"],
      "plan": ["plan", "--mesh", "data=1,fsdp=1,tensor=1", "--device", "cpu", "--no-compile"],
      "import-trajectories": ["import-trajectories", tmp, "--out", f"{tmp}/r.jsonl"],
      "shards build": ["shards", "build", "--trajectories", tasks_file, "--out", f"{tmp}/s"],
      "shards inspect": ["shards", "inspect", tmp],
      "tasks generate": ["tasks", "generate", "--n", "1", "--out", f"{tmp}/t.jsonl"],
      "tasks validate": ["tasks", "validate", tasks_file],
      "env exec": ["env", "exec", "--tasks", tasks_file, "--instance", task_id, "--", "ls"],
  }
  cases = [(f"{verb}: bad value", argv + [BAD_LR], "config.train.lr=-1.0: must be > 0")
           for verb, argv in verbs.items()]
  missing_tasks = f"--config.tasks.train_file={MISSING}/train.jsonl"
  cases += [
      ("demo: missing file", verbs["demo"] + [missing_tasks],
       f"config.tasks.train_file={MISSING}/train.jsonl: no such file"),
      ("dagger: missing file", verbs["dagger"] + [missing_tasks],
       f"config.tasks.train_file={MISSING}/train.jsonl: no such file"),
      ("pretrain: missing dir", verbs["pretrain"] + [f"--config.env.scratch_dir={MISSING}"],
       f"config.env.scratch_dir='{MISSING}' is not a directory"),
      ("train: missing dir", ["train", "--shards", MISSING], f"--shards {MISSING}: no such"),
      ("import-hf: missing dir", ["import-hf", "--hf", MISSING, "--out", f"{tmp}/c"], MISSING),
      ("export-hf: missing dir", ["export-hf", "--ckpt", MISSING, "--out", f"{tmp}/h"],
       f"{MISSING}: no such checkpoint directory"),
      ("generate: missing dir", ["generate", "--ckpt", MISSING, "--ids", "1"],
       f"{MISSING}: no such checkpoint directory"),
      ("shards build: missing file",
       ["shards", "build", "--trajectories", f"{MISSING}.jsonl", "--out", f"{tmp}/s"],
       f"--trajectories {MISSING}.jsonl: no such file"),
      ("shards inspect: missing dir", ["shards", "inspect", MISSING],
       f"{MISSING}/manifest.json: no manifest"),
      ("tasks validate: missing file", ["tasks", "validate", f"{MISSING}.jsonl"],
       f"{MISSING}.jsonl"),
      ("env exec: missing file",
       ["env", "exec", "--tasks", f"{MISSING}.jsonl", "--instance", "x", "--", "ls"],
       f"{MISSING}.jsonl"),
      # servers: the package index, the docker engine, a rollout server
      ("tasks generate: index unreachable",
       verbs["tasks generate"] + ["--source", "pypi:six", "--cache", f"{tmp}/sdists"],
       "is the package registry reachable?"),
      ("tasks validate: docker unreachable",
       verbs["tasks validate"] + ["--config.env.sandbox=docker"], "cannot reach the docker engine"),
      ("env exec: docker unreachable",
       verbs["env exec"][:-2] + ["--config.env.sandbox=docker", "--", "ls"],
       "cannot reach the docker engine"),
      # a flag never repeats a config key; the old spelling names the new one
      ("train: --workdir", verbs["train"][:-1] + ["--workdir", f"{tmp}/train"],
       "write --config.workdir=DIR, not --workdir DIR"),
      ("plan: a mesh the batch does not divide",
       ["plan", "--mesh", "fsdp=3", "--no-compile", "--config.train.batch_size=8"],
       "must be a multiple of config.train.grad_accum=1 x mesh data*fsdp=3"),
      ("serve: missing dir", ["serve", "--model", MISSING, "--port", "0"],
       f"{MISSING}: no such checkpoint directory"),
      ("import-trajectories: missing file",
       ["import-trajectories", f"{MISSING}.traj.json", "--out", f"{tmp}/r.jsonl"],
       f"{MISSING}.traj.json"),
      ("dagger: sglang unreachable",
       verbs["dagger"] + ["--config.rollout.engine=sglang", f"--config.rollout.sglang_url="
                          f"http://{UNREACHABLE}", "--config.rollout.startup_timeout_s=1",
                          "--config.dagger.beta0=0.5"], "start one with `dagger-jax serve"),
      ("dagger: teacher unset", verbs["dagger"] + ["--config.teacher.kind=openai"],
       "config.teacher.url"),
  ]
  return cases


def test_every_verb_exits_2_with_one_line(tmp_path, tasks_file, capsys, monkeypatch):
  monkeypatch.setenv("DOCKER_HOST", f"tcp://{UNREACHABLE}")
  monkeypatch.setenv("PIP_INDEX_URL", f"http://{UNREACHABLE}/simple")
  monkeypatch.setenv("PIP_RETRIES", "0")
  monkeypatch.setenv("PIP_TIMEOUT", "2")
  monkeypatch.setenv("PIP_FIND_LINKS", "")
  cases = _cases(str(tmp_path), tasks_file)
  groups = {w[0] for w in cli.VERBS if len(w) > 1}
  verb = lambda argv: " ".join(argv[:2] if argv[0] in groups else argv[:1])  # noqa: E731
  assert {verb(argv) for _, argv, _ in cases} == {" ".join(w) for w in cli.VERBS}  # all tried
  failures = []
  for name, argv, needle in cases:
    code = cli.main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    prog = f"dagger-jax {verb(argv)}"
    ok = (code == 2 and len(lines) == 1 and lines[0].startswith(prog + ": ")
          and needle in lines[0] and "Traceback" not in out.err + out.out)
    if not ok:
      failures.append(f"{name}: exit {code}, stderr {out.err!r}, wanted {needle!r}")
  assert not failures, "\n".join(failures)
