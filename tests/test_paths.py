"""The path layer (`dagger_jax.paths`) on local paths and on `gs://` served by an in-memory object
store, and the shards, trajectories, run file and TensorBoard events that go through it.

The object store is an fsspec file system registered for the `gs`/`gcs` protocols, which is what
etils' epath asks fsspec for (it would be gcsfs on a real machine), so everything from
`dagger_jax.paths` down through epath and fsspec is the code a bucket runs. It keeps GCS's
semantics where they differ from a disk: names are flat keys and directories only their prefixes,
an object appears whole when its writer closes, an object cannot be appended to or updated, and a
rename is a copy then a delete. Nothing touches the network.
"""

import importlib
import io
import json
import os
import struct

import fsspec
import numpy as np
import pytest
from etils.epath import backend as epath_backend

import train_data
from dagger_jax import paths
from dagger_jax.data import shards
from dagger_jax.data.trajectory import (Action, Trajectory, Turn, append_lines, cut_torn_tail,
                                        read_jsonl, write_jsonl)
from dagger_jax.rundir import RunDir, run_of


class ObjectStore(fsspec.AbstractFileSystem):
  """GCS in memory: {object name: bytes}; see the module doc for what it keeps of GCS."""

  protocol = ("gs", "gcs")
  root_marker = ""
  objects: dict[str, bytes] = {}
  puts: list[str] = []  # object names in the order they were written (whole)

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.rstrip("/")

  def info(self, path, **kwargs):
    path = self._strip_protocol(path)
    if path in self.objects:
      return {"name": path, "size": len(self.objects[path]), "type": "file"}
    if path and any(k.startswith(path + "/") for k in self.objects):
      return {"name": path, "size": 0, "type": "directory"}
    raise FileNotFoundError(path)

  def ls(self, path, detail=True, **kwargs):
    path = self._strip_protocol(path)
    if path in self.objects:
      entries = [self.info(path)]
    else:
      prefix = path + "/" if path else ""
      found = {}
      for key in self.objects:
        if key.startswith(prefix):
          head = key[len(prefix):].split("/", 1)[0]
          found[prefix + head] = self.info(prefix + head)
      if not found:
        raise FileNotFoundError(path)
      entries = [found[k] for k in sorted(found)]
    return entries if detail else [e["name"] for e in entries]

  def _open(self, path, mode="rb", **kwargs):
    path = self._strip_protocol(path)
    if mode == "rb":
      if path not in self.objects:
        raise FileNotFoundError(path)
      return io.BytesIO(self.objects[path])
    if mode == "wb":
      return _Upload(self, path)
    raise NotImplementedError(f"gs://{path}: mode {mode!r}: an object cannot be appended to or "
                              f"updated, only written whole")

  def mkdir(self, path, create_parents=True, **kwargs):
    pass  # a directory is a name prefix

  def makedirs(self, path, exist_ok=False):
    pass

  def cp_file(self, path1, path2, **kwargs):
    self.objects[self._strip_protocol(path2)] = self.objects[self._strip_protocol(path1)]

  def rm_file(self, path):
    del self.objects[self._strip_protocol(path)]

  def rm(self, path, recursive=False, maxdepth=None):
    for p in [path] if isinstance(path, str) else path:
      p = self._strip_protocol(p)
      doomed = [k for k in self.objects if k == p or recursive and k.startswith(p + "/")]
      if not doomed:
        raise FileNotFoundError(p)
      for k in doomed:
        del self.objects[k]


class _Upload(io.BytesIO):
  """An object being written: stored whole when closed (what a GCS upload does)."""

  def __init__(self, store, name):
    super().__init__()
    self.store, self.name = store, name

  def close(self):
    if not self.closed:
      self.store.objects[self.name] = self.getvalue()
      self.store.puts.append(self.name)
    super().close()


