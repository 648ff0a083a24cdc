"""`dagger-jax pretrain`: a base model for the CPU demo's student, built from no teacher labels.

    dagger-jax pretrain --config configs/demo.py --out assets/demo_base      # ~8 min on 2 cores

A real DAgger student starts from a pretrained language model that already copies from its
context (a name from the issue into `grep`, a file and line from `grep`'s answer into `nl`).
A ~1M-parameter student trained from random weights on a few hundred teacher episodes learns the
procedure but copies nothing (`README.md`, "The demo"). So the demo's student starts from a base
pretrained here on text that holds no teacher labels and no held-out task:

1. **Corpus.** `config.pretrain.repos` freshly generated `toy` repositories of the *train* split
   (seed `config.pretrain.seed`, not the demo's task seeds; a task's split is a hash of its
   content, so none is held out), each explored by `RandomExplorer` for up to
   `config.pretrain.turns` commands in the real sandbox: random `grep`s for functions of the
   repository, `nl | sed` of what grep found or of random lines, `cat`, the tests, random
   one-line edits and restores, with their real outputs. The explorer is not the teacher: its
   commands are random draws, the repository's functions in random order, edits on random lines
   with random replacements, and it never submits.
2. **Tokenizer.** The demo BPE (`data.tokenizer.train_demo_tokenizer`) trained on that corpus.
3. **Rows.** Each transcript rendered with the chat template and trained on *every* token (a
   language-model loss), cut into `config.data.max_len` pieces and packed.
   Before them, `config.pretrain.copy_steps` steps on rows that only copying predicts
   (`copy_rows`: random token spans shown twice, trained on the second copy): on them a small
   transformer forms the induction heads that copying from the conversation needs. Without
   that phase a 1200-step base copied nothing, not even a name from its own thought into the
   next command (`copy_accuracy` 0.0); the copy rows stay in the mix (`copy_weight`).
4. **Training.** `config.pretrain.steps` steps of the ordinary trainer from a random init
   (`config.seed`), with `config.pretrain.lr`.

Output (`--out`, default `config.pretrain.out`):

    params/         the model (an Orbax params checkpoint: `model.init_from` points here)
    tokenizer/      HF tokenizer files (`data.tokenizer` points here)
    base.json       how it was built: config, corpus and row figures, final loss, seconds,
                    and the sha256 of the parameters (the same command on the same machine and
                    package versions gives the same bytes)

The demo commits its base (3.6 MB) like a downloaded model, so `make demo` does not rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dagger_jax.dagger import collector
from dagger_jax.data import shards as shards_lib
from dagger_jax.data import tokenizer as tokenizer_lib
from dagger_jax.data.render import Row
from dagger_jax.data.trajectory import Action
from dagger_jax.envs import protocol
from dagger_jax.envs.sandbox import check_available
from dagger_jax.envs.tasks import toy
from dagger_jax.model.params_io import model_from_params, save_params
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.policies.base import EpisodeView, Policy
from dagger_jax.train import trainer

log = logging.getLogger(__name__)

_GREP_ANSWER = re.compile(r"^\./(\S+\.py):(\d+):def ", re.M)
_QUOTED_LINE = re.compile(r"\n\n    (.+)\n")  # an indented code line an issue quotes


def _functions(task: dict) -> list[tuple[str, str, int]]:
  """(file, name, def line) of every function in the task's non-test modules."""
  out = []
  for path, text in sorted((task.get("repo_files") or {}).items()):
    if not path.endswith(".py") or path.startswith("tests/") or path == "run_tests.py":
      continue
    for i, line in enumerate(text.splitlines(), start=1):
      m = re.match(r"def (\w+)\(", line)
      if m:
        out.append((path, m.group(1), i))
  return out


