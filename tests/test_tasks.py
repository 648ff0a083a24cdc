"""Task records: loading (JSONL / JSON / parquet), clear errors, portable repositories, toy tasks."""

import json
import shutil
import subprocess

import pytest

from dagger_jax.envs import tasks as T
from dagger_jax.envs.tasks import toy


@pytest.fixture(scope="module")
def toy_tasks():
  return toy.generate(12, seed=7)


def _git(cwd, *args):
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                        check=True).stdout


# ---------------------------------------------------------------------------------------------
# toy generator


def test_toy_is_deterministic_and_distinct(toy_tasks):
  again = toy.generate(12, seed=7)
  assert [t["instance_id"] for t in again] == [t["instance_id"] for t in toy_tasks]
  assert again == toy_tasks
  assert len({t["instance_id"] for t in toy_tasks}) == 12
  other = toy.generate(12, seed=8)
  assert not {t["instance_id"] for t in other} & {t["instance_id"] for t in toy_tasks}


def test_toy_train_and_test_splits_are_disjoint():
  train = toy.generate(30, seed=0, split="train") + toy.generate(30, seed=1, split="train")
  test = toy.generate(10, seed=0, split="test") + toy.generate(10, seed=1, split="test")
  assert {t["split"] for t in train} == {"train"} and {t["split"] for t in test} == {"test"}
  contents = lambda ts: {json.dumps(t["repo_files"], sort_keys=True) for t in ts}  # noqa: E731
  assert not contents(train) & contents(test)
  assert not {t["instance_id"] for t in train} & {t["instance_id"] for t in test}


def test_toy_covers_several_bug_kinds_and_layouts():
  ts = toy.generate(30, seed=3)
  assert {t["bug"]["kind"] for t in ts} == set(toy.BUG_KINDS)
  assert any("/" in t["bug"]["file"] for t in ts) and any("/" not in t["bug"]["file"] for t in ts)
  assert len({t["repo"] for t in ts}) > 5


def test_toy_files_are_short(toy_tasks):
  for t in toy_tasks:
    for path, text in t["repo_files"].items():
      assert len(text.splitlines()) <= 30, (t["instance_id"], path)
    assert 3 <= len(t["PASS_TO_PASS"]) + len(t["FAIL_TO_PASS"]) - 2 <= 5


def test_toy_fix_cmd_reproduces_the_gold_patch(tmp_path, toy_tasks):
  """The one-line sed in `bug.fix_cmd`, run for real, produces exactly the gold patch (as git
  prints it in the repository), and the test_patch is git's own diff too."""
  for t in toy_tasks:
    repo = tmp_path / t["instance_id"]
    T.materialize(t, str(repo))
    subprocess.run(t["bug"]["fix_cmd"], shell=True, cwd=repo, check=True)
    assert _git(repo, "diff") == t["patch"], t["bug"]
    assert len([l for l in t["patch"].splitlines() if l.startswith("-    ")]) == 1
    _git(repo, "checkout", "--", ".")
    subprocess.run(["git", "apply", "-"], input=t["test_patch"], text=True, cwd=repo, check=True)
    assert _git(repo, "diff") == t["test_patch"]


def test_snapshot_hash_is_gits_commit(tmp_path):
  # Names that sort differently as files and as directories ("a/" > "a.py" > "a-b").
  files = {"a/x.py": "1\n", "a.py": "2\n", "a-b": "", "a0/y": "3", "b/c/d.txt": "é\n",
           ".gitignore": "*.pyc\n"}
  T.write_files(str(tmp_path), files)
  assert T.snapshot_hash(files) == T.snapshot_commit(str(tmp_path))


def test_toy_arith_statement_does_not_leak_the_patch():
  """`toy-arith` gives values only; `toy` gives the correct line on purpose (test_toy_imitable)."""
  for t in toy.generate(12, seed=7, family="toy-arith"):
    assert t["bug"]["new"] not in t["problem_statement"]
    assert t["bug"]["file"] not in t["problem_statement"]
    assert t["test_cmd"] == toy.PYTEST_CMD and "run_tests.py" not in t["repo_files"]


