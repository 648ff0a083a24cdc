"""Qwen3-8B student on SWE tasks (the paper's 8B setting; 29.8% on SWE-bench Verified).

Dimensions are those of Qwen/Qwen3-8B's config.json; everything else follows the 4B config,
`:tiny` too (`base.tiny`, applied after the 8B sizes).
"""

from configs import base, qwen3_4b_swe


def get_config(arg: str = ""):
  tiny = base.is_tiny(arg, "qwen3_8b_swe")
  c = qwen3_4b_swe.get_config()
  c.name = "qwen3_8b_swe"
  c.workdir = "runs/qwen3_8b_swe"
  m = c.model
  m.vocab_size = 151936
  m.hidden_size = 4096
  m.intermediate_size = 12288
  m.num_layers = 36
  m.num_heads = 32
  m.num_kv_heads = 8
  m.head_dim = 128
  m.tie_word_embeddings = False
  m.max_position_embeddings = 40960
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return base.tiny(c) if tiny else c