class RandomExplorer(Policy):
  """Random exploration of a repository (the pretraining corpus; see the module docstring).

  Every choice is drawn from `random.Random((seed, instance, turn))`, so a transcript is a
  function of the task and the seed.
  """

  name = "explorer"

  def __init__(self, seed: int = 0):
    self.seed = seed

  def act(self, views: Sequence[EpisodeView]) -> list[Action]:
    return [Action(self.next_action(v)) for v in views]

  def next_action(self, view: EpisodeView) -> str:
    task = view.task
    turn = sum(m["role"] == "assistant" for m in view.messages)
    rng = random.Random(f"{self.seed}/{task['instance_id']}/{turn}")
    fns = _functions(task)
    files = sorted(p for p in task.get("repo_files", {}) if p != ".gitignore")
    file, name, def_line = rng.choice(fns)
    named = toy.named_function(view.messages[1]["content"])
    if named and rng.random() < 0.5:  # half the time, the function the issue names
      file, name, def_line = next((f for f in fns if f[1] == named), (file, name, def_line))
    shown = _GREP_ANSWER.findall("\n".join(m["content"] for m in view.messages
                                           if m["role"] == "user"))
    commands = [protocol.parse_action(m["content"]).command or "" for m in view.messages
                if m["role"] == "assistant"]
    edited = sorted({c.rsplit(" ", 1)[-1] for c in commands if c.startswith("sed -i")})
    choice = rng.choices(["grep", "nl", "cat", "test", "edit", "restore", "diff"],
                         weights=[3, 3, 1, 2, 2, 2 if edited else 0, 1])[0]
    if choice == "grep":
      return protocol.format_action(f'grep -rn "def {name}(" .', f"THOUGHT: Where is {name}?")
    if choice == "nl":
      if shown and rng.random() < 0.7:  # lines that grep found
        file, line = shown[rng.randrange(len(shown))]
        return protocol.format_action(f"nl -ba {file} | sed -n '{line},+3p'",
                                      f"THOUGHT: Read {file} from line {line}.")
      lo = rng.randint(1, 12)
      return protocol.format_action(f"nl -ba {file} | sed -n '{lo},{lo + rng.randint(1, 6)}p'",
                                    f"THOUGHT: Read lines {lo} on of {file}.")
    if choice == "cat":
      path = rng.choice(files)
      return protocol.format_action(f"cat {path}", f"THOUGHT: Read {path}.")
    if choice == "test":
      return protocol.format_action(task.get("test_cmd") or "python3 run_tests.py",
                                    "THOUGHT: Run the tests.")
    if choice == "restore":
      return protocol.format_action("git checkout -- .", "THOUGHT: Undo my edits.")
    if choice == "diff":
      return protocol.format_action("git diff", "THOUGHT: What changed?")
    # A random one-line edit: the line after a function's def becomes another function's line,
    # or (half the time) the line the issue quotes; by line number or by the def.
    src_file, src_name, src_line = rng.choice(fns)
    text = task["repo_files"][src_file].splitlines()[src_line].strip()
    quoted = _QUOTED_LINE.search(view.messages[1]["content"])
    if quoted and rng.random() < 0.5:
      text = quoted.group(1)
    if shown and rng.random() < 0.5:  # a file that grep found
      file = shown[rng.randrange(len(shown))][0]
    if rng.random() < 0.5:
      return protocol.format_action(f"sed -i '/def {name}(/{{n;s/.*/    {text}/}}' ./{file}",
                                    f"THOUGHT: Try another line in {name}.")
    return protocol.format_action(f"sed -i '{def_line + 1}s/.*/    {text}/' ./{file}",
                                  f"THOUGHT: Try line {def_line + 1} of {file}.")


def transcripts(config: Any, progress: bool = True) -> list[list[dict[str, str]]]:
  """The corpus: one explored conversation (messages) per fresh repository."""
  check_available(config.env)  # a missing tool fails here, not once per transcript
  p = config.pretrain
  tasks = toy.generate(int(p.repos), int(p.seed), split="train")
  c = config.copy_and_resolve_references()
  c.unlock()
  c.env.max_turns = int(p.turns)
  c.dagger.interventions = ()
  c.rollout.env_workers = max(int(c.rollout.env_workers), 8)  # sandbox-bound: overlap commands
  trajs, stats = collector.collect(tasks, config=c, round_index=0, beta=1.0,
                                   teacher=RandomExplorer(int(p.seed)), student=None, grade=False,
                                   progress=progress)
  if stats.failed:
    log.warning("pretrain corpus: %d explorations could not run (sandbox errors)", stats.failed)
  return [list(t.messages) for t in trajs]


def lm_rows(conversations: Sequence[Sequence[dict]], tokenizer, max_len: int) -> list[Row]:
  """Rows with a language-model loss on every token (pieces of at most max_len tokens).

  Example: a conversation of ids [5, 6, 7, 8] and max_len 3 gives rows with tokens [5, 6, 7],
  targets [6, 7, 8], loss_mask [1, 1, 1] and tokens [8] (nothing to predict: dropped).
  """
  rows = []
  for i, messages in enumerate(conversations):
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    for start in range(0, len(ids) - 1, max_len):
      rows.append(_row(ids[start:start + max_len + 1], f"pretrain/{i}"))
  return rows


def _row(ids: Sequence[int], source: str) -> Row:
  n = len(ids) - 1
  return Row(tokens=np.asarray(ids[:-1], np.int32), targets=np.asarray(ids[1:], np.int32),
             positions=np.arange(n, dtype=np.int32), segment_ids=np.ones(n, np.int32),
             branch_ids=np.zeros(n, np.int32), loss_mask=np.ones(n, np.uint8),
             label_ids=np.ones(n, np.int32), source=source)


def copy_rows(n: int, span: int, vocab: Sequence[int], seed: int) -> list[Row]:
  """n rows that can only be predicted by copying: `span` random token ids shown twice, trained
  on the second copy only (the curriculum on which small transformers form induction heads
  within a few hundred steps; tests/test_pretrain.py measures it). Two variants formed none in
  the demo's 300 steps: spans of random length (span/2 to span), and a gap of other tokens
  between the copies.

  Example (span [7, 3, 9]): tokens 7 3 9 7 3 -> targets 3 9 7 3 9 with loss_mask 0 0 0 1 1
  (the first copy and the repeat's first token cannot be known).
  """
  rng = np.random.default_rng(seed)
  vocab = np.asarray(vocab)
  rows = []
  for i in range(n):
    first = rng.choice(vocab, size=span).tolist()
    row = _row(first + first, f"copy/{i}")
    row.loss_mask[:len(first)] = 0
    rows.append(row)
  return rows


