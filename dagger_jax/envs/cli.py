"""CLI verbs of the environments room: `tasks generate`, `tasks validate`, `env exec`.

    dagger-jax tasks generate --source toy --n 200 --seed 0 --out runs/tasks/train.jsonl
    dagger-jax tasks generate --source toy --split test --n 100 --out runs/tasks/test.jsonl
    dagger-jax tasks generate --source pypi:six --n 5 --out runs/tasks/six.jsonl
    dagger-jax tasks validate runs/tasks/train.jsonl --json
    dagger-jax env exec --tasks runs/tasks/train.jsonl --instance ID -- 'python3 -m pytest -q'
    dagger-jax env exec --tasks ... --instance ID --info -- 'sleep infinity'   # + the step's info

Sandboxes follow `config.env.sandbox` (bwrap | docker | unsafe_local).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time

import ml_collections

from dagger_jax.envs import grading, protocol, swe
from dagger_jax.envs import tasks as T
from dagger_jax.envs.sandbox import check_available
from dagger_jax.envs.tasks import pypi, toy
from dagger_jax.errors import UsageError


def tasks_generate_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--source", default=None,
                      help="toy (imitable: the statement gives the line) | toy-rewrite (imitable: "
                      "it gives the span to replace) | toy-arith (the fix must be worked out) | "
                      "pypi:NAME[==VERSION] (default: config.tasks.source)")
  parser.add_argument("--n", type=int, default=None, help="number of tasks (default: "
                      "config.tasks.n_train, or n_eval with --split test)")
  parser.add_argument("--seed", type=int, default=None, help="default: config.tasks.seed")
  parser.add_argument("--split", choices=("train", "test"), default="train",
                      help="toy: which split (a task's split is fixed by its content, so the two "
                      "never overlap)")
  parser.add_argument("--cache", default=None, help="pypi: sdist download / unpack cache "
                      "(default: config.tasks.pypi_cache, or ~/.cache/dagger_jax/sdists)")
  parser.add_argument("--out", required=True, help="output tasks file (.jsonl)")


def tasks_generate(args: argparse.Namespace, config: ml_collections.ConfigDict) -> int:
  source = args.source or config.tasks.source
  n = args.n if args.n is not None else (
      config.tasks.n_eval if args.split == "test" else config.tasks.n_train)
  seed = config.tasks.seed if args.seed is None else args.seed
  if n < 1:
    raise UsageError(f"--n must be >= 1, got {n}")
  if not args.out.endswith(".jsonl"):
    raise UsageError(f"--out must be a .jsonl file, got {args.out}")
  start = time.monotonic()
  if source in toy.FAMILIES:
    tasks = toy.generate(n, seed, args.split, family=source)
  elif source.startswith("pypi:"):
    tasks = pypi.generate(source[len("pypi:"):], n, seed, out_path=args.out,
                          env_config=config.env,
                          cache_dir=args.cache or config.tasks.pypi_cache or None)
  else:
    raise UsageError(f"unknown --source {source!r} ({' | '.join(toy.FAMILIES)} | pypi:NAME)")
  T.save_tasks(args.out, tasks)
  print(f"wrote {len(tasks)} {source} tasks to {args.out} "
        f"({time.monotonic() - start:.1f} s)")
  return 0


def _source_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--image-template", default="", help="for rows without a repository "
                      "source: docker image, e.g. 'swebench/sweb.eval.x86_64.{docker_id}:latest'")
  parser.add_argument("--repo-template", default="", help="for rows without a repository "
                      "source: local clone holding base_commit, e.g. '/data/clones/{repo}'")


def _load(args: argparse.Namespace, path: str) -> list[dict]:
  return T.load_tasks(path, image_template=args.image_template, repo_template=args.repo_template)


def tasks_validate_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("file", help="tasks file (.jsonl, .json or .parquet)")
  _source_args(parser)
  parser.add_argument("--instance", action="append", default=None,
                      help="only this instance id (repeatable)")
  parser.add_argument("--workers", type=int, default=1, help="tasks graded at once")
  parser.add_argument("--timeout", type=float, default=None,
                      help="seconds per test run (default: config.env.grade_timeout)")
  parser.add_argument("--json", action="store_true",
                      help="end with one JSON line: {tasks, gold_resolved, empty_resolved, ...}")


def tasks_validate(args: argparse.Namespace, config: ml_collections.ConfigDict) -> int:
  """Grades every task with its gold patch and with the empty patch.

  Exit status 0 iff every gold patch resolves its task and no empty patch does.
  """
  tasks = _load(args, args.file)
  if args.instance:
    tasks = [T.get_task(tasks, iid) for iid in args.instance]
  check_available(config.env)  # a missing tool or engine fails here, not once per task
  factory = grading.sandbox_factory(config.env, timeout=args.timeout)

  def check(task: dict) -> dict:
    start = time.monotonic()
    try:
      gold = grading.grade(task, task["patch"], factory)
      empty = grading.grade(task, "", factory)
    except Exception as e:  # one broken task must not hide the others' results
      return {"instance_id": task["instance_id"], "gold": False, "empty": False,
              "error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - start}
    return {"instance_id": task["instance_id"], "gold": gold.resolved, "empty": empty.resolved,
            "error": gold.error or ("" if gold.resolved else _first_failure(gold)),
            "seconds": time.monotonic() - start}

  width = max([len(t["instance_id"]) for t in tasks] + [11])
  print(f"{'instance_id':<{width}}  gold      empty     seconds  note")
  rows = []
  with concurrent.futures.ThreadPoolExecutor(max(1, args.workers)) as pool:
    for row in pool.map(check, tasks):
      rows.append(row)
      flag = lambda ok: "resolved" if ok else "-"  # noqa: E731
      print(f"{row['instance_id']:<{width}}  {flag(row['gold']):<8}  {flag(row['empty']):<8}  "
            f"{row['seconds']:7.1f}  {row['error']}", flush=True)
  summary = {"tasks": len(rows), "gold_resolved": sum(r["gold"] for r in rows),
             "empty_resolved": sum(r["empty"] for r in rows),
             "errors": sum(bool(r["error"]) and not r["gold"] for r in rows),
             "sandbox": config.env.sandbox}
  ok = summary["gold_resolved"] == len(rows) and summary["empty_resolved"] == 0
  print(f"{summary['gold_resolved']}/{len(rows)} gold patches resolve, "
        f"{summary['empty_resolved']}/{len(rows)} empty patches resolve: "
        f"{'OK' if ok else 'INVALID TASKS'}")
  if args.json:
    print(json.dumps(summary))
  return 0 if ok else 1


def _first_failure(result: grading.GradeResult) -> str:
  bad = [f"{t}={s}" for t, s in {**result.f2p, **result.p2p}.items()
         if s not in ("PASSED", "XFAIL", "SKIPPED")]
  return "gold fails: " + ", ".join(bad[:3])


def env_exec_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--tasks", required=True, help="tasks file")
  parser.add_argument("--instance", required=True, help="instance id")
  _source_args(parser)
  parser.add_argument("--info", action="store_true", help="end with one JSON line: the step's "
                      "info (returncode, timed_out, duration_s, over_limit, ...)")
  parser.add_argument("command", nargs="+", help="the bash command (after --)")


def env_exec(args: argparse.Namespace, config: ml_collections.ConfigDict) -> int:
  """Runs one command as the agent's first action in a fresh episode; prints its observation."""
  task = T.get_task(_load(args, args.tasks), args.instance)
  env = swe.SweEnv(task, config.env)
  try:
    env.reset()
    step = env.step(protocol.format_action(" ".join(args.command)))
  finally:
    env.close()
  print(step.observation or f"(no observation: the episode ended, {step.info['exit_status']})")
  if args.info:
    print(json.dumps(step.info))
  return 0
