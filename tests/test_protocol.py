"""The agent protocol against the real mini-swe-agent package (text mode, v2).

Our parser must find the same actions as mini-swe-agent's regex, and our observation / format-error
texts must be byte-identical to mini-swe-agent's jinja templates from `mini_textbased.yaml`.
"""

import os
import random

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch on import

import jinja2
import pytest
import yaml

import support
from dagger_jax.envs import protocol
from dagger_jax.envs.sandbox import ExecResult, UnsafeLocalSandbox


@pytest.fixture(scope="module")
def mini_templates():
  from minisweagent.config import get_config_path
  with open(get_config_path("mini_textbased")) as f:
    cfg = yaml.safe_load(f)
  return {k: jinja2.Template(cfg["model"][k], undefined=jinja2.StrictUndefined)
          for k in ("observation_template", "format_error_template")}


@pytest.fixture(scope="module")
def mini_parse():
  from minisweagent.exceptions import FormatError
  from minisweagent.models.litellm_textbased_model import LitellmTextbasedModelConfig
  from minisweagent.models.utils.actions_text import parse_regex_actions
  regex = LitellmTextbasedModelConfig.model_fields["action_regex"].default
  from minisweagent.config import get_config_path
  with open(get_config_path("mini_textbased")) as f:
    error_template = yaml.safe_load(f)["model"]["format_error_template"]

  def parse(text, finish_reason=None):
    """(commands, error_text) as mini-swe-agent sees `text`."""
    try:
      actions = parse_regex_actions(text, action_regex=regex, format_error_template=error_template,
                                    template_kwargs={"finish_reason": finish_reason})
      return [a["command"] for a in actions], None
    except FormatError as e:
      return None, e.messages[0]["content"]
  parse.regex = regex
  return parse


def test_action_regex_is_mini_swe_agents(mini_parse):
  assert protocol.ACTION_REGEX == mini_parse.regex


FENCE = "```mswea_bash_command"
HAND_WRITTEN = [
    "",
    "THOUGHT: look.\n\n```mswea_bash_command\nls -la\n```",
    "```mswea_bash_command\nls\n```\n```mswea_bash_command\npwd\n```",  # two blocks
    "```bash\nls\n```",  # the wrong fence
    "```mswea_bash_command\nls",  # never closed
    "```mswea_bash_command   \n  cd /testbed && pytest -q  \n```",  # spaces around
    "```mswea_bash_command\n\n```",  # empty command
    "```mswea_bash_command\ncat <<'EOF' > a.py\nprint('```')\nEOF\n```",  # backticks inside
    "```mswea_bash_command\nsed -i 's/a/b/' x.py\n```\ntrailing text ```",
    "```mswea_bash_command ls```",  # one line
    "```mswea_bash_command\n\n\nls\n\n```",
    "text\r\n```mswea_bash_command\r\nls\r\n```",  # CRLF
    "```MSWEA_BASH_COMMAND\nls\n```",  # case matters
    f"```mswea_bash_command\necho {protocol.SUBMIT_SENTINEL}\n```",
]


def _random_messages(n, seed=0):
  """Messages of 0-3 blocks with perturbed fences, separators, bodies and closers."""
  rng = random.Random(seed)
  openers = [FENCE, FENCE, FENCE + "  ", "```bash", "``" + FENCE[2:], FENCE + "\r", "```"]
  seps = ["\n", "\n", "\n\n", " ", "", "\r\n", "\t\n"]
  bodies = ["ls -la", "echo hi && pwd", "", "cat <<'EOF'\nx = '```'\nEOF", "a\n\nb", "  x  ",
            "`q`", "echo ```"]
  closers = ["\n```", "\n```", "\n```\n", "```", "\n``", "", " \n```", "\n\n```"]
  texts = ["", "THOUGHT: x\n\n", "text ", "\n", "```\n", "done.\n"]
  out = []
  for _ in range(n):
    parts = [rng.choice(texts)]
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
      parts += [rng.choice(openers), rng.choice(seps), rng.choice(bodies), rng.choice(closers),
                rng.choice(texts)]
    out.append("".join(parts))
  return out


@pytest.mark.parametrize("finish_reason", [None, "stop", "length"])
def test_parser_agrees_with_mini_swe_agent(mini_parse, finish_reason):
  messages = HAND_WRITTEN + _random_messages(600)
  n_ok = n_err = 0
  for text in messages:
    commands, mini_error = mini_parse(text, finish_reason)
    ours = protocol.parse_action(text)
    if commands is not None:
      n_ok += 1
      assert ours.ok and [ours.command] == commands, repr(text)
    else:
      n_err += 1
      assert not ours.ok, repr(text)
      assert protocol.format_error(ours.n_actions, finish_reason) == mini_error, repr(text)
  assert n_ok > 50 and n_err > 50  # the random set exercises both outcomes


