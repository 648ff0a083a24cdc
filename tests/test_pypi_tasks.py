"""`pypi:NAME` tasks: AST mutations (fast), and real libraries from PyPI end to end (slow)."""

import ast
import base64
import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
import zipfile

import pytest
import support

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


def test_data_tables_are_not_mutated():
  table = "TABLE = (\n" + "".join(f"    ({i}, {i + 1}),\n" for i in range(40)) + ")\n"
  code = "def f(x):\n    return TABLE[x + 1]\n"
  ms = pypi.mutations("m.py", table + code)
  assert ms and {m.line for m in ms} == {len(table.splitlines()) + 2}


def test_mutation_order_is_seeded_and_never_repeats_a_line():
  import random
  ms = pypi.mutations("m.py", SOURCE)
  a = list(pypi.interleave_by_kind(list(ms), random.Random(0)))
  b = list(pypi.interleave_by_kind(list(ms), random.Random(0)))
  assert a == b
  assert len({(m.path, m.line) for m in a}) == len(a)
  assert len({m.kind for m in a[:4]}) == 4  # kinds are interleaved, not one after another


# ---------------------------------------------------------------------------------------------
# Where the tests are


def _tree(root, paths):
  for p in paths:
    (root / p).parent.mkdir(parents=True, exist_ok=True)
    (root / p).write_text("x = 1\n")


@pytest.mark.parametrize("paths, targets", [
    (["lib/__init__.py", "tests/test_a.py", "tests/unit/test_b.py"], ["tests"]),
    (["lib/__init__.py", "test/test_a.py"], ["test"]),
    (["lib/__init__.py", "testing/test_a.py", "testing/conftest.py"], ["testing"]),
    (["six.py", "test_six.py"], ["test_six.py"]),
    (["lib/__init__.py", "lib/tests/__init__.py", "lib/tests/test_a.py"], ["lib/tests"]),
    (["src/lib/__init__.py", "src/lib/tests/__init__.py", "src/lib/tests/test_a.py"],
     ["src/lib/tests"]),
    (["src/lib/__init__.py", "src/lib/test/test_a.py"], ["src/lib/test"]),
    (["src/lib/__init__.py", "src/lib/test_core.py", "src/lib/sub/util_test.py"],
     ["src/lib/sub/util_test.py", "src/lib/test_core.py"]),
    (["lib/__init__.py", "lib/tests.py"], ["lib/tests.py"]),
    (["lib/__init__.py", "tests/test_a.py", "docs/tests/test_doc.py", "bench/test_speed.py",
      ".tox/py/test_x.py"], ["tests"]),
])
def test_test_targets_find_the_layouts_libraries_use(tmp_path, paths, targets):
  _tree(tmp_path, paths)
  assert pypi.test_targets(str(tmp_path)) == targets
  cmd = pypi.test_command(str(tmp_path))
  src = "src" if any(p.startswith("src/") for p in paths) else "."
  assert cmd.startswith(f"PYTHONPATH={src} python3 -m pytest -rA --continue-on-collection-errors")
  assert cmd.endswith(" -q " + " ".join(targets))
  sources = pypi.source_files(str(tmp_path))  # never a test module, never docs or benchmarks
  assert sources and all(not pypi._is_test_path(s) for s in sources)
  assert not any(s.split("/")[0] in ("docs", "bench", ".tox") for s in sources)


def test_test_command_refuses_an_sdist_without_tests(tmp_path):
  _tree(tmp_path, ["src/lib/__init__.py", "src/lib/core.py", "docs/tests/test_doc.py",
                   "tests/data.txt"])
  with pytest.raises(pypi.PypiError, match="ships no tests"):
    pypi.test_command(str(tmp_path))


