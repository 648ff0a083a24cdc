"""`toy` tasks: small generated Python repositories with a one-line bug, sized for a CPU student.

Each repository holds one module of 3-5 two-argument functions (generated function names such as
`blend_range`, random argument names, flat or package layout), a distractor module, a README,
tests, and a small test runner. One line of one function carries a bug of one of `BUG_KINDS`.
FAIL_TO_PASS is the buggy function's test, PASS_TO_PASS every other test; `test_patch` adds more
assertions (the grader's hidden checks). Three families share the generator:

`toy` (the default; imitable). The statement names the function and gives its correct line, so
every step of the fix can be read off the conversation: the name from the statement, the file and
line from `grep`'s answer, the new line from the statement. A perfect imitator resolves every task
(tests/test_toy_imitable.py proves it with a teacher that reads only the conversation). The tests
run with the repository's own `run_tests.py` (one `PASSED` / `FAILED` line per test in pytest's
`-rA` form, so swebench's pytest log parser grades it; no timings, so the output is a function of
the code; ~20 ms instead of pytest's ~170 ms, which is most of a CPU episode's cost).

  statement:  "Bug in `shift`: shift(3, 5) gives 15 instead of -2. The line should read
               `return s - t`."
  grep -rn "def shift(" .              ->  ./ledger.py:4:def shift(s, t):
  nl -ba ledger.py | sed -n '4,+3p'    ->  4  def shift(s, t):  /  5      return s * t  / ...
  fix_cmd:    sed -i '5s/.*/    return s - t/' ledger.py

`toy-rewrite` (imitable, easier to copy; the demo's family). The statement names the function
and the one short span of the line after its def to replace (an operator, a comparison or a
number) and what replaces it, so the fix copies two short spans instead of a whole line. Only
bugs whose fix is one such span (its first occurrence on the line) are drawn.

  statement:  "Bug in `def shift(s, t)`: shift(3, 5) gives 15 instead of -2. In the line after
               the def, `*` should be `-` (`s|*|-|`)."
  fix_cmd:    sed -i '/def shift(/{n;s|*|-|}' ./ledger.py        (a leading `*` is literal)
  retry:      sed -i "/def shift(/{n;$(grep -o 's|.*|' ~/ISSUE.md)}" ./ledger.py
              (the oracle's fix after a failed one, with `config.env.issue_file`: the shell
              reads the substitution from the issue, see `policies/oracle.py`)

`toy-arith` (harder). The statement gives only a call and two values (`shift(3, 5)` returns 15, but
it should return -2); the fix must be worked out (which operator, which constant plus or minus
one), and `fix_cmd` is `sed -i '5s/return s \\* t/return s - t/' ledger.py`, from the gold patch.
Its tests run with pytest. Kept for stronger students.

Worked example (one generated module, bug kind `operator`, line 5):

  def merge_stock(p, q):    # tests/test_ledger.py::test_merge_stock  -> PASS_TO_PASS
      return p + q
                            # `old`: "return s * t"   `new`: "return s - t"
  def shift(s, t):          # tests/test_ledger.py::test_shift        -> FAIL_TO_PASS
      return s * t

Splits. A task's split is a function of its content (a hash of the buggy repository), so `train`
and `test` files generated with any seeds never share a task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

from dagger_jax.envs.tasks import TaskError, diff_files, snapshot_hash

FAMILIES = ("toy", "toy-rewrite", "toy-arith")
IMITABLE = ("toy", "toy-rewrite")  # a perfect imitator of the oracle resolves every task
BUG_KINDS = ("operator", "comparison", "constant", "swapped_args", "off_by_one")
TEST_CMD = "python3 run_tests.py"  # `toy`: the repository's own runner (see RUNNER)
PYTEST_CMD = "python3 -m pytest -rA -q -p no:cacheprovider tests"  # `toy-arith`
HELD_OUT_FRACTION = 4  # one task in this many (by content hash) belongs to the `test` split

# The `toy` repositories' test runner: every `test_*` function of `tests/test_*.py`, one line per
# test in pytest's `-rA` form (a failed assert shows its source line), then a summary line.
RUNNER = """\
import importlib.util, pathlib, sys, traceback
sys.path.insert(0, ".")
sys.dont_write_bytecode = True
failed = passed = 0
for path in sorted(pathlib.Path("tests").glob("test_*.py")):
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:
        failed += 1
        print(f"ERROR {path} - {type(e).__name__}: {e}")
        continue
    for name in sorted(n for n in vars(module) if n.startswith("test_")):
        try:
            getattr(module, name)()
        except Exception as e:
            failed += 1
            line = traceback.extract_tb(e.__traceback__)[-1].line
            print(f"FAILED {path}::{name} - {line if isinstance(e, AssertionError) else repr(e)}")
        else:
            passed += 1
            print(f"PASSED {path}::{name}")
