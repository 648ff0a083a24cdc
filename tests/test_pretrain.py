"""`dagger-jax pretrain`: the demo student's base, from exploration transcripts with no labels.

The corpus comes from real episodes in the real bubblewrap sandbox; the build is bit-for-bit
reproducible (checked on a tiny build, twice); the committed base is what its base.json says.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import support
from configs import demo as demo_config
from dagger_jax.dagger import pretrain
from dagger_jax.data.tokenizer import load_tokenizer_dir
from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.policies.base import EpisodeView

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(config, out_dir: str):
  support.tiny_student(config, max_len=512)
  config.train.batch_size = 8
  p = config.pretrain
  p.repos, p.turns, p.steps, p.warmup_steps, p.out = 6, 4, 3, 1, out_dir
  p.copy_steps, p.copy_span = 2, 16
  return config


def test_explorer_is_random_but_reproducible_and_never_submits():
  task = toy.generate(1, 99)[0]
  messages = [{"role": "system", "content": "x"},
              {"role": "user", "content": protocol.instance_prompt(task["problem_statement"])}]
  runs = []
  for seed in (5, 5, 6):
    msgs, commands = list(messages), []
    for _ in range(30):
      action = pretrain.RandomExplorer(seed=seed).next_action(EpisodeView(task, msgs, []))
      commands.append(protocol.parse_action(action).command)
      msgs += [{"role": "assistant", "content": action}, {"role": "user", "content": "ok"}]
    runs.append(commands)
  assert runs[0] == runs[1] and runs[0] != runs[2]  # a function of (seed, task, turn)
  assert all(c for c in runs[0])
  assert not any(protocol.SUBMIT_SENTINEL in c for c in runs[0])
  kinds = {c.split()[0] for c in runs[0]}
  assert {"grep", "nl", "sed", "python3"} <= kinds  # a mix of commands, not one fixed path


def test_lm_rows_train_every_token_of_the_chat_rendering():
  """Each conversation is its chat-template ids, cut into max_len pieces: targets are the next
  ids and every one is trained; the pieces put back together are the whole rendering."""
  tok = load_tokenizer_dir(os.path.join(ROOT, demo_config.get_config().data.tokenizer))
  messages = [{"role": "system", "content": "You are an agent."},
              {"role": "user", "content": "Bug in `def shift_rate(s, t)`: see the tests."},
              {"role": "assistant", "content": 'grep -rn "def shift_rate(" .'}]
  ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
  rows = pretrain.lm_rows([messages], tok, max_len=16)
  assert [len(r) for r in rows] == [16] * ((len(ids) - 1) // 16) + [(len(ids) - 1) % 16] * (
      (len(ids) - 1) % 16 > 0)
  np.testing.assert_array_equal(np.concatenate([r.tokens for r in rows]), ids[:-1])
  np.testing.assert_array_equal(np.concatenate([r.targets for r in rows]), ids[1:])
  assert all(r.loss_mask.all() and (r.positions == np.arange(len(r))).all() for r in rows)


def test_copy_rows_train_only_the_second_copy():
  for row in pretrain.copy_rows(20, 6, list(range(10, 30)), seed=0):
    ids = row.tokens.tolist() + [int(row.targets[-1])]
    trained = int(row.loss_mask.sum())
    k = trained + 1  # the span's length: its first repeated token is not trained
    assert ids[:k] == ids[-k:] and k == 6 and len(ids) == 2 * k
    assert row.loss_mask[-trained:].all() and not row.loss_mask[:-trained].any()


@pytest.mark.slow
def test_the_copy_curriculum_forms_induction_heads(tmp_path):
  """The demo model, from random weights, copies random spans after a short phase of copy rows
  (what the base's first phase does), and could not before it."""
  from dagger_jax.data import shards
  from dagger_jax.model.loader import init_model
  from dagger_jax.model.params_io import model_from_params
  from dagger_jax.model.qwen3 import Qwen3Config
  from dagger_jax.train import trainer

  config = demo_config.get_config()
  config.model.init_from = ""
  config.data.tokenizer, config.data.max_len = os.path.join(ROOT, config.data.tokenizer), 512
  config.train.update(batch_size=8, steps=150, lr=3e-3, warmup_steps=20, checkpoint_every=150,
                      async_checkpoint=False)
  vocab = list(range(5, config.model.vocab_size))
  shard = str(tmp_path / "shards" / "round_000")
  shards.write_shard(shard, pretrain.copy_rows(150 * 8 * 4, 16, vocab, seed=0), round=0,
                     data_config=config.data, pad_id=0)
  result = trainer.train(config, [shard], workdir=str(tmp_path / "run"), progress=False,
                         log=lambda _: None)
  model = model_from_params(Qwen3Config.from_config(config.model), result.state.params)
  assert pretrain.copy_accuracy(model, vocab, seed=1, span=16) > 0.5
  untrained = init_model(Qwen3Config.from_config(config.model),
                         __import__("jax").random.PRNGKey(0))
  assert pretrain.copy_accuracy(untrained, vocab, seed=1, span=16) < 0.05


@pytest.mark.slow
def test_build_is_reproducible_bit_for_bit(tmp_path):
  from dagger_jax.model.params_io import load_params, pure_params

  infos = []
  for name in ("a", "b"):
    config = _tiny(demo_config.get_config(), str(tmp_path / name))
    infos.append(pretrain.build_base(config, str(tmp_path / name), progress=False))
  assert infos[0]["params_sha256"] == infos[1]["params_sha256"]
  assert infos[0]["transcripts"] == 6 and infos[0]["final_loss"] < 7.0
  for name in ("a", "b"):  # the files hold what base.json says
    params = pure_params(load_params(str(tmp_path / name / "params")))
    assert pretrain.params_sha256(params) == infos[0]["params_sha256"]
  tok_a = (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes()
  assert tok_a == (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_bytes()


def test_the_committed_demo_base_is_what_base_json_says():
  from dagger_jax.model.params_io import load_params, pure_params

  config = demo_config.get_config()
  base = os.path.join(ROOT, os.path.dirname(config.model.init_from))
  with open(os.path.join(base, "base.json")) as f:
    info = json.load(f)
  params = pure_params(load_params(os.path.join(ROOT, config.model.init_from)))
  assert pretrain.params_sha256(params) == info["params_sha256"]
  tok = load_tokenizer_dir(os.path.join(ROOT, config.data.tokenizer))
  assert len(tok) <= config.model.vocab_size == info["model"]["vocab_size"]
  for key in ("hidden_size", "num_layers", "num_heads", "head_dim"):
    assert info["model"][key] == config.model[key], key
  assert info["pretrain"]["seed"] not in (config.tasks.seed, config.tasks.seed + 1,
                                          config.tasks.seed + 2)  # not a task seed of the demo
