"""Shards: packing, atomic writing, validation on read, the deterministic resumable reader."""

import json
import os

import numpy as np
import pytest

from configs import base
from dagger_jax.data import render, shards, synthetic
from dagger_jax.data.tokenizer import load_tokenizer, train_demo_tokenizer


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = base.get_config()
  c.workdir = str(tmp_path_factory.mktemp("run"))
  c.data.tokenizer = "demo-bpe"
  c.data.max_len = 512
  train_demo_tokenizer(synthetic.CORPUS * 4, f"{c.workdir}/tokenizer", vocab_size=512)
  return c


@pytest.fixture(scope="module")
def tok(config):
  return load_tokenizer(config.data, workdir=config.workdir)


def _trajectories(tok, n, round_=0, seed=0):
  rng = np.random.default_rng(seed)
  return [synthetic.random_trajectory(rng, tok, turns=int(rng.integers(1, 5)), obs_tokens=20,
                                      action_tokens=8, id=f"r{round_}-{i}", round=round_)
          for i in range(n)]


def _rows(tok, trajs, data_config):
  out = []
  for t in trajs:
    out += render.render_with_config(t, tok, data_config)[0]
  return out


def test_pack_rows_first_fit_example():
  def row(n, label):
    a = np.arange(1, n + 1, dtype=np.int32)
    return render.Row(a, a, a, np.ones(n, np.int32), np.zeros(n, np.int32),
                      np.ones(n, np.uint8), np.full(n, label, np.int32), f"len{n}")

  packed = shards.pack_rows([row(3, 1), row(5, 1), row(2, 2)], max_len=6, pad_id=0)
  assert packed["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 2, 2, 0]]
  assert packed["tokens"].tolist() == [[1, 2, 3, 4, 5, 0], [1, 2, 3, 1, 2, 0]]
  assert packed["label_ids"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 3, 3, 0]]
  unpacked = shards.pack_rows([row(3, 1), row(5, 1)], max_len=6, pad_id=9, pack=False)
  assert unpacked["tokens"].tolist() == [[1, 2, 3, 9, 9, 9], [1, 2, 3, 4, 5, 9]]


def test_packing_keeps_every_row_intact(tok, config):
  rows = _rows(tok, _trajectories(tok, 30), config.data)
  packed = shards.pack_rows(rows, config.data.max_len, tok.pad_token_id)
  assert len(packed["tokens"]) < len(rows)
  found = []
  for b in range(len(packed["tokens"])):
    for s in range(1, packed["segment_ids"][b].max() + 1):
      where = packed["segment_ids"][b] == s
      found.append(tuple(packed["tokens"][b][where].tolist()))
      labels = packed["label_ids"][b][where]
      other = packed["label_ids"][b][~where]
      assert not set(labels[labels > 0]) & set(other[other > 0])  # label ids unique in the row
  assert sorted(found) == sorted(tuple(r.tokens.tolist()) for r in rows)
  assert packed["loss_mask"].sum() == sum(r.trained_tokens for r in rows)


def test_write_and_open(tok, config, tmp_path):
  trajs = _trajectories(tok, 20, round_=2)
  out = str(tmp_path / "round_002")
  manifest = shards.build_shards(trajs, tok, config.data, out)
  assert [p for p in os.listdir(tmp_path) if p != "round_002"] == []  # no temp left behind
  rows = _rows(tok, trajs, config.data)
  assert manifest["round"] == 2 and manifest["row_len"] == config.data.max_len
  assert manifest["trained_tokens"] == sum(r.trained_tokens for r in rows)
  assert manifest["tokens"] == sum(len(r) for r in rows)
  assert manifest["source_trajectories"] == sorted(t.id for t in trajs)
  assert manifest["stats"]["trajectories"] == 20
  shard = shards.Shard(out, config.data)
  assert shard.rows == manifest["rows"] and shard.round == 2
  assert isinstance(shard.arrays["tokens"], np.memmap)
  assert shard.arrays["tokens"].dtype == np.int32 and shard.arrays["loss_mask"].dtype == np.uint8
  with pytest.raises(shards.ShardError, match="round_002"):
    shards.build_shards(trajs, tok, config.data, out)
  shards.build_shards(trajs[:5], tok, config.data, out, overwrite=True)
  assert shards.Shard(out).manifest["stats"]["trajectories"] == 5
  assert sorted(os.listdir(tmp_path)) == ["round_002"]


def test_crash_while_writing_leaves_nothing(tok, config, tmp_path, monkeypatch):
  trajs = _trajectories(tok, 5)
  calls = []

  def failing_save(path, array):
    calls.append(path)
    if len(calls) == 3:
      raise OSError("disk full")
    np.lib.format.write_array(open(path, "wb"), array)

  monkeypatch.setattr(shards.np, "save", failing_save)
  with pytest.raises(OSError, match="disk full"):
    shards.build_shards(trajs, tok, config.data, str(tmp_path / "round_000"))
  assert os.listdir(tmp_path) == []


