"""launch/tpu.sh and launch/gpu.sh: the exact commands --dry-run prints, the errors for missing
settings, and real runs against fake gcloud / srun / dagger-jax (the quoting survives every hop,
the rollout server starts before the verb and is stopped after it)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

import support

REPO = pathlib.Path(__file__).resolve().parent.parent
TPU = REPO / "launch" / "tpu.sh"
GPU = REPO / "launch" / "gpu.sh"
BASH = shutil.which("bash")
# Settings the scripts read from the environment: a test sets the ones it means.
SETTINGS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "TPU_SPOT",
            "REMOTE_DIR", "REMOTE_PYTHON", "SERVE_MODEL", "SERVE_PORT", "SERVE_WORKER",
            "SERVE_NODE", "SERVE_GPUS", "NODES", "GPUS_PER_NODE", "PARTITION", "DAGGER",
            "DAGGER_JAX_DIR")
# What a quoting bug would break: spaces, both quotes, $, a backslash, a glob.
TRICKY = ["--config", "configs/qwen3_8b_swe.py", "--config.workdir=runs/my run",
          "--config.teacher.system_prompt=You're a careful engineer", "--prompt",
          'say "$HOME" \\n *']


@pytest.fixture(scope="module")
def bare_path(tmp_path_factory):
  """A PATH with only what --dry-run needs: no gcloud, srun, curl (this machine may have them)."""
  bin_dir = tmp_path_factory.mktemp("bare_bin")
  for tool in ("dirname", "seq", "cat"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  return str(bin_dir)


def launch(script, *args, env=None, path=None, timeout=60):
  e = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("SLURM_")}
  if path is not None:
    e["PATH"] = path
  e.update(env or {})
  return subprocess.run([BASH, str(script), *args], capture_output=True, text=True, env=e,
                        timeout=timeout, cwd="/")


def dry(script, *args, env=None, path=None):
  out = launch(script, "--dry-run", *args, env=env, path=path)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def bash_words(line):
  """The words bash makes of one simple command line (shlex differs, e.g. on "\\$")."""
  out = subprocess.run([BASH, "-c", 'w() { printf "%s\\0" "$@"; }; w ' + line],
                       capture_output=True, text=True, check=True, timeout=30)
  return out.stdout.split("\0")[:-1]


def remote_argv(line):
  """The words of the last `&&` part of the command a `gcloud ... ssh --command CMD` line runs."""
  words = bash_words(line)
  return bash_words(words[words.index("--command") + 1].split(" && ")[-1])


# --- TPU, --dry-run ------------------------------------------------------------------------------

def test_tpu_create_and_setup(bare_path):
  env = {"TPU_NAME": "my-v5p-64", "ZONE": "us-east5-a", "PROJECT": "my-proj"}
  lines = dry(TPU, "--create", "--accelerator-type", "v5p-64",
              "--runtime-version=tpu-ubuntu2204-base", "setup", env=env, path=bare_path)
  where = "--zone=us-east5-a --project=my-proj"
  assert lines == [
      f"gcloud compute tpus tpu-vm describe my-v5p-64 {where} --format='value(state)' "
      f">/dev/null 2>&1 || gcloud compute tpus tpu-vm create my-v5p-64 {where} "
      "--accelerator-type=v5p-64 --version=tpu-ubuntu2204-base",
      "tar czf /tmp/dagger_jax_src.tgz --exclude=./.venv --exclude=./runs --exclude=./.git "
      f"--exclude=__pycache__ --exclude='*.egg-info' -C {REPO} .",
      "gcloud compute tpus tpu-vm scp /tmp/dagger_jax_src.tgz "
      f"my-v5p-64:/tmp/dagger_jax_src.tgz {where} --worker=all",
      f"gcloud compute tpus tpu-vm ssh my-v5p-64 {where} --worker=all --command "
      "\"mkdir -p dagger_jax && tar xzf /tmp/dagger_jax_src.tgz -C dagger_jax && cd dagger_jax "
      "&& (python3.11 -m venv .venv || (sudo apt-get update -qq && sudo apt-get install -y -qq "
      "python3.11 python3.11-venv && python3.11 -m venv --clear .venv)) && .venv/bin/pip install "
      "-q -U pip && .venv/bin/pip install -q -e '.[tpu]'\"",
  ]


def test_tpu_create_spot_with_extra_args_and_nothing_else(bare_path):
  lines = dry(TPU, "--name", "t1", "--zone", "europe-west4-a", "--create", "--spot",
              "--accelerator-type", "v5litepod-16", "--runtime-version", "v2-alpha-tpuv5-lite",
              "--create-arg=--network=my net", path=bare_path)
  assert lines == [
      "gcloud compute tpus tpu-vm describe t1 --zone=europe-west4-a --format='value(state)' "
      ">/dev/null 2>&1 || gcloud compute tpus tpu-vm create t1 --zone=europe-west4-a "
      "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot --network='my net'"]


def test_tpu_reuse_runs_the_verb_on_all_workers_with_its_quoting(bare_path):
  # A flag wins over its environment variable.
  env = {"TPU_NAME": "from-env", "ZONE": "us-east5-a", "REMOTE_DIR": "work/dj"}
  lines = dry(TPU, "--name", "my-v5p-64", "dagger", *TRICKY, env=env, path=bare_path)
  assert lines == [
      "gcloud compute tpus tpu-vm describe my-v5p-64 --zone=us-east5-a --format='value(state)'",
      "gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a --worker=all --command "
      r'''"cd work/dj && DAGGER_JAX_MULTIHOST=1 .venv/bin/dagger-jax dagger --config '''
      r'''configs/qwen3_8b_swe.py --config.workdir='runs/my run' '''
      r'''--config.teacher.system_prompt=\"You're a careful engineer\" --prompt '''
      r''''say \"\$HOME\" \\n *'"''',
  ]
  assert remote_argv(lines[1]) == ["DAGGER_JAX_MULTIHOST=1", ".venv/bin/dagger-jax", "dagger",
                                   *TRICKY]


def test_tpu_serve_starts_waits_runs_stops(bare_path):
  env = {"TPU_NAME": "my-v5p-64", "ZONE": "us-east5-a"}
  lines = dry(TPU, "--serve", "runs/hf student", "--serve-port", "30001", "--serve-worker=1",
              "--env", "OPENAI_API_KEY=sk-1 2", "train", "--config", "configs/qwen3_8b_swe.py",
              env=env, path=bare_path)
  ssh = "gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a"
  assert lines == [
      "gcloud compute tpus tpu-vm describe my-v5p-64 --zone=us-east5-a --format='value(state)'",
      f"{ssh} --worker=1 --command 'cd dagger_jax && mkdir -p runs && "
      "(OPENAI_API_KEY='\\''sk-1 2'\\'' JAX_PLATFORMS=cpu nohup .venv/bin/dagger-jax serve "
      "--model '\\''runs/hf student'\\'' --host 0.0.0.0 --port 30001 > runs/serve_30001.log 2>&1 "
      "< /dev/null & echo $! > runs/serve_30001.pid)'",
      f"{ssh} --worker=1 --command \"cd dagger_jax && timeout 1800 bash -c 'until curl -sf "
      "http://127.0.0.1:30001/health >/dev/null; do kill -0 \\$(cat runs/serve_30001.pid) || "
      "exit 1; sleep 2; done'\"",
      f"{ssh} --worker=all --command \"cd dagger_jax && OPENAI_API_KEY='sk-1 2' "
      "DAGGER_JAX_MULTIHOST=1 .venv/bin/dagger-jax train --config configs/qwen3_8b_swe.py\"",
      f"{ssh} --worker=1 --command 'cd dagger_jax && kill $(cat runs/serve_30001.pid)'",
  ]
  assert remote_argv(lines[3])[:3] == ["OPENAI_API_KEY=sk-1 2", "DAGGER_JAX_MULTIHOST=1",
                                       ".venv/bin/dagger-jax"]
  out = launch(TPU, "--dry-run", "--serve", "m", "plan", env=env, path=bare_path)
  assert "rollout server: worker 0 port 30000" in out.stderr
  assert "dagger_jax/runs/serve_30000.log" in out.stderr  # the log path is printed


@pytest.mark.parametrize("args,env,says", [
    (["train"], {"ZONE": "z"}, "set TPU_NAME=NAME or pass --name NAME"),
    (["train"], {"TPU_NAME": "t"}, "set ZONE=ZONE"),
    ([], {"TPU_NAME": "t", "ZONE": "z"}, "no verb"),
    (["--create", "setup"], {"TPU_NAME": "t", "ZONE": "z", "RUNTIME_VERSION": "v"},
     "set ACCELERATOR_TYPE or pass --accelerator-type"),
    (["--create", "setup"], {"TPU_NAME": "t", "ZONE": "z", "ACCELERATOR_TYPE": "v4-8"},
     "set RUNTIME_VERSION or pass --runtime-version"),
    (["--serve", "m", "setup"], {"TPU_NAME": "t", "ZONE": "z"}, "--serve starts a server"),
    (["--serve", "m", "--serve-port", "0", "train"], {"TPU_NAME": "t", "ZONE": "z"},
     "--serve-port 0"),
    (["--worker", "3", "train"], {"TPU_NAME": "t", "ZONE": "z"}, "unknown option --worker"),
    (["--zone"], {"TPU_NAME": "t"}, "--zone needs a value"),
    (["setup", "now"], {"TPU_NAME": "t", "ZONE": "z"}, "setup takes no arguments"),
    (["--env", "X", "train"], {"TPU_NAME": "t", "ZONE": "z"}, "expected NAME=VALUE"),
])
def test_tpu_errors_name_the_setting(bare_path, args, env, says):
  out = launch(TPU, "--dry-run", *args, env=env, path=bare_path)
  assert out.returncode == 2
  assert out.stdout == ""
  assert says in out.stderr and out.stderr.startswith("launch/tpu.sh: ")


def test_tpu_needs_gcloud_only_without_dry_run(bare_path):
  out = launch(TPU, "--name", "t", "--zone", "z", "train", path=bare_path)
  assert out.returncode == 2 and "gcloud not found" in out.stderr


# --- GPU, --dry-run ------------------------------------------------------------------------------

def test_gpu_single_node(bare_path):
  lines = dry(GPU, "train", *TRICKY, path=bare_path)
  assert lines == [
      f"cd {REPO}",
      ".venv/bin/dagger-jax train --config configs/qwen3_8b_swe.py "
      "--config.workdir='runs/my run' --config.teacher.system_prompt=\"You're a careful "
      "engineer\" --prompt 'say \"$HOME\" \\n *'"]
  assert bash_words(lines[1]) == [".venv/bin/dagger-jax", "train", *TRICKY]


def test_gpu_slurm_nodes(bare_path):
  lines = dry(GPU, "--nodes", "4", "--gpus-per-node=8", "--partition", "gpu",
              "--srun-arg=--time=04:00:00", "--srun-arg", "--cpus-per-task=64", "train",
              "--config", "configs/qwen3_8b_swe.py", "--shards", "runs/x y/round_000",
              path=bare_path)
  assert lines == [
      f"cd {REPO}",
      "srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --kill-on-bad-exit=1 "
      "--partition=gpu --time=04:00:00 --cpus-per-task=64 env DAGGER_JAX_MULTIHOST=1 "
      "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 .venv/bin/dagger-jax train --config "
      "configs/qwen3_8b_swe.py --shards 'runs/x y/round_000'"]


def test_gpu_one_node_allocation_runs_directly(bare_path):
  lines = dry(GPU, "plan", env={"SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "8"},
              path=bare_path)
  assert lines == [f"cd {REPO}", ".venv/bin/dagger-jax plan"]


def test_gpu_serve_single_node(bare_path):
  out = launch(GPU, "--dry-run", "--serve", "runs/hf student", "--serve-port", "30001",
               "--serve-gpus", "7", "dagger", "--config", "configs/qwen3_4b_swe.py",
               path=bare_path)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      f"cd {REPO}",
      "mkdir -p runs && (nohup env XLA_PYTHON_CLIENT_PREALLOCATE=false CUDA_VISIBLE_DEVICES=7 "
      ".venv/bin/dagger-jax serve --model 'runs/hf student' --host 127.0.0.1 --port 30001 > "
      "runs/serve_30001.log 2>&1 < /dev/null & echo $! > runs/serve_30001.pid)",
      "timeout 1800 bash -c 'until curl -sf http://127.0.0.1:30001/health >/dev/null; do kill -0 "
      "$(cat runs/serve_30001.pid) || exit 1; sleep 2; done'",
      ".venv/bin/dagger-jax dagger --config configs/qwen3_4b_swe.py",
      "kill $(cat runs/serve_30001.pid)"]
  assert f"rollout server: http://127.0.0.1:30001, log {REPO}/runs/serve_30001.log" in out.stderr


def test_gpu_serve_inside_a_slurm_allocation(bare_path):
  # What sbatch -N 2 --gpus-per-node=4 sets: the node and GPU counts come from it.
  env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"}
  lines = dry(GPU, "--serve", "runs/hf", "--serve-node", "1", "dagger", "--config", "c.py",
              env=env, path=bare_path)
  assert lines == [
      f"cd {REPO}",
      "mkdir -p runs && (nohup srun --nodes=1 --ntasks=1 --relative=1 --overlap "
      "--gpus-per-node=4 env XLA_PYTHON_CLIENT_PREALLOCATE=false .venv/bin/dagger-jax serve "
      "--model runs/hf --host 0.0.0.0 --port 30000 > runs/serve_30000.log 2>&1 < /dev/null & "
      "echo $! > runs/serve_30000.pid)",
      "timeout 1800 bash -c 'until curl -sf http://$(scontrol show hostnames "
      "\"$SLURM_JOB_NODELIST\" | sed -n 2p):30000/health >/dev/null; do kill -0 "
      "$(cat runs/serve_30000.pid) || exit 1; sleep 2; done'",
      "srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 --kill-on-bad-exit=1 env "
      "DAGGER_JAX_MULTIHOST=1 JAX_LOCAL_DEVICE_IDS=0,1,2,3 .venv/bin/dagger-jax dagger --config "
      "c.py",
      "kill $(cat runs/serve_30000.pid)"]


def test_gpu_finds_the_checkout_from_an_sbatch_copy(bare_path, tmp_path):
  spool = tmp_path / "slurmd" / "job4242"
  spool.mkdir(parents=True)
  shutil.copy(GPU, spool / "slurm_script")
  out = launch(spool / "slurm_script", "--dry-run", "plan", path=bare_path)
  assert out.returncode == 2 and "DAGGER_JAX_DIR" in out.stderr
  lines = dry(spool / "slurm_script", "plan", env={"SLURM_SUBMIT_DIR": str(REPO)},
              path=bare_path)
  assert lines == [f"cd {REPO}", ".venv/bin/dagger-jax plan"]


@pytest.mark.parametrize("args,env,says", [
    ([], {}, "no verb"),
    (["--nodes", "2", "train"], {}, "set GPUS_PER_NODE or pass --gpus-per-node G"),
    (["--nodes", "two", "train"], {}, "--nodes two"),
    (["--nodes", "2", "--gpus-per-node", "8", "--serve", "m", "train"], {},
     "under sbatch or salloc"),
    (["--serve", "m", "--serve-node", "1", "train"], {}, "--serve-node 1"),
    (["--serve", "m", "--serve-gpus", "last", "train"], {}, "--serve-gpus last"),
    (["--gpus", "8", "train"], {}, "unknown option --gpus"),
    (["--nodes"], {}, "--nodes needs a value"),
    (["plan"], {"DAGGER_JAX_DIR": "/"}, "is not a dagger_jax checkout"),
])
def test_gpu_errors_name_the_setting(bare_path, args, env, says):
  out = launch(GPU, "--dry-run", *args, env=env, path=bare_path)
  assert out.returncode == 2
  assert out.stdout == ""
  assert says in out.stderr and out.stderr.startswith("launch/gpu.sh: ")


def test_gpu_needs_srun_only_without_dry_run(bare_path, tmp_path):
  checkout = fake_checkout(tmp_path / "checkout", tmp_path / "log.jsonl")
  out = launch(GPU, "--nodes", "2", "--gpus-per-node", "2", "train",
               env={"DAGGER_JAX_DIR": str(checkout)}, path=bare_path)
  assert out.returncode == 2 and "srun not found" in out.stderr


@pytest.mark.parametrize("script", [TPU, GPU])
def test_help(script, bare_path):
  out = launch(script, "--help", path=bare_path)
  assert out.returncode == 0 and out.stderr == ""
  for word in ("usage: launch/", "--dry-run", "--serve", "--serve-port", "examples:"):
    assert word in out.stdout


def test_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  out = subprocess.run(["shellcheck", str(TPU), str(GPU)], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


# --- real runs against fakes ---------------------------------------------------------------------
# The fakes log one JSON object per call; the fake dagger-jax `serve` answers /health until killed.

FAKE_DAGGER = """#!{python}
import http.server, json, os, sys
keys = ("DAGGER_JAX_MULTIHOST", "JAX_LOCAL_DEVICE_IDS", "JAX_PLATFORMS", "OPENAI_API_KEY",
        "XLA_PYTHON_CLIENT_PREALLOCATE", "CUDA_VISIBLE_DEVICES", "SLURM_PROCID", "TPU_WORKER_ID")
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({{"tool": "dagger-jax", "argv": sys.argv[1:], "cwd": os.getcwd(),
                      "pid": os.getpid(), "env": {{k: os.environ.get(k) for k in keys}}}}) + "\\n")
