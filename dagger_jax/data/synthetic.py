"""Synthetic DAgger trajectories for tests and benchmarks (random text, real tokenizer, real record).

    traj = random_trajectory(np.random.default_rng(0), tokenizer, turns=30, obs_tokens=300,
                             action_tokens=60, student_fraction=0.5, disagree_fraction=1.0)

Texts are decoded from random ordinary token ids and then re-encoded, so every recorded id list is
the tokenizer's own encoding of its text (the student's "sampled" ids are exactly what the row
must keep). Lengths are approximate (within the jitter) because decode/encode may merge tokens.
"""

from __future__ import annotations

import numpy as np

from dagger_jax.data.trajectory import Action, Outcome, Trajectory, Turn

CORPUS = (
    "def add(a, b):\n    return a + b\n",
    "```bash\ncd /repo && python -m pytest tests/test_core.py -x -q\n```",
    "```bash\nsed -i 's/return a - b/return a + b/' src/calc.py && git diff\n```",
    "<returncode>0</returncode>\n<output>\n3 passed in 0.02s\n</output>",
    "<returncode>1</returncode>\n<output>\nAssertionError: assert 1 == 2\n</output>",
    "THOUGHT: the test fails because add subtracts. Fix the operator, then rerun the tests.",
    "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT",
    "Please solve this issue: calling add(1, 1) returns 0 instead of 2 in src/calc.py.",
    "diff --git a/src/calc.py b/src/calc.py\n--- a/src/calc.py\n+++ b/src/calc.py\n",
    "You are a helpful assistant that can interact with a computer shell to solve problems.",
)


def _text(rng: np.random.Generator, tokenizer, n: int) -> tuple[str, tuple[int, ...]]:
  special = set(tokenizer.all_special_ids)
  ordinary = np.array([i for i in range(len(tokenizer)) if i not in special])
  text = ""
  while not text:  # stripped: a leading space or newline could merge with the template's glue
    text = tokenizer.decode(rng.choice(ordinary, size=max(n, 1)).tolist()).strip()
    # Random ids re-encode into more tokens than were drawn: cut back to about n.
    text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:n]).strip()
  ids = tuple(tokenizer.encode(text, add_special_tokens=False))
  return text, ids


def random_trajectory(rng: np.random.Generator, tokenizer, turns: int = 6, obs_tokens: int = 40,
                      action_tokens: int = 12, student_fraction: float = 0.5,
                      disagree_fraction: float = 1.0, unlabeled_fraction: float = 0.0,
                      jitter: float = 0.5, id: str = "synthetic", round: int = 0) -> Trajectory:
  """A trajectory with `turns` assistant turns; each turn is student-acted with probability
  `student_fraction`; a student turn is unlabelled with probability `unlabeled_fraction`, else its
  label differs with probability `disagree_fraction` (else equals the student's action)."""

  def length(n):
    return int(rng.integers(max(1, int(n * (1 - jitter))), int(n * (1 + jitter)) + 2))

  messages = [{"role": "system", "content": CORPUS[-1]},
              {"role": "user", "content": _text(rng, tokenizer, length(obs_tokens))[0]}]
  record = []
  for k in range(turns):
    text, ids = _text(rng, tokenizer, length(action_tokens))
    if rng.random() < student_fraction:
      if rng.random() < unlabeled_fraction:
        label = None
      elif rng.random() < disagree_fraction:
        label = Action(*_text(rng, tokenizer, length(action_tokens)))
      else:
        label = Action(text, ids)
      record.append(Turn("student", Action(text, ids), label))
    else:
      record.append(Turn("teacher", Action(text, ids), None, "coin"))
    messages.append({"role": "assistant", "content": text})
    if k < turns - 1:
      messages.append({"role": "user", "content": _text(rng, tokenizer, length(obs_tokens))[0]})
  n_teacher = sum(t.actor == "teacher" or t.label is not None for t in record)
  return Trajectory(id=id, task_id="synthetic", round=round, seed=int(rng.integers(1 << 30)),
                    beta=1.0 - student_fraction, messages=tuple(messages), turns=tuple(record),
                    outcome=Outcome(submitted=False, turns=turns, teacher_calls=n_teacher))