def test_format_action_round_trips():
  for cmd in ["ls", "cat <<'EOF' > f.py\nx = 1\nEOF", "python -m pytest -q tests/test_a.py"]:
    assert protocol.parse_action(protocol.format_action(cmd, "THOUGHT: why.")).command == cmd


def _mini_observation(templates, output, returncode, exception_info=""):
  return templates["observation_template"].render(
      output={"output": output, "returncode": returncode, "exception_info": exception_info})


@pytest.mark.parametrize("output", [
    "", "a.py\n", "no newline", "x" * 9_999, "x" * 10_000, "y" * 10_001,
    "".join(f"line {i}\n" for i in range(5000)), "ünïcödé ✓\n" * 2000, "  \n\n  ",
])
@pytest.mark.parametrize("returncode", [0, 1, 127])
def test_observation_matches_mini_template(mini_templates, output, returncode):
  ours = protocol.format_observation(ExecResult(returncode, output, False, 0.1))
  assert ours == _mini_observation(mini_templates, output, returncode)


def test_observation_limit_is_configurable():
  out = "".join(f"{i:05d}\n" for i in range(1000))  # 6000 chars
  obs = protocol.format_observation(ExecResult(0, out, False, 0.1), output_limit=1001)
  head = obs.split("<output_head>\n")[1].split("\n</output_head>")[0]
  tail = obs.split("<output_tail>\n")[1].split("\n</output_tail>")[0]
  assert head == out[:500] and tail == out[-501:]
  assert "<elided_chars>\n4999 characters elided\n</elided_chars>" in obs
  assert protocol.format_observation(ExecResult(0, out, False, 0.1), output_limit=6001) == (
      f"<returncode>0</returncode>\n<output>\n{out}</output>")


def test_observation_counts_chars_the_sandbox_dropped(mini_templates):
  # The sandbox kept 20 000 head + 20 000 tail characters of a 100 000-character output.
  full = "".join(chr(ord("a") + i % 26) for i in range(100_000))
  capped = ExecResult(0, full[:20_000] + full[-20_000:], False, 0.1, elided_chars=60_000)
  assert protocol.format_observation(capped) == _mini_observation(mini_templates, full, 0)


def test_timeout_observation_matches_mini_local_environment(mini_templates, tmp_path):
  """The same timed-out command through mini-swe-agent's LocalEnvironment and our sandbox."""
  from minisweagent.environments.local import LocalEnvironment
  command = "echo partial; sleep 20"
  mini_out = LocalEnvironment(cwd=str(tmp_path), timeout=1).execute({"command": command})
  assert mini_out["returncode"] == -1 and "timed out" in mini_out["exception_info"]
  with pytest.warns(RuntimeWarning, match="UNSAFE"):
    sb = UnsafeLocalSandbox(str(tmp_path), support.limits(command_timeout=1))
  with sb:
    result = sb.run(command)
  assert result.timed_out and result.output == "partial\n"
  assert protocol.format_observation(result, command=command, timeout=1) == _mini_observation(
      mini_templates, mini_out["output"], mini_out["returncode"], mini_out["exception_info"])


@pytest.mark.parametrize("output,returncode,submitted", [
    (f"{protocol.SUBMIT_SENTINEL}\n", 0, True),
    (f"\n  {protocol.SUBMIT_SENTINEL}  \nmore\n", 0, True),
    (f"{protocol.SUBMIT_SENTINEL}\n", 1, False),
    (f"x\n{protocol.SUBMIT_SENTINEL}\n", 0, False),
    (f"{protocol.SUBMIT_SENTINEL}_NOT\n", 0, False),
    ("", 0, False),
])
def test_submission_sentinel_like_mini(output, returncode, submitted):
  from minisweagent.environments.local import LocalEnvironment
  from minisweagent.exceptions import Submitted
  try:
    LocalEnvironment()._check_finished({"output": output, "returncode": returncode})
    mini = False
  except Submitted:
    mini = True
  assert mini == submitted
  assert protocol.is_submission(ExecResult(returncode, output, False, 0.1)) == submitted


def test_prompts_describe_the_protocol():
  system = protocol.system_prompt()
  assert protocol.parse_action(system).ok  # its own example is a valid action
  task = protocol.instance_prompt("Fix the bug in add().")
  assert task.endswith("Please solve this issue: Fix the bug in add().\n")  # last: nearest
  assert f"echo {protocol.SUBMIT_SENTINEL}" in task
