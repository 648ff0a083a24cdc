"""`pypi:NAME` tasks: SWE-smith-style bugs injected into a real pure-Python library.

  1. find NAME's newest sdist (or the one NAME==VERSION pins) on the index pip is configured
     with (its index-url, extra-index-urls and find-links), download it into a cache, check its
     hash and unpack it: nothing is built, so any build backend (setuptools, flit, hatchling,
     setuptools-scm, ...) works; copy the tree to `repos/NAME-VERSION/` beside the tasks file;
  2. find its tests (`tests/`, `test/`, `testing/`, `NAME/tests`, `src/NAME/tests`, test
     modules beside the code) and run them once in a sandbox (`config.env.sandbox`): the
     passing ones;
  3. enumerate single-line AST mutations of the library's source (`mutations`: operator swap,
     comparison swap, changed constant / off-by-one, dropped condition, negation removed, swapped
     arguments), try them in a seeded order, and keep one only when at least one passing test
     now fails;
  4. write the task: the failing tests are FAIL_TO_PASS, a sample of the still-passing ones
     PASS_TO_PASS; the bug is the task's `setup_patch` over the shared `repo_dir`, and every
     test stays in the agent's tree (as SWE-bench keeps a repository's own tests), so the agent
     can run the failing ones; the `test_patch` marks the files holding them, which makes the
     grader restore those files before it runs the tests; the gold patch restores the line; the
     problem statement names the failing tests (only ones the checkout holds), how to run them,
     and their assertion lines, never the changed code.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import html.parser
import json
import os
import random
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Any, Callable, Iterator

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from dagger_jax import redact
from dagger_jax.envs.sandbox import make_sandbox
from dagger_jax.envs.tasks import build_repo, git, snapshot_commit, write_files
from dagger_jax.errors import DaggerJaxError

P2P_SAMPLE = 25  # PASS_TO_PASS tests kept per task
DATA_TABLE = 16  # literal collections with more items are data, never mutated
MAX_TRIES_PER_TASK = 25
TEST_TIMEOUT_S = 180.0
_TEST_DIRS = ("tests", "test", "testing")


class PypiError(DaggerJaxError, RuntimeError):
  """The library cannot be turned into tasks; the message says why."""


# ----------------------------------------------------------------------------------------------
# Fetching the sdist
#
# No build step: a source distribution is found on the package index pip is configured with (its
# project page: PEP 691 JSON, or PEP 503 HTML), downloaded, checked against the hash in its link,
# and unpacked. pip's `download` would prepare the sdist's metadata, which runs its build backend
# (flit, hatchling, setuptools-scm, ...): that fails without the backend installed, and pip then
# quietly falls back to an older release built with plain setuptools.

DEFAULT_INDEX = "https://pypi.org/simple"
SDIST_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar.bz2", ".tar.xz")  # in order of preference
_JSON_TYPE = "application/vnd.pypi.simple.v1+json"
_SIMPLE_ACCEPT = f"{_JSON_TYPE}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"


class _NotFound(Exception):
  """The index answered, and it has no page for the project (HTTP 404 / 410, no such folder)."""


class _Unreachable(Exception):
  """The index could not be asked (no connection, timeout, TLS or server error)."""


@dataclasses.dataclass
class Registry:
  """Where pip looks for packages, read from pip's own configuration (`Registry.from_pip`).

  `index_urls`: pip's index-url (PyPI by default) then its extra-index-urls, or none with
  no-index; `find_links`: local folders, HTML pages or `file://` URLs that list files directly.
  `timeout` (seconds per request), `cert` (a CA bundle), `proxy` and `retries` follow pip's
  options of the same names.
  """
  index_urls: list[str]
  find_links: list[str] = dataclasses.field(default_factory=list)
  timeout: float = 60.0
  cert: str = ""
  proxy: str = ""
  retries: int = 1

  @classmethod
  def from_pip(cls) -> "Registry":
    """The registry `pip download` would use here: pip's config files and PIP_* variables, as
    `pip config list` reports them, `[global]` then `[install]`, `[download]`, the environment
    (each later one wins, as in pip)."""
    opts = _pip_options()
    def words(key: str) -> list[str]:
      return opts.get(key, "").split()
    no_index = opts.get("no-index", "").lower() in ("1", "true", "yes", "on")
    index_urls = [] if no_index else (words("index-url")[:1] or [DEFAULT_INDEX])
    if not no_index:
      index_urls += [u for u in words("extra-index-url") if u not in index_urls]
    timeout = _number(opts.get("timeout") or opts.get("default-timeout"), 60.0)
    retries = int(_number(opts.get("retries"), 1))
    return cls(index_urls, words("find-links"), timeout=timeout, cert=opts.get("cert", ""),
               proxy=opts.get("proxy", ""), retries=max(0, min(retries, 3)))

  def describe(self) -> str:
    """The registries by name (credentials removed), for messages."""
    where = [redact.display_url(u) for u in self.index_urls] + [
        f"find-links {redact.display_url(u)}" for u in self.find_links]
    return ", ".join(where) or "no registry (pip is configured with no-index and no find-links)"


def _number(text: str | None, default: float) -> float:
  try:
    return float(text) if text else default
  except ValueError:
    return default


def _pip_options() -> dict[str, str]:
  """{option: value} of pip's configuration, by pip itself (`pip config list`: its files, site
  and PIP_* variables, with their precedence); the PIP_* variables alone if pip cannot say."""
  rank = {"global": 0, "install": 1, "download": 2, ":env:": 3}
  found: dict[str, tuple[int, str]] = {}
  try:
    p = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                       text=True, timeout=60)
    lines = p.stdout.splitlines() if p.returncode == 0 else None
  except (OSError, subprocess.TimeoutExpired):
    lines = None
  if lines is None:  # no pip in this interpreter: what pip would read from the environment
    lines = [f":env:.{k[4:].lower().replace('_', '-')}={v!r}" for k, v in os.environ.items()
             if k.startswith("PIP_")]
  for line in lines:
    key, sep, raw = line.partition("=")
    section, _, option = key.rpartition(".")
    if not sep or section not in rank:
      continue
    try:
      value = str(ast.literal_eval(raw))
    except (ValueError, SyntaxError):
      value = raw.strip("'\"")
    option = option.replace("_", "-")
    if option not in found or rank[section] >= found[option][0]:
      found[option] = (rank[section], value)
  return {k: v for k, (_, v) in found.items()}


@dataclasses.dataclass(frozen=True)
class Link:
  """One file an index lists for a project."""
  filename: str
  url: str
  hashes: tuple[tuple[str, str], ...] = ()  # (algorithm, hex digest)
  requires_python: str = ""
  yanked: bool = False
  registry: str = ""  # the index or find-links entry that listed it


class _LinkParser(html.parser.HTMLParser):
  """The `<a href>` links (and their data-* attributes) of a PEP 503 page."""

  def __init__(self) -> None:
    super().__init__()
    self.base = ""
    self.anchors: list[dict[str, str]] = []

  def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
    a = {k: v or "" for k, v in attrs}
    if tag == "base" and a.get("href") and not self.base:
      self.base = a["href"]
    elif tag == "a" and a.get("href"):
      self.anchors.append(a)


def _hashes_of(url: str) -> tuple[tuple[str, str], ...]:
  """The `#sha256=...` fragment of a link, when hashlib knows the algorithm."""
  frag = urllib.parse.urlsplit(url).fragment
  alg, _, digest = frag.partition("=")
  return ((alg, digest.lower()),) if digest and alg in hashlib.algorithms_guaranteed else ()


def _links_from_html(text: str, page_url: str, registry: str) -> list[Link]:
  parser = _LinkParser()
  parser.feed(text)
  base = urllib.parse.urljoin(page_url, parser.base) if parser.base else page_url
  out = []
  for a in parser.anchors:
    url = urllib.parse.urljoin(base, a["href"])
    filename = urllib.parse.unquote(os.path.basename(urllib.parse.urlsplit(url).path))
    out.append(Link(filename, url.split("#")[0], _hashes_of(url), a.get("data-requires-python", ""),
                    "data-yanked" in a, registry))
  return out


def _links_from_json(data: dict, page_url: str, registry: str) -> list[Link]:
  out = []
  for f in data.get("files", []):
    url = urllib.parse.urljoin(page_url, f["url"])
    hashes = tuple((k, v.lower()) for k, v in sorted((f.get("hashes") or {}).items())
                   if k in hashlib.algorithms_guaranteed) or _hashes_of(url)
    out.append(Link(f["filename"], url.split("#")[0], hashes, f.get("requires-python") or "",
                    bool(f.get("yanked")), registry))
  return out


def _local_path(url: str) -> str | None:
  """The local path of a `file://` URL or a plain path; None for a network URL."""
  scheme = urllib.parse.urlsplit(url).scheme
  if scheme == "file":
    return urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
  return None if scheme in ("http", "https") else os.path.abspath(os.path.expanduser(url))


def _open(url: str, registry: Registry, accept: str = "*/*"):
  """urlopen with pip's timeout, CA bundle, proxy and retries; credentials in the URL become a
  basic-auth header. Raises _NotFound (404 / 410) or _Unreachable."""
  parts = urllib.parse.urlsplit(url)
  headers = {"Accept": accept, "User-Agent": "dagger-jax (pypi tasks)"}
  if "@" in parts.netloc:
    auth, _, host = parts.netloc.rpartition("@")
    url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    user, _, password = urllib.parse.unquote(auth).partition(":")
    headers["Authorization"] = "Basic " + base64.b64encode(
        f"{user}:{password}".encode()).decode()
  context = ssl.create_default_context(cafile=registry.cert if os.path.isfile(
      registry.cert) else None)
  handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPSHandler(context=context)]
  if registry.proxy:
    handlers.append(urllib.request.ProxyHandler({"http": registry.proxy,
                                                 "https": registry.proxy}))
  opener = urllib.request.build_opener(*handlers)
  for attempt in range(registry.retries + 1):
    try:
      return opener.open(urllib.request.Request(url, headers=headers), timeout=registry.timeout)
    except urllib.error.HTTPError as e:
      if e.code in (404, 410):
        raise _NotFound(f"HTTP {e.code}") from None
      problem = f"HTTP {e.code} {e.reason}"
      if e.code < 500:
        break
    except (urllib.error.URLError, OSError) as e:
      reason = getattr(e, "reason", e)
      problem = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
    if attempt < registry.retries:
      time.sleep(0.5 * (attempt + 1))
  raise _Unreachable(problem)


def _listing(path: str, registry: str) -> list[Link]:
  """The files of a local folder as links (a local index page without index.html, find-links)."""
  return [Link(f, "file://" + urllib.request.pathname2url(os.path.join(path, f)),
               registry=registry) for f in sorted(os.listdir(path))
          if os.path.isfile(os.path.join(path, f))]


def _page_links(url: str, registry: Registry, label: str) -> list[Link]:
  """The links of one page: an index's project page, or a find-links page or folder."""
  path = _local_path(url)
  if path is not None:
    if os.path.isdir(path):
      index = os.path.join(path, "index.html")
      if not os.path.isfile(index):
        return _listing(path, label)
      path, url = index, "file://" + urllib.request.pathname2url(index)
    if not os.path.isfile(path):
      raise _NotFound("no such file or folder")
    with open(path, encoding="utf-8", errors="replace") as f:
      return _links_from_html(f.read(), url, label)
  with _open(url, registry, _SIMPLE_ACCEPT) as r:
    body = r.read()
    ctype = r.headers.get("Content-Type", "").split(";")[0].strip()
    final = r.geturl()
  if ctype == _JSON_TYPE:
    links = _links_from_json(json.loads(body), final, label)
  else:
    links = _links_from_html(body.decode("utf-8", "replace"), final, label)
  # Files on the index's own host need its credentials too (a private index: user:token@host).
  auth, _, host = urllib.parse.urlsplit(url).netloc.rpartition("@")
  if auth:
    links = [dataclasses.replace(l, url=urllib.parse.urlunsplit(p._replace(
        netloc=f"{auth}@{host}"))) if (p := urllib.parse.urlsplit(l.url)).netloc == host else l
             for l in links]
  return links


