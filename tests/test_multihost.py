"""Multi-host for real on CPU: 2 processes on localhost joined by `jax.distributed`, 4 simulated
devices each, train on the global 8-device mesh and match one process of 8 devices.

Each process runs `dagger_jax.train.trainer.train` unchanged, reading only its half of every
global batch from the shard. The reference runs the same config in one process:

- one process of 8 devices that also calls `jax.distributed.initialize` (a group of one): its
  losses must equal the 2-process run's bit for bit, at every step;
- one plain process of 8 devices (this test's own): losses equal up to float32 rounding
  (rtol 1e-5). Why not bit for bit: with `jax.distributed` the CPU client does its cross-device
  reductions with gloo, which adds the 8 per-device partial sums in another order than XLA's
  in-process CPU all-reduce (which adds them in device order; e.g. [1, 2^-24 x 7] sums to 1.0
  in-process and to 1 + 2^-21 with gloo), and float32 addition is not associative. Measured:
  the first step's loss differs in its last bit (6.2223496 vs 6.2223492, 1 ulp); the group of
  one, which also uses gloo, removes the difference entirely.

The final parameters of the 2-process run and of the group of one agree to Adam's float32 level
(rtol 1e-4, atol 1e-6, as in test_trainer's accumulation test), not bit for bit: at the first
step the gradients of the MLP's gate_proj/up_proj (one [64, 256] dot, all-reduced over fsdp then
data) differ in their last bits (<= 1.7e-10 in Adam's first moment) while every other gradient,
the loss and the gradient norm are bit-equal. Both layouts compile the same HLO (apart from the
thread partitioning of 3 element-wise mask fusions), each run is deterministic, and the
collectives of that gradient (tuple psums over fsdp, data and both; reduce-scatters), run alone,
are bit-equal across the two layouts; so the difference is in how XLA:CPU runs that gradient
with 4 local devices per process instead of 8, below what this test can isolate. The checkpoint
itself must restore the 2-process run's parameters bit for bit.

It also checks that only process 0 wrote TensorBoard events and lines appended to a run file
(`trajectory.append_lines`, which writes trajectories and metrics.jsonl rows), that both
processes wrote their array shards into the Orbax checkpoint, and that this process restores
that checkpoint.

The file is also the worker: `python tests/test_multihost.py N_PROCESSES PROCESS_ID PORT SHARD
WORKDIR REPORT_DIR`.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _config(data_dir: str):
  import train_data
  config = train_data.tiny_config(data_dir)
  config.train.update(steps=STEPS, log_every=1, checkpoint_every=2)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
  return config


def worker(n: int, pid: int, port: int, shard: str, workdir: str, report_dir: str) -> None:
  """One process of an `n`-process run (n = 1: a group of one) of 8 devices in all."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // n}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=n,
                             process_id=pid)
  from jax.experimental import multihost_utils
  from dagger_jax import paths
  from dagger_jax.data.shards import ShardReader
  from dagger_jax.data.trajectory import append_lines
  from dagger_jax.train import trainer as T
  config = _config(os.path.dirname(os.path.dirname(shard)))
  start = time.perf_counter()
  result = T.train(config, [shard], workdir=workdir, progress=False, log=lambda _: None)
  seconds = time.perf_counter() - start
  # every process appends the same line, as every process of a DAgger loop does
  append_lines(os.path.join(workdir, "appended.jsonl"), [json.dumps({"process": pid})])
  writer = paths.summary_writer(os.path.join(workdir, "tensorboard"), chief_only=True)
  writer.close()
  first = ShardReader.from_config([shard], config, jax.process_index(), jax.process_count())
  np.save(os.path.join(report_dir, f"batch_{pid}.npy"), first.next_batch()["tokens"])
  params = multihost_utils.process_allgather(result.state.params, tiled=True)  # a collective
  if pid == 0:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(os.path.join(report_dir, "params.npz"),
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
  with open(os.path.join(report_dir, f"process_{pid}.json"), "w") as f:
    json.dump({"losses": [h["loss"] for h in result.history], "steps": result.steps,
               "devices": jax.device_count(), "local_devices": jax.local_device_count(),
               "process_index": jax.process_index(), "train_s": seconds,
               "writer": type(writer).__name__}, f)


def _start(n: int, pid: int, port: int, shard: str, workdir: str, report_dir: str, log: str):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  return subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(n), str(pid), str(port), shard, workdir,
       report_dir], env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait(procs: dict, timeout: float = 900) -> None:
  deadline = time.time() + timeout
  try:
    for name, (p, log) in procs.items():
      rc = p.wait(timeout=max(1, deadline - time.time()))
      if rc:
        with open(log) as f:
          tail = f.read()[-4000:]
        pytest.fail(f"{name} exited with {rc}; the end of its log ({log}):\n{tail}")
  finally:
    for p, _ in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()


