"""A memory and time plan of a training config, from shapes and the compiler: nothing allocated.

    dagger-jax plan --config configs/qwen3_8b_swe.py --mesh data=1,fsdp=64,tensor=1 --device v5p
    dagger-jax plan --config configs/qwen3_4b_swe.py --mesh fsdp=8 --device h100 --json

Library use (what the verb calls; `config` as `dagger_jax.configlib.load` returns it):

    p = make_plan(config, mesh="data=1,fsdp=64,tensor=1", device="v5p", mfu=0.4)
    print(p.render())            # or p.to_json(); p.fits, p.fixes

What it reports, per device of the mesh:
  params, opt_state, grads  exact, from the sharded abstract train state that `trainer.Trainer`
                            builds (`jax.eval_shape`: shapes, dtypes and shardings only). Adam's
                            moments are kept in the param dtype; norm scales are replicated.
  activations               the XLA compiler's temporary bytes of the real train step (the
                            jitted `Trainer` step, lowered with abstract state and batch and
                            compiled ahead of time on a simulated CPU mesh of the same size)
                            minus the gradients: everything the step keeps between the forward
                            and the backward pass, and its transients. What a layer keeps is
                            `config.train.remat`'s choice; the attention is the one
                            `config.model.attention` picks on `--device`'s platform
                            (`planned_attention`): on a TPU or GPU a flash attention that keeps
                            O(max_len) per layer, on CPU xla_blocks, whose float32 probabilities
                            grow with max_len squared (that term is shown exactly from the
                            code's shapes next to the compiler's figure).
  other                     the batch, the step's metrics and generated code (from the compiler).
  total                     the compiler's argument + output - aliased + temp + code bytes;
                            params + opt_state + grads + activations + other add up to it.
And per step: model FLOPs (`trainer.flops_per_token`, the convention of the trainer's logged MFU),
the compiler's own FLOP count, and the step time at a stated MFU on `--device` (`DEVICES`).
The plan fits when the total is at most the device's memory; otherwise `Plan.fixes` name what to
change, with figures (more fsdp, bf16 params, fewer rows per device, a shorter max_len, the
chunked loss), and the verb exits 1.

Reduced depth, scaled per layer. The layers are a Python loop (no scan), and xla_blocks (the
CPU attention) is unrolled over 128-token query blocks, so XLA:CPU's compile time grows with
max_len: on a 2-core machine one layer of Qwen3-4B at 32768 tokens on 64 simulated devices takes
~1 min to compile (8192 tokens: ~15 s), and 36 layers are out of reach (flash_jax's loops compile
in seconds at any length). The plan therefore compiles the step at the
full length, width and mesh but with 1 and 2 layers (both at once: XLA compiles without the GIL;
~2-3 min in all at 32768 tokens on 2 cores) and scales every compiler figure linearly to the
config's depth: x(L) = x(1) + (L - 1) * (x(2) - x(1)). The difference is what one more layer
keeps; one layer's transients are counted once. For a 6-layer test model the scaled temp bytes
are within 0.1% of a full-depth compile's (tests/test_plan.py), and the scaled argument bytes are
checked against the exact state and batch on every plan. `full_depth=True` (`--full-depth`)
compiles the real depth instead. LLVM's optimisations are off for these compiles: the memory and
cost analyses come before code generation and do not change; the compile takes ~2.5x less time.
XLA:CPU's `cse_barrier_expander` pass is off too: it drops the optimization barriers that keep
remat's recomputation apart from the forward pass, after which CSE merges the two and remat
saves nothing (measured: the same temp bytes with and without it). TPU and GPU compilers keep
the barriers; so does the plan.

Caveat: the figures are XLA:CPU's buffer assignment of the same program. A TPU or GPU compiler
fuses and schedules differently, so its temporaries differ; the exact state figures do not. The
Pallas kernels (`model.attention=pallas`) do not compile for XLA:CPU: a plan compiles flash_jax
in their place, which keeps the same residuals (q, k, v, the output and a log-sum-exp).
When the state alone cannot fit, or with `use_compiler=False` (`--no-compile`), nothing is
compiled and activations are a lower bound from shapes (`activation_estimate`).

The simulated mesh needs N CPU devices before JAX starts its backend. The CLI verb sets them
(`configure_cpu_devices`); `make_plan` plans in this process when JAX already has N CPU devices
(or more: it takes the first N), else in a child process (`python -m dagger_jax.train.plan`)
started with `XLA_FLAGS=--xla_force_host_platform_device_count=N`.

Why one file of ~700 lines: the mesh, the exact state, the compiles, the depth scaling, the fixes
and the report each feed the next, and are read in that order.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from dagger_jax.errors import ConfigError, DaggerJaxError, UsageError
from dagger_jax.model import attention as attention_lib
from dagger_jax.model import qwen3, reshard, sharding
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.train import trainer as trainer_lib

GiB = 2 ** 30


class PlanError(DaggerJaxError, RuntimeError):
  """The plan could not be made (bad mesh, failed child process); the message says why."""


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  name: str
  hbm_bytes: int  # memory per device
  peak_flops: float  # dense bf16 FLOP/s per device
  source: str
  platform: str = "cpu"  # the JAX platform: what `config.model.attention=auto` resolves against


# Per-device memory and dense bf16 peak (one JAX device = one chip or GPU). Sources:
#   v5p   Cloud TPU v5p docs (cloud.google.com/tpu/docs/v5p-training), key specifications per
#         chip: "Peak compute per chip (bf16) 459 TFLOPs", "HBM2e capacity 95GB" (taken as GiB).
#   h100  NVIDIA H100 datasheet, SXM5: 80 GB HBM3, 989 TFLOP/s bf16 dense (1979 is with 2:4
#         sparsity); nvidia-smi shows ~79.6 GiB.
#   h200  NVIDIA H200 datasheet: 141 GB HBM3e, 989 TFLOP/s bf16 dense (the H100's compute);
#         nvidia-smi shows ~140.4 GiB.
# On GPUs JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of this; set it to ~0.95
# for a plan's figures to be usable.
DEVICES: dict[str, DeviceSpec] = {
    "v5p": DeviceSpec("TPU v5p", 95 * GiB, 459e12, "cloud.google.com/tpu/docs/v5p-training",
                      "tpu"),
    "h100": DeviceSpec("H100 SXM", 80 * GiB, 989e12, "NVIDIA H100 datasheet (dense bf16)", "gpu"),
    "h200": DeviceSpec("H200", 141 * GiB, 989e12, "NVIDIA H200 datasheet (dense bf16)", "gpu"),
}
DEVICE_CHOICES = (*DEVICES, "cpu")

# XLA:CPU options for the plan's compiles: the memory and cost analyses come from the HLO passes
# and buffer assignment, before LLVM, and are the same without its optimisations; remat's
# optimization barriers are kept, as TPU and GPU compilers keep them (see the module doc).
FAST_CODEGEN = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_disable_hlo_passes": "cse_barrier_expander"}

# The batch the step reads (`trainer.BATCH_FIELDS`), as the shards store it (data/shards.py).
BATCH_DTYPES = {"loss_mask": jnp.uint8}  # every other field is int32

_MEM_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def device_spec(name: str, config: Any = None, mesh: jax.sharding.Mesh | None = None
                ) -> DeviceSpec:
  """`DEVICES[name]`, or for "cpu" this machine: its RAM, and `config.train.peak_tflops` or the
  measured float32 matmul rate (`trainer.peak_flops`, which needs `mesh`)."""
  if name in DEVICES:
    return DEVICES[name]
  if name != "cpu":
    raise UsageError(f"--device {name}: unknown; choose one of {', '.join(DEVICE_CHOICES)}")
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  stated = float(config.train.peak_tflops) * 1e12 if config is not None else 0.0
  if stated:
    return DeviceSpec("cpu (this machine)", ram, stated, "RAM of this machine; "
                      "config.train.peak_tflops")
  peak = trainer_lib.peak_flops(mesh) if mesh is not None else 0.0
  return DeviceSpec("cpu (this machine)", ram, peak,
                    "RAM of this machine; measured float32 matmul rate")


# ----------------------------------------------------------------------------------- the mesh


def _named_sizes(spec: str) -> list[int] | None:
  sizes = []
  for item in spec.split(","):
    _, sep, size = item.partition("=")
    try:
      sizes.append(int(size))
    except ValueError:
      return None
    if not sep:
      return None
  return sizes


def resolve_mesh(spec: str | None, config_mesh: Any, num_devices: int | None = None
                 ) -> dict[str, int]:
  """The planned mesh: `--mesh` (`data=1,fsdp=64,tensor=1`, as `reshard.parse_mesh` reads it)
  or `config.mesh`; a -1 (fill) axis needs `num_devices`.

  >>> resolve_mesh("fsdp=64", None)
  {'data': 1, 'fsdp': 64, 'tensor': 1}
  """
  if spec:
    if num_devices is None:
      sizes = _named_sizes(spec)
      if sizes is not None and -1 in sizes:
        raise UsageError(f"--mesh {spec}: an axis of -1 fills the devices, which a plan does not "
                         f"have; name every size (e.g. data=1,fsdp=64,tensor=1) or give "
                         f"--num-devices N")
      num_devices = math.prod(s for s in sizes if s > 0) if sizes else 1
    try:
      return reshard.parse_mesh(spec, num_devices)
    except ConfigError as e:
      raise UsageError(str(e).replace(f"config.rollout.mesh={spec!r}", f"--mesh {spec}")
                       .replace(" ('' = the training mesh)", "")
                       .replace("devices JAX sees", "devices planned")) from None
  sizes = {a: int(config_mesh[a]) for a in sharding.MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if fill and num_devices is None:
    m = ",".join(f"{a}={s}" for a, s in sizes.items())
    raise UsageError(f"config.mesh is {m}: {fill[0]}=-1 takes the devices of the machine the "
                     f"run gets; say which: --mesh data=1,fsdp=64,tensor=1 (or --num-devices N)")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise UsageError(f"--num-devices {num_devices} is not a multiple of config.mesh's {known}")
    sizes[fill[0]] = num_devices // known
  elif num_devices is not None and known != num_devices:
    raise UsageError(f"config.mesh uses {known} devices, not --num-devices {num_devices}")
  return sizes


def configure_cpu_devices(n: int) -> bool:
  """Before JAX starts its backend: plan on `n` simulated CPU devices in this process (no
  accelerator is touched). False once the backend is running (then `make_plan` uses a child)."""
  try:
    jax.config.update("jax_num_cpu_devices", int(n))  # refused once the backend has started
  except RuntimeError:
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


# ------------------------------------------------------------------------ shapes and compiles


def _shard_bytes(tree: Any) -> int:
  """Bytes of one device's shards of an abstract tree with shardings (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def abstract_batch(trainer: trainer_lib.Trainer, max_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch `Trainer.step` takes, as shapes: [grad_accum, micro_batch, max_len]."""
  shape = (trainer.grad_accum, trainer.micro_batch, int(max_len))
  return {f: jax.ShapeDtypeStruct(shape, BATCH_DTYPES.get(f, jnp.int32),
                                  sharding=trainer.batch_sharding)
          for f in trainer_lib.BATCH_FIELDS}