@pytest.fixture
def bucket():
  """'gs://bucket', served by a fresh `ObjectStore` for the test."""
  saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
  for p in ("gs", "gcs"):
    fsspec.register_implementation(p, ObjectStore, clobber=True)
  ObjectStore.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  ObjectStore.objects, ObjectStore.puts = {}, []
  yield "gs://bucket"
  registry = importlib.import_module("fsspec.registry")._registry  # (`fsspec.registry` is a view)
  for p, cls in saved.items():
    registry.pop(p, None)
    if cls is not None:
      fsspec.register_implementation(p, cls, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  """A run root on the local disk and one in the bucket: each test runs on both."""
  if request.param == "local":
    return str(tmp_path)
  return request.getfixturevalue("bucket") + "/run"


# ------------------------------------------------------------------------------- the operations


def test_the_object_store_behaves_like_gcs(bucket):
  """The fake has GCS's constraints, so the tests below exercise the object-store code paths."""
  from etils import epath
  with pytest.raises(NotImplementedError, match="appended"):
    epath.Path(f"{bucket}/a.txt").open("ab")
  f = epath.Path(f"{bucket}/d/a.txt").open("wb")
  f.write(b"half")
  assert not paths.exists(f"{bucket}/d/a.txt")  # nothing is visible before the upload ends
  f.close()
  assert paths.read_bytes(f"{bucket}/d/a.txt") == b"half" and paths.isdir(f"{bucket}/d")


def test_operations(root):
  d = paths.join(root, "sub", "dir")
  paths.makedirs(d)
  f = paths.join(d, "a.txt")
  assert not paths.exists(f)
  paths.write_atomic(f, "one\n")
  paths.append(f, "two\n")
  paths.append(f, b"three\n")
  assert paths.read_text(f) == "one\ntwo\nthree\n"
  assert list(paths.iter_lines(f)) == ["one\n", "two\n", "three\n"]
  paths.write_atomic(f, "replaced\n")
  assert paths.read_text(f) == "replaced\n" and paths.isfile(f) and not paths.isfile(d)
  with paths.open(paths.join(d, "b.json"), "w") as fh:
    json.dump({"k": "é"}, fh)
  with paths.open(paths.join(d, "b.json")) as fh:
    assert json.load(fh) == {"k": "é"}
  assert paths.listdir(d) == ["a.txt", "b.json"]  # no temp file left behind
  assert paths.glob(d, "*.json") == [paths.join(d, "b.json")]
  paths.rename(paths.join(d, "b.json"), paths.join(d, "c.json"))
  assert paths.listdir(d) == ["a.txt", "c.json"]
  paths.rename(paths.join(d, "c.json"), f)  # replaces a file
  assert paths.listdir(d) == ["a.txt"] and json.loads(paths.read_text(f)) == {"k": "é"}
  paths.remove(f)
  assert not paths.exists(f)
  paths.write_atomic(paths.join(d, "x"), b"1")
  paths.rmtree(paths.join(root, "sub"))
  assert not paths.exists(paths.join(root, "sub"))


def test_uris_stay_uris():
  assert paths.join("gs://b/run", "shards", "round_000") == "gs://b/run/shards/round_000"
  assert paths.abspath("gs://b/run") == "gs://b/run"
  assert paths.dirname("gs://b/run/x/") == "gs://b/run"
  assert paths.abspath("rel") == os.path.abspath("rel")
  assert paths.is_remote("s3://b/k") and not paths.is_remote("/tmp/x")
  with pytest.raises(ValueError, match="paths.append"):
    paths.open("gs://b/x", "a")


# ----------------------------------------------------------------------------- what goes through


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A local shard of the trainer tests' data, and its config and rows' source trajectories."""
  workdir = str(tmp_path_factory.mktemp("data"))
  config = train_data.tiny_config(workdir)
  dirs = train_data.build(workdir, config)
  from dagger_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(config.data, workdir=workdir)
  return config, dirs[0], tok, train_data.episodes(tok, 0)


def test_shard_round_trip_matches_the_local_one(built, root):
  config, local_dir, tok, trajs = built
  out = paths.join(root, "shards", "round_000")
  manifest = shards.build_shards(trajs, tok, config.data, out, round=0)
  local = shards.Shard(local_dir, config.data)
  assert manifest["fields"] == local.manifest["fields"]  # the same bytes (checksums)
  a = shards.ShardReader([out], batch_size=4, seed=3, data_config=config.data)
  b = shards.ShardReader([local_dir], batch_size=4, seed=3, data_config=config.data)
  for _ in range(3):
    x, y = a.next_batch(), b.next_batch()
    assert all(np.array_equal(x[f], y[f]) for f in x)
  with pytest.raises(shards.ShardError, match="exists"):
    shards.build_shards(trajs, tok, config.data, out, round=0)
  shards.build_shards(trajs, tok, config.data, out, round=0, overwrite=True)
  assert sorted(paths.listdir(out)) == sorted([shards.MANIFEST] + [f"{f}.npy" for f in
                                                                    shards.FIELDS])


def test_a_bucket_shard_is_never_read_half_written(built, bucket, monkeypatch):
  """On the object store the fields go in place and the manifest last: a write that dies midway
  leaves a directory readers refuse ("not finished"), and the next write replaces it. Rewriting a
  finished shard removes its manifest first."""
  config, _, tok, trajs = built
  out = f"{bucket}/run/shards/round_000"
  real = paths.write_atomic
  calls = []

  def dies_at_the_third(path, data):
    calls.append(path)
    if len(calls) == 3:
      raise OSError("connection reset")
    real(path, data)

  monkeypatch.setattr(paths, "write_atomic", dies_at_the_third)
  with pytest.raises(OSError, match="connection reset"):
    shards.build_shards(trajs, tok, config.data, out, round=0)
  monkeypatch.setattr(paths, "write_atomic", real)
  assert paths.exists(f"{out}/tokens.npy")  # the part written stays...
  with pytest.raises(shards.ShardError, match="no manifest .*not finished"):
    shards.Shard(out)  # ...and is not a shard
  shards.build_shards(trajs, tok, config.data, out, round=0)  # no overwrite needed
  assert ObjectStore.puts[-1] == f"bucket/run/shards/round_000/{shards.MANIFEST}"
  assert shards.Shard(out, config.data).rows == 8
  ObjectStore.puts.clear()
  shards.build_shards(trajs, tok, config.data, out, round=0, overwrite=True)
  assert ObjectStore.puts[-1].endswith(shards.MANIFEST)  # written last again...
  assert not any(p.endswith(shards.MANIFEST) for p in ObjectStore.puts[:-1])
  manifests_seen = []  # ...and gone while the fields are replaced: replay the rewrite
  ObjectStore.puts.clear()
  real_save = shards._save_npy

  def watching(path, array):
    manifests_seen.append(paths.exists(f"{out}/{shards.MANIFEST}"))
    return real_save(path, array)

  monkeypatch.setattr(shards, "_save_npy", watching)
  shards.build_shards(trajs, tok, config.data, out, round=0, overwrite=True)
  assert manifests_seen == [False] * len(shards.FIELDS)


def _traj(i: int) -> Trajectory:
  messages = ({"role": "system", "content": "s"}, {"role": "user", "content": f"task {i} é"},
              {"role": "assistant", "content": "```bash\nls\n```"})
  return Trajectory(f"t{i}", f"t{i}", 0, i, 1.0, messages,
                    (Turn("teacher", Action("```bash\nls\n```"), None, "coin"),))


def test_trajectories(root):
  path = paths.join(root, "trajectories", "round_000.jsonl")
  paths.parent_of(path)
  assert write_jsonl(path, [_traj(0), _traj(1)]) == 2
  assert write_jsonl(path, [_traj(2)], append=True) == 1
  append_lines(path, [json.dumps(_traj(3).to_dict())])
  assert [t.id for t in read_jsonl(path)] == ["t0", "t1", "t2", "t3"]
  # a torn last line (a killed local append; on a bucket an object is never torn, but a file
  # copied in may be) is cut, and appends go on from a clean line
  paths.write_atomic(path, paths.read_bytes(path) + b'{"version": 1, "id": "t4"')
  assert cut_torn_tail(path) == len(b'{"version": 1, "id": "t4"')
  append_lines(path, [json.dumps(_traj(4).to_dict())])
  assert [t.id for t in read_jsonl(path)] == ["t0", "t1", "t2", "t3", "t4"]
  assert read_jsonl(path)[1].messages[1]["content"] == "task 1 é"


def test_run_file_and_run_of(root):
  run = RunDir(root)
  config = train_data.tiny_config(root)
  run.write_run_file(config, None)
  assert run.read_run_file()["config"]["model"]["hidden_size"] == 64
  assert run_of(run.shards(3)) == run  # found from any path below the run
  assert run_of(paths.join(root, "..", "elsewhere") if not paths.is_remote(root)
                else "gs://bucket/elsewhere") is None


def _events(blob: bytes) -> list:
  """The events of one TFRecord event file (uint64 length, uint32 CRC, payload, uint32 CRC)."""
  from tensorboardX.proto.event_pb2 import Event
  out, i = [], 0
  while i < len(blob):
    (n,) = struct.unpack("Q", blob[i:i + 8])
    event = Event()
    event.ParseFromString(blob[i + 12:i + 12 + n])
    out.append(event)
    i += 12 + n + 4
  return out


def test_tensorboard_events(root):
  logdir = paths.join(root, "tensorboard")
  writer = paths.summary_writer(logdir, filename_suffix=".round_000")
  for step in (1, 2, 3):
    writer.add_scalar("train/loss", 1.0 / step, step)
  writer.close()
  (name,) = paths.listdir(logdir)
  assert name.startswith("events.out.tfevents.") and name.endswith(".round_000")
  scalars = [(e.step, v.simple_value) for e in _events(paths.read_bytes(paths.join(logdir, name)))
             for v in e.summary.value]
  assert scalars == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
