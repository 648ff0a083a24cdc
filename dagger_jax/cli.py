"""`dagger-jax <verb> [--config FILE[:arg]] [--config.key=value ...] [verb options]`.

Thin on purpose: it parses flags, loads and validates the config, and calls the verb's library
function `fn(args, config) -> int`. Tests call the same functions. Verb modules are imported
lazily, so `--help` is instant and a verb's heavy imports (JAX, docker) cost only that verb.

A verb is registered below as `"module:function"`, the function living in its room's `cli.py`;
the module may also define `function_args(parser)` to add its own argparse options.

Errors: an expected failure (bad config value, missing or malformed file, missing tool,
unreachable server) is a `dagger_jax.errors.DaggerJaxError` raised by the library; `main`
catches it here, once, prints `dagger-jax VERB: MESSAGE` as one line on stderr and returns 2,
with no traceback. Bad options are argparse's (usage and exit 2). Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from dagger_jax import configlib, hostmem
from dagger_jax.errors import DaggerJaxError, UsageError

# (words) -> ("module:function", one-line help)
VERBS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("dagger_jax.dagger.cli:demo",
                "Run the complete small DAgger experiment on CPU (what `make demo` runs)."),
    ("pretrain",): ("dagger_jax.dagger.cli:pretrain",
                    "Build the demo student's base model from exploration transcripts (no labels)."),
    ("dagger",): ("dagger_jax.dagger.cli:dagger",
                  "Run DAgger rounds: collect -> aggregate -> train -> sync weights -> evaluate."),
    ("train",): ("dagger_jax.train.cli:train",
                 "Train the student by SFT on one or more shard directories."),
    ("plan",): ("dagger_jax.train.cli:plan",
                "Memory and step-time plan of a training config on a mesh; allocates nothing."),
    ("import-hf",): ("dagger_jax.model.cli:import_hf",
                     "Convert a HF Qwen3 checkpoint directory into an Orbax checkpoint."),
    ("export-hf",): ("dagger_jax.model.cli:export_hf",
                     "Export an Orbax checkpoint to a HF directory (safetensors + config.json)."),
    ("generate",): ("dagger_jax.policies.cli:generate",
                    "Sample from a checkpoint with the in-process JAX KV-cache sampler."),
    ("serve",): ("dagger_jax.policies.cli:serve",
                 "Serve a checkpoint over HTTP: SGLang's /generate API and OpenAI's chat API."),
    ("shards", "build"): ("dagger_jax.data.cli:shards_build",
                          "Render trajectories (JSONL) into numpy token shards."),
    ("shards", "inspect"): ("dagger_jax.data.cli:shards_inspect",
                            "Print a shard's manifest figures and one decoded row."),
    ("import-trajectories",): ("dagger_jax.data.cli:import_trajectories",
                               "Convert mini-swe-agent trajectory files into teacher records."),
    ("tasks", "generate"): ("dagger_jax.envs.cli:tasks_generate",
                            "Generate SWE tasks (toy repos, or bugs injected into a PyPI library)."),
    ("tasks", "validate"): ("dagger_jax.envs.cli:tasks_validate",
                            "Check that each gold patch resolves its task and the empty patch does not."),
    ("env", "exec"): ("dagger_jax.envs.cli:env_exec",
                      "Run one command in a fresh sandbox of a task; print the agent's observation."),
}

CONFIG_HELP = (
    "--config FILE[:arg]     ml-collections config file (default: configs/demo.py)\n"
    "--config.a.b=value      override one config value (e.g. --config.train.lr=3e-4)")


def _usage() -> str:
  lines = ["usage: dagger-jax <verb> [--config FILE[:arg]] [--config.key=value ...] [options]",
           "", "verbs:"]
  for words, (_, help_) in VERBS.items():
    lines.append(f"  {' '.join(words):<20} {help_}")
  lines += ["", "every verb takes:", *("  " + l for l in CONFIG_HELP.splitlines()),
            "", "`dagger-jax <verb> --help` lists that verb's options."]
  return "\n".join(lines)


def _split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates --config / --config.* flags (for absl) from the verb's own options."""
  config_args, rest = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" or (a.startswith("--config.") and "=" not in a):
      if i + 1 >= len(argv):
        raise UsageError(f"{a} needs a value")
      config_args += [a, argv[i + 1]]
      i += 2
      continue
    if a.startswith("--config=") or a.startswith("--config."):
      config_args.append(a)
    else:
      rest.append(a)
    i += 1
  return config_args, rest


