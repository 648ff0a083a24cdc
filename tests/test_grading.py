"""Grading in a real bubblewrap sandbox: gold resolves, empty and wrong patches do not."""

import json
import shutil
import subprocess

import ml_collections
import pytest

from configs import base
from dagger_jax.envs import grading
from dagger_jax.envs.tasks import materialize, toy

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap is not installed (`make sysdeps`)")


@pytest.fixture(scope="module")
def env_config() -> ml_collections.ConfigDict:
  c = base.get_config().env
  c.sandbox = "bwrap"
  return c


@pytest.fixture(scope="module")
def factory(env_config):
  return grading.sandbox_factory(env_config, timeout=120)


@pytest.fixture(scope="module")
def tasks():
  return toy.generate(2, seed=11) + toy.generate(2, seed=11, family="toy-arith")


def _diff_after(task, tmp_path, shell: str) -> str:
  """The git diff a shell command makes in a fresh copy of the task's repository."""
  repo = tmp_path / "edit"
  materialize(task, str(repo))
  subprocess.run(shell, shell=True, cwd=repo, check=True)
  return subprocess.run(["git", "diff"], cwd=repo, capture_output=True, text=True).stdout


def test_gold_resolves_and_empty_does_not(tasks, factory):
  for task in tasks:
    gold = grading.grade(task, task["patch"], factory)
    assert gold.resolved and gold.patch_applied, gold.log
    assert set(gold.f2p.values()) == {"PASSED"} and set(gold.p2p.values()) == {"PASSED"}
    empty = grading.grade(task, "", factory)
    assert not empty.resolved and empty.patch_applied
    assert set(empty.f2p.values()) == {"FAILED"}, empty.log
    assert set(empty.p2p.values()) == {"PASSED"}
    assert ">>>>> Start Test Output" in empty.log
    if task["family"] == "toy-arith":  # pytest; `toy` runs the repository's own runner
      assert "short test summary" in empty.log


def test_fix_that_breaks_another_function_is_not_resolved(tasks, factory, tmp_path):
  task = tasks[0]
  victim = task["PASS_TO_PASS"][0]  # tests/test_MOD.py::test_NAME
  mod_file, fn = victim.split("::")[0][len("tests/test_"):], victim.split("::test_")[1]
  path = next(p for p in task["repo_files"] if p.endswith(mod_file))
  patch = _diff_after(task, tmp_path, f"{task['bug']['fix_cmd']} && "
                      f"sed -i '/^def {fn}(/a\\    return 12345' {path}")
  result = grading.grade(task, patch, factory)
  assert not result.resolved
  assert set(result.f2p.values()) == {"PASSED"}
  assert result.p2p[victim] == "FAILED", result.log


def test_editing_the_tests_does_not_count(tasks, factory, tmp_path):
  """The grader resets the test files the test_patch touches, as the swebench harness does."""
  task = tasks[1]
  test_file = task["FAIL_TO_PASS"][0].split("::")[0]
  patch = _diff_after(task, tmp_path, f"sed -i 's/assert .*/assert True/' {test_file}")
  result = grading.grade(task, patch, factory)
  assert result.patch_applied and not result.resolved
  assert set(result.f2p.values()) == {"FAILED"}


def test_patch_that_does_not_apply(tasks, factory):
  bad = tasks[0]["patch"].replace("\n-    ", "\n-    garbage ", 1)  # a removed line not in the file
  assert bad != tasks[0]["patch"]
  result = grading.grade(tasks[0], bad, factory)
  assert not result.patch_applied and not result.resolved
  assert result.error == "patch did not apply"
  assert set(result.f2p.values()) == {"MISSING"}


def test_timeout_is_not_resolved(tasks, env_config):
  task = {**tasks[0], "test_cmd": "sleep 60"}
  result = grading.grade(task, task["patch"], grading.sandbox_factory(env_config, timeout=3))
  assert not result.resolved and result.error == "tests timed out"


