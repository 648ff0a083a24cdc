"""Episodes spread over several docker engines (`config.env.docker_hosts`, envs/sandbox/engines.py).

The pool's rule (least loaded, round-robin on ties, a slot given back on close) is checked on its
own; then real episodes of the collector run over two engine URLs, and each container is seen
where it ran: on two URLs of this machine's engine (cheap), and on a second dockerd started on
its own socket and data root for the test (slow: it starts a daemon and copies the base image to
it). `ssh://` engines take the same path through the system `ssh`; there is no second machine
here to test one.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

import support
from configs import base
from dagger_jax import configlib
from dagger_jax.dagger import collector
from dagger_jax.envs import protocol
from dagger_jax.envs.sandbox import LABEL, SandboxError, engines, make_sandbox
from dagger_jax.envs.tasks import toy


def test_pool_takes_the_least_loaded_engine_round_robin_on_ties():
  pool = engines.EnginePool(("a", "b", "c"))
  assert [pool.acquire() for _ in range(4)] == ["a", "b", "c", "a"]
  pool.release("b")
  pool.release("c")
  assert pool.acquire() == "b"  # b and c have none; b comes first after the last pick (a)
  assert pool.acquire() == "c"
  assert pool.live == {"a": 2, "b": 1, "c": 1} and pool.started == {"a": 2, "b": 2, "c": 2}
  pool.release("a")
  pool.release("a")
  pool.release("a")  # one release too many never goes below zero
  assert pool.live["a"] == 0 and pool.acquire() == "a"


def test_pool_is_shared_per_list_of_engines():
  assert engines.pool_for(("x", "y")) is engines.pool_for(["x", "y"])
  assert engines.pool_for(("x", "y")) is not engines.pool_for(("y", "x"))


@pytest.mark.parametrize("hosts,ok", [
    ((), True),
    (("unix:///var/run/docker.sock", "ssh://me@box2", "tcp://10.0.0.3:2376"), True),
    (("unix:///var/run/docker.sock", "unix:///var/run/docker.sock"), False),  # twice
    (("box2",), False),  # no scheme
    (("ftp://box2",), False),
])
def test_config_checks_the_engine_urls(hosts, ok):
  c = base.get_config()
  c.env.docker_hosts = hosts
  if ok:
    configlib.validate(c)
  else:
    with pytest.raises(configlib.ConfigError, match="config.env.docker_hosts"):
      configlib.validate(c)


class _Watch:
  """Polls engines for this process's sandbox containers; remembers (engine label, where seen)."""

  def __init__(self, clients: dict[str, object]):
    self.clients = clients
    self.seen: set[tuple[str, str]] = set()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    label = f"{LABEL}.pid={os.getpid()}"
    while not self._stop.wait(0.05):
      for where, client in self.clients.items():
        try:
          for c in client.api.containers(all=True, filters={"label": label}):
            self.seen.add((c["Labels"].get(f"{LABEL}.engine", ""), where))
        except Exception:  # a container removed while listed
          pass

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _collect_on(hosts: tuple[str, ...], n: int = 4):
  """n toy episodes, all in flight at once, over `hosts`; each holds its container ~1 s."""
  config = support.config(in_flight=n, env_workers=n, sandbox="docker", docker_hosts=hosts,
                          max_turns=2)
  student = support.Scripted(support.command(f"sleep 1; echo {protocol.SUBMIT_SENTINEL}"))
  return collector.collect(toy.generate(n, seed=41), config=config, round_index=0, beta=0.0,
                           teacher=None, student=student, grade=False, progress=False)


LOCAL = ("unix:///var/run/docker.sock", "unix:///run/docker.sock")  # one engine, two URLs


@pytest.mark.docker
def test_episodes_land_on_every_engine_of_the_list():
  from dagger_jax.envs.sandbox import docker_client
  pool = engines.pool_for(LOCAL)
  started = dict(pool.started)
  with _Watch({"local": docker_client()}) as watch:
    trajs, stats = _collect_on(LOCAL)
  assert stats.episodes == 4 and stats.submitted == 4 and stats.failed == 0, stats.summary()
  assert {engine for engine, _ in watch.seen} == set(LOCAL)
  assert {h: pool.started[h] - started[h] for h in LOCAL} == {h: 2 for h in LOCAL}
  assert pool.live == {h: 0 for h in LOCAL}  # every lease given back when the episodes closed


@pytest.mark.docker
def test_a_sandbox_that_cannot_start_gives_its_engine_back():
  env = support.config(sandbox="docker", docker_hosts=LOCAL).env
  pool = engines.pool_for(LOCAL)
  with pytest.raises(SandboxError, match="not found on unix://"):
    make_sandbox(env, image="dagger-jax/no-such-image:1")
  assert pool.live == {h: 0 for h in LOCAL}


def _link_exists(name: str) -> bool:
  return os.path.exists(f"/sys/class/net/{name}")


