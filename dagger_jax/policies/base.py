"""What a policy is: something that acts, in batch, on in-flight episodes.

The collector shows each policy an `EpisodeView` per episode and gets one `Action` back per view
(`dagger_jax.data.trajectory.Action`: the text, and the exact token ids when the policy sampled
them). A student must return ids — they are trained on or kept in context exactly, never
re-tokenised. A teacher may return text only.

    views = [EpisodeView(task, messages, assistant_ids, env), ...]
    actions = policy.act(views)          # len(actions) == len(views)
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase

from dagger_jax.data import render
from dagger_jax.data.trajectory import Action
from dagger_jax.errors import DaggerJaxError


@dataclasses.dataclass
class EpisodeView:
  """One in-flight episode as a policy sees it.

  messages: the conversation so far (system, user, then assistant/user pairs); it ends with a
    user message, so the next message is the policy's.
  assistant_ids: per earlier assistant message, the exact content ids it was sampled as (None
    when a text-only teacher wrote it: the prompt then tokenises its text, as the renderer does).
  env: the episode's `SweEnv`. Only a privileged teacher (the oracle) looks at it; it must not
    change the working tree.
  episode_id: the collector's id of the episode (`collector.episode_id`); "" outside one.
  """
  task: dict
  messages: list[dict[str, str]]
  assistant_ids: list[tuple[int, ...] | None]
  env: Any = None
  episode_id: str = ""


def sampling_seed(seed: int, view: EpisodeView) -> int:
  """The seed of the tokens a sampling student draws for `view`'s next turn, in [0, 2**31): from
  the policy's seed, the episode and the turn, never from which other episodes share the call
  or how many calls came before. So a run draws the same tokens whatever the timing of its
  environments, and a resumed run, which plays its unfinished episodes again, draws what the
  uninterrupted one did. A view outside an episode (no `episode_id`) is keyed by its task."""
  episode = view.episode_id or str(view.task.get("instance_id", ""))
  digest = hashlib.blake2b(f"{seed}/{episode}/{len(view.assistant_ids)}".encode(),
                           digest_size=8).digest()
  return int.from_bytes(digest, "little") % (2 ** 31)


def student_prompts(views: Sequence[EpisodeView], tokenizer: PreTrainedTokenizerBase,
                    enable_thinking: bool, max_prompt_len: int | None) -> list[list[int]]:
  """Each view's prompt ids as a sampling student sees them: `render.prompt_ids` (earlier student
  turns as their exact ids), cut to the most recent `max_prompt_len` ids when it outgrows the
  model. Every student engine builds its prompts here, so they all see the same tokens."""
  prompts = [render.prompt_ids(v.messages, v.assistant_ids, tokenizer, enable_thinking)
             for v in views]
  return [p[-max_prompt_len:] for p in prompts] if max_prompt_len else prompts


def student_actions(outputs: Sequence[Sequence[int]], tokenizer: PreTrainedTokenizerBase
                    ) -> list[Action]:
  """The sampled ids of each row as an `Action`: the end-of-turn id that stopped it stripped
  (the trajectory contract), the text decoded from exactly those ids."""
  actions = []
  for ids in outputs:
    ids = list(ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids)
    actions.append(Action(tokenizer.decode(ids, skip_special_tokens=False), tuple(ids)))
  return actions


class LabelError(DaggerJaxError):
  """A policy could not act on one episode (a remote teacher's labels kept breaking the action
  protocol, or its endpoint kept failing after every retry). The collector ends that episode as
  failed with this message as the reason; the other episodes and the run go on."""


class Policy(abc.ABC):
  """Acts on a batch of episodes; one action per view, in order."""

  name: str = "policy"

  @abc.abstractmethod
  def act(self, views: Sequence[EpisodeView]) -> list[Action]:
    ...

  def reset_stats(self) -> dict[str, Any]:
    """What acting cost since the last call (e.g. a remote teacher's calls and tokens), then
    zeroed; the loop records it per round. Policies that cost nothing countable return {}."""
    return {}
