"""HF interop against the real reference: transformers' PyTorch Qwen3ForCausalLM (CPU, fp32).

A random tiny HF model (norm weights randomised too, so a wrong norm mapping fails) is saved to
disk with transformers, loaded into Flax, exported back, and reloaded by transformers.
"""

import copy
import filecmp
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers

from jax.sharding import PartitionSpec as P

from dagger_jax import cli
from dagger_jax.model import hf, params_io

VOCAB, HIDDEN, LAYERS = 512, 64, 2


def hf_config(tied: bool) -> transformers.Qwen3Config:
  # initializer_range 0.1 (not 0.02) so that logits spread over several units and a mapping
  # error cannot hide below the tolerance.
  return transformers.Qwen3Config(
      vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10_000.0,
      rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=tied,
      initializer_range=0.1, bos_token_id=1, eos_token_id=2)


def random_hf_model(tied: bool, seed: int = 0) -> transformers.Qwen3ForCausalLM:
  torch.manual_seed(seed)
  model = transformers.Qwen3ForCausalLM(hf_config(tied)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # every RMSNorm weight (input, post-attention, q/k, final)
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
  return model


def save_tokenizer(path: str) -> None:
  """A tiny real HF tokenizer (tokenizer.json + tokenizer_config.json) beside the weights."""
  words = ["<unk>", "<s>", "</s>", "hello", "world"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                       eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def source(request, tmp_path_factory):
  """(HF model, its saved directory) for tied and untied embeddings."""
  tied = request.param
  model = random_hf_model(tied)
  path = str(tmp_path_factory.mktemp("hf_tied" if tied else "hf_untied"))
  model.save_pretrained(path)
  save_tokenizer(path)
  return model, path


def tokens(batch: int = 2, length: int = 11, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def hf_logits(model, tokens_bt: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens_bt.astype(np.int64))).logits.numpy()


def assert_close_rel(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
  """max |got - want| <= rel * max |want| (fp32 parity, relative to the logit scale)."""
  err, scale = np.abs(np.asarray(got) - want).max(), np.abs(want).max()
  assert err <= rel * scale, f"max abs diff {err:.3e} > {rel} * max |ref| {scale:.3e}"


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a HF directory (single file or sharded index), by name."""
  out = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(path, name), framework="np") as f:
        for key in f.keys():
          assert key not in out, f"{key} stored twice"
          out[key] = f.get_tensor(key)
  return out


def assert_same_tensors(a: str, b: str) -> None:
  ta, tb = read_safetensors(a), read_safetensors(b)
  assert sorted(ta) == sorted(tb)
  for key in ta:
    assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
    np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)


# ----------------------------------------------------------------------------- HF -> Flax


def test_logits_match_transformers(source):
  model, path = source
  ours = hf.load_pretrained(path)
  assert ours.config.tie_word_embeddings == model.config.tie_word_embeddings
  x = tokens()
  logits = ours(jnp.asarray(x))
  assert logits.dtype == jnp.float32 and logits.shape == (2, 11, VOCAB)
  want = hf_logits(model, x)
  assert np.abs(want).max() > 1.0  # the comparison is not between near-zero numbers
  assert_close_rel(np.asarray(logits), want)


def test_sharded_index_checkpoint_loads(source, tmp_path):
  model, path = source
  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, max_shard_size="40KB")
  assert os.path.isfile(os.path.join(sharded, hf.INDEX_FILE))
  assert len([n for n in os.listdir(sharded) if n.endswith(".safetensors")]) > 2
  x = tokens()
  np.testing.assert_array_equal(np.asarray(hf.load_pretrained(sharded)(jnp.asarray(x))),
                                np.asarray(hf.load_pretrained(path)(jnp.asarray(x))))


def test_bf16_checkpoint_loads_exactly(source, tmp_path):
  model, _ = source
  path = str(tmp_path / "bf16")
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
  ours = hf.load_pretrained(path)  # float32 params hold bfloat16 values exactly
  want = model.model.layers[1].mlp.up_proj.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(ours.layers[1].mlp.up_proj.get_value()), want.T)


def test_bf16_forward_error_is_transformers_own(source):
  """In bfloat16 (params and compute) our logits are as far from the fp32 reference as
  transformers' own bfloat16 forward is, on the same weights."""
  model, path = source
  x = tokens(length=16, seed=3)
  want = hf_logits(model, x)
  with torch.no_grad():
    hf_bf16 = copy.deepcopy(model).to(torch.bfloat16)(torch.from_numpy(x.astype(np.int64)))
  hf_err = np.abs(hf_bf16.logits.float().numpy() - want).max()
  ours = hf.load_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")
  ours_err = np.abs(np.asarray(ours(jnp.asarray(x))) - want).max()
  assert 0 < ours_err <= 2 * hf_err, (ours_err, hf_err)


# ----------------------------------------------------------------------------- Flax -> HF


def test_export_loads_in_transformers_with_same_logits(source, tmp_path):
  model, path = source
  out = str(tmp_path / "export")
  hf.save_pretrained(hf.load_pretrained(path), out, extras_from=path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded).__name__ == "Qwen3ForCausalLM"
  x = tokens(seed=1)
  np.testing.assert_array_equal(hf_logits(reloaded, x), hf_logits(model, x))
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    assert filecmp.cmp(os.path.join(path, name), os.path.join(out, name), shallow=False), name
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok("hello world")["input_ids"][-2:] == [3, 4]
  config = json.load(open(os.path.join(out, "config.json")))
  assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # kept from the source


def test_roundtrip_is_bit_exact(source, tmp_path):
  _, path = source
  out = str(tmp_path / "export")
  hf.save_pretrained(hf.load_pretrained(path), out)
  assert_same_tensors(path, out)


def test_sharded_export_roundtrip(source, tmp_path):
  model, path = source
  out = str(tmp_path / "export")
  hf.save_pretrained(hf.load_pretrained(path), out, max_shard_size="40KB")
  index = json.load(open(os.path.join(out, hf.INDEX_FILE)))
  files = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
  assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
  assert_same_tensors(path, out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  x = tokens(seed=2)
  np.testing.assert_array_equal(hf_logits(reloaded, x), hf_logits(model, x))


def test_bf16_export_rounds_like_torch(source, tmp_path):
  model, path = source
  out = str(tmp_path / "export")
  hf.save_pretrained(hf.load_pretrained(path), out, dtype="bfloat16")
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["torch_dtype"] == config["dtype"] == "bfloat16"
  got, reference = read_safetensors(out), model.state_dict()
  assert set(got) <= set(reference)
  for name, w in got.items():
    assert w.dtype == ml_dtypes.bfloat16
    want = reference[name].to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(w.view(np.int16), want, err_msg=name)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  assert reloaded.dtype == torch.bfloat16


def test_export_replaces_an_earlier_export_only(source, tmp_path):
  _, path = source
  ours = hf.load_pretrained(path)
  out = str(tmp_path / "export")
  hf.save_pretrained(ours, out, max_shard_size="40KB")
  hf.save_pretrained(ours, out)  # no stale shards or index left from the first export
  assert sorted(n for n in os.listdir(out) if "safetensors" in n) == [hf.SINGLE_FILE]
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(hf.HFCheckpointError, match=r"files an export does not write \(keep.txt\)"):
    hf.save_pretrained(ours, str(other))
  assert (other / "keep.txt").read_text() == "mine"


def test_sharded_model_exports_the_same(source, tmp_path):
  from dagger_jax.model.sharding import make_mesh
  _, path = source
  ours = hf.load_pretrained(path, mesh=make_mesh(2, 2, 2))
  assert ours.layers[0].mlp.up_proj.get_value().sharding.spec == P("fsdp", "tensor")
  out = str(tmp_path / "export")
  hf.save_pretrained(ours, out)
  assert_same_tensors(path, out)


@pytest.mark.parametrize("tied", [True, False])
def test_table_covers_every_param_once(tied):
  config = hf.config_from_hf(hf_config(tied).to_dict())
  shapes = params_io.abstract_params(config)
  model_paths = sorted(tuple(getattr(k, "key", k) for k in path)
                       for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0])
  table = hf.entries(config)
  assert sorted(e.path for e in table) == model_paths
  assert len({e.hf for e in table}) == len(table)
  assert (hf.TIED_HEAD in {e.hf for e in table}) != tied


# ----------------------------------------------------------------------------- config.json


def test_config_roundtrip_through_transformers(tmp_path):
  config = hf.config_from_hf(hf_config(tied=False).to_dict())
  assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim,
          config.rope_theta, config.tie_word_embeddings) == (LAYERS, 4, 2, 16, 10_000.0, False)
  (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(config)))
  loaded = transformers.AutoConfig.from_pretrained(str(tmp_path))
  assert type(loaded).__name__ == "Qwen3Config"
  assert hf.config_from_hf(loaded.to_dict()) == config


def test_config_reads_hub_layout():
  hub = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
         "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
         "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": False,
         "max_position_embeddings": 40960, "torch_dtype": "bfloat16"}
  c = hf.config_from_hf(hub)
  assert (c.hidden_size, c.num_layers, c.rope_theta, c.max_position_embeddings) == (
      4096, 36, 1e6, 40960)
  assert c.num_params() == 8_190_735_360  # Qwen3-8B's parameter count


