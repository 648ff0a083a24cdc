"""Task sources: Hugging Face datasets through `datasets`, swebench's image names, the held-out
SWE-bench Verified ids, and a plain SWE-bench row graded in its (locally built) instance image.

Nothing downloads: datasets are local folders or `save_to_disk` copies, the Hub is offline, and
the image is built here from a toy task (`tasks.docker.build_instance_image`).
"""

import json
import re
import sys
from collections import Counter

import pytest

from configs import base
from dagger_jax import configlib
from dagger_jax.dagger import loop
from dagger_jax.envs import tasks as T
from dagger_jax.envs.tasks import sources, toy
from dagger_jax.errors import ConfigError
from dagger_jax.rundir import RunDir

VERIFIED_FIRST, VERIFIED_LAST = "astropy__astropy-12907", "sympy__sympy-24661"


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
  """The Hub unreachable (as in CI) and `datasets`' cache in tmp_path, not ~/.cache."""
  import datasets
  import huggingface_hub.constants
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def toy_tasks():
  return toy.generate(4, seed=5)


def _row(task: dict, instance_id: str) -> dict:
  """A plain SWE-bench row of a toy task (no repository source; test lists as JSON strings,
  as the Hub's files store them), keeping its `test_cmd` so that it can be graded."""
  row = {k: task[k] for k in T.REQUIRED_FIELDS}
  row.update(instance_id=instance_id, test_cmd=task["test_cmd"],
             FAIL_TO_PASS=json.dumps(task["FAIL_TO_PASS"]),
             PASS_TO_PASS=json.dumps(task["PASS_TO_PASS"]))
  return row


def _write_parquet(path, rows):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


# ---------------------------------------------------------------------------------------------
# image names


def test_image_name_is_swebenchs_own():
  from swebench.task.checks import expected_image  # swebench's other spelling of the rule
  for iid in (VERIFIED_FIRST, "getmoto__moto-7365", "Project-MONAI__MONAI-1234"):
    assert sources.swebench_image_name(iid) == expected_image(iid)
  assert sources.swebench_image_name(VERIFIED_FIRST) == (
      "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest")
  assert sources.swebench_image_name(VERIFIED_FIRST, "localhost:5000/mirror") == (
      "localhost:5000/mirror/sweb.eval.x86_64.astropy_1776_astropy-12907:latest")


@pytest.mark.parametrize("spec, image", [
    ("swebench", "swebench/sweb.eval.x86_64.getmoto_1776_moto-7365:latest"),
    ("swe-gym", "xingyaoww/sweb.eval.x86_64.getmoto_s_moto-7365:latest"),  # OpenHands' `_s_`
    ("reg.example/{repo}:{docker_id}", "reg.example/getmoto/moto:getmoto_1776_moto-7365"),
])
def test_image_naming_specs(spec, image):
  assert sources.image_namer(spec)({"instance_id": "getmoto__moto-7365",
                                    "repo": "getmoto/moto"}) == image


@pytest.mark.parametrize("spec, needle", [
    ("{nope}", "unknown template field(s) ['nope']"),
    ("{instance_id", "not a valid template"),
    ("Swebench", "not a registry namespace"),
])
def test_bad_image_naming_is_refused_by_the_config_check(spec, needle):
  c = base.get_config()
  c.tasks.train_images = spec
  with pytest.raises(ConfigError, match=re.escape(f"config.tasks.train_images={spec!r}: {needle}")):
    configlib.validate(c)


def test_split_spec():
  assert sources.split_spec("SWE-Gym/SWE-Gym", "train") == ("SWE-Gym/SWE-Gym", "train")
  assert sources.split_spec("princeton-nlp/SWE-bench_Verified:test", "train") == (
      "princeton-nlp/SWE-bench_Verified", "test")
  assert sources.split_spec("a/b:train[:10]", "x") == ("a/b", "train[:10]")
  assert sources.split_spec("host:5000/saved", "test") == ("host:5000/saved", "test")


