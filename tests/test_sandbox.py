"""The bubblewrap sandbox, for real (bwrap from the system), and the unsafe local one."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import support
from configs import base
from dagger_jax.envs import sandbox as sbx
from dagger_jax.envs.sandbox import BwrapSandbox, ExecResult, SandboxError, process

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/bin/bwrap") and shutil.which("bwrap") is None,
    reason="bubblewrap is not installed (`make sysdeps`)")


def _host_pids_running(marker: str) -> list[int]:
  """PIDs of host processes whose command line contains `marker`."""
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          if marker.encode() in f.read():
            pids.append(int(entry))
      except OSError:
        pass
  return pids


def _wait_gone(marker: str, seconds: float = 5.0) -> list[int]:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    left = _host_pids_running(marker)
    if not left:
      return []
    time.sleep(0.05)
  return _host_pids_running(marker)


@pytest.fixture
def repo(tmp_path):
  d = tmp_path / "repo"
  d.mkdir()
  (d / "hello.py").write_text("print('hello')\n")
  return d


@pytest.fixture(params=[True, False], ids=["cgroups", "rlimits"])
def sb(request, repo):
  with BwrapSandbox(str(repo), support.limits(command_timeout=10, memory_mb=256, pids=64),
                    use_cgroups=request.param) as s:
    yield s


def test_runs_bash_in_the_workdir(sb):
  r = sb.run("pwd; python3 hello.py; echo err >&2; echo out; exit 3")
  assert r == ExecResult(3, "/testbed\nhello\nerr\nout\n", False, r.duration_s)
  assert sb.run("shopt -q login_shell && echo login").output == "login\n"  # bash -lc


def test_root_is_read_only_and_host_is_hidden(sb, repo):
  r = sb.run("touch /usr/x /etc/x; ls /work /root /home 2>&1 | head -3; echo new > made.txt")
  assert "Read-only file system" in r.output
  assert "No such file or directory" in r.output
  assert (repo / "made.txt").read_text() == "new\n"  # the task tree is writable
  assert not os.path.exists("/usr/x")
  assert sb.run("cat /etc/shadow | wc -c").output == "0\n"  # host password hashes are masked


def test_private_tmp_persists_within_one_sandbox_only(sb, repo):
  marker = f"dagger-jax-test-{os.getpid()}-{time.monotonic_ns()}"
  sb.run(f"echo kept > /tmp/{marker}")
  assert sb.run(f"cat /tmp/{marker}").output == "kept\n"
  assert not os.path.exists(f"/tmp/{marker}")  # not the host's /tmp
  with BwrapSandbox(str(repo), support.limits()) as other:
    assert other.run(f"cat /tmp/{marker}").returncode != 0


def test_no_network(sb):
  r = sb.run("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=3)\"")
  assert r.returncode != 0 and "Network is unreachable" in r.output
  assert sb.run("ls /sys/class/net 2>/dev/null || cat /proc/net/dev").output.count("eth") == 0


def test_own_pid_namespace(sb):
  r = sb.run("ls -d /proc/[0-9]* | wc -l; cat /proc/1/cmdline | tr '\\0' ' '")
  n, init = r.output.split("\n", 1)
  assert int(n) < 10 and "--norc" in init  # the sandbox's executor is PID 1; no host process


def test_timeout_kills_the_whole_tree(sb):
  marker = f"{os.getpid() % 1000 + 1000}.{time.monotonic_ns() % 10**6}"
  t0 = time.monotonic()
  r = sb.run(f"echo before; sleep {marker} & setsid sleep {marker} & sleep {marker}", timeout=1)
  assert r.timed_out and r.returncode == -9 and r.output == "before\n"
  assert time.monotonic() - t0 < 5
  assert _wait_gone(f"sleep\0{marker}") == []
  sb.run("echo kept > /tmp/state")
  assert sb.run("sleep 30", timeout=0.5).timed_out
  assert sb.run("cat /tmp/state; pwd").output == "kept\n/testbed\n"  # restarted, same tree + /tmp


def test_background_processes_end_with_the_command(sb):
  marker = f"{os.getpid() % 1000 + 2000}.{time.monotonic_ns() % 10**6}"
  r = sb.run(f"sleep {marker} & echo started")
  assert r.output == "started\n" and not r.timed_out and r.duration_s < 3
  assert _wait_gone(f"sleep\0{marker}") == []


def test_output_is_capped_head_and_tail(repo):
  with BwrapSandbox(str(repo), support.limits(max_output_chars=10_000)) as sb:
    r = sb.run("seq 1 1000000")
  full = "".join(f"{i}\n" for i in range(1, 1_000_001))
  assert r.output == full[:5000] + full[-5000:]
  assert r.elided_chars == len(full) - 10_000


def test_stdin_is_empty_and_odd_commands_are_harmless(sb):
  t0 = time.monotonic()
  assert sb.run("cat; read x; echo read=$?").output == "read=1\n"  # stdin is /dev/null
  assert time.monotonic() - t0 < 5
  assert sb.run("exec echo replaced").output == "replaced\n"
  assert sb.run("exit 7").returncode == 7
  assert sb.run("echo a\0b").output == "ab\n"  # bash strings cannot hold NUL
  assert sb.run("echo 'two\nlines'; echo next").output == "two\nlines\nnext\n"
  assert sb.run("kill -9 1; echo survived").output == "survived\n"  # PID 1 is immune


def test_invalid_utf8_is_replaced(sb):
  assert sb.run("printf 'a\\xffb\\n'").output == "a\ufffdb\n"


def test_memory_limit(sb):
  r = sb.run("python3 -c 'x = bytearray(600 * 1024 ** 2); x[::4096] = b\"x\" * len(x[::4096]); "
             "print(\"alloc\" + \"ated\")'; echo rc=$?")
  assert "allocated" not in r.output
  assert "rc=137" in r.output or "MemoryError" in r.output  # OOM-killed (cgroup) / refused (rlimit)
  assert sb.run("python3 -c 'x = bytearray(50 * 1024 ** 2); print(len(x))'").output == "52428800\n"


def test_process_limit(repo):
  with BwrapSandbox(str(repo), support.limits(pids=20)) as sb:
    if sb.cgroup is None:
      pytest.skip("no writable cgroups here; RLIMIT_NPROC does not bind host root")
    script = textwrap.dedent("""
        import subprocess
        procs = []
        try:
          for _ in range(100):
            procs.append(subprocess.Popen(["sleep", "30"]))
        except OSError as e:
          print("refused", e.errno)
        print(len(procs))
        """)
    sb.write_file("spawn.py", script.encode())
    r = sb.run("python3 spawn.py")
  lines = r.output.split()
  assert lines[0] == "refused" and int(lines[-1]) < 20


def test_cpu_limit(repo):
  with BwrapSandbox(str(repo), support.limits(cpus=0.25)) as sb:
    if sb.cgroup is None:
      pytest.skip("no writable cgroups here")
    r = sb.run("python3 -c 'import os, time\nt = time.time()\nwhile time.time() - t < 2: pass\n"
               "c = os.times()\nprint(c.user + c.system)'")
  cpu_s = float(r.output)
  assert cpu_s < 0.25 * 2 * 1.3 + 0.1, cpu_s  # a 2 s busy loop got at most a quarter CPU


def test_write_file(sb, repo):
  sb.write_file("pkg/new.py", b"x = 1\n")
  assert (repo / "pkg" / "new.py").read_bytes() == b"x = 1\n"
  assert sb.run("cat pkg/new.py").output == "x = 1\n"
  for bad in ("../escape.py", "/etc/passwd", "pkg/../../escape.py"):
    with pytest.raises(ValueError, match="write_file"):
      sb.write_file(bad, b"")


def test_close_is_idempotent_and_cleans_up(repo):
  sb = BwrapSandbox(str(repo), support.limits())
  tmp, cgroup_dirs = sb._tmp, list(sb.cgroup.dirs) if sb.cgroup else []
  sb.run("echo x > /tmp/x")
  sb.close()
  sb.close()
  assert not os.path.exists(tmp)
  assert not any(os.path.exists(d) for d in cgroup_dirs)
  with pytest.raises(SandboxError, match="closed"):
    sb.run("true")


def test_sandbox_dies_with_its_parent(repo):
  """SIGKILL the Python process that owns a sandbox: the sandboxed command dies too."""
  marker = f"{os.getpid() % 1000 + 3000}.{time.monotonic_ns() % 10**6}"
  child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      from configs import base
      from dagger_jax.envs.sandbox import BwrapSandbox, SandboxLimits
      limits = SandboxLimits.from_config(base.get_config().env)
      BwrapSandbox({str(repo)!r}, limits).run("sleep {marker}", timeout=600)
      """)], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  deadline = time.monotonic() + 30
  while not _host_pids_running(f"sleep\0{marker}"):
    assert time.monotonic() < deadline and child.poll() is None, "the sandboxed sleep never started"
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert _wait_gone(f"sleep\0{marker}") == []