def _config_message(e: Exception, path: str, config_args: Sequence[str]) -> str:
  """absl / ml-collections' message for a bad override, as one line naming the flag."""
  in_file = configlib.config_file_error(str(e))  # the config file itself raised
  if in_file:
    return in_file
  message = " ".join(str(e).replace("\\'", "'").replace("\\n", " ").split())
  if isinstance(e, AttributeError):  # "lrr' Did you mean "lr" instead of "lrr"?"
    key = message.strip("'\"").split("'")[0]
    flag = next((a.split("=")[0] for a in config_args
                 if a.split("=")[0].endswith("." + key)), key)
    suggestion = re.search(r'Did you mean "([^"]+)"', message)
    hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
    return f"{flag}: {path} has no such key{hint}"
  return message.removeprefix("flag ")


def load_config(config_args: Sequence[str]):
  """Parses --config / overrides with ml_collections.config_flags; validates; returns the config.

  Raises `ConfigError` naming the file or the flag when either is wrong."""
  values = flags.FlagValues()
  spec = next((a.split("=", 1)[1] for a in config_args if a.startswith("--config=")), None)
  if spec is None and "--config" in config_args:
    spec = config_args[config_args.index("--config") + 1]
  path = (spec or configlib.DEFAULT_CONFIG).split(":")[0]
  if not os.path.isfile(path):
    raise configlib.ConfigError(f"--config {path}: no such config file")
  configlib.ensure_configs_importable(path)
  try:
    # sys_argv tells config_flags which `--config.a.b` overrides to define as flags.
    config_flags.DEFINE_config_file("config", default=configlib.DEFAULT_CONFIG,
                                    flag_values=values, lock_config=True,
                                    sys_argv=["dagger-jax", *config_args])
    values(["dagger-jax", *config_args])
    config = values.config
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    raise configlib.ConfigError(f"bad config ({' '.join(config_args) or 'defaults'}): "
                                f"{_config_message(e, path, config_args)}") from None
  configlib.validate(config)
  return config


def _group_help(group: str) -> str:
  subs = [w for w in VERBS if w[0] == group]
  return "\n".join([f"usage: dagger-jax {group} {{{','.join(w[1] for w in subs)}}} [options]", "",
                    *(f"  {w[1]:<10} {VERBS[w][1]}" for w in subs), "",
                    f"`dagger-jax {group} VERB --help` for a verb's options."])


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one verb; an expected failure (`DaggerJaxError`) prints one line and exits 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  words = next((tuple(argv[:n]) for n in (2, 1) if tuple(argv[:n]) in VERBS), None)
  if words is None:
    if argv[0] in {w[0] for w in VERBS if len(w) > 1}:
      if argv[1:2] in (["-h"], ["--help"], ["help"]):
        print(_group_help(argv[0]))
        return 0
      print(f"dagger-jax {argv[0]}: choose a verb\n\n{_group_help(argv[0])}", file=sys.stderr)
    else:
      print(f"dagger-jax: unknown verb {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  prog = "dagger-jax " + " ".join(words)
  target, help_ = VERBS[words]
  module_name, fn_name = target.split(":")
  hostmem.keep_host_memory()  # before any verb starts the JAX backend (see hostmem.py)
  module = importlib.import_module(module_name)
  fn = getattr(module, fn_name)
  parser = argparse.ArgumentParser(
      prog=prog, description=help_,
      epilog="config flags:\n" + CONFIG_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_args = getattr(module, fn_name + "_args", None)
  if add_args is not None:
    add_args(parser)
  try:
    config_args, rest = _split_config_args(argv[len(words):])
    if any(a == "--workdir" or a.startswith("--workdir=") for a in rest):
      raise UsageError("the run directory is a config key: write --config.workdir=DIR, "
                       "not --workdir DIR")
    args = parser.parse_args(rest)  # handles --help / bad options before any work
    config = load_config(config_args)
    if os.environ.get("DAGGER_JAX_MULTIHOST") == "1":  # set by launch/tpu.sh and launch/gpu.sh
      import jax  # heavy: imported here so that `--help` stays instant
      jax.distributed.initialize()
    return int(fn(args, config) or 0)
  except DaggerJaxError as e:
    message = " ".join(str(e).split()).removeprefix(f"{words[-1]}: ")
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