@pytest.fixture
def shard_dir(tok, config, tmp_path):
  out = str(tmp_path / "round_000")
  shards.build_shards(_trajectories(tok, 10), tok, config.data, out)
  return out


def test_corrupt_npy_names_file(shard_dir, config):
  path = os.path.join(shard_dir, "targets.npy")
  with open(path, "r+b") as f:
    f.write(b"garbage!")
  with pytest.raises(shards.ShardError, match="targets.npy: checksum mismatch"):
    shards.Shard(shard_dir, config.data)
  with pytest.raises(shards.ShardError, match="targets.npy: not a readable .npy"):
    shards.Shard(shard_dir, config.data, verify=False)


def test_flipped_byte_fails_checksum(shard_dir, config):
  path = os.path.join(shard_dir, "loss_mask.npy")
  data = bytearray(open(path, "rb").read())
  data[-1] ^= 1
  open(path, "wb").write(bytes(data))
  with pytest.raises(shards.ShardError, match="loss_mask.npy: checksum mismatch"):
    shards.Shard(shard_dir, config.data)


def test_missing_file_and_manifest(shard_dir, tmp_path):
  os.remove(os.path.join(shard_dir, "positions.npy"))
  with pytest.raises(shards.ShardError, match="positions.npy: missing"):
    shards.Shard(shard_dir)
  with pytest.raises(shards.ShardError, match="manifest.json: no manifest"):
    shards.Shard(str(tmp_path))
  os.makedirs(tmp_path / "x")
  (tmp_path / "x" / "manifest.json").write_text("{broken")
  with pytest.raises(shards.ShardError, match="manifest.json: corrupt manifest"):
    shards.Shard(str(tmp_path / "x"))


def test_other_config_is_refused(shard_dir, config):
  other = base.get_config().data
  other.update(dict(config.data))
  other.max_len = 1024
  other.enable_thinking = True
  with pytest.raises(shards.ShardError) as e:
    shards.Shard(shard_dir, other)
  message = str(e.value)
  assert "manifest.json" in message and "data.max_len: shard 512 vs config 1024" in message
  assert "data.enable_thinking" in message


@pytest.fixture
def two_rounds(tok, config, tmp_path):
  dirs = []
  for r, n in ((0, 12), (1, 7)):
    dirs.append(str(tmp_path / f"round_{r:03d}"))
    c = base.get_config().data
    c.update(dict(config.data))
    c.pack = False  # one row per trajectory piece: enough rows to shuffle
    shards.build_shards(_trajectories(tok, n, round_=r, seed=r), tok, c, dirs[-1])
  return dirs


def _key(batch):
  return [tuple(row) for row in batch["tokens"].tolist()]


def test_reader_epochs_cover_every_row_once(two_rounds):
  reader = shards.ShardReader(two_rounds, batch_size=4, seed=3)
  n = reader.epoch_len
  assert n == sum(shards.Shard(d).rows for d in two_rounds)
  picks = reader.take(2 * n)
  for e in range(2):
    epoch = picks[e * n:(e + 1) * n]
    assert len({tuple(p) for p in epoch.tolist()}) == n
  assert picks[:n].tolist() != picks[n:].tolist()  # a fresh permutation each epoch


def test_reader_is_deterministic_and_resumes_exactly(two_rounds):
  a = shards.ShardReader(two_rounds, batch_size=4, seed=3)
  b = shards.ShardReader(two_rounds, batch_size=4, seed=3)
  c = shards.ShardReader(two_rounds, batch_size=4, seed=4)
  first = [_key(a.next_batch()) for _ in range(7)]
  assert first == [_key(b.next_batch()) for _ in range(7)]
  assert first != [_key(c.next_batch()) for _ in range(7)]
  state = json.loads(json.dumps(a.state()))  # survives a JSON round trip (checkpoints)
  expected = [_key(a.next_batch()) for _ in range(5)]
  resumed = shards.ShardReader(two_rounds, batch_size=4, seed=3)
  resumed.restore(state)
  assert [_key(resumed.next_batch()) for _ in range(5)] == expected
  with pytest.raises(ValueError, match="fingerprint"):
    c.restore(state)


def test_reader_splits_the_global_batch_by_process(two_rounds):
  whole = shards.ShardReader(two_rounds, batch_size=6, seed=1)
  parts = [shards.ShardReader(two_rounds, batch_size=6, seed=1, process_index=p, process_count=3)
           for p in range(3)]
  for _ in range(4):
    batch = whole.next_batch()
    pieces = [r.next_batch() for r in parts]
    for f in batch:
      assert pieces[0][f].shape == (2, batch[f].shape[1])
      np.testing.assert_array_equal(np.concatenate([p[f] for p in pieces]), batch[f])
  with pytest.raises(ValueError, match="divisible"):
    shards.ShardReader(two_rounds, batch_size=5, process_count=2)