def test_missing_bwrap_says_how_to_install():
  with pytest.raises(SandboxError, match="apt-get install -y bubblewrap"):
    sbx.check_bwrap("bwrap-not-installed-here")
  with pytest.raises(SandboxError, match="unsafe_local"):
    BwrapSandbox("/tmp", support.limits(), executable="bwrap-not-installed-here")


def test_make_sandbox_from_config(repo):
  env = base.get_config().env
  with sbx.make_sandbox(env, str(repo)) as sb:
    assert isinstance(sb, BwrapSandbox)
    assert sb.limits.command_timeout == env.command_timeout and sb.limits.pids == env.pids
    assert sb.limits.max_output_chars >= 4 * env.output_limit
  env.sandbox = "unsafe_local"
  with pytest.warns(RuntimeWarning, match="UNSAFE"):
    with sbx.make_sandbox(env, str(repo)) as sb:
      assert sb.run("pwd").output == f"{repo}\n"


def test_unsafe_local_kills_the_group_on_timeout(repo):
  marker = f"{os.getpid() % 1000 + 4000}.{time.monotonic_ns() % 10**6}"
  with pytest.warns(RuntimeWarning):
    sb = sbx.UnsafeLocalSandbox(str(repo), support.limits(command_timeout=1))
  with sb:
    r = sb.run(f"sleep {marker} & sleep {marker}")
    assert r.timed_out
    r = sb.run(f"sleep {marker} & echo bg")
    assert r.output == "bg\n" and not r.timed_out
    assert sb.run("echo a\0b").output == "ab\n"
  assert _wait_gone(f"sleep\0{marker}") == []


