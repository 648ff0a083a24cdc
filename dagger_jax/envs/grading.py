"""Grading a submitted patch the way the swebench harness does, inside a fresh task sandbox.

  1. open a fresh sandbox of the task (its repository at base_commit);
  2. apply the patch with the harness's fallback chain (git apply, --reject, patch --fuzz),
     then undo its changes to the tests (`_fresh_tests`): the tests that grade a submission are
     always the task's own, so an agent that edits them to pass (or adds a conftest.py that
     marks failures passed) changes nothing;
  3. run the task's eval script: reset the test files, apply `test_patch`, run the tests between
     swebench's `>>>>> Start/End Test Output` markers and record the test command's exit code;
  4. parse the log with swebench's own machinery (`get_logs_eval`: the repo's log parser, the
     exit-code cross-check), and score it with `get_eval_tests_report` / `get_resolution_status`:
     resolved iff every FAIL_TO_PASS test passes and every PASS_TO_PASS test still passes.

The eval script is the same one `to_swebench_instance` hands to `python -m
swebench.harness.run_evaluation`, so our grade and the harness's agree by construction (tested
in tests/test_swebench_harness.py) for every patch that leaves the tests alone, as gold patches do.
(The harness applies a prediction whole and resets only the files of `test_patch`; here every
test file is the task's own.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import tempfile
import tomllib
from typing import Any, Callable, ContextManager, Iterator, Iterable, Protocol

from swebench.harness import constants as C
from swebench.harness.grading import (get_eval_tests_report, get_logs_eval,
                                      get_resolution_status)
from swebench.types import TestSpec

from dagger_jax.envs.sandbox import make_sandbox, reap_stale, scratch_dir
from dagger_jax.envs.tasks import TaskError, materialize, patch_files

# The harness's chain (swebench.harness.run_evaluation.GIT_APPLY_CMDS), with a reset in between.
GIT_APPLY_CMDS = ("git apply --verbose", "git apply --verbose --reject",
                  "patch --batch --forward --fuzz=5 -p1 -i")
_PATCH_FILE = ".git/dagger_jax_model.patch"  # inside .git: never part of the working tree
# A path holds tests when it contains one of these: SWE-bench's own rule for splitting a pull
# request into the gold `patch` and the `test_patch` (swebench/collect/utils.py::extract_patches),
# so no gold patch touches such a path. It covers test modules and folders, conftest.py,
# pytest.ini and the toy tasks' run_tests.py.
TEST_PATH_WORDS = ("test", "e2e")
# Files whose pytest section the submission may not change (`_fresh_tests`): an
# `addopts = -p plugin` there loads a plugin from a file outside the tests.
_PYTEST_CONFIG_FILES = ("tox.ini", "setup.cfg", "pyproject.toml")
_EVAL_FILE = ".git/dagger_jax_eval.sh"


class SandboxLike(Protocol):
  """What grading needs of `dagger_jax.envs.sandbox.Sandbox`."""
  workdir: str

  def run(self, command: str, timeout: float | None = None): ...
  def write_file(self, path: str, data: bytes) -> None: ...


SandboxFactory = Callable[[dict], ContextManager[SandboxLike]]


@dataclasses.dataclass
class GradeResult:
  """One graded submission. `f2p` / `p2p` map each expected test to its status in the log
  (PASSED, FAILED, ERROR, SKIPPED, XFAIL, or MISSING when the log does not name it)."""
  instance_id: str
  resolved: bool
  patch_applied: bool
  f2p: dict[str, str]
  p2p: dict[str, str]
  log: str
  error: str = ""  # why there are no test results (patch did not apply, timeout, ...)

  def summary(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("log")
    return d


@contextlib.contextmanager
def task_sandbox(task: dict, env_config: Any, **limit_overrides) -> Iterator[SandboxLike]:
  """A fresh sandbox (`config.env.sandbox`) holding the task's repository at base_commit.

  docker + a task `image`: a container of that image (the repository is already in /testbed);
  otherwise the task is materialized into a temporary directory, which bwrap binds (or docker
  copies into the base image) at /testbed, and which is removed afterwards.
  """
  if env_config.sandbox == "docker" and task.get("image"):
    with make_sandbox(env_config, image=task["image"], **limit_overrides) as sb:
      yield sb
    return
  scratch = scratch_dir(env_config)
  reap_stale(scratch, rmtree=True)  # checkouts of SIGKILLed runs
  tmp = tempfile.mkdtemp(prefix=f"dagger-jax-task-{os.getpid()}-", dir=scratch)
  try:
    repo = os.path.join(tmp, "repo")
    materialize(task, repo)
    with make_sandbox(env_config, host_workdir=repo, **limit_overrides) as sb:
      yield sb
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def sandbox_factory(env_config: Any, timeout: float | None = None) -> SandboxFactory:
  """`grade`'s factory: task sandboxes whose output cap holds a whole test log (50M chars) and
  whose command timeout is the grading timeout (`timeout`, else `config.env.grade_timeout`)."""
  if timeout is None:
    timeout = float(env_config.grade_timeout)
  return lambda task: task_sandbox(task, env_config, command_timeout=timeout,
                                   max_output_chars=50_000_000)


# ----------------------------------------------------------------------------------------------
# Eval script and log parser


def log_parser_name(task: dict) -> str:
  """The task's `log_parser`, else swebench's parser for its repo, else `parse_log_pytest`."""
  if task.get("log_parser"):
    return task["log_parser"]
  from swebench.harness.log_parsers.python import MAP_REPO_TO_PARSER_PY  # heavy: real repos only
  fn = MAP_REPO_TO_PARSER_PY.get(task["repo"])
  return fn.__name__ if fn is not None else "parse_log_pytest"


def _heredoc(text: str, tag: str) -> tuple[str, str]:
  while tag in text:
    tag += "_"
  return tag, text if text.endswith("\n") else text + "\n"


def make_eval_script(task: dict, workdir: str) -> str:
  """The eval script of a swebench dataset row, for a task whose repository is at `workdir`.

  As in swebench's datasets it has no exit-code bookkeeping: the harness's `make_test_spec`
  adds that (`record_test_exit_code`), and `harness_eval_script` applies the same step for us.

  Tasks that carry swebench's own `eval_script` (official instances) use it unchanged; others
  need `test_cmd`. Test files the test_patch touches are reset first (checked out at
  base_commit, or removed if they are new), so a submission cannot edit the grader's tests.
  """
  if task.get("eval_script"):
    return task["eval_script"]
  if not task.get("test_cmd"):
    raise TaskError(f"task {task['instance_id']}: no `test_cmd` and no `eval_script`: "
                    "cannot grade it")
  base = task["base_commit"]
  reset = [f"git checkout -q {base} -- {shlex.quote(f)} 2>/dev/null || rm -f {shlex.quote(f)}"
           for f in patch_files(task["test_patch"])]
  lines = ["#!/bin/bash", "set -uxo pipefail", f"cd {shlex.quote(workdir)}", *reset]
  if task["test_patch"].strip():
    tag, body = _heredoc(task["test_patch"], "EOF_DAGGER_JAX_TEST_PATCH")
    lines += [f"git apply --verbose - <<'{tag}' || {{ echo '{C.TESTS_ERROR}: test_patch did not "
              f"apply'; exit 1; }}", body.rstrip("\n"), tag]
  lines += [f"echo '{C.START_TEST_OUTPUT}'", task["test_cmd"], f"echo '{C.END_TEST_OUTPUT}'",
            *reset]
  return "\n".join(lines) + "\n"


def harness_eval_script(task: dict, workdir: str) -> str:
  """The script the harness would run: swebench's `make_test_spec(row).eval_script`."""
  from swebench.harness.utils import make_test_spec  # heavy (datasets): real repos only
  return make_test_spec(to_swebench_instance(task, image="", workdir=workdir)).eval_script


