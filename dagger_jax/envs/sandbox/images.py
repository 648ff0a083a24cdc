"""Offline docker images for the sandboxes (images are never pulled).

`ensure_base_image()` returns the tag of a Debian bookworm image with bash, git, python3 and
python3-pytest. The first call builds it (`debootstrap --variant=minbase` from the Debian mirror
that apt is configured with, then `docker import`; about a minute, needs root); later calls, in
any process, find the tag and return at once. Concurrent callers wait on one file lock.

On another engine (`docker_host`, one of `config.env.docker_hosts`) the image is copied from the
local engine when that one has it (`docker save | docker -H ... load` through the API, ~10 s for
its 270 MB), else built here and imported there.

    >>> tag = ensure_base_image()  # doctest: +SKIP
    >>> tag
    'dagger-jax/base:bookworm-py3'
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import shutil
import subprocess
import tempfile

from dagger_jax.envs.sandbox.base import SandboxError
from dagger_jax.envs.sandbox.docker import docker_client

log = logging.getLogger(__name__)

BASE_TAG = "dagger-jax/base:bookworm-py3"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("git", "python3", "python3-pytest", "patch", "procps")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class ImageBuildError(SandboxError):
  """The base image could not be built; the message says why and what to do."""


def debian_mirror() -> str:
  """The Debian archive URL apt is configured with (deb822 `.sources` or `sources.list`)."""
  for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    with open(path) as f:
      for stanza in f.read().split("\n\n"):
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
        suites = fields.get("Suites", "").split()
        if fields.get("Types", "deb").split()[0] == "deb" and any(
            s in (BASE_SUITE, f"{BASE_SUITE}-updates") for s in suites):
          for uri in fields.get("URIs", "").split():
            if "security" not in uri:
              return uri.rstrip("/")
  for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
          if m and "security" not in m.group(1):
            return m.group(1).rstrip("/")
  return DEFAULT_MIRROR


def image_exists(tag: str, client=None) -> bool:
  import docker  # lazy: the optional docker SDK (see sandbox/docker.py)
  client = client or docker_client()
  try:
    client.images.get(tag)
    return True
  except docker.errors.ImageNotFound:
    return False


def ensure_base_image(tag: str = BASE_TAG, *, mirror: str | None = None,
                      docker_host: str | None = None) -> str:
  """Returns `tag`, building (or copying, see the module docstring) the image first when the
  engine `docker_host` (None: DOCKER_HOST / the local one) does not have it."""
  client = docker_client(docker_host)
  if image_exists(tag, client):
    return tag
  lock_path = os.path.join(tempfile.gettempdir(), "dagger-jax-image-build.lock")
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
    if not image_exists(tag, client):
      local = docker_client() if docker_host else None
      if local is not None and image_exists(tag, local):
        log.warning("copying docker image %s to %s", tag, docker_host)
        client.api.load_image(local.api.get_image(tag))
      else:
        build_base_image(tag, mirror=mirror or debian_mirror(), client=client)
  if not image_exists(tag, client):
    raise ImageBuildError(f"{tag} is still missing on {docker_host or 'the docker engine'} "
                          "after copying or building it")
  return tag


def build_base_image(tag: str, *, mirror: str, client=None) -> None:
  """debootstrap a minimal bookworm root with BASE_PACKAGES and `docker import` it as `tag`."""
  client = client or docker_client()
  if os.geteuid() != 0:
    raise ImageBuildError(
        f"building {tag} needs root (debootstrap); run once as root: `sudo python -c "
        "'from dagger_jax.envs.sandbox.images import ensure_base_image as e; e()'`")
  if shutil.which("debootstrap") is None:
    raise ImageBuildError(
        f"building {tag} needs debootstrap: `sudo apt-get install -y debootstrap`")
  work = tempfile.mkdtemp(prefix="dagger-jax-rootfs-")
  try:
    rootfs = os.path.join(work, "rootfs")
    log.warning("building docker image %s with debootstrap from %s (about a minute)", tag, mirror)
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
           BASE_SUITE, rootfs, mirror]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
      tail = "\n".join((p.stdout + p.stderr).splitlines()[-15:])
      raise ImageBuildError(f"`{' '.join(cmd)}` failed (exit {p.returncode}):\n{tail}")
    for junk in glob.glob(os.path.join(rootfs, "var/cache/apt/archives/*.deb")):
      os.remove(junk)
    shutil.rmtree(os.path.join(rootfs, "var/lib/apt/lists"), ignore_errors=True)
    tar_path = os.path.join(work, "rootfs.tar")
    subprocess.run(["tar", "--numeric-owner", "-C", rootfs, "-cf", tar_path, "."], check=True)
    repository, _, version = tag.partition(":")
    client.api.import_image_from_file(
        tar_path, repository=repository, tag=version or "latest",
        changes=["ENV LANG=C.UTF-8",
                 "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "WORKDIR /", 'CMD ["bash"]', f"LABEL dagger-jax.image={tag}"])
    if not image_exists(tag, client):
      raise ImageBuildError(f"docker import of {tag} reported no error but the image is missing")
  finally:
    shutil.rmtree(work, ignore_errors=True)
