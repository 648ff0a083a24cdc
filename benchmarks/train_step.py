"""Training tokens/s of our compiled step vs transformers' PyTorch Qwen3 + torch.optim.AdamW.

    python benchmarks/train_step.py [--quick]

Same configuration on both sides (hidden 256, intermediate 768, 4 layers, 4 heads, 2 kv heads,
head_dim 64, vocab 2048, tied embeddings, float32; batch 8 x 512): forward, cross-entropy over all
positions, backward, global-norm clipping at 1.0 and an AdamW update. Timings alternate between
the two frameworks round by round (medians), so a change in the machine's load hits both alike.

MFU = achieved FLOP/s / peak, with FLOPs per token = 6 * matmul params + 12 * layers * heads *
head_dim * seq_len (`trainer.flops_per_token`) and the peak = the best float32 matmul rate
measured in this run (JAX and torch, 2048^3). The last line printed is one JSON object.

Host memory: by default both sides run after `dagger_jax.hostmem.keep_host_memory()` (what the
`dagger-jax` CLI does), so freed host memory is reused rather than mmapped and faulted in afresh
every step; `--system-malloc` leaves glibc's defaults (XLA's step then spends ~0.3 s per step
in the kernel faulting pages, PyTorch's ~0.14 s).

On a loaded machine the wall-clock ratio flatters us: torch's OpenMP threads busy-wait and lose
far more to other processes than XLA's pool does. The JSON also carries process CPU seconds per
step, which load changes much less (run with OMP_WAIT_POLICY=PASSIVE so that torch's spinning
is not counted as work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from dagger_jax import configlib, hostmem
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.train import trainer as T

BATCH, SEQ = 8, 512


def _config():
  c = configlib.load(os.path.join(configlib.REPO_ROOT, "configs", "base.py"))
  c.unlock()  # its model section is this benchmark's configuration
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  c.train.update(batch_size=BATCH, lr=1e-4, warmup_steps=0, weight_decay=0.01, grad_clip=1.0)
  return c


def _batch(vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (BATCH, SEQ + 1)).astype(np.int32)
  ones = np.ones((BATCH, SEQ), np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
          "segment_ids": ones, "branch_ids": 0 * ones, "loss_mask": ones.astype(np.uint8),
          "label_ids": ones}


class Ours:

  def __init__(self, config):
    self.trainer = T.Trainer(config, T.mesh_from_config(config.mesh, jax.devices()[:1]))
    self.state = self.trainer.init_state(0)
    self.batch = self.trainer.global_batch(_batch(config.model.vocab_size))

  def steps(self, n: int) -> None:
    for _ in range(n):
      self.state, metrics = self.trainer.step(self.state, self.batch)
    jax.block_until_ready(metrics["loss"])


class Torch:

  def __init__(self, m):
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM
    torch.manual_seed(0)
    hf = HFConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                  intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                  head_dim=m.head_dim, rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps,
                  tie_word_embeddings=m.tie_word_embeddings,
                  max_position_embeddings=m.max_position_embeddings)
    self.model = Qwen3ForCausalLM(hf).float().train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                 weight_decay=0.01)
    b = _batch(m.vocab_size)
    self.tokens = torch.from_numpy(b["tokens"]).long()
    self.targets = torch.from_numpy(b["targets"]).long()

  def steps(self, n: int) -> None:
    for _ in range(n):
      logits = self.model(input_ids=self.tokens).logits
      loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)


def _best_rate(fn, flops: float, repeats: int) -> float:
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return flops / best


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  t = torch.from_numpy(np.asarray(a))
  flops = 2.0 * n ** 3
  return {"jax": _best_rate(lambda: mm(a).block_until_ready(), flops, repeats),
          "torch": _best_rate(lambda: torch.mm(t, t), flops, repeats)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="3 rounds of 2 steps (under a minute)")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--steps", type=int, default=3, help="steps per framework per round")
  p.add_argument("--system-malloc", action="store_true",
                 help="leave glibc's allocator as it is (default: dagger_jax.hostmem."
                      "keep_host_memory(), as the dagger-jax CLI does; applies to both sides)")
  a = p.parse_args()
  rounds, steps = (3, 2) if a.quick else (a.rounds, a.steps)
  host_memory_kept = False if a.system_malloc else hostmem.keep_host_memory()

  config = _config()
  ours, ref = Ours(config), Torch(config.model)
  compile_start = time.perf_counter()
  ours.steps(1)
  compile_s = time.perf_counter() - compile_start
  ref.steps(1)
  times = {"ours": [], "torch": []}
  cpu = {"ours": [], "torch": []}
  for _ in range(rounds):
    for name, runner in (("ours", ours), ("torch", ref)):
      start, cpu_start = time.perf_counter(), time.process_time()
      runner.steps(steps)
      times[name].append((time.perf_counter() - start) / steps)
      cpu[name].append((time.process_time() - cpu_start) / steps)
  peak = matmul_peak()
  peak_flops = max(peak.values())
  per_token = T.flops_per_token(Qwen3Config.from_config(config.model), SEQ)
  tps = {k: BATCH * SEQ / statistics.median(v) for k, v in times.items()}
  mfu = {k: v * per_token / peak_flops for k, v in tps.items()}
  print(f"{'':<8}{'tokens/s':>10}{'MFU':>8}   (peak f32 matmul {peak_flops / 1e9:.0f} GFLOP/s: "
        f"jax {peak['jax'] / 1e9:.0f}, torch {peak['torch'] / 1e9:.0f}; "
        f"{per_token / 1e6:.1f} MFLOP/token)")
  for k in ("ours", "torch"):
    print(f"{k:<8}{tps[k]:>10.0f}{mfu[k]:>8.1%}")
  print(json.dumps({"bench": "train_step", "ratio_vs_torch": round(tps["ours"] / tps["torch"], 4),
                    "mfu": round(mfu["ours"], 4), "tokens_per_s": round(tps["ours"], 1),
                    "torch_tokens_per_s": round(tps["torch"], 1),
                    "torch_mfu": round(mfu["torch"], 4), "peak_gflops": peak_flops / 1e9,
                    "cpu_s_per_step": round(statistics.median(cpu["ours"]), 3),
                    "torch_cpu_s_per_step": round(statistics.median(cpu["torch"]), 3),
                    "compile_s": round(compile_s, 2), "host_memory_kept": host_memory_kept,
                    "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "quick": a.quick}))


if __name__ == "__main__":
  main()