def _test_spec(task: dict) -> TestSpec:
  return TestSpec(instance_id=task["instance_id"], image=task.get("image", ""),
                  eval_script_list=[], repo=task["repo"], version=str(task.get("version", "0")),
                  FAIL_TO_PASS=task["FAIL_TO_PASS"], PASS_TO_PASS=task["PASS_TO_PASS"],
                  log_parser=log_parser_name(task),
                  eval_type=task.get("eval_type") or C.EvalType.PASS_AND_FAIL.value)


def score_log(task: dict, log: str) -> tuple[bool, dict[str, str], dict[str, str], bool]:
  """(resolved, f2p statuses, p2p statuses, log had test results) from a test log."""
  spec = _test_spec(task)
  with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
    f.write(log)
  try:
    status_map, found = get_logs_eval(spec, f.name)
  finally:
    os.unlink(f.name)
  f2p = {t: status_map.get(t, "MISSING") for t in spec.FAIL_TO_PASS}
  p2p = {t: status_map.get(t, "MISSING") for t in spec.PASS_TO_PASS}
  if not found:
    return False, f2p, p2p, False
  report = get_eval_tests_report(status_map, {"instance_id": spec.instance_id,
                                              C.FAIL_TO_PASS: spec.FAIL_TO_PASS,
                                              C.PASS_TO_PASS: spec.PASS_TO_PASS},
                                 eval_type=C.EvalType(spec.eval_type))
  return get_resolution_status(report) == C.ResolvedStatus.FULL.value, f2p, p2p, True