# ---------------------------------------------------------------------------------------------
# files and datasets


def test_parquet_row_without_source_gets_its_instance_image(tmp_path, toy_tasks):
  path = _write_parquet(tmp_path / "t.parquet", [_row(toy_tasks[0], VERIFIED_FIRST)])
  with pytest.raises(T.TaskError, match=r"t.parquet\[0\] \(instance astropy__astropy-12907\): "
                     "no repository source"):
    sources.load(path, key="config.tasks.eval_file", default_split="test", images="")
  [t] = sources.load(path, key="config.tasks.eval_file", default_split="test",
                     images="swebench")
  assert t["image"] == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
  assert t["FAIL_TO_PASS"] == toy_tasks[0]["FAIL_TO_PASS"] and "repo_files" not in t
  [t] = sources.load(path, key="k", default_split="test", images="swebench",
                     repo_template="clones/{repo}")  # a local clone wins over an image
  assert "image" not in t and t["repo_dir"].endswith("/clones/" + toy_tasks[0]["repo"])
  with pytest.raises(ConfigError, match="config.tasks.eval_file=/nope/t.jsonl: no such file"):
    sources.load("/nope/t.jsonl", key="config.tasks.eval_file", default_split="test")


def test_hub_name_loads_through_datasets_with_its_split(tmp_path, toy_tasks, monkeypatch):
  """`datasets.load_dataset(NAME, split=...)` for real, on a folder laid out as the Hub's
  (NAME relative to the working directory, as load_dataset resolves it before the Hub)."""
  monkeypatch.chdir(tmp_path)
  _write_parquet(tmp_path / "acme/swe-tasks/data/train-00000-of-00001.parquet",
                 [_row(t, f"acme__widgets-{i}") for i, t in enumerate(toy_tasks[:3])])
  _write_parquet(tmp_path / "acme/swe-tasks/data/test-00000-of-00001.parquet",
                 [_row(toy_tasks[3], "acme__widgets-9")])
  train = sources.load("acme/swe-tasks", key="config.tasks.source", default_split="train",
                       images="swe-gym")
  assert [t["instance_id"] for t in train] == ["acme__widgets-0", "acme__widgets-1",
                                               "acme__widgets-2"]
  assert train[0]["image"] == "xingyaoww/sweb.eval.x86_64.acme_s_widgets-0:latest"
  [test] = sources.load("acme/swe-tasks:test", key="k", default_split="train",
                        images="swebench")
  assert test["instance_id"] == "acme__widgets-9" and test["patch"] == toy_tasks[3]["patch"]
  with pytest.raises(ConfigError, match=r"config.tasks.eval_file=acme/swe-tasks:dev: cannot "
                     r"load the Hugging Face dataset 'acme/swe-tasks', split 'dev': Unknown"):
    sources.load("acme/swe-tasks:dev", key="config.tasks.eval_file", default_split="test")


def test_saved_to_disk_dataset_and_bad_rows_name_the_row(tmp_path, toy_tasks):
  import datasets
  rows = [_row(t, f"acme__widgets-{i}") for i, t in enumerate(toy_tasks[:2])]
  datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
      str(tmp_path / "saved"))
  got = sources.load(str(tmp_path / "saved"), key="k", default_split="train", images="swebench")
  assert [t["instance_id"] for t in got] == ["acme__widgets-0", "acme__widgets-1"]
  with pytest.raises(ConfigError, match="has no split 'test' \\(it has train\\)"):
    sources.load(str(tmp_path / "saved"), key="k", default_split="test", images="swebench")
  bad = [rows[0], {**rows[1], "instance_id": "acme__widgets-0"}]
  datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "dup"))
  with pytest.raises(T.TaskError, match="dup:train: duplicate instance_id 'acme__widgets-0'"):
    sources.load(str(tmp_path / "dup"), key="k", default_split="train", images="swebench")
  datasets.Dataset.from_list([{k: v for k, v in rows[0].items() if k != "patch"}]).save_to_disk(
      str(tmp_path / "missing"))
  with pytest.raises(T.TaskError, match=r"missing:train\[0\] \(instance acme__widgets-0\): "
                     "missing field 'patch'"):
    sources.load(str(tmp_path / "missing"), key="k", default_split="train", images="swebench")


