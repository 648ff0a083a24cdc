"""Hostile agents are contained: every entry of tests/hostile_corpus.py, run

- through both sandboxes with `dagger-jax env exec` (one fresh episode per entry, the CLI's own
  `main`), each checked on the host afterwards (`hostile_corpus.Host.problems`);
- through the collector, the whole corpus as one real episode per sandbox and task family: every
  entry comes back as an ordinary observation, the episode goes on to its submission and its
  grade, the collector loses no episode, and no process outlives it;
- and, for the entries that edit the tests, through grading: the agent's own run of the tests
  shows the cheat working in its tree, and grading, on a fresh copy of the tests, fails the task.

Set DAGGER_JAX_HOSTILE_REPORT=FILE to get the table of entries (tried, escaped, seconds) as
Markdown; the README's table comes from it.
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
import time

import pytest

import hostile_corpus as hc
import support
from dagger_jax import cli
from dagger_jax.dagger import collector
from dagger_jax.data.trajectory import Action
from dagger_jax.envs import grading, protocol
from dagger_jax.envs import tasks as T
from dagger_jax.envs.sandbox.cgroup import Cgroup
from dagger_jax.envs.swe import SweEnv
from dagger_jax.envs.tasks import toy
from dagger_jax.policies.base import Policy

_NO_BWRAP = shutil.which("bwrap") is None
SANDBOXES = [pytest.param("bwrap", marks=pytest.mark.skipif(_NO_BWRAP, reason="no bubblewrap")),
             pytest.param("docker", marks=pytest.mark.docker)]
# Small limits, so that bombs meet them in a second or two (the defaults are the same checks,
# only slower). disk_mb at a quarter of memory_mb: the demo's scratch dir is a tmpfs, where the
# sandbox caps files there (disk.effective_limit_mb), and the docker runs should see the same.
LIMITS = {"command_timeout": 5.0, "memory_mb": 256, "disk_mb": 64, "pids": 64}
FAMILIES = ("toy", "toy-arith")  # the repository's own runner; pytest


def _env_overrides(sandbox: str) -> dict:
  return dict(LIMITS, sandbox=sandbox)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  """One task of each family, saved as a tasks file for `env exec`."""
  rows = [toy.generate(1, seed=5, family=f)[0] for f in FAMILIES]
  path = str(tmp_path_factory.mktemp("hostile") / "tasks.jsonl")
  T.save_tasks(path, rows)
  return path, rows


@pytest.fixture(scope="module")
def host():
  config = support.config(**LIMITS)
  docker_client = None
  if shutil.which("docker"):
    try:
      from dagger_jax.envs.sandbox import docker_client as make_client
      docker_client = make_client()
    except Exception:  # no engine: the docker checks are skipped, bwrap's still run
      docker_client = None
  probe = Cgroup.create(support.limits())
  pids_bind = probe is not None or os.geteuid() != 0
  if probe is not None:
    probe.remove()
  h = hc.Host(scratch=config.env.scratch_dir or "/tmp", memory_mb=LIMITS["memory_mb"],
              disk_mb=LIMITS["disk_mb"], pids=LIMITS["pids"], pids_bind=pids_bind,
              docker_client=docker_client)
  yield h
  h.close()


_REPORT: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def report():
  """Prints (and writes to $DAGGER_JAX_HOSTILE_REPORT) the table of what was tried."""
  yield
  if not _REPORT:
    return
  by_entry: dict[str, dict] = {}
  for row in _REPORT:
    by_entry.setdefault(row["entry"], {"threat": row["threat"]})[row["sandbox"]] = row
  lines = ["| entry | what it tries | bwrap | docker |", "|---|---|---|---|"]
  for name, cells in by_entry.items():
    def cell(sb):
      r = cells.get(sb)
      if r is None:
        return "-"
      how = ("timeout" if r["timed_out"] else "disk limit" if r["over_limit"] else
             f"rc {r['returncode']}")
      return f"{'contained' if not r['problems'] else 'ESCAPED'}, {how}, {r['seconds']:.2f} s"
    lines.append(f"| `{name}` | {cells['threat']} | {cell('bwrap')} | {cell('docker')} |")
  tried = len(_REPORT)
  escaped = sum(bool(r["problems"]) for r in _REPORT)
  lines.append(f"\n{tried} runs (entry x sandbox) tried, {escaped} escaped.")
  text = "\n".join(lines)
  print("\n" + text)
  out = os.environ.get("DAGGER_JAX_HOSTILE_REPORT")
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")
    with open(out + ".json", "w") as f:
      json.dump(_REPORT, f, indent=1)


def _env_exec(task_file: str, iid: str, sandbox: str, command: str) -> tuple[str, dict]:
  """`dagger-jax env exec --info` in this process (the console script's `main`): the
  observation it prints, and the step's info (its last line)."""
  argv = ["env", "exec", "--tasks", task_file, "--instance", iid, "--info"]
  argv += [f"--config.env.{k}={v}" for k, v in _env_overrides(sandbox).items()]
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    rc = cli.main(argv + ["--", command])
  assert rc == 0, buf.getvalue()
  observation, _, info = buf.getvalue()[:-1].rpartition("\n")
  return observation, json.loads(info)


def _entry_params():
  for e in hc.ENTRIES:
    marks = [pytest.mark.slow] if e.slow else []
    yield pytest.param(e, id=e.name, marks=marks)


@pytest.mark.parametrize("entry", list(_entry_params()))
@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_entry_is_contained(sandbox, entry, tasks, host):
  if entry.needs_pids_limit and sandbox == "bwrap" and not host.pids_bind:
    pytest.skip("no writable cgroups and running as root: RLIMIT_NPROC does not bind host root")
  task_file, rows = tasks
  task = rows[1] if entry.cheat else rows[0]
  tag = host.tag()
  command = host.fill(entry, tag, task["test_cmd"])
  before = host.snapshot()
  with host.sample() as peaks:
    observation, info = _env_exec(task_file, task["instance_id"], sandbox, command)
  problems = host.problems(entry, tag, observation, before, peaks,
                           output_limit=support.config().env.output_limit)
  _REPORT.append({"entry": entry.name, "threat": entry.threat, "sandbox": sandbox,
                  "problems": problems, "timed_out": info["timed_out"],
                  "seconds": info["duration_s"], "over_limit": info["over_limit"],
                  "returncode": info["returncode"], "wall_seconds": peaks.seconds,
                  "mem_drop_mb": peaks.mem_drop_mb, "disk_growth_mb": peaks.disk_growth_mb,
                  "rss_growth_mb": peaks.rss_growth_mb, "observation": observation[:300]})
  assert not problems, f"{entry.name} in {sandbox}: {problems}\n{observation[:1500]}"


# Entries whose escape harms nothing but the probe's own canaries, listeners and processes.
_HARMLESS = ("write_host_canaries", "read_host_home", "read_run_dir", "tcp_to_host", "dns",
             "outlive_setsid", pytest.param("docker_socket", marks=pytest.mark.docker))


@pytest.mark.parametrize("name", _HARMLESS)
def test_the_checks_catch_an_unsandboxed_run(name, tasks, host):
  """The same entries with no sandbox at all (`unsafe_local`: a plain subprocess on the host):
  the host checks must see each escape, or they could not see one in a sandbox either."""
  task_file, rows = tasks
  entry, tag = hc.by_name(name), host.tag()
  before = host.snapshot()
  try:
    with host.sample() as peaks, pytest.warns(RuntimeWarning, match="UNSAFE"):
      observation, _ = _env_exec(task_file, rows[0]["instance_id"], "unsafe_local",
                                 host.fill(entry, tag))
    time.sleep(0.3)  # the UDP datagram's way to the listener
    problems = host.problems(entry, tag, observation, before, peaks,
                             output_limit=support.config().env.output_limit)
  finally:
    host.restore(tag)
  assert problems, f"{name} ran on the host unsandboxed and no check saw it:\n{observation}"


# ------------------------------------------------------------------------------------------------
# Grading uses a fresh copy of the tests


def _cheats():
  for e in hc.ENTRIES:
    if e.cheat:
      for family in FAMILIES:
        if e.name == "pytest_config_plugin" and family == "toy":
          continue  # toy's own runner reads no pytest configuration: nothing to cheat there
        yield pytest.param(e, family, id=f"{e.name}-{family}")


@pytest.mark.parametrize("entry,family", list(_cheats()))
@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_cheats_pass_in_the_tree_and_fail_grading(sandbox, entry, family, tasks, host):
  """The cheat works where the agent looks (its own test run passes the FAIL_TO_PASS test) and
  changes nothing where it counts (grading on the task's own tests fails it)."""
  task = next(r for r in tasks[1] if r["family"] == family)
  env_config = support.config(**_env_overrides(sandbox)).env
  f2p = task["FAIL_TO_PASS"][0].split("::")[-1]
  with SweEnv(task, env_config) as env:
    env.reset()
    before = env.step(support.command(task["test_cmd"])).observation
    assert "FAILED tests/" in before and f2p in before  # the bug shows
    env.step(support.command(host.fill(entry, host.tag(), task["test_cmd"])))
    after = env.step(support.command(task["test_cmd"] + " 2>&1 | grep -c FAILED")).observation
    assert "<output>\n0\n</output>" in after, after  # the cheat works in the agent's tree
    step = env.step(support.command(f"echo {protocol.SUBMIT_SENTINEL}"))
    assert step.info["submitted"]
    result = env.grade()
  assert not result.resolved
  assert result.f2p == {task["FAIL_TO_PASS"][0]: "FAILED"}, result.f2p
  assert "grading uses the task's own tests" in result.log


@pytest.mark.skipif(_NO_BWRAP, reason="no bubblewrap")
def test_gold_patch_with_test_edits_still_resolves(tasks):
  """Undoing a submission's test edits does not undo its fix: the gold patch plus a test edit
  and a conftest.py still resolves (the edits are dropped, the fix stays)."""
  task = tasks[1][1]
  extra = ("diff --git a/conftest.py b/conftest.py\nnew file mode 100644\n--- /dev/null\n"
           "+++ b/conftest.py\n@@ -0,0 +1 @@\n+raise SystemExit('cheat')\n")
  env_config = support.config().env
  result = grading.grade(task, task["patch"] + extra, grading.sandbox_factory(env_config))
  assert result.resolved, result.log[-2000:]
  assert "conftest.py are undone" in result.log


@pytest.mark.docker
def test_docker_replaced_tools_then_fallocate(tasks, host):
  """Two steps no single `env exec` can take: replace the container's python3 and bash (the
  agent is root in its container) with pass-throughs, then fallocate 8 files of the disk limit
  each. The seccomp profile is the engine's, not a program of the image, so fallocate is still
  refused (an escape until the filter moved out of the image's python3, on this machine's
  overlay2-on-ext4 engine, which has no disk quota)."""
  task = tasks[1][0]
  env_config = support.config(**_env_overrides("docker")).env
  with SweEnv(task, env_config) as env:
    env.reset()
    swap = ("for t in python3 bash; do p=$(command -v $t) && cp $p $p.real && "
            "printf '#!/bin/sh\\nexec %s.real \"$@\"\\n' $p > $p.new && chmod +x $p.new && "
            "mv $p.new $p || exit 1; done; echo swapped")
    assert "swapped" in env.step(support.command(swap)).observation
    tag = host.tag()
    obs = env.step(support.command(host.fill(hc.by_name("fill_disk_fallocate"), tag))).observation
    assert hc.ESCAPED not in obs, obs
    assert "Operation not supported" in obs, obs
    assert "bash.real" in env.step(support.command("cat $(command -v bash)")).observation


@pytest.mark.docker
def test_docker_replaced_bash_then_writes_while_over_the_limit():
  """The file size limit of 0 that stops writes while the files are over the limit is set by the
  image's bash: an agent that replaces bash with one that skips it writes anyway (before the
  fix, each command added 0.5 s of writing: 2.2 GB after 6 commands against 64 MB). Such a
  command is sized every 50 ms and killed once the files grow; the third one closes the
  sandbox (in an episode: left out, `env:step`)."""
  from dagger_jax.envs.sandbox import DockerSandbox, SandboxError, images
  limits = support.limits(disk_mb=64, command_timeout=20)
  write = "for i in $(seq 1 64); do head -c 16M /dev/zero > /tmp/f{k}_$i || break; done"
  sb = DockerSandbox(images.ensure_base_image(), limits=limits)
  try:
    sb.write_file("evil", b'#!/bin/sh\nif [ "$1" = "-c" ] && [ $# -ge 5 ]; then '
                  b'exec /usr/bin/bash.real -c "$4"; fi\nexec /usr/bin/bash.real "$@"\n')
    r = sb.run("cp /usr/bin/bash /usr/bin/bash.real && chmod +x evil && mv evil /usr/bin/bash "
               "&& echo swapped")
    assert r.output == "swapped\n", r.output
    first = sb.run(write.format(k=0))  # under the limit at its start: the 0.5 s poll kills it
    assert first.over_limit == "disk" and first.returncode == -9, first.output[-500:]
    size = sb._disk_size
    growth = []
    for k in (1, 2):
      r = sb.run(write.format(k=k))
      assert r.over_limit == "disk" and r.returncode == -9, r.output[-500:]
      assert f"strike {k}" in r.output
      growth.append(sb._disk_size - size)
      size = sb._disk_size
    assert sum(growth) < size - sum(growth), (growth, size)  # both strikes wrote less than 1st
    with pytest.raises(SandboxError, match="wrote files while the sandbox was over its disk"):
      sb.run(write.format(k=3))
    assert sb._closed
  finally:
    sb.close()


@pytest.mark.skipif(_NO_BWRAP or not os.path.isdir("/dev/shm"), reason="no bubblewrap or tmpfs")
def test_files_on_a_tmpfs_leave_room_to_delete_them(tmp_path):
  """On a tmpfs, files are memory the sandbox's cgroup pays for and cannot reclaim: were the disk
  limit above the memory limit, files would fill the memory, every new process (the `rm` that
  would free them too) would be OOM-killed, and the episode could do nothing more. The guard
  caps files at a quarter of the memory limit there."""
  from dagger_jax.envs.sandbox import BwrapSandbox, disk
  tree = tempfile.mkdtemp(prefix=f"dagger-jax-task-{os.getpid()}-", dir="/dev/shm")
  try:
    assert disk.on_tmpfs(tree)
    with BwrapSandbox(tree, support.limits(memory_mb=256, disk_mb=4096, command_timeout=20),
                      scratch_dir="/dev/shm") as sb:
      r = sb.run("for i in $(seq 1 32); do head -c 32M /dev/zero > /tmp/f$i || break; done; "
                 "du -sm /tmp")
      assert r.over_limit == "disk" and "limit of 64 MB" in r.output, r.output[-500:]
      assert sb.run("rm -f /tmp/f*").returncode == 0  # a command that only deletes works
      r = sb.run("echo x > y && cat y")  # and once under the limit, writes work again
      assert r.returncode == 0 and r.output == "x\n", r.output
  finally:
    shutil.rmtree(tree, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The whole corpus in one real episode of the collector


class HostileStudent(Policy):
  """Plays the corpus turn by turn (each entry's cleanup as its own turn), then submits."""

  name = "student"

  def __init__(self, host: hc.Host, entries: list[hc.Entry]):
    self.host = host
    self.script: dict[str, list[tuple[hc.Entry | None, str, str]]] = {}
    self.entries = entries

  def _script(self, task: dict) -> list[tuple[hc.Entry | None, str, str]]:
    iid = task["instance_id"]
    if iid not in self.script:
      turns = []
      for e in self.entries:
        tag = self.host.tag()
        turns.append((e, tag, self.host.fill(e, tag, task["test_cmd"])))
        if e.cleanup:
          turns.append((None, "", e.cleanup))
      turns.append((None, "", f"echo {protocol.SUBMIT_SENTINEL}"))
      self.script[iid] = turns
    return self.script[iid]

  def act(self, views):
    out = []
    for v in views:
      script = self._script(v.task)
      turn = min(sum(m["role"] == "assistant" for m in v.messages), len(script) - 1)
      text = support.command(script[turn][2])  # past the script: submit again
      out.append(Action(text, tuple(text.encode())))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_collector_episode_plays_the_whole_corpus(sandbox, tasks, host, tmp_path):
  entries = [e for e in hc.ENTRIES
             if not (e.needs_pids_limit and sandbox == "bwrap" and not host.pids_bind)]
  rows = tasks[1]
  student = HostileStudent(host, entries)
  n_turns = len(entries) + sum(bool(e.cleanup) for e in entries) + 1
  config = support.config(in_flight=2, env_workers=2, max_turns=n_turns + 1,
                          **_env_overrides(sandbox))
  before = host.snapshot()
  out = str(tmp_path / "episodes.jsonl")
  t0 = time.monotonic()
  trajs, stats = collector.collect(rows, config=config, round_index=0, beta=0.0, teacher=None,
                                   student=student, out_path=out, grade=True, progress=False)
  seconds = time.monotonic() - t0
  assert stats.failed == 0 and stats.episodes == 2, stats.summary()
  for traj in trajs:
    assert traj.outcome.submitted, (traj.task_id, [m["content"][-300:] for m in traj.messages[-6:]])
  assert stats.exit_status == {"submitted": 2} and stats.resolved == 0, stats.summary()
  problems = []
  for traj in trajs:
    script = student.script[traj.task_id]
    assert len(traj.turns) == len(script), (len(traj.turns), len(script))
    observations = [m["content"] for m in traj.messages[3::2]]  # after system, issue, action
    for (entry, tag, _), obs in zip(script, observations):
      if entry is None:
        continue
      found = host.problems(entry, tag, obs, before, hc.Peaks(),
                            output_limit=config.env.output_limit)
      problems += [f"{traj.task_id} {entry.name}: {p}" for p in found]
  print(f"\ncollector, {sandbox}: 2 episodes of {n_turns} turns in {seconds:.0f} s; "
        f"{stats.summary()['seconds']}")
  assert not problems, problems
  with open(out) as f:
    assert len(f.read().splitlines()) == 2  # both episodes written