@contextlib.contextmanager
def _dockerd(d, name: str, net: int, *extra: str):
  """A dockerd on its own socket, data root (`d`/data), containerd namespace and network bridge
  (on 10.`net`.x.1/24), root only; yields its socket URL. Its own bridge, not `--bridge none`:
  with that, dockerd deletes the host's docker0 at start, which the first engine's containers
  need."""
  if os.geteuid() != 0 or shutil.which("dockerd") is None or shutil.which("ip") is None:
    pytest.skip("starting a second docker engine needs root, dockerd and ip")
  sock = f"unix://{d}/docker.sock"
  bridge = f"dj{name[:4]}{os.getpid() % 100000}"
  docker0 = _link_exists("docker0")
  subprocess.run(["ip", "link", "add", "name", bridge, "type", "bridge"], check=True)
  subprocess.run(["ip", "addr", "add", f"10.{net}.{os.getpid() % 250}.1/24",
                  "dev", bridge], check=True)
  log = open(d / "dockerd.log", "w")
  proc = subprocess.Popen(
      ["dockerd", "--host", sock, "--data-root", str(d / "data"), "--exec-root",
       str(d / "exec"), "--pidfile", str(d / "docker.pid"), "--bridge", bridge,
       "--iptables=false", "--ip-masq=false", "--containerd-namespace", f"dagger-jax-{name}",
       "--containerd-plugins-namespace", f"dagger-jax-{name}-plugins", *extra],
      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    deadline = time.monotonic() + 60
    while subprocess.run(["docker", "-H", sock, "info"], capture_output=True).returncode != 0:
      assert proc.poll() is None and time.monotonic() < deadline, (d / "dockerd.log").read_text()
      time.sleep(0.5)
    yield sock
  finally:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    shutil.rmtree(d / "data", ignore_errors=True)
  assert _link_exists("docker0") == docker0, "the engine removed the host's docker0"


@pytest.fixture(scope="module")
def second_engine(tmp_path_factory):
  with _dockerd(tmp_path_factory.mktemp("dockerd2"), "test2", 213) as sock:
    yield sock


@pytest.fixture(scope="module")
def quota_engine(tmp_path_factory):
  """A dockerd whose storage driver has a disk quota: btrfs, with quotas on, on a loop device
  (the kernel here has no xfs quota support, so overlay2 on xfs pquota cannot be made)."""
  if os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None:
    pytest.skip("a btrfs engine needs root and btrfs-progs (.ci/run installs it)")
  d = tmp_path_factory.mktemp("dockerd-btrfs")
  img, mnt = d / "btrfs.img", d / "mnt"
  mnt.mkdir()
  with open(img, "wb") as f:
    f.truncate(3 * 2**30)
  subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
  r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"cannot mount a loop device here: {r.stderr.strip()}")
  try:
    subprocess.run(["btrfs", "quota", "enable", str(mnt)], check=True, capture_output=True)
    with _dockerd(mnt, "btrfs", 214, "--storage-driver", "btrfs") as sock:
      yield sock
  finally:
    subprocess.run(["umount", str(mnt)], capture_output=True)  # frees the loop device too


@pytest.mark.slow
@pytest.mark.docker
def test_episodes_spread_over_two_engines(second_engine):
  from dagger_jax.envs.sandbox import docker_client, images
  hosts = ("unix:///var/run/docker.sock", second_engine)
  clients = {h: docker_client(h) for h in hosts}
  with _Watch(clients) as watch:
    trajs, stats = _collect_on(hosts)
  assert stats.episodes == 4 and stats.failed == 0, stats.summary()
  assert watch.seen == {(h, h) for h in hosts}  # each container on the engine its label names
  assert images.image_exists(images.BASE_TAG, clients[second_engine])  # copied there once


@pytest.mark.slow
@pytest.mark.docker
def test_an_engine_quota_bounds_the_container_files(quota_engine):
  """On an engine with a disk quota the sandbox asks for one (and does not poll): the files a
  command writes stop near `disk_mb` with "Disk quota exceeded", whatever the image's size
  (btrfs counts the image in the quota; docker._quota_mb adds it), deleting them works, and then
  writing does again."""
  from dagger_jax.envs.sandbox import DockerSandbox, docker_client, images
  images.ensure_base_image(docker_host=quota_engine)
  limits = support.limits(disk_mb=64, command_timeout=30)
  with DockerSandbox(images.BASE_TAG, limits=limits, docker_host=quota_engine) as sb:
    host = docker_client(quota_engine).api.inspect_container(sb.container_id)["HostConfig"]
    image_mb = docker_client(quota_engine).images.get(images.BASE_TAG).attrs["Size"] / 2**20
    assert int(host["StorageOpt"]["size"].rstrip("M")) == 64 + -(-int(image_mb * 2**20) // 2**20)
    assert not sb._disk_watch
    r = sb.run("for i in $(seq 1 12); do head -c 16M /dev/zero > /tmp/f$i || break; done; sync; "
               "du -sm /tmp | cut -f1")
    assert "Disk quota exceeded" in r.output, r.output
    written = int(r.output.split()[-1])
    assert 32 <= written <= 64, r.output
    assert sb.run("fallocate -l 1M /tmp/g").returncode != 0  # the quota or the profile
    assert sb.run("rm -f /tmp/f* && sync && echo freed").output == "freed\n"
    r = sb.run("head -c 16M /dev/zero > /tmp/h && du -sm /tmp | cut -f1")
    assert r.returncode == 0 and r.output.split()[-1] == "16", r.output
