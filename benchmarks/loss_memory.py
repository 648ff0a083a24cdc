"""Peak memory and time of the chunked vs the plain loss (value and gradient), Qwen3 vocabulary.

    python benchmarks/loss_memory.py [--quick] [--tokens 4096] [--chunk 512]

Both forms compute d(mean loss)/d(hidden, unembedding) for hidden 256, vocabulary 151936 and 4096
trained tokens. Memory is XLA's own account of the compiled computation (arguments + outputs +
temporaries, `Compiled.memory_analysis()`), i.e. the peak the executable needs; time is the median
wall time of a call. The last line printed is one JSON object; the ratios are ours (chunked) over
the reference (plain) form.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dagger_jax.train import loss as L


def _compiled(chunk: int, hidden, w, targets, mask, labels):
  def mean_loss(h, w_):
    s, c = L.loss_sum_and_count(h, w_, targets, mask, labels, chunk_size=chunk)
    return s / c

  return jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1))).lower(hidden, w).compile()


def _peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _times(fns, args, repeats: int) -> tuple[list[list[float]], list]:
  """Interleaved timings (one call of each form per round), so load changes hit both alike;
  and each form's last result. The executables are compiled ahead, so no call compiles."""
  times, results = [[] for _ in fns], [None] * len(fns)
  for _ in range(repeats):
    for i, f in enumerate(fns):
      start = time.perf_counter()
      results[i] = jax.block_until_ready(f(*args))
      times[i].append(time.perf_counter() - start)
  return times, results


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="1 timed call of each (under a minute on a quiet machine)")
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--vocab", type=int, default=151936)
  p.add_argument("--chunk", type=int, default=512, help="positions per chunk")
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  repeats = 1 if a.quick else a.repeats

  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(1, a.tokens, a.hidden)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(a.hidden, a.vocab)) * 0.02, jnp.float32)
  targets = jnp.asarray(rng.integers(0, a.vocab, (1, a.tokens)), jnp.int32)
  mask = jnp.ones((1, a.tokens), jnp.uint8)
  labels = jnp.ones((1, a.tokens), jnp.int32)
  data = (targets, mask, labels)

  plain = _compiled(0, hidden, w, *data)
  chunked = _compiled(a.chunk, hidden, w, *data)
  (t_plain, t_chunked), ((vp, gp), (vc, gc)) = _times([plain, chunked], (hidden, w), repeats)
  agree = bool(np.allclose(vc, vp, rtol=1e-5) and
               all(np.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(gc, gp)))
  mem_plain, mem_chunked = _peak_bytes(plain), _peak_bytes(chunked)
  med_p, med_c = statistics.median(t_plain), statistics.median(t_chunked)
  print(f"{'form':<10}{'peak MiB':>12}{'median s':>12}")
  print(f"{'plain':<10}{mem_plain / 2**20:>12.0f}{med_p:>12.3f}")
  print(f"{'chunked':<10}{mem_chunked / 2**20:>12.0f}{med_c:>12.3f}   (chunk {a.chunk})")
  print(json.dumps({"bench": "loss_memory", "memory_ratio": round(mem_chunked / mem_plain, 4),
                    "time_ratio": round(med_c / med_p, 4), "plain_mib": mem_plain / 2**20,
                    "chunked_mib": mem_chunked / 2**20, "plain_s": med_p, "chunked_s": med_c,
                    "tokens": a.tokens, "vocab": a.vocab, "hidden": a.hidden, "chunk": a.chunk,
                    "values_agree": agree, "quick": a.quick}))


if __name__ == "__main__":
  main()
