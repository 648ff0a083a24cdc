"""New tokens/s: our JAX KV-cache sampler vs `transformers` `generate` (PyTorch CPU), side by side.

Same tiny Qwen3 (hidden 256, 4 layers, vocab 2048, the `configs/base.py` student) with the same
weights in both, the same random prompts, greedy decoding, exactly `--new-tokens` new tokens per
row (no stop token). Each figure is the median over `--repeats` timed calls after one warm-up call
(which compiles ours); the calls of the two alternate, so both see the same load on a shared
machine. A timed call includes the prefill and the host round trip.

    python benchmarks/sampler.py            # batch 1 and 16, prompt 512, 128 new tokens
    python benchmarks/sampler.py --quick    # fewer repeats; under a minute

The last line printed is one JSON object: {"bench": "sampler", "ratio_b1": ..., "ratio_b16": ...}
(ratio = ours / transformers, in new tokens per second).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import base  # noqa: E402
from dagger_jax.model import hf, sampler  # noqa: E402
from dagger_jax.model.qwen3 import Qwen3Config  # noqa: E402


def models(config: Qwen3Config, seed: int = 0):
  """(transformers Qwen3ForCausalLM, our Qwen3 with the same weights via `hf.load_pretrained`)."""
  torch.manual_seed(seed)
  # initializer_range 0.1: peaked next-token distributions, so greedy choices are rarely near-ties
  # and the two greedy outputs can be compared token for token.
  hf_config = dict(hf.config_to_hf(config), initializer_range=0.1)
  hf_model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_config)).eval()
  with tempfile.TemporaryDirectory() as path:
    hf_model.save_pretrained(path)
    return hf_model, hf.load_pretrained(path)


def median_seconds(fns, repeats: int) -> tuple[list[float], list]:
  """(median wall time, output) of each function; calls alternate, so both see the same load."""
  outputs = [fn() for fn in fns]  # warm-up (compiles ours)
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      start = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - start)
  return [statistics.median(ts) for ts in times], outputs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--prompt-len", type=int, default=512)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; 2 quick)")
  args = parser.parse_args()
  repeats = args.repeats or (2 if args.quick else 5)

  config = Qwen3Config.from_config(base.get_config().model)  # configs/base.py's student
  hf_model, model = models(config)
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {config.num_params() / 1e6:.1f}M params, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {repeats}")

  result = {"bench": "sampler"}
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = rng.integers(0, config.vocab_size, (b, args.prompt_len))
    input_ids = torch.from_numpy(prompts)

    def ours():
      out = sampler.generate(model, prompts.tolist(), args.new_tokens)
      assert all(len(row) == args.new_tokens for row in out.tokens)
      return out.tokens

    def transformers_generate():
      with torch.inference_mode():
        out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                do_sample=False, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
      assert out.shape == (b, args.prompt_len + args.new_tokens)
      return out[:, args.prompt_len:].tolist()

    new_tokens = b * args.new_tokens
    (ours_s, ref_s), (ours_ids, ref_ids) = median_seconds([ours, transformers_generate], repeats)
    ours_tps, ref_tps = new_tokens / ours_s, new_tokens / ref_s
    same = sum(a == r for a, r in zip(ours_ids, ref_ids))
    print(f"batch {b:3d}: ours {ours_tps:8.0f} new tok/s   transformers {ref_tps:8.0f} new tok/s   "
          f"ratio {ours_tps / ref_tps:5.2f}x   identical greedy rows {same}/{b}")
    result[f"same_rows_b{b}"] = same
    result[f"ours_tps_b{b}"] = round(ours_tps, 1)
    result[f"hf_tps_b{b}"] = round(ref_tps, 1)
    result[f"ratio_b{b}"] = round(ours_tps / ref_tps, 3)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
