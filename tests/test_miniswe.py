"""mini-swe-agent compatibility, end to end with the real package (no mocks).

The real `minisweagent.DefaultAgent` runs toy tasks in its `LocalEnvironment` inside a fresh
checkout of the task's repository, with its text-mode templates (`mini_textbased.yaml`): once with
mini-swe-agent's replaying test model scripted with the oracle's commands (a format error first,
then the fix and a submission), once with its litellm text-based model talking real HTTP to
`dagger-jax serve` over a tiny random model (garbage replies: the run must end normally). Their
trajectory files go through `dagger-jax import-trajectories`; the records are checked turn by
turn, graded, and rendered with `dagger-jax shards build`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile

# Before minisweagent / litellm are imported: litellm fetches its model-cost map from the internet
# at import unless told to use its bundled copy (there is no internet here); minisweagent makes
# and reads a config folder in the home directory and prints a banner; its model retries a failed
# request for minutes unless told otherwise.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MSWEA_GLOBAL_CONFIG_DIR",
                      os.path.join(tempfile.gettempdir(), "dagger_jax_test_mswea_config"))
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
os.environ.setdefault("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from minisweagent.agents.default import DefaultAgent  # noqa: E402
from minisweagent.config import builtin_config_dir  # noqa: E402
from minisweagent.environments.local import LocalEnvironment  # noqa: E402
from minisweagent.models.litellm_textbased_model import (  # noqa: E402
    LitellmTextbasedModel, LitellmTextbasedModelConfig)
from minisweagent.models.test_models import (  # noqa: E402
    DeterministicModel, DeterministicModelConfig, make_output)
from minisweagent.models.utils.actions_text import parse_regex_actions  # noqa: E402

import support  # noqa: E402
from configs import base as base_config  # noqa: E402
from dagger_jax import cli, configlib  # noqa: E402
from dagger_jax.data import miniswe, shards  # noqa: E402
from dagger_jax.data.trajectory import read_jsonl  # noqa: E402
from dagger_jax.envs import grading, protocol  # noqa: E402
from dagger_jax.envs.sandbox import ExecResult  # noqa: E402
from dagger_jax.envs.tasks import materialize, toy  # noqa: E402
from dagger_jax.model import hf, loader  # noqa: E402
from dagger_jax.policies import oracle  # noqa: E402
from dagger_jax.policies.serve import Server  # noqa: E402

DEMO_CONFIG = os.path.join(configlib.REPO_ROOT, "configs", "demo.py")
DEMO_TOKENIZER = os.path.join(configlib.REPO_ROOT, "assets", "demo_base", "tokenizer")
with open(builtin_config_dir / "mini_textbased.yaml", encoding="utf-8") as _f:
  TEXTBASED = yaml.safe_load(_f)
MSWEA_REGEX = LitellmTextbasedModelConfig.model_fields["action_regex"].default
BASH_V1_REGEX = r"```bash\s*\n(.*?)\n```"


def agent_kwargs(**changes) -> dict:
  """mini_textbased.yaml's agent templates; no cost limit (the test model bills 1.0 a call)."""
  agent = TEXTBASED["agent"]
  return {"system_template": agent["system_template"],
          "instance_template": agent["instance_template"], "cost_limit": 0.0, **changes}


def model_templates() -> dict:
  model = TEXTBASED["model"]
  return {k: model[k] for k in ("observation_template", "format_error_template")}


def local_env(repo: str) -> LocalEnvironment:
  return LocalEnvironment(cwd=repo, env=TEXTBASED["environment"]["env"], timeout=30)


class ReplayConfig(DeterministicModelConfig):
  action_regex: str = MSWEA_REGEX
  format_error_template: str = TEXTBASED["model"]["format_error_template"]