def test_output_cap_keeps_head_and_tail_of_multibyte_text():
  cap = process.OutputCap(limit=7)
  text = "αβγδεζηθικλμνξοπ"  # 2 bytes per character, fed one byte at a time
  for b in text.encode():
    cap.feed(bytes([b]))
  assert cap.result() == (text[:4] + text[-3:], len(text) - 7)


def test_concurrent_sandboxes_from_threads(tmp_path):
  """The collector runs many episodes' commands from worker threads at once."""
  from concurrent.futures import ThreadPoolExecutor
  repos = []
  for i in range(4):
    (tmp_path / f"r{i}").mkdir()
    (tmp_path / f"r{i}" / "id.txt").write_text(f"{i}\n")
    repos.append(str(tmp_path / f"r{i}"))
  sandboxes = [BwrapSandbox(r, support.limits()) for r in repos]
  try:
    def work(i):
      sb = sandboxes[i % 4]
      sb.run(f"echo {i} >> /tmp/log")
      return sb.run("cat id.txt").output
    with ThreadPoolExecutor(8) as pool:
      outs = list(pool.map(work, range(40)))
    assert outs == [f"{i % 4}\n" for i in range(40)]
    for k, sb in enumerate(sandboxes):
      logged = sorted(int(x) for x in sb.run("cat /tmp/log").output.split())
      assert logged == [i for i in range(40) if i % 4 == k]  # private /tmp per sandbox
  finally:
    for sb in sandboxes:
      sb.close()


def test_survives_the_thread_that_started_it_and_restarts_after_a_crash(repo):
  """--die-with-parent follows the forking *thread*: a worker thread that ends must not take the
  sandbox down; a sandbox killed from outside comes back (same tree, same /tmp)."""
  import threading
  with BwrapSandbox(str(repo), support.limits()) as sb:
    t = threading.Thread(target=lambda: sb.run("echo kept > /tmp/state"))
    t.start()
    t.join()
    pid = sb._executor[0].proc.pid
    time.sleep(0.2)
    assert sb.run("cat /tmp/state").output == "kept\n"
    assert sb._executor[0].proc.pid == pid  # the same bubblewrap, not a restart
    os.killpg(pid, signal.SIGKILL)
    sb._executor[0].proc.wait()
    assert sb.run("cat /tmp/state").output == "kept\n"
    assert sb._executor[0].proc.pid != pid