def test_statement_never_names_a_test_the_checkout_lacks():
  f2p = ["tests/test_a.py::test_one", "tests/gone.py::test_two", "tests/test_a.py::test_p[x y]"]
  log = ("_____ test_two _____\nE   assert 1 == 2\n_____ test_one _____\nE   assert 3 == 4\n"
         "E   where x = a + b\n")
  text = pypi._statement("lib", f2p, log, ["x = a + b"], "PYTHONPATH=. python3 -m pytest -q",
                         lambda p: p == "tests/test_a.py")
  assert "gone.py" not in text and "test_two" not in text
  assert "tests/test_a.py::test_one" in text and "E   assert 3 == 4" in text
  assert "a + b" not in text  # the changed code is never quoted
  assert "  PYTHONPATH=. python3 -m pytest -q tests/test_a.py::test_one 'tests/test_a.py::" in text
  text = pypi._statement("lib", f2p[1:2], log, [], "python3 -m pytest", lambda p: False)
  assert ".py" not in text and "Some of lib's own tests fail" in text


# ---------------------------------------------------------------------------------------------
# Fetching: a local package index (PEP 503 HTML / PEP 691 JSON) holding sdists built here, whose
# build backends (hatchling + hatch-vcs, flit) are not installed: nothing may be built.

HATCH_PYPROJECT = """\
[build-system]
requires = ["hatchling", "hatch-vcs"]
build-backend = "hatchling.build"

[project]
name = "tinylib"
dynamic = ["version"]
"""

FLIT_PYPROJECT = """\
[build-system]
requires = ["flit_core >=3.2,<4"]
build-backend = "flit_core.buildapi"

[project]
name = "tiny-flit"
dynamic = ["version", "description"]
"""

TINYLIB = """\
'''A tiny library.'''


def clamp(x, lo, hi):
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x


def mean(xs):
    return sum(xs) / len(xs)
"""

TINYLIB_TESTS = """\
from tinylib import clamp, mean


def test_clamp_low():
    assert clamp(-5, 0, 10) == 0


def test_clamp_high():
    assert clamp(50, 0, 10) == 10


def test_clamp_inside():
    assert clamp(5, 0, 10) == 5


def test_mean():
    assert mean([1, 2, 6]) == 3
"""


def _sdist(files_dir, filename, top, files, fmt="tar.gz"):
  """An sdist made with tarfile / zipfile: `top/` holding `files` ({path: text})."""
  path = files_dir / filename
  if fmt == "zip":
    with zipfile.ZipFile(path, "w") as z:
      for rel, text in files.items():
        z.writestr(f"{top}/{rel}", text)
  else:
    with tarfile.open(path, "w:gz") as t:
      for rel, text in files.items():
        data = text.encode()
        info = tarfile.TarInfo(f"{top}/{rel}")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
  return path


def _tinylib(version, bad_conftest=False):
  """src layout, tests inside the package (an sdist the old generator refused), one test module
  that needs a package the sandbox lacks, and with `bad_conftest` a conftest.py that does."""
  files = {"pyproject.toml": HATCH_PYPROJECT, "PKG-INFO": f"Name: tinylib\nVersion: {version}\n",
           "src/tinylib/__init__.py": TINYLIB, "src/tinylib/tests/__init__.py": "",
           "src/tinylib/tests/test_core.py": TINYLIB_TESTS,
           "src/tinylib/tests/test_needs.py": "import no_such_module_xyz\n"}
  if bad_conftest:
    files["src/tinylib/tests/conftest.py"] = "import no_such_module_xyz\n"
  return files