def test_log_parser_choice():
  assert grading.log_parser_name({"repo": "django/django"}) == "parse_log_django"
  assert grading.log_parser_name({"repo": "toy/ledger"}) == "parse_log_pytest"
  assert grading.log_parser_name({"repo": "x/y", "log_parser": "parse_log_sympy"}) == (
      "parse_log_sympy")


def test_predictions_are_read_by_swebench(tmp_path, tasks):
  from swebench.harness.utils import get_predictions_from_file
  path = str(tmp_path / "preds.jsonl")
  grading.write_predictions(path, [(t["instance_id"], t["patch"]) for t in tasks] +
                            [("empty-one", None)], "dagger-jax/student")
  preds = get_predictions_from_file(path, "unused", "test")
  assert [p["instance_id"] for p in preds] == [t["instance_id"] for t in tasks] + ["empty-one"]
  assert preds[0] == {"instance_id": tasks[0]["instance_id"],
                      "model_name_or_path": "dagger-jax/student", "model_patch": tasks[0]["patch"]}
  assert json.loads(open(path).read().splitlines()[-1])["model_patch"] == ""


# ---------------------------------------------------------------------------------------------
# CLI: `tasks generate`, `tasks validate`, `env exec` through the real console entry point


def _cli(*args):
  import sys
  return subprocess.run([sys.executable, "-m", "dagger_jax.cli", *args, "--config.env.sandbox=bwrap"],
                        capture_output=True, text=True, timeout=600)


def test_cli_generate_validate_and_exec(tmp_path):
  out = tmp_path / "toy.jsonl"
  r = _cli("tasks", "generate", "--source", "toy", "--n", "3", "--seed", "5", "--out", str(out))
  assert r.returncode == 0, r.stderr
  assert len(out.read_text().splitlines()) == 3
  r = _cli("tasks", "validate", str(out), "--json")
  assert r.returncode == 0, r.stdout + r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary == {"tasks": 3, "gold_resolved": 3, "empty_resolved": 0, "errors": 0,
                     "sandbox": "bwrap"}
  task = json.loads(out.read_text().splitlines()[0])
  r = _cli("env", "exec", "--tasks", str(out), "--instance", task["instance_id"], "--",
           "python3 -m pytest -q -p no:cacheprovider tests")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("<returncode>1</returncode>\n<output>\n")
  assert f"FAILED {task['FAIL_TO_PASS'][0]}" in r.stdout
  r = _cli("env", "exec", "--tasks", str(out), "--instance", task["instance_id"], "--", "pwd")
  assert r.stdout == "<returncode>0</returncode>\n<output>\n/testbed\n</output>\n"


def test_cli_validate_flags_a_broken_task(tmp_path, tasks):
  broken = {**tasks[0], "patch": ""}  # a "gold" patch that fixes nothing
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps(broken) + "\n")
  r = _cli("tasks", "validate", str(path), "--json")
  assert r.returncode == 1
  assert json.loads(r.stdout.strip().splitlines()[-1])["gold_resolved"] == 0
  assert "gold fails: " + broken["FAIL_TO_PASS"][0] + "=FAILED" in r.stdout


def test_cli_bad_tasks_file(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text('{"instance_id": "a"}\n')
  r = _cli("tasks", "validate", str(path))
  assert r.returncode == 2 and "t.jsonl:1 (instance a): missing field 'repo'" in r.stderr


def test_exit_code_cross_check(tasks, factory):
  """swebench distrusts a log of passes when the test command itself failed; so do we."""
  task = {**tasks[0], "test_cmd": tasks[0]["test_cmd"] + " && false"}
  result = grading.grade(task, task["patch"], factory)
  assert ">>>>> Test Exit Code: 1" in result.log and "PASSED" in result.log
  assert not result.resolved and result.error == "no test results in the log"
  script = grading.harness_eval_script(tasks[0], "/testbed")
  assert script.count("SWEBENCH_TEST_EXIT_CODE=$?") == 1
