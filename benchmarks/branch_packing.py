"""Branch packing vs one sequence per label: tokens, train time, loss equality, padding.

    python benchmarks/branch_packing.py [--quick]

Synthetic DAgger trajectories (real record, real demo BPE tokenizer and chat template): T turns
(uniform in [--min-turns, --turns]), observations of ~--obs-tokens, actions of ~--action-tokens,
half the turns student-acted with a differing teacher label. Both sides train the same labels:

- branch:    `render.render` (one row per trajectory, labels as branches), packed first-fit;
- per-label: `render.per_label_sequences` (prefix + label for every label), packed the same way.

Both run the same tiny Qwen3 (jitted forward + backward of the masked mean loss) on batches of the
same shape [--batch, --max-len], so a step costs the same on either side and the train time of
one epoch is steps x median step time; `step_time_ratio` is per-label epoch time / branch epoch
time. Step times are medians over --timed-steps steps per side, interleaved (the CPU is shared).
`max_loss_diff` compares each label's mean loss on the branch rows with its separate sequence
(over the --loss-trajectories shortest trajectories). `pad_fraction` is the branch side's padding
after first-fit packing. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import base  # noqa: E402
from dagger_jax.data import render, shards, synthetic  # noqa: E402
from dagger_jax.data.tokenizer import train_demo_tokenizer  # noqa: E402
from dagger_jax.model.qwen3 import Qwen3, Qwen3Config  # noqa: E402

FIELDS = ("tokens", "targets", "positions", "segment_ids", "branch_ids", "loss_mask")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes, under a minute")
  p.add_argument("--trajectories", type=int, default=96)
  p.add_argument("--turns", type=int, default=30)
  p.add_argument("--min-turns", type=int, default=10)
  p.add_argument("--obs-tokens", type=int, default=100)
  p.add_argument("--action-tokens", type=int, default=30)
  p.add_argument("--max-len", type=int, default=8192)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--timed-steps", type=int, default=3)
  p.add_argument("--loss-trajectories", type=int, default=2)
  p.add_argument("--enable-thinking", action="store_true",
                 help="Qwen3 thinking mode (config.data.enable_thinking); default off, where every "
                      "label is a branch behind the generation prompt's empty think block")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  if args.quick:
    args.trajectories, args.turns, args.min_turns = 128, 20, 6
    args.obs_tokens, args.action_tokens, args.max_len = 24, 8, 2048
    args.timed_steps, args.loss_trajectories = 3, 4
  return args


def model_and_step(vocab_size: int):
  cfg = dataclasses.replace(
      Qwen3Config.from_config(base.get_config().model), vocab_size=vocab_size, hidden_size=64,
      intermediate_size=192, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
      rope_theta=10_000.0)
  model = Qwen3(cfg, rngs=nnx.Rngs(0))

  def nll_bt(model, b):
    logits_btv = model(b["tokens"], b["positions"], b["segment_ids"], b["branch_ids"])
    logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    return -jnp.take_along_axis(logp_btv, b["targets"][..., None], -1)[..., 0]

  def loss(model, b):
    mask_bt = b["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll_bt(model, b) * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)

  step = nnx.jit(nnx.value_and_grad(loss))
  return model, step, nnx.jit(nll_bt)


def batches(packed: dict[str, np.ndarray], batch: int):
  n = len(packed["tokens"])
  for i in range(0, n - n % batch if n >= batch else 0, batch):
    yield {f: jnp.asarray(packed[f][i:i + batch]) for f in FIELDS}


def label_losses(nll_fn, model, rows: list[render.Row], max_len: int, pad_id: int, batch: int
                 ) -> dict[tuple[str, int], float]:
  """{(trajectory, turn): mean nll of the label's trained slots}, rows packed as in training."""
  packed = shards.pack_rows(rows, max_len, pad_id)
  bins = shards.first_fit([len(r) for r in rows], max_len)
  n = len(packed["tokens"])
  pad = (-n) % batch
  arrays = {f: np.concatenate([packed[f], np.zeros((pad, max_len), packed[f].dtype)])
            for f in FIELDS}
  nll = np.concatenate([np.asarray(nll_fn(model, {f: jnp.asarray(arrays[f][i:i + batch])
                                                  for f in FIELDS}))
                        for i in range(0, n + pad, batch)])
  out = {}
  for b, members in enumerate(bins):
    for segment, i in enumerate(members, start=1):
      where = np.flatnonzero(packed["segment_ids"][b] == segment)
      for turn in np.unique(rows[i].label_ids[rows[i].label_ids > 0]):
        out[(rows[i].source, int(turn) - 1)] = float(nll[b, where[rows[i].label_ids == turn]].mean())
  return out


def main():
  args = parse_args()
  t_start = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    tok = train_demo_tokenizer(synthetic.CORPUS * 4, os.path.join(tmp, "tokenizer"), 1024)
  rng = np.random.default_rng(args.seed)
  trajs = [synthetic.random_trajectory(
      rng, tok, turns=int(rng.integers(args.min_turns, args.turns + 1)),
      obs_tokens=args.obs_tokens, action_tokens=args.action_tokens, student_fraction=0.5,
      disagree_fraction=1.0, id=f"traj{i}") for i in range(args.trajectories)]
  branch_rows, label_rows, stats = [], [], {}
  for t in trajs:
    rows, s = render.render(t, tok, args.max_len, "split", args.enable_thinking)
    branch_rows += rows
    for k, v in s.items():
      stats[k] = stats.get(k, 0) + v
    label_rows += render.per_label_sequences(t, tok, args.enable_thinking)
  pad_id = tok.pad_token_id
  sides = {"branch": shards.pack_rows(branch_rows, args.max_len, pad_id),
           "per-label": shards.pack_rows(label_rows, args.max_len, pad_id)}
  tokens = {k: int((p["segment_ids"] > 0).sum()) for k, p in sides.items()}
  trained = {k: int(p["loss_mask"].sum()) for k, p in sides.items()}
  pad = {k: float((p["segment_ids"] == 0).mean()) for k, p in sides.items()}
  steps = {k: len(p["tokens"]) // args.batch for k, p in sides.items()}
  print(f"{len(trajs)} trajectories, {args.min_turns}-{args.turns} turns, ~{args.obs_tokens}-token "
        f"observations, ~{args.action_tokens}-token actions, rows of {args.max_len}; render "
        f"{stats}; data ready in {time.time() - t_start:.1f}s")

  model, step, nll_fn = model_and_step(vocab_size=512 if len(tok) <= 512 else 1024)
  its = {k: batches(p, args.batch) for k, p in sides.items()}
  first = {k: next(its[k]) for k in sides}
  jax.block_until_ready(step(model, first["branch"]))  # compile once: both sides share the shape
  times = {k: [] for k in sides}
  for i in range(args.timed_steps):
    for k in sides:
      b = first[k] if i == 0 else next(its[k], None)
      if b is None:
        continue
      t0 = time.perf_counter()
      jax.block_until_ready(step(model, b))
      times[k].append(time.perf_counter() - t0)
  median = {k: float(np.median(v)) for k, v in times.items()}
  epoch = {k: median[k] * steps[k] for k in sides}

  # The loss check runs on the shortest trajectories, packed into rows just long enough (cheap).
  subset = {t.id for t in sorted(trajs, key=lambda t: len(t.turns))[:args.loss_trajectories]}
  check = {"branch": [r for r in branch_rows if r.source in subset],
           "per-label": [r for r in label_rows if r.source in subset]}
  check_len = -(-max(len(r) for rows in check.values() for r in rows) // 128) * 128
  packed_losses = label_losses(nll_fn, model, check["branch"], check_len, pad_id, args.batch)
  separate_losses = label_losses(nll_fn, model, check["per-label"], check_len, pad_id, args.batch)
  assert sorted(packed_losses) == sorted(separate_losses)
  max_diff = max(abs(packed_losses[k] - separate_losses[k]) for k in separate_losses)

  print(f"{'':26}{'branch':>14}{'per-label':>14}{'per-label/branch':>18}")
  for name, v in (("rows", steps), ("tokens (non-pad)", tokens), ("trained tokens", trained)):
    print(f"{name:26}{v['branch']:>14}{v['per-label']:>14}{v['per-label'] / v['branch']:>18.2f}")
  print(f"{'pad fraction':26}{pad['branch']:>14.3f}{pad['per-label']:>14.3f}")
  print(f"{'step time (median, s)':26}{median['branch']:>14.3f}{median['per-label']:>14.3f}"
        f"{median['per-label'] / median['branch']:>18.2f}")
  print(f"{'epoch train time (s)':26}{epoch['branch']:>14.2f}{epoch['per-label']:>14.2f}"
        f"{epoch['per-label'] / epoch['branch']:>18.2f}")
  print(f"max |label loss difference| over {len(separate_losses)} labels: {max_diff:.2e}; "
        f"total {time.time() - t_start:.1f}s")
  print(json.dumps({"bench": "branch_packing", "token_ratio": round(tokens["per-label"] /
                                                                     tokens["branch"], 3),
                    "step_time_ratio": round(epoch["per-label"] / epoch["branch"], 3),
                    "max_loss_diff": max_diff, "pad_fraction": round(pad["branch"], 4)}))


if __name__ == "__main__":
  main()
