"""Test-wide set-up: 8 simulated CPU devices (set before JAX is imported) and hardware markers."""

import os
import shutil
import subprocess

# Must happen before `import jax` anywhere in the test process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def _backend_has(platform: str) -> bool:
  try:
    import jax
    return any(d.platform == platform for d in jax.devices(platform))
  except Exception:  # no such backend
    return False


def _docker_up() -> bool:
  if shutil.which("docker") is None:
    return False
  return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


def pytest_collection_modifyitems(config, items):
  need = {m: any(m in item.keywords for item in items) for m in ("gpu", "tpu", "docker")}
  have = {
      "gpu": need["gpu"] and os.environ.get("JAX_PLATFORMS") != "cpu" and _backend_has("gpu"),
      "tpu": need["tpu"] and os.environ.get("JAX_PLATFORMS") != "cpu" and _backend_has("tpu"),
      "docker": need["docker"] and _docker_up(),
  }
  why = {"gpu": "no GPU visible to JAX (set JAX_PLATFORMS=cuda on a GPU machine)",
         "tpu": "no TPU visible to JAX", "docker": "no docker engine answers `docker info`"}
  for item in items:
    for marker in ("gpu", "tpu", "docker"):
      if marker in item.keywords and not have[marker]:
        item.add_marker(pytest.mark.skip(reason=why[marker]))


@pytest.fixture(scope="session", autouse=True)
def _jax_backend_with_8_devices():
  """Starts JAX's backend once, with the 8 devices above, before any test runs: an in-process
  `dagger-jax plan --mesh fsdp=3` would otherwise set the CPU device count of the whole test
  process when it happens to run first (`plan.configure_cpu_devices`)."""
  import jax
  assert len(jax.devices()) == 8 or os.environ.get("JAX_PLATFORMS") != "cpu", jax.devices()
