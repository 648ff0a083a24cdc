"""HF Qwen3 checkpoints in and out: safetensors + config.json <-> the Flax NNX student.

    model = load_pretrained("Qwen3-0.6B/")                 # config.json + model.safetensors
    model = load_pretrained("Qwen3-8B/", mesh=mesh)         # or a sharded index; params sharded
    save_pretrained(model, "export/", dtype="bfloat16", extras_from="Qwen3-8B/")

`TABLE` is the one place that says how a HF tensor becomes ours: its name, our param path, and
the layout change. HF `nn.Linear` weights are [out, in]; ours are [in, out] with the heads split
out, e.g. `q_proj` [n*h, d] -> [d, n, h] and `o_proj` [d, n*h] -> [n, h, d]; RMSNorm `.weight` is
our `.scale`. With tied embeddings HF stores no `lm_head.weight` (one found is ignored, as
transformers does). Every conversion is a transpose and/or reshape, so HF -> Flax -> HF is
bit-exact in the same dtype.

A saved directory holds `config.json` (`config_to_hf`), `model.safetensors` (or
`model-0000k-of-0000N.safetensors` + `model.safetensors.index.json` above `max_shard_size`),
`generation_config.json` (its `eos_token_id` lists `<|im_end|>` and `<|endoftext|>` when the
tokenizer has them, so serving engines stop at the end of a turn), and the tokenizer files found
in `extras_from`; every file is world-readable. It loads with
`transformers.AutoModelForCausalLM.from_pretrained` (tested); its layout is the Hub's, which
SGLang and vLLM read.

Params-only Orbax checkpoints (`save_params(model, dir)`, `load_params(dir, mesh=None) -> model`,
re-exported here from `params_io.py`, which documents their layout) are what the CLI writes:

    dagger-jax import-hf --hf Qwen3-0.6B/ --out ckpt/          # also keeps the tokenizer files
    dagger-jax export-hf --ckpt ckpt/ --out hf_out/ --dtype bfloat16

(the two verbs: `dagger_jax/model/cli.py`)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from dagger_jax.errors import DaggerJaxError
from dagger_jax.model import params_io
from dagger_jax.model.params_io import load_params, save_params  # noqa: F401  (public API)
from dagger_jax.model.qwen3 import Qwen3, Qwen3Config


class HFCheckpointError(DaggerJaxError, ValueError):
  """A HF checkpoint directory is missing, malformed or not a supported Qwen3; names the file."""


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a HF tensor maps onto our param (`to_ours(w, our_shape)`) and back (`to_hf(w)`)."""
  to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


SAME = Layout(lambda w, s: w, lambda w: w, lambda s: tuple(s))
# nn.Linear [out, in] <-> [in, out]
TRANSPOSE = Layout(lambda w, s: w.T, lambda w: w.T, lambda s: tuple(s[::-1]))
# q/k/v projections: [n*h, d] <-> [d, n, h]
SPLIT_OUT_HEADS = Layout(lambda w, s: w.T.reshape(s), lambda w_dnh: w_dnh.reshape(w_dnh.shape[0], -1).T,
                         lambda s: (s[1] * s[2], s[0]))
# o projection: [d, n*h] <-> [n, h, d]
SPLIT_IN_HEADS = Layout(lambda w, s: w.T.reshape(s), lambda w_nhd: w_nhd.reshape(-1, w_nhd.shape[-1]).T,
                        lambda s: (s[2], s[0] * s[1]))

