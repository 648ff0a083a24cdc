"""Qwen3-4B student on SWE tasks (the paper's 4B setting; 27.3% on SWE-bench Verified).

Dimensions are those of Qwen/Qwen3-4B's config.json. Point `model.init_from` at the HF checkpoint
directory (or an Orbax dir made by `dagger-jax import-hf`).

`--config configs/qwen3_4b_swe.py:tiny` is the same job at CPU size (`base.tiny`): every
component this file names, with a 2-layer student, the committed toy tasks and one small round.
The teacher's endpoint (`teacher.url`, `.model`, `.api_key_env`) and the rollout server
(`rollout.sglang_url`, or `rollout.sglang_launch` to start one) are given on the command line.
"""

from configs import base


def get_config(arg: str = ""):
  tiny = base.is_tiny(arg, "qwen3_4b_swe")
  c = base.get_config()
  c.name = "qwen3_4b_swe"
  c.workdir = "runs/qwen3_4b_swe"
  m = c.model
  m.vocab_size = 151936
  m.hidden_size = 2560
  m.intermediate_size = 9728
  m.num_layers = 36
  m.num_heads = 32
  m.num_kv_heads = 8
  m.head_dim = 128
  m.rope_theta = 1_000_000.0
  m.rms_norm_eps = 1e-6
  m.tie_word_embeddings = True
  m.max_position_embeddings = 40960
  m.param_dtype = "float32"
  m.dtype = "bfloat16"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.data.tokenizer = "qwen3"
  c.data.max_len = 32768
  c.train.batch_size = 64
  c.train.lr = 1e-5
  c.train.warmup_steps = 20
  c.train.steps = 500
  c.train.loss_chunked = True
  c.train.loss_chunk_size = 2048
  c.sampler.max_new_tokens = 4096
  c.sampler.temperature = 0.7
  c.sampler.top_p = 0.8
  c.sampler.top_k = 20
  c.env.sandbox = "docker"
  c.env.max_turns = 100
  c.env.command_timeout = 120.0
  # SWE-Gym rows (Hugging Face, through `datasets`) in SWE-Gym's own instance images; evaluation
  # on SWE-bench Verified, which training tasks may never contain (envs/tasks/sources.py).
  c.tasks.source = "SWE-Gym/SWE-Gym"
  c.tasks.train_images = "swe-gym"
  c.tasks.eval_file = "princeton-nlp/SWE-bench_Verified:test"
  c.rollout.engine = "sglang"
  c.rollout.concurrency = 128
  c.teacher.kind = "openai"
  c.dagger.rounds = 3
  c.dagger.episodes_per_round = 2000
  c.dagger.eval_episodes = 500
  return base.tiny(c) if tiny else c
