"""Bad input at every public entry point (issue 21): one table of cases, each a call that must
fail early with an error naming the key and the fix (``pytest.raises(..., match=...)``), or warn
and carry on where that is the documented behaviour; then property-based checks (hypothesis)
of the validators over random shapes, NaN masks and sample sizes.

The data are the tiny study of ``tests/_tiny.py`` (fixtures ``tiny_adata``, ``tiny_trained`` in
conftest.py), so the whole table runs in seconds.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _tiny import SETUP, TRAIN, tiny_model
from anndata import AnnData
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import histovi
from histovi import HistoVI, cli
from histovi.datasets._images import draw_he_images

FAST_TILES = {"tile_size_um": 64.0, "target_mpp": 2.0, "progress": False}


# ------------------------------------------------------------------ helpers building bad data
def edit(adata: AnnData, **changes) -> AnnData:
    """``adata`` with ``obsm.<key>`` / ``layers.<key>`` / ``obs.<key>`` replaced (or deleted
    with None); keys are written ``obsm__spatial``."""
    for name, value in changes.items():
        attr, key = name.split("__", 1)
        store = getattr(adata, attr)
        if value is None:
            del store[key]
        else:
            store[key] = value(store[key]) if callable(value) else value
    return adata


def dense(f):
    """A counts edit on the dense matrix."""
    return lambda X: f(X.toarray().astype(np.float64) if sp.issparse(X) else X.astype(np.float64))


def at(i, j, value):
    def f(X):
        X = X.copy()
        X[i, j] = value
        return X

    return f


def images(adata: AnnData) -> AnnData:
    adata.uns["spatial"] = draw_he_images(adata, seed=0)
    return adata


def image_files(adata: AnnData, folder: Path, spoil: dict[int, str] | None = None) -> AnnData:
    """Images as files (PNG, or JPEG for the 'truncated' spoil); ``spoil`` maps section number
    to 'garbage' | 'truncated' | 'missing'."""
    from PIL import Image

    images(adata)
    for i, (lib, entry) in enumerate(adata.uns["spatial"].items()):
        img = entry.pop("images")["hires"]
        how = (spoil or {}).get(i)
        path = folder / f"{lib}.{'jpg' if how == 'truncated' else 'png'}"
        if how == "garbage":
            path.write_bytes(b"these are not pixels")
        elif how == "truncated":
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG")
            path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
        elif how != "missing":
            Image.fromarray(img).save(path)
        entry["image_file"] = str(path)
    return adata


def scale_images(factor: float):
    def f(adata):
        images(adata)
        for entry in adata.uns["spatial"].values():
            entry["scalefactors"]["tissue_hires_scalef"] *= factor
        return adata

    return f


def latent(c) -> AnnData:
    """The trained model's AnnData with its latent in obsm['X_histovi']."""
    adata = c.model.adata.copy()
    adata.obsm["X_histovi"] = c.model.get_latent_representation()
    return adata


def sdata(c, change=None):
    sd = histovi.io.to_spatialdata(images(c.adata()))
    if change is not None:
        change(sd.tables["table"], sd)
    return sd


def unknown_region(table, sd):
    table.obs["region"] = table.obs["region"].cat.add_categories(["nowhere"])
    table.obs.loc[table.obs_names[:3], "region"] = "nowhere"


def mudata(adata: AnnData, morph: np.ndarray | None = None) -> md.MuData:
    morph = adata.obsm["X_morphology"] if morph is None else morph
    return md.MuData(
        {
            "rna": adata,
            "morph": AnnData(X=np.asarray(morph), obs=pd.DataFrame(index=adata.obs_names)),
        }
    )


MUDATA_MODS = {
    "rna_layer": "rna",
    "batch_key": "rna",
    "morphology": "morph",
    "neighbors_key": "rna",
}


def setup_mudata(mdata, **kwargs):
    args = {
        "rna_layer": "counts",
        "batch_key": "sample",
        "neighbors_key": "spatial_neighbors",
        "modalities": MUDATA_MODS,
    }
    HistoVI.setup_mudata(mdata, **{**args, **kwargs})


def setup(adata, **kwargs):
    HistoVI.setup_anndata(adata, **{**SETUP, **kwargs})


def query(c, change=None):
    """The trained model's spots as a query of new samples, optionally changed."""
    q = c.model.adata.copy()
    for col in [col for col in q.obs if col.startswith("_scvi")]:
        del q.obs[col]
    q.obs["sample"] = q.obs["sample"].astype(str) + "_q"
    return change(q) if change is not None else q


def subset(adata, rows):
    return adata[rows].copy()


def cli_run(c, change=None, *extra, out=None):
    """``histovi run`` on the tiny study written to an .h5ad (changed first); its exit code and
    the last line of stderr are checked by the case."""
    adata = c.adata()
    if change is not None:
        adata = change(adata)
    path = c.tmp / "study.h5ad"
    adata.write_h5ad(path)
    argv = ["run", "--input", str(path), "--out", str(out or c.tmp / "out"), "--quiet"]
    argv += ["--max-epochs", "1", "--encoder", "none", "--label-key", "none", *extra]
    code = cli.main(argv)
    err = c.capsys.readouterr().err.strip().splitlines()
    last = err[-1] if err else ""
    assert not any("Traceback" in line for line in err), err
    if code == 2 and last.startswith("histovi: error: "):
        raise CliError(last)
    raise AssertionError(f"exit code {code}: {err[-3:]}")


def cli_raw(c, argv):
    code = cli.main(["run", *argv, "--quiet"])
    err = c.capsys.readouterr().err.strip().splitlines()
    if code == 2 and err and err[-1].startswith("histovi: error: "):
        raise CliError(err[-1])
    raise AssertionError(f"exit code {code}: {err[-3:]}")


class CliError(Exception):
    """A ``histovi run`` that exited with code 2 and one ``histovi: error:`` line."""


def finished_run(c):
    out = c.tmp / "done"
    out.mkdir()
    (out / cli.STATUS_FILE).write_text(json.dumps({"status": "complete", "options": {}}))
    (out / "adata.h5ad").write_bytes(b"a previous result")
    return out


# ------------------------------------------------------------------ the table
@dataclass
class Case:
    entry: str
    name: str
    call: object
    error: type[BaseException]
    match: str

    @property
    def id(self) -> str:
        return f"{self.entry}/{self.name}"


NAN, INF = np.nan, np.inf
K = "spatial_neighbors"
M = "X_morphology"

