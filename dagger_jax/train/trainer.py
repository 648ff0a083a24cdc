"""Sharded SFT of the student on token shards: mesh, optimizer, one compiled step, resume.

    dagger-jax train --config configs/demo.py --shards runs/demo/shards/round_000 \
        --config.workdir runs/x
    (the verb: `dagger_jax/train/cli.py`)

Library use (the DAgger loop calls the same function each round):

    result = train(config, shard_dirs, workdir=..., round_index=r)

How a round starts (`config.train.continue_from`), in this order:
  1. this round already has a checkpoint (`<workdir>/checkpoints/round_RRR`): a killed run
     resumes from its latest one: params, optimizer state, step, data cursor and RNG;
  2. `last` and round r > 0: params and optimizer state of round r-1's final checkpoint, a fresh
     warm-up + cosine over `config.train.steps` (Adam's moments carry over);
  3. otherwise the base model, `config.model.init_from` (an HF directory or an Orbax params or
     trainer checkpoint, read by `dagger_jax.model.loader.load_model`), or a random init from
     `config.seed`.

TensorBoard (`<workdir>/tensorboard`, `train/*` scalars): one x-axis across rounds. Round r's step
s is logged at global step `global_step_offset(workdir, r, config.train.steps) + s`, the offset
being the steps rounds 0..r-1 actually trained (the step of each one's latest checkpoint), so
round 1 of a run whose round 0 trained 6 steps logs at 7, 8, ... even if it trains 10 steps
itself. A resumed round reads the same offset (earlier rounds' checkpoints do not change) and so
logs the same global steps; its writer purges what the killed process logged after its last
checkpoint (`purge_step`), which the resumed run logs again.

Sharding: parameters carry logical axes (`model/sharding.py`); their shardings, the optimizer
state's (the same per parameter, scalars replicated) and the batch's (`P(None, ('data', 'fsdp'))`
over [micro-batch, rows, length]) are fixed before anything is compiled. The state is created
sharded (`jax.jit(init, out_shardings=...)`), the step is compiled once with explicit in/out
shardings and donates the state, and host batches become global arrays in `global_batch` only.

Multi-host (one process per host, `jax.distributed.initialize()`): every process runs `train`;
each reads only its slice of every global batch (`ShardReader(..., jax.process_index(),
jax.process_count())`), process 0 alone writes TensorBoard and the checkpoint's side files, and
every process saves its own array shards through Orbax. Paths go through `dagger_jax.paths`, so
the shards and the workdir may be `gs://` URIs. `tests/test_multihost.py` runs 2 processes x 4
CPU devices against one process of 8.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from dagger_jax import faults, paths
from dagger_jax.errors import ConfigError
from dagger_jax.data.shards import ShardReader
from dagger_jax.model import hf, loader, params_io, sharding
from dagger_jax.model.qwen3 import Qwen3, Qwen3Config, model_options
from dagger_jax.rundir import RunDir
from dagger_jax.train import checkpoint, optim
from dagger_jax.train.loss import loss_sum_and_count, token_weights

# The fields of a token row that the step reads (DESIGN.md, "Token row").
BATCH_FIELDS = ("tokens", "targets", "positions", "segment_ids", "branch_ids", "loss_mask",
                "label_ids")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  params: Any  # nested dict of arrays, the student's nnx state as a pure dict
  opt_state: Any
  step: jax.Array  # int32, steps taken in this round
  rng: jax.Array  # uint32[2]; no op draws from it yet, it is saved so that one may


def mesh_from_config(mesh_config: Any, devices: Sequence[jax.Device] | None = None):
  return sharding.make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices)


def global_step_offset(workdir: str, round_index: int, steps_per_round: int) -> int:
  """The TensorBoard step just before round `round_index`'s first: what rounds 0..r-1 trained.

  Each earlier round counts the step of its latest checkpoint in `RunDir(workdir).checkpoints(i)`
  (`train` always saves a round's last step, so a finished round counts all its steps, whatever
  `config.train.steps` was then); a round with no checkpoint there (trained in another workdir)
  counts `steps_per_round`. Only earlier rounds are read, and training round r never changes
  them, so an interrupted and resumed round r gets the same offset as an uninterrupted one.

  >>> global_step_offset("/nonexistent", 0, 100)  # round 0 starts at 0
  0
  >>> global_step_offset("/nonexistent", 2, 100)  # no checkpoints: rounds 0 and 1 of 100 steps
  200
  """
  offset = 0
  for i in range(round_index):
    directory = RunDir(workdir).checkpoints(i)
    latest = None
    if paths.isdir(directory):  # (opening a Checkpointer would create a missing directory)
      previous = checkpoint.Checkpointer(directory, async_save=False)
      latest = previous.latest_step()
      previous.close()
    offset += steps_per_round if latest is None else latest
  return offset


def flops_per_token(c: Qwen3Config, seq_len: int) -> float:
  """Training FLOPs per token: 6 * matmul params (incl. the unembedding) + 12 * L * n * h * T
  (attention scores and values, forward and backward, the usual non-causal count)."""
  matmul_params = c.num_params() - (c.vocab_size * c.hidden_size if not c.tie_word_embeddings
                                    else 0)  # an untied input embedding is a lookup
  return 6.0 * matmul_params + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len


class Trainer:
  """Builds the sharded state and the compiled step for `config` on `mesh`."""

  def __init__(self, config: Any, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    self.model_config = Qwen3Config.from_config(config.model)
    t = config.train
    self.tx = optim.optimizer(t)
    self.learning_rate = optim.learning_rate(t)
    self.grad_accum = int(t.grad_accum)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % (self.grad_accum * batch_shards):
      raise ConfigError(
          f"config.train.batch_size={t.batch_size} must be a multiple of config.train.grad_accum"
          f"={self.grad_accum} x mesh data*fsdp={batch_shards}")
    self.micro_batch = t.batch_size // self.grad_accum

    abstract_model = nnx.eval_shape(lambda: Qwen3(self.model_config, rngs=nnx.Rngs(0),
                                                   **model_options(config)))
    self.graphdef, abstract_vars = nnx.split(abstract_model)
    param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_vars, mesh))
    replicated = NamedSharding(mesh, P())
    self.replicated = replicated
    abstract = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
    opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abstract.opt_state,
                                          param_shardings, transform_non_params=lambda _: replicated)
    self.state_shardings = TrainState(param_shardings, opt_shardings, replicated, replicated)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_shardings)
    self.batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    batch_shardings = {f: self.batch_sharding for f in BATCH_FIELDS}
    self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
    self._from_params = jax.jit(self._state_from_params, out_shardings=self.state_shardings)
    self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_shardings),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=0)

  # ------------------------------------------------------------------------------------ state

  def _state_from_params(self, params, rng) -> TrainState:
    return TrainState(params, self.tx.init(params), jnp.zeros((), jnp.int32), rng)

  def _init_state(self, rng) -> TrainState:
    model = loader.init_model(self.model_config, rng)
    return self._state_from_params(nnx.to_pure_dict(nnx.state(model)), rng)

  def init_state(self, seed: int) -> TrainState:
    """A random init from `seed`, created sharded (the same values on every mesh)."""
    with jax.set_mesh(self.mesh):
      return self._init(jax.random.PRNGKey(seed))

  def state_from_params(self, params: Any, seed: int, opt_state: Any = None) -> TrainState:
    """A step-0 state around given params (and optimizer state, else a fresh one)."""
    params = jax.device_put(params, self.state_shardings.params)
    with jax.set_mesh(self.mesh):
      state = self._from_params(params, jax.random.PRNGKey(seed))
    if opt_state is not None:
      state.opt_state = jax.device_put(opt_state, self.state_shardings.opt_state)
    return state

  def model(self, params: Any) -> Qwen3:
    return nnx.merge(self.graphdef, params)

  # ------------------------------------------------------------------------------------- step

  def global_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows [local_batch, T] -> global arrays [grad_accum, micro_batch, T]."""
    out = {}
    for f in BATCH_FIELDS:
      x = np.asarray(host_batch[f])
      local = x.reshape(self.grad_accum, x.shape[0] // self.grad_accum, x.shape[1])
      out[f] = jax.make_array_from_process_local_data(
          self.batch_sharding, local, (self.grad_accum, self.micro_batch, x.shape[1]))
    return out

  def _loss_sum(self, params, micro: dict[str, jax.Array]):
    model = self.model(params)
    hidden_btd = model(micro["tokens"], micro["positions"], micro["segment_ids"],
                       micro["branch_ids"], return_hidden=True)
    w_dv = model.unembedding().astype(self.model_config.jnp_dtype)
    t = self.config.train
    return loss_sum_and_count(
        hidden_btd, w_dv, micro["targets"], micro["loss_mask"], micro["label_ids"],
        normalize=t.normalize, z_loss=float(t.z_loss),
        chunk_size=int(t.loss_chunk_size) if t.loss_chunked else 0)[0]

  def _train_step(self, state: TrainState, batch: dict[str, jax.Array]):
    a, m, t = batch["tokens"].shape
    weights = token_weights(batch["loss_mask"].reshape(a * m, t),
                            batch["label_ids"].reshape(a * m, t), self.config.train.normalize)
    count = jnp.sum(weights)  # the global count: every micro-batch divides by it once
    scale = jnp.where(count > 0, 1.0 / jnp.maximum(count, 1e-6), 0.0)
    grad_fn = jax.value_and_grad(lambda p, micro: self._loss_sum(p, micro) * scale)
    if a == 1:
      loss, grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch))
    else:
      def accumulate(carry, micro):
        # The barrier ties the params to each micro-batch: without it XLA hoists their FSDP
        # all-gather out of the loop, and the whole gathered model stays live through it
        # (XLA:CPU, 8B at fsdp=8: 2.4 GB of temporaries per layer, 1.5 with the barrier).
        params = jax.lax.optimization_barrier((state.params, micro))[0]
        loss_i, grads_i = grad_fn(params, micro)
        return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, batch)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    lr = self.learning_rate(state.step)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
    metrics = {"loss": loss, "count": count, "lr": lr, "grad_norm": optax.tree.norm(grads),
               "trained_tokens": jnp.sum(batch["loss_mask"] > 0),
               "tokens": jnp.sum(batch["segment_ids"] > 0)}
    return TrainState(params, opt_state, state.step + 1, state.rng), metrics

  def step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (from `global_batch`); `state` is donated."""
    with jax.set_mesh(self.mesh):
      return self._step(state, batch)

  def lower_step(self, batch: dict[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
    """The jitted step lowered for the abstract state and `batch` (shapes with shardings):
    nothing is allocated or run. `dagger-jax plan` compiles it for XLA's memory analysis."""
    with jax.set_mesh(self.mesh):
      return self._step.lower(self.abstract_state, batch)