class ReplayTextModel(DeterministicModel):
  """mini-swe-agent's replaying test model, whose replies are parsed as its text-based litellm
  model parses them (the same `parse_regex_actions`: a reply without exactly one block raises
  the same FormatError, with the reply kept in `extra.model_response`)."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.config = ReplayConfig(**kwargs)

  def query(self, messages, **kwargs):
    message = super().query(messages, **kwargs)
    actions = parse_regex_actions(message["content"], action_regex=self.config.action_regex,
                                  format_error_template=self.config.format_error_template,
                                  template_kwargs={"finish_reason": "stop"})
    return {**message, "extra": {**message["extra"], "actions": actions}}


@pytest.fixture(scope="module")
def task():
  return toy.generate(1, seed=5)[0]


@pytest.fixture(scope="module")
def scripted(task, tmp_path_factory):
  """A solved run's trajectory file, in the swebench runner's layout <iid>/<iid>.traj.json."""
  tmp = tmp_path_factory.mktemp("scripted")
  repo = str(tmp / "repo")
  materialize(task, repo)
  plan = oracle.Plan.of(task)
  replies = [
      "THOUGHT: I will look for the function first.",  # no command block: a format error
      protocol.format_action(f'grep -rn "def {plan.function}(" .',
                             "THOUGHT: Find the function the issue names."),
      protocol.format_action(plan.fix_cmd, "THOUGHT: Replace the line after the def."),
      protocol.format_action(plan.test_cmd, "THOUGHT: Run the tests to check the change."),
      # mini-swe-agent's submission is what the submit command prints after the sentinel (its
      # swebench config: `... && cat patch.txt`); the oracle's bare echo would submit nothing.
      protocol.format_action(f"echo {protocol.SUBMIT_SENTINEL} && git diff",
                             "THOUGHT: The tests pass. Submit."),
  ]
  path = tmp / "mswea" / task["instance_id"] / f"{task['instance_id']}.traj.json"
  model = ReplayTextModel(outputs=[make_output(r, []) for r in replies], **model_templates())
  agent = DefaultAgent(model, local_env(repo), **agent_kwargs(step_limit=10, output_path=path))
  info = agent.run(task["problem_statement"])
  return {"path": str(path), "info": info, "replies": replies,
          "raw": json.loads(path.read_text(encoding="utf-8"))}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def shards_build(capsys, trajectories: str, out: str) -> dict:
  code, _, err = run_cli(capsys, "shards", "build", "--trajectories", trajectories, "--out", out,
                         "--config", DEMO_CONFIG, f"--config.data.tokenizer={DEMO_TOKENIZER}",
                         "--config.data.max_len=4096")
  assert code == 0, err
  return shards.Shard(out).manifest


def test_the_protocol_constants_are_mini_swe_agents_and_ours():
  assert miniswe.ACTION_REGEX == protocol.ACTION_REGEX == MSWEA_REGEX
  assert miniswe.ACTION_FENCE == protocol.ACTION_FENCE


def test_a_solved_run_becomes_teacher_turns_with_its_submission(task, scripted):
  raw, replies = scripted["raw"], scripted["replies"]
  assert scripted["info"]["exit_status"] == "Submitted"
  assert raw["trajectory_format"] == "mini-swe-agent-1.1"
  # mini-swe-agent 2 keeps the reply that broke the format only inside the error message.
  assert [m["role"] for m in raw["messages"][:4]] == ["system", "user", "user", "assistant"]

  traj = miniswe.convert_file(scripted["path"])
  assert traj.task_id == task["instance_id"]  # from the runner's file layout
  assert traj.id.startswith(f"{task['instance_id']}/r0/mswea-") and traj.beta == 1.0
  assert [m["role"] for m in traj.messages] == (["system", "user"] + ["assistant", "user"] * 4
                                                + ["assistant"])
  assert traj.messages[:2] == tuple({"role": m["role"], "content": m["content"]}
                                    for m in raw["messages"][:2])
  assert [m["content"] for m in traj.messages if m["role"] == "assistant"] == replies
  assert traj.messages[3]["content"] == protocol.format_error(0)  # kept, and byte-identical
  observations = [m for m in raw["messages"] if m["role"] == "user" and "raw_output" in
                  m.get("extra", {})]
  assert [m["content"] for m in traj.messages[5::2]] == [m["content"] for m in observations]
  for m in observations:  # what our env would have shown for the same command output
    assert m["content"] == protocol.format_observation(
        ExecResult(m["extra"]["returncode"], m["extra"]["raw_output"], False, 0.0))
  assert traj.messages[9]["content"].startswith("<returncode>0</returncode>")  # tests passed
  for turn, reply in zip(traj.turns, replies):
    assert (turn.actor, turn.reason, turn.intervention) == ("teacher", "coin", None)
    assert turn.action.text == turn.label.text == reply
    assert turn.action.ids is None and turn.label.ids is None
  assert miniswe.unparsed_turns(traj) == 1
  o = traj.outcome
  assert o.submitted and o.resolved is None and o.failure is None
  assert (o.turns, o.teacher_calls) == (5, 5)
  assert o.teacher_tokens == sum(len(r.split()) for r in replies)
  assert o.patch == scripted["info"]["submission"] == raw["info"]["submission"]
  assert oracle.changed_lines(o.patch) == oracle.changed_lines(task["patch"])


@pytest.mark.skipif(shutil.which("bwrap") is None,
                    reason="bubblewrap is not installed (`make sysdeps`)")
def test_the_imported_patch_resolves_the_task(task, scripted):
  env_config = base_config.get_config().env
  env_config.sandbox = "bwrap"
  patch = miniswe.convert_file(scripted["path"]).outcome.patch
  result = grading.grade(task, patch, grading.sandbox_factory(env_config, timeout=120))
  assert result.resolved, result.log
  assert not grading.grade(task, "", grading.sandbox_factory(env_config, timeout=120)).resolved


def test_a_v1_file_converts_to_the_same_record(task, scripted):
  """mini-swe-agent 1.x kept the bad reply as a message, closed with the submission as a user
  message and no exit message, and Anthropic runs kept contents as lists of text parts."""
  raw = scripted["raw"]
  v1 = {"trajectory_format": "mini-swe-agent-1",
        "info": {"exit_status": raw["info"]["exit_status"],
                 "submission": raw["info"]["submission"],
                 "config": {"agent": {"action_regex": MSWEA_REGEX}}},
        "messages": []}
  for m in raw["messages"]:
    if m["role"] == "exit":
      v1["messages"].append({"role": "user", "content": m["content"]})
      continue
    if m.get("extra", {}).get("interrupt_type") == "FormatError":
      v1["messages"].append({"role": "assistant", "content": m["extra"]["model_response"]})
    v1["messages"].append({"role": m["role"], "content": m["content"]})
  system = v1["messages"][0]["content"]
  v1["messages"][0]["content"] = [
      {"type": "text", "text": system[:40]},
      {"type": "text", "text": system[40:], "cache_control": {"type": "ephemeral"}}]
  want = miniswe.convert_file(scripted["path"])
  assert miniswe.to_trajectory(v1, task_id=task["instance_id"]) == want


def test_the_verb_appends_skips_on_rerun_and_the_records_render(task, scripted, tmp_path,
                                                                capsys):
  runs = tmp_path / "mswea"
  runs.mkdir()
  iid = task["instance_id"]
  (runs / iid).mkdir()
  (runs / iid / f"{iid}.traj.json").write_text(json.dumps(scripted["raw"]), encoding="utf-8")
  (runs / "preds.json").write_text(json.dumps({iid: {"instance_id": iid, "model_patch": ""}}),
                                   encoding="utf-8")  # what the batch runner writes beside
  out = tmp_path / "runs" / "x" / "trajectories" / "round_000.jsonl"
  code, stdout, err = run_cli(capsys, "import-trajectories", str(runs), "--out", str(out))
  assert code == 0, err
  assert "2 files: 1 converted (5 turns, 1 submitted), 0 skipped" in stdout
  assert "1 refused" in stdout and f"refused {runs / 'preds.json'}: not a mini-swe-agent" in stdout
  assert "1 of 5 turns do not hold exactly one" in stdout
  records = read_jsonl(out)
  assert records == [miniswe.convert_file(runs / iid / f"{iid}.traj.json")]
  before = out.read_bytes()

  code, stdout, err = run_cli(capsys, "import-trajectories", str(runs), "--out", str(out))
  assert code == 0, err
  assert "0 converted" in stdout and "1 skipped" in stdout
  assert out.read_bytes() == before

  manifest = shards_build(capsys, str(out), str(tmp_path / "shards"))
  assert manifest["source_trajectories"] == [records[0].id]
  assert manifest["stats"]["trained_turns"] == 5 and manifest["trained_tokens"] > 0
  assert not any(k.startswith("dropped") and v for k, v in manifest["stats"].items())


def _mutate(raw: dict, how: str) -> dict:
  raw = copy.deepcopy(raw)
  fe = next(i for i, m in enumerate(raw["messages"])
            if m.get("extra", {}).get("interrupt_type") == "FormatError")
  if how == "bash_v1_regex":
    raw["info"]["config"]["model"]["action_regex"] = BASH_V1_REGEX
  elif how == "tool_calls":
    raw["messages"][3]["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
        "name": "bash", "arguments": json.dumps({"command": "ls"})}}]
  elif how == "image":
    raw["messages"][1]["content"] = [{"type": "text", "text": "see"},
                                     {"type": "image_url", "image_url": {"url": "data:,"}}]
  elif how == "format":
    raw["trajectory_format"] = "mini-swe-agent-9"
  elif how == "lost_reply":
    del raw["messages"][fe]["extra"]["model_response"]
  elif how == "after_exit":
    raw["messages"].append({"role": "user", "content": "more"})
  return raw


@pytest.mark.parametrize("how, field", [
    ("bash_v1_regex", "info.config.model.action_regex"),
    ("tool_calls", "messages[3].tool_calls: a tool-calling trajectory"),
    ("image", "messages[1].content[1]: a 'image_url' part"),
    ("format", "trajectory_format 'mini-swe-agent-9'"),
    ("lost_reply", "messages[2].extra.model_response"),
    ("after_exit", "a message after the exit message"),
])
def test_a_bad_file_is_one_line_exit_2_and_nothing_is_written(scripted, tmp_path, capsys, how,
                                                               field):
  good = tmp_path / "good.json"
  good.write_text(json.dumps(scripted["raw"]), encoding="utf-8")
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(_mutate(scripted["raw"], how)), encoding="utf-8")
  out = tmp_path / "out.jsonl"
  code, stdout, err = run_cli(capsys, "import-trajectories", str(good), str(bad), "--out",
                              str(out), "--task-id", "t1")
  assert code == 2 and not out.exists()
  assert err.count("\n") == 1 and err.startswith(f"dagger-jax import-trajectories: {bad}: ")
  assert field in err


def test_files_that_are_not_trajectories_or_cut_off(tmp_path, capsys):
  cut = tmp_path / "cut.traj.json"
  cut.write_text('{"messages": [{"role": "system", "con', encoding="utf-8")
  code, _, err = run_cli(capsys, "import-trajectories", str(cut), "--out",
                         str(tmp_path / "o.jsonl"))
  assert code == 2 and f"{cut}:1: not valid JSON" in err
  code, _, err = run_cli(capsys, "import-trajectories", str(tmp_path / "missing"), "--out",
                         str(tmp_path / "o.jsonl"))
  assert code == 2 and "no such file or directory" in err


def test_the_task_id_comes_from_the_file_or_the_flag(task, scripted, tmp_path, capsys):
  loose = tmp_path / "last_mini_run.traj.json"  # `mini`'s default output: names no task
  loose.write_text(json.dumps(scripted["raw"]), encoding="utf-8")
  out = tmp_path / "out.jsonl"
  code, _, err = run_cli(capsys, "import-trajectories", str(loose), "--out", str(out))
  assert code == 2 and "pass --task-id ID" in err and not out.exists()
  code, _, err = run_cli(capsys, "import-trajectories", str(loose), "--out", str(out),
                         "--task-id", "mine", "--round", "2")
  assert code == 0, err
  (record,) = read_jsonl(out)
  assert (record.task_id, record.round) == ("mine", 2) and record.id.startswith("mine/r2/mswea-")
  named = dict(scripted["raw"], instance_id=task["instance_id"])  # as the batch runner saves
  assert miniswe.task_id_of(named) == task["instance_id"]
  assert miniswe.to_trajectory(named, task_id="x").turns == record.turns


@pytest.mark.parametrize("status, extra, failure", [
    ("LimitsExceeded", {}, None),
    ("", {}, "the mini-swe-agent run did not finish (no exit status)"),
    ("RuntimeError", {"exception_str": "boom\n  at step 3"},
     "mini-swe-agent exit status RuntimeError: boom at step 3"),
])
def test_how_a_run_ended_is_its_outcome(scripted, status, extra, failure):
  """A run cut short: the agent saves after every step, so its file may end anywhere."""
  raw = copy.deepcopy(scripted["raw"])
  raw["messages"] = raw["messages"][:7]  # ..., the fix, its observation: no exit message
  raw["info"].update(exit_status=status, submission="", **extra)
  traj = miniswe.to_trajectory(raw, task_id="t")
  assert [m["role"] for m in traj.messages][-2:] == ["user", "assistant"]  # observation dropped
  assert len(traj.turns) == 3 and traj.turns[-1].action.text == scripted["replies"][2]
  assert not traj.outcome.submitted and traj.outcome.patch == ""
  assert traj.outcome.failure == failure


def test_a_run_that_crashed_before_any_reply_is_refused(task, tmp_path, capsys):
  """The model's endpoint is down: mini-swe-agent records the exception and re-raises it."""
  repo = str(tmp_path / "repo")
  materialize(task, repo)
  model = LitellmTextbasedModel(
      model_name="openai/none", cost_tracking="ignore_errors", **model_templates(),
      model_kwargs={"api_base": f"http://127.0.0.1:{support.free_port()}/v1", "api_key": "unused",
                    "max_retries": 0})
  path = tmp_path / "down.traj.json"
  agent = DefaultAgent(model, local_env(repo), **agent_kwargs(step_limit=3, output_path=path))
  with pytest.raises(Exception, match="(?i)connect"):
    agent.run(task["problem_statement"])
  agent.save(path, {"instance_id": task["instance_id"]})
  code, stdout, err = run_cli(capsys, "import-trajectories", str(path), "--out",
                              str(tmp_path / "o.jsonl"))
  assert code == 0, err
  assert "0 converted" in stdout and "1 refused" in stdout
  assert f"refused {path}: no reply of the model to import (exit status " in stdout
  assert not (tmp_path / "o.jsonl").exists()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
  """A random 2-layer, 32-wide Qwen3 exported as a HF directory with the demo BPE tokenizer."""
  config = support.model_config(vocab_size=1024, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                max_position_embeddings=4096)
  path = str(tmp_path_factory.mktemp("tiny") / "hf")
  hf.save_pretrained(loader.init_model(config, jax.random.PRNGKey(0)), path,
                     extras_from=DEMO_TOKENIZER)
  return path