# HF tensor name ({i} = layer)                         our param path                          layout
TABLE: tuple[tuple[str, str, Layout], ...] = (
    ("model.embed_tokens.weight",                        "embedding",                            SAME),
    ("model.layers.{i}.input_layernorm.weight",          "layers.{i}.input_norm.scale",          SAME),
    ("model.layers.{i}.self_attn.q_proj.weight",         "layers.{i}.attn.q_proj",               SPLIT_OUT_HEADS),
    ("model.layers.{i}.self_attn.k_proj.weight",         "layers.{i}.attn.k_proj",               SPLIT_OUT_HEADS),
    ("model.layers.{i}.self_attn.v_proj.weight",         "layers.{i}.attn.v_proj",               SPLIT_OUT_HEADS),
    ("model.layers.{i}.self_attn.o_proj.weight",         "layers.{i}.attn.o_proj",               SPLIT_IN_HEADS),
    ("model.layers.{i}.self_attn.q_norm.weight",         "layers.{i}.attn.q_norm.scale",         SAME),
    ("model.layers.{i}.self_attn.k_norm.weight",         "layers.{i}.attn.k_norm.scale",         SAME),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.scale", SAME),
    ("model.layers.{i}.mlp.gate_proj.weight",            "layers.{i}.mlp.gate_proj",             TRANSPOSE),
    ("model.layers.{i}.mlp.up_proj.weight",              "layers.{i}.mlp.up_proj",               TRANSPOSE),
    ("model.layers.{i}.mlp.down_proj.weight",            "layers.{i}.mlp.down_proj",             TRANSPOSE),
    ("model.norm.weight",                                "final_norm.scale",                     SAME),
    ("lm_head.weight",                                   "lm_head",                              TRANSPOSE),
)
TIED_HEAD = "lm_head.weight"  # absent (or ignored) when tie_word_embeddings


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str
  path: tuple[str | int, ...]  # key path in nnx.to_pure_dict(nnx.state(model, nnx.Param))
  layout: Layout


def entries(config: Qwen3Config) -> list[Entry]:
  """`TABLE` expanded for `config`'s layers (without `lm_head` when embeddings are tied)."""
  out = []
  for hf, ours, layout in TABLE:
    if hf == TIED_HEAD and config.tie_word_embeddings:
      continue
    layers = range(config.num_layers) if "{i}" in hf else [None]
    for i in layers:
      path = tuple(i if part == "{i}" else part for part in ours.split("."))
      out.append(Entry(hf.format(i=i), path, layout))
  return out


# ----------------------------------------------------------------------------- config.json

