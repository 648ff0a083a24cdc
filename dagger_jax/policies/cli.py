"""CLI verbs of the policies room: `dagger-jax generate`, the student sampled from a checkpoint,
and `dagger-jax serve`, the same sampler behind SGLang's and OpenAI's HTTP APIs.

    dagger-jax generate --config configs/demo.py --prompt "Fix the bug in shift."
    dagger-jax generate --ckpt runs/demo/dagger_seed0/checkpoints/round_002 --ids '5 6 7' --json
    dagger-jax serve --model runs/demo/dagger_seed0/checkpoints/round_002 --port 30000

It lives here, not in `model/`, because it renders chat prompts with the data room's template
and tokenizer (the model room imports nothing from `data/`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from typing import Any

from dagger_jax.data import tokenizer as tokenizers
from dagger_jax.data.render import prompt_ids
from dagger_jax.errors import UsageError
from dagger_jax.model import loader, params_io, sampler
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.policies.serve import Server


def _tokenizer_for(args: argparse.Namespace, config: Any, vocab_size: int):
  """--tokenizer, else the checkpoint's own tokenizer files, else (for text prompts)
  `config.data.tokenizer`; None for an ids-only run that names no tokenizer."""
  tok = None
  if args.tokenizer:
    tok = tokenizers.load_tokenizer_dir(os.path.abspath(args.tokenizer))
  for d in (() if tok else (args.ckpt, args.ckpt and params_io.hf_files_dir(args.ckpt))):
    if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
      tok = tokenizers.load_tokenizer_dir(os.path.abspath(d))
      break
  if tok is None and args.prompt:
    tok = tokenizers.load_tokenizer(config.data, workdir=config.workdir)
  if tok is not None and len(tok) > vocab_size:
    raise UsageError(f"the tokenizer ({tok.name_or_path}) has {len(tok)} tokens but the model's "
                     f"vocab_size is {vocab_size}: use the tokenizer the model was trained with")
  return tok


def generate_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", metavar="DIR", default=None,
                      help="HF checkpoint dir (config.json + safetensors) or Orbax params "
                           "checkpoint (default: config.model.init_from; none: a random model)")
  parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                      help="a prompt (repeat for a batch); sent as a user chat turn unless --raw")
  parser.add_argument("--ids", action="append", default=[], metavar="'ID ID ...'",
                      help="a prompt as space-separated token ids (repeat; needs no tokenizer)")
  parser.add_argument("--raw", action="store_true",
                      help="tokenise --prompt as it is, without the chat template")
  parser.add_argument("--tokenizer", metavar="DIR", default=None,
                      help="HF tokenizer dir (default: the checkpoint's, else "
                      "config.data.tokenizer)")
  parser.add_argument("--max-new-tokens", type=int, default=None,
                      help="default: config.sampler.max_new_tokens")
  parser.add_argument("--temperature", type=float, default=None,
                      help="0 = greedy (default: config.sampler.temperature)")
  parser.add_argument("--top-p", type=float, default=None, help="default: config.sampler.top_p")
  parser.add_argument("--top-k", type=int, default=None, help="default: config.sampler.top_k")
  parser.add_argument("--stop-id", type=int, action="append", default=None,
                      help="stop token id, repeatable (default: the tokenizer's end of turn)")
  parser.add_argument("--seed", type=int, default=None, help="default: config.seed")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object per prompt (ids, logprobs, text, finish reason)")


def generate(args: argparse.Namespace, config: Any) -> int:
  """Samples one batch and prints one line per prompt (the --ids prompts first, then the
  --prompt ones, each in the order given)."""
  if not args.prompt and not args.ids:
    raise UsageError("give at least one --prompt TEXT or --ids 'ID ID ...'")
  s = config.sampler
  try:
    ids = [[int(x) for x in text.replace(",", " ").split()] for text in args.ids]
  except ValueError:
    raise UsageError(f"--ids takes integers separated by spaces; got {args.ids}") from None
  if args.ckpt:  # a checkpoint named on the command line brings its own architecture
    model = loader.load_model(args.ckpt, None, seed=config.seed)
  else:
    args.ckpt = config.model.init_from or None
    model = loader.load_model(args.ckpt, Qwen3Config.from_config(config.model), seed=config.seed)
  tok = _tokenizer_for(args, config, model.config.vocab_size)
  for text in args.prompt:
    ids.append(tok.encode(text, add_special_tokens=False) if args.raw else
               prompt_ids([{"role": "user", "content": text}], [], tok,
                          config.data.enable_thinking))
  stop = args.stop_id if args.stop_id is not None else (
      [tok.eos_token_id] if tok is not None else [])
  result = sampler.generate(
      model, ids, args.max_new_tokens or s.max_new_tokens,
      temperature=s.temperature if args.temperature is None else args.temperature,
      top_p=s.top_p if args.top_p is None else args.top_p,
      top_k=s.top_k if args.top_k is None else args.top_k, stop_token_ids=stop,
      seed=config.seed if args.seed is None else args.seed, length_buckets=s.length_buckets)
  for prompt, new, logprobs, reason in zip(ids, result.tokens, result.logprobs,
                                           result.finish_reasons):
    text = tok.decode(new, skip_special_tokens=False) if tok is not None else None
    if args.json:
      print(json.dumps({"prompt_ids": prompt, "ids": new, "logprobs": logprobs, "text": text,
                        "finish_reason": reason}))
    else:
      print(text if text is not None else " ".join(map(str, new)))
  return 0


def serve_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", metavar="DIR", default=None,
                      help="HF checkpoint dir or Orbax params checkpoint to serve (default: "
                           "config.model.init_from)")
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1; 0.0.0.0 serves every interface: "
                           "then require a key with --api-key-env)")
  parser.add_argument("--port", type=int, default=30000, help="default 30000 (SGLang's); 0: any")
  parser.add_argument("--api-key-env", metavar="VAR", default=None,
                      help="require `Authorization: Bearer $VAR` on every request but /health* "
                           "(the key is read from the environment variable VAR, never given on "
                           "the command line, where `ps` would show it)")
  parser.add_argument("--tokenizer", metavar="DIR", default=None,
                      help="HF tokenizer dir (default: the model's own tokenizer files, else "
                           "for the config's model config.data.tokenizer; none: /generate takes "
                           "input_ids only)")
  parser.add_argument("--max-batch", type=int, default=Server.max_batch, metavar="N",
                      help="most prompts per sampler call (default %(default)s)")
  parser.add_argument("--log-requests", action="store_true", help="log every request (DEBUG)")


def serve(args: argparse.Namespace, config: Any) -> int:
  """Serves until SIGTERM or Ctrl-C (see `dagger_jax.policies.serve`)."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("dagger_jax").setLevel(logging.INFO)
  if args.log_requests:
    logging.getLogger("dagger_jax.policies.serve").setLevel(logging.DEBUG)
  api_key = None
  if args.api_key_env:
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
      raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set "
                       f"or empty; export the key in it")
  model = args.model or config.model.init_from
  if not model:
    raise UsageError("give --model DIR (an HF directory or an Orbax params checkpoint), or set "
                     "--config.model.init_from")
  if args.max_batch < 1:
    raise UsageError(f"--max-batch {args.max_batch}: must be >= 1")
  tokenizer = args.tokenizer
  own = os.path.isfile(os.path.join(model, "tokenizer.json")) or params_io.hf_files_dir(model)
  if tokenizer is None and not args.model and not own:  # the config's model: its tokenizer too
    tokenizer = tokenizers.tokenizer_dir(config.data, config.workdir)
  if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
    logging.getLogger(__name__).warning(
        "serving on %s without a key: anyone who reaches it may sample and load weights; set "
        "--api-key-env VAR", args.host)
  server = Server(model, config, host=args.host, port=args.port, api_key=api_key,
                  tokenizer_dir=tokenizer)
  server.max_batch = args.max_batch
  stop = threading.Event()
  previous = {sig: signal.signal(sig, lambda *_: stop.set())
              for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    with server.start():
      print(f"dagger-jax serve: listening on {server.url}", flush=True)
      stop.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return 0
