"""The student acting in-process: the chat prompt as token ids -> the JAX KV-cache sampler.

The prompt a student sees at turn k is token-for-token the prefix its training row will have
(`data.render`): the chat template's text between assistant contents is tokenised, and earlier
assistant contents are their exact sampled ids (text-only teacher turns are tokenised, as the
renderer does). So what is trained is exactly what was seen.

    policy = JaxPolicy(model, tokenizer, config.sampler, enable_thinking=False)
    actions = policy.act(views)        # Action(text, ids) per view; ids without the end-of-turn
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from transformers import PreTrainedTokenizerBase

from dagger_jax.data.trajectory import Action
from dagger_jax.model import sampler
from dagger_jax.model.qwen3 import Qwen3
from dagger_jax.policies.base import (EpisodeView, Policy, sampling_seed, student_actions,
                                      student_prompts)


class JaxPolicy(Policy):
  """The student's params, sampled in-process in one batch per `act` call."""

  name = "student"

  def __init__(self, model: Qwen3, tokenizer: PreTrainedTokenizerBase, sampler_config: Any,
               *, enable_thinking: bool = False, seed: int = 0, max_prompt_len: int | None = None,
               mesh: Mesh | None = None):
    self.model = model
    self.tokenizer = tokenizer
    self.config = sampler_config
    self.enable_thinking = enable_thinking
    self.seed = seed
    self.max_prompt_len = max_prompt_len
    # The rollout mesh the params were resharded onto (`config.rollout.mesh`): sampling under it
    # splits batch rows and the KV cache over `data` (model/reshard.py). None: as placed.
    self.mesh = mesh
    entries = int(sampler_config.prefix_cache)
    # Keys and values of each episode's conversation so far: a turn prefills only what it adds.
    # A policy holds one set of params, so its cache never goes stale.
    self.prefix_cache = sampler.PrefixCache(entries) if entries > 0 else None

  def act(self, views: Sequence[EpisodeView]) -> list[Action]:
    if not views:
      return []
    prompts = student_prompts(views, self.tokenizer, self.enable_thinking, self.max_prompt_len)
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      result = self._generate(prompts, views)
    return student_actions(result.tokens, self.tokenizer)

  def _generate(self, prompts, views) -> sampler.SampleResult:
    c = self.config
    return sampler.generate(
        self.model, prompts, int(c.max_new_tokens), temperature=float(c.temperature),
        top_p=float(c.top_p), top_k=int(c.top_k), stop_token_ids=(self.tokenizer.eos_token_id,),
        seed=0, row_seeds=[sampling_seed(self.seed, v) for v in views],
        length_buckets=tuple(c.length_buckets),
        prefix_cache=self.prefix_cache,
        cache_keys=[_episode_key(v) for v in views] if self.prefix_cache is not None else None,
        vocab_limit=min(len(self.tokenizer), self.model.config.vocab_size))


def _episode_key(view: EpisodeView):
  """Which prefix-cache entry a view's conversation continues: its environment (one per
  episode), else its task. Only a hint: the cache reuses the longest common prefix of ids."""
  return ("env", id(view.env)) if view.env is not None else ("task", view.task.get("instance_id"))
