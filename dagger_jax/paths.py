"""The one path layer: every shard, trajectory, checkpoint and metrics file goes through here, so
a `gs://bucket/run` works wherever `runs/x` does.

A path is a plain string. A local one is handled with `os` (fsync, atomic `os.replace`,
`O_APPEND`); one with a URI scheme (`gs://`, `s3://`, ...) with `etils.epath`, the layer Orbax
uses for its own directories. epath reaches `gs://` through fsspec (the `gcsfs` package), or
through `tf.io.gfile` when TensorFlow is installed; neither is a dependency here: install `gcsfs`
on the machines that use buckets.

What an object store changes, and how each operation copes:

    operation          local file system                   object store (gs://, s3://)
    write_atomic       temp file, fsync, os.replace        one PUT: the object appears whole
    append             O_APPEND, flush                     read + rewrite the whole object (no
                                                           append exists); each rewrite is whole
    rename             os.replace (atomic)                 copy + delete (not atomic)
    makedirs           os.makedirs                         nothing (directories are name prefixes)

Writers that need a multi-file write to appear at once (a shard) rename a temporary directory
locally, and on an object store write their index file (the shard's manifest) last, so a reader
never takes a half-written directory for a finished one (`dagger_jax.data.shards.write_shard`).

Multi-host (JAX multi-controller): every process runs the same program; `is_chief()` says which
one writes the files every process would write alike (metrics, trajectories, shards), `barrier`
makes the others wait until those files exist before they read them. Orbax saves from every
process (each writes its own array shards). Such a run needs a run directory that every host
sees: a bucket or a shared file system.

TensorBoard: `summary_writer` returns a `tensorboardX.SummaryWriter`; for a remote log directory
its event file goes through this layer too (rewritten whole at each flush, as tensorboardX's own
GCS writer does), so no `google-cloud-storage` client is needed.
"""

from __future__ import annotations

import builtins
import fnmatch
import io
import os
import posixpath
import re
import shutil
from typing import IO, Any, Iterator

from etils import epath

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme(path: str | os.PathLike) -> str | None:
  """'gs' for 'gs://bucket/x', None for a local path."""
  m = _SCHEME.match(os.fspath(path))
  return m.group(1) if m else None


def is_remote(path: str | os.PathLike) -> bool:
  return scheme(path) is not None


def _epath(path: str | os.PathLike) -> epath.Path:
  return epath.Path(os.fspath(path))


def join(path: str | os.PathLike, *parts: str) -> str:
  """`posixpath.join` (a URI keeps its scheme: join('gs://b/run', 'x') == 'gs://b/run/x')."""
  return posixpath.join(os.fspath(path), *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str | os.PathLike) -> str:
  p = os.fspath(path)
  return posixpath.dirname(p.rstrip("/")) if is_remote(p) else os.path.dirname(os.path.abspath(p))


def abspath(path: str | os.PathLike) -> str:
  """A local path made absolute; a URI unchanged (`os.path.abspath` would make 'gs://b' into
  '<cwd>/gs:/b')."""
  p = os.fspath(path)
  return p if is_remote(p) else os.path.abspath(p)


# --------------------------------------------------------------------------------------- queries


def exists(path: str | os.PathLike) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str | os.PathLike) -> bool:
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names in a directory, sorted."""
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def glob(directory: str | os.PathLike, pattern: str) -> list[str]:
  """Paths of the entries of `directory` whose names match `pattern` (fnmatch, one level), sorted.
  Matching names here rather than with the backend's glob keeps the result the same everywhere."""
  return [join(directory, n) for n in listdir(directory) if fnmatch.fnmatch(n, pattern)]


# ----------------------------------------------------------------------------------------- files


