"""Bad input fails early and clearly: a damaged trajectory file, shard, checkpoint or task file,
or a config value of the wrong type or range, ends the real CLI verb with exit 2 and one line
that names the file (and the line, where there is one) or the config key, and no traceback.

Each artifact is made here by the real code (`write_jsonl`, `dagger-jax shards build`, the
trainer's `Checkpointer`, `params_io.save_params`), then damaged the ways a disk, a killed
process or a hand edit damage files: a torn last line, a byte that is not UTF-8, flipped bytes,
a truncated or deleted file, an edited manifest. Property-based tests (hypothesis) mutate records,
manifests and configs at random: each ends as the module's own error, or loads, never as another
exception.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import support
from configs import base as base_config
from dagger_jax import cli, configlib
from dagger_jax.dagger import collector, intervention
from dagger_jax.data import shards
from dagger_jax.data.trajectory import (Action, Trajectory, TrajectoryError, Turn, iter_jsonl,
                                        write_jsonl)
from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.envs import tasks as T
from dagger_jax.errors import ConfigError
from dagger_jax.model import params_io
from dagger_jax.model.params_io import CheckpointError
from dagger_jax.model.qwen3 import Qwen3
from dagger_jax.train import checkpoint as C

TOKENIZER = os.path.join(configlib.REPO_ROOT, "assets", "demo_base", "tokenizer")
DEMO = os.path.join(configlib.REPO_ROOT, "configs", "demo.py")
CONFIG_ARGS = ["--config", DEMO, f"--config.data.tokenizer={TOKENIZER}"]


def _settings(n: int):
  return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.function_scoped_fixture])


def one_line(capsys, argv: list[str]) -> str:
  """Runs the verb; asserts exit 2 and one line `dagger-jax VERB: ...` on stderr; returns it."""
  code = cli.main(argv)
  out = capsys.readouterr()
  lines = out.err.strip().splitlines()
  assert code == 2 and len(lines) == 1, (code, out.err[-2000:])
  assert lines[0].startswith("dagger-jax ") and "Traceback" not in out.err + out.out
  return lines[0]


def _damage(path: str, how: str) -> None:
  """Deletes the file, or cuts it in half."""
  if how == "delete":
    os.remove(path)
  else:
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])


# -------------------------------------------------------------------------------- trajectories


def _trajectory(i: int) -> Trajectory:
  """A two-turn teacher episode (renders with the demo tokenizer)."""
  ls, sub = protocol.format_action("ls", "THOUGHT: look."), protocol.format_action(
      f"echo {protocol.SUBMIT_SENTINEL}")
  messages = ({"role": "system", "content": protocol.system_prompt()},
              {"role": "user", "content": protocol.instance_prompt(f"Fix bug {i}.")},
              {"role": "assistant", "content": ls},
              {"role": "user", "content": "<returncode>0</returncode>\n<output>\na.py\n</output>"},
              {"role": "assistant", "content": sub})
  turns = (Turn("teacher", Action(ls), None, "coin"), Turn("teacher", Action(sub), None, "coin"))
  return Trajectory(id=f"t{i}/r0/s{i}", task_id=f"t{i}", round=0, seed=i, beta=1.0,
                    messages=messages, turns=turns)


@pytest.fixture(scope="module")
def trajectory_lines(tmp_path_factory) -> list[bytes]:
  path = tmp_path_factory.mktemp("traj") / "good.jsonl"
  write_jsonl(path, [_trajectory(i) for i in range(3)])
  return path.read_bytes().splitlines(keepends=True)


def _bad_trajectory_files(lines: list[bytes]) -> dict[str, tuple[bytes, str]]:
  """case -> (file content, what the one line must say after FILE)."""
  robot = json.loads(lines[0])
  robot["turns"][0]["actor"] = "robot"
  return {
      "torn last line": (lines[0] + lines[1] + lines[2][:len(lines[2]) // 2],
                         ":3: not valid JSON"),
      "a byte that is not UTF-8": (lines[0] + lines[1][:40] + b"\xff" + lines[1][40:],
                                   ":2: not UTF-8 text (invalid start byte at byte 40"),
      "a cut multi-byte character": (lines[0] + lines[1][:40] + "é".encode()[:1] + b"\n",
                                     ":2: not UTF-8 text"),
      "not an object": (lines[0] + b"[1, 2]\n", ":2: <record>: must be a JSON object, got list"),
      "a bad field": (json.dumps(robot).encode() + b"\n",
                      ":1: turns[0].actor: must be 'student' or 'teacher', got 'robot'"),
      "NUL bytes (a file cut by a crash on some file systems)": (lines[0] + b"\0" * 64 + b"\n",
                                                                ":2: not valid JSON"),
  }


def test_a_damaged_trajectory_file_names_file_and_line(tmp_path, capsys, trajectory_lines):
  for i, (case, (content, needle)) in enumerate(_bad_trajectory_files(trajectory_lines).items()):
    path = tmp_path / f"case{i}.jsonl"
    path.write_bytes(content)
    line = one_line(capsys, ["shards", "build", "--trajectories", str(path), "--out",
                             str(tmp_path / "shard"), *CONFIG_ARGS])
    assert f"{path}{needle}" in line, (case, line)
    assert not (tmp_path / "shard").exists()  # failed before writing anything


def test_resuming_a_collection_reads_what_write_jsonl_wrote(tmp_path):
  """`collect` resumes by reading the ids already in its output file. It split lines with
  str.splitlines, which also cuts at U+2028 and NEL, characters `write_jsonl` leaves raw in a
  record (ensure_ascii=False), so a file holding one could not be resumed. A byte that is not
  UTF-8 names its line."""
  task = toy.generate(1, 0, split="train")
  done = dataclasses.replace(_trajectory(0), id=collector.episode_id(task[0], 0, 0),
                             task_id=task[0]["instance_id"])
  messages = list(done.messages)
  messages[3] = {"role": "user", "content": "line\u2028separator, next\x85line"}
  done = dataclasses.replace(done, messages=tuple(messages))
  path = tmp_path / "round.jsonl"
  write_jsonl(path, [done])
  assert "\u2028".encode() in path.read_bytes()
  _, stats = collector.collect(task, config=support.config(1, 1), round_index=0, beta=0.0,
                               teacher=None, student=support.Scripted("x"), out_path=str(path),
                               progress=False)
  assert stats.skipped == 1 and stats.episodes == 0
  path.write_bytes(path.read_bytes() + b'{"id": "\xff"}\n')
  with pytest.raises(TrajectoryError, match=f"{path}:2: not an episode record"):
    collector.collect(task, config=support.config(1, 1), round_index=0, beta=0.0, teacher=None,
                      student=support.Scripted("x"), out_path=str(path), progress=False)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3), max_leaves=6)


def _paths(value, prefix=()):
  """Every path (keys / indices) into a JSON value."""
  yield prefix
  if isinstance(value, dict):
    for k, v in value.items():
      yield from _paths(v, prefix + (k,))
  elif isinstance(value, list):
    for i, v in enumerate(value):
      yield from _paths(v, prefix + (i,))


def _mutate(record, path, new, delete: bool):
  """A copy of `record` with the value at `path` replaced by `new` (or deleted)."""
  record = json.loads(json.dumps(record))
  if not path:
    return new
  node = record
  for p in path[:-1]:
    node = node[p]
  if delete:
    del node[path[-1]]
  else:
    node[path[-1]] = new
  return record


@st.composite
def mutated(draw, record):
  paths = list(_paths(record))
  path = draw(st.sampled_from(paths))
  return _mutate(record, path, draw(json_values), delete=bool(path) and draw(st.booleans()))


def test_any_mutated_record_is_refused_by_name_or_read(tmp_path):
  good = _trajectory(0).to_dict()

  @_settings(300)
  @given(mutated(good))
  def run(record):
    try:
      traj = Trajectory.from_dict(record)
    except TrajectoryError as e:
      assert str(e).split(":")[0], e  # it names a field
      return
    assert Trajectory.from_dict(traj.to_dict()) == traj

  run()


@_settings(150)
@given(st.lists(st.binary(max_size=60), min_size=1, max_size=4))
def test_any_bytes_read_as_trajectories_or_a_named_line(tmp_path_factory, lines):
  path = tmp_path_factory.mktemp("bytes") / "t.jsonl"
  path.write_bytes(b"\n".join(lines))
  try:
    list(iter_jsonl(path))
  except TrajectoryError as e:
    assert str(e).startswith(f"{path}:"), e


# ---------------------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, trajectory_lines):
  """A shard written by the real verb."""
  root = tmp_path_factory.mktemp("shard")
  (root / "t.jsonl").write_bytes(b"".join(trajectory_lines))
  assert cli.main(["shards", "build", "--trajectories", str(root / "t.jsonl"), "--out",
                   str(root / "round_000"), *CONFIG_ARGS]) == 0
  return str(root / "round_000")


def _edit_manifest(d: str, edit) -> None:
  path = os.path.join(d, shards.MANIFEST)
  with open(path) as f:
    m = json.load(f)
  m = edit(m)
  with open(path, "w") as f:
    f.write(m if isinstance(m, str) else json.dumps(m))


def test_a_damaged_shard_names_the_file(tmp_path, capsys, shard_dir):
  def inspect(d):
    return one_line(capsys, ["shards", "inspect", d, *CONFIG_ARGS])

  for field in shards.FIELDS:
    for how in ("flip", "truncate", "delete"):
      d = str(tmp_path / f"{field}-{how}")
      shutil.copytree(shard_dir, d)
      path = os.path.join(d, f"{field}.npy")
      if how == "flip":
        with open(path, "r+b") as f:
          f.seek(os.path.getsize(path) // 2)
          byte = f.read(1)[0]
          f.seek(-1, os.SEEK_CUR)
          f.write(bytes([byte ^ 0xFF]))
      else:
        _damage(path, how)
      want = f"{path}: missing" if how == "delete" else f"{path}: checksum mismatch"
      assert want in inspect(d), (field, how)

  manifest_cases = {
      "truncated": (lambda m: json.dumps(m)[:200], "corrupt manifest: Unterminated string"),
      "a list": (lambda m: [m], "corrupt manifest: a JSON list, not an object"),
      "a field without its checksum": (
          lambda m: {**m, "fields": {**m["fields"], "tokens": {k: v for k, v in
                                                              m["fields"]["tokens"].items()
                                                              if k != "sha256"}}},
          "corrupt manifest: fields.tokens must be an object with 'file', 'sha256'"),
      "rows that the arrays do not have": (lambda m: {**m, "rows": m["rows"] + 1},
                                           "but the manifest says rows="),
      "no row_len": (lambda m: {k: v for k, v in m.items() if k != "row_len"},
                     "corrupt manifest: 'row_len' must be an int >= 0, got None"),
  }
  for case, (edit, needle) in manifest_cases.items():
    d = str(tmp_path / case.replace(" ", "_"))
    shutil.copytree(shard_dir, d)
    _edit_manifest(d, edit)
    line = inspect(d)
    assert d in line and needle in line, (case, line)


def test_a_shard_with_ids_past_the_model_vocab_is_refused(shard_dir):
  """The embedding lookup would clamp them silently (JAX gathers do not fail)."""
  config = configlib.load(DEMO)
  config.data.tokenizer = TOKENIZER
  config.model.vocab_size = 64
  with pytest.raises(shards.ShardError, match=r"manifest.json: holds token id \d+, but "
                                              r"config.model.vocab_size=64"):
    shards.ShardReader.from_config([shard_dir], config)


def test_any_edited_manifest_is_refused_by_name_or_read(tmp_path_factory, shard_dir):
  with open(os.path.join(shard_dir, shards.MANIFEST)) as f:
    good = json.load(f)
  d = str(tmp_path_factory.mktemp("edited") / "round_000")
  shutil.copytree(shard_dir, d)

  @_settings(150)
  @given(mutated(good))
  def run(manifest):
    _edit_manifest(d, lambda m: manifest)
    try:
      shard = shards.Shard(d)
    except shards.ShardError as e:
      assert str(e).startswith(d), e
      return
    reader = shards.ShardReader([shard], batch_size=2)  # what it opened, it can read
    assert reader.next_batch()["tokens"].shape == (2, shard.row_len)

  run()


# ----------------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass
class _State:  # what the trainer's TrainState holds, small
  params: dict
  opt_state: dict
  step: int
  rng: np.ndarray


def _file_damages(root: str):
  """(relative file, how) for every file under root, deleted or cut in half."""
  files = sorted(os.path.relpath(os.path.join(r, f), root)
                 for r, _, fs in os.walk(root) for f in fs)
  return [(f, how) for f in files for how in ("delete", "truncate")]


def test_every_damaged_file_of_a_checkpoint_is_named_or_harmless(tmp_path):
  """The trainer's checkpoint (params, opt_state, meta), each of its files deleted or cut in
  half in turn: restoring gives exactly what was saved (Orbax never needed that file), or a
  CheckpointError naming the step directory or the file. Before, most of these were a
  FileNotFoundError, a ValueError from TensorStore or a pytree mismatch, with a traceback."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  rng = np.random.default_rng(0)
  state = _State({"w": rng.normal(size=(64, 32)).astype(np.float32),
                  "b": {"x": np.arange(32, dtype=np.float32)}},
                 {"mu": {"w": np.ones((64, 32), np.float32)}, "count": np.int32(3)}, 7,
                 np.array([1, 2], np.uint32))
  ckpt = C.Checkpointer(str(tmp_path / "good"), async_save=False)
  ckpt.save(state, data_cursor={"epoch": 0, "offset": 3}, round_index=1)
  ckpt.close()
  spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,  # noqa: E731
                                        sharding=device)
  abstract = _State(jax.tree.map(spec, state.params), jax.tree.map(spec, state.opt_state), 7,
                    state.rng)
  outcomes = {"same": 0, "named": 0}
  for rel, how in _file_damages(str(tmp_path / "good")):
    d = str(tmp_path / "damaged")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(str(tmp_path / "good"), d)
    _damage(os.path.join(d, rel), how)
    ckpt = C.Checkpointer(d, async_save=False)
    try:
      arrays, meta = ckpt.restore(abstract)
    except CheckpointError as e:
      assert f"{d}/7" in str(e), (rel, how, str(e))
      outcomes["named"] += 1
      continue
    finally:
      ckpt.close()
    assert meta["step"] == 7 and meta["data_cursor"] == {"epoch": 0, "offset": 3}, (rel, how)
    for name in ("params", "opt_state"):
      jax.tree.map(np.testing.assert_array_equal, arrays[name], getattr(state, name))
    outcomes["same"] += 1
  assert outcomes["named"] >= 10 and outcomes["same"] >= 1, outcomes


