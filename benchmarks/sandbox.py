"""Sandbox latency: bubblewrap vs a plain subprocess per command, and docker start + exec.

    python benchmarks/sandbox.py [--quick] [--no-docker]

Per-command latency of the same `bash -lc COMMAND` (same environment, same working tree) run as a
plain subprocess (the reference) and in a `BwrapSandbox`, measured alternately so load on the
machine hits both alike, and the start of a fresh bubblewrap sandbox; then docker: container
start (create + start + copy of the tree in) and one `exec` per command. Medians side by side;
the last line is one JSON object. Target: bubblewrap adds <= 20 ms per command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import base  # noqa: E402
from dagger_jax.envs import sandbox as sbx  # noqa: E402

LIMITS = sbx.SandboxLimits.from_config(base.get_config().env)

COMMANDS = ("true", "git status --short", "python3 -c pass")
TARGET_BWRAP_OVERHEAD_MS = 20.0


def _make_repo(root: str) -> str:
  repo = os.path.join(root, "repo")
  os.makedirs(os.path.join(repo, "pkg"))
  for i in range(50):
    with open(os.path.join(repo, "pkg", f"mod{i}.py"), "w") as f:
      f.write(f"def f{i}(x):\n  return x + {i}\n")
  env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b",
             GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
  for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "base"]):
    subprocess.run(["git", *args], cwd=repo, env=env, check=True)
  return repo


def _plain(command: str, repo: str, env: dict) -> float:
  t = time.perf_counter()
  subprocess.run(["bash", "-lc", command], cwd=repo, env=env, stdin=subprocess.DEVNULL,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True)
  return (time.perf_counter() - t) * 1e3


def _timed_run(sb: sbx.Sandbox, command: str) -> float:
  t = time.perf_counter()
  r = sb.run(command)
  if r.returncode != 0:
    raise RuntimeError(f"{command!r} failed in {type(sb).__name__}: {r.output}")
  return (time.perf_counter() - t) * 1e3


def bench_bwrap(repo: str, n: int, n_starts: int) -> dict:
  tmp = tempfile.mkdtemp(prefix="bench-home-")
  env = dict(sbx.SANDBOX_ENV, HOME=tmp, TMPDIR=tmp)
  out = {}
  try:
    with sbx.BwrapSandbox(repo, LIMITS) as sb:
      out["cgroups"] = sb.cgroup is not None
      for command in COMMANDS:
        _plain(command, repo, env), _timed_run(sb, command)  # warm-up
        plain, bwrap = [], []
        for _ in range(n):
          plain.append(_plain(command, repo, env))
          bwrap.append(_timed_run(sb, command))
        out[command] = (statistics.median(plain), statistics.median(bwrap))
        out["best " + command] = (min(plain), min(bwrap))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  starts = []
  for _ in range(n_starts):
    t = time.perf_counter()
    with sbx.BwrapSandbox(repo, LIMITS) as sb:
      sb.run("true")
      starts.append((time.perf_counter() - t) * 1e3)
  out["start"] = statistics.median(starts)
  return out


def bench_docker(repo: str, n: int, n_starts: int) -> dict:
  from dagger_jax.envs.sandbox import images
  image = images.ensure_base_image()
  starts, execs = [], {c: [] for c in COMMANDS}
  for i in range(n_starts):
    t = time.perf_counter()
    sb = sbx.DockerSandbox(image, "/testbed", limits=LIMITS, host_workdir_to_copy_in=repo)
    starts.append((time.perf_counter() - t) * 1e3)
    with sb:
      if i == 0:
        for command in COMMANDS:
          _timed_run(sb, command)  # warm-up
          execs[command] = [_timed_run(sb, command) for _ in range(n)]
  return {"start": statistics.median(starts),
          **{c: statistics.median(v) for c, v in execs.items()}}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
  p.add_argument("--no-docker", action="store_true", help="skip the docker measurements")
  args = p.parse_args()
  n, n_starts = (40, 5) if args.quick else (200, 20)
  root = tempfile.mkdtemp(prefix="bench-sandbox-")
  try:
    repo = _make_repo(root)
    bw = bench_bwrap(repo, n, n_starts)
    print(f"per-command latency, median of {n} (ms); bubblewrap limits via "
          f"{'cgroups' if bw['cgroups'] else 'rlimits'}")
    print(f"{'command':<22}{'plain subprocess':>18}{'bubblewrap':>12}{'overhead':>10}"
          f"{'(best of n:':>14}{'plain':>7}{'bwrap':>7}{'overhead)':>10}")
    for c in COMMANDS:
      (plain, bwrap), (best_plain, best_bwrap) = bw[c], bw["best " + c]
      print(f"{c:<22}{plain:>18.1f}{bwrap:>12.1f}{bwrap - plain:>10.1f}{'':>14}"
            f"{best_plain:>7.1f}{best_bwrap:>7.1f}{best_bwrap - best_plain:>9.1f}")
    print(f"bubblewrap sandbox start + first command, median of {n_starts}: {bw['start']:.1f} ms")
    dk = None
    if not args.no_docker:
      try:
        dk = bench_docker(repo, n, n_starts)
      except sbx.SandboxError as e:
        print(f"docker: skipped ({e})")
    if dk:
      print(f"\ndocker: container start (create + start + copy-in), median of {n_starts}: "
            f"{dk['start']:.1f} ms")
      print(f"{'command':<22}{'docker exec':>12}{'bubblewrap':>12}")
      for c in COMMANDS:
        print(f"{c:<22}{dk[c]:>12.1f}{bw[c][1]:>12.1f}")
    overhead = bw["true"][1] - bw["true"][0]
    verdict = "meets" if overhead <= TARGET_BWRAP_OVERHEAD_MS else "MISSES"
    print(f"\nbubblewrap overhead {overhead:.1f} ms per command: {verdict} the "
          f"<= {TARGET_BWRAP_OVERHEAD_MS:.0f} ms target (CPU shared with other jobs: noisy)")
    print(json.dumps({
        "bench": "sandbox",
        "bwrap_overhead_ms": round(overhead, 2),
        "docker_exec_ms": round(dk["true"], 2) if dk else None,
        "plain_ms": round(bw["true"][0], 2), "bwrap_ms": round(bw["true"][1], 2),
        "bwrap_overhead_best_ms": round(bw["best true"][1] - bw["best true"][0], 2),
        "bwrap_start_ms": round(bw["start"], 1),
        "docker_start_ms": round(dk["start"], 1) if dk else None,
        "bwrap_cgroups": bw["cgroups"], "n": n}))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