CASES = [
    # -------------------------------------------------------------- pp.spatial_neighbors
    Case(
        "pp.spatial_neighbors",
        "missing-key",
        lambda c: histovi.pp.spatial_neighbors(c.adata(), spatial_key="coords"),
        KeyError,
        r"obsm\['coords'\] not found.*spatial_key=",
    ),
    Case(
        "pp.spatial_neighbors",
        "misspelled-sample-key",
        lambda c: histovi.pp.spatial_neighbors(c.adata(), sample_key="slide"),
        KeyError,
        r"obs\['slide'\] not found.*sample_key=",
    ),
    Case(
        "pp.spatial_neighbors",
        "nan-coordinates",
        lambda c: histovi.pp.spatial_neighbors(edit(c.adata(), obsm__spatial=at(3, 0, NAN))),
        ValueError,
        r"obsm\['spatial'\] has 1 spots with NaN/inf coordinates: remove",
    ),
    Case(
        "pp.spatial_neighbors",
        "inf-coordinates",
        lambda c: histovi.pp.spatial_neighbors(edit(c.adata(), obsm__spatial=at(0, 1, INF))),
        ValueError,
        r"NaN/inf coordinates",
    ),
    Case(
        "pp.spatial_neighbors",
        "all-identical-coordinates",
        lambda c: histovi.pp.spatial_neighbors(
            edit(c.adata(), obsm__spatial=lambda x: np.ones_like(x))
        ),
        ValueError,
        r"every spot of sample 'P1_S1' at the same position \(1, 1\).*missing or were overwritten",
    ),
    Case(
        "pp.spatial_neighbors",
        "one-coordinate-column",
        lambda c: histovi.pp.spatial_neighbors(edit(c.adata(), obsm__spatial=lambda x: x[:, :1])),
        ValueError,
        r"has 1 column: spot centres need two",
    ),
    Case(
        "pp.spatial_neighbors",
        "text-coordinates",
        lambda c: histovi.pp.spatial_neighbors(
            edit(c.adata(), obsm__spatial=lambda x: np.full(x.shape, "x", dtype=object))
        ),
        ValueError,
        r"obsm\['spatial'\] must hold numbers",
    ),
    Case(
        "pp.spatial_neighbors",
        "sparse-coordinates",
        lambda c: histovi.pp.spatial_neighbors(edit(c.adata(), obsm__spatial=sp.csr_matrix)),
        ValueError,
        r"sparse matrix: store it dense",
    ),
    Case(
        "pp.spatial_neighbors",
        "sample-smaller-than-k",
        lambda c: histovi.pp.spatial_neighbors(subset(c.adata(), slice(0, 67))),
        ValueError,
        r"at most n_neighbors=6 spots.*'P2_S1': 3.*Remove them or lower n_neighbors",
    ),
    Case(
        "pp.spatial_neighbors",
        "too-few-spots-no-sample",
        lambda c: histovi.pp.spatial_neighbors(subset(c.adata(), slice(0, 4)), sample_key=None),
        ValueError,
        r"4 spots is too few for n_neighbors=6",
    ),
    Case(
        "pp.spatial_neighbors",
        "k-zero",
        lambda c: histovi.pp.spatial_neighbors(c.adata(), n_neighbors=0),
        ValueError,
        r"n_neighbors must be a positive integer, got 0",
    ),
    Case(
        "pp.spatial_neighbors",
        "k-float",
        lambda c: histovi.pp.spatial_neighbors(c.adata(), n_neighbors=2.5),
        ValueError,
        r"positive integer, got 2\.5",
    ),
    Case(
        "pp.spatial_neighbors",
        "k-bool",
        lambda c: histovi.pp.spatial_neighbors(c.adata(), n_neighbors=True),
        ValueError,
        r"positive integer, got True",
    ),
    Case(
        "pp.spatial_neighbors",
        "sample-with-nan",
        lambda c: histovi.pp.spatial_neighbors(
            edit(
                c.adata(), obs__sample=lambda s: s.astype(object).where(np.arange(len(s)) > 0, None)
            )
        ),
        ValueError,
        r"obs\['sample'\] has missing values: every spot needs a sample",
    ),
    Case(
        "pp.spatial_neighbors",
        "not-anndata",
        lambda c: histovi.pp.spatial_neighbors(np.zeros((5, 2))),
        TypeError,
        r"adata must be an AnnData, got ndarray",
    ),
    # -------------------------------------------------------------- pp.embed_morphology
    Case(
        "pp.embed_morphology",
        "missing-spatial-key",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), spatial_key="xy", **FAST_TILES),
        KeyError,
        r"obsm\['xy'\].*not found: add it or pass spatial_key=",
    ),
    Case(
        "pp.embed_morphology",
        "misspelled-sample-key",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), sample_key="slide", **FAST_TILES),
        KeyError,
        r"obs\['slide'\] not found.*pass sample_key=",
    ),
    Case(
        "pp.embed_morphology",
        "negative-tile-size",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), tile_size_um=-1.0, progress=False),
        ValueError,
        r"tile_size_um=-1\.0 must be a positive number",
    ),
    Case(
        "pp.embed_morphology",
        "zero-target-mpp",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), target_mpp=0.0, progress=False),
        ValueError,
        r"target_mpp=0\.0 must be a positive number",
    ),
    Case(
        "pp.embed_morphology",
        "tissue-fraction-above-1",
        lambda c: histovi.pp.embed_morphology(
            images(c.adata()), min_tissue_fraction=2.0, **FAST_TILES
        ),
        ValueError,
        r"min_tissue_fraction=2\.0 must lie in \[0, 1\]",
    ),
    Case(
        "pp.embed_morphology",
        "unknown-stain-method",
        lambda c: histovi.pp.embed_morphology(
            images(c.adata()), stain_normalization="vahadane", **FAST_TILES
        ),
        ValueError,
        r"stain_normalization='vahadane' is not supported: use None, 'macenko' or 'reinhard'",
    ),
    Case(
        "pp.embed_morphology",
        "zero-components",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), n_components=0, **FAST_TILES),
        ValueError,
        r"n_components=0 must be a positive integer or None",
    ),
    Case(
        "pp.embed_morphology",
        "zero-batch-size",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), batch_size=0, **FAST_TILES),
        ValueError,
        r"batch_size=0 must be >= 1",
    ),
    Case(
        "pp.embed_morphology",
        "no-images",
        lambda c: histovi.pp.embed_morphology(edit(c.adata(), uns__spatial={}), **FAST_TILES),
        ValueError,
        r"no section has a usable image: add uns\['spatial'\]\[lib\]\['images'\].*no uns\['spatial'\] entry",
    ),
    Case(
        "pp.embed_morphology",
        "corrupt-image-files",
        lambda c: histovi.pp.embed_morphology(
            image_files(c.adata(), c.tmp, {0: "garbage", 1: "garbage"}), **FAST_TILES
        ),
        ValueError,
        r"no section has a usable image.*P1_S1\.png' cannot be read .*corrupted, cut short or not an image",
    ),
    Case(
        "pp.embed_morphology",
        "image-with-5-channels",
        lambda c: histovi.pp.embed_morphology(
            edit(
                images(c.adata()),
                uns__spatial=lambda s: {
                    k: {**v, "images": {"hires": np.zeros((9, 9, 5), np.uint8)}}
                    for k, v in s.items()
                },
            ),
            **FAST_TILES,
        ),
        ValueError,
        r"image array has shape \(9, 9, 5\); expected \(height, width, 3\)",
    ),
    Case(
        "pp.embed_morphology",
        "not-anndata",
        lambda c: histovi.pp.embed_morphology(np.zeros(3), **FAST_TILES),
        ValueError,
        r"data must be an AnnData or a SpatialData object; got ndarray",
    ),
    Case(
        "pp.embed_morphology",
        "reference-without-record",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), reference=c.adata(), **FAST_TILES),
        ValueError,
        r"reference has no uns\['histovi'\]\['morphology'\] record: run histovi\.pp\.embed_morphology on the reference first",
    ),
    # -------------------------------------------------------------- pp.embed_expression
    Case(
        "pp.embed_expression",
        "unknown-model",
        lambda c: histovi.pp.embed_expression(c.adata(), "uce"),
        ValueError,
        r"model='uce' is not supported: pass one of \['geneformer', 'scgpt', 'pca'\]",
    ),
    Case(
        "pp.embed_expression",
        "missing-layer",
        lambda c: histovi.pp.embed_expression(c.adata(), "pca", layer="raw"),
        KeyError,
        r"layer='raw' not found in adata\.layers.*layer=None for adata\.X",
    ),
    Case(
        "pp.embed_expression",
        "nan-counts",
        lambda c: histovi.pp.embed_expression(
            edit(c.adata(), layers__counts=dense(at(0, 0, NAN))), "pca", layer="counts"
        ),
        ValueError,
        r"adata\.layers\['counts'\] contains NaN or inf values\. Raw counts are needed",
    ),
    Case(
        "pp.embed_expression",
        "negative-counts",
        lambda c: histovi.pp.embed_expression(
            edit(c.adata(), layers__counts=dense(at(0, 0, -1))), "pca", layer="counts"
        ),
        ValueError,
        r"contains negative values, so it is not counts",
    ),
    Case(
        "pp.embed_expression",
        "normalised-counts",
        lambda c: histovi.pp.embed_expression(
            edit(c.adata(), layers__counts=dense(lambda X: np.log1p(X))), "pca", layer="counts"
        ),
        ValueError,
        r"non-integer values \(normalised or log data\?\)",
    ),
    Case(
        "pp.embed_expression",
        "empty",
        lambda c: histovi.pp.embed_expression(c.adata()[:0].copy(), "pca"),
        ValueError,
        r"adata is empty \(0 spots x 30 genes\)",
    ),
    Case(
        "pp.embed_expression",
        "all-zero-counts",
        lambda c: histovi.pp.embed_expression(
            edit(c.adata(), layers__counts=lambda X: sp.csr_matrix(X.shape)), "pca", layer="counts"
        ),
        ValueError,
        r"PCA needs at least 2 spots with counts",
    ),
    Case(
        "pp.embed_expression",
        "zero-components",
        lambda c: histovi.pp.embed_expression(c.adata(), "pca", layer="counts", n_comps=0),
        ValueError,
        r"n_comps=0 must be a positive integer",
    ),
    Case(
        "pp.embed_expression",
        "scgpt-in-process",
        lambda c: histovi.pp.embed_expression(c.adata(), "scgpt"),
        ImportError,
        r"precomputed-embedding route",
    ),
    Case(
        "pp.embed_expression",
        "zero-batch-size",
        lambda c: histovi.pp.embed_expression(c.adata(), "pca", batch_size=0),
        ValueError,
        r"batch_size=0 must be a positive integer",
    ),
    # -------------------------------------------------------------- io.read_folder
    Case(
        "io.read_folder",
        "not-a-folder",
        lambda c: histovi.io.read_folder(c.tmp / "nowhere"),
        ValueError,
        r"is not a folder: pass the data directory",
    ),
    Case(
        "io.read_folder",
        "two-h5ad",
        lambda c: (
            c.adata().write_h5ad(c.tmp / "a.h5ad"),
            c.adata().write_h5ad(c.tmp / "b.h5ad"),
            histovi.io.read_folder(c.tmp),
        ),
        ValueError,
        r"holds 2 \.h5ad files.*name the one to read with h5ad=",
    ),
    Case(
        "io.read_folder",
        "misspelled-h5ad",
        lambda c: histovi.io.read_folder(c.tmp, h5ad="study.h5ad"),
        ValueError,
        r"study\.h5ad' does not exist: check h5ad=",
    ),
    Case(
        "io.read_folder",
        "corrupt-h5ad",
        lambda c: ((c.tmp / "x.h5ad").write_bytes(b"not hdf5"), histovi.io.read_folder(c.tmp)),
        ValueError,
        r"x\.h5ad' cannot be read as an AnnData \(OSError.*corrupted, cut short or not an \.h5ad",
    ),
    # -------------------------------------------------------------- io.from_spatialdata / to_spatialdata
    Case(
        "io.from_spatialdata",
        "no-table",
        lambda c: histovi.io.from_spatialdata(sdata(c, lambda t, sd: sd.tables.pop("table"))),
        KeyError,
        r"SpatialData has no table 'table' \(tables: \[\]\): pass table_key=",
    ),
    Case(
        "io.from_spatialdata",
        "misspelled-table-key",
        lambda c: histovi.io.from_spatialdata(sdata(c), table_key="spots"),
        KeyError,
        r"no table 'spots' \(tables: \['table'\]\)",
    ),
    Case(
        "io.from_spatialdata",
        "table-annotates-nothing",
        lambda c: histovi.io.from_spatialdata(
            sdata(c, lambda t, sd: t.uns.pop("spatialdata_attrs"))
        ),
        ValueError,
        r"does not annotate any element.*TableModel\.parse",
    ),
    Case(
        "io.from_spatialdata",
        "rows-of-unknown-region",
        lambda c: histovi.io.from_spatialdata(sdata(c, unknown_region)),
        ValueError,
        r"3 rows of table 'table' have obs\['region'\] values \['nowhere'\] that are not among the regions",
    ),
    Case(
        "io.from_spatialdata",
        "region-key-column-missing",
        lambda c: histovi.io.from_spatialdata(
            sdata(c, lambda t, sd: t.uns["spatialdata_attrs"].update(region_key="regio"))
        ),
        KeyError,
        r"names obs\['regio'\] as its region_key.*has no such column",
    ),
    Case(
        "io.from_spatialdata",
        "region-not-an-element",
        lambda c: histovi.io.from_spatialdata(
            sdata(
                c,
                lambda t, sd: t.uns["spatialdata_attrs"].update(
                    region=[*t.uns["spatialdata_attrs"]["region"], "ghost_spots"]
                ),
            )
        ),
        KeyError,
        r"annotates 'ghost_spots', which is not a shapes or points element",
    ),
    Case(
        "io.from_spatialdata",
        "instances-not-in-element",
        lambda c: histovi.io.from_spatialdata(
            sdata(c, lambda t, sd: t.obs.__setitem__("spot_id", t.obs["spot_id"] + 10_000))
        ),
        KeyError,
        r"64 table rows of region 'P1_S1_spots' name instances.*does not have",
    ),
    Case(
        "io.from_spatialdata",
        "misspelled-image-key",
        lambda c: histovi.io.from_spatialdata(sdata(c), image_key="he"),
        KeyError,
        r"image_key 'he' is not an image of the SpatialData object",
    ),
    Case(
        "io.from_spatialdata",
        "anndata-instead",
        lambda c: histovi.io.from_spatialdata(c.adata()),
        TypeError,
        r"expected a SpatialData object, got AnnData",
    ),
    Case(
        "io.to_spatialdata",
        "misspelled-sample-key",
        lambda c: histovi.io.to_spatialdata(images(c.adata()), sample_key="slide"),
        KeyError,
        r"obs\['slide'\] not found: pass sample_key=",
    ),
    Case(
        "io.to_spatialdata",
        "missing-spatial-key",
        lambda c: histovi.io.to_spatialdata(images(c.adata()), spatial_key="xy"),
        KeyError,
        r"obsm\['xy'\].*not found",
    ),
    # -------------------------------------------------------------- HistoVI.setup_anndata
    Case(
        "setup_anndata",
        "not-anndata",
        lambda c: HistoVI.setup_anndata(np.zeros((3, 3))),
        TypeError,
        r"setup_anndata needs an AnnData, got ndarray",
    ),
    Case(
        "setup_anndata",
        "misspelled-layer",
        lambda c: setup(c.adata(), layer="raw"),
        KeyError,
        r"adata\.layers\['raw'\] not found.*Pass the layer that holds raw counts",
    ),
    Case(
        "setup_anndata",
        "misspelled-batch-key",
        lambda c: setup(c.adata(), batch_key="slide"),
        KeyError,
        r"obs\['slide'\] not found\. Pass batch_key=",
    ),
    Case(
        "setup_anndata",
        "missing-labels-key",
        lambda c: setup(c.adata(), labels_key="celltype"),
        KeyError,
        r"obs\['celltype'\] not found\. Pass labels_key=",
    ),
    Case(
        "setup_anndata",
        "misspelled-morphology-key",
        lambda c: setup(c.adata(), morphology_key="X_uni"),
        KeyError,
        r"obsm\['X_uni'\] not found\. Compute it with histovi\.pp\.embed_morphology",
    ),
    Case(
        "setup_anndata",
        "misspelled-neighbors-key",
        lambda c: setup(c.adata(), neighbors_key="knn"),
        KeyError,
        r"obsm\['knn'\] not found\. Compute it with histovi\.pp\.spatial_neighbors",
    ),
    Case(
        "setup_anndata",
        "missing-embedding-key",
        lambda c: setup(c.adata(), embedding_keys={"fm": "X_fm"}),
        KeyError,
        r"obsm\['X_fm'\] not found\. Compute the 'fm' embedding first",
    ),
    Case(
        "setup_anndata",
        "embedding-keys-not-a-dict",
        lambda c: setup(c.adata(), embedding_keys=["X_fm"]),
        TypeError,
        r"embedding_keys=\['X_fm'\]: pass a mapping view name -> obsm key",
    ),
    Case(
        "setup_anndata",
        "embedding-named-morphology",
        lambda c: setup(c.adata(), embedding_keys={"morphology": M}),
        ValueError,
        r"may not use the name 'morphology': pass the morphology embedding as morphology_key=",
    ),
    Case(
        "setup_anndata",
        "negative-counts",
        lambda c: setup(edit(c.adata(), layers__counts=dense(at(2, 2, -3)))),
        ValueError,
        r"layers\['counts'\] contains negative values: pass raw counts",
    ),
    Case(
        "setup_anndata",
        "non-integer-counts",
        lambda c: setup(edit(c.adata(), layers__counts=dense(lambda X: X * 0.5 + 0.25))),
        ValueError,
        r"non-integer values: HistoVI models raw UMI counts",
    ),
    Case(
        "setup_anndata",
        "nan-counts",
        lambda c: setup(edit(c.adata(), layers__counts=dense(at(0, 0, NAN)))),
        ValueError,
        r"contains NaN or inf: counts must be finite",
    ),
    Case(
        "setup_anndata",
        "inf-counts",
        lambda c: setup(edit(c.adata(), layers__counts=dense(at(5, 1, INF)))),
        ValueError,
        r"contains NaN or inf",
    ),
    Case(
        "setup_anndata",
        "nan-in-last-sparse-row",
        lambda c: setup(
            edit(c.adata(), layers__counts=lambda X: sp.csr_matrix(at(127, 29, NAN)(X.toarray())))
        ),
        ValueError,
        r"contains NaN or inf",
    ),
    Case(
        "setup_anndata",
        "text-counts",
        lambda c: setup(edit(c.adata(), layers__counts=lambda X: X.toarray().astype(str))),
        ValueError,
        r"has dtype <U\d+, not numbers: store the raw counts as integers or floats",
    ),
    Case(
        "setup_anndata",
        "no-genes",
        lambda c: setup(c.adata()[:, :0].copy()),
        ValueError,
        r"has no genes \(shape \(128, 0\)\)",
    ),
    Case(
        "setup_anndata",
        "no-spots",
        lambda c: setup(c.adata()[:0].copy()),
        ValueError,
        r"The AnnData has no spots",
    ),
    Case(
        "setup_anndata",
        "batch-with-nan",
        lambda c: setup(
            edit(
                c.adata(), obs__sample=lambda s: s.astype(object).where(np.arange(len(s)) > 0, None)
            )
        ),
        ValueError,
        r"obs\['sample'\] has missing values: every spot needs a sample",
    ),
    Case(
        "setup_anndata",
        "morphology-inf",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=at(0, 0, INF))),
        ValueError,
        r"obsm\['X_morphology'\] contains inf values: recompute the embedding, or set the rows .* to NaN",
    ),
    Case(
        "setup_anndata",
        "morphology-partly-nan-row",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=at(0, 0, NAN))),
        ValueError,
        r"has 1 rows with some but not all values NaN",
    ),
    Case(
        "setup_anndata",
        "morphology-all-nan",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=lambda x: np.full_like(x, np.nan))),
        ValueError,
        r"is NaN for every spot: no spot has this view",
    ),
    Case(
        "setup_anndata",
        "morphology-sparse",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=sp.csr_matrix)),
        ValueError,
        r"obsm\['X_morphology'\] is a sparse matrix: store it dense",
    ),
    Case(
        "setup_anndata",
        "morphology-zero-width",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=lambda x: x[:, :0])),
        ValueError,
        r"obsm\['X_morphology'\] has no columns",
    ),
    Case(
        "setup_anndata",
        "morphology-text",
        lambda c: setup(
            edit(c.adata(), obsm__X_morphology=lambda x: np.full(x.shape, "tile", dtype=object))
        ),
        ValueError,
        r"obsm\['X_morphology'\] must hold numbers",
    ),
    Case(
        "setup_anndata",
        "neighbours-out-of-range",
        lambda c: setup(edit(c.adata(), obsm__spatial_neighbors=at(0, 0, 999))),
        ValueError,
        r"neighbour indices outside \[0, 128\).*another AnnData",
    ),
    Case(
        "setup_anndata",
        "neighbours-negative",
        lambda c: setup(edit(c.adata(), obsm__spatial_neighbors=at(0, 0, -1))),
        ValueError,
        r"neighbour indices outside \[0, 128\)",
    ),
    Case(
        "setup_anndata",
        "neighbours-cross-samples",
        lambda c: setup(edit(c.adata(), obsm__spatial_neighbors=at(0, 0, 127))),
        ValueError,
        r"links 1 spots to neighbours in another sample \('sample'\)",
    ),
    Case(
        "setup_anndata",
        "neighbours-not-integer",
        lambda c: setup(edit(c.adata(), obsm__spatial_neighbors=lambda n: n + 0.5)),
        ValueError,
        r"must hold integer row indices\. Compute it with histovi\.pp\.spatial_neighbors",
    ),
    Case(
        "setup_anndata",
        "neighbours-nan",
        lambda c: setup(
            edit(c.adata(), obsm__spatial_neighbors=lambda n: at(0, 0, NAN)(n.astype(float)))
        ),
        ValueError,
        r"must hold integer row indices",
    ),
    Case(
        "setup_anndata",
        "neighbours-after-subset",
        lambda c: setup(subset(c.adata(), slice(64, 128))),
        ValueError,
        r"outside \[0, 64\)|different set or order of spots",
    ),
    Case(
        "setup_anndata",
        "neighbours-after-reorder",
        lambda c: setup(subset(c.adata(), np.r_[1, 0, 2:128])),
        ValueError,
        r"computed on a different set or order of spots",
    ),
    Case(
        "setup_anndata",
        "categorical-covariate-nan",
        lambda c: setup(
            edit(
                c.adata(),
                obs__patient=lambda s: s.astype(object).where(np.arange(len(s)) > 1, None),
            ),
            categorical_covariate_keys=["patient"],
        ),
        ValueError,
        r"obs\['patient'\] has 2 missing values: every spot needs a value of each categorical covariate",
    ),
    Case(
        "setup_anndata",
        "covariate-keys-as-string",
        lambda c: setup(c.adata(), categorical_covariate_keys="patient"),
        TypeError,
        r"categorical_covariate_keys='patient': pass a list of obs columns, e\.g\. categorical_covariate_keys=\['patient'\]",
    ),
    Case(
        "setup_anndata",
        "continuous-covariate-nan",
        lambda c: setup(edit(c.adata(), obs__depth=np.nan), continuous_covariate_keys=["depth"]),
        ValueError,
        r"obs\['depth'\] must be finite numbers \(continuous covariate\)",
    ),
    Case(
        "setup_anndata",
        "missing-covariate",
        lambda c: setup(c.adata(), continuous_covariate_keys=["depth"]),
        KeyError,
        r"obs\['depth'\] not found\. Remove it from the covariate keys or add the column",
    ),
    # -------------------------------------------------------------- HistoVI.setup_mudata
    Case(
        "setup_mudata",
        "not-mudata",
        lambda c: HistoVI.setup_mudata(c.adata()),
        TypeError,
        r"setup_mudata needs a MuData, got AnnData",
    ),
    Case(
        "setup_mudata",
        "no-expression-modality",
        lambda c: setup_mudata(mudata(c.adata()), modalities={"morphology": "morph"}),
        ValueError,
        r"modalities must name the expression modality, e\.g\. modalities=\{'rna_layer': 'rna'\}",
    ),
    Case(
        "setup_mudata",
        "unknown-modality",
        lambda c: setup_mudata(mudata(c.adata()), modalities={**MUDATA_MODS, "morphology": "he"}),
        KeyError,
        r"modalities\['morphology_layer'\] = 'he' is not a modality of the MuData",
    ),
    Case(
        "setup_mudata",
        "misspelled-batch-key",
        lambda c: setup_mudata(mudata(c.adata()), batch_key="slide"),
        KeyError,
        r"obs\['slide'\] not found\. It is looked up in modality 'rna'",
    ),
    Case(
        "setup_mudata",
        "morphology-fewer-rows",
        lambda c: HistoVI.setup_mudata(
            md.MuData(
                {
                    "rna": c.adata(),
                    "morph": AnnData(
                        X=np.zeros((10, 4)), obs=pd.DataFrame(index=c.adata().obs_names[:10])
                    ),
                }
            ),
            rna_layer="counts",
            modalities={"rna_layer": "rna", "morphology": "morph"},
        ),
        ValueError,
        r"Modality 'morph' must have one row per spot of the MuData.*NaN rows instead of dropping them",
    ),
    Case(
        "setup_mudata",
        "morphology-inf",
        lambda c: setup_mudata(mudata(c.adata(), at(0, 0, INF)(c.adata().obsm[M]))),
        ValueError,
        r"contains inf values",
    ),
    Case(
        "setup_mudata",
        "neighbours-out-of-range",
        lambda c: setup_mudata(mudata(edit(c.adata(), obsm__spatial_neighbors=at(0, 0, 10**6)))),
        ValueError,
        r"neighbour indices outside \[0, 128\)",
    ),
    Case(
        "setup_mudata",
        "misspelled-neighbors-key",
        lambda c: setup_mudata(mudata(c.adata()), neighbors_key="knn"),
        KeyError,
        r"obsm\['knn'\] not found\. Compute it with histovi\.pp\.spatial_neighbors",
    ),
    Case(
        "setup_mudata",
        "negative-counts",
        lambda c: setup_mudata(mudata(edit(c.adata(), layers__counts=dense(at(0, 0, -1))))),
        ValueError,
        r"contains negative values",
    ),
    # -------------------------------------------------------------- HistoVI(...)
    Case(
        "HistoVI",
        "unregistered",
        lambda c: HistoVI(c.adata()),
        ValueError,
        r"set up your AnnData with HistoVI\.setup_anndata first",
    ),
    Case(
        "HistoVI",
        "negative-weight",
        lambda c: tiny_model(c.adata(), niche_weight=-1.0),
        ValueError,
        r"niche_weight=-1\.0: pass a finite weight >= 0",
    ),
    Case(
        "HistoVI",
        "nan-weight",
        lambda c: tiny_model(c.adata(), niche_weight=float("nan")),
        ValueError,
        r"niche_weight=nan: pass a finite weight >= 0",
    ),
    Case(
        "HistoVI",
        "view-dropout-above-1",
        lambda c: tiny_model(c.adata(), view_dropout=2.0),
        ValueError,
        r"view_dropout=2\.0: pass a share in \[0, 1\]",
    ),
    Case(
        "HistoVI",
        "unknown-standardization",
        lambda c: tiny_model(c.adata(), view_standardization="batch"),
        ValueError,
        r"view_standardization='batch': pass 'sample'",
    ),
    Case(
        "HistoVI",
        "normalize-input-not-bool",
        lambda c: tiny_model(c.adata(), normalize_input="yes"),
        ValueError,
        r"normalize_input='yes': pass True \(depth-normalised encoder input",
    ),
    # -------------------------------------------------------------- train
    Case(
        "train",
        "zero-epochs",
        lambda c: tiny_model(c.adata()).train(max_epochs=0),
        ValueError,
        r"max_epochs=0: pass a positive whole number of epochs, or None",
    ),
    Case(
        "train",
        "fractional-epochs",
        lambda c: tiny_model(c.adata()).train(max_epochs=2.5),
        ValueError,
        r"max_epochs=2\.5: pass a positive whole number",
    ),
    Case(
        "train",
        "zero-batch-size",
        lambda c: tiny_model(c.adata()).train(max_epochs=1, batch_size=0),
        ValueError,
        r"batch_size=0: pass a positive whole number of spots",
    ),
    Case(
        "train",
        "checkpoint-dir-is-a-file",
        lambda c: (
            (c.tmp / "f").write_text("x"),
            tiny_model(c.adata()).train(max_epochs=1, checkpoint_dir=c.tmp / "f"),
        ),
        ValueError,
        r"checkpoint_dir=.*is a file: pass a folder",
    ),
    Case(
        "train",
        "train-size-above-1",
        lambda c: tiny_model(c.adata()).train(max_epochs=1, train_size=1.5, **TRAIN),
        ValueError,
        r"Invalid train_size\. Must be: 0 < train_size <= 1",
    ),
    Case(
        "train",
        "neighbours-changed-after-setup",
        lambda c: (
            m := tiny_model(a := c.adata()),
            edit(a, obsm__spatial_neighbors=at(0, 0, 10**6)),
            m.train(max_epochs=1, **TRAIN),
        ),
        ValueError,
        r"neighbour indices outside \[0, 128\)",
    ),
    Case(
        "train",
        "nan-counts-after-setup",
        lambda c: (
            m := tiny_model(a := c.adata()),
            edit(a, layers__counts=lambda X: sp.csr_matrix(at(3, 3, NAN)(X.toarray()))),
            m.train(max_epochs=1, **TRAIN),
        ),
        ValueError,
        r"layers\['counts'\] contains NaN or inf",
    ),
    Case(
        "train",
        "query-with-nothing-new",
        lambda c: HistoVI.load_query_data(
            HistoVI.prepare_query_anndata(
                query(c, lambda q: edit(q, obs__sample=c.model.adata.obs["sample"].to_numpy())),
                c.model,
            ),
            c.model,
        ).train(max_epochs=1, **TRAIN),
        ValueError,
        r"nothing to train: all its samples and covariate values are the reference's.*get_latent_representation\(query\)",
    ),
    # -------------------------------------------------------------- get_latent_representation
    Case(
        "get_latent_representation",
        "indices-out-of-range",
        lambda c: c.model.get_latent_representation(indices=[0, 1000]),
        ValueError,
        r"indices holds row numbers outside \[0, 128\) \(min 0, max 1000\)",
    ),
    Case(
        "get_latent_representation",
        "indices-not-integer",
        lambda c: c.model.get_latent_representation(indices=[0.5, 2.0]),
        ValueError,
        r"indices must be whole row numbers, got dtype float64",
    ),
    Case(
        "get_latent_representation",
        "indices-empty",
        lambda c: c.model.get_latent_representation(indices=[]),
        ValueError,
        r"indices is empty",
    ),
    Case(
        "get_latent_representation",
        "mask-wrong-length",
        lambda c: c.model.get_latent_representation(indices=np.ones(5, bool)),
        ValueError,
        r"boolean mask of length 5, the AnnData has 128 spots",
    ),
    Case(
        "get_latent_representation",
        "fewer-genes",
        lambda c: c.model.get_latent_representation(c.model.adata[:, 2:].copy()),
        ValueError,
        r"2 of the model's 30 genes are missing \(gene_0, gene_1\).*prepare_query_anndata",
    ),
    Case(
        "get_latent_representation",
        "genes-reordered",
        lambda c: c.model.get_latent_representation(c.model.adata[:, ::-1].copy()),
        ValueError,
        r"adata holds the model's genes in another order\. Map it as a query",
    ),
    Case(
        "get_latent_representation",
        "view-missing",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__X_morphology=None)
        ),
        KeyError,
        r"obsm\['X_morphology'\] \(the model's 'morphology' view\) not found\. Map it as a query",
    ),
    Case(
        "get_latent_representation",
        "neighbours-missing",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__spatial_neighbors=None)
        ),
        KeyError,
        r"obsm\['spatial_neighbors'\] \(the model's spatial neighbours\) not found: compute it with histovi\.pp\.spatial_neighbors\(adata, n_neighbors=4",
    ),
    Case(
        "get_latent_representation",
        "neighbours-out-of-range",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__spatial_neighbors=at(0, 0, 10**6))
        ),
        ValueError,
        r"neighbour indices outside \[0, 128\)",
    ),
    Case(
        "get_latent_representation",
        "morphology-wrong-width",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__X_morphology=lambda x: x[:, :2])
        ),
        ValueError,
        r"obsm\['X_morphology'\] has 2 columns but the model's 'morphology' view has 4",
    ),
    Case(
        "get_latent_representation",
        "morphology-inf",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__X_morphology=at(0, 0, INF))
        ),
        ValueError,
        r"contains inf values",
    ),
    Case(
        "get_latent_representation",
        "nan-counts",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), layers__counts=dense(at(0, 0, NAN)))
        ),
        ValueError,
        r"contains NaN or inf",
    ),
    Case(
        "get_latent_representation",
        "unknown-sample",
        lambda c: c.model.get_latent_representation(query(c)),
        ValueError,
        r"P1_S1_q|categor",
    ),
    Case(
        "get_latent_representation",
        "untrained",
        lambda c: tiny_model(c.adata()).get_latent_representation(),
        RuntimeError,
        r"untrained model\. Please train the model first",
    ),
    # -------------------------------------------------------------- prepare_query_anndata
    Case(
        "prepare_query_anndata",
        "no-shared-genes",
        lambda c: HistoVI.prepare_query_anndata(
            AnnData(X=np.ones((3, 2)), var=pd.DataFrame(index=["ENSG1", "ENSG2"])), c.model
        ),
        ValueError,
        r"None of the reference's genes are in the query's var_names: check that both use the same gene identifiers",
    ),
    Case(
        "prepare_query_anndata",
        "not-anndata",
        lambda c: HistoVI.prepare_query_anndata(np.zeros((3, 3)), c.model),
        TypeError,
        r"prepare_query_anndata needs an AnnData, got ndarray",
    ),
    Case(
        "prepare_query_anndata",
        "bad-reference",
        lambda c: HistoVI.prepare_query_anndata(query(c), 42),
        TypeError,
        r"reference_model must be a trained HistoVI or the folder of a saved HistoVI, got int",
    ),
    Case(
        "prepare_query_anndata",
        "reference-folder-missing",
        lambda c: HistoVI.prepare_query_anndata(query(c), str(c.tmp / "ref")),
        FileNotFoundError,
        r"No saved model at .*ref: the folder does not exist",
    ),
    Case(
        "prepare_query_anndata",
        "morphology-wrong-width",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(q, obsm__X_morphology=lambda x: x[:, :3])), c.model
        ),
        ValueError,
        r"obsm\['X_morphology'\] has 3 columns, the reference's 'morphology' view has 4: embed the query with histovi\.pp\.embed_morphology\(query, reference=",
    ),
    Case(
        "prepare_query_anndata",
        "neighbours-other-k",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(q, obsm__spatial_neighbors=lambda n: n[:, :2])), c.model
        ),
        ValueError,
        r"has 2 neighbours per spot, the reference used 4: recompute with histovi\.pp\.spatial_neighbors\(query, n_neighbors=4\)",
    ),
    Case(
        "prepare_query_anndata",
        "sample-smaller-than-k",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(subset(q, slice(0, 67)), obsm__spatial_neighbors=None)), c.model
        ),
        ValueError,
        r"reference's n_neighbors=4, which failed: .*'P2_S1_q': 3.*drop query samples with at most 4 spots",
    ),
    Case(
        "prepare_query_anndata",
        "encoder-mismatch",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(q, uns__histovi={"morphology": {"encoder": "resnet50"}})),
            _with_record(c),
        ),
        ValueError,
        r"embedded with encoder='resnet50' but the reference used 'stain-texture'",
    ),
    # -------------------------------------------------------------- load_query_data
    Case(
        "load_query_data",
        "not-prepared-fewer-genes",
        lambda c: HistoVI.load_query_data(query(c, lambda q: q[:, 3:].copy()), c.model),
        ValueError,
        r"3 of the reference's 30 genes are missing.*Run HistoVI\.prepare_query_anndata\(query, reference_model\) first",
    ),
    Case(
        "load_query_data",
        "not-prepared-reordered",
        lambda c: HistoVI.load_query_data(query(c, lambda q: q[:, ::-1].copy()), c.model),
        ValueError,
        r"adata holds the reference's genes in another order",
    ),
    Case(
        "load_query_data",
        "view-missing",
        lambda c: HistoVI.load_query_data(
            query(c, lambda q: edit(q, obsm__X_morphology=None)), c.model
        ),
        KeyError,
        r"obsm\['X_morphology'\] \('morphology' view of the reference\) not found: run HistoVI\.prepare_query_anndata",
    ),
    Case(
        "load_query_data",
        "reference-of-another-class",
        lambda c: HistoVI.load_query_data(query(c), "not/a/folder"),
        FileNotFoundError,
        r"No saved model at not/a/folder",
    ),
    # -------------------------------------------------------------- tl
    Case(
        "tl.domains",
        "missing-rep",
        lambda c: histovi.tl.domains(latent(c), n_domains=3, use_rep="X_scvi"),
        KeyError,
        r"obsm\['X_scvi'\] not found.*get_latent_representation",
    ),
    Case(
        "tl.domains",
        "nan-in-rep",
        lambda c: histovi.tl.domains(edit(latent(c), obsm__X_histovi=at(0, 0, NAN)), n_domains=3),
        ValueError,
        r"obsm\['X_histovi'\] has NaN/inf in 1 rows: impute or drop those spots",
    ),
    Case(
        "tl.domains",
        "rep-wrong-shape",
        lambda c: histovi.tl.domains(
            edit(latent(c), obsm__X_histovi=lambda z: z[:, :0]), n_domains=3
        ),
        ValueError,
        r"must be a 2-D \(n_obs, n_dims\) array with n_dims >= 1",
    ),
    Case(
        "tl.domains",
        "gmm-without-k",
        lambda c: histovi.tl.domains(latent(c)),
        ValueError,
        r"method='gmm' needs `n_domains`/`n_clusters`: pass the number of domains or use method='leiden'",
    ),
    Case(
        "tl.domains",
        "unknown-method",
        lambda c: histovi.tl.domains(latent(c), n_domains=3, method="dbscan"),
        ValueError,
        r"`method`='dbscan' is not supported: use 'gmm', 'kmeans' or 'leiden'",
    ),
    Case(
        "tl.domains",
        "fractional-k",
        lambda c: histovi.tl.domains(latent(c), n_domains=2.5),
        ValueError,
        r"=2\.5 must be a whole number of domains \(e\.g\. 2\)",
    ),
    Case(
        "tl.domains",
        "k-above-spots",
        lambda c: histovi.tl.domains(latent(c), n_domains=500),
        ValueError,
        r"=500 must be between 1 and the number of spots \(128\)",
    ),
    Case(
        "tl.domains",
        "negative-smoothing",
        lambda c: histovi.tl.domains(latent(c), n_domains=3, spatial_smoothing=-1),
        ValueError,
        r"`spatial_smoothing`=-1 must be a non-negative integer",
    ),
    Case(
        "tl.domains",
        "smoothing-without-neighbours",
        lambda c: histovi.tl.domains(
            latent(c), n_domains=3, spatial_smoothing=1, neighbors_key="knn"
        ),
        KeyError,
        r"obsm\['knn'\] not found: compute spatial neighbours first",
    ),
    Case(
        "tl.domains",
        "smoothing-neighbours-out-of-range",
        lambda c: histovi.tl.domains(
            edit(latent(c), obsm__spatial_neighbors=at(0, 0, 999)), n_domains=3, spatial_smoothing=1
        ),
        ValueError,
        r"indices up to 999 but only 128 rows.*recompute it with histovi\.pp\.spatial_neighbors",
    ),
    Case(
        "tl.domains",
        "one-spot",
        lambda c: histovi.tl.domains(subset(latent(c), slice(0, 1)), n_domains=1),
        ValueError,
        r"clustering needs at least 2 spots, got 1",
    ),
    Case(
        "tl.domains",
        "empty",
        lambda c: histovi.tl.domains(subset(latent(c), slice(0, 0)), n_domains=1),
        ValueError,
        r"`adata` has no observations \(0 spots\)",
    ),
    Case(
        "tl.domains",
        "not-anndata",
        lambda c: histovi.tl.domains(np.zeros((5, 2)), n_domains=2),
        TypeError,
        r"`adata` must be an AnnData, got ndarray",
    ),
    Case(
        "tl.transfer_labels",
        "missing-label",
        lambda c: histovi.tl.transfer_labels(latent(c), latent(c), label_key="celltype"),
        KeyError,
        r"reference\.obs\['celltype'\] not found: compute domains on the reference first",
    ),
    Case(
        "tl.transfer_labels",
        "widths-differ",
        lambda c: histovi.tl.transfer_labels(
            latent(c), edit(latent(c), obsm__X_histovi=lambda z: z[:, :2])
        ),
        ValueError,
        r"has 3 dimensions but query\.obsm\['X_histovi'\] has 2: both must come from the same model",
    ),
    Case(
        "tl.transfer_labels",
        "query-without-latent",
        lambda c: histovi.tl.transfer_labels(latent(c), c.adata()),
        KeyError,
        r"query\.obsm\['X_histovi'\] not found.*get_latent_representation\(adata\)",
    ),
    Case(
        "tl.transfer_labels",
        "zero-neighbours",
        lambda c: histovi.tl.transfer_labels(latent(c), latent(c), n_neighbors=0),
        ValueError,
        r"`n_neighbors`=0 must be a positive integer",
    ),
    Case(
        "tl.transfer_labels",
        "no-labels",
        lambda c: histovi.tl.transfer_labels(
            edit(
                latent(c),
                obs__domain=lambda s: pd.Series([None] * len(s), index=s.index, dtype=object),
            ),
            latent(c),
        ),
        ValueError,
        r"reference\.obs\['domain'\] has no non-missing label",
    ),
    Case(
        "tl.transfer_labels",
        "empty-query",
        lambda c: histovi.tl.transfer_labels(latent(c), subset(latent(c), slice(0, 0))),
        ValueError,
        r"`query` has no observations",
    ),
    Case(
        "tl.aggregate_neighbors",
        "zero-hops",
        lambda c: histovi.tl.aggregate_neighbors(latent(c), "X_histovi", n_hops=0),
        ValueError,
        r"`n_hops`=0 must be a positive integer",
    ),
    Case(
        "tl.aggregate_neighbors",
        "missing-neighbours",
        lambda c: histovi.tl.aggregate_neighbors(latent(c), "X_histovi", neighbors_key="knn"),
        KeyError,
        r"obsm\['knn'\] not found: compute spatial neighbours first",
    ),
    Case(
        "tl.aggregate_neighbors",
        "nan-neighbours",
        lambda c: histovi.tl.aggregate_neighbors(
            edit(latent(c), obsm__spatial_neighbors=lambda n: at(0, 0, NAN)(n.astype(float))),
            "X_histovi",
        ),
        ValueError,
        r"must hold integer row indices: recompute it",
    ),
    Case(
        "tl.aggregate_neighbors",
        "missing-rep",
        lambda c: histovi.tl.aggregate_neighbors(latent(c), "X_pca"),
        KeyError,
        r"obsm\['X_pca'\] not found.*pass `use_rep=`",
    ),
    # -------------------------------------------------------------- metrics
    Case(
        "metrics.per_sample_scores",
        "missing-cluster-key",
        lambda c: histovi.metrics.per_sample_scores(latent(c), "domain", "clusters"),
        KeyError,
        r"obs\['clusters'\] not found: run histovi\.tl\.domains\(adata\) first",
    ),
    Case(
        "metrics.per_sample_scores",
        "no-usable-label",
        lambda c: histovi.metrics.per_sample_scores(
            latent(c),
            "domain",
            "domain",
            ignore=tuple(c.model.adata.obs["domain"].astype(str).unique()),
        ),
        ValueError,
        r"obs\['domain'\] has no usable label",
    ),
    Case(
        "metrics.per_sample_scores",
        "clusters-with-nan",
        lambda c: histovi.metrics.per_sample_scores(
            edit(latent(c), obs__clusters=np.array([None] * 128, dtype=object)),
            "domain",
            "clusters",
        ),
        ValueError,
        r"obs\['clusters'\] has missing values: every spot needs a cluster",
    ),
    Case(
        "metrics.per_sample_scores",
        "misspelled-sample-key",
        lambda c: histovi.metrics.per_sample_scores(
            latent(c), "domain", "domain", sample_key="slide"
        ),
        KeyError,
        r"obs\['slide'\] not found",
    ),
    Case(
        "metrics.spatial_coherence",
        "missing-neighbours",
        lambda c: histovi.metrics.spatial_coherence(latent(c), neighbors_key="knn"),
        KeyError,
        r"obsm\['knn'\] not found: compute spatial neighbours first",
    ),
    Case(
        "metrics.spatial_coherence",
        "missing-clusters",
        lambda c: histovi.metrics.spatial_coherence(latent(c), cluster_key="leiden"),
        KeyError,
        r"obs\['leiden'\] not found: run histovi\.tl\.domains",
    ),
    Case(
        "metrics.cluster_and_score",
        "rows-differ",
        lambda c: histovi.metrics.cluster_and_score(np.zeros((10, 2)), ["a"] * 128, ["s"] * 128),
        ValueError,
        r"`embedding` has 10 rows but the labels/samples have 128",
    ),
    Case(
        "metrics.cluster_and_score",
        "lengths-differ",
        lambda c: histovi.metrics.cluster_and_score(np.zeros((128, 2)), ["a"] * 128, ["s"] * 5),
        ValueError,
        r"`labels` \(128\) and `samples` \(5\) differ in length",
    ),
    Case(
        "metrics.cluster_and_score",
        "inf-embedding",
        lambda c: histovi.metrics.cluster_and_score(
            at(0, 0, INF)(np.zeros((128, 2))), ["a"] * 128, ["s"] * 128
        ),
        ValueError,
        r"`embedding` contains NaN/inf",
    ),
    Case(
        "metrics.cluster_and_score",
        "samples-with-nan",
        lambda c: histovi.metrics.cluster_and_score(
            np.zeros((3, 2)), ["a", "b", "a"], ["s", None, "s"]
        ),
        ValueError,
        r"`samples` has missing values: give every spot a section id",
    ),
    Case(
        "metrics.cluster_and_score",
        "no-labels",
        lambda c: histovi.metrics.cluster_and_score(np.zeros((3, 2)), [None] * 3, ["s"] * 3),
        ValueError,
        r"`labels` has no usable label",
    ),
    Case(
        "metrics.cluster_and_score",
        "no-seeds",
        lambda c: histovi.metrics.cluster_and_score(
            np.zeros((3, 2)), ["a", "b", "a"], ["s"] * 3, seeds=()
        ),
        ValueError,
        r"`methods` and `seeds` must each name at least one value",
    ),
    Case(
        "metrics.integration_scores",
        "one-label-class",
        lambda c: histovi.metrics.integration_scores(
            edit(latent(c), obs__domain="x"), label_key="domain"
        ),
        ValueError,
        r"fewer than 2 usable label classes",
    ),
    Case(
        "metrics.integration_scores",
        "one-batch",
        lambda c: histovi.metrics.integration_scores(
            edit(latent(c), obs__sample="s"), label_key="domain"
        ),
        ValueError,
        r"labelled spots come from a single batch of adata\.obs\['sample'\]",
    ),
    Case(
        "metrics.integration_scores",
        "zero-neighbours",
        lambda c: histovi.metrics.integration_scores(latent(c), label_key="domain", n_neighbors=0),
        ValueError,
        r"`n_neighbors`=0 must be a whole number >= 3",
    ),
    Case(
        "metrics.evaluate",
        "missing-label",
        lambda c: histovi.metrics.evaluate(latent(c), label_key="celltype"),
        KeyError,
        r"obs\['celltype'\] not found",
    ),
    Case(
        "metrics.evaluate",
        "unknown-method",
        lambda c: histovi.metrics.evaluate(
            latent(c), label_key="domain", methods=("dbscan",), integration=False
        ),
        ValueError,
        r"`method`='dbscan' is not supported",
    ),
    Case(
        "metrics.summarize",
        "empty",
        lambda c: histovi.metrics.summarize(pd.DataFrame()),
        ValueError,
        r"`df` must be a non-empty DataFrame from histovi\.metrics\.cluster_and_score",
    ),
    Case(
        "metrics.summarize",
        "missing-columns",
        lambda c: histovi.metrics.summarize(pd.DataFrame({"ARI": [0.1]})),
        KeyError,
        r"`df` lacks columns \['seed', 'NMI'\]",
    ),
    # -------------------------------------------------------------- histovi run (CLI)
    Case(
        "cli",
        "input-missing",
        lambda c: cli_raw(c, ["--input", str(c.tmp / "none.h5ad"), "--out", str(c.tmp / "o")]),
        CliError,
        r"--input .*none\.h5ad' does not exist: give a \.h5ad file",
    ),
    Case(
        "cli",
        "unknown-format",
        lambda c: (
            (c.tmp / "x.csv").write_text("a"),
            cli_raw(c, ["--input", str(c.tmp / "x.csv"), "--out", str(c.tmp / "o")]),
        ),
        CliError,
        r"unknown format '\.csv'",
    ),
    Case(
        "cli",
        "corrupt-h5ad",
        lambda c: (
            (c.tmp / "x.h5ad").write_bytes(b"not hdf5"),
            cli_raw(c, ["--input", str(c.tmp / "x.h5ad"), "--out", str(c.tmp / "o")]),
        ),
        CliError,
        r"cannot read --input .*x\.h5ad'",
    ),
    Case(
        "cli",
        "misspelled-sample-key",
        lambda c: cli_run(c, None, "--sample-key", "slide"),
        CliError,
        r"--sample-key 'slide' is not a column of adata\.obs \(columns: sample, patient, domain\)",
    ),
    Case(
        "cli",
        "misspelled-label-key",
        lambda c: cli_run(c, None, "--label-key", "celltype"),
        CliError,
        r"--label-key 'celltype' is not a column of adata\.obs",
    ),
    Case(
        "cli",
        "misspelled-layer",
        lambda c: cli_run(c, None, "--layer", "raw"),
        CliError,
        r"--layer 'raw' is not in adata\.layers \(counts\)",
    ),
    Case(
        "cli",
        "unknown-samples",
        lambda c: cli_run(c, None, "--samples", "P9_S9"),
        CliError,
        r"--samples P9_S9 not found in adata\.obs\['sample'\] \(values: P1_S1, P2_S1\)",
    ),
    Case(
        "cli",
        "one-domain",
        lambda c: cli_run(c, None, "--n-domains", "1"),
        CliError,
        r"--n-domains 1 must be at least 2",
    ),
    Case(
        "cli",
        "zero-epochs",
        lambda c: cli_run(c, None, "--max-epochs", "0"),
        CliError,
        r"--max-epochs 0 must be at least 1",
    ),
    Case(
        "cli",
        "negative-genes",
        lambda c: cli_run(c, None, "--n-top-genes", "-1"),
        CliError,
        r"--n-top-genes -1 must be 0 \(all genes\) or positive",
    ),
    Case(
        "cli",
        "normalised-counts",
        lambda c: cli_run(c, lambda a: edit(a, layers__counts=dense(np.log1p))),
        CliError,
        r"counts: adata\.layers\['counts'\] contains non-integer values",
    ),
    Case(
        "cli",
        "precomputed-without-morphology",
        lambda c: cli_run(
            c, lambda a: edit(a, obsm__X_morphology=None), "--encoder", "precomputed"
        ),
        CliError,
        r"--encoder precomputed but adata\.obsm\['X_morphology'\] not found",
    ),
    Case(
        "cli",
        "no-spot-centres",
        lambda c: cli_run(c, lambda a: edit(a, obsm__spatial=None)),
        CliError,
        r"adata\.obsm\['spatial'\] \(spot centres\) not found",
    ),
    Case(
        "cli",
        "sample-with-nan",
        lambda c: cli_run(
            c,
            lambda a: edit(
                a, obs__sample=lambda s: s.astype(object).where(np.arange(len(s)) > 0, None)
            ),
        ),
        CliError,
        r"adata\.obs\['sample'\] has missing values: give every spot a sample id",
    ),
    Case(
        "cli",
        "identical-coordinates",
        lambda c: cli_run(c, lambda a: edit(a, obsm__spatial=lambda x: np.zeros_like(x))),
        CliError,
        r"spatial neighbours: adata\.obsm\['spatial'\] puts every spot of sample 'P1_S1' at the same position",
    ),
    Case(
        "cli",
        "out-is-a-file",
        lambda c: ((c.tmp / "f").write_text("x"), cli_run(c, None, out=c.tmp / "f")),
        CliError,
        r"--out .*f' is a file: pass a folder",
    ),
    Case(
        "cli",
        "out-holds-a-finished-run",
        lambda c: cli_run(c, None, out=finished_run(c)),
        CliError,
        r"already holds the outputs of a previous run \(adata\.h5ad\): pass --overwrite to replace them, or choose another --out",
    ),
    Case(
        "cli",
        "zero-grid",
        lambda c: cli_raw(c, ["--sim-grid", "0", "--out", str(c.tmp / "o")]),
        CliError,
        r"--sim-grid must be at least 1",
    ),
]