# ------------------------------------------------------------------------------- the training run


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  round_index: int
  steps: int  # steps taken in this round (== config.train.steps when complete)
  checkpoint_dir: str
  history: list[dict[str, float]]  # the logged metrics: `step` (in the round), `global_step`, ...
  step_offset: int = 0  # TensorBoard's step before this round's first (`global_step_offset`)


def initial_state(trainer: Trainer, config: Any, workdir: str, round_index: int, reader,
                  ckpt: checkpoint.Checkpointer, log: Callable[[str], None]) -> TrainState:
  """Resume this round, continue from the previous round, or start from the base model."""
  if ckpt.latest_step() is not None:
    arrays, meta = ckpt.restore(trainer.abstract_state)
    if meta["round"] != round_index:
      raise params_io.CheckpointError(f"{ckpt.directory}: checkpoint of round {meta['round']}, "
                                      f"expected round {round_index}")
    reader.restore(meta["data_cursor"])
    log(f"resuming round {round_index} at step {meta['step']} from {ckpt.directory}")
    step, rng = jax.device_put((np.int32(meta["step"]), np.asarray(meta["rng"], np.uint32)),
                               trainer.replicated)
    return TrainState(arrays["params"], arrays["opt_state"], step, rng)
  seed = int(config.seed)
  if config.train.continue_from == "last" and round_index > 0:
    previous = checkpoint.Checkpointer(RunDir(workdir).checkpoints(round_index - 1),
                                       keep=config.train.keep_checkpoints, async_save=False)
    if previous.latest_step() is None:
      raise params_io.CheckpointError(
          f"config.train.continue_from='last' but round {round_index - 1} has no checkpoint in "
          f"{previous.directory} (use --config.train.continue_from=base to start from the base "
          f"model)")
    arrays, _ = previous.restore(trainer.abstract_state, items=("params", "opt_state"))
    previous.close()
    log(f"round {round_index}: continuing from {previous.directory}")
    return trainer.state_from_params(arrays["params"], seed, arrays["opt_state"])
  if config.model.init_from:
    log(f"round {round_index}: base model from {config.model.init_from}")
    model = loader.load_model(config.model.init_from, trainer.model_config, mesh=trainer.mesh)
    return trainer.state_from_params(params_io.pure_params(model), seed)
  log(f"round {round_index}: random init from seed {seed}")
  return trainer.init_state(seed)


