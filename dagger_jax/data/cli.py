"""`dagger-jax shards build`, `dagger-jax shards inspect` and `dagger-jax import-trajectories`.

    dagger-jax shards build --trajectories runs/demo/round_001.jsonl --out runs/demo/shards/round_001 \
        --config configs/demo.py
    dagger-jax shards inspect runs/demo/shards/round_001 --config configs/demo.py [--row 3]
    dagger-jax import-trajectories runs/mswea/ --out runs/x/trajectories/round_000.jsonl

`inspect` prints the manifest figures and one decoded row, segment by segment, with what is learned
marked: `[[...]]` learned tokens, `{{branch N: ...}}` a branch (the rest of the generation prompt,
then the teacher's label, learned), plain text = context only (prompts, observations, the
student's own untrained actions after a branch).

`import-trajectories` converts mini-swe-agent trajectory files (`*.json` / `*.traj.json`, named or
found under folders) into teacher-only records (`data/miniswe.py`) and appends them to `--out`,
skipping ids it already holds, so it can be re-run. A file with nothing to import (the batch
runner's `preds.json`, a run that ended before the model's first reply) is listed as refused; a
malformed one stops the import before anything is written.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from dagger_jax.data import miniswe, shards, tokenizer as tokenizer_lib
from dagger_jax.data.trajectory import iter_jsonl, write_jsonl
from dagger_jax.errors import UsageError


def shards_build_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--trajectories", required=True, nargs="+", metavar="FILE.jsonl",
                      help="trajectory JSON Lines file(s)")
  parser.add_argument("--out", required=True, metavar="DIR", help="shard directory to create")
  parser.add_argument("--round", type=int, default=None,
                      help="the round to record (default: the trajectories' own, which must agree)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing shard")


def shards_build(args: argparse.Namespace, config) -> int:
  missing = [p for p in args.trajectories if not os.path.isfile(p)]
  if missing:
    raise UsageError(f"--trajectories {missing[0]}: no such file")
  tok = tokenizer_lib.load_tokenizer(config.data, workdir=config.workdir)
  trajectories = [t for path in args.trajectories for t in iter_jsonl(path)]
  m = shards.build_shards(trajectories, tok, config.data, args.out, round=args.round,
                          overwrite=args.overwrite)
  print(f"wrote {args.out}: round {m['round']}, {m['rows']} rows x {m['row_len']}, "
        f"{m['tokens']} tokens ({m['trained_tokens']} trained), pad {m['pad_fraction']:.1%}, "
        f"{len(m['source_trajectories'])} trajectories")
  print("render: " + ", ".join(f"{k}={v}" for k, v in m["stats"].items()))
  return 0


def shards_inspect_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("dir", metavar="DIR", help="a shard directory")
  parser.add_argument("--row", type=int, default=0, help="which row to decode (default 0)")
  parser.add_argument("--tokenizer", default=None,
                      help="HF tokenizer directory for decoding (default: the one the shard's "
                      "manifest names, else config.data.tokenizer)")


def learned_slots(row: dict[str, np.ndarray]) -> np.ndarray:
  """bool [T]: slot i holds a token that is learned (the trained target of the slot before it)."""
  learned = np.zeros(len(row["tokens"]), bool)
  prev = row["loss_mask"][:-1].astype(bool)
  same = row["segment_ids"][1:] == row["segment_ids"][:-1]
  learned[1:] = prev & same & (row["targets"][:-1] == row["tokens"][1:])
  return learned


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
  """[start, end) spans of equal consecutive values."""
  cuts = np.flatnonzero(values[1:] != values[:-1]) + 1
  bounds = [0, *cuts.tolist(), len(values)]
  return list(zip(bounds[:-1], bounds[1:]))


def format_row(row: dict[str, np.ndarray], decode) -> str:
  """The row as text, segment by segment: `[[learned]]`, `{{branch N: ...}}` (module docstring)."""
  learned = learned_slots(row)
  out = []
  for s in np.unique(row["segment_ids"]):
    if s == 0:
      continue
    where = np.flatnonzero(row["segment_ids"] == s)
    branches = len(np.unique(row["branch_ids"][where])) - 1
    out.append(f"\n--- segment {s}: {len(where)} slots, {int(row['loss_mask'][where].sum())} "
               f"trained, {branches} branches ---\n")
    for b0, b1 in _runs(row["branch_ids"][where]):
      span = where[b0:b1]
      parts = []
      for l0, l1 in _runs(learned[span]):
        text = decode(row["tokens"][span[l0:l1]].tolist())
        parts.append(f"[[{text}]]" if learned[span[l0]] else text)
      branch = row["branch_ids"][span[0]]
      out.append(f"{{{{branch {branch}: {''.join(parts)}}}}}" if branch else "".join(parts))
  return "".join(out)


def shards_inspect(args: argparse.Namespace, config) -> int:
  shard = shards.Shard(args.dir)
  m = shard.manifest
  print(f"shard {args.dir}")
  print(f"  round {m['round']}: {m['rows']} rows x {m['row_len']} slots, {m['tokens']} tokens, "
        f"{m['trained_tokens']} trained ({m['trained_tokens'] / max(m['tokens'], 1):.1%}), "
        f"pad {m['pad_fraction']:.1%}")
  print(f"  from {len(m['source_trajectories'])} trajectories -> {m['source_rows']} rendered rows")
  print("  render: " + ", ".join(f"{k}={v}" for k, v in m["stats"].items()))
  same = m["config_hash"] == shards.config_hash(config.data)
  print(f"  config {m['config_hash']} {m['data_config']}"
        + ("" if same else f"  (differs from the given config: {shards.config_hash(config.data)})"))
  if not 0 <= args.row < shard.rows:
    raise UsageError(f"--row {args.row}: the shard has rows 0..{shard.rows - 1}")
  recorded = m.get("tokenizer_dir")  # where the shard's tokenizer was (absolute)
  try:
    if args.tokenizer or (recorded and os.path.isdir(recorded)):
      tok = tokenizer_lib.load_tokenizer_dir(os.path.abspath(args.tokenizer or recorded))
    else:
      tok = tokenizer_lib.load_tokenizer(config.data, workdir=config.workdir)
    decode = lambda ids: tok.decode(ids)  # noqa: E731
  except tokenizer_lib.TokenizerError as e:
    print(f"  (cannot load the tokenizer, showing token ids: {e})")
    decode = lambda ids: " ".join(map(str, ids)) + " "  # noqa: E731
  print(f"\nrow {args.row}: [[learned]]  {{{{branch N: generation header rest, [[label]]}}}}  "
        f"plain = context only")
  print(format_row(shard.row(args.row), decode))
  return 0


def import_trajectories_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR",
                      help="mini-swe-agent trajectory files, or folders searched for *.json")
  parser.add_argument("--out", required=True, metavar="FILE.jsonl",
                      help="trajectory JSON Lines file to append to (created if absent)")
  parser.add_argument("--task-id", default=None, metavar="ID",
                      help="the task id of every record (default: the id each file names)")
  parser.add_argument("--round", type=int, default=0, help="the round to record (default 0)")


def trajectory_files(paths: list[str]) -> list[str]:
  """The files named, and the `*.json` files under the folders named, each once, in order."""
  found: list[str] = []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, n) for n in sorted(files) if n.endswith(".json")]
    elif os.path.isfile(path):
      found.append(path)
    else:
      raise UsageError(f"FILE_OR_DIR {path}: no such file or directory")
  unique, seen = [], set()
  for path in found:
    if os.path.realpath(path) not in seen:
      seen.add(os.path.realpath(path))
      unique.append(path)
  return unique


def import_trajectories(args: argparse.Namespace, config) -> int:
  if args.round < 0:
    raise UsageError(f"--round {args.round}: must be >= 0")
  files = trajectory_files(args.paths)
  if not files:
    raise UsageError(f"no *.json files under {' '.join(args.paths)}")
  have = {t.id for t in iter_jsonl(args.out)} if os.path.isfile(args.out) else set()
  # Everything is converted before anything is written: a bad file leaves --out as it was.
  records, skipped, refused = [], [], []
  for path in files:
    try:
      traj = miniswe.convert_file(path, task_id=args.task_id, round_index=args.round)
    except miniswe.NotImportableError as e:
      refused.append(str(e))
      continue
    if traj.id in have:
      skipped.append(path)
      continue
    have.add(traj.id)
    records.append(traj)
  if records:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_jsonl(args.out, records, append=True)
  turns = sum(len(t.turns) for t in records)
  print(f"import-trajectories: {len(files)} files: {len(records)} converted "
        f"({turns} turns, {sum(t.outcome.submitted for t in records)} submitted), "
        f"{len(skipped)} skipped (ids already in {args.out}), {len(refused)} refused")
  unparsed = sum(miniswe.unparsed_turns(t) for t in records)
  if unparsed:
    print(f"  {unparsed} of {turns} turns do not hold exactly one ```{miniswe.ACTION_FENCE} "
          "block (kept as the teacher's labels: see data/miniswe.py)")
  for reason in refused:
    print(f"  refused {reason}")
  if records:
    print(f"appended {len(records)} records to {args.out}")
  return 0