def _with_record(c):
    """A reference whose morphology record names its encoder (as embed_morphology writes)."""
    import copy

    model = copy.copy(c.model)
    model.histovi_setup_ = {
        **c.model.histovi_setup_,
        "morphology_record": {"encoder": "stain-texture"},
    }
    return model


@pytest.fixture
def ctx(tiny_adata, tiny_trained, tmp_path, capsys):
    return SimpleNamespace(
        adata=lambda: tiny_adata.copy(), model=tiny_trained, tmp=tmp_path, capsys=capsys
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_naming_key_and_fix(case, ctx):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cases assert errors; warnings are checked below
        with pytest.raises(case.error, match=case.match):
            case.call(ctx)


# ------------------------------------------------------------------ documented warnings
WARNS = [
    Case(
        "pp.embed_morphology",
        "one-corrupt-image",
        lambda c: histovi.pp.embed_morphology(
            image_files(c.adata(), c.tmp, {0: "garbage"}), **FAST_TILES
        ),
        UserWarning,
        r"no image for sample\(s\) 'P1_S1' \(image file .*P1_S1\.png' cannot be read",
    ),
    Case(
        "pp.embed_morphology",
        "truncated-jpeg",
        lambda c: histovi.pp.embed_morphology(
            image_files(c.adata(), c.tmp, {0: "truncated"}), **FAST_TILES
        ),
        UserWarning,
        r"'P1_S1' \(image file .*P1_S1\.jpg' cannot be read \(OSError: image file is truncated",
    ),
    Case(
        "pp.embed_morphology",
        "missing-image-file",
        lambda c: histovi.pp.embed_morphology(
            image_files(c.adata(), c.tmp, {1: "missing"}), **FAST_TILES
        ),
        UserWarning,
        r"no image for sample\(s\) 'P2_S1' \(image file .* not found",
    ),
    Case(
        "pp.embed_morphology",
        "scale-factor-too-large",
        lambda c: histovi.pp.embed_morphology(scale_images(20.0)(c.adata()), **FAST_TILES),
        UserWarning,
        r"100% of the spots of sample 'P1_S1' lie outside its image .*tissue_hires_scalef",
    ),
    Case(
        "pp.embed_morphology",
        "scale-factor-too-small",
        lambda c: histovi.pp.embed_morphology(scale_images(1 / 40)(c.adata()), **FAST_TILES),
        UserWarning,
        r"the spots of sample 'P1_S1' cover a patch under 5% of its image's side",
    ),
    Case(
        "pp.embed_morphology",
        "no-usable-tile",
        lambda c: histovi.pp.embed_morphology(scale_images(20.0)(c.adata()), **FAST_TILES),
        UserWarning,
        r"no spot got a usable tile: every row of obsm\['X_morphology'\] is NaN",
    ),
    Case(
        "io.read_folder",
        "corrupt-image-load",
        lambda c: (
            image_files(c.adata(), c.tmp, {0: "garbage"}).write_h5ad(c.tmp / "s.h5ad"),
            histovi.io.read_folder(c.tmp, load_images=True),
        ),
        UserWarning,
        r"image files not found or unreadable for P1_S1 \(.*unreadable",
    ),
    Case(
        "io.read_folder",
        "missing-image",
        lambda c: (
            image_files(c.adata(), c.tmp, {1: "missing"}).write_h5ad(c.tmp / "s.h5ad"),
            histovi.io.read_folder(c.tmp),
        ),
        UserWarning,
        r"not found or unreadable for P2_S1",
    ),
    Case(
        "prepare_query_anndata",
        "missing-genes",
        lambda c: HistoVI.prepare_query_anndata(query(c, lambda q: q[:, 4:].copy()), c.model),
        UserWarning,
        r"4 of the reference's 30 genes are missing from the query and are filled with zeros",
    ),
    Case(
        "prepare_query_anndata",
        "missing-view",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(q, obsm__X_morphology=None)), c.model
        ),
        UserWarning,
        r"no adata\.obsm\['X_morphology'\] \('morphology' view\): it maps with the views it has",
    ),
    Case(
        "HistoVI.load",
        "other-histovi-version",
        lambda c: _load_older(c),
        UserWarning,
        r"saved with histovi 0\.0\.9; this is histovi",
    ),
]


