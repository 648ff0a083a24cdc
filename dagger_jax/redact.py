"""Secrets out of what a run writes: run.json, logs, error messages, trajectories.

API keys come from environment variables that the config names (`config.teacher.api_key_env`,
`config.rollout.api_key_env`, `dagger-jax serve --api-key-env`), never from config values, and the
clients send them only as `Authorization: Bearer KEY`. What is redacted here is what a key may
still reach a file through: a config value someone wrote a key into (a URL's `user:key@`, an
`sk-...` string, a launch command's `--api-key KEY`), and a server's error text that echoes one.

    redact_text("http://u:sk-abcdefgh1234@h/v1 --api-key k1 Bearer xyz")
    # 'http://***@h/v1 --api-key *** Bearer ***'
    redact_tree(config_dict, config_secrets(config))   # strings anywhere in a JSON value
    display_url("https://u:p@host:8000/v1")            # 'https://host:8000/v1'

The patterns are a net for mistakes, not a guarantee: a key that looks like nothing here is
redacted only where its value is known (`secrets=`, e.g. `config_secrets(config)`).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Any, Iterable

from dagger_jax.errors import ConfigError

MASK = "***"
MIN_SECRET_LEN = 6  # a known secret shorter than this is not searched for (it would mask words)

_PATTERNS = (
    # userinfo with a password in a URL: scheme://user:password@host -> scheme://***@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@:'\"]*:[^\s/@'\"]*@"), r"\1" + MASK + "@"),
    # an Authorization header's credentials
    (re.compile(r"\b(Bearer|Authorization:\s*Basic)\s+[A-Za-z0-9._~+/=-]{4,}", re.I),
     r"\1 " + MASK),
    # a command-line flag that takes a secret (not --api-key-env, which takes a variable's name)
    (re.compile(r"(--[\w-]*(?:api[-_]?key|secret|password|access[-_]?token|auth[-_]?token))"
                r"(=| +)(?!-)\S+", re.I), r"\1\2" + MASK),
    # key=value or "key": "value" where the key names a secret
    (re.compile(r"(\b[\w-]*(?:api[-_]?key|secret|password|access[-_]?token|auth[-_]?token)"
                r"[\"']?\s*[:=]\s*[\"']?)(?!\*\*\*)[^\s\"',}&]+", re.I), r"\1" + MASK),
    # tokens shaped like well-known API keys (OpenAI/Anthropic sk-, HF, GitHub, Google, Slack)
    (re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}|\bhf_[A-Za-z0-9]{20,}|"
                r"\b(?:gh[pousr]_|github_pat_)[A-Za-z0-9_]{20,}|\bAIza[0-9A-Za-z_-]{30,}|"
                r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), MASK),
)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
  """`text` with each known secret (of at least MIN_SECRET_LEN characters) and everything that
  looks like a credential (module doc) replaced by `***`."""
  for s in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True):
    text = text.replace(s, MASK)
  for pattern, replacement in _PATTERNS:
    text = pattern.sub(replacement, text)
  return text


def redact_tree(value: Any, secrets: Iterable[str] = ()) -> Any:
  """A JSON value (dicts, lists, scalars) with `redact_text` applied to every string in it."""
  secrets = tuple(secrets)
  if isinstance(value, str):
    return redact_text(value, secrets)
  if isinstance(value, dict):
    return {k: redact_tree(v, secrets) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [redact_tree(v, secrets) for v in value]
  return value


def display_url(url: str) -> str:
  """`url` without its user:password@ (never shown, logged or written)."""
  parts = urllib.parse.urlsplit(url)
  if parts.username is None and parts.password is None:
    return url
  host = parts.hostname or ""
  netloc = f"{host}:{parts.port}" if parts.port else host
  return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def key_from_env(config_key: str, name: str) -> str | None:
  """The API key in the environment variable `name` (the value of `config_key`); None when `name`
  is empty (a server that takes no key); ConfigError when the variable is unset or empty."""
  name = str(name or "").strip()
  if not name:
    return None
  key = os.environ.get(name, "")
  if not key:
    raise ConfigError(f"{config_key}={redact_text(name)!r}: the environment variable "
                      f"{redact_text(name)} is unset or empty; export it with the endpoint's API "
                      f"key, or set {config_key.rsplit('.', 1)[-1]}='' for a server that takes "
                      f"none")
  return key


def config_secrets(config: Any) -> list[str]:
  """The values of the environment variables that `config` names as holding API keys (set ones
  only): what `redact_text` must mask even where no pattern would find it."""
  out = []
  for section in ("teacher", "rollout"):
    name = str(getattr(getattr(config, section, None), "api_key_env", "") or "").strip()
    if name and os.environ.get(name):
      out.append(os.environ[name])
  return out
