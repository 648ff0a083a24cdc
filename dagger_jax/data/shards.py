"""Token shards: fixed-length numpy rows per DAgger round, and the reader over rounds 0..r.

A shard is a directory (one per round, e.g. `<workdir>/shards/round_002`):

    tokens.npy targets.npy positions.npy segment_ids.npy branch_ids.npy label_ids.npy  int32 [N, T]
    loss_mask.npy                                                                      uint8 [N, T]
    manifest.json   round, rows, row_len, tokens, trained_tokens, source trajectory ids, render
                    stats, config_hash (+ the data config it hashes), per-file sha256 checksums

(fields as in `dagger_jax.data.render`; padding slots have segment_id 0 and loss_mask 0). A shard is
written into a temporary directory and renamed into place, so a crash never leaves half a shard.
`out_dir` may be a bucket (`gs://...`, through `dagger_jax.paths`): there, where a rename is a
copy, the field files go straight into `out_dir` and the manifest, which readers require, is
written last (and an old shard's manifest removed first), so a reader never takes a partial shard
for a finished one. A remote shard is read into memory (no memory map).

Writing:

    rows, stats = render.render_with_config(traj, tokenizer, config.data)   # for each trajectory
    manifest = write_shard(out_dir, rows, round=r, data_config=config.data, pad_id=..., stats=...)

or all at once with `build_shards(trajectories, tokenizer, config.data, out_dir)`. With
`config.data.pack`, short rows are packed first-fit (longest first) into `max_len` rows; each one
gets its own `segment_ids` value (1, 2, ...) and its `label_ids` are offset to stay unique.

Reading (the trainer's API):

    reader = ShardReader([dir_round0, dir_round1], batch_size=8, seed=0,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         weights=None, data_config=config.data)
    batch = reader.next_batch()      # {"tokens": int32 [8 // process_count, T], ... 7 fields}
    cursor = reader.state()          # a small JSON-able dict: save it with the checkpoint
    reader.restore(cursor)           # the next batch is exactly the one that would have come

`batch_size` is global: every process walks the same shuffled stream and takes its own contiguous
slice of each global batch. The stream is an endless sequence of epochs; epoch e is a permutation
drawn from `(seed, e)` of every row of every shard. `weights[i]` (per shard, e.g. the per-round
`config.data.round_weights`) multiplies how often shard i's rows appear per epoch: 1 = once,
2 = twice, 0.5 = a random half (redrawn each epoch), 0 = never. `ShardReader.from_config` takes the
batch size, seed and round weights from the config.

Bad input raises `ShardError` naming the file: a missing or corrupt `.npy`, a checksum mismatch, a
manifest written under another data config (the differing keys are listed).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dagger_jax import faults, paths
from dagger_jax.data import render
from dagger_jax.data import tokenizer as tokenizer_lib
from dagger_jax.data.render import DTYPES, FIELDS, Row
from dagger_jax.errors import DaggerJaxError

FORMAT = 1
MANIFEST = "manifest.json"
# The data-config keys that change what a shard contains; their hash is stored in the manifest.
HASHED_KEYS = ("tokenizer", "enable_thinking", "max_len", "too_long", "pack")


class ShardError(DaggerJaxError, ValueError):
  """A shard is missing, corrupt or incompatible; the message names the file."""


def hashed_config(data_config) -> dict[str, Any]:
  return {k: data_config[k] for k in HASHED_KEYS if k in data_config}


def config_hash(data_config) -> str:
  """A short hash of the shard-relevant data config (`HASHED_KEYS`)."""
  blob = json.dumps(hashed_config(data_config), sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: str) -> str:
  if paths.is_remote(path):
    return hashlib.sha256(paths.read_bytes(path)).hexdigest()
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _save_npy(path: str, array: np.ndarray) -> str:
  """Writes `array` as a .npy file; returns its sha256. Remote: serialized in memory, one PUT."""
  if not paths.is_remote(path):
    np.save(path, array)
    return _sha256(path)
  buf = io.BytesIO()
  np.save(buf, array)
  paths.write_atomic(path, buf.getvalue())
  return hashlib.sha256(buf.getvalue()).hexdigest()


# ----------------------------------------------------------------------------------------- packing


def first_fit(lengths: Sequence[int], max_len: int) -> list[list[int]]:
  """Bins of row indices: longest first, each into the first bin with room (deterministic).

  >>> first_fit([3, 5, 2], 6)
  [[1], [0, 2]]
  """
  lengths = np.asarray(lengths, np.int64)
  if (lengths > max_len).any():
    raise ShardError(f"a row of {lengths.max()} slots exceeds max_len={max_len}")
  bins: list[list[int]] = []
  free = np.zeros(0, np.int64)
  for i in np.argsort(-lengths, kind="stable"):
    fits = np.flatnonzero(free >= lengths[i])
    if fits.size:
      b = int(fits[0])
    else:
      b = len(bins)
      bins.append([])
      free = np.append(free, max_len)
    bins[b].append(int(i))
    free[b] -= lengths[i]
  return bins


def pack_rows(rows: Sequence[Row], max_len: int, pad_id: int, pack: bool = True
              ) -> dict[str, np.ndarray]:
  """Places rows into [N, max_len] arrays: `first_fit` bins (or one row each if not `pack`).

  Segment s of a packed row is the s-th row of its bin. Example: rows of lengths 3, 5, 2 and
  max_len 6 give [5-row | pad] and [3-row, 2-row, pad], with segment_ids [1 1 1 1 1 0] and
  [1 1 1 2 2 0].
  """
  lengths = [len(r) for r in rows]
  if pack:
    bins = first_fit(lengths, max_len)
  else:
    if max(lengths, default=0) > max_len:
      raise ShardError(f"a row of {max(lengths)} slots exceeds max_len={max_len}")
    bins = [[i] for i in range(len(rows))]
  out = {f: np.zeros((len(bins), max_len), DTYPES[f]) for f in FIELDS}
  out["tokens"][:] = pad_id
  out["targets"][:] = pad_id
  for b, members in enumerate(bins):
    start, label_offset = 0, 0
    for segment, i in enumerate(members, start=1):
      r, end = rows[i], start + len(rows[i])
      for f in FIELDS:
        out[f][b, start:end] = getattr(r, f)
      out["segment_ids"][b, start:end] = segment
      labels = out["label_ids"][b, start:end]
      labels[labels > 0] += label_offset
      label_offset = max(label_offset, int(labels.max(initial=0)))
      start = end
  return out


# ----------------------------------------------------------------------------------------- writing


def write_shard(out_dir: str, rows: Sequence[Row], *, round: int, data_config, pad_id: int,
                stats: Mapping[str, int] | None = None, extra: Mapping[str, Any] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
  """Packs `rows` and writes the shard atomically (temp directory, then rename; on a bucket the
  manifest last). Returns the manifest.

  Raises ShardError if `out_dir` exists and not `overwrite`, or if no row was given.
  """
  if not rows:
    raise ShardError(f"no rows to write to {out_dir} (every trajectory was dropped: see stats "
                     f"{dict(stats or {})})")
  remote = paths.is_remote(out_dir)
  # (remote: a directory without a manifest is a write that did not finish, never a shard)
  if (paths.exists(paths.join(out_dir, MANIFEST) if remote else out_dir)) and not overwrite:
    raise ShardError(f"shard directory {out_dir} exists (pass overwrite=True to replace it)")
  arrays = pack_rows(rows, data_config.max_len, pad_id, pack=data_config.pack)
  if remote:  # the fields go straight in, the manifest last (see the module doc)
    if paths.exists(paths.join(out_dir, MANIFEST)):
      paths.remove(paths.join(out_dir, MANIFEST))
    parent, tmp = paths.dirname(out_dir), out_dir
  else:
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(out_dir)}.tmp-"
    for stale in os.listdir(parent):  # a writer of this shard killed before its rename
      if stale.startswith(prefix):
        shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  try:
    files = {}
    for f in FIELDS:
      path = paths.join(tmp, f"{f}.npy")
      digest = _save_npy(path, arrays[f])
      faults.point("shard_write")
      files[f] = {"file": f"{f}.npy", "dtype": str(arrays[f].dtype),
                  "shape": list(arrays[f].shape), "sha256": digest}
    segment = arrays["segment_ids"]
    manifest = {
        "format": FORMAT,
        "round": int(round),
        "rows": int(segment.shape[0]),
        "row_len": int(segment.shape[1]),
        "tokens": int((segment > 0).sum()),
        "trained_tokens": int(arrays["loss_mask"].sum()),
        "pad_fraction": float((segment == 0).mean()),
        "max_token_id": int(arrays["tokens"].max(initial=0)),
        "source_rows": len(rows),
        "source_trajectories": sorted({r.source for r in rows}),
        "stats": {k: int(v) for k, v in sorted((stats or {}).items())},
        "config_hash": config_hash(data_config),
        "data_config": hashed_config(data_config),
        "pad_id": int(pad_id),
        "fields": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **dict(extra or {}),
    }
    if remote:
      paths.write_atomic(paths.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
      return manifest
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
      json.dump(manifest, fh, indent=1)
      fh.flush()
      os.fsync(fh.fileno())
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.rename(out_dir, os.path.join(old, "shard"))
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    if not remote:  # (remote: what was written stays, without a manifest, until rewritten)
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def build_shards(trajectories: Iterable, tokenizer, data_config, out_dir: str,
                 round: int | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Renders trajectories (all of one round unless `round` is given) and writes one shard."""
  rows: list[Row] = []
  stats: collections.Counter = collections.Counter()
  rounds = set()
  for traj in trajectories:
    faults.point("shard_render")
    rounds.add(traj.round)
    r, s = render.render_with_config(traj, tokenizer, data_config)
    rows += r
    stats.update(s)
  if round is None:
    if len(rounds) != 1:
      raise ShardError(f"trajectories come from rounds {sorted(rounds)}: pass round= explicitly")
    round = rounds.pop()
  fingerprint = hashlib.sha256(
      json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]
  return write_shard(out_dir, rows, round=round, data_config=data_config,
                     pad_id=tokenizer.pad_token_id, stats=stats, overwrite=overwrite,
                     extra={"tokenizer_fingerprint": fingerprint,
                            "tokenizer_dir": tokenizer_lib.files_dir(tokenizer)})


