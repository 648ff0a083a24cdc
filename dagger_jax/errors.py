"""The one base of expected failures, and how the command line shows them.

An expected failure is one the user can fix: a bad config value, a missing or malformed file, a
missing tool, an unreachable server. The library raises a subclass of `DaggerJaxError` whose
message names the problem (the key, the file, the command) and, where there is one, the fix.
`dagger_jax.cli.main` catches it once, prints `dagger-jax VERB: MESSAGE` as one line on stderr
and exits 2, with no traceback. Any other exception is a bug and keeps its traceback.

Each room's error class (`ConfigError`, `ShardError`, `CheckpointError`, `SandboxError`, ...)
derives from `DaggerJaxError` and from the builtin it is closest to (`ValueError`,
`RuntimeError`), so library callers may catch either.
"""

from __future__ import annotations


class DaggerJaxError(Exception):
  """An expected failure; the message says what is wrong and how to fix it."""


class ConfigError(DaggerJaxError, ValueError):
  """A config value is invalid; the message names the key (`config.train.lr=-1.0: ...`)."""


class UsageError(DaggerJaxError, ValueError):
  """A command-line argument is missing or invalid; the message names the flag."""
