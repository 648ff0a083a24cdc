"""The docker sandbox against the real engine, on the offline-built base image."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import support
from dagger_jax.envs import sandbox as sbx
from dagger_jax.envs.sandbox import DockerSandbox, ExecResult

pytestmark = pytest.mark.docker
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def image():
  from dagger_jax.envs.sandbox import images
  return images.ensure_base_image()  # built once (about a minute), then cached by tag


@pytest.fixture(scope="module")
def client():
  return sbx.docker_client()


def _exists(client, container_id) -> bool:
  import docker
  try:
    client.api.inspect_container(container_id)
    return True
  except docker.errors.NotFound:
    return False


def _wait_removed(client, container_id, seconds=30.0) -> bool:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if not _exists(client, container_id):
      return True
    time.sleep(0.2)
  return False


@pytest.fixture
def repo(tmp_path):
  d = tmp_path / "repo"
  d.mkdir()
  (d / "hello.py").write_text("print('hello')\n")
  return d


def test_base_image_has_the_toolchain(image, repo):
  with DockerSandbox(image, "/testbed", limits=support.limits(),
                     host_workdir_to_copy_in=str(repo)) as sb:
    r = sb.run("git --version && python3 --version && python3 -m pytest --version && patch -v")
  assert r.returncode == 0, r.output
  for tool in ("git version", "Python 3.11", "pytest", "GNU patch"):
    assert tool in r.output


def test_base_image_is_cached(image, client):
  t0 = time.monotonic()
  from dagger_jax.envs.sandbox import images
  assert images.ensure_base_image() == image
  assert time.monotonic() - t0 < 10  # found by tag, not rebuilt
  assert client.images.get(image).labels["dagger-jax.image"] == image


def test_exec_in_container(image, repo):
  with DockerSandbox(image, "/testbed", limits=support.limits(command_timeout=20),
                     host_workdir_to_copy_in=str(repo)) as sb:
    r = sb.run("pwd; python3 hello.py; echo err >&2; echo out; exit 3")
    assert r == ExecResult(3, "/testbed\nhello\nerr\nout\n", False, r.duration_s)
    assert sb.run("shopt -q login_shell && echo login").output == "login\n"
    sb.run("echo kept > /tmp/state")
    assert sb.run("cat /tmp/state").output == "kept\n"  # one container for the whole episode
    sb.write_file("pkg/new.py", b"x = 1\n")
    assert sb.run("cat pkg/new.py").output == "x = 1\n"
    assert sb.run("printf 'a\\xffb'").output == "a\ufffdb"
    assert sb.run("echo a\0b").output == "ab\n"


def test_container_limits_and_no_network(image, client):
  limits = support.limits(memory_mb=300, cpus=0.5, pids=40)
  with DockerSandbox(image, "/testbed", limits=limits) as sb:
    host = client.api.inspect_container(sb.container_id)["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["Memory"] == 300 * 2**20 and host["MemorySwap"] == 300 * 2**20
    assert host["NanoCpus"] == 5 * 10**8 and host["PidsLimit"] == 40
    from dagger_jax.envs.sandbox import seccomp
    assert host["SecurityOpt"] == [f"seccomp={seccomp.docker_profile_json()}"]
    r = sb.run("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=3)\"")
    assert r.returncode != 0 and "Network is unreachable" in r.output
    r = sb.run("python3 -c 'x = bytearray(600 * 1024 ** 2); x[::4096] = b\"x\" * len(x[::4096])';"
               " echo rc=$?")
    assert "rc=137" in r.output  # OOM-killed at the memory limit
    sb.write_file("spawn.py", b"import subprocess\nps = []\ntry:\n  for _ in range(100):\n"
                  b"    ps.append(subprocess.Popen(['sleep', '30']))\n"
                  b"except OSError:\n  print('refused')\nprint(len(ps))\n")
    r = sb.run("python3 spawn.py")
    assert r.output.startswith("refused") and int(r.output.split()[-1]) < 40


_UNISTD_64 = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"  # linux-libc-dev: names -> numbers
# Each syscall with zero arguments, then clone with each namespace flag (a child that the clone
# creates exits at once): one "name errno" line each.
_PROBE = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    def call(nr, *args):
      ctypes.set_errno(0)
      r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
      if r == 0 and nr == 56:
        os._exit(0)
      return ctypes.get_errno() if r == -1 else 0
    for arg in sys.argv[1:]:
      name, nr, flags = (arg.split(":") + ["0"])[:3]
      print(name, call(int(nr), int(flags), 0, 0, 0, 0, 0))
    """)


