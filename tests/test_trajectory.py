"""The trajectory record: JSON Lines round trip, and validation errors that name field and line."""

import json

import pytest

from dagger_jax.data.trajectory import (Action, Outcome, Trajectory, TrajectoryError, Turn,
                                        read_jsonl, write_jsonl)


def _trajectory(**changes) -> Trajectory:
  messages = ({"role": "system", "content": "sys"}, {"role": "user", "content": "fix it"},
              {"role": "assistant", "content": "```bash\nls\n```"},
              {"role": "user", "content": "<returncode>0</returncode>"},
              {"role": "assistant", "content": "```bash\ngit diff\n```"})
  turns = (Turn("student", Action("```bash\nls\n```", (5, 6, 7)), Action("```bash\ncat a\n```")),
           Turn("teacher", Action("```bash\ngit diff\n```"), None, "intervention",
                "repeat_command"))
  fields = dict(id="t1/r0/s0", task_id="t1", round=0, seed=0, beta=0.5, messages=messages,
                turns=turns, outcome=Outcome(True, "diff", False, 2, 2, 30))
  fields.update(changes)
  return Trajectory(**fields)


def test_jsonl_round_trip(tmp_path):
  a, b = _trajectory(), _trajectory(id="t1/r0/s1", seed=1)
  path = tmp_path / "t.jsonl"
  assert write_jsonl(path, [a]) == 1
  assert write_jsonl(path, [b], append=True) == 1
  assert read_jsonl(path) == [a, b]
  assert json.loads(path.read_text().splitlines()[0])["version"] == 1


def _write_lines(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["turns"][1].update(actor="robot"), "turns[1].actor"),
    (lambda d: d["turns"][0]["action"].update(ids=None), "turns[0].action.ids"),
    (lambda d: d["turns"][0]["action"].update(ids=[1, -2]), "turns[0].action.ids"),
    (lambda d: d["turns"][0]["action"].update(text="other"), "turns[0].action.text"),
    (lambda d: d["turns"][1].update(reason=None), "turns[1].reason"),
    (lambda d: d["turns"][1].update(intervention=None), "turns[1].intervention"),
    (lambda d: d["turns"][1].update(label={"text": "x", "ids": None}), "turns[1].label"),
    (lambda d: d["turns"][0].update(reason="coin"), "turns[0].reason"),
    (lambda d: d["turns"].pop(), "turns"),
    (lambda d: d.update(beta=1.5), "beta"),
    (lambda d: d.update(round=-1), "round"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d["messages"][1].update(role="narrator"), "messages[1].role"),
    (lambda d: d["outcome"].update(resolved="yes"), "outcome.resolved"),
    (lambda d: d["outcome"].update(turns=-1), "outcome.turns"),
])
def test_bad_field_names_field_and_line(tmp_path, mutate, field):
  good = _trajectory().to_dict()
  bad = _trajectory().to_dict()
  mutate(bad)
  path = tmp_path / "bad.jsonl"
  _write_lines(path, [good, good, bad])
  with pytest.raises(TrajectoryError) as e:
    read_jsonl(path)
  assert str(e.value).startswith(f"{path}:3: {field}:"), str(e.value)


def test_invalid_json_names_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(_trajectory().to_dict()) + "\n\n{not json\n")
  with pytest.raises(TrajectoryError, match=r"bad.jsonl:3: not valid JSON"):
    read_jsonl(path)


def test_constructor_validates():
  with pytest.raises(TrajectoryError, match=r"turns\[0\].action.ids"):
    _trajectory(turns=(Turn("student", Action("```bash\nls\n```")),
                       Turn("teacher", Action("```bash\ngit diff\n```"), None, "coin")))


def test_assistant_indices():
  assert _trajectory().assistant_indices() == [2, 4]