def project_links(name: str, registry: Registry) -> tuple[list[Link], list[str], list[str]]:
  """Every file the registry lists for project `name`.

  Returns (links, registries that answered, problems: "REGISTRY: why it could not be asked").
  """
  project = canonicalize_name(name)
  links: list[Link] = []
  answered: list[str] = []
  problems: list[str] = []
  pages = [(u.rstrip("/") + f"/{project}/", u) for u in registry.index_urls]
  pages += [(u, f"find-links {u}") for u in registry.find_links]
  for url, label in pages:
    label = redact.display_url(label)
    try:
      links += _page_links(url, registry, label)
      answered.append(label)
    except _NotFound:
      answered.append(label)
    except _Unreachable as e:
      problems.append(f"{label}: {e}")
    except (ValueError, KeyError, OSError) as e:  # a malformed page or an unreadable folder
      problems.append(f"{label}: {type(e).__name__}: {e}")
  return links, answered, problems


def _split_sdist(filename: str, name: str) -> tuple[str, Version] | None:
  """(version as spelled, parsed version) of an sdist file of project `name`; None for wheels,
  other projects and names that do not parse."""
  suffix = next((s for s in SDIST_SUFFIXES if filename.lower().endswith(s)), None)
  if suffix is None:
    return None
  stem = filename[:-len(suffix)]
  project = canonicalize_name(name)
  for i, ch in enumerate(stem):
    if ch == "-" and canonicalize_name(stem[:i]) == project:
      try:
        return stem[i + 1:], Version(stem[i + 1:])
      except InvalidVersion:
        continue
  return None


