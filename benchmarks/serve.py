"""New tokens/s through `dagger-jax serve` (HTTP, batched) vs the in-process sampler, side by side.

The `configs/base.py` student (hidden 256, 4 layers, vocab 2048; random weights), exported as an
HF directory and served by `policies.serve.Server` on a free port. At concurrency c, c client
threads each POST one /generate (one random prompt, greedy, exactly `--new-tokens` new tokens:
ignore_eos, no stop ids) at the same moment; the figure is c x new tokens over the wall time
until the last answer. The in-process figure is one `sampler.generate` call with the same c
prompts (what a caller holding the model does), with the server's length buckets. Each figure
is the median over `--repeats` timed rounds after two untimed ones (which compile the shapes the
server's batching produces); server and sampler rounds alternate, so both see the same load on a
shared machine. The table also gives the sampler calls the server made per round (1 = every
request joined one call) and the median time of one `/update_weights_from_disk` (alternating
between two exports of the model, each returning once the new weights serve).

    python benchmarks/serve.py            # concurrency 1 and 16, prompt 512, 128 new tokens
    python benchmarks/serve.py --quick    # prompt 128, 32 new tokens, 2 repeats; about a minute

The last line printed is one JSON object: {"bench": "serve", "ratio_c1": ..., "ratio_c16": ...,
"update_s": ...} (ratio = served / in-process, in new tokens per second).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import base  # noqa: E402
from dagger_jax.model import hf, loader, sampler  # noqa: E402
from dagger_jax.model.qwen3 import Qwen3, Qwen3Config  # noqa: E402
from dagger_jax.policies.serve import Server  # noqa: E402


def post(url: str, body: dict) -> dict:
  request = urllib.request.Request(url, json.dumps(body).encode(),
                                   {"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=600) as r:
    return json.load(r)


def served_round(server: Server, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
  """c concurrent single-prompt /generate requests -> the output ids, in prompt order."""
  outs = [None] * len(prompts)
  barrier = threading.Barrier(len(prompts))

  def one(i):
    barrier.wait()
    outs[i] = post(server.url + "/generate", {"input_ids": prompts[i], "sampling_params": {
        "max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}})["output_ids"]
  threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(len(o) == new_tokens for o in outs)
  return outs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="shorter prompts and outputs, 2 repeats")
  parser.add_argument("--concurrency", default="1,16")
  parser.add_argument("--prompt-len", type=int, default=None, help="default 512 (quick 128)")
  parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (quick 32)")
  parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 2 quick)")
  args = parser.parse_args()
  repeats = args.repeats or (2 if args.quick else 5)
  prompt_len = args.prompt_len or (128 if args.quick else 512)
  new_tokens = args.new_tokens or (32 if args.quick else 128)

  config = base.get_config()
  config.sampler.max_new_tokens = new_tokens
  model_config = Qwen3Config.from_config(config.model)
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}); "
        f"{model_config.num_params() / 1e6:.1f}M params, prompt {prompt_len}, {new_tokens} new "
        f"tokens, median of {repeats}")
  result = {"bench": "serve"}
  with tempfile.TemporaryDirectory() as tmp:
    dirs = [os.path.join(tmp, name) for name in ("a", "b")]
    for seed, path in enumerate(dirs):
      hf.save_pretrained(Qwen3(model_config, rngs=nnx.Rngs(seed)), path)
    model = loader.load_model(dirs[0], None)
    with Server(dirs[0], config).start() as server:
      for c in [int(x) for x in args.concurrency.split(",")]:
        prompts = rng.integers(0, model_config.vocab_size, (c, prompt_len)).tolist()

        def direct():
          out = sampler.generate(model, prompts, new_tokens,
                                 length_buckets=config.sampler.length_buckets)
          assert all(len(row) == new_tokens for row in out.tokens)
          return out.tokens

        times = {"serve": [], "direct": []}
        calls = []
        for r in range(repeats + 2):  # two untimed rounds compile what batching produces
          before = server.sampler_calls
          for name, fn in (("serve", lambda: served_round(server, prompts, new_tokens)),
                           ("direct", direct)):
            start = time.perf_counter()
            outs = fn()
            if r >= 2:
              times[name].append(time.perf_counter() - start)
            if name == "serve":
              served, calls = outs, calls + [server.sampler_calls - before] * (r >= 2)
            else:
              same = sum(a == b for a, b in zip(served, outs))
        tps = {k: c * new_tokens / statistics.median(v) for k, v in times.items()}
        ratio = tps["serve"] / tps["direct"]
        print(f"concurrency {c:3d}: serve {tps['serve']:8.0f} new tok/s   in-process "
              f"{tps['direct']:8.0f} new tok/s   ratio {ratio:5.2f}x   sampler calls/round "
              f"{statistics.median(calls):.0f}   identical greedy rows {same}/{c}")
        result.update({f"serve_tps_c{c}": round(tps["serve"], 1),
                       f"direct_tps_c{c}": round(tps["direct"], 1), f"ratio_c{c}": round(ratio, 3),
                       f"calls_per_round_c{c}": statistics.median(calls),
                       f"same_rows_c{c}": same})
      update = []
      for r in range(repeats + 1):
        path = dirs[(r + 1) % 2]
        start = time.perf_counter()
        answer = post(server.url + "/update_weights_from_disk",
                      {"model_path": path, "weight_version": f"v{r}"})
        if r >= 1:  # the first one is untimed (file cache, first load code paths)
          update.append(time.perf_counter() - start)
        assert answer["success"], answer
      result["update_s"] = round(statistics.median(update), 3)
      print(f"update_weights_from_disk: {result['update_s']:.3f} s (median of {len(update)}; "
            f"{model_config.num_params() / 1e6:.1f}M params, float32 safetensors)")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
