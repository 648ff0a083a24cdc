"""beta_r: the probability that the teacher acts at a turn of round r.

    exponential   beta_r = beta0 * decay**r          (1, 0.5, 0.25, ... for beta0=1, decay=0.5)
    linear        beta_r = max(0, beta0 * (1 - r / (rounds - 1)))   (reaches 0 in the last round)
    constant      beta_r = beta0
"""

from __future__ import annotations

from typing import Any

from dagger_jax.errors import ConfigError


def beta(round_index: int, dagger_config: Any) -> float:
  kind, beta0 = dagger_config.beta_schedule, float(dagger_config.beta0)
  if round_index < 0:
    raise ValueError(f"round {round_index} < 0")
  if kind == "exponential":
    return beta0 * float(dagger_config.beta_decay) ** round_index
  if kind == "linear":
    rounds = int(dagger_config.rounds)
    return beta0 if rounds <= 1 else max(0.0, beta0 * (1 - round_index / (rounds - 1)))
  if kind == "constant":
    return beta0
  raise ConfigError(f"config.dagger.beta_schedule={kind!r}: not exponential, linear or constant")
