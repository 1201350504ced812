"""Smoke run of benchmarks/reference_mapping.py so it cannot rot: the small simulator, one
held-out patient, two reference epochs, one query epoch, in this process."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

reference_mapping = pytest.importorskip("reference_mapping")


def test_smoke_run_writes_table_and_keeps_the_reference(tmp_path):
    result = reference_mapping.run(
        "sim_small",
        seeds=[0],
        max_epochs=2,
        query_epochs=[1],
        holdout=["P1"],
        out=tmp_path,
        with_scvi=True,
        with_head=False,
        cache_dir=tmp_path / "cache",
    )
    out = tmp_path / "sim_small"
    assert (out / "table.md").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["query_epochs"] == [1]
    (row,) = result["rows"]
    assert row["patient"] == "P1" and row["query_epochs"] == 1
    for key in ("ARI_query_knn", "ARI_joint_knn", "ARI_scvi_scarches_knn"):
        assert -1.0 <= row[key] <= 1.0, key
    # the reference model is bit-identical after query training
    assert row["reference_params_unchanged"] and row["reference_latent_unchanged"]
    assert row["query_model_reference_weights_equal"]
    assert row["query_model_on_reference_max_abs_diff"] < 1e-4
    assert 0 < row["query_over_joint_time"] and np.isfinite(row["query_over_joint_time"])
    assert "| P1 | 1 |" in result["table"]

    # --merge pools runs made in separate processes and refuses the same row twice
    other = json.loads((out / "results.json").read_text())
    for r in other["rows"]:
        r["seed"] = 1
        r["ARI_query_knn"] = 0.5
    (tmp_path / "s1" / "sim_small").mkdir(parents=True)
    (tmp_path / "s1" / "sim_small" / "results.json").write_text(json.dumps(other))
    pooled = reference_mapping.merge([tmp_path, tmp_path / "s1"], "sim_small", tmp_path / "pool")
    assert sorted(r["seed"] for r in pooled["rows"]) == [0, 1]
    assert (tmp_path / "pool" / "sim_small" / "table.md").exists()
    mean_line = next(line for line in pooled["table"].splitlines() if "**mean**" in line)
    expected = np.mean([row["ARI_query_knn"], 0.5])
    assert f"{expected:.3f}" in mean_line
    with pytest.raises(SystemExit, match="more than one run"):
        reference_mapping.merge([tmp_path, tmp_path], "sim_small", tmp_path / "pool2")
