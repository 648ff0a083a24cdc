"""Rules by which the teacher takes over a student turn, so episodes stay productive.

Each rule looks at the student's proposed turn and the teacher's label for the same state and
returns True when the teacher's action should be executed instead (the turn is then recorded as
`actor="teacher", reason="intervention", intervention=<rule>`; the label is trained in place).

    repeat_command     the student proposes the command it ran last turn
    format_errors      the proposal is malformed and one more format error would end the episode
    premature_submit   the student submits while the teacher would not
"""

from __future__ import annotations

from typing import Callable, Sequence

from dagger_jax.envs import protocol
from dagger_jax.errors import ConfigError
from dagger_jax.policies.base import EpisodeView


def _last_command(view: EpisodeView) -> str | None:
  for m in reversed(view.messages):
    if m["role"] == "assistant":
      parsed = protocol.parse_action(m["content"])
      return parsed.command if parsed.ok else None
  return None


def _is_submit(command: str | None) -> bool:
  return command is not None and protocol.SUBMIT_SENTINEL in command


def repeat_command(view, proposal: str, label: str, env_config) -> bool:
  parsed = protocol.parse_action(proposal)
  return parsed.ok and parsed.command == _last_command(view)


def format_errors(view, proposal: str, label: str, env_config) -> bool:
  if protocol.parse_action(proposal).ok:
    return False
  errors = view.env.consecutive_format_errors if view.env is not None else 0
  return errors + 1 >= int(env_config.max_format_errors)


def premature_submit(view, proposal: str, label: str, env_config) -> bool:
  return (_is_submit(protocol.parse_action(proposal).command)
          and not _is_submit(protocol.parse_action(label).command))


RULES: dict[str, Callable[..., bool]] = {
    "repeat_command": repeat_command,
    "format_errors": format_errors,
    "premature_submit": premature_submit,
}


def check(names: Sequence[str], view: EpisodeView, proposal: str, label: str,
          env_config) -> str | None:
  """The first rule in `names` that fires, or None."""
  for name in names:
    if name not in RULES:
      raise ConfigError(f"config.dagger.interventions: unknown rule {name!r} "
                        f"(known: {', '.join(RULES)})")
    if RULES[name](view, proposal, label, env_config):
      return name
  return None