@pytest.fixture
def index_root(tmp_path):
  """simple/<project>/index.html (+ index.json for PEP 691) and files/, as on an index."""
  root = tmp_path / "index"
  files = root / "files"
  files.mkdir(parents=True)
  tinylib = ("0.9", "1.0", "1.1", "2.0a1", "3.0")  # 1.1 is yanked, 3.0 needs Python >= 4
  for v in tinylib:
    _sdist(files, f"tinylib-{v}.tar.gz", f"tinylib-{v}", _tinylib(v))
  (files / "tinylib-1.2-py3-none-any.whl").write_bytes(b"not a real wheel")
  _sdist(files, "tinyconf-1.0.tar.gz", "tinyconf-1.0", _tinylib("1.0", bad_conftest=True))
  _sdist(files, "tiny_flit-0.3.zip", "tiny_flit-0.3",
         {"pyproject.toml": FLIT_PYPROJECT, "tiny_flit/__init__.py": '"""Flit."""\n'
          "__version__ = '0.3'\n", "tests/test_flit.py": "def test_ok():\n    pass\n"}, "zip")
  (files / "wheelonly-1.0-py3-none-any.whl").write_bytes(b"wheel")
  projects = {"tinylib": [f"tinylib-{v}.tar.gz" for v in tinylib]
              + ["tinylib-1.2-py3-none-any.whl"],
              "tiny-flit": ["tiny_flit-0.3.zip"], "wheelonly": ["wheelonly-1.0-py3-none-any.whl"],
              "tinyconf": ["tinyconf-1.0.tar.gz"]}
  attrs = {"tinylib-1.1.tar.gz": ' data-yanked="broken"',
           "tinylib-3.0.tar.gz": ' data-requires-python="&gt;=4"'}
  for project, names in projects.items():
    page = root / "simple" / project
    page.mkdir(parents=True)
    digests = {n: hashlib.sha256((files / n).read_bytes()).hexdigest() for n in names}
    links = "".join(f'<a href="../../files/{n}#sha256={digests[n]}"{attrs.get(n, "")}>{n}</a>\n'
                    for n in names)
    (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    (page / "index.json").write_text(json.dumps({"meta": {"api-version": "1.0"}, "files": [
        {"filename": n, "url": f"../../files/{n}", "hashes": {"sha256": digests[n]},
         "requires-python": ">=4" if n == "tinylib-3.0.tar.gz" else None,
         "yanked": "broken" if n == "tinylib-1.1.tar.gz" else False} for n in names]}))
  return root


class _IndexHandler(http.server.SimpleHTTPRequestHandler):
  """A static PEP 503 index that records the paths asked for; with `json_api`, a PEP 691 client
  (Accept: the JSON type first) gets the page's index.json."""
  requests: list[str] = []
  json_api = True
  auth = ""  # "user:token": a private index, every request needs it

  def send_head(self):
    self.requests.append(self.path)
    if self.auth and self.headers.get("Authorization") != "Basic " + base64.b64encode(
        self.auth.encode()).decode():
      self.send_error(401)
      return None
    accept = self.headers.get("Accept", "")
    if self.json_api and self.path.endswith("/") and pypi._JSON_TYPE in accept.split(",")[0]:
      path = self.translate_path(self.path + "index.json")
      if os.path.isfile(path):
        body = open(path, "rb").read()
        self.send_response(200)
        self.send_header("Content-Type", pypi._JSON_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)
    return super().send_head()

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def _serve(root, json_api=True, auth=""):
  """Serves `root` on a free port of 127.0.0.1; yields its URL."""
  handler = type("Handler", (_IndexHandler,), {"json_api": json_api, "auth": auth})
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", ["http-json", "http-html", "file", "find-links"])
def test_fetch_sdist_from_an_index_builds_nothing(index_root, tmp_path, kind):
  cache = str(tmp_path / "cache")
  with contextlib.ExitStack() as stack:
    if kind.startswith("http"):
      url = stack.enter_context(_serve(index_root, json_api=kind == "http-json")) + "/simple"
      registry = pypi.Registry([url], timeout=5)
    elif kind == "file":
      registry = pypi.Registry([(index_root / "simple").as_uri()])
    else:  # a find-links folder: no yanked or requires-python data, so 3.0 is the newest
      registry = pypi.Registry([], find_links=[str(index_root / "files")])
    name, version, root = pypi.fetch_sdist("tinylib", cache, registry)
    assert (name, version) == ("tinylib", "3.0" if kind == "find-links" else "1.0")
    assert os.path.isfile(os.path.join(root, "src/tinylib/tests/test_core.py"))
    assert pypi.test_targets(root) == ["src/tinylib/tests"]
    name, version, root = pypi.fetch_sdist("tinylib==0.9", cache, registry)
    assert version == "0.9" and os.path.basename(root) == "tinylib-0.9"
    assert pypi.fetch_sdist("TinyLib>=2.0a1,<3", cache, registry)[1] == "2.0a1"
    name, version, root = pypi.fetch_sdist("tiny_flit", cache, registry)
    assert (name, version) == ("tiny-flit", "0.3")
    assert pypi.test_targets(root) == ["tests"]
    assert sorted(os.listdir(root)) == ["pyproject.toml", "tests", "tiny_flit"]  # not built
  # The registry is gone: the cache still serves what it holds, and says so.
  gone = pypi.Registry([f"http://127.0.0.1:{support.free_port()}/simple"], timeout=5, retries=0)
  lines = []
  assert pypi.fetch_sdist("tinylib==0.9", cache, gone, log=lines.append)[1] == "0.9"
  assert "using the cached" in lines[-1]
  with pytest.raises(pypi.PypiError, match="is the package registry reachable"):
    pypi.fetch_sdist("tinylib==0.8", cache, gone)


def test_fetch_sdist_reuses_the_cache_and_checks_hashes(index_root, tmp_path):
  with _serve(index_root) as url:
    registry = pypi.Registry([url + "/simple"], timeout=5)
    cache = tmp_path / "cache"
    pypi.fetch_sdist("tinylib", str(cache), registry)
    _IndexHandler.requests.clear()
    lines = []
    pypi.fetch_sdist("tinylib", str(cache), registry, log=lines.append)
    assert _IndexHandler.requests == ["/simple/tinylib/"] and "(cached)" in lines[-1]
    # A cached file that does not match the index's hash is fetched again.
    (cache / "downloads" / "tinylib-1.0.tar.gz").write_bytes(b"truncated")
    pypi.fetch_sdist("tinylib", str(cache), registry)
    assert "/files/tinylib-1.0.tar.gz" in _IndexHandler.requests
    # A download that does not match the index's hash is refused, and not cached.
    digest = hashlib.sha256((index_root / "files" / "tinylib-0.9.tar.gz").read_bytes())
    for page in (index_root / "simple" / "tinylib").iterdir():
      page.write_text(page.read_text().replace(digest.hexdigest(), "0" * 64))
    with pytest.raises(pypi.PypiError, match="tinylib-0.9.tar.gz .* is corrupt: its sha256"):
      pypi.fetch_sdist("tinylib==0.9", str(cache), registry)
    assert not (cache / "downloads" / "tinylib-0.9.tar.gz").exists()


def test_fetch_sdist_from_a_private_index(index_root, tmp_path):
  with _serve(index_root, auth="me:s3cret") as url:
    private = url.replace("http://", "http://me:s3cret@") + "/simple"
    assert pypi.fetch_sdist("tinylib", str(tmp_path), pypi.Registry([private]))[1] == "1.0"
    with pytest.raises(pypi.PypiError, match="reachable.*HTTP 401") as e:
      pypi.fetch_sdist("tinylib", str(tmp_path / "other"), pypi.Registry([url + "/simple"]))
    assert "s3cret" not in str(e.value)
    wrong = url.replace("http://", "http://me:wr0ng@") + "/simple"
    with pytest.raises(pypi.PypiError, match="HTTP 401") as e:  # named without the token
      pypi.fetch_sdist("tinylib", str(tmp_path / "other"), pypi.Registry([wrong]))
    assert "wr0ng" not in str(e.value) and "http://127.0.0.1" in str(e.value)


def test_fetch_sdist_says_why_there_is_no_sdist(index_root, tmp_path):
  registry = pypi.Registry([(index_root / "simple").as_uri()])
  cache = str(tmp_path / "cache")
  with pytest.raises(pypi.PypiError, match=r"only wheels of wheelonly \(1.0\)"):
    pypi.fetch_sdist("wheelonly", cache, registry)
  with pytest.raises(pypi.PypiError, match="nosuchlib is not on file://.*check the name"):
    pypi.fetch_sdist("nosuchlib", cache, registry)
  with pytest.raises(pypi.PypiError,
                     match=r"sdists of tinylib .*none that fits tinylib==5.0 .*pypi:tinylib==1.0"):
    pypi.fetch_sdist("tinylib==5.0", cache, registry)
  with pytest.raises(pypi.PypiError, match="not a requirement"):
    pypi.fetch_sdist("tiny lib!", cache, registry)


def _clean_pip_env(monkeypatch):
  for key in [k for k in os.environ if k.startswith("PIP_")]:
    monkeypatch.delenv(key)
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip reads no config file at all


def test_an_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
  _clean_pip_env(monkeypatch)
  url = f"http://127.0.0.1:{support.free_port()}/simple"
  monkeypatch.setenv("PIP_INDEX_URL", url)
  monkeypatch.setenv("PIP_RETRIES", "0")
  with pytest.raises(pypi.PypiError) as e:
    pypi.fetch_sdist("six", str(tmp_path / "cache"))
  text = str(e.value)
  assert url in text and "ConnectionRefusedError" in text
  assert "(is the package registry reachable?)" in text
  assert "pip config set global.index-url URL" in text and str(tmp_path / "cache") in text


def test_registry_follows_pips_configuration(tmp_path, monkeypatch):
  _clean_pip_env(monkeypatch)
  assert pypi.Registry.from_pip().index_urls == [pypi.DEFAULT_INDEX]
  conf = tmp_path / "pip.conf"
  conf.write_text("[global]\nindex-url = https://mirror.example/simple\ntimeout = 7\n"
                  "extra-index-url =\n    file:///a/simple\n    https://u:secret@b.example/simple\n"
                  "find-links = /wheels\n[download]\nfind-links = /sdists\n")
  monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
  r = pypi.Registry.from_pip()
  assert r.index_urls[0] == "https://mirror.example/simple" and "file:///a/simple" in r.index_urls
  assert r.find_links == ["/sdists"] and r.timeout == 7
  assert "secret" not in r.describe() and "https://b.example/simple" in r.describe()
  monkeypatch.setenv("PIP_INDEX_URL", "http://env.example/simple")  # the environment wins
  assert pypi.Registry.from_pip().index_urls[0] == "http://env.example/simple"
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  assert pypi.Registry.from_pip().index_urls == []


def test_sdist_versions_and_choice():
  assert pypi.sdist_version("python_dateutil-2.9.0.post0.tar.gz", "python-dateutil") == (
      pypi.Version("2.9.0.post0"))
  assert pypi.sdist_version("python-dateutil-2.8.2.tar.gz", "Python_Dateutil") == (
      pypi.Version("2.8.2"))
  assert pypi.sdist_version("six-1.17.0-py2.py3-none-any.whl", "six") is None
  assert pypi.sdist_version("sixty-1.0.tar.gz", "six") is None
  links = [pypi.Link(f, "file:///x/" + f) for f in
           ("lib-1.0.zip", "lib-1.0.tar.gz", "lib-0.5.tar.gz", "lib-2.0rc1.tar.gz")]
  links.append(pypi.Link("lib-1.5.tar.gz", "file:///x/lib-1.5.tar.gz", yanked=True))
  pick = lambda spec: pypi.pick_sdist(links, "lib", pypi.SpecifierSet(spec))  # noqa: E731
  assert pick("").filename == "lib-1.0.tar.gz"  # .tar.gz before .zip; no yanked, no pre-release
  assert pick("==1.5").filename == "lib-1.5.tar.gz"  # a pin may name a yanked release
  assert pick("<1").filename == "lib-0.5.tar.gz"
  assert pick(">=2.0rc1").filename == "lib-2.0rc1.tar.gz"
  assert pick(">3") is None


# ---------------------------------------------------------------------------------------------
# End to end on the tiny library, no network: fetch it from the local index as pip's config says,
# find the tests inside its package, make a task, grade it.


@pytest.mark.parametrize("project", ["tinylib", "tinyconf"])
def test_generate_from_a_local_index_keeps_the_failing_tests_visible(index_root, tmp_path,
                                                                     monkeypatch, project):
  env = base.get_config().env
  env.sandbox = "bwrap" if shutil.which("bwrap") else "unsafe_local"  # our own tiny code
  _clean_pip_env(monkeypatch)
  with _serve(index_root) as url:
    monkeypatch.setenv("PIP_INDEX_URL", url + "/simple")
    out = str(tmp_path / "out" / "tasks.jsonl")
    lines = []
    (task,) = pypi.generate(project, 1, seed=0, out_path=out, env_config=env,
                            cache_dir=str(tmp_path / "cache"), log=lines.append)
  assert task["version"] == "1.0" and task["repo_dir"].endswith(f"repos/{project}-1.0")
  # A test module that needs a missing package does not stop the others; a conftest.py that
  # does is left out (else no test would run).
  assert any("lacks no_such_module_xyz" in s for s in lines)
  assert ("--noconftest" in task["test_cmd"]) == (project == "tinyconf")
  assert all(t.startswith("src/tinylib/tests/test_core.py::") for t in task["FAIL_TO_PASS"])
  repo = tmp_path / "checkout"
  T.materialize(task, str(repo))
  # Every test the statement names is in the agent's checkout, and its command reproduces it.
  named = re.findall(r"[\w/.]+\.py(?=::)", task["problem_statement"])
  assert named and all((repo / p).is_file() for p in named)
  assert all((repo / p).is_file() for p in T.patch_files(task["test_patch"]))
  cmd = re.search(r"Run (?:it|them) with:\n\n  (.+)\n", task["problem_statement"]).group(1)
  assert subprocess.run(cmd, shell=True, cwd=repo, capture_output=True).returncode == 1
  assert task["bug"]["old"] not in task["problem_statement"]
  # The grader: the gold patch resolves, no patch does not, and edits to the tests do not count.
  factory = grading.sandbox_factory(env, timeout=120)
  assert grading.grade(task, task["patch"], factory).resolved
  assert not grading.grade(task, "", factory).resolved
  test_file = repo / named[0]
  test_file.write_text(re.sub(r"assert .*", "pass", test_file.read_text()))
  cheat = subprocess.run(["git", "diff"], cwd=repo, capture_output=True, text=True).stdout
  assert "+    pass" in cheat
  assert not grading.grade(task, cheat, factory).resolved


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
    # The agent's tree has the bug and the failing tests (the test_patch marks their files,
    # which the grader restores), and the statement names only tests the tree holds.
    repo = os.path.join(moved, "check-" + task["instance_id"])
    T.materialize(task, repo)
    bug_file = open(os.path.join(repo, task["bug"]["file"])).read().splitlines()
    assert bug_file[task["bug"]["line"] - 1].strip() == task["bug"]["old"]
    for path in T.patch_files(task["test_patch"]):
      assert os.path.isfile(os.path.join(repo, path))
    named = re.findall(r"[\w/.-]+\.py(?=::)", task["problem_statement"])
    assert named and all(os.path.isfile(os.path.join(repo, p)) for p in named)
    log = subprocess.run(["git", "log", "--oneline"], cwd=repo, capture_output=True, text=True)
    assert len(log.stdout.splitlines()) == 1  # no history to diff the bug out of
    gold = grading.grade(task, task["patch"], factory)
    assert gold.resolved, gold.log[-3000:]
    empty = grading.grade(task, "", factory)
    assert not empty.resolved
    assert any(s in ("FAILED", "ERROR") for s in empty.f2p.values())
    assert set(empty.p2p.values()) == {"PASSED"}