def sdist_version(filename: str, name: str) -> Version | None:
  """The version of an sdist file of project `name` (`python_dateutil-2.9.0.post0.tar.gz`,
  `python-dateutil-2.8.2.tar.gz` -> 2.8.2, ...); None for wheels, other projects, odd names."""
  split = _split_sdist(filename, name)
  return split[1] if split else None


def _python_ok(requires_python: str) -> bool:
  try:
    return SpecifierSet(requires_python).contains(
        ".".join(map(str, sys.version_info[:3])), prereleases=True)
  except InvalidSpecifier:
    return True


def pick_sdist(links: list[Link], name: str, specifier: SpecifierSet) -> Link | None:
  """The sdist pip would choose: the newest version the specifier allows (pre-releases only when
  it names one or nothing else matches), not yanked unless pinned, for this Python; of the
  files of that version the preferred suffix, then one with a hash, then the first index."""
  usable = [(v, l) for l in links if (v := sdist_version(l.filename, name)) is not None
            and (not l.requires_python or _python_ok(l.requires_python))]
  pinned = any(s.operator in ("==", "===") for s in specifier)
  for allow_yanked in ((False, True) if pinned else (False,)):
    versions = {v for v, l in usable if allow_yanked or not l.yanked}
    allowed = list(specifier.filter(sorted(versions)))
    if allowed:
      best = max(allowed)
      files = [l for v, l in usable if v == best and (allow_yanked or not l.yanked)]
      return min(files, key=lambda l: (
          next(i for i, s in enumerate(SDIST_SUFFIXES) if l.filename.lower().endswith(s)),
          not l.hashes))
  return None