if sys.argv[1:2] == ["serve"]:
  class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      self.send_response(200 if self.path == "/health" else 404)
      self.end_headers()
  port = int(sys.argv[sys.argv.index("--port") + 1])
  host = sys.argv[sys.argv.index("--host") + 1]
  http.server.HTTPServer((host, port), Health).serve_forever()
sys.exit(int(os.environ.get("FAKE_VERB_RC", "0")))
"""

FAKE_GCLOUD = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({{"tool": "gcloud", "argv": args}}) + "\\n")
if args[3] == "describe":
  state = os.environ.get("FAKE_TPU_STATE", "READY")
  if state == "missing":
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
  print(state)
elif args[3] == "ssh":
  worker = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
  command = args[args.index("--command") + 1]
  workers = range(int(os.environ["FAKE_WORKERS"])) if worker == "all" else [int(worker)]
  for w in workers:
    home = os.path.join(os.environ["FAKE_TPU_ROOT"], f"w{{w}}")
    env = dict(os.environ, HOME=home, TPU_WORKER_ID=str(w))
    rc = subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode
    if rc:
      sys.exit(rc)
"""

FAKE_SRUN = """#!{python}
import json, os, signal, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({{"tool": "srun", "argv": args}}) + "\\n")
opts = {{}}
while args[0].startswith("-"):
  key, _, value = args.pop(0).partition("=")
  opts[key] = value
n = int(opts.get("--ntasks") or int(opts["--nodes"]) * int(opts["--ntasks-per-node"]))
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_NTASKS=str(n),
                                         SLURM_LOCALID="0", SLURM_STEP_NODELIST="localhost"))
         for i in range(n)]
signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs])  # srun forwards it
sys.exit(max(p.wait() for p in procs))
"""

