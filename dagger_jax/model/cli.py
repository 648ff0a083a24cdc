"""CLI verbs of the model room: `dagger-jax import-hf` and `dagger-jax export-hf`.

    dagger-jax import-hf --hf Qwen3-0.6B/ --out ckpt/          # also keeps the tokenizer files
    dagger-jax export-hf --ckpt ckpt/ --out hf_out/ --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os

import jax

from dagger_jax import rundir
from dagger_jax.model import hf, params_io


def import_hf_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--hf", required=True, metavar="DIR",
                      help="HF Qwen3 checkpoint directory (config.json + safetensors)")
  parser.add_argument("--out", required=True, metavar="CKPT_DIR",
                      help="new Orbax params checkpoint directory")
  parser.add_argument("--param-dtype", choices=tuple(hf.HF_DTYPES), default=None,
                      help="dtype to store the params in (default: config.model.param_dtype)")


def import_hf(args: argparse.Namespace, config) -> int:
  """HF checkpoint -> Orbax params checkpoint (keeps config.json and the tokenizer files)."""
  model = hf.load_pretrained(args.hf, param_dtype=args.param_dtype or config.model.param_dtype,
                             dtype=config.model.dtype)
  out = params_io.save_params(model, args.out)
  kept = []
  if jax.process_index() == 0:
    kept = params_io.keep_hf_files(args.hf, out, ("config.json", *hf.EXTRA_FILES))
  c = model.config
  print(f"imported {args.hf} -> {out}: Qwen3 {c.num_layers} layers, d={c.hidden_size}, "
        f"{c.num_params() / 1e6:.1f}M params ({c.param_dtype}); kept {', '.join(kept) or 'no'} "
        f"HF files for export")
  return 0


def export_hf_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", required=True, metavar="CKPT_DIR",
                      help="Orbax params checkpoint (or a trainer checkpoint directory)")
  parser.add_argument("--out", required=True, metavar="DIR", help="HF directory to write")
  parser.add_argument("--dtype", choices=tuple(hf.HF_DTYPES), default=None,
                      help="weights dtype (default: the checkpoint's param dtype)")
  parser.add_argument("--tokenizer", metavar="DIR", default=None,
                      help="HF tokenizer files to ship (default: those kept by import-hf, if any)")
  parser.add_argument("--max-shard-size", default="5GB",
                      help="split the safetensors above this size (default: 5GB)")


def export_hf(args: argparse.Namespace, config) -> int:
  """Orbax params checkpoint -> HF directory (safetensors + config.json)."""
  del config  # the architecture comes from the checkpoint's model_config.json
  params_dir = params_io.resolve_params_dir(args.ckpt)
  model = params_io.load_params(params_dir)
  extras = args.tokenizer or params_io.hf_files_dir(params_dir) or _run_tokenizer(params_dir)
  hf.save_pretrained(model, args.out, dtype=args.dtype, extras_from=extras,
                     max_shard_size=args.max_shard_size)
  out = os.path.abspath(args.out)
  print(f"exported {params_dir} -> {out} ({args.dtype or model.config.param_dtype}, "
        f"tokenizer files from {extras})" if extras else
        f"exported {params_dir} -> {out} ({args.dtype or model.config.param_dtype}) WITHOUT "
        f"tokenizer files: none was given (--tokenizer), kept with the checkpoint (hf_files/) or "
        f"recorded by its run (run.json). Serving engines need them: export again with "
        f"--tokenizer DIR, the tokenizer the model was trained with.")
  return 0


def _run_tokenizer(ckpt_dir: str) -> str | None:
  """The tokenizer directory recorded in run.json by the run that wrote `ckpt_dir`, if any."""
  run = rundir.run_of(ckpt_dir)
  info = run.read_run_file() if run is not None else None
  tok = (info or {}).get("tokenizer")
  return tok if tok and os.path.isfile(os.path.join(tok, "tokenizer.json")) else None