def lower_step(config: Any, mesh: jax.sharding.Mesh, num_layers: int | None = None
               ) -> jax.stages.Lowered:
  """The real train step for `config` (at `num_layers` layers if given), lowered from abstract
  state and batch: `trainer.Trainer`'s own jitted step, with its shardings and donation."""
  config = ml_collections.ConfigDict(config.to_dict())
  if num_layers is not None:
    config.model.num_layers = int(num_layers)
  trainer = trainer_lib.Trainer(config, mesh)
  return trainer.lower_step(abstract_batch(trainer, config.data.max_len))


def analyse(lowered: jax.stages.Lowered) -> dict[str, float]:
  """Compiles (nothing is allocated or run) and returns XLA's memory analysis (bytes per
  device), its FLOP count (per device) and the compile seconds."""
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options=FAST_CODEGEN)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {k: float(getattr(memory, f"{k}_size_in_bytes")) for k in _MEM_FIELDS}
  out.update(flops=float((cost or {}).get("flops", 0.0)), seconds=seconds)
  return out


def compile_step(config: Any, mesh: jax.sharding.Mesh, num_layers: int | None = None
                 ) -> dict[str, float]:
  """`analyse(lower_step(...))`."""
  return analyse(lower_step(config, mesh, num_layers))


def _scaled(one: dict[str, float], two: dict[str, float], layers: int) -> dict[str, float]:
  """x(L) = x(1) + (L - 1)(x(2) - x(1)) for every linear figure; code size is not linear."""
  out = {k: one[k] + (layers - 1) * (two[k] - one[k]) for k in (*_MEM_FIELDS, "flops")}
  out["generated_code"] = max(one["generated_code"], two["generated_code"])
  return out


