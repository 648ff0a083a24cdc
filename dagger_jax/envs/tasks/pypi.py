"""`pypi:NAME` tasks: SWE-smith-style bugs injected into a real pure-Python library.

  1. `pip download --no-binary :all: --no-deps NAME` (an sdist: it usually ships the tests) into a
     cache, unpack it, and copy the tree to `repos/NAME-VERSION/` beside the tasks file;
  2. run the library's own tests once in a sandbox (`config.env.sandbox`): the passing ones;
  3. enumerate single-line AST mutations of the library's source (`MUTATORS`: operator swap,
     comparison swap, changed constant / off-by-one, dropped condition, negation removed, swapped
     arguments), try them in a seeded order, and keep one only when at least one passing test
     now fails;
  4. write the task: the failing tests are FAIL_TO_PASS, a sample of the still-passing ones
     PASS_TO_PASS; the test files holding FAIL_TO_PASS tests are removed from the agent's tree
     and come back in `test_patch` (as SWE-bench's new tests do, and the grader resets them);
     the bug and the removal are the task's `setup_patch` over the shared `repo_dir`; the gold
     patch restores the line; the problem statement quotes the failing tests and their assertion
     lines, never the changed code.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Any, Callable, Iterator

from dagger_jax.envs.sandbox import make_sandbox
from dagger_jax.envs.tasks import build_repo, git, snapshot_commit, write_files
from dagger_jax.errors import DaggerJaxError

P2P_SAMPLE = 25  # PASS_TO_PASS tests kept per task
MAX_TRIES_PER_TASK = 25
TEST_TIMEOUT_S = 180.0
_TEST_DIRS = ("tests", "test", "testing")


class PypiError(DaggerJaxError, RuntimeError):
  """The library cannot be turned into tasks; the message says why."""


# ----------------------------------------------------------------------------------------------
# Fetching the sdist


def fetch_sdist(spec: str, cache_dir: str) -> tuple[str, str, str]:
  """Downloads and unpacks the sdist of `spec` (NAME or NAME==VERSION).

  Returns (name, version, unpacked source dir). Raises PypiError when the registry cannot be
  reached and no sdist of that name is cached.
  """
  downloads = os.path.join(cache_dir, "downloads")
  os.makedirs(downloads, exist_ok=True)
  name = re.split(r"[=<>!~\[ ]", spec, maxsplit=1)[0]
  before = set(os.listdir(downloads))
  p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                      "--no-deps", "--no-build-isolation", "-q", "-d", downloads, spec],
                     capture_output=True, text=True, timeout=600)
  key = re.sub(r"[-_.]+", "_", name).lower()
  candidates = [f for f in os.listdir(downloads)
                if re.sub(r"[-_.]+", "_", f).lower().startswith(key + "_")
                and f.endswith((".tar.gz", ".zip", ".tgz"))]
  if p.returncode != 0 and not candidates:
    tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-5:])
    raise PypiError(f"`pip download --no-binary :all: {spec}` failed (is the package registry "
                    f"reachable?):\n{tail}")
  if not candidates:
    raise PypiError(f"pip downloaded no sdist of {name} into {downloads}")
  new = [f for f in candidates if f not in before]
  archive = os.path.join(downloads, sorted(new or candidates)[-1])
  unpacked = os.path.join(cache_dir, "unpacked")
  os.makedirs(unpacked, exist_ok=True)
  root = _unpack(archive, unpacked)
  version = os.path.basename(root)[len(name) + 1:] if "-" in os.path.basename(root) else "0"
  return name, version, root


def _unpack(archive: str, dest: str) -> str:
  if archive.endswith(".zip"):
    with zipfile.ZipFile(archive) as z:
      top = z.namelist()[0].split("/")[0]
      if not os.path.isdir(os.path.join(dest, top)):
        z.extractall(dest)
  else:
    with tarfile.open(archive) as t:
      top = t.getnames()[0].split("/")[0]
      if not os.path.isdir(os.path.join(dest, top)):
        t.extractall(dest, filter="data")
  return os.path.join(dest, top)


# ----------------------------------------------------------------------------------------------
# Layout: where the source and the tests are


def _is_test_path(rel: str) -> bool:
  parts = rel.split("/")
  base = parts[-1]
  return (any(p in _TEST_DIRS for p in parts[:-1]) or base.startswith("test_")
          or base.endswith("_test.py") or base == "conftest.py")


def source_files(root: str) -> list[str]:
  """Library modules (relative paths): .py files outside tests, docs, examples and setup."""
  out = []
  for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, root)
    top = rel.split("/")[0]
    if (_is_test_path(rel) or top in ("docs", "doc", "examples", "benchmarks", "build")
        or rel in ("setup.py", "noxfile.py", "tasks.py", "fabfile.py")):
      continue
    out.append(rel)
  return out


def test_command(root: str) -> str:
  """The pytest command for the sdist's tests (-rA: per-test lines for swebench's parser)."""
  targets = [d for d in _TEST_DIRS if os.path.isdir(os.path.join(root, d))]
  targets += sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "test_*.py")))
  targets += sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "*", "tests"))
                    if not os.path.basename(os.path.dirname(p)).startswith("."))
  if not targets:
    raise PypiError(f"{root}: the sdist ships no tests (no tests/ dir, no test_*.py)")
  pythonpath = "src" if os.path.isdir(os.path.join(root, "src")) else "."
  return (f"PYTHONPATH={pythonpath} python3 -m pytest -rA -p no:cacheprovider -o addopts= "
          f"-q {' '.join(targets)}")


# ----------------------------------------------------------------------------------------------
# Mutations


@dataclasses.dataclass(frozen=True)
class Mutation:
  """Replace columns [col, end_col) of 1-based `line` of `path` with `new`."""
  path: str
  line: int
  col: int
  end_col: int
  new: str
  kind: str

  def apply(self, text: str) -> str:
    lines = text.splitlines(keepends=True)
    old = lines[self.line - 1]
    lines[self.line - 1] = old[:self.col] + self.new + old[self.end_col:]
    return "".join(lines)


_BINOP_SWAPS = {"+": "-", "-": "+", "*": "+", "//": "*", "/": "*", "%": "//", "<<": ">>",
                ">>": "<<", "&": "|", "|": "&", "**": "*"}
_CMP_SWAPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==",
              "in": "not in", "not in": "in", "is": "is not", "is not": "is"}


def _one_line(*nodes: ast.AST) -> bool:
  return all(getattr(n, "lineno", None) is not None and n.lineno == n.end_lineno == nodes[0].lineno
             for n in nodes)


def _between(lines: list[str], left: ast.AST, right: ast.AST) -> tuple[int, int, str]:
  """Columns and text between the end of `left` and the start of `right` (same line)."""
  line = lines[left.end_lineno - 1].encode()
  a, b = left.end_col_offset, right.col_offset
  return a, b, line[a:b].decode()


def mutations(path: str, text: str) -> list[Mutation]:
  """Every single-line mutation of one module (columns are byte offsets, as ast gives them;
  mutated lines are ASCII-checked so byte and character columns agree)."""
  try:
    tree = ast.parse(text)
  except SyntaxError:
    return []
  lines = text.splitlines()
  out: list[Mutation] = []
  docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and n.body and isinstance(n.body[0], ast.Expr)}

  def add(node_line: int, col: int, end_col: int, new: str, kind: str) -> None:
    if lines[node_line - 1].isascii():
      out.append(Mutation(path, node_line, col, end_col, new, kind))

  def swap_symbol(left: ast.AST, right: ast.AST, swaps: dict[str, str], kind: str) -> None:
    if not _one_line(left, right):
      return
    a, b, between = _between(lines, left, right)
    sym = between.strip().strip("()").strip()
    if sym in swaps:
      i = a + between.index(sym)
      add(left.lineno, i, i + len(sym), swaps[sym], kind)

  for node in ast.walk(tree):
    if id(node) in docstrings:
      continue
    if isinstance(node, ast.BinOp):
      swap_symbol(node.left, node.right, _BINOP_SWAPS, "operator_swap")
    elif isinstance(node, ast.AugAssign) and _one_line(node):
      a, b, between = _between(lines, node.target, node.value)
      sym = between.strip()
      if sym.endswith("=") and sym[:-1] in _BINOP_SWAPS:
        i = a + between.index(sym)
        add(node.lineno, i, i + len(sym), _BINOP_SWAPS[sym[:-1]] + "=", "operator_swap")
    elif isinstance(node, ast.Compare) and len(node.ops) == 1:
      swap_symbol(node.left, node.comparators[0], _CMP_SWAPS, "comparison_swap")
    elif (isinstance(node, ast.Constant) and type(node.value) is int and _one_line(node)
          and abs(node.value) <= 1000):
      v = node.value
      kind = "off_by_one" if v in (0, 1, -1) else "changed_constant"
      add(node.lineno, node.col_offset, node.end_col_offset, str(v + 1), kind)
      if v > 0:
        add(node.lineno, node.col_offset, node.end_col_offset, str(v - 1), kind)
    elif isinstance(node, ast.BoolOp) and _one_line(node, *node.values):
      for keep in (node.values[0], node.values[-1]):
        seg = ast.get_source_segment(text, keep)
        add(node.lineno, node.col_offset, node.end_col_offset, seg, "dropped_condition")
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and _one_line(node):
      add(node.lineno, node.col_offset, node.end_col_offset,
          ast.get_source_segment(text, node.operand), "negation_removed")
    elif (isinstance(node, ast.Call) and len(node.args) >= 2
          and not any(isinstance(a, ast.Starred) for a in node.args[:2])
          and _one_line(node.args[0], node.args[1])):
      x, y = node.args[0], node.args[1]
      sx, sy = ast.get_source_segment(text, x), ast.get_source_segment(text, y)
      if sx != sy:
        between = _between(lines, x, y)[2]
        add(x.lineno, x.col_offset, y.end_col_offset, sy + between + sx, "swapped_arguments")
  # Keep mutations whose result still parses (a swap can produce `not in` where it is invalid).
  good = []
  for m in out:
    new_text = m.apply(text)
    if new_text != text:
      try:
        ast.parse(new_text)
      except SyntaxError:
        continue
      good.append(m)
  return good


def interleave_by_kind(ms: list[Mutation], rng: random.Random) -> Iterator[Mutation]:
  """A seeded order that cycles through mutation kinds, one source line at most once."""
  by_kind: dict[str, list[Mutation]] = {}
  for m in ms:
    by_kind.setdefault(m.kind, []).append(m)
  queues = []
  for kind in sorted(by_kind):
    q = by_kind[kind]
    rng.shuffle(q)
    queues.append(q)
  rng.shuffle(queues)
  seen: set[tuple[str, int]] = set()
  while any(queues):
    for q in queues:
      while q:
        m = q.pop()
        if (m.path, m.line) not in seen:
          seen.add((m.path, m.line))
          yield m
          break


# ----------------------------------------------------------------------------------------------
# Running the tests


def parse_statuses(log: str) -> dict[str, str]:
  """Per-test statuses of a `pytest -rA` log (swebench's parser), ids without whitespace."""
  from swebench.harness.log_parsers.python import parse_log_pytest  # heavy: pypi tasks only
  return {t: s for t, s in parse_log_pytest(log, None).items() if not re.search(r"\s", t)}


def _failure_lines(log: str, test_id: str, avoid: list[str], limit: int = 12) -> list[str]:
  """The `E   ...` lines of `test_id`'s failure block, minus any line quoting the changed code."""
  name = test_id.split("::")[-1]
  blocks = re.split(r"\n_{3,} (.+?) _{3,}\n", log)
  for head, body in zip(blocks[1::2], blocks[2::2]):
    if head == name or head.endswith("." + name):  # "test_x[p]" or "TestClass.test_x"
      lines = [l.rstrip() for l in body.splitlines() if l.startswith("E ")]
      lines = [l for l in lines if not any(a and a in l for a in avoid)]
      if lines:
        return lines[:limit]
  return []


def _statement(name: str, f2p: list[str], log: str, avoid: list[str]) -> str:
  shown = "\n".join(f"  {t}" for t in f2p[:5]) + (
      f"\n  ... and {len(f2p) - 5} more" if len(f2p) > 5 else "")
  detail = _failure_lines(log, f2p[0], avoid)
  text = (f"Some of {name}'s own tests fail on this checkout:\n\n{shown}\n")
  if detail:
    text += "\nThe first one fails with:\n\n" + "\n".join("  " + l for l in detail) + "\n"
  return text + f"\nFind the bug in {name}'s source (not in the tests) and fix it."


# ----------------------------------------------------------------------------------------------
# Generation


def _diffs(root: str, mutated: dict[str, str], hidden: list[str]) -> tuple[str, str, str]:
  """(setup_patch, gold patch, test_patch) of one bug over the pristine tree at `root`."""
  with tempfile.TemporaryDirectory(prefix="dagger_jax_pypi_") as tmp:
    shutil.copytree(root, tmp, dirs_exist_ok=True)
    snapshot_commit(tmp)
    originals = {p: open(os.path.join(root, p), encoding="utf-8").read() for p in mutated}
    write_files(tmp, mutated)
    for p in hidden:
      os.remove(os.path.join(tmp, p))
    git(tmp, "add", "-A")
    setup_patch = git(tmp, "diff", "--cached", "--binary")
    git(tmp, "commit", "-q", "--no-verify", "-m", "bug")
    write_files(tmp, originals)
    gold = git(tmp, "diff")
    git(tmp, "checkout", "-q", "--", ".")
    for p in hidden:
      shutil.copyfile(os.path.join(root, p), os.path.join(tmp, p))
    git(tmp, "add", "-A")
    test_patch = git(tmp, "diff", "--cached")
  return setup_patch, gold, test_patch


def generate(spec: str, n: int, seed: int, *, out_path: str, env_config: Any,
             cache_dir: str | None = None,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[dict]:
  """Up to n tasks of library `spec`; the pristine tree goes to `repos/` beside `out_path`.

  Raises PypiError when the library has no usable tests or no mutation breaks one.
  """
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dagger_jax", "sdists")
  name, version, src = fetch_sdist(spec, cache_dir)
  repo_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "repos",
                          f"{name}-{version}")
  if not os.path.isdir(repo_dir):
    shutil.copytree(src, repo_dir + ".tmp", dirs_exist_ok=True)
    os.replace(repo_dir + ".tmp", repo_dir)
  cmd = test_command(repo_dir)
  sources = {p: open(os.path.join(repo_dir, p), encoding="utf-8").read()
             for p in source_files(repo_dir)}
  rng = random.Random(f"pypi:{name}:{version}:{seed}")
  candidates = [m for p in sorted(sources) for m in mutations(p, sources[p])]
  log(f"pypi:{name}=={version}: {len(sources)} modules, {len(candidates)} candidate mutations, "
      f"tests: {cmd}")
  tasks: list[dict] = []
  with tempfile.TemporaryDirectory(prefix="dagger_jax_pypi_work_") as work:
    tree = os.path.join(work, "repo")
    shutil.copytree(repo_dir, tree)
    with make_sandbox(env_config, host_workdir=tree, command_timeout=TEST_TIMEOUT_S,
                      max_output_chars=50_000_000) as sb:
      base = parse_statuses(sb.run(cmd).output)
      passing = sorted(t for t, s in base.items() if s == "PASSED")
      if not passing:
        raise PypiError(f"{name}=={version}: none of its tests pass unmodified ({cmd})")
      log(f"pypi:{name}: {len(passing)} tests pass unmodified")
      tries = 0
      for m in interleave_by_kind(candidates, rng):
        if len(tasks) == n or tries >= MAX_TRIES_PER_TASK * n:
          break
        tries += 1
        buggy = m.apply(sources[m.path])
        sb.write_file(m.path, buggy.encode())
        try:
          r = sb.run(cmd)
        finally:
          sb.write_file(m.path, sources[m.path].encode())
        if r.timed_out:
          continue
        after = parse_statuses(r.output)
        f2p = [t for t in passing if after.get(t) in ("FAILED", "ERROR")]
        if not f2p:
          continue
        still = [t for t in passing if after.get(t) == "PASSED"]
        p2p = sorted(rng.sample(still, min(P2P_SAMPLE, len(still))))
        hidden = sorted({t.split("::")[0] for t in f2p})
        setup_patch, gold, test_patch = _diffs(repo_dir, {m.path: buggy}, hidden)
        old_line = sources[m.path].splitlines()[m.line - 1].strip()
        new_line = buggy.splitlines()[m.line - 1].strip()
        digest = hashlib.sha256(setup_patch.encode()).hexdigest()[:10]
        task = {
            "instance_id": f"pypi__{name}-{version}-{digest}",
            "repo": f"pypi/{name}",
            "base_commit": "",
            "problem_statement": _statement(name, f2p, r.output, [old_line, new_line]),
            "patch": gold,
            "test_patch": test_patch,
            "FAIL_TO_PASS": f2p,
            "PASS_TO_PASS": p2p,
            "version": version,
            "test_cmd": cmd,
            "repo_dir": repo_dir,
            "setup_patch": setup_patch,
            "bug": {"kind": m.kind, "file": m.path, "line": m.line, "old": new_line,
                    "new": old_line},
        }
        with tempfile.TemporaryDirectory(prefix="dagger_jax_pypi_base_") as tmp:
          task["base_commit"] = build_repo(task, os.path.join(tmp, "r"))
        tasks.append(task)
        log(f"  kept {m.kind} at {m.path}:{m.line} ({len(f2p)} tests fail) [{len(tasks)}/{n}]")
  if not tasks:
    raise PypiError(f"{name}=={version}: none of {tries} mutations broke a test")
  return tasks
