"""The forward under a simulated 8-device mesh equals the single-device forward.

conftest.py gives 8 CPU devices. Params are created sharded the way training does it:
`nnx.eval_shape` -> `sharding.state_shardings` -> `jax.jit(init, out_shardings=...)`, then the
model runs under `jax.set_mesh(mesh)` with the batch split over (data, fsdp).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import support
from dagger_jax.model import sharding
from dagger_jax.model.qwen3 import Qwen3, Qwen3Config

CONFIG = support.model_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
                     tie_word_embeddings=False)
B, T = 8, 16


def init(config: Qwen3Config) -> nnx.State:
  return nnx.state(Qwen3(config, rngs=nnx.Rngs(0)))


def sharded_model(config: Qwen3Config, mesh) -> Qwen3:
  abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = sharding.state_shardings(abstract_state, mesh)
  state = jax.jit(lambda: init(config), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """Rows with two segments each, and a label branch (branch 1) inside the first segment."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, CONFIG.vocab_size, (B, T))
  segment_ids = np.repeat([[1] * 10 + [2] * 6], B, axis=0)
  branch_ids = np.repeat([[0] * 4 + [1] * 3 + [0] * 9], B, axis=0)
  positions = np.repeat([[0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 0, 1, 2, 3, 4, 5]], B, axis=0)
  return {k: v.astype(np.int32) for k, v in dict(
      tokens=tokens, positions=positions, segment_ids=segment_ids, branch_ids=branch_ids).items()}


_call = nnx.jit(lambda m, b: m(b["tokens"], b["positions"], b["segment_ids"], b["branch_ids"]))
_call_default = nnx.jit(lambda m, tokens: m(tokens))


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
  """Single-device params (the same jitted init, without shardings) and logits."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen3(CONFIG, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.jit(lambda: init(CONFIG))())
  batch = packed_batch()
  return dict(params=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
              default=np.asarray(_call_default(model, jnp.asarray(batch["tokens"]))),
              packed=np.asarray(_call(model, jax.tree.map(jnp.asarray, batch))))


def assert_close_rel(got, want, rel: float = 1e-5) -> None:
  """max |got - want| <= rel * max |want| (fp32; sharded matmuls sum in another order)."""
  err, scale = np.abs(np.asarray(got) - want).max(), np.abs(want).max()
  assert err <= rel * scale, f"max abs diff {err:.3e} > {rel} * max |ref| {scale:.3e}"


# Expected PartitionSpecs from the rules table (embed -> fsdp; heads, kv_heads, mlp, vocab ->
# tensor), with an axis dropped where it does not divide the dimension (2 kv heads, tensor = 4).
def expected_specs(tensor: int) -> dict[str, P]:
  kv = "tensor" if CONFIG.num_kv_heads % tensor == 0 else None
  return {
      "embedding": P("tensor", "fsdp"),                 # ('vocab', 'embed')
      "lm_head": P("fsdp", "tensor"),                   # ('embed', 'vocab')
      "final_norm.scale": P(None),                      # ('norm',)
      "layers.0.attn.q_proj": P("fsdp", "tensor", None),  # ('embed', 'heads', 'head_dim')
      "layers.0.attn.k_proj": P("fsdp", kv, None),      # ('embed', 'kv_heads', 'head_dim')
      "layers.1.attn.v_proj": P("fsdp", kv, None),
      "layers.1.attn.o_proj": P("tensor", None, "fsdp"),  # ('heads', 'head_dim', 'embed')
      "layers.0.attn.q_norm.scale": P(None),            # ('head_dim',)
      "layers.0.mlp.up_proj": P("fsdp", "tensor"),      # ('embed', 'mlp')
      "layers.1.mlp.gate_proj": P("fsdp", "tensor"),
      "layers.1.mlp.down_proj": P("tensor", "fsdp"),    # ('mlp', 'embed')
      "layers.1.input_norm.scale": P(None),
  }


def leaf(params: dict, dotted: str):
  for key in dotted.split("."):
    params = params[int(key) if key.isdigit() else key]
  return params


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1), (2, 4, 1), (1, 2, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sharded_forward_equals_single_device(shape, reference):
  data, fsdp, tensor = shape
  mesh = sharding.make_mesh(data, fsdp, tensor)
  model = sharded_model(CONFIG, mesh)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  for name, spec in expected_specs(tensor).items():
    x = leaf(params, name)
    assert x.sharding.mesh.shape == mesh.shape and x.sharding.spec == spec, name
    block = tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(x.shape, spec))
    assert {s.data.shape for s in x.addressable_shards} == {block}, name
  # The sharded init draws exactly the single-device numbers.
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference["params"])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  batch = {k: jax.device_put(v, batch_sharding) for k, v in packed_batch().items()}
  with jax.set_mesh(mesh):
    packed = _call(model, batch)
    default = _call_default(model, batch["tokens"])
  # the batch stays split over (data, fsdp)
  assert {s.data.shape[0] for s in packed.addressable_shards} == {B // (data * fsdp)}
  assert_close_rel(packed, reference["packed"])
  assert_close_rel(default, reference["default"])


def test_tied_embeddings_sharded_forward():
  config = dataclasses.replace(CONFIG, tie_word_embeddings=True)
  tokens = packed_batch()["tokens"]
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))
  single_model = nnx.merge(graphdef, jax.jit(lambda: init(config))())
  single = np.asarray(_call_default(single_model, jnp.asarray(tokens)))
  mesh = sharding.make_mesh(2, 2, 2)
  model = sharded_model(config, mesh)
  with jax.set_mesh(mesh):
    got = _call_default(model, jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp")))))
  assert_close_rel(got, single)