def attention_block() -> int:
  """The query block of the training attention (`qwen3.causal_block_attention`'s default)."""
  return int(inspect.signature(qwen3.causal_block_attention).parameters["block"].default)


def planned_attention(config: Any, platform: str) -> tuple[str, str]:
  """(the implementation `config.model.attention` picks on `platform`, the one the plan
  compiles in its place on XLA:CPU: flash_jax for pallas, else the same)."""
  chosen = attention_lib.resolve(str(config.model.get("attention", "auto")), platform)
  return chosen, "flash_jax" if chosen == "pallas" else chosen


def remat_mode(config: Any) -> str:
  return str(config.train.get("remat", "none"))


def attention_bytes(c: Qwen3Config, rows: int, t: int, tensor: int = 1,
                    implementation: str = "xla_blocks", remat: str = "none") -> dict[str, Any]:
  """What the training attention keeps per device, from the code's shapes. xla_blocks: each
  layer's float32 probabilities of every query block against the keys up to its end
  (`_block_attention_fwd` saves them for the backward pass; with remat, one layer's at a time)
  and the model's one [b, 1, t, t] float32 mask bias (`attention_bias`): both grow with t^2.
  flash_jax and pallas: no t^2 term; each layer keeps a float32 log-sum-exp per query (`lse`;
  q, k, v and the output are counted with the per-token residuals). `tensor` splits the heads
  when it divides them."""
  heads = c.num_heads // tensor if c.num_heads % tensor == 0 and c.num_kv_heads % tensor == 0 \
      else c.num_heads
  layers_kept = c.num_layers if remat == "none" else 1
  if implementation != "xla_blocks":
    return {"implementation": implementation, "probs_per_layer": 0, "probs": 0, "mask_bias": 0,
            "lse": rows * heads * t * 4 * layers_kept, "block": attention_lib.FLASH_BLOCK}
  block = attention_block()
  pairs = sum((min(s + block, t) - s) * min(s + block, t) for s in range(0, t, block))
  per_layer = rows * heads * pairs * 4
  return {"implementation": implementation, "probs_per_layer": per_layer,
          "probs": per_layer * layers_kept, "mask_bias": rows * t * t * 4, "lse": 0,
          "block": block}


