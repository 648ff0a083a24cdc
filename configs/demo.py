"""The CPU demo: a complete small DAgger experiment in minutes on 2 cores.

    dagger-jax demo --config configs/demo.py
"""

from configs import base


def get_config(arg: str = ""):
  c = base.get_config(arg)
  c.name = "demo"
  c.workdir = "runs/demo"
  m = c.model
  m.vocab_size = 1024  # small BPE tokenizer trained on the toy-task corpus
  m.hidden_size = 128
  m.intermediate_size = 384
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32
  m.rope_theta = 10_000.0
  m.max_position_embeddings = 4096
  c.data.tokenizer = "demo-bpe"
  c.data.max_len = 1536  # one toy episode (~1.1-1.5k tokens) per row
  c.train.batch_size = 2
  c.train.lr = 2e-3
  c.train.warmup_steps = 20
  c.train.steps = 300  # per round
  c.train.weight_decay = 0.01
  c.train.checkpoint_every = 150
  c.sampler.max_new_tokens = 96
  c.env.max_turns = 8
  c.env.command_timeout = 10.0
  c.env.output_limit = 2000
  c.tasks.source = "toy"
  c.tasks.n_train = 200
  c.tasks.n_eval = 100
  c.dagger.rounds = 3
  c.dagger.episodes_per_round = 60
  c.dagger.eval_episodes = 50
  c.rollout.concurrency = 60  # the whole round in one wave: one student batch per turn
  return c
