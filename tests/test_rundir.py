"""One run-directory layout (`dagger_jax.rundir`): a run records its tokenizer, and the verbs work
on any run's outputs without extra flags, whatever config they are given."""

from __future__ import annotations

import json
import os

import pytest

import support
from dagger_jax import cli, configlib
from dagger_jax.dagger import loop
from dagger_jax.rundir import DemoDir, RunDir

BASE_CONFIG = os.path.join(configlib.REPO_ROOT, "configs", "base.py")  # tokenizer: qwen3


def test_layout_names_every_path_once(tmp_path):
  run = RunDir(str(tmp_path))
  assert run.shards(2) == str(tmp_path / "shards" / "round_002")
  assert run.checkpoints(0) == str(tmp_path / "checkpoints" / "round_000")
  assert run.trajectories(1) == str(tmp_path / "trajectories" / "round_001.jsonl")
  assert run.eval_episodes(1).endswith("eval/round_001.jsonl")
  assert run.eval_summary(1).endswith("eval/round_001.json")
  assert run.tasks("validation") == str(tmp_path / "tasks" / "validation.jsonl")
  demo = DemoDir(str(tmp_path))
  assert demo.run("sft", 3).root == str(tmp_path / "sft_seed3")
  assert demo.shared.tasks("train") == str(tmp_path / "shared" / "tasks" / "train.jsonl")
  assert not any(tmp_path.iterdir())  # naming a path creates nothing
  with pytest.raises(ValueError, match="root"):
    RunDir("")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """One teacher-only round of the demo loop at toy scale, with a BPE trained in the run."""
  c = support.tiny_loop(rounds=1, episodes=3, steps=2, n_train=4, n_eval=1)
  workdir = str(tmp_path_factory.mktemp("run"))
  c.workdir = workdir
  loop.run(c, progress=False)
  return RunDir(workdir)


def test_a_run_records_its_tokenizer(run_dir):
  info = run_dir.read_run_file()
  assert info["tokenizer"] == run_dir.tokenizer and os.path.isabs(info["tokenizer"])
  assert info["config"]["data"]["tokenizer"] == "demo-bpe"
  manifest = json.load(open(os.path.join(run_dir.shards(0), "manifest.json")))
  assert manifest["tokenizer_dir"] == run_dir.tokenizer
  kept = os.path.join(run_dir.checkpoints(0), "hf_files", "tokenizer.json")
  assert open(kept, "rb").read() == open(os.path.join(run_dir.tokenizer, "tokenizer.json"),
                                         "rb").read()


def test_verbs_read_a_runs_outputs_with_another_config(run_dir, tmp_path, capsys):
  """configs/base.py names the Qwen3 tokenizer, not the run's BPE: the verbs still decode with
  the run's own (a shard's manifest, a checkpoint's hf_files)."""
  assert cli.main(["shards", "inspect", run_dir.shards(0), "--config", BASE_CONFIG]) == 0
  out = capsys.readouterr().out
  assert "<|im_start|>system" in out and "showing token ids" not in out
  assert cli.main(["generate", "--config", BASE_CONFIG, "--ckpt", run_dir.checkpoints(0),
                   "--prompt", "Fix the bug.", "--max-new-tokens", "4", "--json"]) == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert len(row["ids"]) >= 1 and isinstance(row["text"], str)
  out_dir = str(tmp_path / "hf")
  assert cli.main(["export-hf", "--ckpt", run_dir.checkpoints(0), "--out", out_dir]) == 0
  assert os.path.isfile(os.path.join(out_dir, "tokenizer.json"))  # ships with the weights


def test_an_export_is_what_serving_engines_load(run_dir, tmp_path, capsys):
  """export-hf of a run's checkpoint: generation_config.json stops at the end of a turn, every
  file is world-readable, and the tokenizer travels with the weights, from the checkpoint's
  hf_files or else from the tokenizer its run recorded; with neither, the export says so."""
  import shutil
  import stat

  import transformers
  out = str(tmp_path / "hf")
  assert cli.main(["export-hf", "--ckpt", run_dir.checkpoints(0), "--out", out]) == 0
  tok = json.load(open(os.path.join(out, "tokenizer.json"), encoding="utf-8"))
  ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert generation.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
  for name in os.listdir(out):
    assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o644, name
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
  capsys.readouterr()

  bare = tmp_path / "run_copy"  # the same run, its checkpoint without the kept tokenizer files
  shutil.copytree(run_dir.root, bare, ignore=shutil.ignore_patterns("shards", "trajectories"))
  shutil.rmtree(RunDir(str(bare)).checkpoints(0) + "/hf_files")
  assert cli.main(["export-hf", "--ckpt", RunDir(str(bare)).checkpoints(0),
                   "--out", str(tmp_path / "hf2")]) == 0
  assert f"tokenizer files from {run_dir.read_run_file()['tokenizer']}" in capsys.readouterr().out
  assert os.path.isfile(tmp_path / "hf2" / "tokenizer.json")

  os.remove(RunDir(str(bare)).run_file)  # no run around it: nothing to ship, and it says so
  assert cli.main(["export-hf", "--ckpt", RunDir(str(bare)).checkpoints(0),
                   "--out", str(tmp_path / "hf3")]) == 0
  assert "WITHOUT tokenizer files" in capsys.readouterr().out
  assert not os.path.exists(tmp_path / "hf3" / "tokenizer.json")