def test_round_weights(two_rounds, config):
  sizes = [shards.Shard(d).rows for d in two_rounds]
  for weights, expected in (((2.0, 1.0), 2 * sizes[0] + sizes[1]),
                            ((1.0, 0.0), sizes[0]),
                            ((0.5, 1.0), round(0.5 * sizes[0]) + sizes[1])):
    reader = shards.ShardReader(two_rounds, batch_size=2, seed=0, weights=weights)
    assert reader.epoch_len == expected
    plan = reader.epoch_plan(0)
    counts = np.bincount(plan[:, 0], minlength=2)
    assert counts.tolist() == [int(w * n + 0.5) if w % 1 else int(w) * n
                               for w, n in zip(weights, sizes)]
  c = base.get_config()
  c.data.update(dict(config.data))
  c.data.pack = False
  c.data.round_weights = (3.0, 1.0)
  c.train.batch_size = 2
  reader = shards.ShardReader.from_config(two_rounds, c)
  assert reader.epoch_len == 3 * sizes[0] + sizes[1]
  c.data.round_weights = (1.0,)
  with pytest.raises(ValueError, match="round_001"):
    shards.ShardReader.from_config(two_rounds, c)


def test_reader_refuses_other_config(two_rounds, config):
  with pytest.raises(shards.ShardError, match="data.pack"):
    shards.ShardReader(two_rounds, batch_size=2, data_config=config.data)


def _cli(*args):
  import subprocess
  import sys
  return subprocess.run([sys.executable, "-m", "dagger_jax.cli", *args], capture_output=True,
                        text=True, timeout=120)


def test_cli_build_and_inspect(tok, config, tmp_path):
  from dagger_jax.data.trajectory import write_jsonl
  trajs = _trajectories(tok, 6, round_=1)
  write_jsonl(tmp_path / "t.jsonl", trajs)
  flags = ["--config", "configs/demo.py", f"--config.workdir={config.workdir}",
           "--config.data.max_len=512"]
  out = str(tmp_path / "shard")
  built = _cli("shards", "build", "--trajectories", str(tmp_path / "t.jsonl"), "--out", out, *flags)
  assert built.returncode == 0, built.stderr
  manifest = shards.Shard(out).manifest
  assert f"{manifest['rows']} rows x 512" in built.stdout and manifest["round"] == 1
  shown = _cli("shards", "inspect", out, *flags)
  assert shown.returncode == 0, shown.stderr
  assert f"{manifest['trained_tokens']} trained" in shown.stdout
  assert "--- segment 1:" in shown.stdout and "[[" in shown.stdout
  assert "<|im_start|>system" in shown.stdout
  # Bad input is named: the trajectory line, a corrupt shard file.
  lines = (tmp_path / "t.jsonl").read_text().splitlines()
  (tmp_path / "bad.jsonl").write_text("\n".join(lines[:2] + ['{"version": 1}']) + "\n")
  bad = _cli("shards", "build", "--trajectories", str(tmp_path / "bad.jsonl"), "--out",
             str(tmp_path / "x"), *flags)
  assert bad.returncode == 2 and "bad.jsonl:3: id:" in bad.stderr
  assert not os.path.exists(tmp_path / "x")
  with open(os.path.join(out, "tokens.npy"), "r+b") as f:
    f.write(b"junk")
  broken = _cli("shards", "inspect", out, *flags)
  assert broken.returncode == 2 and "tokens.npy: checksum mismatch" in broken.stderr


def test_format_row_marks_learned_and_branches():
  from dagger_jax.data.cli import format_row
  # slots: H1 H2 | L1 E(branch 1) | S1 E  -- as in render's worked example
  row = {"tokens": np.array([1, 2, 7, 9, 5, 9]), "targets": np.array([2, 7, 9, 0, 9, 0]),
         "positions": np.array([0, 1, 2, 3, 2, 3]), "segment_ids": np.ones(6, int),
         "branch_ids": np.array([0, 0, 1, 1, 0, 0]), "loss_mask": np.array([0, 1, 1, 0, 0, 0]),
         "label_ids": np.array([0, 1, 1, 0, 0, 0])}
  text = format_row(row, lambda ids: "".join(f"<{i}>" for i in ids))
  assert text.endswith("<1><2>{{branch 1: [[<7><9>]]}}<5><9>")
  row["tokens"][3] = 3  # a branch whose first token is context (a generation-header rest)
  row["loss_mask"][1] = 0
  row["targets"][2] = 3
  assert format_row(row, lambda ids: "".join(f"<{i}>" for i in ids)).endswith(
      "<1><2>{{branch 1: <7>[[<3>]]}}<5><9>")