def _load_older(c):
    import torch

    c.model.save(c.tmp / "m")
    saved = torch.load(c.tmp / "m" / "model.pt", weights_only=True)
    saved["attr_dict"]["histovi_versions_"]["histovi"] = "0.0.9"
    torch.save(saved, c.tmp / "m" / "model.pt")
    HistoVI.load(c.tmp / "m", adata=c.model.adata.copy())


@pytest.mark.parametrize("case", WARNS, ids=[c.id for c in WARNS])
def test_recoverable_input_warns_naming_the_cause(case, ctx):
    with pytest.warns(case.error, match=case.match):
        case.call(ctx)


def test_case_counts_per_entry_point():
    """The table's coverage, printed with ``pytest -s``; every entry point has cases."""
    counts = pd.Series([c.entry for c in CASES + WARNS]).value_counts().sort_index()
    print("\n" + counts.to_string())
    entries = set(counts.index)
    for required in (
        "pp.spatial_neighbors",
        "pp.embed_morphology",
        "pp.embed_expression",
        "io.read_folder",
        "io.from_spatialdata",
        "setup_anndata",
        "setup_mudata",
        "train",
        "get_latent_representation",
        "prepare_query_anndata",
        "load_query_data",
        "tl.domains",
        "metrics.cluster_and_score",
        "cli",
    ):
        assert required in entries


