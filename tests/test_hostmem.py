"""`hostmem.keep_host_memory`: XLA:CPU's per-call buffers stop being faulted in afresh."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# Each call returns a fresh 64 MiB array (above glibc's largest mmap threshold, 32 MiB). Kept
# memory still faults while the heap grows to its peak (a result may be freed only after the next
# call allocated), so the test looks at the median call after a few.
SCRIPT = r"""
import resource, statistics, sys
from dagger_jax import hostmem
kept = hostmem.keep_host_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(24):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, int(statistics.median(faults[4:])))
"""


def _median_faults_per_call(mode: str, **env) -> tuple[str, int]:
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                       check=True, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
  kept, faults = out.stdout.split()
  return kept, int(faults)


@pytest.fixture(scope="module")
def default_faults():
  """The control: with glibc's defaults each call maps its 64 MiB output afresh (16384 faults of
  4 KiB pages; fewer where transparent huge pages are always on)."""
  kept, faults = _median_faults_per_call("default")
  assert kept == "False"
  if faults < 1000:
    pytest.skip(f"this machine's default allocator faults only {faults} times per call")
  return faults


def test_kept_host_memory_is_reused_instead_of_faulted_in_again(default_faults):
  kept, faults = _median_faults_per_call("keep")
  assert kept == "True"
  assert faults < 200, (faults, default_faults)  # the output reuses an earlier call's pages


def test_environment_opts_out(default_faults):
  kept, faults = _median_faults_per_call("keep", DAGGER_JAX_MALLOC="system")
  assert kept == "False" and faults > default_faults / 2, (faults, default_faults)