# ----------------------------------------------------------------------------------------- reading


def _manifest_problem(m: dict) -> str | None:
  """What is missing or mistyped in a manifest that `Shard` reads (None if nothing), so that an
  edited or damaged one fails with the key named rather than a KeyError later."""
  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0

  for key in ("round", "rows", "row_len"):
    if not is_int(m.get(key)):
      return f"{key!r} must be an int >= 0, got {m.get(key)!r}"
  if not isinstance(m.get("data_config", {}), dict):
    return f"'data_config' must be an object, got {m.get('data_config')!r}"
  fields = m.get("fields")
  if not isinstance(fields, dict):
    return f"'fields' must be an object, got {fields!r}"
  for f, spec in fields.items():
    if not (isinstance(spec, dict) and isinstance(spec.get("file"), str)
            and isinstance(spec.get("sha256"), str) and isinstance(spec.get("dtype"), str)
            and isinstance(spec.get("shape"), list) and all(map(is_int, spec["shape"]))):
      return (f"fields.{f} must be an object with 'file', 'sha256', 'dtype' (strings) and "
              f"'shape' (a list of ints), got {spec!r}")
  return None


class Shard:
  """An opened shard: its manifest and memory-mapped fields (validated on open)."""

  def __init__(self, path: str, data_config=None, verify: bool = True):
    self.path = path
    manifest_path = paths.join(path, MANIFEST)
    if not paths.isfile(manifest_path):
      raise ShardError(f"{manifest_path}: no manifest (not a shard directory, or not finished)")
    try:
      with paths.open(manifest_path, "r") as f:
        self.manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ShardError(f"{manifest_path}: corrupt manifest: {e}") from None
    m = self.manifest
    if not isinstance(m, dict):
      raise ShardError(f"{manifest_path}: corrupt manifest: a JSON {type(m).__name__}, not an "
                       f"object")
    if m.get("format") != FORMAT:
      raise ShardError(f"{manifest_path}: format {m.get('format')!r}, this code reads {FORMAT}")
    problem = _manifest_problem(m)
    if problem:
      raise ShardError(f"{manifest_path}: corrupt manifest: {problem}")
    if data_config is not None and m.get("config_hash") != config_hash(data_config):
      ours = hashed_config(data_config)
      theirs = m.get("data_config", {})
      diff = [f"data.{k}: shard {theirs.get(k)!r} vs config {ours.get(k)!r}"
              for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
      raise ShardError(f"{manifest_path}: written under another data config "
                       f"({'; '.join(diff) or 'hash ' + str(m.get('config_hash'))})")
    self.arrays: dict[str, np.ndarray] = {}
    for f in FIELDS:
      spec = m.get("fields", {}).get(f)
      if spec is None:
        raise ShardError(f"{manifest_path}: field {f!r} missing from the manifest")
      file = paths.join(path, spec["file"])
      if not paths.isfile(file):
        raise ShardError(f"{file}: missing")
      blob = paths.read_bytes(file) if paths.is_remote(file) else None  # read once, kept
      if verify and (_sha256(file) if blob is None else hashlib.sha256(blob).hexdigest()
                     ) != spec["sha256"]:
        raise ShardError(f"{file}: checksum mismatch (the file changed after it was written)")
      try:
        a = (np.load(file, mmap_mode="r", allow_pickle=False) if blob is None
             else np.load(io.BytesIO(blob), allow_pickle=False))
      except (ValueError, OSError, EOFError) as e:
        raise ShardError(f"{file}: not a readable .npy file: {e}") from None
      if list(a.shape) != spec["shape"] or str(a.dtype) != spec["dtype"]:
        raise ShardError(f"{file}: {a.dtype}{list(a.shape)} but the manifest says "
                         f"{spec['dtype']}{spec['shape']}")
      if a.shape != (m["rows"], m["row_len"]):  # the reader plans batches from rows, row_len
        raise ShardError(f"{file}: shape {list(a.shape)} but the manifest says rows={m['rows']}, "
                         f"row_len={m['row_len']}")
      self.arrays[f] = a

  @property
  def rows(self) -> int:
    return self.manifest["rows"]

  @property
  def row_len(self) -> int:
    return self.manifest["row_len"]

  @property
  def round(self) -> int:
    return self.manifest["round"]

  def row(self, i: int) -> dict[str, np.ndarray]:
    return {f: np.asarray(a[i]) for f, a in self.arrays.items()}


class ShardReader:
  """Deterministic, resumable batches over shards (see the module docstring for the contract)."""

  def __init__(self, shards: Sequence[str | Shard], batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1,
               weights: Sequence[float] | None = None, data_config=None, verify: bool = True):
    self.shards = [s if isinstance(s, Shard) else Shard(s, data_config, verify) for s in shards]
    if not self.shards:
      raise ShardError("ShardReader needs at least one shard")
    lens = {s.row_len for s in self.shards}
    if len(lens) != 1:
      raise ShardError(f"shards have different row lengths {sorted(lens)}: "
                       + ", ".join(f"{s.path}: {s.row_len}" for s in self.shards))
    if batch_size % process_count:
      raise ShardError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ShardError(f"process_index={process_index} not in [0, {process_count})")
    self.weights = [1.0] * len(self.shards) if weights is None else [float(w) for w in weights]
    if len(self.weights) != len(self.shards) or any(w < 0 for w in self.weights):
      raise ShardError(f"weights {list(self.weights)}: need one weight >= 0 per shard "
                       f"({len(self.shards)} shards)")
    self.row_len = lens.pop()
    self.batch_size = batch_size
    self.local_batch = batch_size // process_count
    self.process_index = process_index
    self.seed = seed
    self._counts = [int(w) * s.rows + int(round((w - int(w)) * s.rows))
                    for w, s in zip(self.weights, self.shards)]
    self.epoch_len = sum(self._counts)
    if self.epoch_len == 0:
      raise ShardError("the weighted epoch is empty (all weights 0 or all shards empty)")
    self.fingerprint = hashlib.sha256(json.dumps(
        [[s.manifest["fields"]["tokens"]["sha256"] for s in self.shards], self.weights, seed]
    ).encode()).hexdigest()[:16]
    self.epoch, self.offset = 0, 0
    self._plan_epoch = -1
    self._plan = np.zeros((0, 2), np.int64)

  @classmethod
  def from_config(cls, shard_dirs: Sequence[str], config, process_index: int = 0,
                  process_count: int = 1) -> "ShardReader":
    """Batch size, seed and per-round weights (by each manifest's round) from the config."""
    shards = [Shard(d, config.data) for d in shard_dirs]
    vocab = config.get("model", {}).get("vocab_size")
    for s in shards:  # the embedding lookup would clamp a larger id silently, not fail
      if vocab and s.manifest.get("max_token_id", -1) >= vocab:
        raise ShardError(f"{paths.join(s.path, MANIFEST)}: holds token id "
                         f"{s.manifest['max_token_id']}, but config.model.vocab_size={vocab} "
                         f"(rendered with another tokenizer? data.tokenizer="
                         f"{s.manifest.get('data_config', {}).get('tokenizer')!r})")
    weights = None
    if len(config.data.round_weights):
      rw = tuple(config.data.round_weights)
      missing = [s.path for s in shards if s.round >= len(rw)]
      if missing:
        raise ShardError(f"config.data.round_weights={rw} has no weight for the rounds of "
                         f"{missing}")
      weights = [rw[s.round] for s in shards]
    return cls(shards, config.train.batch_size, config.seed, process_index, process_count,
               weights)

  @property
  def steps_per_epoch(self) -> float:
    return self.epoch_len / self.batch_size

  def epoch_plan(self, epoch: int) -> np.ndarray:
    """[epoch_len, 2] (shard, row) pairs of epoch `epoch`, in order."""
    if epoch != self._plan_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      parts = []
      for d, (w, s) in enumerate(zip(self.weights, self.shards)):
        idx = [np.tile(np.arange(s.rows), int(w))]
        extra = int(round((w - int(w)) * s.rows))
        idx.append(np.sort(rng.choice(s.rows, extra, replace=False)))
        rows = np.concatenate(idx).astype(np.int64)
        parts.append(np.stack([np.full_like(rows, d), rows], axis=1))
      plan = np.concatenate(parts)
      self._plan = plan[rng.permutation(len(plan))]
      self._plan_epoch = epoch
    return self._plan

  def take(self, n: int) -> np.ndarray:
    """The next `n` (shard, row) pairs of the stream, across epoch boundaries; advances it."""
    out = []
    while n:
      plan = self.epoch_plan(self.epoch)
      k = min(n, self.epoch_len - self.offset)
      out.append(plan[self.offset:self.offset + k])
      self.offset += k
      n -= k
      if self.offset == self.epoch_len:
        self.epoch, self.offset = self.epoch + 1, 0
    return np.concatenate(out)

  def next_batch(self) -> dict[str, np.ndarray]:
    """This process's slice of the next global batch: 7 fields of shape [local_batch, row_len]."""
    picks = self.take(self.batch_size)
    mine = picks[self.process_index * self.local_batch:(self.process_index + 1) * self.local_batch]
    batch = {f: np.empty((self.local_batch, self.row_len), DTYPES[f]) for f in FIELDS}
    for d in np.unique(mine[:, 0]):
      where = np.flatnonzero(mine[:, 0] == d)
      rows = mine[where, 1]
      order = np.argsort(rows)  # increasing row order reads the memmap sequentially
      for f in FIELDS:
        batch[f][where[order]] = self.shards[d].arrays[f][rows[order]]
    return batch

  def __iter__(self):
    while True:
      yield self.next_batch()

  def state(self) -> dict[str, Any]:
    """The cursor (JSON-able): restore it to continue with exactly the next batch."""
    return {"epoch": self.epoch, "offset": self.offset, "fingerprint": self.fingerprint}

  def restore(self, state: Mapping[str, Any]) -> None:
    if state.get("fingerprint") != self.fingerprint:
      raise ShardError(f"data cursor {dict(state)} was saved for other shards / weights / seed "
                       f"(fingerprint {state.get('fingerprint')!r}, these: {self.fingerprint!r})")
    epoch, offset = int(state["epoch"]), int(state["offset"])
    if epoch < 0 or not 0 <= offset < self.epoch_len:
      raise ShardError(f"data cursor {dict(state)} is out of range (epoch_len={self.epoch_len})")
    self.epoch, self.offset = epoch, offset
