"""Instance images: a task's repository at base_commit in /testbed, on the offline base image.

swebench 5's harness takes the image name from each dataset row (`image`), uses it when docker
has it locally and only otherwise pulls. So a locally built image plus a row from
`grading.to_swebench_instance(task, image)` is all `python -m swebench.harness.run_evaluation`
needs: nothing is built or pulled by the harness.

    >>> tag = build_instance_image(task)  # doctest: +SKIP
    'dagger-jax/task.toy__ledger-1a2b3c4d5e:0f9e8d7c6b5a'
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from dagger_jax.envs.sandbox import images
from dagger_jax.envs.tasks import materialize

INSTANCE_WORKDIR = "/testbed"


def instance_image_tag(task: dict) -> str:
  """A docker reference for the task (lower case; the tag pins base_commit)."""
  name = "".join(c if c.isalnum() or c in "._-" else "-" for c in task["instance_id"].lower())
  return f"dagger-jax/task.{name}:{task['base_commit'][:12]}"


def build_instance_image(task: dict, base_image: str | None = None, *,
                         rebuild: bool = False) -> str:
  """`docker build`s the task's instance image FROM the base image (once); returns its tag."""
  tag = instance_image_tag(task)
  if not rebuild and images.image_exists(tag):
    return tag
  base_image = base_image or images.ensure_base_image()
  with tempfile.TemporaryDirectory(prefix="dagger_jax_image_") as ctx:
    materialize(task, os.path.join(ctx, "testbed"))
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
      f.write(f"FROM {base_image}\n"
              f"COPY testbed {INSTANCE_WORKDIR}\n"
              f"WORKDIR {INSTANCE_WORKDIR}\n"
              f"LABEL dagger-jax.instance_id={task['instance_id']} "
              f"dagger-jax.base_commit={task['base_commit']}\n")
    p = subprocess.run(["docker", "build", "-q", "-t", tag, ctx], capture_output=True, text=True)
  if p.returncode != 0:
    raise RuntimeError(f"docker build of {tag} for {task['instance_id']} failed:\n"
                       f"{p.stderr.strip()[-2000:]}")
  return tag
