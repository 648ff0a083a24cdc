"""Crash anywhere, lose nothing: a small DAgger run SIGKILLed again and again, against a clean one.

    python benchmarks/fault_injection.py [--quick] [--trials N] [--seed S] [--temperature T]
                                         [--root DIR] [--keep]

A demo-sized `dagger-jax dagger` run (configs/demo.py: its committed base student and tokenizer,
2 rounds of 8 episodes and 30 train steps, checkpoints every 10 steps, saved asynchronously, 8
evaluation episodes per round; the student decodes greedily, or samples at `--temperature`) runs
once without interruption (the reference), then again in a fresh directory where it is SIGKILLed
and resumed (the same command) until `--trials` kills have happened; when a run finishes before
that, another fresh run takes the remaining kills. Each kill is one of:

  at a named point (`dagger_jax.faults`, the process kills itself there): collect_turn (episodes in
  flight, sandboxes mid-command; training or evaluation episodes), collect_write (a finished wave
  not yet appended), shard_render, shard_write (a field file written into the shard's temporary
  directory), train_step, checkpoint_save (just after an asynchronous Orbax save started: its
  temporary directory is on disk), evaluate (before a round's evaluation);
  or at a random moment: SIGKILL from this script after a uniform delay.

Kinds are drawn least-used first among those the run's state still reaches (no shard kill once
both shards exist), each at a count the resumed process still reaches. Afterwards every finished run is checked against the reference:

  lost / duplicated   episode ids of every round's trajectories and evaluation file, against the
                      reference's (the episodes the run starts)
  corrupt             shards whose files fail the manifest's sha256 (or an unreadable manifest)
                      and JSONL lines that do not parse; temporary directories left over are
                      counted apart (disk only: nothing reads them)
  bad checkpoints     every kept step of every round restored into the trainer's sharded state
  metrics             rows missing or doubled in metrics.jsonl; rows equal to the reference's apart
                      from timings (`*_s`) and `collect` (this process's work log: `skipped` and
                      the seconds differ by design after a resume)
  params_equal        every round's last checkpoint bitwise equal to the reference's (CPU)
  files equal         trajectory and evaluation JSONL byte for byte, shard checksums

All runs share one XLA compilation cache (a resumed process compiles nothing new: the same
executables, so the same bits). The last line is one JSON object. Target: 0 lost, 0 duplicated,
0 corrupt, params equal.
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dagger_jax import faults  # noqa: E402  (no JAX: imported by the parent process cheaply)

KINDS = (*faults.POINTS, "random")
# Per kind, the range of the count at which the process kills itself: small enough that a
# resumed process still gets there (turns and steps come in tens, shard files in sevens).
COUNTS = {"collect_turn": (1, 12), "collect_write": (1, 2), "shard_render": (1, 8),
          "shard_write": (1, 7), "train_step": (1, 30), "checkpoint_save": (1, 3),
          "evaluate": (1, 1)}
TIMING_KEYS = {"collect", "collect_s", "render_s", "train_s", "eval_s"}


def overrides(quick: bool) -> dict:
  """The demo config's changes: 2 rounds; --quick makes each stage smaller."""
  o = {"dagger.rounds": 2, "dagger.episodes_per_round": 8, "train.steps": 30,
       "train.checkpoint_every": 10, "train.log_every": 10, "dagger.eval_episodes": 8,
       "tasks.n_train": 16, "tasks.n_eval": 8, "rollout.concurrency": 4, "rollout.env_workers": 2}
  if quick:
    o.update({"dagger.episodes_per_round": 4, "train.steps": 12, "train.checkpoint_every": 4,
              "train.log_every": 4, "dagger.eval_episodes": 4, "tasks.n_eval": 4,
              "rollout.concurrency": 2})
  return o


def command(workdir: str, o: dict) -> list[str]:
  return [sys.executable, "-m", "dagger_jax.cli", "dagger", "--config", "configs/demo.py",
          f"--config.workdir={workdir}", *[f"--config.{k}={v}" for k, v in o.items()]]