HF_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Fields of a source config.json that are not architecture and travel to an export unchanged.
_PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id")


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> Qwen3Config:
  """A transformers Qwen3 `config.json` dict -> `Qwen3Config` (float32 params and compute).

  Missing optional fields take transformers' Qwen3 defaults; a field that this model does not
  implement (attention bias, sliding window, RoPE scaling, another activation) is an error.
  """
  def fail(message: str):
    raise HFCheckpointError(f"{source}: {message}")

  if hf.get("model_type") != "qwen3":
    fail(f"model_type is {hf.get('model_type')!r}; only 'qwen3' (Qwen3ForCausalLM) is supported")
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")
  missing = [k for k in required if k not in hf]
  if missing:
    fail(f"missing field(s) {', '.join(missing)}")
  if hf.get("attention_bias", False):
    fail("attention_bias=true is not supported")
  if hf.get("use_sliding_window", False):
    fail("use_sliding_window=true is not supported")
  if hf.get("hidden_act", "silu") != "silu":
    fail(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
  rope = hf.get("rope_parameters") or {}
  if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
    fail(f"RoPE scaling {hf.get('rope_scaling') or rope} is not supported (only default RoPE)")
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  try:
    return Qwen3Config(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=int(hf.get("head_dim") or 128), rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        param_dtype="float32", dtype="float32")
  except (TypeError, ValueError) as e:
    fail(str(e))


def config_to_hf(config: Qwen3Config, *, dtype: str | None = None) -> dict[str, Any]:
  """`Qwen3Config` -> a transformers-loadable Qwen3 `config.json` dict (the Hub's layout).

  `dtype` is the dtype the weights are saved in (default: `config.param_dtype`).
  """
  dtype = config.param_dtype if dtype is None else dtype
  return {
      "architectures": ["Qwen3ForCausalLM"],
      "model_type": "qwen3",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": config.tie_word_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": config.num_layers,
      "use_cache": True,
      "initializer_range": 0.02,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise HFCheckpointError(f"{path}: not found")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise HFCheckpointError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- loading

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def _open_tensors(path: str) -> Iterator[dict[str, Callable[[], np.ndarray]]]:
  """name -> lazy reader, for `model.safetensors` or a sharded `model.safetensors.index.json`."""
  index_path, single_path = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
  if os.path.isfile(index_path):
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFCheckpointError(f"{index_path}: has no 'weight_map' object")
  elif os.path.isfile(single_path):
    weight_map = None
  else:
    raise HFCheckpointError(f"{path}: has neither {SINGLE_FILE} nor {INDEX_FILE}")
  files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
  with contextlib.ExitStack() as stack:
    handles = {}
    for name in files:
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        raise HFCheckpointError(f"{file}: listed in {INDEX_FILE} but not found")
      try:
        handles[name] = stack.enter_context(safe_open(file, framework="np"))
      except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise HFCheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if weight_map is None:
      weight_map = {key: SINGLE_FILE for key in handles[SINGLE_FILE].keys()}
    yield {key: (lambda h=handles[f], k=key: h.get_tensor(k)) for key, f in weight_map.items()}


def load_pretrained(path: str, *, param_dtype: str = "float32", dtype: str = "float32",
                    mesh: Mesh | None = None, rules=None) -> Qwen3:
  """A HF Qwen3 checkpoint directory -> `Qwen3` (params in `param_dtype`, compute in `dtype`).

  With `mesh`, every param is created sharded as its logical axes say (`sharding.RULES`).
  The defaults (float32) hold float32 and bfloat16 checkpoints exactly.
  """
  config_path = os.path.join(path, "config.json")
  config = dataclasses.replace(config_from_hf(_read_json(config_path), source=config_path),
                               param_dtype=param_dtype, dtype=dtype)
  by_path = {e.path: e for e in entries(config)}
  with _open_tensors(path) as tensors:
    missing = sorted(e.hf for e in by_path.values() if e.hf not in tensors)
    unexpected = sorted(set(tensors) - {e.hf for e in by_path.values()} - {TIED_HEAD})
    if missing or unexpected:
      raise HFCheckpointError(
          f"{path}: tensors do not match config.json (Qwen3, {config.num_layers} layers, "
          f"tie_word_embeddings={config.tie_word_embeddings}): "
          f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
          f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")

    def get(param_path: tuple, leaf) -> np.ndarray:
      entry = by_path.get(param_path)
      if entry is None:
        raise HFCheckpointError(f"param {'.'.join(map(str, param_path))} has no row in hf.TABLE")
      w = tensors[entry.hf]()
      want = entry.layout.hf_shape(leaf.shape)
      if tuple(w.shape) != want:
        raise HFCheckpointError(f"{path}: {entry.hf} has shape {list(w.shape)}, config.json "
                                f"implies {list(want)}")
      return entry.layout.to_ours(w, leaf.shape)

    return params_io.model_from_host_arrays(config, get, mesh, rules)


# ----------------------------------------------------------------------------- saving

EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
               "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def parse_size(size: int | str) -> int:
  """Bytes from an int or '5GB' / '500MB' / '20KB' (powers of 1000, as transformers) / 'GiB'."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
  if not m:
    raise HFCheckpointError(f"max_shard_size={size!r}: expected e.g. '5GB', '200MB' or a byte "
                            f"count")
  unit = (m.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
           "GIB": 2**30}[unit]
  return int(float(m.group(1)) * scale)


def _leaf(params: dict, path: tuple) -> Any:
  for key in path:
    params = params[key]
  return params


def _plan_shards(rows: list[tuple[Entry, int]], max_bytes: int) -> list[list[Entry]]:
  """Greedy, in table order: a new file starts when the next tensor would pass `max_bytes`."""
  shards: list[list[Entry]] = [[]]
  used = 0
  for entry, nbytes in rows:
    if shards[-1] and used + nbytes > max_bytes:
      shards.append([])
      used = 0
    shards[-1].append(entry)
    used += nbytes
  return shards


def _is_export_file(name: str) -> bool:
  return (name in ("config.json", INDEX_FILE, *EXTRA_FILES) or
          re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", name) is not None)


def _prepare_out_dir(path: str) -> str:
  """A fresh sibling temp directory. `path` may exist only holding what an export writes (it is
  replaced whole, so no stale shard survives); anything else there is refused, never deleted."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    foreign = sorted(n for n in os.listdir(path) if not _is_export_file(n))
    if foreign:
      raise HFCheckpointError(f"{path}: exists and holds files an export does not write "
                              f"({', '.join(foreign[:5])}); refusing to replace it")
  elif os.path.exists(path):
    raise HFCheckpointError(f"{path}: exists and is not a directory")
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def _swap_in(tmp: str, path: str) -> None:
  path = os.path.abspath(path)
  old = f"{path}.old-{os.getpid()}"
  if os.path.exists(path):
    os.rename(path, old)
  os.rename(tmp, path)
  shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model: Qwen3, path: str, *, dtype: str | None = None,
                    extras_from: str | None = None, max_shard_size: int | str = "5GB") -> None:
  """Writes `model` as a HF Qwen3 checkpoint directory (see the module docstring).

  `dtype`: float32 | bfloat16 (default: the model's param dtype). `extras_from`: a directory whose
  tokenizer files and generation_config.json are copied, and whose config.json gives the token ids
  (bos/eos/pad). The directory appears complete or not at all (written beside it, then renamed).
  Collective on multi-host (sharded params are gathered); process 0 writes.
  """
  config = model.config
  dtype = config.param_dtype if dtype is None else dtype
  if dtype not in HF_DTYPES:
    raise HFCheckpointError(f"dtype={dtype!r}: must be one of {tuple(HF_DTYPES)}")
  np_dtype = HF_DTYPES[dtype]
  params = params_io.pure_params(model)
  rows = [(e, int(np.prod(_leaf(params, e.path).shape)) * np.dtype(np_dtype).itemsize)
          for e in entries(config)]
  shards = _plan_shards(rows, parse_size(max_shard_size))
  writer = jax.process_index() == 0
  tmp = _prepare_out_dir(path) if writer else ""
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  weight_map: dict[str, str] = {}
  for name, shard in zip(names, shards):
    tensors = {}
    for entry in shard:  # gathering is collective: every process walks the same entries
      w = np.asarray(params_io.gather(_leaf(params, entry.path)))
      tensors[entry.hf] = np.ascontiguousarray(entry.layout.to_hf(w).astype(np_dtype))
      weight_map[entry.hf] = name
    if writer:
      save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
  if not writer:
    return
  if len(shards) > 1:
    total = sum(nbytes for _, nbytes in rows)
    with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                f, indent=2)
  source = {}
  if extras_from and os.path.isfile(os.path.join(extras_from, "config.json")):
    source = _read_json(os.path.join(extras_from, "config.json"))
  hf_config = config_to_hf(config, dtype=dtype)
  hf_config.update({k: source[k] for k in _PASSTHROUGH if source.get(k) is not None})
  for name in EXTRA_FILES:
    if extras_from and os.path.isfile(os.path.join(extras_from, name)):
      shutil.copy2(os.path.join(extras_from, name), os.path.join(tmp, name))
  generation_path = os.path.join(tmp, "generation_config.json")
  copied = os.path.isfile(generation_path)  # the source's own is kept as it is when complete
  generation = (_read_json(generation_path) if copied else
                {k: hf_config[k] for k in _PASSTHROUGH if k in hf_config})
  stops = end_of_turn_ids(tmp)
  if stops and "eos_token_id" not in generation:  # engines stop at the end of a turn
    generation["eos_token_id"] = stops
    generation.setdefault("pad_token_id", stops[-1])
    hf_config.setdefault("eos_token_id", stops[0])
    copied = False
  with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2)
  if not copied:
    with open(generation_path, "w", encoding="utf-8") as f:
      json.dump(generation, f, indent=2)
  for name in os.listdir(tmp):  # readable by a serving engine running as another user
    os.chmod(os.path.join(tmp, name), 0o644)
  os.chmod(tmp, 0o755)
  _swap_in(tmp, path)


END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")  # Qwen3's (and the demo BPE's)


def end_of_turn_ids(tokenizer_dir: str) -> list[int]:
  """The ids of `END_OF_TURN_TOKENS` in `tokenizer_dir/tokenizer.json`'s added tokens, in that
  order (those present); [] without tokenizer files. An export's generation_config.json lists
  them as `eos_token_id`, so HF generate, SGLang and vLLM stop where a chat turn ends."""
  path = os.path.join(tokenizer_dir, "tokenizer.json")
  if not os.path.isfile(path):
    return []
  added = {t["content"]: int(t["id"]) for t in _read_json(path).get("added_tokens", ())}
  return [added[t] for t in END_OF_TURN_TOKENS if t in added]