def test_an_episode_against_dagger_jax_serve_imports_and_renders(task, tiny_model_dir, tmp_path,
                                                                 capsys):
  repo = str(tmp_path / "repo")
  materialize(task, repo)
  path = tmp_path / "serve_run.traj.json"
  with Server(tiny_model_dir, support.config()).start() as server:
    model = LitellmTextbasedModel(
        model_name="openai/tiny-random", cost_tracking="ignore_errors", **model_templates(),
        model_kwargs={"api_base": f"{server.url}/v1", "api_key": "unused", "max_tokens": 8,
                      "temperature": 1.0, "seed": 0, "drop_params": True, "max_retries": 0})
    agent = DefaultAgent(model, local_env(repo), **agent_kwargs(step_limit=3))
    info = agent.run(task["problem_statement"])  # garbage replies: format errors, then the end
    agent.save(path, {"instance_id": task["instance_id"]})  # as the swebench runner saves
  assert info["exit_status"] in ("RepeatedFormatError", "LimitsExceeded"), info
  raw = json.loads(path.read_text(encoding="utf-8"))
  calls = raw["info"]["model_stats"]["api_calls"]
  assert calls >= 1

  out = tmp_path / "trajectories" / "round_000.jsonl"
  code, stdout, err = run_cli(capsys, "import-trajectories", str(path), "--out", str(out))
  assert code == 0, err
  assert "1 converted" in stdout
  (traj,) = read_jsonl(out)
  assert traj.task_id == task["instance_id"] and len(traj.turns) == calls
  roles = [m["role"] for m in traj.messages]
  assert roles == ["system", "user"] + ["assistant", "user"] * (calls - 1) + ["assistant"]
  replies, errors = [], []
  for m in raw["messages"]:
    if m["role"] == "assistant":
      replies.append(m["content"])
    elif m.get("extra", {}).get("interrupt_type") == "FormatError":
      replies.append(m["extra"]["model_response"])
      finish = m["extra"]["response"]["choices"][0]["finish_reason"]
      errors.append(protocol.format_error(m["extra"]["n_actions"], finish))
  assert [m["content"] for m in traj.messages if m["role"] == "assistant"] == replies
  assert [t.action.text for t in traj.turns] == replies
  if len(errors) == calls:  # every reply broke the format: each error follows its reply
    assert [m["content"] for m in traj.messages[3::2]] == errors[:calls - 1]
  assert not traj.outcome.submitted and traj.outcome.patch == ""
  assert traj.outcome.failure is None and traj.outcome.turns == calls

  manifest = shards_build(capsys, str(out), str(tmp_path / "shards"))
  assert manifest["source_trajectories"] == [traj.id]
  assert manifest["stats"]["trained_turns"] == calls and manifest["trained_tokens"] > 0