def test_a_sandbox_that_cannot_start_says_why(tmp_path):
  work = tmp_path / "gone"
  work.mkdir()
  with BwrapSandbox(str(work), support.limits()) as sb:
    work.rmdir()  # bwrap can no longer bind it
    with pytest.raises(SandboxError, match="could not start the sandbox(.|\n)*No such file"):
      sb.run("true")


def test_state_left_by_a_killed_process_is_reaped(repo, monkeypatch):
  dead = subprocess.Popen(["true"])
  dead.wait()  # its pid names the leftovers of a "killed" sandbox owner
  stale_tmp = os.path.join(tempfile.gettempdir(), f"dagger-jax-bwrap-{dead.pid}-x1")
  os.makedirs(os.path.join(stale_tmp, "tmp"))
  stale_task = os.path.join(tempfile.gettempdir(), f"dagger-jax-task-{dead.pid}-x3")
  os.makedirs(os.path.join(stale_task, "repo"))
  mine = os.path.join(tempfile.gettempdir(), f"dagger-jax-bwrap-{os.getpid()}-x2")
  os.makedirs(mine)
  stale_cgroup = f"/sys/fs/cgroup/pids/dagger-jax-{dead.pid}-deadbeef"
  try:
    os.mkdir(stale_cgroup)
  except OSError:
    stale_cgroup = None  # no writable v1 pids hierarchy here
  monkeypatch.setattr(process, "_REAPED_DIRS", set())  # reaping runs once per process
  try:
    with BwrapSandbox(str(repo), support.limits()) as sb:
      assert sb.run("echo ok").output == "ok\n"
    assert not os.path.exists(stale_tmp) and not os.path.exists(stale_task)
    assert os.path.exists(mine)  # a live process's state is left alone
    if stale_cgroup is not None:
      assert not os.path.exists(stale_cgroup)
  finally:
    shutil.rmtree(mine, ignore_errors=True)
    shutil.rmtree(stale_tmp, ignore_errors=True)
    shutil.rmtree(stale_task, ignore_errors=True)


_FD_PROBE = textwrap.dedent("""
    import os, sys
    from configs import base
    from dagger_jax.envs.sandbox import BwrapSandbox, SandboxLimits
    k = int(sys.argv[2])
    free = []
    for fd in range(3, 10):
      try:
        os.fstat(fd)
      except OSError:
        free.append(fd)
    assert 9 in free and len(free) >= k, free
    src = os.open(os.devnull, os.O_RDONLY)
    for fd in free[:-k]:
      os.dup2(src, fd)
    limits = SandboxLimits.from_config(base.get_config().env, command_timeout=10)
    with BwrapSandbox(sys.argv[1], limits) as sb:
      print(sb.run("echo ok").output + sb.run("echo again").output, end="")
""")


@pytest.mark.parametrize("free_below_10", [1, 2, 3, 4, 5])
def test_status_pipe_on_any_fd_number(repo, free_below_10):
  """Regression: the executor's status pipe landing on fd 9 (its own target) closed it; with
  worker threads holding fds this happened at random ("could not start the sandbox").

  In a fresh process, leaves only the `free_below_10` highest free fd numbers under 10 free, so
  across the cases the FIFO and the status pipe of the first command take each spot up to fd 9."""
  r = subprocess.run([sys.executable, "-c", _FD_PROBE, str(repo), str(free_below_10)],
                     capture_output=True, text=True, timeout=60,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout == "ok\nagain\n"


def test_sandboxes_from_many_threads(repo, tmp_path):
  import concurrent.futures
  import shutil

  def work(i):
    tree = tmp_path / f"tree{i}"
    shutil.copytree(repo, tree)
    for _ in range(5):
      with BwrapSandbox(str(tree), support.limits(command_timeout=10)) as sb:
        assert sb.run(f"echo {i}").output == f"{i}\n"
    return i

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    assert sorted(pool.map(work, range(4))) == [0, 1, 2, 3]
