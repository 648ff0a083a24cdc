"""The real swebench harness grades our tasks on locally built images, and agrees with `grade`.

Gold: `python -m swebench.harness.run_evaluation` (the CLI, as a user runs it) on a dataset
file and a predictions file we write. Empty patch: the harness's own `run_instance` in its
no-patch mode (the CLI skips empty predictions without running them). Then our `grade` in a
DockerSandbox of the same image gives the same verdicts and per-test statuses.
"""

import json
import subprocess
import sys

import docker
import pytest

from configs import base
from dagger_jax.envs import grading
from dagger_jax.envs.tasks import docker as task_docker
from dagger_jax.envs.tasks import toy

pytestmark = pytest.mark.docker


def _pypi_task(tmp_path):
  from dagger_jax.envs.tasks import pypi
  env = base.get_config().env
  env.sandbox = "docker"  # the mutation search runs in the base image, like the grading
  try:
    return pypi.generate("inflection", 1, seed=3, out_path=str(tmp_path / "t.jsonl"),
                         env_config=env, cache_dir=str(tmp_path / "sdists"))[0]
  except pypi.PypiError as e:
    if "registry" in str(e):
      pytest.skip(f"the package registry is unreachable: {e}")
    raise


@pytest.fixture(params=["toy", "pypi:inflection"])
def task_and_image(request, tmp_path_factory):
  if request.param == "toy":
    task = toy.generate(1, seed=21)[0]
  else:
    task = _pypi_task(tmp_path_factory.mktemp("pypi"))
  image = task_docker.build_instance_image(task)  # the tag pins base_commit: reuse is exact
  yield task, image
  docker.from_env().images.remove(image, force=True)


@pytest.mark.slow
def test_harness_resolves_gold_not_empty_and_agrees_with_grade(task_and_image, tmp_path,
                                                               monkeypatch):
  task, image = task_and_image
  iid = task["instance_id"]
  dataset = tmp_path / "dataset.jsonl"
  dataset.write_text(json.dumps(grading.to_swebench_instance(task, image)) + "\n")
  preds = tmp_path / "preds.jsonl"
  grading.write_predictions(str(preds), [(iid, task["patch"])], "gold-check")

  r = subprocess.run([sys.executable, "-m", "swebench.harness.run_evaluation",
                      "--dataset_name", str(dataset), "--predictions_path", str(preds),
                      "--run_id", "dj", "--max_workers", "1", "--timeout", "300",
                      "--report_dir", str(tmp_path)],
                     cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  report = json.loads((tmp_path / "gold-check.dj.json").read_text())
  assert report["resolved_ids"] == [iid], r.stdout[-3000:]
  assert report["error_ids"] == [] and report["submitted_instances"] == 1
  instance_report = json.loads(
      (tmp_path / "logs/run_evaluation/dj/gold-check" / iid / "report.json").read_text())[iid]
  assert sorted(instance_report["tests_status"]["FAIL_TO_PASS"]["success"]) == sorted(
      task["FAIL_TO_PASS"])
  assert instance_report["tests_status"]["PASS_TO_PASS"]["failure"] == []
  assert "pulled" not in r.stdout.lower() and "attempting to pull" not in (
      (tmp_path / "logs/run_evaluation/dj/gold-check" / iid / "run_instance.log").read_text())

  # Empty patch: the harness's run_instance with skip_patch (the tests run on the buggy tree).
  monkeypatch.chdir(tmp_path)
  from swebench.harness.run_evaluation import run_instance
  from swebench.harness.utils import make_test_spec
  spec = make_test_spec(grading.to_swebench_instance(task, image))
  _, empty = run_instance(spec, {"instance_id": iid, "model_name_or_path": "empty-check",
                                 "model_patch": ""}, docker.from_env(), "dj", 300,
                          skip_patch=True)
  assert empty[iid]["resolved"] is False and empty[iid]["patch_successfully_applied"] is True
  assert sorted(empty[iid]["tests_status"]["FAIL_TO_PASS"]["failure"]) == sorted(
      task["FAIL_TO_PASS"])

  # Our grade, in a DockerSandbox of the same image, reaches the same verdicts.
  env = base.get_config().env
  env.sandbox = "docker"
  factory = grading.sandbox_factory(env, timeout=300)
  image_task = {**task, "image": image}
  ours_gold = grading.grade(image_task, task["patch"], factory)
  ours_empty = grading.grade(image_task, "", factory)
  assert ours_gold.resolved and not ours_empty.resolved
  assert set(ours_empty.f2p.values()) <= {"FAILED", "ERROR"}
  assert set(ours_empty.p2p.values()) == {"PASSED"}
  harness_f2p_failed = empty[iid]["tests_status"]["FAIL_TO_PASS"]["failure"]
  assert sorted(harness_f2p_failed) == sorted(ours_empty.f2p)


def test_grade_in_docker_copies_a_materialized_repo_into_the_base_image():
  """Without an instance image, sandbox=docker copies the materialized repo into the base image."""
  task = toy.generate(1, seed=22)[0]
  env = base.get_config().env
  env.sandbox = "docker"
  factory = grading.sandbox_factory(env, timeout=300)
  assert grading.grade(task, task["patch"], factory).resolved
  assert not grading.grade(task, "", factory).resolved