print(f"{failed} failed, {passed} passed" if failed else f"{passed} passed")
sys.exit(1 if failed else 0)
"""

_MODULES = ("ledger", "geometry", "scoring", "metrics", "pricing", "inventory", "timing",
            "physics", "grades", "budget", "weather", "routes", "energy", "census", "stocks",
            "recipes", "orbits", "traffic", "tallies", "signals")
_PACKAGES = ("core", "lib", "app", "tools", "calc")
_VERBS = ("merge", "shift", "blend", "scale", "clamp", "combine", "spread", "offset", "pick",
          "weigh", "span", "mix", "stack", "trim", "gap", "boost", "fold", "join", "split_sum",
          "lift", "drop", "tally", "rate", "score", "bound", "step", "pair_sum", "cross", "reach")
_NOUNS = ("range", "stock", "price", "total", "score", "count", "rate", "level", "depth", "width",
          "speed", "cost", "load", "gain", "loss", "share", "limit", "delta", "index", "angle",
          "weight", "margin", "budget", "credit", "demand", "supply", "volume", "height", "factor",
          "signal", "window", "bucket", "record", "sample", "metric", "reward", "charge",
          "energy", "number")
_ARGS = (("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"), ("s", "t"), ("u", "v"), ("i", "j"),
         ("lo", "hi"), ("left", "right"), ("first", "second"))

# Correct expressions over A, B and a constant K.
_EXPRS = ("A + B", "A - B", "A * B", "A * B + K", "(A + B) * K", "A - B - K", "A * K + B",
          "A if A > B else B", "A if A < B else B", "sum(range(A, B + 1))", "A * A + B",
          "abs(A - B)", "(A - B) * K", "max(A - B, 0)", "min(A + K, B)")

_ARITH_STATEMENTS = (
    "`{f}({x}, {y})` returns {got}, but it should return {want}.",
    "Bug: {f}({x}, {y}) gives {got} instead of {want}.",
    "The tests for `{f}` fail: for example {f}({x}, {y}) should be {want}, not {got}.",
    "{f} is broken. Calling {f}({x}, {y}) returned {got}; the expected result is {want}.",
)


# `toy`: the statement quotes the function's `def` line and gives the correct line below it as
# an indented code block, so the fix is copied, not worked out.
_STATEMENTS = (
    "Bug in `{sig}`: {f}({x}, {y}) gives {got} instead of {want}. The line after the def "
    "should read:\n\n    {new}\n",
    "`{f}({x}, {y})` returns {got}, but it should return {want}. In `{sig}` the next line "
    "should be:\n\n    {new}\n",
    "The tests for `{sig}` fail: {f}({x}, {y}) should be {want}, not {got}. Its body "
    "should start with:\n\n    {new}\n",
    "{f} is broken: calling {f}({x}, {y}) returned {got}, expected {want}. The first line of "
    "`{sig}` should be:\n\n    {new}\n",
)


# `toy-rewrite`: the statement names the function and the one span of the line after its def
# to replace, in words and as the substitution the fix runs (`s|-|+|`), so that the fix's spans
# follow the same tokens in the statement and in the command (`s|`, then the old span, then `|`).
_REWRITE_STATEMENTS = (
    "Bug in `{sig}`: {f}({x}, {y}) gives {got} instead of {want}. In the line after the def, "
    "`{old}` should be `{to}` (`s|{old}|{to}|`).\n",
    "`{f}({x}, {y})` returns {got}, but it should return {want}. In the line after "
    "`{sig}`, `{old}` should be `{to}` (`s|{old}|{to}|`).\n",
    "The tests for `{sig}` fail: {f}({x}, {y}) should be {want}, not {got}. In its first line, "
    "`{old}` should be `{to}` (`s|{old}|{to}|`).\n",
    "{f} is broken: calling {f}({x}, {y}) returned {got}, expected {want}. In the first line "
    "of `{sig}`, `{old}` should be `{to}` (`s|{old}|{to}|`).\n",
)


@dataclasses.dataclass(frozen=True)
class _Fn:
  name: str
  args: tuple[str, str]
  expr: str  # with the real argument names and constant
  two_lines: bool  # `r = expr; return r` instead of `return expr`

  def lines(self, expr: str | None = None) -> list[str]:
    e = self.expr if expr is None else expr
    a, b = self.args
    body = [f"    r = {e}", "    return r"] if self.two_lines else [f"    return {e}"]
    return [f"def {self.name}({a}, {b}):", *body]

  def call(self, x: int, y: int, expr: str | None = None) -> object:
    a, b = self.args
    return eval(self.expr if expr is None else expr, {"__builtins__": {
        "sum": sum, "range": range, "abs": abs, "max": max, "min": min}}, {a: x, b: y})


def _mutations(fn: _Fn) -> list[tuple[str, str]]:
  """(kind, buggy expression) candidates for one function."""
  e, (a, b) = fn.expr, fn.args
  out: list[tuple[str, str]] = []
  for op, subs in ((" + ", (" - ", " * ")), (" - ", (" + ",)), (" * ", (" + ", " - "))):
    for m in re.finditer(re.escape(op), e):
      for s in subs:
        out.append(("operator", e[:m.start()] + s + e[m.end():]))
  for op, s in ((" > ", " < "), (" < ", " > ")):
    if op in e:
      out.append(("comparison", e.replace(op, s, 1)))
  for m in re.finditer(r"\b(\d+)\b", e):
    k = int(m.group(1))
    for s in (k + 1, k - 1):
      out.append(("constant", e[:m.start()] + str(s) + e[m.end():]))
  swapped = re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(1) == a else a, e)
  if swapped != e:
    out.append(("swapped_args", swapped))
  if f"{b} + 1" in e:
    out.append(("off_by_one", e.replace(f"{b} + 1", b, 1)))
  elif "range(" not in e and " if " not in e:
    out.append(("off_by_one", f"{e} + 1" if not e.startswith("(") else f"{e} - 1"))
  return [(k, m) for k, m in out if m != e]


# `toy-rewrite`: what the statement may name as the span to replace and its replacement. Each is
# literal in a sed command as it stands (a leading `*` is literal in a basic regular expression;
# the command's delimiter is `|`).
_REWRITE_CHARS = re.compile(r"[0-9+*<>-]{1,2}")


def rewrite(old: str, new: str) -> tuple[str, str] | None:
  """(x, y): the span `x` of `old` that differs from `new`, and what replaces it, when replacing
  the first occurrence of `x` gives `new` and both are short operators or numbers; else None.

  >>> rewrite("return (u - v) * 3", "return (u - v) * 4"), rewrite("r = a * b", "r = a + b")
  (('3', '4'), ('*', '+'))
  >>> rewrite("return a - b - 2", "return a - b + 2") is None  # the first `-` is not the bug
  True
  """
  p = 0
  while p < min(len(old), len(new)) and old[p] == new[p]:
    p += 1
  q = 0
  while q < min(len(old), len(new)) - p and old[-1 - q] == new[-1 - q]:
    q += 1
  x, y = old[p:len(old) - q], new[p:len(new) - q]
  if not (_REWRITE_CHARS.fullmatch(x) and _REWRITE_CHARS.fullmatch(y)):
    return None
  return (x, y) if old.replace(x, y, 1) == new else None


def _sed_escape(text: str, replacement: bool = False) -> str:
  chars = "\\/&" if replacement else "\\/.*[]^$"
  return "".join("\\" + c if c in chars else c for c in text)


def _inputs(rng: random.Random, fn: _Fn, buggy: str, n: int) -> list[tuple[int, int]] | None:
  """n distinct input pairs on which the buggy expression differs from the correct one."""
  pairs: list[tuple[int, int]] = []
  for _ in range(200):
    x, y = rng.randint(1, 9), rng.randint(1, 9)
    if x != y and (x, y) not in pairs and fn.call(x, y) != fn.call(x, y, buggy):
      pairs.append((x, y))
      if len(pairs) == n:
        return pairs
  return None


def _test_lines(fn: _Fn, pairs: list[tuple[int, int]]) -> list[str]:
  return [f"    assert {fn.name}({x}, {y}) == {fn.call(x, y)!r}" for x, y in pairs]


def _test_file(import_line: str, fns: list[_Fn], asserts: dict[str, list[str]]) -> str:
  out = [import_line, ""]
  for fn in fns:
    out += ["", f"def test_{fn.name}():", *asserts[fn.name], ""]
  return "\n".join(out).rstrip() + "\n"


def _module_text(fns: list[_Fn], exprs: dict[str, str]) -> tuple[str, dict[str, int]]:
  """Module source and the 1-based line of each function's expression."""
  lines: list[str] = []
  where: dict[str, int] = {}
  for fn in fns:
    if lines:
      lines += ["", ""]
    start = len(lines)
    lines += fn.lines(exprs.get(fn.name))
    where[fn.name] = start + 2
  return "\n".join(lines) + "\n", where