# ----------------------------------------------------------------------------------------------
# Grading


def is_test_path(path: str) -> bool:
  return any(w in path for w in TEST_PATH_WORDS)


def _pytest_section(name: str, text: str | None):
  """The pytest settings of one config file's text (None: no file, or no section)."""
  if text is None:
    return None
  if name == "pyproject.toml":
    tool = tomllib.loads(text).get("tool", {})
    pytest = tool.get("pytest", {})
    return pytest or None
  import configparser
  parser = configparser.ConfigParser(interpolation=None, strict=False)
  parser.read_string(text)
  sections = ("pytest",) if name == "tox.ini" else ("tool:pytest",)
  return {s: dict(parser[s]) for s in sections if parser.has_section(s)} or None


def _git_paths(sb: SandboxLike, args: str) -> set[str]:
  r = sb.run(f"git -c safe.directory='*' {args} -z")
  if r.returncode != 0:
    raise TaskError(f"grading: `git {args}` failed: {r.output[-500:]}")
  return {p for p in r.output.split("\0") if p}


def _untracked(sb: SandboxLike) -> set[str]:
  """Untracked files, ignored ones too (a patch may edit .gitignore)."""
  return _git_paths(sb, "ls-files --others")


def _fresh_tests(sb: SandboxLike, task: dict, untracked_before: set[str],
                 log: list[str]) -> None:
  """After the patch: every test path (`is_test_path`) it changed, deleted or added is put back
  as at base_commit (removed if new), and so is every tox.ini / setup.cfg / pyproject.toml whose
  pytest settings it changed, or that no longer parses. Works on the tree, not on the patch
  text, so no way of writing the patch (renames, symlinks, a second `---` header inside a file
  diff) gets a changed test past it. Untracked files that were there before the patch (build
  outputs of the image) are left alone."""
  base = task["base_commit"]
  changed = sorted(_git_paths(sb, f"diff --no-renames --name-only {base}")
                   | (_untracked(sb) - untracked_before))
  restore = [p for p in changed if is_test_path(p)]
  for path in changed:
    name = os.path.basename(path)
    if name in _PYTEST_CONFIG_FILES and not is_test_path(path):
      q = shlex.quote(path)
      old = sb.run(f"git -c safe.directory='*' show {base}:{q}")
      new = sb.run(f"cat -- {q}")
      try:
        if (_pytest_section(name, old.output if old.returncode == 0 else None)
            != _pytest_section(name, new.output if new.returncode == 0 else None)):
          restore.append(path)
      except (ValueError, KeyError, tomllib.TOMLDecodeError):  # configparser errors too
        restore.append(path)
  if not restore:
    return
  quoted = " ".join(shlex.quote(p) for p in restore)
  r = sb.run(f"rm -rf -- {quoted}; for p in {quoted}; do "
             f"git -c safe.directory='*' --literal-pathspecs checkout -q {base} -- \"$p\" "
             "2>/dev/null; done; git -c safe.directory='*' --literal-pathspecs diff --no-renames "
             f"--name-only {base} -- {quoted}")
  if r.output.strip():
    raise TaskError(f"grading: could not put back the task's tests {r.output.split()}")
  log.append("grading uses the task's own tests: the submission's changes to "
             f"{', '.join(restore)} are undone")


