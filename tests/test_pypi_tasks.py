"""`pypi:NAME` tasks: AST mutations (fast), and real libraries from PyPI end to end (slow)."""

import ast
import json
import os
import shutil
import subprocess

import pytest

from configs import base
from dagger_jax.envs import grading
from dagger_jax.envs import tasks as T
from dagger_jax.envs.tasks import pypi

SOURCE = '''\
"""Docstring with 3 numbers 4."""


def window(xs, lo, hi):
    if lo < 0 or hi > len(xs):
        raise ValueError("bad")
    total = 0
    for i in range(lo, hi + 1):
        total += xs[i] * 2
    return max(total, lo) if not xs else pow(total, 2)
'''


def test_mutations_cover_every_kind_and_stay_on_one_line():
  ms = pypi.mutations("m.py", SOURCE)
  assert {m.kind for m in ms} == {"operator_swap", "comparison_swap", "off_by_one",
                                  "changed_constant", "dropped_condition", "negation_removed",
                                  "swapped_arguments"}
  for m in ms:
    new = m.apply(SOURCE)
    ast.parse(new)
    changed = [i for i, (a, b) in enumerate(zip(SOURCE.splitlines(), new.splitlines())) if a != b]
    assert changed == [m.line - 1], m
  assert all(m.line != 1 for m in ms)  # the docstring's numbers are not constants to mutate
  texts = {m.apply(SOURCE).splitlines()[m.line - 1].strip() for m in ms}
  assert "for i in range(lo, hi - 1):" in texts
  assert "if lo < 0 and hi > len(xs):" not in texts  # dropping a condition is not swapping it
  assert "if lo < 0:" in texts and "if hi > len(xs):" in texts
  assert "return max(lo, total) if not xs else pow(total, 2)" in texts
  assert "return max(total, lo) if xs else pow(total, 2)" in texts
  assert "total -= xs[i] * 2" in texts and "if lo <= 0 or hi > len(xs):" in texts


def test_mutation_order_is_seeded_and_never_repeats_a_line():
  import random
  ms = pypi.mutations("m.py", SOURCE)
  a = list(pypi.interleave_by_kind(list(ms), random.Random(0)))
  b = list(pypi.interleave_by_kind(list(ms), random.Random(0)))
  assert a == b
  assert len({(m.path, m.line) for m in a}) == len(a)
  assert len({m.kind for m in a[:4]}) == 4  # kinds are interleaved, not one after another


def test_test_command_finds_layouts(tmp_path):
  (tmp_path / "src" / "lib").mkdir(parents=True)
  (tmp_path / "tests").mkdir()
  assert pypi.test_command(str(tmp_path)).startswith("PYTHONPATH=src python3 -m pytest -rA")
  assert pypi.test_command(str(tmp_path)).endswith(" tests")
  shutil.rmtree(tmp_path / "tests")
  with pytest.raises(pypi.PypiError, match="ships no tests"):
    pypi.test_command(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Real libraries (need the package registry and bubblewrap)


@pytest.fixture(scope="module")
def env_config():
  if shutil.which("bwrap") is None:
    pytest.skip("bubblewrap is not installed (`make sysdeps`)")
  c = base.get_config().env
  c.sandbox = "bwrap"
  return c


@pytest.mark.slow
@pytest.mark.parametrize("library", ["inflection", "cachetools"])
def test_real_library_tasks_validate_and_travel(library, env_config, tmp_path_factory):
  out_dir = tmp_path_factory.mktemp(library)
  out = str(out_dir / f"{library}.jsonl")
  try:
    tasks = pypi.generate(library, 2, seed=0, out_path=out, env_config=env_config,
                          cache_dir=str(tmp_path_factory.getbasetemp() / "sdists"))
  except pypi.PypiError as e:
    if "registry" in str(e):
      pytest.skip(f"the package registry is unreachable: {e}")
    raise
  assert len(tasks) == 2
  T.save_tasks(out, tasks)
  # Portable: move the tasks file together with its repos/ folder, then load and grade there.
  moved = str(tmp_path_factory.getbasetemp() / f"{library}-moved")
  shutil.move(str(out_dir), moved)
  loaded = T.load_tasks(os.path.join(moved, f"{library}.jsonl"))
  assert json.loads(open(os.path.join(moved, f"{library}.jsonl")).readline())["repo_dir"] == (
      f"repos/{library}-{tasks[0]['version']}")
  factory = grading.sandbox_factory(env_config, timeout=300)
  for task in loaded:
    assert task["FAIL_TO_PASS"] and task["PASS_TO_PASS"]
    assert not set(task["FAIL_TO_PASS"]) & set(task["PASS_TO_PASS"])
    assert task["bug"]["old"] not in task["problem_statement"]
    assert task["bug"]["new"] not in task["problem_statement"]
    assert task["FAIL_TO_PASS"][0] in task["problem_statement"]
    # The agent's tree has the bug and lacks the failing tests' files (the test_patch adds them).
    repo = os.path.join(moved, "check-" + task["instance_id"])
    T.materialize(task, repo)
    bug_file = open(os.path.join(repo, task["bug"]["file"])).read().splitlines()
    assert bug_file[task["bug"]["line"] - 1].strip() == task["bug"]["old"]
    for path in T.patch_files(task["test_patch"]):
      assert not os.path.exists(os.path.join(repo, path))
    log = subprocess.run(["git", "log", "--oneline"], cwd=repo, capture_output=True, text=True)
    assert len(log.stdout.splitlines()) == 1  # no history to diff the bug out of
    gold = grading.grade(task, task["patch"], factory)
    assert gold.resolved, gold.log[-3000:]
    empty = grading.grade(task, "", factory)
    assert not empty.resolved
    assert any(s in ("FAILED", "ERROR") for s in empty.f2p.values())
    assert set(empty.p2p.values()) == {"PASSED"}