def _digest(path: str, alg: str) -> str:
  h = hashlib.new(alg)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _hash_problem(path: str, link: Link) -> str:
  """'' when `path` matches the link's hash (or the link has none), else what differs."""
  for alg, want in link.hashes[:1]:
    got = _digest(path, alg)
    if got != want:
      return f"{alg} {got}, but {link.registry} lists {want}"
  return ""


def _download(link: Link, downloads: str, registry: Registry) -> tuple[str, bool]:
  """(path of the verified file in `downloads`, whether it came from the cache)."""
  path = os.path.join(downloads, link.filename)
  if os.path.isfile(path) and not _hash_problem(path, link):
    return path, True
  part = f"{path}.part{os.getpid()}"
  try:
    local = _local_path(link.url)
    if local is not None:
      shutil.copyfile(local, part)
    else:
      with _open(link.url, registry) as r, open(part, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    problem = _hash_problem(part, link)
    if problem:
      raise PypiError(f"{link.filename} from {redact.display_url(link.url)} is corrupt: its "
                      f"{problem}. Try again; if it persists the registry or a proxy serves a bad "
                      "file")
    os.replace(part, path)
  except (_Unreachable, _NotFound, OSError) as e:
    raise PypiError(f"cannot download {redact.display_url(link.url)} (listed by {link.registry}; "
                    f"is the package registry reachable?): {e}. Check the network or proxy, or "
                    "point pip at a reachable index (`pip config set global.index-url URL`)"
                    ) from None
  finally:
    if os.path.exists(part):
      os.remove(part)
  return path, False


def _cached(downloads: str, name: str, specifier: SpecifierSet) -> Link | None:
  """The newest sdist of `name` already in the download cache that the specifier allows."""
  if not os.path.isdir(downloads):
    return None
  return pick_sdist(_listing(downloads, f"the cache {downloads}"), name, specifier)


def fetch_sdist(spec: str, cache_dir: str, registry: Registry | None = None,
                log: Callable[[str], None] = lambda s: None) -> tuple[str, str, str]:
  """Finds, downloads and unpacks the sdist of `spec` (NAME, NAME==VERSION, NAME>=VERSION, ...)
  without building anything.

  `registry`: where to look (default: pip's configuration, `Registry.from_pip()`). Downloads
  are kept in `cache_dir/downloads` (a file already there with the listed hash is not fetched
  again; when no registry answers, the newest cached sdist is used) and unpacked once into
  `cache_dir/unpacked`. Returns (canonical name, version, unpacked source dir). Raises
  PypiError, naming the registry and the fix, when no sdist can be had.
  """
  try:
    req = Requirement(spec)
  except InvalidRequirement as e:
    raise PypiError(f"pypi:{spec}: not a requirement pip would accept ({e}); write pypi:NAME or "
                    "pypi:NAME==VERSION") from None
  name = canonicalize_name(req.name)
  shown = f"{name}{req.specifier}"
  registry = registry or Registry.from_pip()
  downloads = os.path.join(cache_dir, "downloads")
  os.makedirs(downloads, exist_ok=True)
  links, answered, problems = project_links(name, registry)
  link = pick_sdist(links, name, req.specifier)
  if link is not None:
    path, cached = _download(link, downloads, registry)
    newest = max((v for l in links if l.filename.endswith(".whl") and (
        v := _wheel_version(l.filename, name)) and req.specifier.contains(v)), default=None)
    if newest is not None and newest > sdist_version(link.filename, name):
      log(f"pypi:{name}: release {newest} has no sdist; using {link.filename}, the newest sdist")
    log(f"pypi:{name}: {link.filename} from {link.registry}"
        f"{' (cached)' if cached else ''}{' (hash checked)' if link.hashes else ''}")
  else:
    link = _cached(downloads, name, req.specifier) if problems else None
    if link is None:
      raise PypiError(_no_sdist_message(shown, links, answered, problems, registry, downloads))
    path = os.path.join(downloads, link.filename)
    log(f"pypi:{name}: the registry did not answer ({'; '.join(problems)}); using the cached "
        f"{path}")
  version = _split_sdist(link.filename, name)[0]
  return name, version, _unpack(path, os.path.join(cache_dir, "unpacked"))


def _wheel_version(filename: str, name: str) -> Version | None:
  parts = filename.split("-")
  if len(parts) < 5 or canonicalize_name(parts[0]) != canonicalize_name(name):
    return None
  try:
    return Version(parts[1])
  except InvalidVersion:
    return None


def _no_sdist_message(shown: str, links: list[Link], answered: list[str], problems: list[str],
                      registry: Registry, downloads: str) -> str:
  """Why no sdist of `shown` could be had, and what to do about it."""
  name = re.split(r"[=<>!~ ]", shown, maxsplit=1)[0]
  sdists = sorted({v for l in links if (v := sdist_version(l.filename, name)) is not None})
  wheels = sorted({v for l in links if (v := _wheel_version(l.filename, name)) is not None})
  where = ", ".join(answered)
  if not sdists and wheels:
    found = f"{where} list only wheels of {name} ({', '.join(map(str, wheels[-3:]))})"
  elif not sdists:
    found = f"{where} list no file of {name}"
  else:
    best = pick_sdist(links, name, SpecifierSet())
    found = (f"{where} list sdists of {name} {', '.join(map(str, sdists[-5:]))}, none that "
             f"fits {shown} on Python {sys.version.split()[0]}: " + (
                 f"e.g. pypi:{name}=={sdist_version(best.filename, name)} would do" if best
                 else "the others are yanked or for another Python"))
  if problems:
    return (f"cannot fetch the sdist of {shown} (is the package registry reachable?): "
            f"{'; '.join(problems)}{'; ' + found if answered else ''}. Check the network or "
            "proxy, or point pip at a reachable index (`pip config set global.index-url URL`, "
            f"or PIP_INDEX_URL), or put the sdist ({name}-VERSION.tar.gz) into {downloads}")
  if not answered:
    return (f"nowhere to look for {name}: {registry.describe()}; set an index "
            "(`pip config set global.index-url URL`)")
  if not links:
    return (f"{name} is not on {where}: check the name (as on https://pypi.org/project/NAME/), "
            "or point pip at the index that has it (`pip config set global.index-url URL`)")
  if not sdists:
    return f"{found}, no source distribution: pypi:NAME needs an sdist (it ships the tests)"
  return found


def _unpack(archive: str, dest: str) -> str:
  """Unpacks `archive` once into `dest/<archive name>/`; returns the tree's root (its single
  top folder, as sdists have)."""
  base = os.path.basename(archive)
  suffix = next((s for s in SDIST_SUFFIXES if base.lower().endswith(s)), "")
  target = os.path.join(dest, base[:len(base) - len(suffix)] if suffix else base)
  if not os.path.isdir(target):
    os.makedirs(dest, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=dest)
    try:
      if archive.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
          for member in z.namelist():
            if member.startswith("/") or ".." in member.split("/"):
              raise PypiError(f"{archive}: unsafe path in the archive: {member}")
          z.extractall(tmp)
      else:
        with tarfile.open(archive) as t:
          t.extractall(tmp, filter="data")
      try:
        os.replace(tmp, target)
      except OSError:
        if not os.path.isdir(target):  # else another process unpacked it first
          raise
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
      raise PypiError(f"{archive}: cannot unpack it ({type(e).__name__}: {e}); delete it and "
                      "try again") from None
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp)
  entries = [e for e in os.listdir(target) if not e.startswith("._")]
  if len(entries) == 1 and os.path.isdir(os.path.join(target, entries[0])):
    return os.path.join(target, entries[0])
  return target