def test_toy_families_are_distinct_and_checked():
  a, b = toy.generate(3, seed=7), toy.generate(3, seed=7, family="toy-arith")
  assert all(t["family"] == "toy" and t["instance_id"].startswith("toy__") for t in a)
  assert all(t["family"] == "toy-arith" and t["instance_id"].startswith("toy_arith__") for t in b)
  with pytest.raises(ValueError, match="unknown toy family 'toy-x'"):
    toy.generate(1, 0, family="toy-x")


# ---------------------------------------------------------------------------------------------
# materialize


def test_materialize_rebuilds_base_commit(tmp_path, toy_tasks):
  t = toy_tasks[0]
  T.materialize(t, str(tmp_path / "r"))
  assert _git(tmp_path / "r", "rev-parse", "HEAD").strip() == t["base_commit"]
  assert _git(tmp_path / "r", "status", "--porcelain") == ""


def test_materialize_refuses_a_tampered_source(tmp_path, toy_tasks):
  t = dict(toy_tasks[0])
  path = t["bug"]["file"]
  t["repo_files"] = {**t["repo_files"], path: t["repo_files"][path] + "# edited\n"}
  with pytest.raises(T.TaskError, match="does not match"):
    T.materialize(t, str(tmp_path / "r"))


def test_materialize_errors(tmp_path, toy_tasks):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(T.TaskError, match="not empty"):
    T.materialize(toy_tasks[0], str(tmp_path / "full"))
  image_only = {k: v for k, v in toy_tasks[0].items() if k != "repo_files"}
  image_only["image"] = "sweb.eval.x86_64.foo:latest"
  with pytest.raises(T.TaskError, match="only a docker image"):
    T.materialize(image_only, str(tmp_path / "img"))


def test_repo_dir_tasks_are_portable(tmp_path, toy_tasks):
  """A tasks file with a `repos/` folder beside it still materializes after being moved."""
  t = toy_tasks[0]
  src = tmp_path / "a" / "repos" / "lib-1.0"
  T.write_files(str(src), t["repo_files"])
  record = {k: v for k, v in t.items() if k != "repo_files"}
  record["repo_dir"] = str(src)
  T.save_tasks(str(tmp_path / "a" / "tasks.jsonl"), [record])
  assert json.loads((tmp_path / "a" / "tasks.jsonl").read_text())["repo_dir"] == "repos/lib-1.0"
  shutil.move(str(tmp_path / "a"), str(tmp_path / "moved"))
  [loaded] = T.load_tasks(str(tmp_path / "moved" / "tasks.jsonl"))
  assert loaded["repo_dir"] == str(tmp_path / "moved" / "repos" / "lib-1.0")
  T.materialize(loaded, str(tmp_path / "r"))
  assert _git(tmp_path / "r", "rev-parse", "HEAD").strip() == t["base_commit"]


