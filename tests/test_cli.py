"""The CLI lists its verbs and rejects a bad config key or value before any work."""

import subprocess
import sys

import pytest

from dagger_jax import cli, configlib


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "dagger_jax.cli", *args],
                        capture_output=True, text=True, timeout=120)


def test_help_lists_every_verb():
  out = run_cli("--help")
  assert out.returncode == 0
  for words in cli.VERBS:
    assert " ".join(words) in out.stdout


@pytest.mark.parametrize("name", ["base", "demo", "qwen3_4b_swe", "qwen3_8b_swe"])
def test_configs_load_and_validate(name):
  config = configlib.load(f"{configlib.REPO_ROOT}/configs/{name}.py")
  assert config.model.num_heads % config.model.num_kv_heads == 0


def test_real_model_dimensions():
  c4 = configlib.load(f"{configlib.REPO_ROOT}/configs/qwen3_4b_swe.py").model
  c8 = configlib.load(f"{configlib.REPO_ROOT}/configs/qwen3_8b_swe.py").model
  assert (c4.hidden_size, c4.num_layers, c4.intermediate_size, c4.tie_word_embeddings) == (
      2560, 36, 9728, True)
  assert (c8.hidden_size, c8.num_layers, c8.intermediate_size, c8.tie_word_embeddings) == (
      4096, 36, 12288, False)


def test_override_applies():
  config = cli.load_config(["--config", "configs/demo.py", "--config.train.lr=0.5"])
  assert config.train.lr == 0.5


@pytest.mark.parametrize("args, needle", [
    (["--config.train.lrr=1"], "lrr"),
    (["--config.train.lr=abc"], "train.lr"),
    (["--config.train.lr=-1"], "train.lr"),
    (["--config.env.sandbox=ssh"], "env.sandbox"),
    (["--config.mesh.data=0"], "mesh.data"),
    (["--config.data.max_len=8192"], "data.max_len=8192 exceeds config.model.max_position"),
    (["--config", "does/not/exist.py"], "does/not/exist.py"),
    (["--config.env.issue_file=~/a b"], "env.issue_file='~/a b': must be '' or a plain path"),
])
def test_bad_config_names_the_problem(args, needle):
  with pytest.raises(configlib.ConfigError) as e:
    cli.load_config(args)
  assert needle in str(e.value)


def test_bad_config_fails_before_work_from_the_command_line():
  out = run_cli("shards", "inspect", "/nonexistent", "--config.train.lrr=1")
  assert out.returncode == 2
  assert out.stderr.strip() == ("dagger-jax shards inspect: bad config (--config.train.lrr=1): "
                                f"--config.train.lrr: {configlib.DEFAULT_CONFIG} has no such key "
                                "(did you mean 'lr'?)")


def test_unknown_verb():
  out = run_cli("frobnicate")
  assert out.returncode == 2 and "unknown verb" in out.stderr


def test_verb_group_help(capsys):
  """`dagger-jax GROUP --help` lists the group's verbs with their help and exits 0; the bare
  group says to choose a verb and exits 2."""
  groups = sorted({w[0] for w in cli.VERBS if len(w) > 1})
  assert groups
  for group in groups:
    assert cli.main([group, "--help"]) == 0
    out = capsys.readouterr().out
    for words, (_, help_) in cli.VERBS.items():
      if words[0] == group and len(words) > 1:
        assert words[1] in out and help_ in out
    assert cli.main([group]) == 2
    assert "choose a verb" in capsys.readouterr().err