def _draw_fns(rng: random.Random, k: int, names: list[str]) -> list[_Fn]:
  fns = []
  for name in names[:k]:
    a, b = rng.choice(_ARGS)
    expr = rng.choice(_EXPRS).replace("A", "\0").replace("B", b).replace("\0", a)
    expr = expr.replace("K", str(rng.randint(2, 5)))
    fns.append(_Fn(name, (a, b), expr, rng.random() < 0.3))
  return fns


def _names(rng: random.Random, family: str, k: int) -> list[str]:
  """k distinct function names: `toy-arith` draws from 29 verbs, `toy` from ~1500 generated
  verb_noun identifiers (so that copying the name from the statement pays more than
  memorising frequent names)."""
  if family == "toy-arith":
    return rng.sample(_VERBS, k)
  names: list[str] = []
  while len(names) < k:
    name = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
    if name not in names:
      names.append(name)
  return names


def _one_task(rng: random.Random, split: str, family: str = "toy") -> dict | None:
  """Draws one task; None when it has no detectable bug or is of the other split."""
  mod, other = rng.sample(_MODULES, 2)
  names = _names(rng, family, 7)
  fns = _draw_fns(rng, rng.randint(3, 5), names)
  distractors = _draw_fns(rng, 2, names[5:])
  # Bug kind first (uniform over the kinds this module allows), then a function and a mutation.
  options: dict[str, list[tuple[_Fn, str]]] = {}
  for fn in fns:
    for kind, buggy in _mutations(fn):
      if family == "toy-rewrite" and rewrite(buggy, fn.expr) is None:
        continue  # its fix is not one short span replaced
      options.setdefault(kind, []).append((fn, buggy))
  if not options:
    return None
  kind = rng.choice(sorted(options))
  target, buggy = rng.choice(options[kind])
  pairs = _inputs(rng, target, buggy, 4)
  if pairs is None:
    return None
  grid = [(i, j) for i in range(1, 10) for j in range(1, 10) if i != j]
  fixed_pairs = {f.name: rng.sample(grid, 4) for f in fns + distractors}
  fixed_pairs[target.name] = pairs

  pkg = rng.choice(_PACKAGES) if rng.random() < 0.5 else ""
  mod_path = f"{pkg}/{mod}.py" if pkg else f"{mod}.py"
  other_path = f"{pkg}/{other}.py" if pkg else f"{other}.py"
  dotted = lambda m: f"{pkg}.{m}" if pkg else m  # noqa: E731
  imp = lambda m, fs: f"from {dotted(m)} import {', '.join(f.name for f in fs)}"  # noqa: E731

  good_src, where = _module_text(fns, {})
  bad_src, _ = _module_text(fns, {target.name: buggy})
  line = where[target.name]
  old_line, new_line = bad_src.splitlines()[line - 1].strip(), good_src.splitlines()[line - 1].strip()
  test_mod, test_other = f"tests/test_{mod}.py", f"tests/test_{other}.py"
  visible = {f.name: _test_lines(f, fixed_pairs[f.name][:2]) for f in fns + distractors}
  hidden = {f.name: _test_lines(f, fixed_pairs[f.name]) for f in fns + distractors}
  other_src, _ = _module_text(distractors, {})
  imitable = family in IMITABLE
  test_cmd = TEST_CMD if imitable else PYTEST_CMD
  files = {
      ".gitignore": "__pycache__/\n.pytest_cache/\n",
      "README.md": f"# {mod}\n\nSmall helpers for {mod}. Run the tests with `{test_cmd}`.\n",
      mod_path: bad_src,
      other_path: other_src,
      test_mod: _test_file(imp(mod, fns), fns, visible),
      test_other: _test_file(imp(other, distractors), distractors, visible),
  }
  if pkg:
    files[f"{pkg}/__init__.py"] = ""
  if imitable:
    files["run_tests.py"] = RUNNER
  files = dict(sorted(files.items()))
  digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()
  if ("test" if int(digest[:8], 16) % HELD_OUT_FRACTION == 0 else "train") != split:
    return None
  x, y = pairs[0]
  templates = {"toy": _STATEMENTS, "toy-rewrite": _REWRITE_STATEMENTS}.get(family,
                                                                          _ARITH_STATEMENTS)
  span = rewrite(buggy, target.expr) or ("", "")
  statement = rng.choice(templates).format(
      f=target.name, x=x, y=y, got=repr(target.call(x, y, buggy)), want=repr(target.call(x, y)),
      new=new_line, sig=f"def {target.name}({', '.join(target.args)})", old=span[0], to=span[1])
  if family == "toy-rewrite":  # the span after the def, replaced: literal as it stands
    fix_cmd = f"sed -i '/def {target.name}(/{{n;s|{span[0]}|{span[1]}|}}' ./{mod_path}"
  elif imitable:  # the line after the def is replaced: nothing of the old line needs escaping
    assert not set(new_line) & set("\\/&'"), new_line
    fix_cmd = f"sed -i '/def {target.name}(/{{n;s/.*/    {new_line}/}}' ./{mod_path}"
  else:
    fix_cmd = (f"sed -i '{line}s/{_sed_escape(old_line)}/"
               f"{_sed_escape(new_line, replacement=True)}/' {mod_path}")
  patch = diff_files({mod_path: bad_src}, {mod_path: good_src})
  test_patch = diff_files(
      {test_mod: files[test_mod], test_other: files[test_other]},
      {test_mod: _test_file(imp(mod, fns), fns, hidden),
       test_other: _test_file(imp(other, distractors), distractors, hidden)})
  return {
      "instance_id": f"{family.replace('-', '_')}__{mod}-{digest[:10]}",
      "repo": f"toy/{mod}",
      "base_commit": snapshot_hash(files),
      "problem_statement": statement,
      "patch": patch,
      "test_patch": test_patch,
      "FAIL_TO_PASS": [f"{test_mod}::test_{target.name}"],
      "PASS_TO_PASS": sorted([f"{test_mod}::test_{f.name}" for f in fns if f is not target] +
                             [f"{test_other}::test_{f.name}" for f in distractors]),
      "version": "0",
      "test_cmd": test_cmd,
      "split": split,
      "repo_files": files,
      "bug": {"kind": kind, "file": mod_path, "line": line, "old": old_line, "new": new_line,
              "fix_cmd": fix_cmd},
      "family": family,
  }