# ----------------------------------------------------------------------------------------------
# Layout: where the source and the tests are
#
# Libraries keep their tests in `tests/`, `test/` or `testing/` at the top, inside the package
# (`NAME/tests`, `src/NAME/tests`, `NAME/test`), or as modules (`test_NAME.py` beside the code,
# `src/NAME/test_util.py`, `NAME/util_test.py`, `NAME/tests.py`). A folder counts when it holds a
# Python file; a module outside such folders counts by its name.

_NOT_SHIPPED = ("docs", "doc", "examples", "example", "benchmarks", "benchmark", "bench", "build",
                "dist", "documentation", "site-packages", "node_modules", "venv")  # not code


def _is_test_module(base: str) -> bool:
  return ((base.startswith("test_") or base.endswith("_test.py") or base == "tests.py")
          and base.endswith(".py"))


def _is_test_path(rel: str) -> bool:
  parts = rel.split("/")
  base = parts[-1]
  return (any(p in _TEST_DIRS for p in parts[:-1]) or _is_test_module(base)
          or base == "conftest.py")


def _walk_py(root: str) -> Iterator[str]:
  """Relative paths of the tree's .py files, sorted, outside hidden and non-code folders."""
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")) and not (
        rel_dir == "." and d in _NOT_SHIPPED))
    for f in sorted(filenames):
      if f.endswith(".py"):
        yield f if rel_dir == "." else f"{rel_dir}/{f}".replace(os.sep, "/")