def train(config: Any, shard_dirs: Sequence[str], *, workdir: str, round_index: int = 0,
          log: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
  """Trains `config.train.steps` steps of round `round_index` on `shard_dirs` (see module doc).

  Logged rows (`TrainResult.history`, and `train/*` in TensorBoard at `global_step`) come every
  `config.train.log_every` steps, at the last step and at a process's first step. With round 0
  of 6 steps done and `steps=10, log_every=5`, round 1 logs `step` 1, 5, 10 at `global_step` 7,
  11, 16; killed after step 7 (checkpoint at 5) and resumed, it logs 6, 10 at 12, 16, and its
  history is 1, 5 (kept in the checkpoint's meta), 6, 10: a round resumed from its last
  checkpoint, with no step left, still reports the loss of its last step.
  """
  t = config.train
  mesh = mesh_from_config(config.mesh)
  trainer = Trainer(config, mesh)
  reader = ShardReader.from_config(shard_dirs, config, jax.process_index(), jax.process_count())
  ckpt = checkpoint.Checkpointer(RunDir(workdir).checkpoints(round_index),
                                 keep=t.keep_checkpoints, async_save=t.async_checkpoint)
  state = initial_state(trainer, config, workdir, round_index, reader, ckpt, log)
  # a resumed round keeps what its killed process logged up to the checkpoint (`history`)
  history: list[dict[str, float]] = ckpt.meta().get("history", []) if int(state.step) else []
  params_io.write_model_config(trainer.model_config, ckpt.directory)  # loadable by load_params
  tokenizer_dir = reader.shards[0].manifest.get("tokenizer_dir")
  if jax.process_index() == 0 and tokenizer_dir and paths.isdir(tokenizer_dir):
    # the checkpoint carries its tokenizer: `generate --ckpt` and `export-hf` find it there
    params_io.keep_hf_files(tokenizer_dir, ckpt.directory, hf.EXTRA_FILES)
  start = int(state.step)
  offset = global_step_offset(workdir, round_index, t.steps)
  chief = jax.process_index() == 0
  writer = None
  if chief:  # a resumed round hides what the killed process logged after its checkpoint
    writer = paths.summary_writer(RunDir(workdir).tensorboard,
                                  purge_step=offset + start + 1 if start else None,
                                  filename_suffix=f".round_{round_index:03d}")  # unique per second
  flops = flops_per_token(trainer.model_config, reader.row_len)
  peak = (float(t.peak_tflops) * 1e12 or peak_flops(mesh)) if chief else 0.0
  bar = tqdm(total=t.steps, initial=start, disable=not (progress and chief), desc="train",
             dynamic_ncols=True)
  last_time, last_step = time.perf_counter(), start
  try:
    for step in range(start, t.steps):
      state, metrics = trainer.step(state, trainer.global_batch(reader.next_batch()))
      done = step + 1
      faults.point("train_step")
      if done % t.log_every == 0 or done == t.steps or done == start + 1:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if done > start + 1:  # the first step of a process includes compilation
          seconds = (now - last_time) / (done - last_step)
          slots = t.batch_size * reader.row_len
          metrics.update(step_time=seconds, tokens_per_s=slots / seconds,
                         mfu=flops * slots / seconds / peak if peak else 0.0)
        else:
          metrics["compile_and_first_step_s"] = now - last_time
        last_time, last_step = now, done
        history.append({"step": done, "global_step": offset + done, **metrics})
        if writer is not None:
          for k, v in metrics.items():
            writer.add_scalar(f"train/{k}", v, offset + done)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
      bar.update(1)
      if done % t.checkpoint_every == 0 or done == t.steps:
        ckpt.save(state, data_cursor=reader.state(), round_index=round_index,
                  force=done == t.steps, history=history)
        faults.point("checkpoint_save")
  finally:
    bar.close()
    ckpt.close()
    if writer is not None:
      writer.close()
  return TrainResult(state, round_index, int(state.step), ckpt.directory, history, offset)


@functools.lru_cache(maxsize=None)
def _measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """Float32 matmul FLOP/s of one device, measured (a CPU has no datasheet peak for XLA)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops(mesh: jax.sharding.Mesh) -> float:
  """Peak FLOP/s for the MFU estimate when `config.train.peak_tflops` is not set. CPU: the
  measured float32 matmul rate (simulated CPU devices share the same cores, so it is counted
  once); accelerators: 0 (unknown; MFU is then logged as 0)."""
  platform = mesh.devices.flat[0].platform
  if platform == "cpu":
    return _measured_matmul_flops()
  return 0.0
