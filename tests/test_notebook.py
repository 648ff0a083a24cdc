"""notebooks/ablations.ipynb: committed without outputs, finds the project's runs from any working
directory, and runs top to bottom (nbclient, a real kernel) on the outputs of a demo-sized
`dagger-jax demo`."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import support
from dagger_jax.configlib import REPO_ROOT

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "ablations.ipynb")
RUNS_ENV = "DAGGER_JAX_RUNS_DIR"


def _execute(nb, cwd: str, timeout: int = 180):
  """Runs every cell of `nb` in a fresh python3 kernel started in `cwd`; returns `nb` with its
  outputs (CellExecutionError on the first cell that raises)."""
  NotebookClient(nb, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": cwd}}).execute()
  return nb


def _with_probe(upto: str, probe: str):
  """The notebook's cells up to the one with id `upto`, then a code cell running `probe`."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  ids = [c.get("id") for c in nb.cells]
  nb.cells = nb.cells[:ids.index(upto) + 1] + [nbformat.v4.new_code_cell(probe)]
  return nb


def _stdout(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_the_committed_notebook_has_no_outputs():
  """Outputs (tables, PNGs, execution counts) are stripped before committing: they are big,
  machine-specific and stale by the next run."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code
  dirty = [c.get("id") for c in code if c.outputs or c.execution_count is not None]
  assert not dirty, (f"{NOTEBOOK}: cells {dirty} carry outputs; strip them with `jupyter "
                     f"nbconvert --clear-output --inplace notebooks/ablations.ipynb`")


@pytest.mark.parametrize("where", ["root", "notebooks", "elsewhere"])
def test_the_notebook_reads_the_project_runs_from_any_directory(where, tmp_path, monkeypatch):
  """Not `../runs` relative to the kernel's directory (from the project root that globbed
  nothing, and pandas failed with `No objects to concatenate`)."""
  monkeypatch.delenv(RUNS_ENV, raising=False)
  cwd = {"root": REPO_ROOT, "notebooks": os.path.dirname(NOTEBOOK), "elsewhere": str(tmp_path)}
  nb = _execute(_with_probe("parameters", "print(RUNS_DIR)"), cwd[where])
  assert _stdout(nb.cells[-1]).strip() == os.path.join(REPO_ROOT, "runs")


def test_no_runs_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv(RUNS_ENV, str(tmp_path))
  with pytest.raises(CellExecutionError, match="no run folder with a metrics.jsonl matches"):
    _execute(nbformat.read(NOTEBOOK, as_version=4), REPO_ROOT)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
  """RUNS_DIR/demo as `make demo` lays out runs/demo, at toy size: DAgger and SFT, 2 rounds of
  3 episodes and 3 steps, a tiny random student, 2 held-out tasks."""
  from dagger_jax.dagger import demo as demo_lib

  runs = tmp_path_factory.mktemp("runs")
  c = support.tiny_loop(rounds=2, episodes=3, steps=3, n_train=8, n_eval=2)
  c.workdir = str(runs / "demo")
  demo_lib.run(c, methods=["dagger", "sft"], make_plot=False)
  return str(runs)


@pytest.mark.slow
def test_the_notebook_runs_on_demo_outputs(demo_runs, monkeypatch):
  """Every cell, from the project root (where it used to fail), on a real demo's metrics.jsonl:
  the table names both runs and both rounds, the plot is drawn, the per-round table counts who
  acted."""
  monkeypatch.setenv(RUNS_ENV, demo_runs)
  nb = _execute(nbformat.read(NOTEBOOK, as_version=4), REPO_ROOT)
  cells = {c.get("id"): c for c in nb.cells}

  def shown(cell_id):
    data = [o["data"] for o in cells[cell_id].outputs if o.output_type == "execute_result"]
    assert data, f"cell {cell_id} shows no table"
    return data[0]["text/plain"]

  table = shown("load-runs")
  for run in ("demo/dagger_seed0", "demo/sft_seed0"):
    assert table.count(run) == 2, table  # rounds 0 and 1
  images = [o for o in cells["resolve-vs-labels"].outputs if "image/png" in o.get("data", {})]
  assert len(images) == 1
  acted = shown("who-acted")
  assert "teacher_turns" in acted and "student_turns" in acted