def open(path: str | os.PathLike, mode: str = "r") -> IO[Any]:  # noqa: A001 (shadows on purpose)
  """A file object: 'r', 'rb', 'w', 'wb' anywhere; 'a' / 'ab' only locally (an object store has
  no append: use `append`). Text modes are UTF-8."""
  if is_remote(path):
    if "a" in mode or "+" in mode:
      raise ValueError(f"{path}: mode {mode!r} on an object store; use paths.append, which "
                       f"rewrites the object whole")
    f = _epath(path).open(mode.replace("t", "").replace("b", "") + "b")
    return f if "b" in mode else io.TextIOWrapper(f, encoding="utf-8")
  return builtins.open(path, mode, encoding=None if "b" in mode else "utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Replaces `path` with `data` whole: a reader sees the old content or the new, never a part.
  Locally a temp file beside it is fsynced and `os.replace`d; on an object store one PUT is
  already all-or-nothing."""
  blob = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    with _epath(path).open("wb") as f:
      f.write(blob)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with builtins.open(tmp, "wb") as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def append(path: str | os.PathLike, data: bytes | str) -> None:
  """Appends `data` (whole lines, for a JSON Lines file) and flushes.

  Locally one `write` call on an O_APPEND file (a kill tears at most the end of `data`, which
  `trajectory.cut_torn_tail` removes). On an object store, where objects are immutable, the
  object is read and rewritten with `data` at its end: each version is whole, and the cost grows
  with the file (fine for per-round files of episodes and metrics rows).
  """
  blob = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    old = read_bytes(path) if exists(path) else b""
    write_atomic(path, old + blob)
    return
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    view = memoryview(blob)
    while view:  # a regular file takes it in one call; the loop covers a short write
      view = view[os.write(fd, view):]
  finally:
    os.close(fd)


def makedirs(path: str | os.PathLike) -> None:
  """Creates the directory and its parents (exist_ok). Nothing to do on an object store, but the
  call keeps code the same for both."""
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def parent_of(path: str | os.PathLike) -> str:
  """`path`, after creating the directory it goes in."""
  makedirs(dirname(path))
  return os.fspath(path)


def remove(path: str | os.PathLike) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str | os.PathLike) -> None:
  if is_remote(path):
    _epath(path).rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves `src` to `dst` (replacing a file there). Atomic locally (`os.replace`); on an object
  store a copy and a delete, so a reader may see both or a part: write an index file last
  instead when a reader must never see a partial result."""
  if is_remote(src) or is_remote(dst):
    if is_remote(dst) and isfile(dst):
      remove(dst)
    _epath(src).rename(os.fspath(dst))
  else:
    os.replace(src, dst)


def iter_lines(path: str | os.PathLike) -> Iterator[str]:
  """The lines of a UTF-8 text file, newline included (the last one may lack it)."""
  with open(path, "r") as f:
    yield from f


# ------------------------------------------------------------------------------------ multi-host


def is_chief() -> bool:
  """Whether this process writes the files every process would write alike: process 0 (and any
  process when JAX is not imported, i.e. a single-process tool)."""
  import sys
  if "jax" not in sys.modules:
    return True
  import jax
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every JAX process reaches `barrier(name)` (nothing with one process): e.g. the
  chief wrote a file, and the others may read it now."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------ TensorBoard


class _ObjectRecordFile:
  """A tensorboardX record file on an object store: buffered, rewritten whole at each flush."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    write_atomic(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectRecordFactory:
  """tensorboardX's writer factory interface (`record_writer.register_writer_factory`)."""

  def open(self, path: str) -> _ObjectRecordFile:
    return _ObjectRecordFile(path)

  def directory_check(self, path: str) -> None:
    makedirs(path)


class NoWriter:
  """The TensorBoard writer of a process that does not write (`summary_writer(chief_only=True)`
  on a process other than 0): it takes the same calls and keeps nothing."""

  def add_scalar(self, *args, **kwargs) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def summary_writer(logdir: str, chief_only: bool = False, **kwargs):
  """A `tensorboardX.SummaryWriter` on `logdir`; a remote one writes through this layer (its
  scheme's tensorboardX factory is replaced by `_ObjectRecordFactory`). `chief_only`: a `NoWriter`
  on processes other than 0, so that a multi-host run logs each scalar once."""
  if chief_only and not is_chief():
    return NoWriter()
  from tensorboardX import SummaryWriter, record_writer
  s = scheme(logdir)
  if s is not None and not isinstance(record_writer.REGISTERED_FACTORIES.get(s),
                                      _ObjectRecordFactory):
    record_writer.register_writer_factory(s, _ObjectRecordFactory())
  return SummaryWriter(logdir, **kwargs)
