"""Where tasks come from: task files, Hugging Face datasets, per-instance images, held-out ids.

A task spec (`config.tasks.source`, `.train_file`, `.eval_file`) is one of

  PATH.jsonl | PATH.json | PATH.parquet   a SWE-bench-format tasks file (`load_tasks`);
  NAME[:SPLIT]                            a Hugging Face dataset through `datasets`, e.g.
                                          "SWE-Gym/SWE-Gym", "princeton-nlp/SWE-bench_Verified:test"
                                          (SPLIT defaults to "train" for training tasks and
                                          "test" for evaluation ones), or a local directory: one
                                          written by `Dataset(Dict).save_to_disk`, or a folder
                                          of data files as the Hub lays them out.

Hub rows carry no repository, only `instance_id`: unless it names its own `image`, such a row
runs in its per-instance docker image, named as swebench names them (`swebench_image_name`:
"swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest") in a registry namespace that can
be changed, or by a template for registries that spell ids their own way. SWE-Gym's images
(OpenHands' naming) write `__` as `_s_`, not `_1776_`, so a namespace alone does not find them:
the "swe-gym" preset does.

SWE-bench Verified is the paper's held-out evaluation set. `refuse_held_out` refuses training
tasks whose ids are in it (the 500 ids ship in `swe_bench_verified_ids.txt`, so the check needs no
network) or among the run's own evaluation tasks. Evaluation tasks are never checked: evaluating
on Verified is what it is for.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
from typing import Callable, Iterable

from dagger_jax.envs import tasks as T
from dagger_jax.errors import ConfigError

TASK_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
VERIFIED_IDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "swe_bench_verified_ids.txt")
# Registries that do not follow swebench's naming. SWE-Gym's instance images (built by OpenHands,
# on Docker Hub under xingyaoww/) write the id's `__` as `_s_`.
IMAGE_PRESETS = {"swe-gym": "xingyaoww/sweb.eval.x86_64.{id_s}:latest"}
TEMPLATE_FIELDS = ("instance_id", "repo", "docker_id", "id_s")
_NAMESPACE_RE = re.compile(r"[a-z0-9][a-z0-9._-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)*")
_SPLIT_RE = re.compile(r"[\w.-]+(\[[\w%:+-]*\])?")


# ----------------------------------------------------------------------------------------------
# Per-instance images


def swebench_image_name(instance_id: str, namespace: str = "swebench", tag: str = "latest") -> str:
  """swebench's own name for an instance's image (x86_64, the arch all published images have).

  swebench 5 names images in `image_builder.image_spec.ImageSpec.name`; swebench 4 in
  `TestSpec.instance_image_key`. Both give "{namespace}/sweb.eval.x86_64.{id}:{tag}", lower
  case, with `__` written `_1776_` (Docker Hub forbids dunders).
  """
  try:
    from swebench.image_builder.image_spec import ImageSpec  # swebench >= 5
  except ImportError:
    from types import SimpleNamespace

    from swebench.harness.test_spec.test_spec import TestSpec  # swebench 4
    spec = SimpleNamespace(arch="x86_64", instance_id=instance_id, instance_image_tag=tag,
                           namespace=namespace, is_remote_image=True)
    return TestSpec.instance_image_key.fget(spec)
  # The name does not depend on the Dockerfile; ImageSpec only insists that there is one.
  return ImageSpec(instance_id=instance_id, dockerfile="(name only)", namespace=namespace,
                   tag=tag, arch="amd64").name


def template_fields(record: dict) -> dict[str, str]:
  """The fields an image or repo template may use (see `image_namer`)."""
  iid = str(record.get("instance_id", ""))
  return dict(instance_id=iid, repo=str(record.get("repo", "")),
              docker_id=iid.lower().replace("__", "_1776_"),
              id_s=iid.lower().replace("__", "_s_"))


def images_spec_error(spec: str) -> str:
  """Why `spec` is not a valid image naming ("" when it is)."""
  if not spec or spec in IMAGE_PRESETS:
    return ""
  if "{" in spec:
    try:
      names = {f for _, f, _, _ in string.Formatter().parse(spec) if f is not None}
    except ValueError as e:
      return f"not a valid template ({e})"
    unknown = sorted(names - set(TEMPLATE_FIELDS))
    if unknown:
      return (f"unknown template field(s) {unknown} (known: "
              f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)})")
    return ""
  if not _NAMESPACE_RE.fullmatch(spec):
    return ("not a registry namespace (lower case, e.g. 'swebench' or 'docker.io/me'), a "
            f"template with {{instance_id}}-style fields, or a preset ({', '.join(IMAGE_PRESETS)})")
  return ""


def image_namer(spec: str) -> Callable[[dict], str] | None:
  """How rows without a repository source get their `image`, from an image naming spec:

    ""                   none (such rows are refused);
    a preset             "swe-gym": "xingyaoww/sweb.eval.x86_64.{id_s}:latest";
    a template           with fields {instance_id}, {repo}, {docker_id} (swebench's spelling:
                         lower case, `__` -> `_1776_`) and {id_s} (OpenHands': `__` -> `_s_`);
    a namespace          swebench's naming in that registry namespace: "swebench" (Docker Hub's
                         official images), "ghcr.io/me/swebench", "localhost:5000/sweb".
  """
  why = images_spec_error(spec)
  if why:
    raise ConfigError(f"image naming {spec!r}: {why}")
  if not spec:
    return None
  template = IMAGE_PRESETS.get(spec, spec)
  if "{" in template:
    return lambda record: template.format(**template_fields(record))
  return lambda record: swebench_image_name(str(record["instance_id"]), namespace=spec)


# ----------------------------------------------------------------------------------------------
# Task specs


def is_task_file(spec: str) -> bool:
  return spec.endswith(TASK_FILE_SUFFIXES)


def split_spec(spec: str, default_split: str) -> tuple[str, str]:
  """("NAME", "SPLIT") of "NAME[:SPLIT]"; the split follows the first ':' after the last '/'
  (so "localhost:5000"-like names are not split, and "train[:100]" slices survive)."""
  head, slash, tail = spec.rpartition("/")
  name_tail, colon, split = tail.partition(":")
  if colon and _SPLIT_RE.fullmatch(split):
    return head + slash + name_tail, split
  return spec, default_split


def load(spec: str, *, key: str, default_split: str, images: str = "",
         repo_template: str = "") -> list[dict]:
  """The tasks `spec` names (see the module docstring); `key` names it in errors
  ("config.tasks.train_file"). `images` / `repo_template` give rows without a repository source
  an image (`image_namer`) or a local clone (`repo_template` wins when both are set)."""
  if not spec:
    raise ConfigError(f"{key} is empty: give a tasks file or a Hugging Face dataset name")
  if is_task_file(spec):
    if not os.path.isfile(spec):
      raise ConfigError(f"{key}={spec}: no such file")
    return T.load_tasks(spec, image_template=images, repo_template=repo_template)
  name, split = split_spec(spec, default_split)
  rows = load_dataset_rows(name, split, what=f"{key}={spec}")
  records = [(f"{name}:{split}[{i}]", row) for i, row in enumerate(rows)]
  return T.tasks_from_records(records, f"{name}:{split}", image_template=images,
                              repo_template=repo_template)


def load_dataset_rows(name: str, split: str, *, what: str) -> list[dict]:
  """The rows of a Hugging Face dataset split (or of a local copy) as plain JSON-able dicts."""
  try:
    import datasets
  except ImportError:
    raise ConfigError(f"{what}: reading a Hugging Face dataset needs the `datasets` package "
                      "(pip install datasets), or give a .jsonl / .json / .parquet file") from None
  if os.path.isfile(os.path.join(name, "dataset_dict.json")) or os.path.isfile(
      os.path.join(name, "dataset_info.json")):  # written by save_to_disk
    ds = datasets.load_from_disk(name)
    if isinstance(ds, datasets.DatasetDict):
      if split not in ds:
        raise ConfigError(f"{what}: the saved dataset {name} has no split {split!r} "
                          f"(it has {', '.join(ds)}); write NAME:SPLIT")
      ds = ds[split]
  else:
    try:
      ds = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as e:  # ConnectionError, not found, no data files, no split
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConfigError(
          f"{what}: cannot load the Hugging Face dataset {name!r}, split {split!r}: {first}. "
          f"Offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1) only datasets already in the "
          f"cache ({datasets.config.HF_DATASETS_CACHE}) load: run `python -c \"import datasets; "
          f"datasets.load_dataset('{name}', split='{split}')\"` once with network, or give a "
          f"local .parquet / .jsonl file instead") from None
  # Arrow may hand back timestamps or numpy values; tasks are JSON records (save_tasks).
  return [json.loads(json.dumps(dict(row), default=str)) for row in ds]


# ----------------------------------------------------------------------------------------------
# Held-out ids


@functools.cache
def verified_ids() -> frozenset[str]:
  """The 500 SWE-bench Verified instance ids (from the file beside this module)."""
  with open(VERIFIED_IDS_FILE, encoding="utf-8") as f:
    return frozenset(line.strip() for line in f if line.strip() and not line.startswith("#"))


def _some(ids: list[str], n: int = 10) -> str:
  more = f", ... ({len(ids)} in all)" if len(ids) > n else ""
  return ", ".join(ids[:n]) + more


def refuse_held_out(train_tasks: Iterable[dict], *, where: str, eval_tasks: Iterable[dict] = (),
                    allow: bool = False) -> None:
  """Refuses training tasks that are held out: SWE-bench Verified instances (the paper's
  evaluation set) or the run's own evaluation tasks. The check belongs to training (and the
  collection that feeds it), not to evaluation, where Verified ids are expected.

  `allow` (config.tasks.allow_held_out_training) lets them through, for a deliberate
  contamination study; the evaluation numbers of such a run are not held-out numbers.
  """
  if allow:
    return
  ids = [t["instance_id"] for t in train_tasks]
  fix = ("drop them from the training tasks, or set config.tasks.allow_held_out_training=True "
         "to train on them anyway (its held-out numbers then mean nothing)")
  verified = verified_ids()
  bad = [i for i in ids if i in verified]
  if bad:
    raise T.TaskError(f"{where}: {len(bad)} training task(s) are SWE-bench Verified instances, "
                      f"the held-out evaluation set: {_some(bad)}. Evaluate on them "
                      f"(config.tasks.eval_file), never train on them: {fix}")
  held = {t["instance_id"] for t in eval_tasks}
  bad = [i for i in ids if i in held]
  if bad:
    raise T.TaskError(f"{where}: {len(bad)} training task(s) are also evaluation tasks of this "
                      f"run: {_some(bad)}: {fix}")

