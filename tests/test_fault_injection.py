"""Crash anywhere, lose nothing: named fault points (`dagger_jax.faults`), the files a killed run
leaves, and a tiny DAgger run SIGKILLed at three points and resumed, against a clean run.

`benchmarks/fault_injection.py` does the same on a demo-sized run with 20+ kills."""

import json
import os
import signal
import subprocess
import sys

import pytest

from dagger_jax import faults
from dagger_jax.data.trajectory import append_lines, cut_torn_tail

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def test_parse_names_a_bad_item():
  assert faults.parse("") == {}
  assert faults.parse("train_step:7,evaluate:1") == {"train_step": 7, "evaluate": 1}
  for bad in ("train_step", "train_step:0", "trian_step:2", "evaluate:x"):
    with pytest.raises(ValueError, match=f"{faults.ENV}=.*NAME:COUNT"):
      faults.parse(bad)


_COUNTING = ("from dagger_jax import faults\n"
             "for i in range(5):\n"
             "  print(i, flush=True)\n"
             "  faults.point('train_step')\n"
             "  faults.point('evaluate')\n")


@pytest.mark.parametrize("spec,printed,killed", [
    ("", "0 1 2 3 4", False),  # unset: a no-op
    ("train_step:3", "0 1 2", True),
    ("evaluate:2,train_step:4", "0 1", True),  # whichever comes first
])
def test_a_point_kills_the_process_at_its_count(spec, printed, killed):
  env = {k: v for k, v in os.environ.items() if k != faults.ENV}
  if spec:
    env[faults.ENV] = spec
  out = subprocess.run([sys.executable, "-c", _COUNTING], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
  assert out.stdout.split() == printed.split()
  assert out.returncode == (-signal.SIGKILL if killed else 0), out.stderr
  assert ("fault point" in out.stderr) == killed


def test_a_torn_tail_is_cut_and_appends_start_on_a_fresh_line(tmp_path):
  path = str(tmp_path / "rows.jsonl")
  assert cut_torn_tail(path) == 0  # no file yet
  append_lines(path, [json.dumps({"id": i}) for i in range(3)])
  with open(path, "a") as f:
    f.write('{"id": 3, "mess')  # a process killed mid-append
  assert cut_torn_tail(path) == len('{"id": 3, "mess')
  assert cut_torn_tail(path) == 0
  append_lines(path, [json.dumps({"id": 3})])
  with open(path) as f:
    assert [json.loads(line)["id"] for line in f] == [0, 1, 2, 3]


# A tiny run (tests/support.py: the demo config at toy scale, as in test_determinism): 2 rounds of
# 3 episodes, 4 train steps a round with a checkpoint every 2 (saved asynchronously).
_RUN = """\
import sys
sys.path.insert(0, {tests!r})
import support
from dagger_jax.dagger import loop
c = support.tiny_loop(rounds=2, episodes=3, steps=4, n_train=6, n_eval=2)
c.train.checkpoint_every = 2
c.workdir = sys.argv[1]
loop.run(c, progress=False)
"""


def _launch(workdir, cache, fault=""):
  env = {k: v for k, v in os.environ.items() if k != faults.ENV}
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  if fault:
    env[faults.ENV] = fault
  return subprocess.run([sys.executable, "-c", _RUN.format(tests=TESTS), str(workdir)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)


def _rows(workdir):
  timing = {"collect", "collect_s", "render_s", "train_s", "eval_s"}
  with open(workdir / "metrics.jsonl") as f:
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in f]


@pytest.mark.slow
def test_a_run_killed_three_times_ends_as_an_uninterrupted_one(tmp_path):
  """Killed before round 0's evaluation (its training done: the resumed row used to say
  `train_loss: null`), in the middle of an evaluation turn (sandboxes busy), just after an
  asynchronous checkpoint save started, then left with a torn metrics row: the resumed run has
  every episode once, the same files, the same metrics rows and bitwise the same params."""
  import jax
  import numpy as np

  from dagger_jax.model.params_io import load_params, pure_params

  cache, clean, faulted = tmp_path / "cache", tmp_path / "clean", tmp_path / "faulted"
  out = _launch(clean, cache)
  assert out.returncode == 0, out.stderr[-3000:]
  for fault in ("evaluate:1", "collect_turn:2", "checkpoint_save:1"):
    out = _launch(faulted, cache, fault)
    assert out.returncode == -signal.SIGKILL, (fault, out.stderr[-3000:])
    assert f"fault point {fault} reached" in out.stderr
  with open(faulted / "metrics.jsonl", "a") as f:
    f.write('{"round": 1, "beta": 0.5, "labe')  # as if killed while appending round 1's row
  out = _launch(faulted, cache)
  assert out.returncode == 0, out.stderr[-3000:]

  rows = _rows(faulted)
  assert [r["round"] for r in rows] == [0, 1]  # none missing, none doubled
  assert all(r["train_loss"] is not None for r in rows)
  assert rows == _rows(clean)
  for name in ("trajectories/round_000.jsonl", "trajectories/round_001.jsonl",
               "eval/round_000.jsonl", "eval/round_001.jsonl"):
    data = (faulted / name).read_bytes()
    ids = [json.loads(line)["id"] for line in data.splitlines()]
    assert len(ids) == len(set(ids)), name
    assert data == (clean / name).read_bytes(), name
  for r in (0, 1):
    manifests = [json.loads((d / "shards" / f"round_{r:03d}" / "manifest.json").read_text())
                 for d in (clean, faulted)]
    assert manifests[0]["fields"] == manifests[1]["fields"]  # sha256 per field
    params = [pure_params(load_params(str(d / "checkpoints" / f"round_{r:03d}")))
              for d in (clean, faulted)]
    same = jax.tree.map(lambda x, y: np.asarray(x).tobytes() == np.asarray(y).tobytes(), *params)
    assert all(jax.tree.leaves(same)), r  # bitwise
  assert not list((faulted / "checkpoints").glob("*/*.orbax-checkpoint-tmp*"))
