"""Rollout episodes/s with 1, 4 and 16 episodes in flight: JAX student + oracle teacher, real sandbox.

    python benchmarks/rollout.py            # 16 toy episodes per figure, median of 3
    python benchmarks/rollout.py --quick    # 2-turn episodes, one timed run each; < 1 minute

Each figure runs the same `--episodes` toy tasks (`toy.generate(n, 0, "train")`) through
`collector.collect` with `config.rollout.concurrency` = 1, 4 and 16, `configs/demo.py` otherwise
(a random-init demo-sized student as `JaxPolicy` with the demo's sampler settings; `OracleTeacher`;
beta = 0.5 so both act; the demo's interventions, turns, bwrap sandboxes; grading on), so all
three do the same episodes and only the number in flight differs. The tokenizer is the demo BPE,
trained as the DAgger loop trains it (teacher episodes of the tasks + their files) into a temp
dir. Before timing, each setting runs once untimed: that compiles every (batch, length bucket)
program of the sampler the timed runs use (checked: the count of compiled programs must not grow
while timing). Runs of the three settings alternate, so load on a shared machine hits all alike;
each figure is the median over `--repeats`.

The table also gives CPU seconds per episode (this process and its sandboxes: on a 2-core machine
throughput is at most 2 / that, whatever the number in flight; load on a shared machine distorts
it much less than wall time), the cores kept busy (CPU / wall), and splits the median run's wall
time by what the collecting thread waited on (`CollectStats.seconds`): sandbox starts, teacher
labels, the student's sampler, sandbox commands, taking diffs + grading, closing sandboxes. The
last line is one JSON object:
{"bench": "rollout", "episodes_per_s_1": ..., "episodes_per_s_4": ..., "episodes_per_s_16": ...,
 "episodes_per_s_16_prefix_cache": ..., "scaling_16_vs_1": ..., "prefix_cache_speedup_16": ...}.
Target: scaling_16_vs_1 >= 4. The rows 1, 4 and 16 run the config as it is (`sampler.prefix_cache`
is off in it); the extra row runs 16 in flight with the student's prefix cache on
(`sampler.PrefixCache`: a turn prefills only what it added), the same run's comparison.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dagger_jax import configlib, hostmem  # noqa: E402

IN_FLIGHT = (1, 4, 16)
# (label, episodes in flight, prefix cache on): the rows of the table, each timed alike.
SETTINGS = tuple((str(n), n, False) for n in IN_FLIGHT) + (("16 cached", 16, True),)
TARGET_SCALING = 4.0


def _config(quick: bool):
  """configs/demo.py; --quick: 2 turns of at most 32 new tokens, one prompt bucket (1024), so
  that few sampler programs compile and the run fits in a minute."""
  c = configlib.load(os.path.join(configlib.REPO_ROOT, "configs", "demo.py"))
  if quick:
    c.env.max_turns = 2
    c.sampler.max_new_tokens = 32
    c.sampler.length_buckets = (1024,)
  return c


def _student(config, tasks, tmp: str):
  """(JaxPolicy over a random-init demo-sized student, its tokenizer). The demo BPE is trained as
  the DAgger loop trains it: on the teacher's episodes of the tasks and the tasks' files."""
  import jax

  from dagger_jax.dagger import collector
  from dagger_jax.data.tokenizer import train_demo_tokenizer
  from dagger_jax.model.qwen3 import Qwen3Config
  from dagger_jax.policies.jax_policy import JaxPolicy
  from dagger_jax.policies.oracle import OracleTeacher
  from dagger_jax.model.loader import init_model

  trajs, _ = collector.collect(tasks, config=config, round_index=0, beta=1.0,
                               teacher=OracleTeacher(), student=None, grade=False, progress=False)
  texts = [m["content"] for t in trajs for m in t.messages]
  texts += [text for t in tasks for text in (t.get("repo_files") or {}).values()]
  tokenizer = train_demo_tokenizer(texts, os.path.join(tmp, "tokenizer"),
                                   vocab_size=config.model.vocab_size)
  model = init_model(Qwen3Config.from_config(config.model), jax.random.PRNGKey(config.seed))
  policy = JaxPolicy(model, tokenizer, config.sampler, enable_thinking=config.data.enable_thinking,
                     seed=config.seed, max_prompt_len=config.model.max_position_embeddings
                     - config.sampler.max_new_tokens)
  return policy, tokenizer


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process and of its reaped children (the sandboxes)."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
      resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _collect(config, tasks, in_flight: int, student, teacher, tokenizer, prefix_cache=False):
  """(wall seconds, CPU seconds, CollectStats) of one collection of `tasks` with `in_flight`
  episodes; with `prefix_cache` the student keeps a PrefixCache (one entry per task)."""
  from dagger_jax.dagger import collector
  from dagger_jax.model import sampler

  c = config.copy_and_resolve_references()
  c.rollout.concurrency = in_flight
  student.calls = 0  # the same sampling seeds every run
  # A fresh cache per run (no entries from an earlier run of the same tasks).
  student.prefix_cache = sampler.PrefixCache(len(tasks)) if prefix_cache else None
  cpu, start = _cpu_seconds(), time.perf_counter()
  trajs, stats = collector.collect(tasks, config=c, round_index=0, beta=0.5, teacher=teacher,
                                   student=student, seed=0, grade=True, tokenizer=tokenizer,
                                   progress=False)
  wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  if stats.failed or len(trajs) != len(tasks):
    raise RuntimeError(f"{in_flight} in flight: {stats.failed} of {len(tasks)} episodes failed "
                       f"(see the log above)")
  return wall, cpu, stats


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="one timed run per setting (under a minute)")
  p.add_argument("--episodes", type=int, default=16, help="episodes per figure (>= 16)")
  p.add_argument("--repeats", type=int, default=None, help="timed runs per setting (default 3)")
  p.add_argument("--env-workers", type=int, default=None,
                 help="config.rollout.env_workers (default: the config's)")
  a = p.parse_args()
  repeats = a.repeats or (1 if a.quick else 3)
  if a.episodes < max(IN_FLIGHT):
    p.error(f"--episodes must be >= {max(IN_FLIGHT)} so that {max(IN_FLIGHT)} can be in flight")
  hostmem.keep_host_memory()  # as the dagger-jax CLI does

  import jax

  from dagger_jax.envs.tasks import toy
  from dagger_jax.model import sampler
  from dagger_jax.policies.oracle import OracleTeacher

  config = _config(a.quick)
  if a.env_workers:
    config.rollout.env_workers = a.env_workers
  tasks = toy.generate(a.episodes, 0, split="train")
  teacher = OracleTeacher()
  with tempfile.TemporaryDirectory() as tmp:
    student, tokenizer = _student(config, tasks, tmp)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), {os.cpu_count()} cpus; student "
          f"{config.model.num_layers}x{config.model.hidden_size}, vocab {config.model.vocab_size}, "
          f"{config.sampler.max_new_tokens} new tokens, buckets "
          f"{tuple(config.sampler.length_buckets)}; {a.episodes} toy episodes per run, "
          f"beta 0.5, max_turns {config.env.max_turns}, env_workers "
          f"{config.rollout.env_workers}, sandbox {config.env.sandbox}; median of {repeats}")
    start = time.perf_counter()
    for _, n, cached in SETTINGS:  # warm-up: compiles the sampler programs the timed runs use
      _collect(config, tasks, n, student, teacher, tokenizer, cached)
    programs = sampler.compiled_programs()
    print(f"warm-up (compiles {programs} sampler programs): {time.perf_counter() - start:.1f} s")
    runs = collections.defaultdict(list)  # setting label -> [(wall, cpu, stats)]
    for _ in range(repeats):
      for label, n, cached in SETTINGS:
        runs[label].append(_collect(config, tasks, n, student, teacher, tokenizer, cached))
    if sampler.compiled_programs() != programs:
      print(f"warning: {sampler.compiled_programs() - programs} sampler programs compiled while "
            f"timing", file=sys.stderr)

  phases = ("open", "teacher", "student", "env", "finish", "close")
  print(f"{'in flight':>11} {'episodes/s':>10} {'wall s':>7} {'cpu s/ep':>8} {'cores':>5} "
        f"{'turns':>5} {'student':>7} {'res/sub':>7} | waited s: "
        + " ".join(f"{ph:>7}" for ph in phases))
  result = {"bench": "rollout"}
  for label, n, cached in SETTINGS:
    wall = statistics.median(w for w, _, _ in runs[label])
    _, cpu, stats = min(runs[label], key=lambda r: abs(r[0] - wall))  # the median run
    eps = a.episodes / wall
    result[f"episodes_per_s_{n}" + ("_prefix_cache" if cached else "")] = round(eps, 3)
    print(f"{label:>11} {eps:10.3f} {wall:7.1f} {cpu / a.episodes:8.3f} {cpu / wall:5.2f} "
          f"{sum(stats.turns.values()):5d} {stats.turns['student']:7d} "
          f"{stats.resolved:3d}/{stats.submitted:<3d} | {'':10}"
          + " ".join(f"{stats.seconds[ph]:7.1f}" for ph in phases))
  scaling = result[f"episodes_per_s_{max(IN_FLIGHT)}"] / result["episodes_per_s_1"]
  result["scaling_16_vs_1"] = round(scaling, 2)
  print(f"16 in flight vs 1: {scaling:.2f}x (target >= {TARGET_SCALING:.0f}x)")
  speedup = result["episodes_per_s_16_prefix_cache"] / result["episodes_per_s_16"]
  result["prefix_cache_speedup_16"] = round(speedup, 2)
  print(f"16 in flight, prefix cache vs prefilling every turn whole: {speedup:.2f}x")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