def test_repo_dir_git_clone_checks_out_base_commit(tmp_path, toy_tasks):
  t = toy_tasks[0]
  upstream = tmp_path / "upstream"
  T.materialize(t, str(upstream))
  (upstream / "later.txt").write_text("a later commit\n")
  _git(upstream, "add", "-A")
  _git(upstream, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qm", "later")
  record = {k: v for k, v in t.items() if k != "repo_files"}
  record["repo_dir"] = str(upstream)
  T.materialize(record, str(tmp_path / "r"))
  assert _git(tmp_path / "r", "rev-parse", "HEAD").strip() == t["base_commit"]
  assert not (tmp_path / "r" / "later.txt").exists()


# ---------------------------------------------------------------------------------------------
# loading


def test_load_jsonl_json_and_parquet_agree(tmp_path, toy_tasks):
  T.save_tasks(str(tmp_path / "t.jsonl"), toy_tasks)
  from_jsonl = T.load_tasks(str(tmp_path / "t.jsonl"))
  assert from_jsonl == toy_tasks
  (tmp_path / "t.json").write_text(json.dumps({t["instance_id"]: t for t in toy_tasks}))
  assert T.load_tasks(str(tmp_path / "t.json")) == toy_tasks
  # SWE-bench's hub files store the test lists as JSON strings; parquet goes through swebench.
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{**{k: t[k] for k in T.REQUIRED_FIELDS}, "image": "img:latest",
           "FAIL_TO_PASS": json.dumps(t["FAIL_TO_PASS"]),
           "PASS_TO_PASS": json.dumps(t["PASS_TO_PASS"])} for t in toy_tasks]
  pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "t.parquet"))
  from_parquet = T.load_tasks(str(tmp_path / "t.parquet"))
  assert [t["FAIL_TO_PASS"] for t in from_parquet] == [t["FAIL_TO_PASS"] for t in toy_tasks]
  assert [t["patch"] for t in from_parquet] == [t["patch"] for t in toy_tasks]


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: "{not json", "t.jsonl:2: not valid JSON"),
    (lambda r: json.dumps({k: v for k, v in r.items() if k != "test_patch"}),
     "t.jsonl:2 (instance x2): missing field 'test_patch'"),
    (lambda r: json.dumps({**r, "FAIL_TO_PASS": "tests/a.py::t"}), "'FAIL_TO_PASS' is a string"),
    (lambda r: json.dumps({**r, "PASS_TO_PASS": [1, 2]}), "'PASS_TO_PASS' must be a list"),
    (lambda r: json.dumps({k: v for k, v in r.items() if k != "repo_files"}),
     "no repository source"),
    (lambda r: json.dumps({**r, "instance_id": "x1"}), "duplicate instance_id 'x1'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, toy_tasks, mutate, needle):
  good = {**toy_tasks[0], "instance_id": "x1"}
  bad = mutate({**toy_tasks[0], "instance_id": "x2"})
  (tmp_path / "t.jsonl").write_text(json.dumps(good) + "\n" + bad + "\n")
  with pytest.raises(T.TaskError) as e:
    T.load_tasks(str(tmp_path / "t.jsonl"))
  assert needle in str(e.value)


def test_unknown_file_type_and_missing_file(tmp_path):
  with pytest.raises(T.TaskError, match="no such tasks file"):
    T.load_tasks(str(tmp_path / "nope.jsonl"))
  (tmp_path / "t.csv").write_text("a,b\n")
  with pytest.raises(T.TaskError, match="unknown tasks file type"):
    T.load_tasks(str(tmp_path / "t.csv"))


def test_patch_files():
  patch = ("diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n"
           "diff --git a/tests/t.py b/tests/t.py\nnew file mode 100644\n")
  assert T.patch_files(patch) == ["x.py", "tests/t.py"]


def test_plain_swebench_rows_get_a_source_from_a_template(tmp_path, toy_tasks):
  row = {k: toy_tasks[0][k] for k in T.REQUIRED_FIELDS}
  row["instance_id"] = "astropy__astropy-12907"
  (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
  with pytest.raises(T.TaskError, match="no repository source"):
    T.load_tasks(str(tmp_path / "t.jsonl"))
  [t] = T.load_tasks(str(tmp_path / "t.jsonl"),
                     image_template="swebench/sweb.eval.x86_64.{docker_id}:latest")
  assert t["image"] == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
  # A bare namespace: swebench's own naming (tests/test_task_sources.py), the same name here.
  [by_namespace] = T.load_tasks(str(tmp_path / "t.jsonl"), image_template="swebench")
  assert by_namespace["image"] == t["image"]
  [t] = T.load_tasks(str(tmp_path / "t.jsonl"), repo_template="clones/{repo}")
  assert t["repo_dir"] == str(tmp_path / "clones" / row["repo"])
