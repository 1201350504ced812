"""Bad input at every public entry point (issue 21): one table of cases, each a call that must
fail early with an error naming the key and the fix (the key as written, and the fix's essential
words in any order: ``tests/_messages.py``), or warn and carry on where that is the documented
behaviour; then property-based checks (hypothesis) of the validators over random shapes, NaN
masks and sample sizes.

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
from _messages import raises_naming, warns_naming
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
    #: what the message must name: the key (as written in the message) and the fix's words
    key: str
    fix: tuple[str, ...]

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
        "obsm['coords']",
        ("spatial_key=",),
    ),
    Case(
        "pp.spatial_neighbors",
        "misspelled-sample-key",
        lambda c: histovi.pp.spatial_neighbors(c.adata(), sample_key="slide"),
        KeyError,
        "obs['slide']",
        ("sample_key=",),
    ),
    Case(
        "pp.spatial_neighbors",
        "nan-coordinates",
        lambda c: histovi.pp.spatial_neighbors(edit(c.adata(), obsm__spatial=at(3, 0, NAN))),
        ValueError,
        "obsm['spatial']",
        ("NaN/inf", "1 spots", "remove those spots"),
    ),
    Case(
        "pp.spatial_neighbors",
        "inf-coordinates",
        lambda c: histovi.pp.spatial_neighbors(edit(c.adata(), obsm__spatial=at(0, 1, INF))),
        ValueError,
        "obsm['spatial']",
        ("NaN/inf", "remove those spots"),
    ),
    Case(
        "pp.spatial_neighbors",
        "all-identical-coordinates",
        lambda c: histovi.pp.spatial_neighbors(
            edit(c.adata(), obsm__spatial=lambda x: np.ones_like(x))
        ),
        ValueError,
        "obsm['spatial']",
        ("'P1_S1'", "same position", "spatial_key="),
    ),
    Case(
        "pp.spatial_neighbors",
        "one-coordinate-column",
        lambda c: histovi.pp.spatial_neighbors(edit(c.adata(), obsm__spatial=lambda x: x[:, :1])),
        ValueError,
        "obsm['spatial']",
        ("1 column", "(x, y)"),
    ),
    Case(
        "pp.spatial_neighbors",
        "text-coordinates",
        lambda c: histovi.pp.spatial_neighbors(
            edit(c.adata(), obsm__spatial=lambda x: np.full(x.shape, "x", dtype=object))
        ),
        ValueError,
        "obsm['spatial']",
        ("numbers", "spatial_key="),
    ),
    Case(
        "pp.spatial_neighbors",
        "sparse-coordinates",
        lambda c: histovi.pp.spatial_neighbors(edit(c.adata(), obsm__spatial=sp.csr_matrix)),
        ValueError,
        "obsm['spatial']",
        ("sparse", ".toarray()"),
    ),
    Case(
        "pp.spatial_neighbors",
        "sample-smaller-than-k",
        lambda c: histovi.pp.spatial_neighbors(subset(c.adata(), slice(0, 67))),
        ValueError,
        "obs['sample']",
        ("'P2_S1': 3", "n_neighbors=6", "remove them", "lower n_neighbors"),
    ),
    Case(
        "pp.spatial_neighbors",
        "too-few-spots-no-sample",
        lambda c: histovi.pp.spatial_neighbors(subset(c.adata(), slice(0, 4)), sample_key=None),
        ValueError,
        "n_neighbors=6",
        ("4 spots", "lower n_neighbors"),
    ),
    Case(
        "pp.spatial_neighbors",
        "k-zero",
        lambda c: histovi.pp.spatial_neighbors(c.adata(), n_neighbors=0),
        ValueError,
        "n_neighbors=0",
        ("positive integer",),
    ),
    Case(
        "pp.spatial_neighbors",
        "k-float",
        lambda c: histovi.pp.spatial_neighbors(c.adata(), n_neighbors=2.5),
        ValueError,
        "n_neighbors=2.5",
        ("positive integer",),
    ),
    Case(
        "pp.spatial_neighbors",
        "k-bool",
        lambda c: histovi.pp.spatial_neighbors(c.adata(), n_neighbors=True),
        ValueError,
        "n_neighbors=True",
        ("positive integer",),
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
        "obs['sample']",
        ("missing values", "every spot needs a sample"),
    ),
    Case(
        "pp.spatial_neighbors",
        "not-anndata",
        lambda c: histovi.pp.spatial_neighbors(np.zeros((5, 2))),
        TypeError,
        "adata",
        ("AnnData", "ndarray", "anndata.read_h5ad"),
    ),
    # -------------------------------------------------------------- pp.embed_morphology
    Case(
        "pp.embed_morphology",
        "missing-spatial-key",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), spatial_key="xy", **FAST_TILES),
        KeyError,
        "obsm['xy']",
        ("spatial_key=",),
    ),
    Case(
        "pp.embed_morphology",
        "misspelled-sample-key",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), sample_key="slide", **FAST_TILES),
        KeyError,
        "obs['slide']",
        ("sample_key=",),
    ),
    Case(
        "pp.embed_morphology",
        "negative-tile-size",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), tile_size_um=-1.0, progress=False),
        ValueError,
        "tile_size_um=-1.0",
        ("positive number",),
    ),
    Case(
        "pp.embed_morphology",
        "zero-target-mpp",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), target_mpp=0.0, progress=False),
        ValueError,
        "target_mpp=0.0",
        ("positive number",),
    ),
    Case(
        "pp.embed_morphology",
        "tissue-fraction-above-1",
        lambda c: histovi.pp.embed_morphology(
            images(c.adata()), min_tissue_fraction=2.0, **FAST_TILES
        ),
        ValueError,
        "min_tissue_fraction=2.0",
        ("[0, 1]",),
    ),
    Case(
        "pp.embed_morphology",
        "unknown-stain-method",
        lambda c: histovi.pp.embed_morphology(
            images(c.adata()), stain_normalization="vahadane", **FAST_TILES
        ),
        ValueError,
        "stain_normalization='vahadane'",
        ("None", "'macenko'", "'reinhard'"),
    ),
    Case(
        "pp.embed_morphology",
        "zero-components",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), n_components=0, **FAST_TILES),
        ValueError,
        "n_components=0",
        ("positive integer", "None"),
    ),
    Case(
        "pp.embed_morphology",
        "zero-batch-size",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), batch_size=0, **FAST_TILES),
        ValueError,
        "batch_size=0",
        ("positive integer",),
    ),
    Case(
        "pp.embed_morphology",
        "no-images",
        lambda c: histovi.pp.embed_morphology(edit(c.adata(), uns__spatial={}), **FAST_TILES),
        ValueError,
        "uns['spatial']",
        ("no section has a usable image", "['images']", "'image_file'", "image_dir="),
    ),
    Case(
        "pp.embed_morphology",
        "corrupt-image-files",
        lambda c: histovi.pp.embed_morphology(
            image_files(c.adata(), c.tmp, {0: "garbage", 1: "garbage"}), **FAST_TILES
        ),
        ValueError,
        "P1_S1.png'",
        ("no section has a usable image", "cannot be read", "corrupted"),
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
        "(9, 9, 5)",
        ("(height, width, 3)", "RGB"),
    ),
    Case(
        "pp.embed_morphology",
        "not-anndata",
        lambda c: histovi.pp.embed_morphology(np.zeros(3), **FAST_TILES),
        ValueError,
        "data",
        ("AnnData", "SpatialData", "ndarray"),
    ),
    Case(
        "pp.embed_morphology",
        "reference-without-record",
        lambda c: histovi.pp.embed_morphology(images(c.adata()), reference=c.adata(), **FAST_TILES),
        ValueError,
        "uns['histovi']['morphology']",
        ("histovi.pp.embed_morphology", "on the reference first"),
    ),
    # -------------------------------------------------------------- pp.embed_expression
    Case(
        "pp.embed_expression",
        "unknown-model",
        lambda c: histovi.pp.embed_expression(c.adata(), "uce"),
        ValueError,
        "model='uce'",
        ("'geneformer'", "'scgpt'", "'pca'"),
    ),
    Case(
        "pp.embed_expression",
        "missing-layer",
        lambda c: histovi.pp.embed_expression(c.adata(), "pca", layer="raw"),
        KeyError,
        "layers['raw']",
        ("layer=", "layer=None"),
    ),
    Case(
        "pp.embed_expression",
        "nan-counts",
        lambda c: histovi.pp.embed_expression(
            edit(c.adata(), layers__counts=dense(at(0, 0, NAN))), "pca", layer="counts"
        ),
        ValueError,
        "layers['counts']",
        ("NaN or inf", "raw", "layer="),
    ),
    Case(
        "pp.embed_expression",
        "negative-counts",
        lambda c: histovi.pp.embed_expression(
            edit(c.adata(), layers__counts=dense(at(0, 0, -1))), "pca", layer="counts"
        ),
        ValueError,
        "layers['counts']",
        ("negative values", "raw counts", "layer="),
    ),
    Case(
        "pp.embed_expression",
        "normalised-counts",
        lambda c: histovi.pp.embed_expression(
            edit(c.adata(), layers__counts=dense(lambda X: np.log1p(X))), "pca", layer="counts"
        ),
        ValueError,
        "layers['counts']",
        ("non-integer", "raw counts", "layer="),
    ),
    Case(
        "pp.embed_expression",
        "empty",
        lambda c: histovi.pp.embed_expression(c.adata()[:0].copy(), "pca"),
        ValueError,
        "adata",
        ("no spots", "non-empty"),
    ),
    Case(
        "pp.embed_expression",
        "all-zero-counts",
        lambda c: histovi.pp.embed_expression(
            edit(c.adata(), layers__counts=lambda X: sp.csr_matrix(X.shape)), "pca", layer="counts"
        ),
        ValueError,
        "PCA",
        ("at least 2 spots with counts",),
    ),
    Case(
        "pp.embed_expression",
        "zero-components",
        lambda c: histovi.pp.embed_expression(c.adata(), "pca", layer="counts", n_comps=0),
        ValueError,
        "n_comps=0",
        ("positive integer",),
    ),
    Case(
        "pp.embed_expression",
        "scgpt-in-process",
        lambda c: histovi.pp.embed_expression(c.adata(), "scgpt"),
        ImportError,
        "model='scgpt'",
        ("precomputed-embedding route", "embedding_keys="),
    ),
    Case(
        "pp.embed_expression",
        "zero-batch-size",
        lambda c: histovi.pp.embed_expression(c.adata(), "pca", batch_size=0),
        ValueError,
        "batch_size=0",
        ("positive integer",),
    ),
    # -------------------------------------------------------------- io.read_folder
    Case(
        "io.read_folder",
        "not-a-folder",
        lambda c: histovi.io.read_folder(c.tmp / "nowhere"),
        ValueError,
        "nowhere'",
        ("not a folder", "data directory"),
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
        "['a.h5ad', 'b.h5ad']",
        ("h5ad=",),
    ),
    Case(
        "io.read_folder",
        "misspelled-h5ad",
        lambda c: histovi.io.read_folder(c.tmp, h5ad="study.h5ad"),
        ValueError,
        "study.h5ad'",
        ("does not exist", "h5ad="),
    ),
    Case(
        "io.read_folder",
        "corrupt-h5ad",
        lambda c: ((c.tmp / "x.h5ad").write_bytes(b"not hdf5"), histovi.io.read_folder(c.tmp)),
        ValueError,
        "x.h5ad'",
        ("cannot be read", "corrupted"),
    ),
    # -------------------------------------------------------------- io.from_spatialdata / to_spatialdata
    Case(
        "io.from_spatialdata",
        "no-table",
        lambda c: histovi.io.from_spatialdata(sdata(c, lambda t, sd: sd.tables.pop("table"))),
        KeyError,
        "table 'table'",
        ("table_key=",),
    ),
    Case(
        "io.from_spatialdata",
        "misspelled-table-key",
        lambda c: histovi.io.from_spatialdata(sdata(c), table_key="spots"),
        KeyError,
        "table 'spots'",
        ("['table']", "table_key="),
    ),
    Case(
        "io.from_spatialdata",
        "table-annotates-nothing",
        lambda c: histovi.io.from_spatialdata(
            sdata(c, lambda t, sd: t.uns.pop("spatialdata_attrs"))
        ),
        ValueError,
        "table 'table'",
        ("does not annotate", "TableModel.parse"),
    ),
    Case(
        "io.from_spatialdata",
        "rows-of-unknown-region",
        lambda c: histovi.io.from_spatialdata(sdata(c, unknown_region)),
        ValueError,
        "obs['region']",
        ("['nowhere']", "3 rows", "fix obs['region']", "region="),
    ),
    Case(
        "io.from_spatialdata",
        "region-key-column-missing",
        lambda c: histovi.io.from_spatialdata(
            sdata(c, lambda t, sd: t.uns["spatialdata_attrs"].update(region_key="regio"))
        ),
        KeyError,
        "obs['regio']",
        ("region_key", "no such column", "TableModel.parse"),
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
        "'ghost_spots'",
        ("not a shapes or points element",),
    ),
    Case(
        "io.from_spatialdata",
        "instances-not-in-element",
        lambda c: histovi.io.from_spatialdata(
            sdata(c, lambda t, sd: t.obs.__setitem__("spot_id", t.obs["spot_id"] + 10_000))
        ),
        KeyError,
        "obs['spot_id']",
        ("'P1_S1_spots'", "64 table rows", "fix obs['spot_id']"),
    ),
    Case(
        "io.from_spatialdata",
        "misspelled-image-key",
        lambda c: histovi.io.from_spatialdata(sdata(c), image_key="he"),
        KeyError,
        "image_key 'he'",
        ("not an image", "'P1_S1_hires'"),
    ),
    Case(
        "io.from_spatialdata",
        "anndata-instead",
        lambda c: histovi.io.from_spatialdata(c.adata()),
        TypeError,
        "SpatialData",
        ("got AnnData", "spatialdata.read_zarr"),
    ),
    Case(
        "io.to_spatialdata",
        "misspelled-sample-key",
        lambda c: histovi.io.to_spatialdata(images(c.adata()), sample_key="slide"),
        KeyError,
        "obs['slide']",
        ("sample_key=",),
    ),
    Case(
        "io.to_spatialdata",
        "missing-spatial-key",
        lambda c: histovi.io.to_spatialdata(images(c.adata()), spatial_key="xy"),
        KeyError,
        "obsm['xy']",
        ("spatial_key=",),
    ),
    # -------------------------------------------------------------- HistoVI.setup_anndata
    Case(
        "setup_anndata",
        "not-anndata",
        lambda c: HistoVI.setup_anndata(np.zeros((3, 3))),
        TypeError,
        "setup_anndata",
        ("AnnData", "ndarray", "setup_mudata", "from_spatialdata"),
    ),
    Case(
        "setup_anndata",
        "misspelled-layer",
        lambda c: setup(c.adata(), layer="raw"),
        KeyError,
        "layers['raw']",
        ("layer=", "layer=None"),
    ),
    Case(
        "setup_anndata",
        "misspelled-batch-key",
        lambda c: setup(c.adata(), batch_key="slide"),
        KeyError,
        "obs['slide']",
        ("batch_key=",),
    ),
    Case(
        "setup_anndata",
        "missing-labels-key",
        lambda c: setup(c.adata(), labels_key="celltype"),
        KeyError,
        "obs['celltype']",
        ("labels_key=",),
    ),
    Case(
        "setup_anndata",
        "misspelled-morphology-key",
        lambda c: setup(c.adata(), morphology_key="X_uni"),
        KeyError,
        "obsm['X_uni']",
        ("histovi.pp.embed_morphology", "morphology_key=None"),
    ),
    Case(
        "setup_anndata",
        "misspelled-neighbors-key",
        lambda c: setup(c.adata(), neighbors_key="knn"),
        KeyError,
        "obsm['knn']",
        ("histovi.pp.spatial_neighbors", "neighbors_key=None"),
    ),
    Case(
        "setup_anndata",
        "missing-embedding-key",
        lambda c: setup(c.adata(), embedding_keys={"fm": "X_fm"}),
        KeyError,
        "obsm['X_fm']",
        ("'fm' embedding", "embedding_keys"),
    ),
    Case(
        "setup_anndata",
        "embedding-keys-not-a-dict",
        lambda c: setup(c.adata(), embedding_keys=["X_fm"]),
        TypeError,
        "embedding_keys=['X_fm']",
        ("mapping view name -> obsm key",),
    ),
    Case(
        "setup_anndata",
        "embedding-named-morphology",
        lambda c: setup(c.adata(), embedding_keys={"morphology": M}),
        ValueError,
        "'morphology'",
        ("embedding_keys", "morphology_key="),
    ),
    Case(
        "setup_anndata",
        "negative-counts",
        lambda c: setup(edit(c.adata(), layers__counts=dense(at(2, 2, -3)))),
        ValueError,
        "layers['counts']",
        ("negative values", "raw counts", "layer="),
    ),
    Case(
        "setup_anndata",
        "non-integer-counts",
        lambda c: setup(edit(c.adata(), layers__counts=dense(lambda X: X * 0.5 + 0.25))),
        ValueError,
        "layers['counts']",
        ("non-integer", "raw counts", "layer="),
    ),
    Case(
        "setup_anndata",
        "nan-counts",
        lambda c: setup(edit(c.adata(), layers__counts=dense(at(0, 0, NAN)))),
        ValueError,
        "layers['counts']",
        ("NaN or inf", "raw", "layer="),
    ),
    Case(
        "setup_anndata",
        "inf-counts",
        lambda c: setup(edit(c.adata(), layers__counts=dense(at(5, 1, INF)))),
        ValueError,
        "layers['counts']",
        ("NaN or inf", "raw", "layer="),
    ),
    Case(
        "setup_anndata",
        "nan-in-last-sparse-row",
        lambda c: setup(
            edit(c.adata(), layers__counts=lambda X: sp.csr_matrix(at(127, 29, NAN)(X.toarray())))
        ),
        ValueError,
        "layers['counts']",
        ("NaN or inf", "raw", "layer="),
    ),
    Case(
        "setup_anndata",
        "text-counts",
        lambda c: setup(edit(c.adata(), layers__counts=lambda X: X.toarray().astype(str))),
        ValueError,
        "layers['counts']",
        ("not numbers", "astype("),
    ),
    Case(
        "setup_anndata",
        "no-genes",
        lambda c: setup(c.adata()[:, :0].copy()),
        ValueError,
        "layers['counts']",
        ("no genes", "raw counts"),
    ),
    Case(
        "setup_anndata",
        "no-spots",
        lambda c: setup(c.adata()[:0].copy()),
        ValueError,
        "AnnData",
        ("no spots",),
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
        "obs['sample']",
        ("missing values", "every spot needs a sample"),
    ),
    Case(
        "setup_anndata",
        "morphology-inf",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=at(0, 0, INF))),
        ValueError,
        "obsm['X_morphology']",
        ("inf", "recompute the embedding", "NaN"),
    ),
    Case(
        "setup_anndata",
        "morphology-partly-nan-row",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=at(0, 0, NAN))),
        ValueError,
        "obsm['X_morphology']",
        ("1 rows", "complete or entirely NaN"),
    ),
    Case(
        "setup_anndata",
        "morphology-all-nan",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=lambda x: np.full_like(x, np.nan))),
        ValueError,
        "obsm['X_morphology']",
        ("NaN for every spot", "histovi.pp.embed_morphology", "morphology_key=None"),
    ),
    Case(
        "setup_anndata",
        "morphology-sparse",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=sp.csr_matrix)),
        ValueError,
        "obsm['X_morphology']",
        ("sparse", ".toarray()"),
    ),
    Case(
        "setup_anndata",
        "morphology-zero-width",
        lambda c: setup(edit(c.adata(), obsm__X_morphology=lambda x: x[:, :0])),
        ValueError,
        "obsm['X_morphology']",
        ("no columns", "histovi.pp.embed_morphology"),
    ),
    Case(
        "setup_anndata",
        "morphology-text",
        lambda c: setup(
            edit(c.adata(), obsm__X_morphology=lambda x: np.full(x.shape, "tile", dtype=object))
        ),
        ValueError,
        "obsm['X_morphology']",
        ("numbers", "histovi.pp.embed_morphology"),
    ),
    Case(
        "setup_anndata",
        "neighbours-out-of-range",
        lambda c: setup(edit(c.adata(), obsm__spatial_neighbors=at(0, 0, 999))),
        ValueError,
        "obsm['spatial_neighbors']",
        ("[0, 128)", "another AnnData", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "setup_anndata",
        "neighbours-negative",
        lambda c: setup(edit(c.adata(), obsm__spatial_neighbors=at(0, 0, -1))),
        ValueError,
        "obsm['spatial_neighbors']",
        ("[0, 128)", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "setup_anndata",
        "neighbours-cross-samples",
        lambda c: setup(edit(c.adata(), obsm__spatial_neighbors=at(0, 0, 127))),
        ValueError,
        "obsm['spatial_neighbors']",
        ("another sample", "'sample'", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "setup_anndata",
        "neighbours-not-integer",
        lambda c: setup(edit(c.adata(), obsm__spatial_neighbors=lambda n: n + 0.5)),
        ValueError,
        "obsm['spatial_neighbors']",
        ("integer row indices", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "setup_anndata",
        "neighbours-nan",
        lambda c: setup(
            edit(c.adata(), obsm__spatial_neighbors=lambda n: at(0, 0, NAN)(n.astype(float)))
        ),
        ValueError,
        "obsm['spatial_neighbors']",
        ("integer row indices", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "setup_anndata",
        "neighbours-after-subset",
        lambda c: setup(subset(c.adata(), slice(64, 128))),
        ValueError,
        "obsm['spatial_neighbors']",
        ("[0, 64)", "subset", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "setup_anndata",
        "neighbours-after-reorder",
        lambda c: setup(subset(c.adata(), np.r_[1, 0, 2:128])),
        ValueError,
        "obsm['spatial_neighbors']",
        ("different set or order of spots", "histovi.pp.spatial_neighbors"),
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
        "obs['patient']",
        ("2 missing values", "categorical covariate", "fill them"),
    ),
    Case(
        "setup_anndata",
        "covariate-keys-as-string",
        lambda c: setup(c.adata(), categorical_covariate_keys="patient"),
        TypeError,
        "categorical_covariate_keys='patient'",
        ("list", "categorical_covariate_keys=['patient']"),
    ),
    Case(
        "setup_anndata",
        "continuous-covariate-nan",
        lambda c: setup(edit(c.adata(), obs__depth=np.nan), continuous_covariate_keys=["depth"]),
        ValueError,
        "obs['depth']",
        ("finite numbers", "continuous covariate"),
    ),
    Case(
        "setup_anndata",
        "missing-covariate",
        lambda c: setup(c.adata(), continuous_covariate_keys=["depth"]),
        KeyError,
        "obs['depth']",
        ("remove it", "covariate keys", "add the column"),
    ),
    # -------------------------------------------------------------- HistoVI.setup_mudata
    Case(
        "setup_mudata",
        "not-mudata",
        lambda c: HistoVI.setup_mudata(c.adata()),
        TypeError,
        "setup_mudata",
        ("MuData", "got AnnData"),
    ),
    Case(
        "setup_mudata",
        "no-expression-modality",
        lambda c: setup_mudata(mudata(c.adata()), modalities={"morphology": "morph"}),
        ValueError,
        "modalities",
        ("expression modality", "{'rna_layer': 'rna'}"),
    ),
    Case(
        "setup_mudata",
        "unknown-modality",
        lambda c: setup_mudata(mudata(c.adata()), modalities={**MUDATA_MODS, "morphology": "he"}),
        KeyError,
        "modalities['morphology_layer']",
        ("'he'", "['rna', 'morph']"),
    ),
    Case(
        "setup_mudata",
        "misspelled-batch-key",
        lambda c: setup_mudata(mudata(c.adata()), batch_key="slide"),
        KeyError,
        "obs['slide']",
        ("modality 'rna'", "batch_key=", "modalities="),
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
        "'morph'",
        ("one row per spot", "NaN rows"),
    ),
    Case(
        "setup_mudata",
        "morphology-inf",
        lambda c: setup_mudata(mudata(c.adata(), at(0, 0, INF)(c.adata().obsm[M]))),
        ValueError,
        "obsm['morph']",
        ("inf", "recompute the embedding", "NaN"),
    ),
    Case(
        "setup_mudata",
        "neighbours-out-of-range",
        lambda c: setup_mudata(mudata(edit(c.adata(), obsm__spatial_neighbors=at(0, 0, 10**6)))),
        ValueError,
        "obsm['spatial_neighbors']",
        ("[0, 128)", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "setup_mudata",
        "misspelled-neighbors-key",
        lambda c: setup_mudata(mudata(c.adata()), neighbors_key="knn"),
        KeyError,
        "obsm['knn']",
        ("histovi.pp.spatial_neighbors", "neighbors_key=None"),
    ),
    Case(
        "setup_mudata",
        "negative-counts",
        lambda c: setup_mudata(mudata(edit(c.adata(), layers__counts=dense(at(0, 0, -1))))),
        ValueError,
        "layers['counts']",
        ("negative values", "raw counts"),
    ),
    # -------------------------------------------------------------- HistoVI(...)
    Case(
        "HistoVI",
        "unregistered",
        lambda c: HistoVI(c.adata()),
        ValueError,
        "AnnData",
        ("HistoVI.setup_anndata",),
    ),
    Case(
        "HistoVI",
        "negative-weight",
        lambda c: tiny_model(c.adata(), niche_weight=-1.0),
        ValueError,
        "niche_weight=-1.0",
        ("finite weight >= 0",),
    ),
    Case(
        "HistoVI",
        "nan-weight",
        lambda c: tiny_model(c.adata(), niche_weight=float("nan")),
        ValueError,
        "niche_weight=nan",
        ("finite weight >= 0",),
    ),
    Case(
        "HistoVI",
        "view-dropout-above-1",
        lambda c: tiny_model(c.adata(), view_dropout=2.0),
        ValueError,
        "view_dropout=2.0",
        ("[0, 1]",),
    ),
    Case(
        "HistoVI",
        "unknown-standardization",
        lambda c: tiny_model(c.adata(), view_standardization="batch"),
        ValueError,
        "view_standardization='batch'",
        ("'sample'", "'global'"),
    ),
    Case(
        "HistoVI",
        "normalize-input-not-bool",
        lambda c: tiny_model(c.adata(), normalize_input="yes"),
        ValueError,
        "normalize_input='yes'",
        ("True", "False"),
    ),
    # -------------------------------------------------------------- train
    Case(
        "train",
        "zero-epochs",
        lambda c: tiny_model(c.adata()).train(max_epochs=0),
        ValueError,
        "max_epochs=0",
        ("positive whole number", "None"),
    ),
    Case(
        "train",
        "fractional-epochs",
        lambda c: tiny_model(c.adata()).train(max_epochs=2.5),
        ValueError,
        "max_epochs=2.5",
        ("positive whole number",),
    ),
    Case(
        "train",
        "zero-batch-size",
        lambda c: tiny_model(c.adata()).train(max_epochs=1, batch_size=0),
        ValueError,
        "batch_size=0",
        ("positive whole number",),
    ),
    Case(
        "train",
        "checkpoint-dir-is-a-file",
        lambda c: (
            (c.tmp / "f").write_text("x"),
            tiny_model(c.adata()).train(max_epochs=1, checkpoint_dir=c.tmp / "f"),
        ),
        ValueError,
        "checkpoint_dir=",
        ("is a file", "pass a folder"),
    ),
    Case(
        "train",
        "train-size-above-1",
        lambda c: tiny_model(c.adata()).train(max_epochs=1, train_size=1.5, **TRAIN),
        ValueError,
        "train_size",
        ("0 < train_size <= 1",),
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
        "obsm['spatial_neighbors']",
        ("[0, 128)", "histovi.pp.spatial_neighbors"),
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
        "layers['counts']",
        ("NaN or inf", "raw"),
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
        "query",
        (
            "nothing to train",
            "reference_model.get_latent_representation(query)",
            "own sample names",
        ),
    ),
    # -------------------------------------------------------------- get_latent_representation
    Case(
        "get_latent_representation",
        "indices-out-of-range",
        lambda c: c.model.get_latent_representation(indices=[0, 1000]),
        ValueError,
        "indices",
        ("[0, 128)", "max 1000", "get_indexer"),
    ),
    Case(
        "get_latent_representation",
        "indices-not-integer",
        lambda c: c.model.get_latent_representation(indices=[0.5, 2.0]),
        ValueError,
        "indices",
        ("whole row numbers", "float64"),
    ),
    Case(
        "get_latent_representation",
        "indices-empty",
        lambda c: c.model.get_latent_representation(indices=[]),
        ValueError,
        "indices",
        ("empty", "at least one row number"),
    ),
    Case(
        "get_latent_representation",
        "mask-wrong-length",
        lambda c: c.model.get_latent_representation(indices=np.ones(5, bool)),
        ValueError,
        "indices",
        ("boolean mask of length 5", "128 spots", "one value per spot"),
    ),
    Case(
        "get_latent_representation",
        "fewer-genes",
        lambda c: c.model.get_latent_representation(c.model.adata[:, 2:].copy()),
        ValueError,
        "gene_0, gene_1",
        ("2 of the model's 30 genes are missing", "HistoVI.prepare_query_anndata"),
    ),
    Case(
        "get_latent_representation",
        "genes-reordered",
        lambda c: c.model.get_latent_representation(c.model.adata[:, ::-1].copy()),
        ValueError,
        "adata",
        ("genes in another order", "HistoVI.prepare_query_anndata"),
    ),
    Case(
        "get_latent_representation",
        "view-missing",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__X_morphology=None)
        ),
        KeyError,
        "obsm['X_morphology']",
        ("'morphology' view", "HistoVI.prepare_query_anndata"),
    ),
    Case(
        "get_latent_representation",
        "neighbours-missing",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__spatial_neighbors=None)
        ),
        KeyError,
        "obsm['spatial_neighbors']",
        ("histovi.pp.spatial_neighbors(adata, n_neighbors=4", "HistoVI.prepare_query_anndata"),
    ),
    Case(
        "get_latent_representation",
        "neighbours-out-of-range",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__spatial_neighbors=at(0, 0, 10**6))
        ),
        ValueError,
        "obsm['spatial_neighbors']",
        ("[0, 128)", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "get_latent_representation",
        "morphology-wrong-width",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__X_morphology=lambda x: x[:, :2])
        ),
        ValueError,
        "obsm['X_morphology']",
        ("2 columns", "4", "reference="),
    ),
    Case(
        "get_latent_representation",
        "morphology-inf",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), obsm__X_morphology=at(0, 0, INF))
        ),
        ValueError,
        "obsm['X_morphology']",
        ("inf", "recompute the embedding"),
    ),
    Case(
        "get_latent_representation",
        "nan-counts",
        lambda c: c.model.get_latent_representation(
            edit(c.model.adata.copy(), layers__counts=dense(at(0, 0, NAN)))
        ),
        ValueError,
        "layers['counts']",
        ("NaN or inf", "raw"),
    ),
    Case(
        "get_latent_representation",
        "unknown-sample",
        lambda c: c.model.get_latent_representation(query(c)),
        ValueError,
        "P1_S1_q",
        ("extend_categories",),
    ),
    Case(
        "get_latent_representation",
        "untrained",
        lambda c: tiny_model(c.adata()).get_latent_representation(),
        RuntimeError,
        "untrained model",
        ("train the model first",),
    ),
    # -------------------------------------------------------------- prepare_query_anndata
    Case(
        "prepare_query_anndata",
        "no-shared-genes",
        lambda c: HistoVI.prepare_query_anndata(
            AnnData(X=np.ones((3, 2)), var=pd.DataFrame(index=["ENSG1", "ENSG2"])), c.model
        ),
        ValueError,
        "var_names",
        ("None of the reference's genes", "same gene identifiers"),
    ),
    Case(
        "prepare_query_anndata",
        "not-anndata",
        lambda c: HistoVI.prepare_query_anndata(np.zeros((3, 3)), c.model),
        TypeError,
        "prepare_query_anndata",
        ("AnnData", "ndarray"),
    ),
    Case(
        "prepare_query_anndata",
        "bad-reference",
        lambda c: HistoVI.prepare_query_anndata(query(c), 42),
        TypeError,
        "reference_model",
        ("trained HistoVI", "folder of a saved HistoVI", "int"),
    ),
    Case(
        "prepare_query_anndata",
        "reference-folder-missing",
        lambda c: HistoVI.prepare_query_anndata(query(c), str(c.tmp / "ref")),
        FileNotFoundError,
        "ref:",
        ("no saved model", "does not exist", "model.save"),
    ),
    Case(
        "prepare_query_anndata",
        "morphology-wrong-width",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(q, obsm__X_morphology=lambda x: x[:, :3])), c.model
        ),
        ValueError,
        "obsm['X_morphology']",
        ("3 columns", "4", "histovi.pp.embed_morphology(query, reference="),
    ),
    Case(
        "prepare_query_anndata",
        "neighbours-other-k",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(q, obsm__spatial_neighbors=lambda n: n[:, :2])), c.model
        ),
        ValueError,
        "obsm['spatial_neighbors']",
        ("2 neighbours per spot", "histovi.pp.spatial_neighbors(query, n_neighbors=4)"),
    ),
    Case(
        "prepare_query_anndata",
        "sample-smaller-than-k",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(subset(q, slice(0, 67)), obsm__spatial_neighbors=None)), c.model
        ),
        ValueError,
        "'P2_S1_q': 3",
        ("n_neighbors=4", "drop query samples with at most 4 spots"),
    ),
    Case(
        "prepare_query_anndata",
        "encoder-mismatch",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(q, uns__histovi={"morphology": {"encoder": "resnet50"}})),
            _with_record(c),
        ),
        ValueError,
        "encoder='resnet50'",
        ("'stain-texture'", "histovi.pp.embed_morphology(query, reference="),
    ),
    # -------------------------------------------------------------- load_query_data
    Case(
        "load_query_data",
        "not-prepared-fewer-genes",
        lambda c: HistoVI.load_query_data(query(c, lambda q: q[:, 3:].copy()), c.model),
        ValueError,
        "gene_0, gene_1, gene_2",
        (
            "3 of the reference's 30 genes are missing",
            "HistoVI.prepare_query_anndata(query, reference_model)",
        ),
    ),
    Case(
        "load_query_data",
        "not-prepared-reordered",
        lambda c: HistoVI.load_query_data(query(c, lambda q: q[:, ::-1].copy()), c.model),
        ValueError,
        "adata",
        ("genes in another order", "HistoVI.prepare_query_anndata(query, reference_model)"),
    ),
    Case(
        "load_query_data",
        "view-missing",
        lambda c: HistoVI.load_query_data(
            query(c, lambda q: edit(q, obsm__X_morphology=None)), c.model
        ),
        KeyError,
        "obsm['X_morphology']",
        (
            "'morphology' view of the reference",
            "HistoVI.prepare_query_anndata(query, reference_model)",
        ),
    ),
    Case(
        "load_query_data",
        "reference-of-another-class",
        lambda c: HistoVI.load_query_data(query(c), "not/a/folder"),
        FileNotFoundError,
        "not/a/folder",
        ("no saved model", "model.save"),
    ),
    # -------------------------------------------------------------- tl
    Case(
        "tl.domains",
        "missing-rep",
        lambda c: histovi.tl.domains(latent(c), n_domains=3, use_rep="X_scvi"),
        KeyError,
        "obsm['X_scvi']",
        ("get_latent_representation", "use_rep="),
    ),
    Case(
        "tl.domains",
        "nan-in-rep",
        lambda c: histovi.tl.domains(edit(latent(c), obsm__X_histovi=at(0, 0, NAN)), n_domains=3),
        ValueError,
        "obsm['X_histovi']",
        ("NaN/inf", "1 rows", "impute or drop"),
    ),
    Case(
        "tl.domains",
        "rep-wrong-shape",
        lambda c: histovi.tl.domains(
            edit(latent(c), obsm__X_histovi=lambda z: z[:, :0]), n_domains=3
        ),
        ValueError,
        "obsm['X_histovi']",
        ("no columns", "use_rep="),
    ),
    Case(
        "tl.domains",
        "gmm-without-k",
        lambda c: histovi.tl.domains(latent(c)),
        ValueError,
        "method='gmm'",
        ("n_domains", "method='leiden'"),
    ),
    Case(
        "tl.domains",
        "unknown-method",
        lambda c: histovi.tl.domains(latent(c), n_domains=3, method="dbscan"),
        ValueError,
        "'dbscan'",
        ("'gmm'", "'kmeans'", "'leiden'"),
    ),
    Case(
        "tl.domains",
        "fractional-k",
        lambda c: histovi.tl.domains(latent(c), n_domains=2.5),
        ValueError,
        "2.5",
        ("n_domains", "whole number", "e.g. 2"),
    ),
    Case(
        "tl.domains",
        "k-above-spots",
        lambda c: histovi.tl.domains(latent(c), n_domains=500),
        ValueError,
        "500",
        ("n_domains", "number of spots (128)", "smaller number"),
    ),
    Case(
        "tl.domains",
        "negative-smoothing",
        lambda c: histovi.tl.domains(latent(c), n_domains=3, spatial_smoothing=-1),
        ValueError,
        "spatial_smoothing=-1",
        ("non-negative integer",),
    ),
    Case(
        "tl.domains",
        "smoothing-without-neighbours",
        lambda c: histovi.tl.domains(
            latent(c), n_domains=3, spatial_smoothing=1, neighbors_key="knn"
        ),
        KeyError,
        "obsm['knn']",
        ("histovi.pp.spatial_neighbors", "neighbors_key="),
    ),
    Case(
        "tl.domains",
        "smoothing-neighbours-out-of-range",
        lambda c: histovi.tl.domains(
            edit(latent(c), obsm__spatial_neighbors=at(0, 0, 999)), n_domains=3, spatial_smoothing=1
        ),
        ValueError,
        "obsm['spatial_neighbors']",
        ("up to 999", "[0, 128)", "recompute", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "tl.domains",
        "one-spot",
        lambda c: histovi.tl.domains(subset(latent(c), slice(0, 1)), n_domains=1),
        ValueError,
        "1",
        ("at least 2 spots", "all spots"),
    ),
    Case(
        "tl.domains",
        "empty",
        lambda c: histovi.tl.domains(subset(latent(c), slice(0, 0)), n_domains=1),
        ValueError,
        "adata",
        ("no spots", "non-empty"),
    ),
    Case(
        "tl.domains",
        "not-anndata",
        lambda c: histovi.tl.domains(np.zeros((5, 2)), n_domains=2),
        TypeError,
        "adata",
        ("AnnData", "ndarray", "anndata.read_h5ad"),
    ),
    Case(
        "tl.transfer_labels",
        "missing-label",
        lambda c: histovi.tl.transfer_labels(latent(c), latent(c), label_key="celltype"),
        KeyError,
        "reference.obs['celltype']",
        ("histovi.tl.domains(reference)", "label_key="),
    ),
    Case(
        "tl.transfer_labels",
        "widths-differ",
        lambda c: histovi.tl.transfer_labels(
            latent(c), edit(latent(c), obsm__X_histovi=lambda z: z[:, :2])
        ),
        ValueError,
        "query.obsm['X_histovi']",
        ("3 dimensions", "same model", "load_query_data"),
    ),
    Case(
        "tl.transfer_labels",
        "query-without-latent",
        lambda c: histovi.tl.transfer_labels(latent(c), c.adata()),
        KeyError,
        "query.obsm['X_histovi']",
        ("get_latent_representation(adata)", "use_rep="),
    ),
    Case(
        "tl.transfer_labels",
        "zero-neighbours",
        lambda c: histovi.tl.transfer_labels(latent(c), latent(c), n_neighbors=0),
        ValueError,
        "n_neighbors=0",
        ("positive integer",),
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
        "reference.obs['domain']",
        ("no non-missing label", "label some reference spots"),
    ),
    Case(
        "tl.transfer_labels",
        "empty-query",
        lambda c: histovi.tl.transfer_labels(latent(c), subset(latent(c), slice(0, 0))),
        ValueError,
        "query",
        ("no spots", "non-empty"),
    ),
    Case(
        "tl.aggregate_neighbors",
        "zero-hops",
        lambda c: histovi.tl.aggregate_neighbors(latent(c), "X_histovi", n_hops=0),
        ValueError,
        "n_hops=0",
        ("positive integer",),
    ),
    Case(
        "tl.aggregate_neighbors",
        "missing-neighbours",
        lambda c: histovi.tl.aggregate_neighbors(latent(c), "X_histovi", neighbors_key="knn"),
        KeyError,
        "obsm['knn']",
        ("histovi.pp.spatial_neighbors", "neighbors_key="),
    ),
    Case(
        "tl.aggregate_neighbors",
        "nan-neighbours",
        lambda c: histovi.tl.aggregate_neighbors(
            edit(latent(c), obsm__spatial_neighbors=lambda n: at(0, 0, NAN)(n.astype(float))),
            "X_histovi",
        ),
        ValueError,
        "obsm['spatial_neighbors']",
        ("integer row indices", "recompute", "histovi.pp.spatial_neighbors"),
    ),
    Case(
        "tl.aggregate_neighbors",
        "missing-rep",
        lambda c: histovi.tl.aggregate_neighbors(latent(c), "X_pca"),
        KeyError,
        "obsm['X_pca']",
        ("use_rep=",),
    ),
    Case(
        "tl.anchor_sections",
        "share-above-one",
        lambda c: histovi.tl.anchor_sections(latent(c), share=1.5),
        ValueError,
        "share=1.5",
        ("between 0 and 1",),
    ),
    Case(
        "tl.anchor_sections",
        "missing-sample-column",
        lambda c: histovi.tl.anchor_sections(latent(c), sample_key="slide"),
        KeyError,
        "obs['slide']",
        ("available",),
    ),
    Case(
        "tl.anchor_sections",
        "replaces-input",
        lambda c: histovi.tl.anchor_sections(latent(c), key_added="X_histovi"),
        ValueError,
        "key_added='X_histovi'",
        ("another key_added",),
    ),
    # -------------------------------------------------------------- metrics
    Case(
        "metrics.per_sample_scores",
        "missing-cluster-key",
        lambda c: histovi.metrics.per_sample_scores(latent(c), "domain", "clusters"),
        KeyError,
        "obs['clusters']",
        ("histovi.tl.domains(adata)", "cluster_key="),
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
        "obs['domain']",
        ("no usable label", "ignore=", "annotations"),
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
        "obs['clusters']",
        ("missing values", "every spot needs a cluster", "recompute"),
    ),
    Case(
        "metrics.per_sample_scores",
        "misspelled-sample-key",
        lambda c: histovi.metrics.per_sample_scores(
            latent(c), "domain", "domain", sample_key="slide"
        ),
        KeyError,
        "obs['slide']",
        ("existing column", "'sample'"),
    ),
    Case(
        "metrics.spatial_coherence",
        "missing-neighbours",
        lambda c: histovi.metrics.spatial_coherence(latent(c), neighbors_key="knn"),
        KeyError,
        "obsm['knn']",
        ("histovi.pp.spatial_neighbors", "neighbors_key="),
    ),
    Case(
        "metrics.spatial_coherence",
        "missing-clusters",
        lambda c: histovi.metrics.spatial_coherence(latent(c), cluster_key="leiden"),
        KeyError,
        "obs['leiden']",
        ("histovi.tl.domains", "cluster_key="),
    ),
    Case(
        "metrics.cluster_and_score",
        "rows-differ",
        lambda c: histovi.metrics.cluster_and_score(np.zeros((10, 2)), ["a"] * 128, ["s"] * 128),
        ValueError,
        "`embedding`",
        ("10 rows", "128", "one row per spot"),
    ),
    Case(
        "metrics.cluster_and_score",
        "lengths-differ",
        lambda c: histovi.metrics.cluster_and_score(np.zeros((128, 2)), ["a"] * 128, ["s"] * 5),
        ValueError,
        "`labels` (128)",
        ("`samples` (5)", "one value per spot"),
    ),
    Case(
        "metrics.cluster_and_score",
        "inf-embedding",
        lambda c: histovi.metrics.cluster_and_score(
            at(0, 0, INF)(np.zeros((128, 2))), ["a"] * 128, ["s"] * 128
        ),
        ValueError,
        "`embedding`",
        ("NaN/inf", "impute or drop"),
    ),
    Case(
        "metrics.cluster_and_score",
        "samples-with-nan",
        lambda c: histovi.metrics.cluster_and_score(
            np.zeros((3, 2)), ["a", "b", "a"], ["s", None, "s"]
        ),
        ValueError,
        "`samples`",
        ("missing values", "section id"),
    ),
    Case(
        "metrics.cluster_and_score",
        "no-labels",
        lambda c: histovi.metrics.cluster_and_score(np.zeros((3, 2)), [None] * 3, ["s"] * 3),
        ValueError,
        "`labels`",
        ("no usable label", "annotation column"),
    ),
    Case(
        "metrics.cluster_and_score",
        "no-seeds",
        lambda c: histovi.metrics.cluster_and_score(
            np.zeros((3, 2)), ["a", "b", "a"], ["s"] * 3, seeds=()
        ),
        ValueError,
        "`seeds`",
        ("`methods`", "at least one value"),
    ),
    Case(
        "metrics.integration_scores",
        "one-label-class",
        lambda c: histovi.metrics.integration_scores(
            edit(latent(c), obs__domain="x"), label_key="domain"
        ),
        ValueError,
        "obs['domain']",
        ("fewer than 2 usable label classes", "label_key"),
    ),
    Case(
        "metrics.integration_scores",
        "one-batch",
        lambda c: histovi.metrics.integration_scores(
            edit(latent(c), obs__sample="s"), label_key="domain"
        ),
        ValueError,
        "obs['sample']",
        ("single batch", "batch_key"),
    ),
    Case(
        "metrics.integration_scores",
        "zero-neighbours",
        lambda c: histovi.metrics.integration_scores(latent(c), label_key="domain", n_neighbors=0),
        ValueError,
        "n_neighbors=0",
        ("integer >= 3",),
    ),
    Case(
        "metrics.evaluate",
        "missing-label",
        lambda c: histovi.metrics.evaluate(latent(c), label_key="celltype"),
        KeyError,
        "obs['celltype']",
        ("existing column", "'domain'"),
    ),
    Case(
        "metrics.evaluate",
        "unknown-method",
        lambda c: histovi.metrics.evaluate(
            latent(c), label_key="domain", methods=("dbscan",), integration=False
        ),
        ValueError,
        "'dbscan'",
        ("'gmm'", "'kmeans'", "'leiden'"),
    ),
    Case(
        "metrics.summarize",
        "empty",
        lambda c: histovi.metrics.summarize(pd.DataFrame()),
        ValueError,
        "`df`",
        ("non-empty DataFrame", "histovi.metrics.cluster_and_score"),
    ),
    Case(
        "metrics.summarize",
        "missing-columns",
        lambda c: histovi.metrics.summarize(pd.DataFrame({"ARI": [0.1]})),
        KeyError,
        "`df`",
        ("['seed', 'NMI']", "histovi.metrics.cluster_and_score"),
    ),
    # -------------------------------------------------------------- histovi run (CLI)
    Case(
        "cli",
        "input-missing",
        lambda c: cli_raw(c, ["--input", str(c.tmp / "none.h5ad"), "--out", str(c.tmp / "o")]),
        CliError,
        "--input",
        ("none.h5ad", "does not exist", ".h5ad file"),
    ),
    Case(
        "cli",
        "unknown-format",
        lambda c: (
            (c.tmp / "x.csv").write_text("a"),
            cli_raw(c, ["--input", str(c.tmp / "x.csv"), "--out", str(c.tmp / "o")]),
        ),
        CliError,
        "--input",
        ("'.csv'", ".h5ad file", ".zarr"),
    ),
    Case(
        "cli",
        "corrupt-h5ad",
        lambda c: (
            (c.tmp / "x.h5ad").write_bytes(b"not hdf5"),
            cli_raw(c, ["--input", str(c.tmp / "x.h5ad"), "--out", str(c.tmp / "o")]),
        ),
        CliError,
        "--input",
        ("x.h5ad", "cannot read", "corrupted"),
    ),
    Case(
        "cli",
        "misspelled-sample-key",
        lambda c: cli_run(c, None, "--sample-key", "slide"),
        CliError,
        "--sample-key 'slide'",
        ("not a column", "sample, patient, domain"),
    ),
    Case(
        "cli",
        "misspelled-label-key",
        lambda c: cli_run(c, None, "--label-key", "celltype"),
        CliError,
        "--label-key 'celltype'",
        ("not a column", "'none'"),
    ),
    Case(
        "cli",
        "misspelled-layer",
        lambda c: cli_run(c, None, "--layer", "raw"),
        CliError,
        "--layer 'raw'",
        ("(counts)", "leave --layer out"),
    ),
    Case(
        "cli",
        "unknown-samples",
        lambda c: cli_run(c, None, "--samples", "P9_S9"),
        CliError,
        "--samples P9_S9",
        ("not found", "P1_S1, P2_S1"),
    ),
    Case(
        "cli",
        "one-domain",
        lambda c: cli_run(c, None, "--n-domains", "1"),
        CliError,
        "--n-domains 1",
        ("at least 2",),
    ),
    Case(
        "cli",
        "zero-epochs",
        lambda c: cli_run(c, None, "--max-epochs", "0"),
        CliError,
        "--max-epochs 0",
        ("at least 1",),
    ),
    Case(
        "cli",
        "negative-genes",
        lambda c: cli_run(c, None, "--n-top-genes", "-1"),
        CliError,
        "--n-top-genes -1",
        ("0 (all genes) or positive",),
    ),
    Case(
        "cli",
        "normalised-counts",
        lambda c: cli_run(c, lambda a: edit(a, layers__counts=dense(np.log1p))),
        CliError,
        "layers['counts']",
        ("non-integer", "raw counts", "layer="),
    ),
    Case(
        "cli",
        "precomputed-without-morphology",
        lambda c: cli_run(
            c, lambda a: edit(a, obsm__X_morphology=None), "--encoder", "precomputed"
        ),
        CliError,
        "obsm['X_morphology']",
        ("--encoder precomputed", "histovi.pp.embed_morphology", "--encoder stain-texture"),
    ),
    Case(
        "cli",
        "no-spot-centres",
        lambda c: cli_run(c, lambda a: edit(a, obsm__spatial=None)),
        CliError,
        "obsm['spatial']",
        ("spot centres", "store the spot coordinates there"),
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
        "obs['sample']",
        ("missing values", "sample id"),
    ),
    Case(
        "cli",
        "identical-coordinates",
        lambda c: cli_run(c, lambda a: edit(a, obsm__spatial=lambda x: np.zeros_like(x))),
        CliError,
        "obsm['spatial']",
        ("'P1_S1'", "same position", "spatial_key="),
    ),
    Case(
        "cli",
        "out-is-a-file",
        lambda c: ((c.tmp / "f").write_text("x"), cli_run(c, None, out=c.tmp / "f")),
        CliError,
        "--out",
        ("is a file", "pass a folder"),
    ),
    Case(
        "cli",
        "out-holds-a-finished-run",
        lambda c: cli_run(c, None, out=finished_run(c)),
        CliError,
        "--out",
        ("(adata.h5ad)", "--overwrite", "another --out"),
    ),
    Case(
        "cli",
        "zero-grid",
        lambda c: cli_raw(c, ["--sim-grid", "0", "--out", str(c.tmp / "o")]),
        CliError,
        "--sim-grid",
        ("at least 1",),
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
        with raises_naming(case.error, case.key, *case.fix):
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
        "'P1_S1'",
        ("P1_S1.png'", "cannot be read", "replace it", "obsm['X_morphology']"),
    ),
    Case(
        "pp.embed_morphology",
        "truncated-jpeg",
        lambda c: histovi.pp.embed_morphology(
            image_files(c.adata(), c.tmp, {0: "truncated"}), **FAST_TILES
        ),
        UserWarning,
        "'P1_S1'",
        ("P1_S1.jpg'", "truncated", "replace it"),
    ),
    Case(
        "pp.embed_morphology",
        "missing-image-file",
        lambda c: histovi.pp.embed_morphology(
            image_files(c.adata(), c.tmp, {1: "missing"}), **FAST_TILES
        ),
        UserWarning,
        "'P2_S1'",
        ("not found", "image_dir="),
    ),
    Case(
        "pp.embed_morphology",
        "scale-factor-too-large",
        lambda c: histovi.pp.embed_morphology(scale_images(20.0)(c.adata()), **FAST_TILES),
        UserWarning,
        "'P1_S1'",
        ("100%", "outside its image", "tissue_hires_scalef", "obsm['spatial']"),
    ),
    Case(
        "pp.embed_morphology",
        "scale-factor-too-small",
        lambda c: histovi.pp.embed_morphology(scale_images(1 / 40)(c.adata()), **FAST_TILES),
        UserWarning,
        "'P1_S1'",
        ("under 5%", "tissue_hires_scalef"),
    ),
    Case(
        "pp.embed_morphology",
        "no-usable-tile",
        lambda c: histovi.pp.embed_morphology(scale_images(20.0)(c.adata()), **FAST_TILES),
        UserWarning,
        "obsm['X_morphology']",
        ("no spot got a usable tile", "scale factors", "min_tissue_fraction"),
    ),
    Case(
        "io.read_folder",
        "corrupt-image-load",
        lambda c: (
            image_files(c.adata(), c.tmp, {0: "garbage"}).write_h5ad(c.tmp / "s.h5ad"),
            histovi.io.read_folder(c.tmp, load_images=True),
        ),
        UserWarning,
        "P1_S1",
        ("unreadable", "no morphology"),
    ),
    Case(
        "io.read_folder",
        "missing-image",
        lambda c: (
            image_files(c.adata(), c.tmp, {1: "missing"}).write_h5ad(c.tmp / "s.h5ad"),
            histovi.io.read_folder(c.tmp),
        ),
        UserWarning,
        "P2_S1",
        ("not found or unreadable", "no morphology"),
    ),
    Case(
        "prepare_query_anndata",
        "missing-genes",
        lambda c: HistoVI.prepare_query_anndata(query(c, lambda q: q[:, 4:].copy()), c.model),
        UserWarning,
        "4 of the reference's 30 genes",
        ("missing from the query", "filled with zeros"),
    ),
    Case(
        "prepare_query_anndata",
        "missing-view",
        lambda c: HistoVI.prepare_query_anndata(
            query(c, lambda q: edit(q, obsm__X_morphology=None)), c.model
        ),
        UserWarning,
        "obsm['X_morphology']",
        ("'morphology' view", "treated as missing"),
    ),
    Case(
        "HistoVI.load",
        "other-histovi-version",
        lambda c: _load_older(c),
        UserWarning,
        "histovi 0.0.9",
        ("install the saving version",),
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
    with warns_naming(case.error, case.key, *case.fix):
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
    with raises_naming(TrainingDivergedError, "'expression'", "NaN or inf"):
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
        with raises_naming(ValueError, "obsm['v']", "inf", "NaN"):
            check_finite_or_nan_rows(values, "v")
    elif partial.any():
        with raises_naming(
            ValueError, "obsm['v']", f"{int(partial.sum())} rows", "complete or entirely NaN"
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
        with raises_naming(ValueError, "adata.X", match[kind], "raw"):
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
        with raises_naming(ValueError, "obs['sample']", f"n_neighbors={k}", list(small)[0]):
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
        with raises_naming(ValueError, "obsm['nb']", "[0, 128)", "histovi.pp.spatial_neighbors"):
            check_neighbors(adata, "nb", "sample")
    elif crossing:
        with raises_naming(ValueError, "obsm['nb']", "another sample", "spatial_neighbors"):
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
        with raises_naming(ValueError, f"obsm['{M}']", "NaN for every spot", "morphology_key=None"):
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
        with raises_naming(ValueError, "var_names", "none of the reference's genes", "identifiers"):
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
        with raises_naming(ValueError, "indices", "empty", "at least one row number"):
            check_indices(np.array(idx, dtype=int), 128)
    elif min(idx) < 0 or max(idx) >= 128:
        with raises_naming(ValueError, "indices", "[0, 128)", "get_indexer"):
            check_indices(idx, 128)
    else:
        check_indices(idx, 128)
