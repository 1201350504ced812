import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder of its own: nothing a test writes by a relative path
    (Lightning's logs, a default `histovi_out`) lands in the checkout, and no test depends on
    what the working directory holds."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def shared_data_dir() -> Path:
    """../shared/data beside the checkout (or $HISTOVI_SHARED_DATA)."""
    env = os.environ.get("HISTOVI_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    path = shared_data_dir() / "her2st"
    if not (path / "her2st_dev.h5ad").exists():
        pytest.skip(f"real her2st data not found at {path}")
    return path


#: The tiny study of the unit tests (the seed is chosen by each fixture).
TINY_STUDY = {
    "n_patients": 2,
    "n_sections_per_patient": 2,
    "grid_size": (10, 10),
    "n_genes": 150,
    "n_markers": 10,
    "morphology_dim": 8,
    "sections_without_image": 0,
}


@pytest.fixture
def small_adata():
    """A tiny simulated study: 2 patients x 2 sections, 10x10 spots, 120 genes, neighbours."""
    import histovi

    adata = histovi.datasets.simulate(**TINY_STUDY, seed=1)
    histovi.pp.spatial_neighbors(adata, sample_key="sample", n_neighbors=6)
    return adata


# ---------------------------------------------------------------- reliability suite (tests/_tiny.py)
@pytest.fixture(scope="session")
def _tiny_study():
    from _tiny import tiny_study

    return tiny_study()


@pytest.fixture
def tiny_adata(_tiny_study):
    """A fresh copy of the tiny study of tests/_tiny.py (128 spots, 30 genes, neighbours)."""
    return _tiny_study.copy()


@pytest.fixture(scope="session")
def tiny_trained(_tiny_study):
    """A HistoVI trained 2 epochs on its own copy of the tiny study; do not modify it."""
    from _tiny import TRAIN, tiny_model

    model = tiny_model(_tiny_study.copy())
    model.train(max_epochs=2, **TRAIN)
    return model