def source_files(root: str) -> list[str]:
  """Library modules (relative paths): .py files outside tests, docs, examples and setup."""
  return [rel for rel in _walk_py(root)
          if not _is_test_path(rel)
          and rel not in ("setup.py", "noxfile.py", "tasks.py", "fabfile.py", "conftest.py")]


def test_targets(root: str) -> list[str]:
  """What pytest should collect (relative paths, sorted): the outermost test folders, and the
  test modules that lie outside them."""
  targets: set[str] = set()
  for rel in _walk_py(root):
    parts = rel.split("/")
    i = next((i for i, p in enumerate(parts[:-1]) if p in _TEST_DIRS), None)
    if i is not None:
      if parts[-1] not in ("__init__.py", "conftest.py"):
        targets.add("/".join(parts[:i + 1]))
    elif _is_test_module(parts[-1]):
      targets.add(rel)
  return sorted(targets)


def test_command(root: str, conftest: bool = True) -> str:
  """The pytest command for the sdist's tests (-rA: per-test lines for swebench's parser). A
  test module that cannot be imported (it needs a package the sandbox lacks) does not stop the
  others; with conftest=False no conftest.py is loaded (for when one cannot be imported)."""
  targets = test_targets(root)
  if not targets:
    raise PypiError(f"{root}: the sdist ships no tests (looked for tests/, test/, testing/ "
                    "folders at the top or inside the package, and test_*.py / *_test.py / "
                    "tests.py modules); the project keeps its tests only in its repository")
  flags = ["-rA", "--continue-on-collection-errors"] + ([] if conftest else ["--noconftest"])
  return pytest_prefix(root, *flags) + " " + " ".join(shlex.quote(t) for t in targets)


