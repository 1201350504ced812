"""The tutorials run from top to bottom (executed in a temporary copy; the committed notebooks
with their outputs are not touched). All are slow: each trains models for a minute or more."""

import shutil
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def _execute(name: str, tmp_path: Path, timeout: int = 900) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # run from a copy inside tutorials/ so that relative paths (../../shared/data) resolve as
    # they do for a reader
    src = TUTORIALS / name
    work = TUTORIALS / f".test_{tmp_path.name}_{name}"
    shutil.copyfile(src, work)
    try:
        nb = nbformat.read(work, as_version=4)
        nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(TUTORIALS)}},
        ).execute()
        errors = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.get("outputs", [])
            if o.get("output_type") == "error"
        ]
        assert not errors, errors
    finally:
        work.unlink(missing_ok=True)


def test_tutorials_are_committed_executed():
    nbformat = pytest.importorskip("nbformat")
    for path in sorted(TUTORIALS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), f"{path.name} has unexecuted cells"
        assert not any(
            o.get("output_type") == "error" for c in code for o in c.get("outputs", [])
        ), path.name


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["quickstart.ipynb", "morphology.ipynb", "reference_mapping.ipynb"]
)
def test_tutorial_runs(name, tmp_path):
    _execute(name, tmp_path)


@pytest.mark.slow
def test_her2st_tutorial_runs(tmp_path, her2st_dir, monkeypatch):
    monkeypatch.setenv("HISTOVI_HER2ST", str(her2st_dir))
    _execute("multi_patient_her2st.ipynb", tmp_path)