def test_uncached_hub_dataset_is_one_clear_error():
  with pytest.raises(ConfigError) as e:
    sources.load("princeton-nlp/SWE-bench_Verified", key="config.tasks.eval_file",
                 default_split="test")
  msg = str(e.value)
  assert msg.startswith("config.tasks.eval_file=princeton-nlp/SWE-bench_Verified: cannot load "
                        "the Hugging Face dataset 'princeton-nlp/SWE-bench_Verified', split "
                        "'test'")
  assert "HF_DATASETS_OFFLINE=1" in msg and "datasets.load_dataset(" in msg and "\n" not in msg


def test_without_the_datasets_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
  with pytest.raises(ConfigError, match=r"config.tasks.source=SWE-Gym/SWE-Gym: reading a "
                     r"Hugging Face dataset needs the `datasets` package \(pip install datasets\)"):
    sources.load("SWE-Gym/SWE-Gym", key="config.tasks.source", default_split="train")


# ---------------------------------------------------------------------------------------------
# SWE-bench Verified is held out


def test_verified_ids_file():
  ids = sources.verified_ids()
  assert len(ids) == 500 and VERIFIED_FIRST in ids and VERIFIED_LAST in ids
  assert all(re.fullmatch(r"[\w.-]+__[\w.-]+-\d+", i) for i in ids)
  per_repo = Counter(i.split("__")[0] for i in ids)  # the published composition of Verified
  assert per_repo == {"django": 231, "sympy": 75, "sphinx-doc": 44, "matplotlib": 34,
                      "scikit-learn": 32, "astropy": 22, "pydata": 22, "pytest-dev": 19,
                      "pylint-dev": 10, "psf": 8, "mwaskom": 2, "pallets": 1}
  with open(sources.VERIFIED_IDS_FILE) as f:
    lines = [line.strip() for line in f if not line.startswith("#")]
  assert lines == sorted(set(lines))


def _config(tmp_path, **tasks):
  c = base.get_config()
  c.workdir = str(tmp_path / "run")
  c.tasks.update(tasks)
  return c


def test_training_on_verified_is_refused_evaluating_on_it_is_not(tmp_path, toy_tasks):
  verified = _write_parquet(tmp_path / "verified.parquet",
                            [_row(toy_tasks[0], VERIFIED_FIRST), _row(toy_tasks[1], VERIFIED_LAST)])
  mine = str(tmp_path / "mine.jsonl")
  T.save_tasks(mine, toy_tasks[2:])
  train, evaluation = loop.load_or_make_tasks(
      _config(tmp_path, train_file=mine, eval_file=verified), str(tmp_path / "run"))
  assert [t["instance_id"] for t in evaluation] == [VERIFIED_FIRST, VERIFIED_LAST]
  assert evaluation[0]["image"] == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
  assert len(train) == 2

  with pytest.raises(T.TaskError) as e:
    loop.load_or_make_tasks(_config(tmp_path, source=verified, eval_file=mine),
                            str(tmp_path / "run"))
  msg = str(e.value)
  assert msg.startswith(f"config.tasks.source={verified}: 2 training task(s) are SWE-bench "
                        f"Verified instances, the held-out evaluation set: {VERIFIED_FIRST}, "
                        f"{VERIFIED_LAST}")
  assert "config.tasks.allow_held_out_training=True" in msg
  train, _ = loop.load_or_make_tasks(  # the escape hatch, deliberately
      _config(tmp_path, source=verified, eval_file=mine, allow_held_out_training=True),
      str(tmp_path / "run"))
  assert [t["instance_id"] for t in train] == [VERIFIED_FIRST, VERIFIED_LAST]