def pytest_prefix(root: str, *flags: str) -> str:
  """`PYTHONPATH=... python3 -m pytest ... -q` for the tree at `root` (src layout or not), with
  the project's own addopts off (they often need plugins the sandbox lacks), and marks that only
  a missing plugin defines (`no_cover`) no error where the project turns warnings into errors."""
  pythonpath = "src" if os.path.isdir(os.path.join(root, "src")) else "."
  return " ".join([f"PYTHONPATH={pythonpath} python3 -m pytest", *flags,
                   "-W ignore::pytest.PytestUnknownMarkWarning -p no:cacheprovider -o addopts= -q"])


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
  mutated lines are ASCII-checked so byte and character columns agree). Nothing inside a data
  table (a literal tuple, list, set or dict of more than `DATA_TABLE` items, such as idna's
  Unicode tables) is mutated: a changed table entry is a bug no one could reason out."""
  try:
    tree = ast.parse(text)
  except SyntaxError:
    return []
  lines = text.splitlines()
  out: list[Mutation] = []
  docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and n.body and isinstance(n.body[0], ast.Expr)}
  skip = set(docstrings)
  for n in ast.walk(tree):
    if len(getattr(n, "elts", None) or getattr(n, "keys", None) or ()) > DATA_TABLE and isinstance(
        n, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and id(n) not in skip:
      skip.update(id(d) for d in ast.walk(n))

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
    if id(node) in skip:
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


def _missing_modules(log: str) -> list[str]:
  """Modules a test run could not import (`No module named 'x'`), sorted: why tests error."""
  return sorted(set(re.findall(r"No module named '([\w.]+)'", log)))


def _statement(name: str, f2p: list[str], log: str, avoid: list[str], pytest_cmd: str,
               present: Callable[[str], bool]) -> str:
  """The issue: which of the library's tests fail, how to run them, and the first one's
  assertion lines minus any line quoting the changed code. It names only tests whose file
  `present` says the agent's checkout holds (never a file the agent cannot open or run)."""
  named = [t for t in f2p if present(t.split("::")[0])]
  if not named:
    return (f"Some of {name}'s own tests fail on this checkout. Run the test suite with:\n\n"
            f"  {pytest_cmd}\n\nFind the bug in {name}'s source (not in the tests) and fix it.")
  shown = "\n".join(f"  {t}" for t in named[:5]) + (
      f"\n  ... and {len(named) - 5} more" if len(named) > 5 else "")
  text = (f"Some of {name}'s own tests fail on this checkout:\n\n{shown}\n\nRun "
          f"{'it' if len(named) == 1 else 'them'} with:\n\n  {pytest_cmd} "
          f"{' '.join(shlex.quote(t) for t in named[:5])}\n")
  detail = _failure_lines(log, named[0], avoid)
  if detail:
    text += "\nThe first one fails with:\n\n" + "\n".join("  " + l for l in detail) + "\n"
  return text + f"\nFind the bug in {name}'s source (not in the tests) and fix it."


# ----------------------------------------------------------------------------------------------
# Generation

# Appended to each test file that holds a FAIL_TO_PASS test, in the task's `test_patch`: the
# grader checks the files a test_patch touches out afresh before it runs the tests, so edits an
# agent makes to the tests it was shown do not count.
GRADED_MARK = b"# dagger-jax: the grader restores this file before it runs the tests\n"


def _diffs(root: str, mutated: dict[str, str], graded: list[str]) -> tuple[str, str, str]:
  """(setup_patch, gold patch, test_patch) of one bug over the pristine tree at `root`.

  The setup_patch only injects the bug: every test stays in the agent's tree, as SWE-bench keeps
  a repository's own tests. The test_patch marks the `graded` test files (`GRADED_MARK`) so that
  the grader resets them.
  """
  with tempfile.TemporaryDirectory(prefix="dagger_jax_pypi_") as tmp:
    shutil.copytree(root, tmp, dirs_exist_ok=True)
    snapshot_commit(tmp)
    originals = {p: open(os.path.join(root, p), encoding="utf-8").read() for p in mutated}
    write_files(tmp, mutated)
    git(tmp, "add", "-A")
    setup_patch = git(tmp, "diff", "--cached", "--binary")
    git(tmp, "commit", "-q", "--no-verify", "-m", "bug")
    write_files(tmp, originals)
    gold = git(tmp, "diff")
    git(tmp, "checkout", "-q", "--", ".")
    for p in graded:
      with open(os.path.join(tmp, p), "rb+") as f:
        text = f.read()
        f.write((b"" if text.endswith(b"\n") or not text else b"\n") + GRADED_MARK)
    test_patch = git(tmp, "diff")
  return setup_patch, gold, test_patch