# ------------------------------------------------------------------ accepted edge cases
def test_empty_spots_and_genes_train_to_a_finite_latent(tiny_adata):
    """All-zero spots and genes are valid data (empty spots under tissue, genes not detected):
    the latent stays finite."""
    X = tiny_adata.layers["counts"].toarray()
    X[:5] = 0  # five empty spots
    X[:, :5] = 0  # five genes never detected
    adata = edit(tiny_adata, layers__counts=sp.csr_matrix(X))
    model = tiny_model(adata)
    model.train(max_epochs=2, **TRAIN)
    assert np.isfinite(model.get_latent_representation()).all()


def test_empty_sample_category_is_not_a_sample(tiny_adata):
    """A category without spots, left over after subsetting, used to be reported as a sample
    with 0 spots by spatial_neighbors."""
    tiny_adata.obs["sample"] = (
        tiny_adata.obs["sample"].astype("category").cat.add_categories(["gone"])
    )
    histovi.pp.spatial_neighbors(tiny_adata, sample_key="sample", n_neighbors=4)
    assert tiny_adata.obsm[K].shape == (128, 4)


def test_nan_input_reaching_training_is_named(tiny_adata, monkeypatch):
    """Dense counts are checked on their first rows only; a NaN further down reaches training,
    which stops naming the expression input instead of failing inside torch.distributions."""
    from histovi import _validation
    from histovi.model import TrainingDivergedError

    monkeypatch.setattr(_validation.check_counts, "__defaults__", (10,))
    adata = edit(tiny_adata, layers__counts=dense(at(127, 0, NAN)))
    model = tiny_model(adata)
    with pytest.raises(
        TrainingDivergedError, match=r"the input of 'expression' holds NaN or inf values"
    ):
        model.train(max_epochs=1, **{**TRAIN, "batch_size": 128})