def test_a_damaged_params_checkpoint_names_the_directory(tmp_path, capsys):
  config = support.model_config(vocab_size=256, hidden_size=32, intermediate_size=64,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
  good = params_io.save_params(Qwen3(config, rngs=nnx.Rngs(0)), str(tmp_path / "good"))
  cut = str(tmp_path / "cut")
  shutil.copytree(good, cut)
  data = os.path.join(cut, "params", "ocdbt.process_0", "d")
  for name in os.listdir(data):  # every array's bytes cut in half
    _damage(os.path.join(data, name), "truncate")
  line = one_line(capsys, ["export-hf", "--ckpt", cut, "--out", str(tmp_path / "hf"),
                           *CONFIG_ARGS])
  assert f"{cut}: cannot read the checkpoint, it is damaged or incomplete" in line
  assert f'local file "{cut}/params/"' in line  # TensorStore's words, naming the file
  no_index = str(tmp_path / "no_index")
  shutil.copytree(good, no_index)
  os.remove(os.path.join(no_index, "params", "_METADATA"))
  line = one_line(capsys, ["export-hf", "--ckpt", no_index, "--out", str(tmp_path / "hf"),
                           *CONFIG_ARGS])
  assert f"{no_index}/params/_METADATA: missing" in line


# ------------------------------------------------------------------------------------ task files


@pytest.fixture(scope="module")
def task_lines(tmp_path_factory) -> list[bytes]:
  path = str(tmp_path_factory.mktemp("tasks") / "t.jsonl")
  T.save_tasks(path, toy.generate(2, 0))
  return open(path, "rb").read().splitlines(keepends=True)


def test_a_damaged_task_file_names_file_and_line(tmp_path, capsys, task_lines):
  cases = {
      "torn": (task_lines[0] + task_lines[1][:100], ":2: not valid JSON"),
      "list": (b"[1]\n", ":1: a task must be a JSON object, got list"),
      "type": (task_lines[0].replace(b'"patch": "', b'"patch": 5, "x": "'),
               ":1 (instance toy"),
  }
  for case, (content, needle) in cases.items():
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(content)
    line = one_line(capsys, ["tasks", "validate", str(path), *CONFIG_ARGS])
    assert f"{path}{needle}" in line, (case, line)


def test_a_task_file_with_a_byte_that_is_not_utf8_names_its_line(tmp_path, capsys, task_lines):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(task_lines[0] + task_lines[1][:50] + b"\xc3(" + task_lines[1][52:])
  assert f"{path}:2:" in one_line(capsys, ["tasks", "validate", str(path), *CONFIG_ARGS])


# --------------------------------------------------------------------------------------- configs


def _config_file(tmp_path, line: str) -> str:
  path = tmp_path / "configs" / "bad.py"
  path.parent.mkdir(exist_ok=True)
  path.write_text(f"import sys\nsys.path.insert(0, {configlib.REPO_ROOT!r})\n"
                  "from configs import demo\n\n\ndef get_config(arg=''):\n"
                  f"  c = demo.get_config(arg)\n  {line}\n  return c\n")
  return str(path)


def test_a_bad_config_fails_before_any_work_naming_the_key(tmp_path, capsys):
  """Every verb loads and validates the config before it does anything; `shards inspect` of a
  directory that does not exist shows it: the config's error comes first."""
  missing = str(tmp_path / "none")
  overrides = {
      "--config.train.lr=abc": "--config.train.lr=abc: could not convert string to float",
      "--config.train.steps=1.5": "--config.train.steps=1.5: invalid literal for int()",
      "--config.train.log_every=0": "config.train.log_every=0: must be > 0",
      "--config.env.pids=0": "config.env.pids=0: must be > 0",
      "--config.train.b2=1.0": "config.train.b2=1.0: must be in [0, 1)",
      "--config.dagger.eval_split=val": "config.dagger.eval_split='val': must be one of",
      "--config.dagger.interventions=('nope',)": "config.dagger.interventions=('nope',): must "
                                                 "be a tuple of rule names",
      "--config.data.round_weights=(1,-1)": "config.data.round_weights=(1, -1): must be",
      "--config.sampler.length_buckets=(512,abc)": "config.sampler.length_buckets=",
      "--config.dagger.label_budget=(10,5,20)": "config.dagger.label_budget=(10, 5, 20): must "
                                                "be a tuple of cumulative",
      "--config.dagger.label_budget=(10,20)": "config.dagger.label_budget=(10, 20): has 2 "
                                              "entries for config.dagger.rounds=3",
  }
  for flag, needle in overrides.items():
    line = one_line(capsys, ["shards", "inspect", missing, *CONFIG_ARGS, flag])
    assert needle in line, (flag, line)
  in_file = {
      'c.train.lr = "3e-4"': ':8: c.train.lr = "3e-4": TypeError: Could not override field '
                             "'lr'",
      "c.train.steps = 2.5": ":8: c.train.steps = 2.5: TypeError",
      "c.train.lr = None": "config.train.lr=None: must be > 0 (got NoneType)",
      "c.dagger.interventions = ('repeat', )": "config.dagger.interventions=('repeat',)",
  }
  for code, needle in in_file.items():
    path = _config_file(tmp_path, code)
    line = one_line(capsys, ["shards", "inspect", missing, "--config", path])
    assert needle in line, (code, line)


def test_intervention_names_are_the_rules():
  assert configlib.INTERVENTIONS == tuple(intervention.RULES)


def _checked_keys() -> list[str]:
  return sorted({*configlib._CHOICES, *configlib._POSITIVE, *configlib._NON_NEGATIVE,
                 "train.b1", "train.min_lr_ratio", "sampler.top_p", "sampler.length_buckets",
                 "data.round_weights", "dagger.interventions", "dagger.label_budget",
                 "dagger.rounds", "env.issue_file", "model.num_kv_heads", "data.max_len",
                 "mesh.data", "mesh.fsdp"})


values = (json_values | st.tuples(json_values, json_values)
          | st.lists(st.integers(-5, 5), max_size=4).map(tuple))


@_settings(300)
@given(st.sampled_from(_checked_keys()), values)
def test_any_config_value_passes_or_names_its_key(key, value):
  config = base_config.get_config()
  section, name = key.split(".")
  with config[section].ignore_type():
    config[section][name] = value
  try:
    configlib.validate(config)
  except ConfigError as e:
    assert str(e).startswith("config."), e
