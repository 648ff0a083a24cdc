"""Full scripted SWE episodes on a real toy task, in bubblewrap and (docker-marked) in docker."""

import subprocess

import pytest

from configs import base
from dagger_jax.envs import protocol
from dagger_jax.envs.tasks import toy
from dagger_jax.envs.swe import EpisodeError, SweEnv

# bubblewrap runs the host's own /usr/bin/python3 (read-only), so that one needs pytest.
_HOST_PYTEST = subprocess.run(["/usr/bin/python3", "-c", "import pytest"],
                              capture_output=True).returncode == 0
_NEEDS_HOST_PYTEST = pytest.mark.skipif(
    not _HOST_PYTEST, reason="the host's /usr/bin/python3 has no pytest, which bubblewrap tasks "
    "run: `sudo apt-get install -y python3-pytest`")
SANDBOXES = [pytest.param("bwrap", marks=_NEEDS_HOST_PYTEST),
             pytest.param("docker", marks=pytest.mark.docker)]


def _env_config(sandbox="bwrap", **overrides):
  env = base.get_config().env
  env.sandbox = sandbox
  env.update(overrides)
  return env


@pytest.fixture(scope="module")
def task():
  return toy.generate(1, seed=3)[0]


def act(command: str) -> str:
  return protocol.format_action(command, "THOUGHT: next step.")


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_scripted_episode_inspect_edit_test_submit(task, sandbox):
  bug = task["bug"]
  with SweEnv(task, _env_config(sandbox)) as env:
    first = env.reset()
    assert task["problem_statement"] in first and env.sandbox.workdir == "/testbed"
    assert "mswea_bash_command" in env.system_prompt

    step = env.step("I will just think about it.")  # no action: a format error, not the end
    assert step.info["format_error"] and not step.done
    assert step.observation == protocol.format_error(0)

    step = env.step(act("ls && git status --short && cat README.md"))
    assert not step.done and step.info["returncode"] == 0 and bug["file"] in step.observation

    step = env.step(act(f"nl -ba {bug['file']} | sed -n '1,12p'"))
    assert bug["old"] in step.observation

    step = env.step(act(task["test_cmd"]))
    assert step.info["returncode"] == 1 and "FAILED" in step.observation  # the bug shows

    step = env.step(act(f"{bug['fix_cmd']} && git diff --stat"))  # edit with sed
    assert step.info["returncode"] == 0 and "1 insertion(+), 1 deletion(-)" in step.observation

    step = env.step(act("cat <<'EOF' > notes_repro.py\nprint('repro')\nEOF\npython3 notes_repro.py "
                        "&& mkdir -p cache/__pycache__ && echo junk > cache/__pycache__/m.pyc"))
    assert "repro" in step.observation

    step = env.step(act(task["test_cmd"]))
    assert step.info["returncode"] == 0 and "passed" in step.observation

    step = env.step(act(f"echo {protocol.SUBMIT_SENTINEL}"))
    assert step.done and step.info["submitted"] and step.info["exit_status"] == "submitted"
    assert step.observation == ""
    with pytest.raises(EpisodeError, match="after the episode ended"):
      env.step(act("ls"))

    patch = env.submission()
    assert f"diff --git a/{bug['file']} b/{bug['file']}" in patch
    lines = patch.splitlines()
    assert any(l.startswith("-") and l.strip("- ") == bug["old"] for l in lines)
    assert any(l.startswith("+") and l.strip("+ ") == bug["new"] for l in lines)
    assert "notes_repro.py" in patch  # new files are part of the diff, build junk is not
    assert "__pycache__" not in patch and ".pyc" not in patch
    assert env.sandbox.run("git status --short").output.strip().startswith("M")  # index untouched

    result = env.grade()  # a fresh sandbox, the task's hidden tests
    assert result.resolved, result.log[-2000:]
    assert set(result.f2p.values()) == {"PASSED"}
  with pytest.raises(EpisodeError, match="reset"):
    env.sandbox  # closed


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_unsubmitted_episode_grades_unresolved(task, sandbox):
  with SweEnv(task, _env_config(sandbox, max_turns=2)) as env:
    env.reset()
    assert not env.step(act("ls")).done
    step = env.step(act("echo 'x = 1' >> README.md"))
    assert step.done and step.info["exit_status"] == "max_turns" and not step.info["submitted"]
    patch = env.submission()
    assert "+x = 1" in patch
    result = env.grade()
  assert not result.resolved and result.patch_applied


def test_consecutive_format_errors_end_the_episode(task):
  with SweEnv(task, _env_config(max_format_errors=3)) as env:
    env.reset()
    two_blocks = act("ls") + "\n" + act("pwd")
    assert env.step(two_blocks).observation == protocol.format_error(2)
    assert not env.step("").done
    assert not env.step(act("true")).done  # a valid action resets the count
    assert not env.step("").done
    assert not env.step("", finish_reason="length").done
    step = env.step("nothing")
    assert step.done and step.info["exit_status"] == "format_errors"
    cut = env.reset()  # a new episode in a fresh sandbox
    assert task["problem_statement"] in cut and env.turn == 0


def test_length_cut_turn_gets_the_cut_off_message(task):
  with SweEnv(task, _env_config()) as env:
    env.reset()
    step = env.step("THOUGHT: I will now write a very long", finish_reason="length")
    assert step.observation == protocol.format_error(0, "length")
    assert "finish_reason=length" in step.observation


def test_timeout_and_long_output_observations(task):
  with SweEnv(task, _env_config(command_timeout=1.0, output_limit=1000)) as env:
    env.reset()
    step = env.step(act("echo started; sleep 30"))
    assert step.info["timed_out"] and not step.done
    assert step.observation.startswith(
        "<exception>An error occurred while executing the command: Command 'echo started; "
        "sleep 30' timed out after 1 seconds</exception>\n<returncode>-1</returncode>")
    step = env.step(act("seq 1 2000"))
    assert "<elided_chars>\n7893 characters elided\n</elided_chars>" in step.observation
    assert step.observation.endswith("1999\n2000\n\n</output_tail>")


def test_a_broken_repository_submits_an_empty_patch(task):
  with SweEnv(task, _env_config()) as env:
    env.reset()
    env.step(act("rm -rf .git"))
    step = env.step(act(f"echo {protocol.SUBMIT_SENTINEL}"))
    assert step.done and step.info["submitted"]
    assert env.submission() == ""


def test_step_before_reset_is_an_error(task):
  env = SweEnv(task, _env_config())
  with pytest.raises(EpisodeError, match="reset"):
    env.step(act("ls"))
  with pytest.raises(EpisodeError, match="before close"):
    env.submission()