def named_function(statement: str) -> str | None:
  """The function a toy statement is about (both families show a call such as `f(3, 5)`).

  >>> named_function("Bug in `def shift_rate(s, t)`: shift_rate(3, 5) gives 15 instead of -2.")
  'shift_rate'
  """
  m = re.search(r"(\w+)\(\d+, \d+\)", statement)
  return m.group(1) if m else None


def generate(n: int, seed: int, split: str = "train", family: str = "toy") -> list[dict]:
  """n distinct tasks of one family (`FAMILIES`) and split ("train" | "test"), deterministic in
  (n, seed, split, family)."""
  if split not in ("train", "test"):
    raise ValueError(f"toy split must be 'train' or 'test', got {split!r}")
  if family not in FAMILIES:
    raise ValueError(f"unknown toy family {family!r} (known: {', '.join(FAMILIES)})")
  rng = random.Random(f"toy:{seed}:{split}" if family == "toy-arith" else f"{family}:{seed}:{split}")
  tasks: dict[str, dict] = {}
  for _ in range(200 * n + 100):
    if len(tasks) == n:
      break
    task = _one_task(rng, split, family)
    if task is not None:
      tasks.setdefault(task["instance_id"], task)
  if len(tasks) < n:
    raise TaskError(f"{family}: drew only {len(tasks)} distinct {split} tasks of {n}")
  return list(tasks.values())