FAKE_SCONTROL = """#!/bin/sh
for _ in 1 2 3 4; do echo 127.0.0.1; done
"""


def write_tool(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text.format(python=sys.executable) if "{python}" in text else text)
  path.chmod(0o755)
  return path


def fake_checkout(root, log):
  """A directory the scripts take for a checkout whose .venv/bin/dagger-jax is the fake."""
  (root / "dagger_jax").mkdir(parents=True)
  (root / "dagger_jax" / "cli.py").write_text("")
  write_tool(root / ".venv" / "bin" / "dagger-jax", FAKE_DAGGER)
  return root


def alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def wait_dead(pids, timeout=15.0):
  deadline = time.monotonic() + timeout
  while any(alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  return [p for p in pids if alive(p)]


def read_log(log):
  return [json.loads(line) for line in log.read_text().splitlines()]


def kill_servers(records):
  for r in records:
    if r["tool"] == "dagger-jax" and r["argv"][0] == "serve" and alive(r["pid"]):
      os.kill(r["pid"], 15)


def run_with_fakes(script, args, env, log):
  """Runs `script args` against the fakes (every server it started is stopped afterwards, even on
  a failure); returns the completed process and the fakes' records."""
  try:
    out = launch(script, *args, env=env)
    records = read_log(log)
  finally:
    kill_servers(read_log(log) if log.exists() else [])
  return out, records


def ran_lines(stderr):
  return [line[2:] for line in stderr.splitlines() if line.startswith("+ ")]


needs_curl = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="curl is not installed (the server wait uses it)")