def generate(spec: str, n: int, seed: int, *, out_path: str, env_config: Any,
             cache_dir: str | None = None, registry: Registry | None = None,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[dict]:
  """Up to n tasks of library `spec`; the pristine tree goes to `repos/` beside `out_path`.

  `registry`: where the sdist comes from (default: pip's configuration). Raises PypiError when
  the sdist cannot be had, the library has no usable tests, or no mutation breaks one.
  """
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dagger_jax", "sdists")
  name, version, src = fetch_sdist(spec, cache_dir, registry, log=log)
  repo_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "repos",
                          f"{name}-{version}")
  if not os.path.isdir(repo_dir):
    shutil.copytree(src, repo_dir + ".tmp", dirs_exist_ok=True)
    os.replace(repo_dir + ".tmp", repo_dir)
  cmd = test_command(repo_dir)
  sources = {}
  for p in source_files(repo_dir):
    try:
      sources[p] = open(os.path.join(repo_dir, p), encoding="utf-8").read()
    except UnicodeDecodeError:  # not UTF-8: leave it alone (its columns would not be bytes)
      pass
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
      first = sb.run(cmd)
      if first.timed_out:
        raise PypiError(f"{name}=={version}: its test suite did not finish in "
                        f"{TEST_TIMEOUT_S:.0f} s in the sandbox, and every bug tried runs it "
                        f"again: too slow ({cmd})")
      missing = _missing_modules(first.output)
      needs = f" (the sandbox's python3 lacks {', '.join(missing)})" if missing else ""
      conftest = "while loading conftest" not in first.output
      if not conftest:  # it stops every test: run them without it
        cmd = test_command(repo_dir, conftest=False)
        log(f"pypi:{name}: a conftest.py cannot be imported{needs}; running the tests without "
            f"conftest files: {cmd}")
        first = sb.run(cmd)
      base = parse_statuses(first.output)
      passing = sorted(t for t, s in base.items() if s == "PASSED")
      no_conftest = [] if conftest else ["--noconftest"]  # in the statement's command too
      if not passing:
        raise PypiError(f"{name}=={version}: none of its tests pass unmodified{needs} ({cmd})")
      errors = sum(s == "ERROR" for s in base.values())
      log(f"pypi:{name}: {len(passing)} tests pass unmodified"
          + (f", {errors} error{'s' * (errors > 1)}{needs}" if errors else ""))
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
        def present(path: str, bug_file: str = m.path) -> bool:  # a test file the agent has
          return path != bug_file and os.path.isfile(os.path.join(repo_dir, path))
        graded = sorted(p for p in {t.split("::")[0] for t in f2p} if present(p))
        setup_patch, gold, test_patch = _diffs(repo_dir, {m.path: buggy}, graded)
        old_line = sources[m.path].splitlines()[m.line - 1].strip()
        new_line = buggy.splitlines()[m.line - 1].strip()
        digest = hashlib.sha256(setup_patch.encode()).hexdigest()[:10]
        task = {
            "instance_id": f"pypi__{name}-{version}-{digest}",
            "repo": f"pypi/{name}",
            "base_commit": "",
            "problem_statement": _statement(name, f2p, r.output, [old_line, new_line],
                                            pytest_prefix(repo_dir, *no_conftest), present),
            "patch": gold,
            "test_patch": test_patch,
            "FAIL_TO_PASS": f2p,
            "PASS_TO_PASS": p2p,
            "version": version,
            "test_cmd": cmd,
            "repo_dir": repo_dir,
            "setup_patch": setup_patch,
            "bug": {"kind": m.kind, "file": m.path, "line": m.line, "old": new_line,
                    "new": old_line,
                    # the oracle teacher's fix: the gold patch, as its `_git_apply_cmd` writes it
                    "fix_cmd": f"git apply <<'DAGGER_PATCH_EOF'\n{gold.rstrip(chr(10))}\n"
                               "DAGGER_PATCH_EOF"},
        }
        with tempfile.TemporaryDirectory(prefix="dagger_jax_pypi_base_") as tmp:
          task["base_commit"] = build_repo(task, os.path.join(tmp, "r"))
        tasks.append(task)
        log(f"  kept {m.kind} at {m.path}:{m.line} ({len(f2p)} tests fail) [{len(tasks)}/{n}]")
  if not tasks:
    raise PypiError(f"{name}=={version}: none of {tries} mutations broke a test")
  return tasks