def child_env(cache: str, fault: str | None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != faults.ENV}
  env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  if fault:
    env[faults.ENV] = fault
  return env


def launch(workdir: str, o: dict, cache: str, log_path: str, fault: str | None = None,
           delay: float | None = None) -> tuple[int, float]:
  """Runs (or resumes) the run; SIGKILLs it after `delay` s if given. -> (returncode, seconds)."""
  start = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(command(workdir, o), cwd=ROOT, env=child_env(cache, fault),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
      proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  return proc.returncode, time.perf_counter() - start


# ------------------------------------------------------------------------------ the run's state


def _rounds(o: dict) -> range:
  return range(int(o["dagger.rounds"]))


def _lines(path: str) -> list[str]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    return [line for line in f.read().split("\n") if line.strip()]


def _latest_step(directory: str) -> int:
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
  return max(steps, default=0)


def work_left(workdir: str, o: dict) -> dict[str, int]:
  """How often a process resumed in `workdir` will pass each named point (at least; an estimate
  for turns), and `stages`, the fraction of the run's stages left in tenths."""
  from dagger_jax.rundir import RunDir
  rd = RunDir(workdir)
  steps, every = int(o["train.steps"]), int(o["train.checkpoint_every"])
  wave = int(o["rollout.concurrency"])
  left = collections.Counter()
  stages = 0
  for r in _rounds(o):
    if not os.path.exists(os.path.join(rd.shards(r), "manifest.json")):
      missing = int(o["dagger.episodes_per_round"]) - len(_lines(rd.trajectories(r)))
      left["collect_write"] += -(-missing // wave)
      left["shard_render"] += int(o["dagger.episodes_per_round"])
      left["shard_write"] += 7  # the row fields (data.render.FIELDS)
      stages += 1
    done = _latest_step(rd.checkpoints(r))
    if done < steps:
      left["train_step"] += steps - done
      left["checkpoint_save"] += -(-(steps - done) // every)
      stages += 1
    if not os.path.exists(rd.eval_summary(r)):
      left["collect_write"] += -(-(int(o["dagger.eval_episodes"]) - len(
          _lines(rd.eval_episodes(r)))) // wave)
      left["evaluate"] += 1
      stages += 1
  left["collect_turn"] = 3 * left["collect_write"]  # a wave takes 4+ turns
  left["stages"] = 10 * stages // (3 * len(_rounds(o)))
  return left


def stage_of(log_path: str, kind: str) -> str:
  """Where the killed process was: its last progress bar (collect rR, eval rR, train rR), or
  the stage a named point belongs to."""
  with open(log_path, errors="replace") as f:
    text = f.read()
  marks = [(m.start(), m.group(0)) for m in re.finditer(
      r"collect r\d+ beta=[\d.]+|train:|round \d+: (continuing|base model|random init)", text)]
  if not marks:
    return "start-up"
  last = marks[-1][1]
  rounds = re.findall(r"collect r(\d+)", text)
  r = rounds[-1] if rounds else "?"
  if kind.startswith("shard_") or kind == "evaluate":
    return f"{'shard' if kind.startswith('shard_') else 'eval'} r{r}"
  if last.startswith("collect"):
    return f"{'eval' if last.endswith('beta=0.00') else 'collect'} r{r}"
  return f"train r{r}"


def leftovers(workdir: str) -> list[str]:
  """Temporary files and directories a killed writer left (Orbax, shards, summaries)."""
  pats = ["checkpoints/*/*.orbax-checkpoint-tmp*", "shards/.*.tmp-*", "eval/*.tmp",
          "*.tmp", "tasks/*.tmp"]
  return sorted(p for pat in pats for p in glob.glob(os.path.join(workdir, pat)))


def _kind_of_tmp(path: str) -> str:
  if ".orbax-checkpoint-tmp" in path:
    return "orbax tmp (save cut)"
  return "shard tmp" if ".tmp-" in path else os.path.basename(path)


# ---------------------------------------------------------------------------------- the checks


def _ids(path: str) -> tuple[list[str], int]:
  ids, bad = [], 0
  for line in _lines(path):
    try:
      ids.append(json.loads(line)["id"])
    except (json.JSONDecodeError, KeyError):
      bad += 1
  return ids, bad


def _params_digest(tree) -> str:
  import jax
  import numpy as np
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda x: str(x[0])):
    h.update(str(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def check(workdir: str, reference: str, o: dict, trainer) -> dict:
  """The run in `workdir` against the reference run (see the module doc)."""
  from dagger_jax.data.shards import Shard, ShardError
  from dagger_jax.rundir import RunDir
  from dagger_jax.train import checkpoint
  rd, ref = RunDir(workdir), RunDir(reference)
  out = collections.Counter({k: 0 for k in (
      "lost", "extra", "duplicated", "episodes", "corrupt", "shards_ok", "checkpoints_ok",
      "bad_checkpoints")})
  out["leftover_tmp"] = len(leftovers(workdir))
  files_equal = True
  for r in _rounds(o):
    for name in ("trajectories", "eval_episodes"):
      mine, bad = _ids(getattr(rd, name)(r))
      want, _ = _ids(getattr(ref, name)(r))
      out["corrupt"] += bad
      out["lost"] += len(set(want) - set(mine))
      out["extra"] += len(set(mine) - set(want))
      out["duplicated"] += len(mine) - len(set(mine))
      out["episodes"] += len(mine)
      with open(getattr(rd, name)(r), "rb") as a, open(getattr(ref, name)(r), "rb") as b:
        files_equal &= a.read() == b.read()
    try:
      shard, ref_shard = Shard(rd.shards(r), verify=True), Shard(ref.shards(r), verify=False)
      files_equal &= shard.manifest["fields"] == ref_shard.manifest["fields"]
      out["shards_ok"] += 1
    except ShardError:
      out["corrupt"] += 1
    ck = checkpoint.Checkpointer(rd.checkpoints(r), async_save=False)
    for step in ck.all_steps():
      try:
        ck.restore(trainer.abstract_state, step)
        out["checkpoints_ok"] += 1
      except Exception:  # any failure to restore is what this counts
        out["bad_checkpoints"] += 1
    ck.close()
  rows, ref_rows = [json.loads(x) for x in _lines(rd.metrics)], [
      json.loads(x) for x in _lines(ref.metrics)]
  rounds = collections.Counter(row["round"] for row in rows)
  out["rows_missing"] = sum(r not in rounds for r in _rounds(o))
  out["rows_doubled"] = sum(n - 1 for n in rounds.values())
  strip = lambda rs: [{k: v for k, v in x.items() if k not in TIMING_KEYS} for x in rs]
  return {**out, "files_equal": files_equal, "metrics_equal": strip(rows) == strip(ref_rows),
          "train_loss": [row.get("train_loss") for row in rows]}


def params_digests(workdir: str, o: dict, trainer) -> list[str]:
  from dagger_jax.rundir import RunDir
  from dagger_jax.train import checkpoint
  digests = []
  for r in _rounds(o):
    ck = checkpoint.Checkpointer(RunDir(workdir).checkpoints(r), async_save=False)
    arrays, _ = ck.restore(trainer.abstract_state)
    ck.close()
    digests.append(_params_digest(arrays))
  return digests


def make_trainer(o: dict):
  from dagger_jax import cli
  from dagger_jax.train import trainer as T
  config = cli.load_config(["--config", "configs/demo.py",
                            *[f"--config.{k}={v}" for k, v in o.items()]])
  return T.Trainer(config, T.mesh_from_config(config.mesh))


# ------------------------------------------------------------------------------------ the bench


def draw(rng: random.Random, left: dict[str, int], used: collections.Counter, ref_s: float):
  """The next kill: the least-used kind the run still reaches, at a count it reaches (named
  points) or after a delay within the time the work left took the reference (random)."""
  kinds = [k for k in KINDS if k == "random" or left.get(k, 0) > 0]
  fewest = min(used[k] for k in kinds)
  kind = rng.choice([k for k in kinds if used[k] == fewest])
  if kind == "random":
    # a resumed process finds its programs compiled (the shared cache): a whole run then takes
    # about a third of the reference's time
    return kind, None, rng.uniform(3.0, 15.0 + ref_s / 3 * left["stages"] / 10)
  lo, hi = COUNTS[kind]
  return kind, rng.randint(lo, max(lo, min(hi, left[kind]))), None


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="a smaller run and 3 kills (~4 min)")
  p.add_argument("--trials", type=int, default=None, help="kills in all (default 24; quick 3)")
  p.add_argument("--seed", type=int, default=0, help="the kill schedule's seed")
  p.add_argument("--temperature", type=float, default=0.0,
                 help="the student's sampler.temperature (default 0: greedy, as the demo)")
  p.add_argument("--root", default="", help="where the runs go (default: a temporary directory)")
  p.add_argument("--keep", action="store_true", help="keep the runs' directories")
  args = p.parse_args()
  trials = args.trials or (3 if args.quick else 24)
  o = overrides(args.quick)
  if args.temperature:
    o["sampler.temperature"] = args.temperature
  root = os.path.abspath(args.root) if args.root else tempfile.mkdtemp(prefix="bench-faults-")
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  cache = os.path.join(root, ".jax_cache")
  rng = random.Random(args.seed)
  t0 = time.perf_counter()
  try:
    reference = os.path.join(root, "reference")
    rc, ref_s = launch(reference, o, cache, os.path.join(root, "logs", "reference.log"))
    if rc != 0:
      print(f"the reference run failed (exit {rc}): see {root}/logs/reference.log")
      return 1
    print(f"reference run (uninterrupted): {ref_s:.0f} s  [{' '.join(command('W', o)[3:])}]")
    print(f"\n{'trial':>5} {'run':>3}  {'kill':<26} {'stage at kill':<14} {'after s':>8}  "
          f"{'left on disk':<28}")
    used: collections.Counter = collections.Counter()
    kills, runs, resume_failures = 0, [], 0
    while kills < trials:
      workdir = os.path.join(root, f"faulted_{len(runs)}")
      runs.append({"workdir": workdir, "kills": 0, "launches": 0, "seconds": 0.0})
      run = runs[-1]
      while True:
        fault = delay = None
        if kills < trials:
          kind, count, delay = draw(rng, work_left(workdir, o), used, ref_s)
          fault = f"{kind}:{count}" if count else None
        log_path = os.path.join(root, "logs", f"run{len(runs) - 1}_{run['launches']}.log")
        rc, seconds = launch(workdir, o, cache, log_path, fault, delay)
        run["launches"] += 1
        run["seconds"] += seconds
        if rc == -signal.SIGKILL:
          kills += 1
          run["kills"] += 1
          used[kind] += 1
          what = fault or f"random at {delay:.0f} s"
          left = ", ".join(sorted({_kind_of_tmp(p) for p in leftovers(workdir)})) or "-"
          print(f"{kills:>5} {len(runs) - 1:>3}  {what:<26} {stage_of(log_path, kind):<14} "
                f"{seconds:>8.0f}  {left[:28]:<28}", flush=True)
          continue
        if rc != 0:
          resume_failures += 1
          with open(log_path, errors="replace") as f:
            tail = f.read()[-1500:]
          print(f"run {len(runs) - 1}: resume FAILED (exit {rc}), log {log_path}:\n{tail}")
          break
        break  # finished (before its kill, if one was drawn: the next run takes the rest)
    print(f"\nchecking {len(runs)} resumed run(s) against the reference ...", flush=True)
    trainer = make_trainer(o)
    ref_digests = params_digests(reference, o, trainer)
    ref_check = check(reference, reference, o, trainer)
    totals: collections.Counter = collections.Counter()
    params_equal = metrics_equal = files_equal = True
    header = f"{'':<26}{'reference':>18}" + "".join(f"{'resumed ' + str(i):>18}"
                                                  for i in range(len(runs)))
    print(header)
    results = []
    for run in runs:
      if not os.path.exists(os.path.join(run["workdir"], "metrics.jsonl")):
        results.append(None)
        continue
      res = check(run["workdir"], reference, o, trainer)
      res["digests"] = params_digests(run["workdir"], o, trainer)
      results.append(res)
      for k in ("lost", "duplicated", "extra", "corrupt", "bad_checkpoints", "leftover_tmp",
                "rows_missing", "rows_doubled"):
        totals[k] += res.get(k, 0)
      params_equal &= res["digests"] == ref_digests
      metrics_equal &= res["metrics_equal"]
      files_equal &= res["files_equal"]
    table = [
        ("kills / launches", lambda i, r: "0 / 1" if i < 0 else
         f"{runs[i]['kills']} / {runs[i]['launches']}"),
        ("wall s (all launches)", lambda i, r: f"{ref_s:.0f}" if i < 0 else
         f"{runs[i]['seconds']:.0f}"),
        ("episodes (train + eval)", lambda i, r: r and r["episodes"]),
        ("lost / duplicated", lambda i, r: r and f"{r['lost']} / {r['duplicated']}"),
        ("corrupt / leftover tmp", lambda i, r: r and f"{r['corrupt']} / {r['leftover_tmp']}"),
        ("checkpoints ok / bad", lambda i, r: r and
         f"{r['checkpoints_ok']} / {r['bad_checkpoints']}"),
        ("metrics rows miss / dbl", lambda i, r: r and
         f"{r['rows_missing']} / {r['rows_doubled']}"),
        ("train_loss r0", lambda i, r: r and f"{r['train_loss'][0]:.6f}"),
        ("train_loss r1", lambda i, r: r and f"{r['train_loss'][-1]:.6f}"),
        ("params sha256 r0", lambda i, r: (ref_digests if i < 0 else r["digests"])[0][:12]
         if r else None),
        ("params sha256 r1", lambda i, r: (ref_digests if i < 0 else r["digests"])[-1][:12]
         if r else None),
        ("files equal to reference", lambda i, r: r and ("-" if i < 0 else r["files_equal"])),
        ("metrics equal (no timings)", lambda i, r: r and ("-" if i < 0 else
                                                           r["metrics_equal"])),
    ]
    for name, cell in table:
      cells = [cell(-1, ref_check)] + [cell(i, r) for i, r in enumerate(results)]
      print(f"{name:<26}" + "".join(f"{str(c if c is not None else 'n/a'):>18}" for c in cells))
    wall = time.perf_counter() - t0
    print(f"\n{kills} kills ({', '.join(f'{k} {used[k]}' for k in KINDS)}), "
          f"{len(runs)} resumed run(s), {resume_failures} failed resume(s); "
          f"wall {wall / 60:.1f} min")
    ok = (not totals["lost"] and not totals["duplicated"] and not totals["corrupt"]
          and params_equal and not resume_failures and None not in results)
    print(f"target (0 lost, 0 duplicated, 0 corrupt, params equal): "
          f"{'met' if ok else 'MISSED'}")
    print(json.dumps({
        "bench": "fault_injection", "trials": kills, "temperature": args.temperature,
        "lost": totals["lost"],
        "duplicated": totals["duplicated"], "corrupt": totals["corrupt"],
        "params_equal": params_equal, "metrics_equal": metrics_equal,
        "files_equal": files_equal, "bad_checkpoints": totals["bad_checkpoints"],
        "rows_missing": totals["rows_missing"], "rows_doubled": totals["rows_doubled"],
        "leftover_tmp": totals["leftover_tmp"], "resume_failures": resume_failures,
        "runs": len(runs), "kills_by_kind": {k: used[k] for k in KINDS},
        "reference_s": round(ref_s, 1), "wall_s": round(wall, 1)}))
    return 0 if ok else 1
  finally:
    if not args.keep and not args.root:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