# ------------------------------------------------------------------ property-based
PROPS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPS
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 5),
    data=st.data(),
)
def test_view_rows_are_complete_or_missing(n, d, data):
    from histovi._validation import check_finite_or_nan_rows

    values = np.zeros((n, d))
    nan = np.array(data.draw(st.lists(st.booleans(), min_size=n * d, max_size=n * d))).reshape(n, d)
    inf = np.array(data.draw(st.lists(st.booleans(), min_size=n * d, max_size=n * d))).reshape(n, d)
    values[nan] = np.nan
    values[inf & ~nan] = np.inf
    partial = nan.any(1) & ~nan.all(1)
    if (inf & ~nan).any():
        with pytest.raises(ValueError, match=r"obsm\['v'\] contains inf values"):
            check_finite_or_nan_rows(values, "v")
    elif partial.any():
        with pytest.raises(
            ValueError, match=rf"has {int(partial.sum())} rows with some but not all"
        ):
            check_finite_or_nan_rows(values, "v")
    else:
        np.testing.assert_array_equal(check_finite_or_nan_rows(values, "v"), ~nan.all(1))


@PROPS
@given(
    shape=st.tuples(st.integers(1, 8), st.integers(1, 6)),
    kind=st.sampled_from(["ok", "negative", "fraction", "nan", "inf"]),
    cell=st.tuples(st.integers(0, 7), st.integers(0, 5)),
    sparse=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_counts_are_finite_non_negative_integers(shape, kind, cell, sparse, seed):
    from histovi._validation import check_counts

    X = np.random.default_rng(seed).poisson(2, shape).astype(np.float64)
    i, j = cell[0] % shape[0], cell[1] % shape[1]
    X[i, j] = {"ok": X[i, j], "negative": -1, "fraction": 0.5, "nan": np.nan, "inf": np.inf}[kind]
    adata = AnnData(X=sp.csr_matrix(X) if sparse else X)
    match = {
        "negative": "negative values",
        "fraction": "non-integer",
        "nan": "NaN or inf",
        "inf": "NaN or inf",
    }
    if kind == "ok":
        check_counts(adata, None)
    else:
        with pytest.raises(ValueError, match=rf"adata\.X contains {match[kind]}"):
            check_counts(adata, None)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    k=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_neighbours_stay_within_samples_of_any_size(sizes, k, seed):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    samples = np.repeat([f"s{i}" for i in range(len(sizes))], sizes)
    adata = AnnData(obs=pd.DataFrame({"sample": samples}, index=[f"c{i}" for i in range(n)]))
    adata.obsm["spatial"] = rng.permutation(n * 3)[: 2 * n].reshape(n, 2).astype(float)
    if min(sizes) <= k:
        small = {f"s{i}": s for i, s in enumerate(sizes) if s <= k}
        with pytest.raises(ValueError, match=rf"at most n_neighbors={k} spots.*{list(small)[0]}"):
            histovi.pp.spatial_neighbors(adata, n_neighbors=k)
        return
    histovi.pp.spatial_neighbors(adata, n_neighbors=k)
    nbrs = adata.obsm["spatial_neighbors"]
    assert nbrs.shape == (n, k)
    assert (samples[nbrs] == samples[:, None]).all()
    assert not (nbrs == np.arange(n)[:, None]).any()


@PROPS
@given(rows=st.lists(st.integers(-3, 140), min_size=1, max_size=6), cross=st.booleans())
def test_neighbour_matrices_in_range_and_within_samples(rows, cross):
    from histovi._validation import check_neighbors

    adata = AnnData(
        obs=pd.DataFrame({"sample": np.repeat(["a", "b"], 64)}, index=[f"c{i}" for i in range(128)])
    )
    nbrs = np.tile(np.arange(4), (128, 1))
    nbrs[64:] += 64
    nbrs[0, : len(rows[:4])] = rows[:4]
    if cross:
        nbrs[70, 0] = 1
    adata.obsm["nb"] = nbrs
    out_of_range = any(r < 0 or r >= 128 for r in rows[:4])
    crossing = cross or any(64 <= r < 128 for r in rows[:4])
    if out_of_range:
        with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
            check_neighbors(adata, "nb", "sample")
    elif crossing:
        with pytest.raises(ValueError, match=r"spots to neighbours in another sample"):
            check_neighbors(adata, "nb", "sample")
    else:
        np.testing.assert_array_equal(check_neighbors(adata, "nb", "sample"), nbrs)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(missing_rows=st.lists(st.booleans(), min_size=128, max_size=128))
def test_any_mask_of_missing_morphology_rows_is_accepted(tiny_adata, missing_rows):
    adata = tiny_adata.copy()
    mask = np.array(missing_rows)
    adata.obsm[M] = np.where(mask[:, None], np.nan, adata.obsm[M])
    if mask.all():
        with pytest.raises(ValueError, match=r"is NaN for every spot"):
            setup(adata)
    else:
        setup(adata)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_query_genes_any_subset_and_order(tiny_trained, data):
    genes = list(tiny_trained.adata.var_names)
    kept = data.draw(st.lists(st.sampled_from(genes), unique=True, max_size=len(genes)))
    q = (
        tiny_trained.adata[:, kept].copy()
        if kept
        else AnnData(X=np.zeros((3, 1)), var=pd.DataFrame(index=["other"]))
    )
    q.obs["sample"] = "q"
    if not kept:
        with pytest.raises(ValueError, match="None of the reference's genes"):
            HistoVI.prepare_query_anndata(q, tiny_trained)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = HistoVI.prepare_query_anndata(q, tiny_trained)
    assert list(prepared.var_names) == genes
    filled = [str(w.message) for w in caught if "filled with zeros" in str(w.message)]
    assert bool(filled) == (len(kept) < len(genes))
    X = prepared.layers["counts"]
    np.testing.assert_array_equal(
        X[:, [genes.index(g) for g in kept]].toarray(), q.layers["counts"].toarray()
    )


@PROPS
@given(idx=st.lists(st.integers(-5, 140), min_size=0, max_size=5))
def test_indices_in_range_or_refused(idx):
    from histovi._validation import check_indices

    if not idx:
        with pytest.raises(ValueError, match="is empty"):
            check_indices(np.array(idx, dtype=int), 128)
    elif min(idx) < 0 or max(idx) >= 128:
        with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
            check_indices(idx, 128)
    else:
        check_indices(idx, 128)