@needs_curl
def test_tpu_run_with_fake_gcloud(tmp_path):
  log = tmp_path / "log.jsonl"
  root = tmp_path / "tpu"
  for w in range(2):
    fake_checkout(root / f"w{w}" / "dagger_jax", log)
  bin_dir = tmp_path / "bin"
  write_tool(bin_dir / "gcloud", FAKE_GCLOUD)
  port = support.free_port()
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
         "FAKE_TPU_ROOT": str(root), "FAKE_WORKERS": "2", "TPU_NAME": "my-tpu",
         "ZONE": "us-east5-a"}
  args = ["--serve", "runs/hf", "--serve-port", str(port), "--serve-worker", "1",
          "--env", "OPENAI_API_KEY=sk-1 2", "dagger", *TRICKY]
  out, records = run_with_fakes(TPU, args, env, log)
  assert out.returncode == 0, out.stderr
  # It ran exactly what --dry-run prints.
  assert ran_lines(out.stderr) == dry(TPU, *args, env=env)
  verbs = [r for r in records if r["tool"] == "dagger-jax"]
  serve, train = verbs[0], verbs[1:]
  assert serve["argv"] == ["serve", "--model", "runs/hf", "--host", "0.0.0.0", "--port", str(port)]
  assert serve["env"]["TPU_WORKER_ID"] == "1" and serve["env"]["JAX_PLATFORMS"] == "cpu"
  assert [r["env"]["TPU_WORKER_ID"] for r in train] == ["0", "1"]
  for r in train:
    assert r["argv"] == ["dagger", *TRICKY]
    assert r["env"]["DAGGER_JAX_MULTIHOST"] == "1" and r["env"]["OPENAI_API_KEY"] == "sk-1 2"
  assert wait_dead([serve["pid"]]) == []  # stopped after the verb
  assert (root / "w1" / "dagger_jax" / "runs" / f"serve_{port}.log").exists()
  workers = [next(a for a in r["argv"] if a.startswith("--worker")) for r in records
             if r["tool"] == "gcloud" and r["argv"][3] == "ssh"]
  assert workers == ["--worker=1", "--worker=1", "--worker=all", "--worker=1"]