def _restore(config, directory: str):
  """The params of the latest checkpoint in `directory`, by key path, and its meta."""
  import jax
  from dagger_jax.train import checkpoint as C
  from dagger_jax.train import trainer as T
  trainer = T.Trainer(config, T.mesh_from_config(config.mesh))
  ckpt = C.Checkpointer(directory, async_save=False)
  arrays, meta = ckpt.restore(trainer.abstract_state)
  ckpt.close()
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(arrays["params"]))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}, meta


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  import jax
  import train_data
  from dagger_jax.train import trainer as T
  assert jax.device_count() == 8
  data = str(tmp_path / "data")
  (shard,) = train_data.build(data, _config(data))
  runs = {"multi": 2, "group_of_one": 1}
  procs = {}
  start = time.perf_counter()
  for name, n in runs.items():
    port = support.free_port()
    for pid in range(n):
      os.makedirs(tmp_path / name / "report", exist_ok=True)
      log = str(tmp_path / f"{name}_{pid}.log")
      procs[f"{name} process {pid}"] = (
          _start(n, pid, port, shard, str(tmp_path / name / "run"),
                 str(tmp_path / name / "report"), log), log)
  _wait(procs)
  wall = time.perf_counter() - start
  reports = {name: [json.loads((tmp_path / name / "report" / f"process_{p}.json").read_text())
                    for p in range(n)] for name, n in runs.items()}
  multi, one = reports["multi"], reports["group_of_one"][0]
  assert [(r["process_index"], r["devices"], r["local_devices"]) for r in multi] == [
      (0, 8, 4), (1, 8, 4)]
  assert multi[0]["steps"] == multi[1]["steps"] == STEPS

  # each process read its own half of every global batch
  halves = [np.load(tmp_path / "multi" / "report" / f"batch_{p}.npy") for p in range(2)]
  whole = np.load(tmp_path / "group_of_one" / "report" / "batch_0.npy")
  assert halves[0].shape[0] == halves[1].shape[0] == whole.shape[0] // 2
  np.testing.assert_array_equal(np.concatenate(halves), whole)
  assert not np.array_equal(halves[0], halves[1])

  # the losses: every process reports the global loss; bit for bit the group of one's
  losses = np.array(multi[0]["losses"])
  assert len(losses) == STEPS and losses[-1] < losses[0]
  np.testing.assert_array_equal(multi[1]["losses"], losses)
  np.testing.assert_array_equal(one["losses"], losses)

  # ...and a plain process of 8 devices, up to the order of gloo's sums (module doc)
  plain = T.train(_config(data), [shard], workdir=str(tmp_path / "plain"), progress=False,
                  log=lambda _: None)
  plain_losses = np.array([h["loss"] for h in plain.history])
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
  print(f"\n2 processes x 4 devices: {wall:.0f} s wall for both runs at once (train "
        f"{multi[0]['train_s']:.0f} s); losses {losses.tolist()}; plain single process "
        f"{plain_losses.tolist()}, max relative difference "
        f"{np.max(np.abs(losses - plain_losses) / np.abs(plain_losses)):.1e}")

  # only process 0 wrote the files every process would write alike
  run = tmp_path / "multi" / "run"
  assert [json.loads(line) for line in (run / "appended.jsonl").read_text().splitlines()] == [
      {"process": 0}]
  events = sorted(os.listdir(run / "tensorboard"))
  assert len(events) == 2 and all(e.startswith("events.out.tfevents.") for e in events)
  assert [r["writer"] for r in multi] == ["SummaryWriter", "NoWriter"]
  assert sum(e.endswith(".round_000") for e in events) == 1  # the trainer's: one, not two

  # Orbax saved from both processes; this process restores the run's parameters bit for bit
  step_dir = run / "checkpoints" / "round_000" / str(STEPS)
  written = {name for _, dirs, names in os.walk(step_dir / "params") for name in dirs + names}
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= written, sorted(written)
  params, meta = _restore(_config(data), str(run / "checkpoints" / "round_000"))
  assert meta["step"] == STEPS
  trained = np.load(tmp_path / "multi" / "report" / "params.npz")
  assert sorted(params) == sorted(trained.files)
  for k in params:
    np.testing.assert_array_equal(params[k], trained[k], err_msg=k)
  # ...which match the group of one's to Adam's float32 level (the module doc says why)
  reference = np.load(tmp_path / "group_of_one" / "report" / "params.npz")
  for k in params:
    np.testing.assert_allclose(params[k], reference[k], rtol=1e-4, atol=1e-6, err_msg=k)


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7])
