"""Deterministic observations: with `env.normalize_durations` two runs of one command that differ
only in how long pytest took show the agent the same bytes (`swe.normalize_durations`)."""

import doctest
import io
import os
import re
import subprocess
import sys

import pytest
from _pytest._io import TerminalWriter

from configs import base
from dagger_jax.envs import protocol, swe
from dagger_jax.envs.swe import SweEnv, normalize_durations
from dagger_jax.envs.tasks import toy
from dagger_jax.rundir import RunDir

# A test file with every outcome pytest counts in its summary line.
_TESTS = """\
import warnings

import pytest


def test_passes():
  assert True


def test_fails():
  assert 1 == 2


@pytest.mark.skip(reason="not today")
def test_skipped():
  pass


@pytest.mark.xfail
def test_xfails():
  assert False


def test_warns():
  warnings.warn(UserWarning("careful"))


@pytest.fixture
def broken():
  raise RuntimeError("no fixture")


def test_errors(broken):
  pass
"""

# Adds DURATION_SHIFT seconds to the duration pytest's summary prints, so that a real run shows
# the "3661.02s (1:01:01)" form without taking an hour.
_CONFTEST = """\
import os

from _pytest import terminal

_format = terminal.format_session_duration
terminal.format_session_duration = lambda s: _format(s + float(os.environ["DURATION_SHIFT"]))
"""

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("pytest_outputs")
  (d / "test_outcomes.py").write_text(_TESTS)
  (d / "conftest.py").write_text(_CONFTEST)
  return d


def _pytest_output(test_dir, flags, shift: float) -> str:
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTEST_ADDOPTS", "PY_COLORS", "FORCE_COLOR", "NO_COLOR")}
  env.update(COLUMNS="80", DURATION_SHIFT=str(shift), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
  out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *flags],
                       cwd=test_dir, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode in (0, 1, 5), out.stdout + out.stderr  # passed, failed, none collected
  return out.stdout + out.stderr


def _last_line(text: str) -> str:
  return text.rstrip("\n").splitlines()[-1]


@pytest.mark.parametrize("flags", [
    [],  # "=== 1 failed, ... in 0.04s ===", centred on 80 columns
    ["-q"],  # "1 failed, ... in 0.04s"
    ["-rA", "--tb=short"],
    ["--color=yes"],  # every part in ANSI colour codes
    ["--collect-only"],  # "=== 6 tests collected in 0.01s ==="
    ["-q", "--collect-only"],
    ["-k", "no_such_test"],  # "=== 6 deselected in 0.01s ==="
    ["-q", "-k", "passes or fails"],  # "1 failed, 1 passed, 4 deselected in 0.01s"
], ids=lambda flags: " ".join(flags) or "default")
def test_real_pytest_summaries_of_any_duration_normalize_to_the_same_text(test_dir, flags):
  short, hour = (_pytest_output(test_dir, flags, shift) for shift in (0, 3661))
  assert "(1:01:01)" in _last_line(hour) and short != hour  # really different durations
  assert normalize_durations(short) == normalize_durations(hour)
  last = _ANSI_RE.sub("", _last_line(normalize_durations(hour)))
  assert re.search(r" in 0\.00s( =+)?$", last), last
  assert not re.search(r"\d\.\d\ds", last.replace(" in 0.00s", "")), last
  if not {"-q", "--color=yes"} & set(flags):
    assert len(last) == 80  # the fills re-centred on the terminal's width


def test_normalized_summary_line_is_what_pytest_prints_for_zero_seconds(test_dir):
  last = _last_line(normalize_durations(_pytest_output(test_dir, [], 3661)))
  title = last.strip("= ")
  assert title == "1 failed, 2 passed, 1 skipped, 1 xfailed, 1 warning, 1 error in 0.00s"
  tw = TerminalWriter(io.StringIO())
  tw.fullwidth = 80
  tw.sep("=", title)  # what pytest's summary_stats writes, without colour
  assert tw._file.getvalue() == last + "\n"


