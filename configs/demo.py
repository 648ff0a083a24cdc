"""The CPU demo: DAgger vs SFT vs on-policy labelling on one teacher-label budget, in minutes.

    dagger-jax demo --config configs/demo.py                 # what `make demo` runs
    dagger-jax pretrain --config configs/demo.py --out assets/demo_base   # rebuild the base

The student is a ~0.9M-parameter Qwen3-architecture model that starts from a committed base
(`assets/demo_base`: params + its BPE tokenizer, pretrained on random exploration transcripts of
fresh `toy` repositories by `dagger-jax pretrain`; no teacher labels, no held-out tasks). The
tasks are the imitable `toy-rewrite` family: every teacher action can be read off the
conversation, and the fix copies two short spans (`s|-|+|`) that the statement shows. After a
failed edit the teacher restores, re-reads the issue and fixes again the careful way: the shell
reads the substitution from the issue file, so the retry copies only the function and the path.
Only a student's own mistakes lead there: that recovery is what DAgger teaches and SFT cannot.
"""

import os

from configs import base

BASE_DIR = "assets/demo_base"


def get_config(arg: str = ""):
  tiny = base.is_tiny(arg, "demo")
  c = base.get_config()
  c.name = "demo"
  c.workdir = "runs/demo"
  m = c.model
  m.vocab_size = 1024  # the base's BPE tokenizer (trained on its pretraining corpus)
  m.hidden_size = 128
  m.intermediate_size = 384
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32
  m.rope_theta = 10_000.0
  m.max_position_embeddings = 4096
  m.init_from = f"{BASE_DIR}/params"
  c.data.tokenizer = f"{BASE_DIR}/tokenizer"
  c.data.max_len = 1536  # two teacher episodes (~600-700 tokens each) per row
  c.train.batch_size = 2
  c.train.lr = 1e-3
  c.train.warmup_steps = 20
  c.train.steps = 120  # per round
  c.train.weight_decay = 0.01
  c.train.checkpoint_every = 120
  c.sampler.max_new_tokens = 96  # the longest teacher turn (a retry of the fix) is ~75 tokens
  c.sampler.length_buckets = (512, 768, 1024, 1536, 2048, 3072, 4096)  # less padding per prefill
  c.env.max_turns = 8  # the straight path is 4 turns; one recovery takes 3 more
  c.env.command_timeout = 10.0
  c.env.output_limit = 2000
  c.env.normalize_durations = True  # same seed, same observations (toy's runner prints none)
  c.env.issue_file = "~/ISSUE.md"  # the teacher's restore re-reads the issue before its retry
  c.env.scratch_dir = "/dev/shm" if os.path.isdir("/dev/shm") else ""  # tiny repos: tmpfs
  c.tasks.source = "toy-rewrite"  # the statement names the span to replace (envs/tasks/toy.py)
  c.tasks.n_train = 600
  c.tasks.n_eval = 200
  c.dagger.rounds = 3
  c.dagger.episodes_per_round = 80
  c.dagger.eval_episodes = 200
  c.dagger.eval_every = 2  # rounds 0 and 2 (the last): evaluation is a third of the demo's time
  c.rollout.concurrency = 200  # the whole evaluation in one wave: one student batch per turn
  c.rollout.env_workers = 4

  # `dagger-jax pretrain`: the committed base (assets/demo_base) was built with these.
  p = c.pretrain
  p.out = BASE_DIR
  p.repos = 1200
  p.turns = 8
  p.steps = 900
  p.lr = 2e-3
  return base.tiny(c) if tiny else c