def _apply_patch(sb: SandboxLike, patch: str, log: list[str]) -> bool:
  sb.write_file(_PATCH_FILE, patch.encode())
  for i, cmd in enumerate(GIT_APPLY_CMDS):
    if i:
      sb.run("git checkout -- . && git clean -fdq")
    r = sb.run(f"{cmd} {_PATCH_FILE}")
    if r.returncode == 0:
      log.append(f"{C.APPLY_PATCH_PASS} ({cmd}):\n{r.output}")
      return True
    log.append(f"patch did not apply with `{cmd}`:\n{r.output}")
  if sb.run(f"git apply --check --reverse {_PATCH_FILE}").returncode == 0:
    log.append(f"{C.APPLY_PATCH_PASS}: the patch is already applied")
    return True
  log.append(C.APPLY_PATCH_FAIL)
  return False


def grade(task: dict, patch: str | None, sandbox_factory: SandboxFactory) -> GradeResult:
  """Grades `patch` (a unified diff; "" or None = no change) on a fresh sandbox of `task`.

  `sandbox_factory(task)` returns a context manager yielding a sandbox whose workdir holds the
  task's repository at base_commit, with an output limit large enough for a whole test log
  (see `sandbox_factory`); its command timeout bounds the test run.
  """
  iid = task["instance_id"]
  log: list[str] = []
  with sandbox_factory(task) as sb:
    applied = True
    if patch and patch.strip():
      untracked = _untracked(sb)
      applied = _apply_patch(sb, patch, log)
      if applied:
        _fresh_tests(sb, task, untracked, log)
    if not applied:
      f2p = {t: "MISSING" for t in task["FAIL_TO_PASS"]}
      p2p = {t: "MISSING" for t in task["PASS_TO_PASS"]}
      return GradeResult(iid, False, False, f2p, p2p, "\n".join(log), "patch did not apply")
    sb.write_file(_EVAL_FILE, harness_eval_script(task, sb.workdir).encode())
    r = sb.run(f"bash {_EVAL_FILE}")
    log.append(r.output)
    if r.timed_out:
      log.append(f"{C.TESTS_TIMEOUT}: the tests ran past the time limit ({r.duration_s:.0f} s)")
  text = "\n".join(log)
  resolved, f2p, p2p, found = score_log(task, text)
  error = "" if found else ("tests timed out" if r.timed_out else "no test results in the log")
  return GradeResult(iid, resolved, True, f2p, p2p, text, error)


# ----------------------------------------------------------------------------------------------
# swebench interop


def to_swebench_instance(task: dict, image: str, workdir: str = "/testbed") -> dict:
  """The task as a swebench 5 dataset row for `run_evaluation` on a pre-built `image`."""
  row = {k: task[k] for k in ("instance_id", "repo", "base_commit", "problem_statement",
                              "patch", "test_patch", "FAIL_TO_PASS", "PASS_TO_PASS")}
  row.update(image=image, version=str(task.get("version", "0")),
             log_parser=log_parser_name(task),
             eval_type=task.get("eval_type") or C.EvalType.PASS_AND_FAIL.value,
             eval_script=make_eval_script(task, workdir))
  return row


def write_predictions(path: str, patches: Iterable[tuple[str, str | None]],
                      model_name_or_path: str) -> None:
  """Writes SWE-bench predictions JSONL: one {instance_id, model_name_or_path, model_patch}
  per (instance_id, patch) pair, as `python -m swebench.harness.run_evaluation -p` reads it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for instance_id, patch in patches:
      f.write(json.dumps({"instance_id": instance_id, "model_name_or_path": model_name_or_path,
                          "model_patch": patch or ""}) + "\n")
  os.replace(path + ".tmp", path)