def test_other_lines_are_left_alone(test_dir):
  out = _pytest_output(test_dir, ["-rA"], 0)
  head, _, _ = out.rpartition("\n" + _last_line(out))
  assert normalize_durations(head) == head  # only the summary line changes
  for text in ("Built in 0.53s", "sleep 1.00s\n", "timed out in 2.00 seconds", "0.01s call  x.py"):
    assert normalize_durations(text) == text


def test_docstring_examples_hold():
  runner = doctest.DocTestRunner()
  for test in doctest.DocTestFinder().find(swe.normalize_durations, globs=vars(swe)):
    runner.run(test)
  assert runner.tries == 4 and runner.failures == 0


# ---------------------------------------------------------------------------- in the sandbox

# bubblewrap runs the host's own /usr/bin/python3 (read-only), so that one needs pytest.
_HOST_PYTEST = subprocess.run(["/usr/bin/python3", "-c", "import pytest"],
                              capture_output=True).returncode == 0

# A test that sleeps 50-300 ms at random: the two episodes' pytest runs take different times,
# never under the 5 ms that would print as 0.00s.
_SLOW_TEST = ("cat > test_zz_sleeps.py <<'EOF'\nimport random\nimport time\n\n\n"
              "def test_sleeps():\n  time.sleep(0.05 + random.random() / 4)\nEOF\n")
_COMMANDS = (_SLOW_TEST + "python3 -m pytest -p no:cacheprovider",
             "python3 -m pytest -q -p no:cacheprovider")


def _episode_observations(task, normalize: bool) -> list[str]:
  env_config = base.get_config().env
  env_config.update(sandbox="bwrap", normalize_durations=normalize)
  with SweEnv(task, env_config) as env:
    env.reset()
    steps = [env.step(protocol.format_action(c)) for c in _COMMANDS]
  assert all(s.info["returncode"] in (0, 1) for s in steps), [s.observation for s in steps]
  return [s.observation for s in steps]


@pytest.mark.skipif(not _HOST_PYTEST, reason="the host's /usr/bin/python3 has no pytest, which "
                    "bubblewrap tasks run: `sudo apt-get install -y python3-pytest`")
def test_two_episodes_running_pytest_see_identical_observations():
  task = toy.generate(1, seed=3)[0]
  first, second = (_episode_observations(task, normalize=True) for _ in range(2))
  assert first == second
  assert "test_zz_sleeps.py ." in first[0]  # both runs include the sleeping test
  assert all(" in 0.00s" in o for o in first)
  assert all(" in 0.00s" not in o for o in _episode_observations(task, normalize=False))


@pytest.mark.slow
def test_same_seed_same_run(tmp_path):
  """Two DAgger runs with one seed in fresh directories (a round with the teacher, a round with a
  student that samples, shards, training, evaluation) write the same trajectories, the same
  shards and the same metrics (timings aside), and end with bitwise-equal params."""
  import json

  import jax
  import numpy as np

  import support
  from dagger_jax.dagger import loop
  from dagger_jax.model.params_io import load_params, pure_params

  def run(workdir):
    c = support.tiny_loop(rounds=2, episodes=3, steps=3, n_train=6, n_eval=2)
    c.workdir = str(workdir)
    rows = loop.run(c, progress=False)
    params = pure_params(load_params(RunDir(str(workdir)).checkpoints(1)))
    return rows, params

  rows_a, params_a = run(tmp_path / "a")
  rows_b, params_b = run(tmp_path / "b")
  timing = {"collect_s", "render_s", "train_s", "eval_s", "collect"}
  assert [{k: v for k, v in r.items() if k not in timing} for r in rows_a] == [
      {k: v for k, v in r.items() if k not in timing} for r in rows_b]
  for name in ("trajectories/round_000.jsonl", "trajectories/round_001.jsonl",
               "eval/round_001.jsonl"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  for r in (0, 1):
    fields = [json.load(open(tmp_path / x / "shards" / f"round_{r:03d}" / "manifest.json"))
              ["fields"] for x in "ab"]
    assert fields[0] == fields[1]  # the same bytes (sha256 per field)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               params_a, params_b)