def test_training_on_the_runs_own_evaluation_tasks_is_refused(tmp_path, toy_tasks):
  both = str(tmp_path / "t.jsonl")
  T.save_tasks(both, toy_tasks)
  with pytest.raises(T.TaskError, match=f"config.tasks.train_file={re.escape(both)}: 4 training "
                     f"task\\(s\\) are also evaluation tasks of this run: "
                     f"{toy_tasks[0]['instance_id']}"):
    loop.load_or_make_tasks(_config(tmp_path, train_file=both, eval_file=both),
                            str(tmp_path / "run"))


def test_a_dataset_source_trains_and_is_recorded_in_the_run(tmp_path, toy_tasks, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _write_parquet(tmp_path / "acme/gym/data/train-00000-of-00001.parquet",
                 [_row(t, f"acme__gym-{i}") for i, t in enumerate(toy_tasks[:3])])
  evaluation = str(tmp_path / "eval.jsonl")
  T.save_tasks(evaluation, toy_tasks[3:])
  c = _config(tmp_path, source="acme/gym", eval_file=evaluation, train_images="swe-gym")
  train, ev = loop.load_or_make_tasks(c, c.workdir)
  assert [t["image"] for t in train] == [
      f"xingyaoww/sweb.eval.x86_64.acme_s_gym-{i}:latest" for i in range(3)]
  assert T.load_tasks(RunDir(c.workdir).tasks("train")) == train  # what was trained on
  assert ev == T.load_tasks(evaluation)
  # Said before the dataset is loaded (a Hub download could take hours): "acme/absent" is not.
  with pytest.raises(ConfigError, match="config.tasks.source='acme/absent': no eval tasks; set "
                     "config.tasks.eval_file"):
    loop.load_or_make_tasks(_config(tmp_path, source="acme/absent"), str(tmp_path / "run2"))
  c = _config(tmp_path, source="acme/absent", eval_file=evaluation)
  c.dagger.eval_split = "validation"
  with pytest.raises(ConfigError, match="no validation tasks; validation tasks are drawn from a "
                     "toy family only"):
    loop.load_or_make_tasks(c, str(tmp_path / "run2"))


# ---------------------------------------------------------------------------------------------
# grading a plain SWE-bench row in its instance image


@pytest.mark.docker
def test_parquet_row_grades_in_its_swebench_named_image(tmp_path, toy_tasks):
  """A row with no repository source, named as swebench names instance images (in a test
  namespace), grades through the docker sandbox on that image: gold resolves, empty does not."""
  import docker

  from dagger_jax.envs import grading
  from dagger_jax.envs.tasks import docker as task_docker

  iid = "acme__widgets-7"
  expected = "dagger-jax-test/sweb.eval.x86_64.acme_1776_widgets-7:latest"
  path = _write_parquet(tmp_path / "t.parquet", [_row(toy_tasks[0], iid)])
  [task] = sources.load(path, key="config.tasks.eval_file", default_split="test",
                        images="dagger-jax-test")
  assert task["image"] == expected and "repo_files" not in task

  built = task_docker.build_instance_image({**toy_tasks[0], "instance_id": iid})
  client = docker.from_env()
  client.images.get(built).tag(expected.rsplit(":", 1)[0], "latest")
  try:
    env = base.get_config().env
    env.sandbox = "docker"
    factory = grading.sandbox_factory(env, timeout=120)
    gold = grading.grade(task, task["patch"], factory)
    empty = grading.grade(task, "", factory)
    assert gold.resolved, (gold.error, gold.f2p, gold.p2p, gold.log[-2000:])
    assert not empty.resolved and empty.f2p == {t: "FAILED" for t in task["FAIL_TO_PASS"]}
  finally:
    client.images.remove(expected, force=True)
    client.images.remove(built, force=True)
