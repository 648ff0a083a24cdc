"""`dagger-jax plan`: exact state bytes, the compiler's figures scaled per layer, the verdict.

Times (2 CPU cores): compiling the paper configs' step at their 32768 tokens takes ~1 min (two
depths at once, flash_jax as on a TPU), so the tests plan the paper configs at 32768 tokens from
shapes (`--no-compile`: the exact state, which does not depend on the compiler) and compile them
(at 1 and 2 layers, scaled to 36) at 4096 tokens (slow).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from dagger_jax import configlib
from dagger_jax.errors import UsageError
from dagger_jax.model.qwen3 import Qwen3Config
from dagger_jax.train import cli as train_cli
from dagger_jax.train import plan as P

PAPER = ("qwen3_4b_swe", "qwen3_8b_swe")
MESH_64 = "data=1,fsdp=64,tensor=1"


def run_plan(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [configlib.REPO_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
  return subprocess.run([sys.executable, "-m", "dagger_jax.cli", "plan", *args],
                        capture_output=True, text=True, timeout=timeout, env=env,
                        cwd=configlib.REPO_ROOT)


def paper(name: str):
  return configlib.load(f"{configlib.REPO_ROOT}/configs/{name}.py")


def expected_state(model_config, fsdp: int) -> dict[str, int]:
  """Per-device bytes from the parameter count: every matrix has the model dimension, which
  fsdp shards; the RMSNorm scales (2 of d and 2 of head_dim per layer, the final d) are
  replicated. Float32 params; Adam's mu and nu in the param dtype plus its int32 step count."""
  c = Qwen3Config.from_config(model_config)
  assert c.param_dtype == "float32" and c.hidden_size % fsdp == 0
  replicated = c.num_layers * (2 * c.hidden_size + 2 * c.head_dim) + c.hidden_size
  matrices = c.num_params() - replicated
  params = 4 * (matrices // fsdp + replicated)
  return {"params": params, "opt_state": 2 * params + 4, "grads": params}


def tiny(layers: int = 6, max_len: int = 512):
  config = configlib.load(f"{configlib.REPO_ROOT}/configs/base.py")
  config.model.num_layers, config.data.max_len = layers, max_len
  config.train.batch_size, config.mesh.data, config.mesh.fsdp = 16, 1, 8
  return config


# --------------------------------------------------------------------------------- the mesh


def test_mesh_flag_overrides_and_errors_name_the_flag():
  assert P.resolve_mesh("data=1,fsdp=64,tensor=1", None) == {"data": 1, "fsdp": 64, "tensor": 1}
  assert P.resolve_mesh("fsdp=8", None) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert P.resolve_mesh(None, tiny().mesh) == {"data": 1, "fsdp": 8, "tensor": 1}
  for spec, needle in [("fsdp=x", "--mesh fsdp=x"), ("fsdp=-1", "--num-devices"),
                       ("pipe=2", "unknown axis")]:
    with pytest.raises(UsageError, match=needle):
      P.resolve_mesh(spec, None)
  with pytest.raises(UsageError, match="--mesh data=1,fsdp=64"):  # paper configs: fsdp=-1
    P.resolve_mesh(None, paper("qwen3_8b_swe").mesh)
  assert P.resolve_mesh(None, paper("qwen3_8b_swe").mesh, 16)["fsdp"] == 16


# ------------------------------------------------------------------ compiled, in this process


def test_reduced_depth_scales_to_the_full_depth_compile():
  """Compiling 1 and 2 layers and scaling per layer gives the full-depth compile's figures."""
  config = tiny(layers=6)
  full = P.make_plan(config, device="cpu", full_depth=True)
  scaled = P.make_plan(config, device="cpu")
  assert full.compiler["compiled_layers"] == [6] and scaled.compiler["compiled_layers"] == [1, 2]
  for k in ("argument", "output", "alias"):  # linear in the layers: exactly
    assert scaled.compiler[k] == full.compiler[k], k
  assert abs(scaled.compiler["temp"] - full.compiler["temp"]) <= 0.02 * full.compiler["temp"]
  assert scaled.compiler_flops == pytest.approx(full.compiler_flops, rel=0.01)
  for p in (full, scaled):
    pd = p.per_device_bytes
    assert pd == {**pd, **expected_state(config.model, 8)}
    assert sum(pd[k] for k in ("params", "opt_state", "grads", "activations", "other")) == \
        pd["total"]
    c = p.compiler
    assert pd["total"] == c["argument"] + c["output"] - c["alias"] + c["temp"] + c[
        "generated_code"]
    # on CPU `auto` is xla_blocks, whose t^2 probabilities and bias the compiler's figure holds
    assert p.attention["implementation"] == "xla_blocks"
    assert pd["activations"] >= p.attention["probs"] + p.attention["mask_bias"] > 0
    assert p.fits and not p.fixes


def test_verb_prints_json_and_exits_0_when_it_fits(capsys):
  args = argparse.Namespace(mesh="data=2,fsdp=4,tensor=1", num_devices=None, device="h100",
                            mfu=0.5, json=True, no_compile=False, full_depth=False)
  assert train_cli.plan(args, tiny(layers=2, max_len=256)) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["fits"] is True and out["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert out["device_bytes"] == 80 * 2 ** 30 and out["step_flops"] > 0
  assert set(out["per_device_bytes"]) >= {"params", "opt_state", "grads", "activations", "total"}
  assert out["step_time_s"] == pytest.approx(
      out["step_flops"] / (8 * 989e12 * 0.5), rel=1e-6)


# ------------------------------------------------------------ the paper configs, 64 devices


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_state_on_64_devices(name):
  """At 32768 tokens, in a child process with 64 simulated devices (this one has 8)."""
  config = paper(name)
  p = P.make_plan(config, mesh=MESH_64, device="v5p", use_compiler=False)
  pd = p.per_device_bytes
  assert pd == {**pd, **expected_state(config.model, 64)}
  assert p.batch["rows_per_device"] == 1 and p.batch["max_len"] == 32768
  # on a TPU `auto` is flash_jax: no t x t term; without remat every layer keeps its residuals
  assert p.remat.startswith("none") and p.attention["implementation"] == "flash_jax"
  assert p.attention["probs"] == p.attention["mask_bias"] == 0 < p.attention["lse"]
  assert not p.fits and any("--config.train.remat=full" in f for f in p.fixes)
  assert any("max_len" in f for f in p.fixes)


def test_activations_grow_linearly_with_flash_attention_quadratically_without():
  """The paper's 4B config on 8 devices (8 rows each), from shapes: 32768 vs 8192 tokens is ~4x
  with the attention a TPU gets (flash_jax), over 10x with xla_blocks' t^2 probabilities."""
  ratios = {}
  for attention in ("auto", "xla_blocks"):
    acts = []
    for max_len in (8192, 32768):
      config = paper("qwen3_4b_swe")
      config.model.attention, config.data.max_len = attention, max_len
      p = P.make_plan(config, mesh="data=1,fsdp=8,tensor=1", device="v5p", use_compiler=False)
      acts.append(p.per_device_bytes["activations"])
    ratios[attention] = acts[1] / acts[0]
  assert 3.5 < ratios["auto"] <= 4.0 < 10 < ratios["xla_blocks"], ratios


def test_compiled_activations_at_32k_are_about_4x_those_at_8k():
  """The compiler's figure (the demo-sized model, one row per device, flash_jax as on a TPU):
  activations grow ~linearly in max_len, where xla_blocks made them ~12x (README)."""
  acts = []
  for max_len in (8192, 32768):
    config = tiny(layers=2, max_len=max_len)
    config.model.max_position_embeddings = 32768
    config.train.batch_size = 8
    p = P.make_plan(config, device="v5p")
    assert p.attention["implementation"] == "flash_jax" and p.compiler is not None
    acts.append(p.per_device_bytes["activations"])
  assert 3.0 < acts[1] / acts[0] < 4.5, acts


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER)
def test_paper_config_compiled_on_64_devices(name):
  """The real step compiled at 1 and 2 layers on 64 simulated devices (4096 tokens: see the
  module docstring), through the command line; the scaled arguments are the exact state."""
  out = run_plan("--config", f"configs/{name}.py", "--config.data.max_len=4096",
                 "--mesh", MESH_64, "--device", "v5p", "--json")
  plan = json.loads(out.stdout)
  assert out.returncode == (0 if plan["fits"] else 1), out.stderr
  pd, c = plan["per_device_bytes"], plan["compiler"]
  assert pd == {**pd, **expected_state(paper(name).model, 64)}
  assert c["compiled_layers"] == [1, 2]
  scalars_and_batch = c["argument"] - pd["params"] - pd["opt_state"]
  # the int32 step, the uint32[2] rng, and one row of the batch: 5 int32 fields and the uint8
  # loss mask (label_ids only count with normalize=turn; jit drops an unused argument)
  assert paper(name).train.normalize == "token"
  assert scalars_and_batch == 4 + 8 + 4096 * (5 * 4 + 1)
  assert pd["activations"] > plan["attention"]["probs"]
  assert plan["compiler_flops"] > 0.4 * plan["step_flops"]


def test_grad_accumulation_keeps_the_fsdp_gather_inside_its_loop():
  """With grad_accum > 1 the step scans over micro-batches. XLA hoisted the FSDP all-gather of
  the (loop-invariant) params out of that loop, so the whole gathered model stayed live through
  it: 104 MiB more temporaries than grad_accum=1 for this 4-layer, 512-wide model (the model's
  float32 params are ~64 MiB), and 2.4 GB per layer for the 8B at fsdp=8. The trainer's
  optimization barrier ties the params to each micro-batch: 10 MiB more here."""
  from dagger_jax.train import trainer as T

  def temp(accum):
    c = configlib.load(f"{configlib.REPO_ROOT}/configs/base.py")
    m = c.model
    m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads = 4, 512, 2048, 8
    m.num_kv_heads, m.head_dim, m.vocab_size, m.init_from = 4, 64, 1024, ""
    c.data.max_len = 64
    c.train.batch_size, c.train.grad_accum, c.mesh.data, c.mesh.fsdp = 8 * accum, accum, 1, 8
    return P.compile_step(c, T.mesh_from_config(c.mesh))["temp"], Qwen3Config.from_config(m)

  (one, model), (two, _) = temp(1), temp(2)
  quarter_of_the_params = model.num_params() * 4 / 4  # float32 bytes / 4
  assert two - one < quarter_of_the_params, (one / 2**20, two / 2**20)


# ------------------------------------------------------------------------------- the verdict


def test_does_not_fit_exits_1_naming_the_fixes():
  """8B with float32 params and Adam on one H100: the state alone (~122 GiB) cannot fit, so
  nothing is compiled; through the command line (one device: planned in the verb's process)."""
  out = run_plan("--config", "configs/qwen3_8b_swe.py", "--mesh", "data=1,fsdp=1,tensor=1",
                 "--device", "h100")
  assert out.returncode == 1, out.stderr
  assert "DOES NOT FIT" in out.stdout
  message = out.stderr.strip().splitlines()[-1]
  assert message.startswith("dagger-jax plan: qwen3_8b_swe does not fit")
  for fix in ("more fsdp", "--mesh data=1,fsdp=", "param_dtype=bfloat16", "max_len"):
    assert fix in message, fix
  out = run_plan("--config", "configs/qwen3_8b_swe.py", "--mesh", "data=1,fsdp=1,tensor=1",
                 "--device", "h100", "--json")
  assert out.returncode == 1
  plan = json.loads(out.stdout)
  assert plan["fits"] is False and plan["compiler"] is None and plan["fixes"]
  assert plan["per_device_bytes"]["params"] == expected_state(paper("qwen3_8b_swe").model, 1)[
      "params"]