def activation_estimate(c: Qwen3Config, rows: int, t: int, train: Any, tensor: int = 1,
                        implementation: str = "xla_blocks") -> dict[str, int]:
  """A lower bound of the activations from shapes (no compiler): the attention's terms
  (`attention_bytes`), each layer's per-token residuals that the backward pass reads, the final
  hidden states and the float32 logits with their softmax (one chunk of them when chunked).
  A layer keeps (`train.remat`): none, everything (block input, normed inputs, q and k before
  and after norm and rotary, v, attention output, MLP gate/up and hidden); dots, its input and
  its matmul outputs (q, k, v, o, gate/up, down); full, its input; with remat one layer's full
  set exists at a time, in its backward pass."""
  e = jnp.dtype(c.jnp_dtype).itemsize
  d, h, f = c.hidden_size, c.head_dim, c.intermediate_size
  remat = str(train.get("remat", "none"))
  everything = e * (4 * d + 3 * (c.num_heads + c.num_kv_heads) * h // tensor + 3 * f // tensor)
  kept = {"none": everything, "full": e * d,
          "dots": e * (3 * d + (c.num_heads + 2 * c.num_kv_heads) * h // tensor + 2 * f // tensor)
          }[remat]
  per_token = kept * c.num_layers + (everything if remat != "none" else 0)
  attn = attention_bytes(c, rows, t, tensor, implementation, remat)
  logits_len = min(int(train.loss_chunk_size), t) if train.loss_chunked else t
  out = {"attention_probs": attn["probs"], "mask_bias": attn["mask_bias"],
         "attention_lse": attn["lse"], "per_token_residuals": rows * t * per_token,
         "final_hidden": rows * t * d * e,
         "logits": 2 * rows * logits_len * c.vocab_size * 4 // tensor}
  out["total"] = sum(out.values())
  return out


# ---------------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
  """Everything the verb prints; JSON-able (`to_json`), rebuilt from it by `Plan(**d)`."""
  config_name: str
  model: dict[str, Any]  # dims, num_params, dtypes
  mesh: dict[str, int]
  device: dict[str, Any]  # DeviceSpec fields
  batch: dict[str, Any]  # batch_size, grad_accum, max_len, rows per device, loss form
  remat: str
  per_device_bytes: dict[str, int]  # params, opt_state, grads, activations, other, total
  attention: dict[str, Any]  # attention_bytes(...): implementation, probs, mask_bias, lse
  activation_estimate: dict[str, int]  # activation_estimate(...)
  compiler: dict[str, Any] | None  # scaled memory analysis + compiled depths, None if skipped
  step_flops: float  # model FLOPs of one optimizer step, all devices
  compiler_flops: float | None  # XLA's count, all devices (scaled), None if not compiled
  mfu: float
  step_time_s: float | None  # None when the device's peak is unknown
  fits: bool
  fixes: list[str]
  notes: list[str]

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh.values())

  def to_json(self) -> dict[str, Any]:
    return {"fits": self.fits, "per_device_bytes": self.per_device_bytes,
            "device_bytes": self.device["hbm_bytes"], "step_flops": self.step_flops,
            **{k: v for k, v in dataclasses.asdict(self).items()
               if k not in ("fits", "per_device_bytes", "step_flops")}}

  def message(self) -> str:
    """One paragraph for a plan that does not fit: the shortfall and what to change."""
    total, cap = self.per_device_bytes["total"], self.device["hbm_bytes"]
    return (f"{self.config_name} does not fit: {_gib(total)} GiB per device, a "
            f"{self.device['name']} has {_gib(cap)} GiB. Change: " + "; ".join(self.fixes))

  def render(self) -> str:
    m, b, pd = self.model, self.batch, self.per_device_bytes
    mesh = ",".join(f"{a}={s}" for a, s in self.mesh.items())
    dev = self.device
    lines = [
        f"plan: {self.config_name}: Qwen3 {m['num_layers']} layers, d={m['hidden_size']}, "
        f"{m['num_params'] / 1e9:.2f} B params (param_dtype {m['param_dtype']}, "
        f"dtype {m['dtype']})",
        f"mesh: {mesh} ({self.num_devices} devices); device: {dev['name']}, "
        f"{_gib(dev['hbm_bytes'])} GiB, {dev['peak_flops'] / 1e12:.3g} TFLOP/s peak "
        f"({dev['source']})",
        f"batch: {b['batch_size']} rows x {b['max_len']} tokens, grad_accum {b['grad_accum']}: "
        f"{b['rows_per_device']} row(s) per device per micro-batch; loss {b['loss']}",
        f"remat: {self.remat}",
        "",
        f"{'per device':<54}GiB",
    ]
    a = self.attention
    est = self.activation_estimate
    how = "compiler temp - grads" if self.compiler else "lower bound, not compiled"
    impl = a.get("implementation", "xla_blocks")
    kept = m["num_layers"] if self.remat.split()[0] == "none" else 1
    attention_rows = ([(f"  attention probs ({impl}, fp32, {kept} layers)", a["probs"]),
                       ("  attention mask bias [b,1,t,t] fp32", a["mask_bias"])]
                      if impl == "xla_blocks" else
                      [(f"  attention lse ({impl}, fp32, {kept} layers)", a["lse"])])
    attention_total = a["probs"] + a["mask_bias"] + a.get("lse", 0)
    rows = [("params", pd["params"]), ("optimizer state (Adam mu, nu)", pd["opt_state"]),
            ("gradients", pd["grads"]), (f"activations ({how})", pd["activations"]),
            *attention_rows,
            ("  per-token residuals (lower bound)", est["per_token_residuals"]),
            *([("  the rest (the compiler's transients, logits)",
                pd["activations"] - attention_total - est["per_token_residuals"])]
              if self.compiler else []),
            ("other (batch, metrics, code)", pd["other"]), ("total", pd["total"])]
    lines += [f"  {name:<50}{_gib(v):>8}" for name, v in rows]
    verdict = "fits" if self.fits else "DOES NOT FIT"
    lines.append(f"  {verdict}: {100 * pd['total'] / dev['hbm_bytes']:.0f}% of "
                 f"{_gib(dev['hbm_bytes'])} GiB")
    if self.compiler:
      c = self.compiler
      depth = ("at full depth" if c["compiled_layers"] == [m["num_layers"]] else
               f"at {' and '.join(map(str, c['compiled_layers']))} layers, scaled per layer to "
               f"{m['num_layers']}")
      lines += ["", f"compiler: XLA:CPU memory analysis of the train step on {self.num_devices} "
                f"simulated devices, compiled {depth} ({c['compile_seconds']:.0f} s):"]
      lines += [f"  {k + ' bytes':<50}{_gib(c[k]):>8}" for k in _MEM_FIELDS]
      lines.append(f"  {'one more layer adds (temp)':<50}{_gib(c['temp_per_layer']):>8}")
    lines += ["", f"step: {_flop(self.step_flops)} model FLOPs (6 x params + attention, per "
              f"optimizer step)" + (f"; the compiler counts {_flop(self.compiler_flops)}"
                                    if self.compiler_flops else ""),
              f"  at MFU {self.mfu:.2f} on {self.num_devices} x {dev['name']}: " + (
                  f"{self.step_time_s:.2f} s per step" if self.step_time_s else
                  "unknown (no peak FLOP/s for this device)")]
    if self.notes:
      lines += ["", "notes:", *(f"  - {n}" for n in self.notes)]
    if not self.fits:
      lines += ["", "does not fit; change:", *(f"  - {f}" for f in self.fixes)]
    return "\n".join(lines)


def _gib(x: float) -> str:
  g = x / GiB
  return f"{g:.0f}" if abs(g) >= 100 else f"{g:.2f}" if abs(g) >= 1 else f"{g:.3g}"


def _flop(x: float) -> str:
  exp = min(max(int(math.log10(max(x, 1.0))) // 3, 0), 6)
  return f"{x / 10 ** (3 * exp):.1f} {['', 'K', 'M', 'G', 'T', 'P', 'E'][exp]}FLOP"


_REMAT_WORDS = {
    "none": "every layer keeps its residuals for the backward pass",
    "dots": "every layer keeps its input and matmul outputs and recomputes the rest",
    "full": "every layer keeps its input and is recomputed in the backward pass",
}


def _remat(config: Any) -> str:
  mode = remat_mode(config)
  return f"{mode} (config.train.remat: {_REMAT_WORDS[mode]})"


def _fixes(config: Any, p: dict[str, Any], mesh: dict[str, int]) -> list[str]:
  """What to change, with figures, for a plan whose total exceeds the device."""
  pd, cap = p["per_device_bytes"], p["device"]["hbm_bytes"]
  state = pd["params"] + pd["opt_state"] + pd["grads"]
  fsdp, rows, t = mesh["fsdp"], p["batch"]["rows_per_device"], p["batch"]["max_len"]
  fixes = []
  if state > 0.5 * cap:  # the state should leave at least half the device to activations
    need = fsdp
    while state * fsdp / need > 0.5 * cap and need < 1 << 16:
      need *= 2
    fixes.append(f"more fsdp: params + optimizer state + gradients take {_gib(state)} GiB per "
                 f"device at fsdp={fsdp}; --mesh data={mesh['data']},fsdp={need},"
                 f"tensor={mesh['tensor']} makes them ~{_gib(state * fsdp / need)} GiB")
    if config.model.param_dtype == "float32":
      fixes.append(f"--config.model.param_dtype=bfloat16: params, Adam's moments (kept in the "
                   f"param dtype) and gradients in bf16 halve the state to {_gib(state / 2)} GiB "
                   f"(at the cost of update precision)")
    state = min(state, 0.5 * cap)
  act = pd["activations"] + pd["other"]
  room = cap - state
  if act > room:
    if rows > 1:
      k = next((k for k in range(2, rows + 1) if rows % k == 0 and act / k <= room), rows)
      fixes.append(f"fewer rows per device: {rows} rows of {t} tokens per device per micro-batch "
                   f"keep {_gib(act)} GiB of activations; --config.train.grad_accum="
                   f"{k * int(config.train.grad_accum)} (or a smaller --config.train.batch_size, "
                   f"or more devices) makes {rows // k} row(s)" + (
                       f", ~{_gib(act * (rows // k) / rows)} GiB: not enough alone"
                       if act / k > room else ""))
    if remat_mode(config) == "none":
      per_layer = p["activation_estimate"]["per_token_residuals"] / max(p["model"]["num_layers"], 1)
      fixes.append(f"--config.train.remat=full: each layer keeps only its input and is recomputed "
                   f"in the backward pass (the per-token residuals, {_gib(per_layer)} GiB per "
                   f"layer, then exist for one layer at a time; ~1/3 more compute), or "
                   f"--config.train.remat=dots (keeps the matmul outputs)")
    a = p["attention"]
    if a.get("implementation", "xla_blocks") == "xla_blocks":
      fixes.append(f"--config.model.attention=flash_jax (or pallas on a TPU/GPU): no t x t "
                   f"probabilities or mask ({_gib(a['probs'] + a['mask_bias'])} GiB here); "
                   f"activations grow linearly with max_len")
    # per row: the t^2 part (probabilities, mask) scales with max_len squared, the rest ~linearly
    quad = min(p["attention"]["probs"] + p["attention"]["mask_bias"], act) / rows
    lin = act / rows - quad
    short = t
    while short > 1024 and quad * (short / t) ** 2 + lin * short / t > room:
      short //= 2
    if quad * (short / t) ** 2 + lin * short / t > room:
      guess = f"even {short} does not fit by this estimate"
    else:
      guess = f"about {short} by a rough estimate (plan it again)"
    if rows > 1:
      guess += " at 1 row per device"
    why = (f"the attention's float32 probabilities ({_gib(p['attention']['probs'])} GiB of the "
           f"{_gib(act)} GiB at {t} tokens) grow with max_len squared" if quad else
           f"activations ({_gib(act)} GiB at {t} tokens) grow linearly with max_len")
    fixes.append(f"a shorter --config.data.max_len: {why}; {guess}" + (
        "; with 1 row per device, more devices or a smaller batch do not help"
        if rows == 1 else ""))
    if not config.train.loss_chunked:
      fixes.append(f"--config.train.loss_chunked=True: the plain loss materialises float32 "
                   f"logits of every position ({_gib(p['activation_estimate']['logits'])} GiB)")
  return fixes


def compile_scaled(config: Any, mesh: jax.sharding.Mesh, *, full_depth: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """The compiler's figures for the config's depth: compiled at 1 and 2 layers (both at once:
  XLA compiles without the GIL) and scaled per layer, or at the full depth. Bytes per device,
  `flops` per device, `temp_per_layer`, `compiled_layers`, `compile_seconds`, and the `runs`."""
  layers = int(config.model.num_layers)
  depths = [layers] if full_depth or layers <= 2 else [1, 2]
  log(f"plan: compiling the train step at {' and '.join(map(str, depths))} layer(s), "
      f"{config.data.max_len} tokens, {mesh.size} devices (minutes at 32k tokens: XLA may "
      f"warn of a slow compile)...")
  lowered = [lower_step(config, mesh, depth) for depth in depths]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    runs = list(pool.map(analyse, lowered))
  seconds = time.perf_counter() - start
  log(f"plan: compiled in {seconds:.0f} s")
  scaled = runs[0] if len(runs) == 1 else _scaled(runs[0], runs[1], layers)
  out: dict[str, Any] = {k: int(scaled[k]) for k in _MEM_FIELDS}
  out.update(flops=scaled["flops"], compiled_layers=depths, compile_seconds=seconds, runs=runs,
             temp_per_layer=int(runs[1]["temp"] - runs[0]["temp"]) if len(runs) == 2
             else int(scaled["temp"] / layers))
  return out


def plan_here(config: Any, mesh_sizes: dict[str, int], *, device: str = "v5p", mfu: float = 0.4,
              use_compiler: bool = True, full_depth: bool = False,
              log: Callable[[str], None] | None = None) -> Plan:
  """The plan on this process's first N CPU devices (N = the mesh's size; see module doc)."""
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  n = math.prod(mesh_sizes.values())
  devices = jax.devices()
  if len(devices) < n or devices[0].platform != "cpu":
    raise PlanError(f"planning on {n} simulated CPU devices, but this process has "
                    f"{len(devices)} {devices[0].platform} devices (use make_plan)")
  mesh = sharding.make_mesh(mesh_sizes["data"], mesh_sizes["fsdp"], mesh_sizes["tensor"],
                            devices[:n])
  spec = device_spec(device, config, mesh)
  c = Qwen3Config.from_config(config.model)
  implementation, compiled_as = planned_attention(config, spec.platform)
  compile_config = ml_collections.ConfigDict(config.to_dict())
  compile_config.model.attention = compiled_as
  trainer = trainer_lib.Trainer(config, mesh)
  t, train = int(config.data.max_len), config.train
  state = trainer.abstract_state
  params, opt_state = _shard_bytes(state.params), _shard_bytes(state.opt_state)
  scalars = _shard_bytes((state.step, state.rng))
  batch = _shard_bytes(abstract_batch(trainer, t))
  rows = trainer.micro_batch // (mesh_sizes["data"] * mesh_sizes["fsdp"])
  attention = attention_bytes(c, rows, t, mesh_sizes["tensor"], implementation,
                              remat_mode(config))
  estimate = activation_estimate(c, rows, t, train, mesh_sizes["tensor"], implementation)
  notes = [f"attention: config.model.attention={config.model.get('attention', 'auto')!r} is "
           f"{implementation} on {spec.platform}" + (
               "; compiled as flash_jax (the Pallas kernels do not compile for XLA:CPU; same "
               "residuals)" if compiled_as != implementation else "")]
  grads = params  # d loss / d params: the params' shapes, dtypes and shardings
  compiler = None
  compiler_flops = None
  if not use_compiler:
    notes.append("not compiled (--no-compile): activations are a lower bound from shapes")
  elif params + opt_state + grads > spec.hbm_bytes:
    notes.append("not compiled: params, optimizer state and gradients alone exceed the device, "
                 "so activations (a lower bound from shapes here) cannot change the verdict")
  else:
    compiler = compile_scaled(compile_config, mesh, full_depth=full_depth, log=log)
    compiler_flops = compiler["flops"] * n
    exact_args = params + opt_state + scalars + batch
    if abs(compiler["argument"] - exact_args) > 0.01 * exact_args:
      notes.append(f"the compiler's arguments ({_gib(compiler['argument'])} GiB) differ from the "
                   f"exact state and batch ({_gib(exact_args)} GiB): check the scaling")
    if len(compiler["compiled_layers"]) == 2:
      notes.append(f"compiled at 1 and 2 layers and scaled to {c.num_layers} (a full-depth "
                   f"compile takes far longer on CPU; --full-depth does it)")
    notes.append("the compiler's figures are XLA:CPU's; a TPU/GPU compiler fuses and schedules "
                 "differently (its temporaries differ, the exact state does not)")
  if compiler is not None:
    total = (compiler["argument"] + compiler["output"] - compiler["alias"] + compiler["temp"]
             + compiler["generated_code"])
    activations = max(compiler["temp"] - grads, 0)
    other = total - params - opt_state - grads - activations
  else:
    activations, other = estimate["total"], batch + scalars
    total = params + opt_state + grads + activations + other
  step_flops = trainer_lib.flops_per_token(c, t) * int(train.batch_size) * t
  p = dict(
      config_name=str(config.get("name", "config")),
      model={"num_layers": c.num_layers, "hidden_size": c.hidden_size,
             "num_params": c.num_params(), "param_dtype": c.param_dtype, "dtype": c.dtype,
             "vocab_size": c.vocab_size},
      mesh=dict(mesh_sizes), device=dataclasses.asdict(spec),
      batch={"batch_size": int(train.batch_size), "grad_accum": int(train.grad_accum),
             "max_len": t, "rows_per_device": rows,
             "loss": (f"chunked ({int(train.loss_chunk_size)} positions)" if train.loss_chunked
                      else "plain (full [rows, T, V] float32 logits)")},
      remat=_remat(config),
      per_device_bytes={"params": params, "opt_state": opt_state, "grads": grads,
                        "activations": int(activations), "other": int(other),
                        "total": int(total)},
      attention=attention, activation_estimate=estimate, compiler=compiler,
      step_flops=step_flops, compiler_flops=compiler_flops, mfu=float(mfu),
      step_time_s=step_flops / (n * spec.peak_flops * mfu) if spec.peak_flops else None,
      fits=bool(total <= spec.hbm_bytes), fixes=[], notes=notes)
  if not p["fits"]:
    p["fixes"] = _fixes(config, p, mesh_sizes)
  return Plan(**p)


def _child_env(n: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={n}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
  return env


def _plan_in_child(config: Any, mesh_sizes: dict[str, int], **options) -> Plan:
  n = math.prod(mesh_sizes.values())
  request = json.dumps({"config": json.loads(config.to_json()), "mesh": mesh_sizes,
                        "options": options})
  out = subprocess.run([sys.executable, "-m", "dagger_jax.train.plan"], input=request,
                       stdout=subprocess.PIPE, text=True, env=_child_env(n), check=False)
  try:
    reply = json.loads(out.stdout.strip().splitlines()[-1])
  except (IndexError, json.JSONDecodeError):
    raise PlanError(f"the planning process on {n} simulated CPU devices failed (exit "
                    f"{out.returncode}; its error is above)") from None
  if "error" in reply:
    raise PlanError(reply["error"])
  return Plan(**reply["plan"])


def make_plan(config: Any, *, mesh: str | None = None, num_devices: int | None = None,
              device: str = "v5p", mfu: float = 0.4, use_compiler: bool = True,
              full_depth: bool = False) -> Plan:
  """The plan of `config` on `mesh` (`--mesh` syntax; None = config.mesh), in this process when
  JAX has enough CPU devices, else in a child process with its own device count."""
  if device not in DEVICE_CHOICES:
    raise UsageError(f"--device {device}: unknown; choose one of {', '.join(DEVICE_CHOICES)}")
  if not 0 < mfu <= 1:
    raise UsageError(f"--mfu {mfu}: must be in (0, 1]")
  sizes = resolve_mesh(mesh, config.mesh, num_devices)
  n = math.prod(sizes.values())
  options = dict(device=device, mfu=mfu, use_compiler=use_compiler, full_depth=full_depth)
  devices = jax.devices()
  if devices[0].platform == "cpu" and len(devices) >= n:
    return plan_here(config, sizes, **options)
  return _plan_in_child(config, sizes, **options)


def _child() -> int:
  """`python -m dagger_jax.train.plan`: a request (JSON) on stdin, a plan (JSON) on stdout."""
  request = json.loads(sys.stdin.read())
  sizes = request["mesh"]
  configure_cpu_devices(math.prod(sizes.values()))
  try:
    plan = plan_here(ml_collections.ConfigDict(request["config"]), sizes, **request["options"])
    print(json.dumps({"plan": dataclasses.asdict(plan)}))
  except DaggerJaxError as e:
    print(json.dumps({"error": str(e)}))
  return 0


if __name__ == "__main__":
  sys.exit(_child())