def test_engine_profile_refuses_what_it_lists(image, client):
  """The container's seccomp profile refuses each call it lists, by itself: the probe container
  has CAP_SYS_ADMIN (which the sandboxes never get), so no missing capability refuses in its
  place, and a control container with that capability and no profile gets further on the calls
  an agent would use to leave its container (a user namespace, the kernel keyring, fallocate)."""
  import platform
  from dagger_jax.envs.sandbox import seccomp
  if platform.machine() != "x86_64" or not os.path.exists(_UNISTD_64):
    pytest.skip(f"the probe takes syscall numbers from x86_64's {_UNISTD_64}")
  numbers = {}
  with open(_UNISTD_64) as f:
    for line in f:
      parts = line.split()
      if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("__NR_"):
        numbers[parts[1][5:]] = int(parts[2])
  listed = [n for names in seccomp.DOCKER_DENIED.values() for n in names]
  probes = [f"{n}:{numbers[n]}" for n in listed if n in numbers]
  assert len(probes) >= 45, probes  # a few are 32-bit only (vm86, stime, clock_settime64, ...)
  probes += [f"fallocate:{numbers['fallocate']}", f"clone3:{numbers['clone3']}"]
  probes += [f"clone_{k}:{numbers['clone']}:{v | signal.SIGCHLD}"
             for k, v in seccomp._CLONE_NEW.items()]
  profile = [f"seccomp={seccomp.docker_profile_json()}"]

  def run(security_opt, argv):
    out = client.containers.run(image, argv, cap_add=["SYS_ADMIN"], security_opt=security_opt,
                                network_mode="none", remove=True)
    return out.decode()

  got = dict(line.split() for line in run(profile, ["python3", "-c", _PROBE, *probes])
             .splitlines())
  want = {p.split(":")[0]: str(seccomp.EPERM) for p in probes}
  want.update(fallocate=str(seccomp.EOPNOTSUPP), clone3=str(seccomp.ENOSYS))
  assert got == want
  control = ["unshare -U true && echo userns",
             "python3 -c 'import ctypes; "
             f"exit(ctypes.CDLL(None).syscall({numbers['keyctl']}, 0, -3, 0) < 0)' "
             "&& echo keyring",
             "fallocate -l 1M /tmp/f && echo fallocate",
             "mount -t tmpfs none /mnt && echo mount"]
  script = "; ".join(control)
  assert run(["seccomp=unconfined"], ["bash", "-c", script]).split() == [
      "userns", "keyring", "fallocate", "mount"]
  assert run(profile, ["bash", "-c", script + "; true"]).split() == []


def test_timeout_kills_every_command_process(image):
  with DockerSandbox(image, "/testbed", limits=support.limits(command_timeout=1)) as sb:
    t0 = time.monotonic()
    r = sb.run("echo before; sleep 300 & setsid sleep 301 & sleep 302")
    assert r.timed_out and r.returncode == -9 and r.output == "before\n"
    assert time.monotonic() - t0 < 10
    r = sb.run("sleep 303 & echo bg")  # leftovers of a finished command are killed too
    assert r.output == "bg\n" and r.duration_s < 3
    left = sb.run("ps -eo args | grep -c '^sleep 30[0-3]'").output
    assert left.strip() == "0"


def test_output_cap(image):
  with DockerSandbox(image, "/testbed", limits=support.limits(max_output_chars=10_000)) as sb:
    r = sb.run("seq 1 1000000")
  full = "".join(f"{i}\n" for i in range(1, 1_000_001))
  assert r.output == full[:5000] + full[-5000:] and r.elided_chars == len(full) - 10_000


def test_removed_on_close_and_on_error(image, client):
  sb = DockerSandbox(image, limits=support.limits())
  cid = sb.container_id
  assert _exists(client, cid)
  sb.close()
  sb.close()
  assert _wait_removed(client, cid)
  with pytest.raises(RuntimeError, match="boom"):
    with DockerSandbox(image, limits=support.limits()) as sb:
      cid = sb.container_id
      raise RuntimeError("boom")
  assert _wait_removed(client, cid)


def _as_from_a_shell():
  """The child's signal state as a shell gives it: an ignored or blocked SIGINT is inherited
  through fork and exec, so one left by anything else in this test process would make the child
  deaf to the Ctrl-C under test (seen twice in full runs, never alone)."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_removed_on_ctrl_c(image, client):
  child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
      import sys
      sys.path.insert(0, "tests")
      import support
      from dagger_jax.envs.sandbox import DockerSandbox
      with DockerSandbox("dagger-jax/base:bookworm-py3", limits=support.limits()) as sb:
        print(sb.container_id, flush=True)
        sb.run("sleep 600", timeout=900)
      """)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=_as_from_a_shell)
  cid = child.stdout.readline().strip()
  assert cid and _exists(client, cid)
  time.sleep(1.0)
  child.send_signal(signal.SIGINT)
  try:
    _, err = child.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    child.kill()
    _, err = child.communicate()
    raise AssertionError(f"no exit 60 s after SIGINT; the child's stderr:\n{err[-3000:]}") from None
  assert "KeyboardInterrupt" in err
  assert _wait_removed(client, cid)


def test_orphans_of_a_killed_process_are_reaped(image, client):
  child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
      import sys
      import time
      sys.path.insert(0, "tests")
      import support
      from dagger_jax.envs.sandbox import DockerSandbox
      sb = DockerSandbox("dagger-jax/base:bookworm-py3", limits=support.limits())
      print(sb.container_id, flush=True)
      time.sleep(600)
      """)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
  cid = child.stdout.readline().strip()
  child.send_signal(signal.SIGKILL)  # no cleanup code runs
  child.wait()
  assert _exists(client, cid)
  assert cid in sbx.reap_orphan_containers(client)
  assert _wait_removed(client, cid)


def test_container_expires_by_itself(image, client):
  sb = DockerSandbox(image, limits=support.limits(), max_lifetime_s=2)
  cid = sb.container_id
  sb._finalizer.detach()  # pretend the owner vanished without cleaning up
  assert _wait_removed(client, cid, seconds=20)


def test_missing_image_is_a_clear_error():
  with pytest.raises(sbx.SandboxError, match="never pulled"):
    DockerSandbox("dagger-jax/no-such-image:1", limits=support.limits())