DROP = object()  # a field left out


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "llama"}, "model_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"vocab_size": DROP}, "missing field.s. vocab_size"),
])
def test_config_rejects_what_the_model_lacks(change, needle):
  base = hf.config_to_hf(hf.config_from_hf(hf_config(tied=True).to_dict()))
  bad = {k: v for k, v in {**base, **change}.items() if v is not DROP}
  with pytest.raises(hf.HFCheckpointError, match=needle):
    hf.config_from_hf(bad, source="x/config.json")


# ----------------------------------------------------------------------------- bad checkpoints


def _write_tensors(path, tensors: dict) -> None:
  from safetensors.numpy import save_file
  save_file(tensors, os.path.join(path, hf.SINGLE_FILE), metadata={"format": "pt"})


def test_bad_checkpoints_name_the_problem(source, tmp_path):
  _, path = source
  good = read_safetensors(path)
  config = open(os.path.join(path, "config.json")).read()

  def case(name: str, tensors: dict | None) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config)
    if tensors is not None:
      _write_tensors(str(d), tensors)
    return str(d)

  missing = {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}
  with pytest.raises(hf.HFCheckpointError, match=r"missing \['model.layers.1.mlp.up_proj"):
    hf.load_pretrained(case("missing", missing))
  extra = {**good, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
  with pytest.raises(hf.HFCheckpointError, match=r"unexpected \['model.layers.0.self_attn.q_pr"):
    hf.load_pretrained(case("extra", extra))
  wrong = {**good, "model.norm.weight": np.ones(HIDDEN + 1, np.float32)}
  with pytest.raises(hf.HFCheckpointError, match=r"model.norm.weight has shape \[65\]"):
    hf.load_pretrained(case("shape", wrong))
  with pytest.raises(hf.HFCheckpointError, match="neither model.safetensors nor"):
    hf.load_pretrained(case("empty", None))
  d = case("index", None)
  (tmp_path / "index" / hf.INDEX_FILE).write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(hf.HFCheckpointError, match="model-00001-of-00002.safetensors: listed"):
    hf.load_pretrained(d)
  with pytest.raises(hf.HFCheckpointError, match="config.json: not found"):
    hf.load_pretrained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- CLI verbs


def test_import_export_cli_roundtrip(source, tmp_path, capsys):
  model, path = source
  ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
  assert cli.main(["import-hf", "--hf", path, "--out", ckpt]) == 0
  assert os.path.isdir(os.path.join(ckpt, params_io.PARAMS_ITEM))
  assert params_io.read_model_config(ckpt) == hf.config_from_hf(model.config.to_dict())
  assert os.path.isfile(os.path.join(ckpt, params_io.HF_FILES_DIR, "tokenizer.json"))
  assert cli.main(["export-hf", "--ckpt", ckpt, "--out", out]) == 0
  assert_same_tensors(path, out)
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    assert filecmp.cmp(os.path.join(path, name), os.path.join(out, name), shallow=False), name
  bf16 = str(tmp_path / "bf16")
  assert cli.main(["export-hf", "--ckpt", ckpt, "--out", bf16, "--dtype", "bfloat16"]) == 0
  assert json.load(open(os.path.join(bf16, "config.json")))["torch_dtype"] == "bfloat16"
  capsys.readouterr()
  assert cli.main(["import-hf", "--hf", path, "--out", ckpt]) == 2  # never overwrites
  assert "already exists" in capsys.readouterr().err
  assert cli.main(["export-hf", "--ckpt", str(tmp_path / "none"), "--out", out]) == 2
  assert "no such checkpoint directory" in capsys.readouterr().err