def copy_accuracy(model, vocab: Sequence[int], seed: int, rows: int = 8,
                  span: int = 32) -> float:
  """How often the model predicts the next token of a span's second occurrence (greedy):
  random spans of `span` ids shown twice, accuracy over the second copy's predictable tokens
  (~1/len(vocab) without induction heads, near 1 with them)."""
  rng = np.random.default_rng(seed + 1)
  first = rng.choice(np.asarray(vocab), size=(rows, span))
  ids = np.concatenate([first, first], axis=1)
  logits = model(jnp.asarray(ids, jnp.int32))
  predicted = np.asarray(jnp.argmax(logits, axis=-1))
  # positions span .. 2*span-2 predict the second copy's tokens 1 .. span-1
  return float((predicted[:, span:-1] == ids[:, span + 1:]).mean())


def params_sha256(params: Any) -> str:
  """sha256 over every parameter's bytes, in path order (the base's fingerprint)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


def build_base(config: Any, out_dir: str, progress: bool = True) -> dict:
  """Builds the base (see the module docstring) into out_dir; returns base.json's content."""
  t0 = time.time()
  p = config.pretrain
  convs = transcripts(config, progress)
  corpus_s = time.time() - t0
  work = tempfile.mkdtemp(prefix="dagger_jax_pretrain_")
  try:
    tok_dir = os.path.join(work, "tokenizer")
    texts = [m["content"] for conv in convs for m in conv]
    tok = tokenizer_lib.train_demo_tokenizer(texts, tok_dir, vocab_size=config.model.vocab_size)
    c = config.copy_and_resolve_references()
    c.unlock()
    c.model.init_from = ""
    c.data.tokenizer = tok_dir
    vocab = [i for i in range(len(tok)) if i not in set(tok.all_special_ids)]
    span = int(p.copy_span)
    units_per_row = int(c.data.max_len) // (2 * span)
    n_copy = int(p.copy_steps) * int(c.train.batch_size) * units_per_row
    copy_shard = os.path.join(work, "shards", "round_000")
    shards_lib.write_shard(copy_shard, copy_rows(n_copy, span, vocab, seed=int(p.seed)),
                           round=0, data_config=c.data, pad_id=tok.pad_token_id)
    rows = lm_rows(convs, tok, int(c.data.max_len))
    shard = os.path.join(work, "shards", "round_001")
    manifest = shards_lib.write_shard(shard, rows, round=1, data_config=c.data,
                                      pad_id=tok.pad_token_id)
    c.train.lr = float(p.lr)
    c.train.warmup_steps = int(p.warmup_steps)
    c.train.async_checkpoint = False
    c.train.continue_from = "last"
    t1 = time.time()
    # phase 1: the copying curriculum alone; phase 2: the transcripts (with the copy rows mixed
    # in at `copy_weight`), continuing from phase 1
    c.train.steps = c.train.checkpoint_every = int(p.copy_steps)
    trainer.train(c, [copy_shard], workdir=os.path.join(work, "run"), round_index=0,
                  progress=progress, log=lambda m: log.info("%s", m))
    c.train.steps = c.train.checkpoint_every = int(p.steps)
    c.data.round_weights = (float(p.copy_weight), 1.0)
    result = trainer.train(c, [copy_shard, shard], workdir=os.path.join(work, "run"),
                           round_index=1, progress=progress, log=lambda m: log.info("%s", m))
    train_s = time.time() - t1
    model = model_from_params(Qwen3Config.from_config(c.model), result.state.params)
    tmp_out = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_out, ignore_errors=True)
    os.makedirs(tmp_out)
    save_params(model, os.path.join(os.path.abspath(tmp_out), "params"))
    tok.save_pretrained(os.path.join(tmp_out, "tokenizer"))
    info = {
        "command": f"dagger-jax pretrain --config {getattr(config, 'config_spec', 'configs/demo.py')}",
        "pretrain": p.to_dict(), "model": c.model.to_dict(), "max_len": int(c.data.max_len),
        "batch_size": int(c.train.batch_size), "seed": int(c.seed),
        "transcripts": len(convs), "rows": manifest["rows"], "tokens": manifest["tokens"],
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "corpus_s": round(corpus_s, 1), "train_s": round(train_s, 1),
        "copy_accuracy": round(copy_accuracy(model, vocab, int(p.seed)), 4),
        "params_sha256": params_sha256(result.state.params),
    }
    with open(os.path.join(tmp_out, "base.json"), "w") as f:
      json.dump(info, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp_out, out_dir)
    return info
  finally:
    shutil.rmtree(work, ignore_errors=True)
