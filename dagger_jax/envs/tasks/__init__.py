"""SWE tasks: SWE-bench-format records, how to load them, and how to rebuild their repository.

A task is a plain dict with the SWE-bench fields

  instance_id, repo, base_commit, problem_statement, patch, test_patch,
  FAIL_TO_PASS, PASS_TO_PASS                 (lists of test ids; JSON strings are accepted)

plus where the repository comes from, one of:

  image       a docker image whose /testbed holds the repository at base_commit (SWE-bench style);
  repo_files  {relative path: text} embedded in the record (toy tasks: the record is self-contained);
  repo_dir    a directory, written in the file relative to the tasks file (pypi tasks write a
              `repos/NAME-VERSION/` folder beside the JSONL, shared by all tasks of that library).
              It is either a plain snapshot of the tree (to which the task's optional
              `setup_patch` is applied: pypi tasks inject their bug that way) or a git clone
              that contains base_commit.

and optionally `test_cmd` (the test command run from the repository root after `test_patch` is
applied; our generators set it), `log_parser` (a swebench parser name; default: the repo's own
swebench parser, else `parse_log_pytest`), `split`, and swebench's `version` / `eval_script` /
`eval_type` (kept as-is for `python -m swebench.harness.run_evaluation`).

Tasks files and Hugging Face datasets (SWE-Gym, SWE-bench) are read by `sources.load`, which
also names the per-instance images of rows that have no repository source, and
`sources.refuse_held_out` keeps SWE-bench Verified (the held-out evaluation set) out of training.

Portability. A snapshot (`repo_files`, or a `repo_dir` without `.git`) becomes a git repository
with one commit made with a fixed author, date and message, so its hash is a function of the file
contents only: `base_commit` is that hash, and `materialize` checks it. A tasks file plus its
`repos/` folder can be copied to any machine and rebuilds the same commit there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, Iterable

from dagger_jax.errors import DaggerJaxError

REQUIRED_FIELDS = ("instance_id", "repo", "base_commit", "problem_statement", "patch",
                   "test_patch", "FAIL_TO_PASS", "PASS_TO_PASS")
_LIST_FIELDS = ("FAIL_TO_PASS", "PASS_TO_PASS")
_SOURCES = ("image", "repo_files", "repo_dir")

# Everything that goes into a snapshot commit's hash besides the files.
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "dagger-jax", "GIT_AUTHOR_EMAIL": "tasks@dagger-jax",
    "GIT_COMMITTER_NAME": "dagger-jax", "GIT_COMMITTER_EMAIL": "tasks@dagger-jax",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
}
SNAPSHOT_MESSAGE = "base"


class TaskError(DaggerJaxError, ValueError):
  """A task record or tasks file is malformed; the message names the file, line and field."""


# ----------------------------------------------------------------------------------------------
# Loading and saving


def _check(task: Any, where: str) -> dict:
  """Validates one record and normalises JSON-string test lists to lists."""
  if not isinstance(task, dict):
    raise TaskError(f"{where}: a task must be a JSON object, got {type(task).__name__}")
  task = dict(task)
  iid = task.get("instance_id", "?")
  for field in REQUIRED_FIELDS:
    if field not in task or task[field] is None:
      raise TaskError(f"{where} (instance {iid}): missing field {field!r}")
  for field in REQUIRED_FIELDS:
    if field not in _LIST_FIELDS and not isinstance(task[field], str):
      raise TaskError(f"{where} (instance {iid}): field {field!r} must be a string, "
                      f"got {type(task[field]).__name__}")
  for field in _LIST_FIELDS:
    value = task[field]
    if isinstance(value, str):
      try:
        value = json.loads(value)
      except json.JSONDecodeError as e:
        raise TaskError(f"{where} (instance {iid}): field {field!r} is a string but not a JSON "
                        f"list: {e}") from None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
      raise TaskError(f"{where} (instance {iid}): field {field!r} must be a list of test ids")
    task[field] = list(value)
  if not any(task.get(s) for s in _SOURCES):
    raise TaskError(f"{where} (instance {iid}): no repository source; set one of {_SOURCES}")
  if "repo_files" in task and not (isinstance(task["repo_files"], dict) and all(
      isinstance(k, str) and isinstance(v, str) for k, v in task["repo_files"].items())):
    raise TaskError(f"{where} (instance {iid}): field 'repo_files' must map paths to texts")
  return task


def load_tasks(path: str, *, image_template: str = "", repo_template: str = "") -> list[dict]:
  """Loads tasks from .jsonl, .json (a list, or {id: task}) or .parquet (swebench's loader).

  Records without a repository source (plain SWE-bench / SWE-Gym rows) get one:
  `repo_template`, a local clone holding base_commit (e.g. "/data/clones/{repo}"), or else an
  image named by `image_template` (`sources.image_namer`): a registry namespace for swebench's
  own naming ("swebench" -> "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"), a
  preset ("swe-gym"), or a template with fields {instance_id}, {repo}, {docker_id} (swebench's
  spelling: lower case, `__` -> `_1776_`) and {id_s} (`__` -> `_s_`, SWE-Gym's registry).
  `repo_dir` entries are resolved against the tasks file's folder (absolute in the result).
  Duplicate instance ids are an error.
  """
  return tasks_from_records(_read_records(path), path, image_template=image_template,
                            repo_template=repo_template)


def tasks_from_records(records: list[tuple[str, Any]], path: str, *, image_template: str = "",
                       repo_template: str = "") -> list[dict]:
  """Validated tasks from (location, raw record) pairs read from `path` (a tasks file, or a
  dataset's NAME:SPLIT, whose relative `repo_dir`s resolve against the working directory)."""
  from dagger_jax.envs.tasks import sources  # it imports this module
  name_image = sources.image_namer(image_template)
  tasks = []
  for where, record in records:
    if (name_image or repo_template) and isinstance(record, dict) and not any(
        record.get(s) for s in _SOURCES):
      record = dict(record)
      if repo_template:
        record["repo_dir"] = repo_template.format(**sources.template_fields(record))
      else:
        record["image"] = name_image(record)
    tasks.append(_check(record, where))
  return _finish(path, tasks)


def _read_records(path: str) -> list[tuple[str, Any]]:
  """(location for error messages, raw record) pairs of a tasks file."""
  if not os.path.isfile(path):
    raise TaskError(f"{path}: no such tasks file")
  records: list[tuple[str, Any]] = []
  if path.endswith(".jsonl"):
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named, not a traceback
      for n, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise TaskError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not line.strip():
          continue
        try:
          records.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
          raise TaskError(f"{path}:{n}: not valid JSON: {e}") from None
  elif path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
      except json.JSONDecodeError as e:
        raise TaskError(f"{path}: not valid JSON: {e}") from None
    data = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(data, list):
      raise TaskError(f"{path}: expected a list of tasks or an {{instance_id: task}} object")
    records = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
  elif path.endswith(".parquet"):
    from swebench.harness.utils import load_swebench_dataset  # heavy (datasets): parquet only
    records = [(f"{path}[{i}]", dict(r))
               for i, r in enumerate(load_swebench_dataset(path, split="train"))]
  else:
    raise TaskError(f"{path}: unknown tasks file type (use .jsonl, .json or .parquet)")
  return records


def _finish(path: str, tasks: list[dict]) -> list[dict]:
  """Rejects duplicate ids; resolves relative `repo_dir`s against the tasks file's folder (the
  working directory for a dataset's rows)."""
  base = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else os.getcwd()
  seen: set[str] = set()
  for task in tasks:
    if task["instance_id"] in seen:
      raise TaskError(f"{path}: duplicate instance_id {task['instance_id']!r}")
    seen.add(task["instance_id"])
    if task.get("repo_dir") and not os.path.isabs(task["repo_dir"]):
      task["repo_dir"] = os.path.normpath(os.path.join(base, task["repo_dir"]))
  return tasks


def save_tasks(path: str, tasks: Iterable[dict]) -> None:
  """Writes tasks as JSONL (atomically); `repo_dir` is written relative to the file's folder."""
  base = os.path.dirname(os.path.abspath(path))
  os.makedirs(base, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for task in tasks:
      record = dict(task)
      if record.get("repo_dir"):
        record["repo_dir"] = os.path.relpath(os.path.abspath(record["repo_dir"]), base)
      f.write(json.dumps(record, sort_keys=False) + "\n")
  os.replace(tmp, path)


def get_task(tasks: list[dict], instance_id: str) -> dict:
  for task in tasks:
    if task["instance_id"] == instance_id:
      return task
  known = ", ".join(t["instance_id"] for t in tasks[:5])
  raise TaskError(f"no task with instance_id {instance_id!r} (first ids: {known}, ...)")


# ----------------------------------------------------------------------------------------------
# Repositories


def git(cwd: str, *args: str, stdin: str | None = None, check: bool = True) -> str:
  """Runs git with the fixed identity/date of snapshots; returns stdout."""
  out = subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                       env={**os.environ, **_GIT_ENV})
  if check and out.returncode != 0:
    raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {out.stderr.strip()}")
  return out.stdout


def write_files(dest_dir: str, files: dict[str, str]) -> None:
  for rel, text in files.items():
    path = os.path.join(dest_dir, rel)
    if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
      raise TaskError(f"repo file path {rel!r} leaves the repository")
    os.makedirs(os.path.dirname(path) or dest_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
      f.write(text)


def snapshot_commit(dest_dir: str) -> str:
  """Makes dest_dir a git repository with one deterministic commit of all its files."""
  git(dest_dir, "init", "-q", "-b", "main")
  git(dest_dir, "add", "-A", "--force")
  git(dest_dir, "commit", "-q", "--no-verify", "-m", SNAPSHOT_MESSAGE)
  return git(dest_dir, "rev-parse", "HEAD").strip()


def snapshot_hash(files: dict[str, str]) -> str:
  """The commit `snapshot_commit` makes of `files` (all mode 100644), computed without git.

  Git's object format: blob = "blob LEN\0" + data; tree entries "MODE NAME\0" + raw sha,
  sorted by name (a directory sorts as NAME + "/"); the commit text names tree, author,
  committer and message. tests/test_tasks.py checks it against real git.
  """
  def obj(kind: str, data: bytes) -> bytes:
    return hashlib.sha1(f"{kind} {len(data)}\0".encode() + data).digest()

  root: dict = {}
  for path, text in files.items():
    *dirs, name = path.split("/")
    node = root
    for d in dirs:
      node = node.setdefault(d, {})
    node[name] = text.encode()

  def tree(node: dict) -> bytes:
    entries = []
    for name, child in node.items():
      if isinstance(child, dict):
        entries.append((name + "/", b"40000 " + name.encode() + b"\0" + tree(child)))
      else:
        entries.append((name, b"100644 " + name.encode() + b"\0" + obj("blob", child)))
    return obj("tree", b"".join(e for _, e in sorted(entries, key=lambda x: x[0].encode())))

  stamp = "946684800 +0000"  # _GIT_ENV's 2000-01-01T00:00:00+0000
  ident = f"{_GIT_ENV['GIT_AUTHOR_NAME']} <{_GIT_ENV['GIT_AUTHOR_EMAIL']}> {stamp}"
  commit = (f"tree {tree(root).hex()}\nauthor {ident}\ncommitter {ident}\n\n"
            f"{SNAPSHOT_MESSAGE}\n")
  return obj("commit", commit.encode()).hex()


def diff_files(before: dict[str, str], after: dict[str, str]) -> str:
  """`git diff` of changing the files `before` into `after` (same paths; byte-identical to the
  diff git prints in a repository), made with `git diff --no-index` on just those files."""
  with tempfile.TemporaryDirectory(prefix="dagger_jax_diff_") as tmp:
    write_files(os.path.join(tmp, "a"), before)
    write_files(os.path.join(tmp, "b"), after)
    out = subprocess.run(["git", "diff", "--no-index", "--no-prefix", "--no-ext-diff", "a", "b"],
                         cwd=tmp, capture_output=True, text=True, env={**os.environ, **_GIT_ENV})
  if out.returncode not in (0, 1):
    raise RuntimeError(f"git diff --no-index failed: {out.stderr.strip()}")
  return out.stdout


def _copy_tree(src: str, dest: str) -> None:
  for root, dirs, files in os.walk(src):
    dirs[:] = sorted(d for d in dirs if d != ".git")
    rel = os.path.relpath(root, src)
    os.makedirs(os.path.join(dest, rel), exist_ok=True)
    for name in files:
      s = os.path.join(root, name)
      if os.path.isfile(s):
        shutil.copyfile(s, os.path.join(dest, rel, name))


def build_repo(task: dict, dest_dir: str) -> str:
  """Creates the task's repository in dest_dir (empty or absent); returns its HEAD commit."""
  iid = task["instance_id"]
  os.makedirs(dest_dir, exist_ok=True)
  if os.listdir(dest_dir):
    raise TaskError(f"materialize({iid}): destination {dest_dir} is not empty")
  if task.get("repo_files"):
    write_files(dest_dir, task["repo_files"])
    return snapshot_commit(dest_dir)
  if not task.get("repo_dir"):
    raise TaskError(f"materialize({iid}): the task has only a docker image ({task.get('image')}); "
                    "its repository lives in the image's /testbed")
  src = task["repo_dir"]
  if not os.path.isdir(src):
    raise TaskError(f"materialize({iid}): repo_dir {src} does not exist (copy the repos folder "
                    "that sits beside the tasks file along with it)")
  if os.path.isdir(os.path.join(src, ".git")):
    os.rmdir(dest_dir)
    git(os.path.dirname(os.path.abspath(dest_dir)), "clone", "-q", "--no-checkout", src, dest_dir)
    git(dest_dir, "checkout", "-q", task["base_commit"])
    return git(dest_dir, "rev-parse", "HEAD").strip()
  _copy_tree(src, dest_dir)
  if task.get("setup_patch"):
    git(dest_dir, "init", "-q", "-b", "main")
    git(dest_dir, "apply", "--whitespace=nowarn", "-", stdin=task["setup_patch"])
  return snapshot_commit(dest_dir)


def materialize(task: dict, dest_dir: str) -> None:
  """Creates the task's git repository at base_commit in dest_dir (empty or absent).

  Raises TaskError when the task has only a docker image, or when the rebuilt commit is not
  base_commit (the source was edited, or the record does not belong to it).
  """
  head = build_repo(task, dest_dir)
  if head != task["base_commit"]:
    raise TaskError(f"materialize({task['instance_id']}): rebuilt commit {head} is not "
                    f"base_commit {task['base_commit']}: the repository source does not match "
                    "the record")


def patch_files(patch: str) -> list[str]:
  """Paths a unified git diff touches (b/ side; a/ side for deletions), in order."""
  paths: list[str] = []
  for line in patch.splitlines():
    if line.startswith("diff --git "):
      a, _, b = line[len("diff --git "):].partition(" b/")
      path = b or a[2:]
      if path not in paths:
        paths.append(path)
  return paths