@pytest.mark.parametrize("state,says", [("missing", "add --create --accelerator-type TYPE"),
                                        ("CREATING", "is CREATING, not READY")])
def test_tpu_reuse_checks_the_slice(tmp_path, state, says):
  log = tmp_path / "log.jsonl"
  bin_dir = tmp_path / "bin"
  write_tool(bin_dir / "gcloud", FAKE_GCLOUD)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
         "FAKE_TPU_STATE": state, "TPU_NAME": "t", "ZONE": "z"}
  out = launch(TPU, "train", env=env)
  assert out.returncode == 2 and says in out.stderr
  assert [r["argv"][3] for r in read_log(log)] == ["describe"]  # nothing ran on the workers


@needs_curl
@pytest.mark.parametrize("nodes", [1, 2])
def test_gpu_run_with_fake_srun(tmp_path, nodes):
  log = tmp_path / "log.jsonl"
  checkout = fake_checkout(tmp_path / "checkout", log)
  bin_dir = tmp_path / "bin"
  write_tool(bin_dir / "srun", FAKE_SRUN)
  write_tool(bin_dir / "scontrol", FAKE_SCONTROL)
  port = support.free_port()
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
         "DAGGER_JAX_DIR": str(checkout)}
  if nodes > 1:
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES=str(nodes), SLURM_GPUS_ON_NODE="4",
               SLURM_JOB_NODELIST="node[1-2]")
  args = ["--serve", "runs/hf", "--serve-port", str(port), "--serve-node", str(nodes - 1),
          "train", *TRICKY]
  out, records = run_with_fakes(GPU, args, env, log)
  assert out.returncode == 0, out.stderr
  assert ran_lines(out.stderr) == dry(GPU, *args, env=env)
  verbs = [r for r in records if r["tool"] == "dagger-jax"]
  serve, train = verbs[0], verbs[1:]
  host = "127.0.0.1" if nodes == 1 else "0.0.0.0"
  assert serve["argv"] == ["serve", "--model", "runs/hf", "--host", host, "--port", str(port)]
  assert serve["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert len(train) == nodes
  for r in train:
    assert r["argv"] == ["train", *TRICKY] and r["cwd"] == str(checkout)
  if nodes == 1:
    assert train[0]["env"]["DAGGER_JAX_MULTIHOST"] is None
    assert [r for r in records if r["tool"] == "srun"] == []
  else:
    assert sorted(r["env"]["SLURM_PROCID"] for r in train) == ["0", "1"]
    for r in train:
      assert r["env"]["DAGGER_JAX_MULTIHOST"] == "1"
      assert r["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  pid = int((checkout / "runs" / f"serve_{port}.pid").read_text())  # nohup srun, or the server
  assert wait_dead([serve["pid"], pid]) == []  # stopped after the verb
  assert (checkout / "runs" / f"serve_{port}.log").exists()
  assert f"rollout server: http://127.0.0.1:{port}, log {checkout}/runs" in out.stderr


@needs_curl
def test_gpu_run_returns_the_verbs_failure_and_stops_the_server(tmp_path):
  log = tmp_path / "log.jsonl"
  checkout = fake_checkout(tmp_path / "checkout", log)
  port = support.free_port()
  env = {"DAGGER_JAX_DIR": str(checkout), "FAKE_LOG": str(log), "FAKE_VERB_RC": "3"}
  out, records = run_with_fakes(GPU, ["--serve", "runs/hf", "--serve-port", str(port), "dagger"],
                                env, log)
  assert out.returncode == 3, out.stderr
  assert [r["argv"][0] for r in records] == ["serve", "dagger"]
  assert wait_dead([records[0]["pid"]]) == []
  assert ran_lines(out.stderr)[-1] == f"kill $(cat runs/serve_{port}.pid)"
