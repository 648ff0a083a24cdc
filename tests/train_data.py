"""A small real dataset for the trainer tests: bug-fix episodes through the real data pipeline.

Each episode is the oracle-style fix of a swapped operator in one function (run the tests, read
the file, fix with `sed`, rerun, submit). Some turns are student-acted with a differing teacher
label, so rows carry label branches. The demo BPE tokenizer is trained on the episodes' text and
`dagger_jax.data.shards.build_shards` renders and writes them, exactly as a DAgger round does.
"""

from __future__ import annotations

import os

from configs import base
from dagger_jax.data import shards, synthetic
from dagger_jax.data.tokenizer import load_tokenizer, train_demo_tokenizer
from dagger_jax.data.trajectory import Action, Trajectory, Turn
from dagger_jax.rundir import RunDir

FUNCTIONS = (("add", "+", "-"), ("sub", "-", "+"), ("mul", "*", "/"), ("div", "/", "*"))


def tiny_config(workdir: str):
  """The base config with a tiny model and short rows (the test / CI size)."""
  c = base.get_config()
  c.workdir = workdir
  c.model.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0)
  c.data.tokenizer = "demo-bpe"
  c.data.max_len = 384  # a whole episode per row (no split)
  c.train.update(batch_size=8, lr=3e-3, warmup_steps=5, steps=20, weight_decay=0.01,
                 log_every=5, checkpoint_every=5)
  return c


def _messages(name: str, good: str, bad: str, file: str, student: bool):
  """The episode's chat messages, its fix command, and the student's wrong command."""
  fix = f"```bash\nsed -i 's/a {bad} b/a {good} b/' {file} && python -m pytest -q\n```"
  wrong = "```bash\npython -m pytest -q\n```"  # the student re-runs the tests instead of fixing
  messages = [
      {"role": "system", "content": synthetic.CORPUS[-1]},
      {"role": "user", "content": f"Please solve this issue: {name}(6, 3) is wrong in {file}."},
      {"role": "assistant", "content": f"```bash\ngrep -n 'def {name}' {file}\n```"},
      {"role": "user", "content": f"<returncode>0</returncode>\n<output>\n3:def {name}(a, b):\n"
                                  f"4:    return a {bad} b\n</output>"},
      {"role": "assistant", "content": wrong if student else fix},
      {"role": "user", "content": "<returncode>0</returncode>\n<output>\n4 passed\n</output>"},
      {"role": "assistant", "content": "```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```"},
  ]
  return messages, fix, wrong


def _cases(round_: int):
  for k, (name, good, bad) in enumerate(FUNCTIONS):
    for j, file in enumerate(("src/calc.py", "lib/ops.py")):
      yield name, good, bad, file, (k + j + round_) % 2 == 1


def episodes(tok, round_: int) -> list[Trajectory]:
  """8 episodes; half have a student turn whose teacher label (the fix) becomes a branch."""
  out = []
  for name, good, bad, file, student in _cases(round_):
    messages, fix, wrong = _messages(name, good, bad, file, student)
    turns = [Turn("teacher", Action(messages[2]["content"]), None, "coin")]
    if student:
      ids = tuple(tok.encode(wrong, add_special_tokens=False))
      turns.append(Turn("student", Action(wrong, ids), Action(fix)))
    else:
      turns.append(Turn("teacher", Action(fix), None, "coin"))
    turns.append(Turn("teacher", Action(messages[6]["content"]), None, "coin"))
    out.append(Trajectory(f"{name}-{file}/r{round_}", f"{name}-{file}", round_, 0,
                          0.5 if student else 1.0, tuple(messages), tuple(turns)))
  return out


def build(workdir: str, config, rounds: int = 1) -> list[str]:
  """Trains the demo tokenizer into `<workdir>/tokenizer` and writes one shard per round."""
  texts = [m["content"] for case in _cases(0) for student in (False, True)
           for m in _messages(*case[:4], student)[0]]
  train_demo_tokenizer(list(synthetic.CORPUS) * 4 + texts, os.path.join(workdir, "tokenizer"),
                       vocab_size=config.model.vocab_size)
  tok = load_tokenizer(config.data, workdir=workdir)
  dirs = []
  for r in range(rounds):
    d = RunDir(workdir).shards(r)
    shards.build_shards(episodes(tok, r), tok, config.data, d, round=r)
    dirs.append(d)
  return dirs
