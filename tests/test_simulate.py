"""The simulators: the layered (cortex-like) study, the weak-view option of the tumour study, and
the benchmark scenarios built on them."""

import hashlib

import numpy as np
import pytest
import scipy.sparse as sp
from _messages import raises_naming
from scipy.spatial import cKDTree

from histovi.datasets import LAYERS, simulate, simulate_layers

SMALL = {
    "n_sections_per_patient": (2, 1, 1),
    "grid_size": (14, 14),
    "n_genes": 150,
    "n_markers": 5,
    "morphology_dim": 8,
}


@pytest.fixture(scope="module")
def layers_default():
    """The default layered study (3 donors with 4, 2 and 2 sections; about a second)."""
    return simulate_layers(seed=0)


def _sections(adata):
    for s in adata.obs["sample"].cat.categories:
        yield s, adata[(adata.obs["sample"] == s).to_numpy()]


def test_layers_shapes_and_keys():
    adata = simulate_layers(**SMALL, expression_embedding_dim=4, seed=3)
    n = adata.n_obs
    assert adata.n_vars == 150 and 3 * 196 < n <= 4 * 196  # spots beyond the pia are left out
    assert sp.issparse(adata.X) and (adata.X != adata.layers["counts"]).nnz == 0
    assert np.array_equal(adata.X.data, np.round(adata.X.data)) and adata.X.min() >= 0
    for col in ("sample", "patient", "domain"):
        assert adata.obs[col].dtype == "category", col
    assert list(adata.obs["sample"].cat.categories) == ["P1_S1", "P1_S2", "P2_S1", "P3_S1"]
    assert list(adata.obs["patient"].cat.categories) == ["P1", "P2", "P3"]
    assert set(adata.obs["domain"].cat.categories) <= set(LAYERS)
    assert adata.obs["depth"].between(0, 1).all()
    assert adata.obsm["spatial"].shape == (n, 2) and (adata.obsm["spatial"] > 0).all()
    assert adata.obsm["X_morphology"].shape == (n, 8)
    assert np.isfinite(adata.obsm["X_morphology"]).all()  # an image on every section
    assert adata.obsm["X_fm"].shape == (n, 4)
    assert set(adata.var["marker_of"]) == {"none", *LAYERS}
    for s in adata.obs["sample"].cat.categories:
        sf = adata.uns["spatial"][s]["scalefactors"]
        assert sf["um_per_px_fullres"] == 1.0 and sf["spot_diameter_fullres"] == 55.0
        assert "images" not in adata.uns["spatial"][s]
    # mean library size near the requested one (it varies per section and per spot)
    assert 1000 < adata.X.sum(1).mean() < 2300


def test_layers_are_seeded():
    a = simulate_layers(**SMALL, seed=5)
    b = simulate_layers(**SMALL, seed=5)
    c = simulate_layers(**SMALL, seed=6)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    for key in ("spatial", "X_morphology"):
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])
    assert a.shape != c.shape or (a.X != c.X).nnz > 0
    assert not np.array_equal(a.obs["domain"].to_numpy(), c.obs["domain"].to_numpy())
    # the expression-embedding view comes from its own stream: the rest is unchanged
    d = simulate_layers(**SMALL, expression_embedding_dim=3, seed=5)
    assert (a.X != d.X).nnz == 0 and "X_fm" not in a.obsm
    np.testing.assert_array_equal(a.obsm["X_morphology"], d.obsm["X_morphology"])


def test_layers_study_design(layers_default):
    adata = layers_default
    assert adata.n_vars == 600 and 6000 < adata.n_obs <= 8 * 28 * 28
    per_patient = adata.obs.groupby("patient", observed=True)["sample"].nunique()
    assert per_patient.to_dict() == {"P1": 4, "P2": 2, "P3": 2}
    assert list(adata.obs["domain"].cat.categories) == list(LAYERS)  # every layer, pooled
    counts = adata.obs["domain"].value_counts()
    assert counts["L1"] < counts["L3"] and counts["L1"] < counts["L5"]  # L1 thin, L3 / L5 thick
    assert adata.obs.groupby("sample", observed=True)["domain"].nunique().min() >= 6


def test_layers_are_laminar_along_depth(layers_default):
    order = {name: i for i, name in enumerate(LAYERS)}
    for s, sec in _sections(layers_default):
        layer = sec.obs["domain"].map(order).to_numpy().astype(int)
        depth = sec.obs["depth"].to_numpy()
        # the layers partition depth in order
        present = np.unique(layer)
        for a, b in zip(present[:-1], present[1:], strict=True):
            assert depth[layer == a].max() <= depth[layer == b].min(), (s, a, b)
        # spatially laminar: neighbouring spots are in the same or an adjacent layer ...
        xy = sec.obsm["spatial"]
        _, nn = cKDTree(xy).query(xy, k=7)
        assert (np.abs(layer[nn[:, 1:]] - layer[:, None]) <= 1).mean() > 0.99, s
        # ... and layers lie further and further from the pial surface (L1), in order
        if (layer == 0).sum() >= 5:
            dist, _ = cKDTree(xy[layer == 0]).query(xy)
            means = [dist[layer == k].mean() for k in present]
            assert np.all(np.diff(means) > 0), (s, np.round(means))


def test_layer_orientation_differs_between_sections(layers_default):
    """Absolute position does not identify a layer across sections."""
    directions = []
    for _, sec in _sections(layers_default):
        xy = sec.obsm["spatial"] - sec.obsm["spatial"].mean(0)
        depth = sec.obs["depth"].to_numpy()
        g = np.linalg.lstsq(np.c_[xy, np.ones(len(xy))], depth, rcond=None)[0][:2]
        directions.append(np.arctan2(g[1], g[0]))
    spread = np.abs(np.exp(1j * np.array(directions)).mean())  # 1: all the same direction
    assert spread < 0.8


def _probe(X, y, seed=0):
    """3-fold balanced accuracy of a linear (LDA) classifier; classes under 3 spots left out."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    _, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, np.unique(y)[counts >= 3])
    folds = StratifiedKFold(3, shuffle=True, random_state=seed)
    clf = LinearDiscriminantAnalysis()
    return cross_val_score(clf, X[keep], y[keep], cv=folds, scoring="balanced_accuracy").mean()


def test_morphology_is_a_weak_section_shifted_view(layers_default):
    """Per section, the layer is far better read from expression smoothed over the neighbours
    than from the morphology, which still holds a little depth signal; and the morphology tells
    the sections apart at once (its stain/scanner shift)."""
    from sklearn.decomposition import PCA

    expr, morph = [], []
    for _, sec in _sections(layers_default):
        X = sec.X.toarray()
        logn = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
        pcs = PCA(10, random_state=0).fit_transform(logn - logn.mean(0))
        _, nn = cKDTree(sec.obsm["spatial"]).query(sec.obsm["spatial"], k=7)
        y = sec.obs["domain"].astype(str).to_numpy()
        expr.append(_probe(pcs[nn].mean(1), y))
        morph.append(_probe(sec.obsm["X_morphology"], y))
    expr, morph = np.array(expr), np.array(morph)
    assert (expr > morph + 0.2).all(), (expr.round(2), morph.round(2))
    assert expr.mean() > 0.7 and 1 / 7 + 0.05 < morph.mean() < 0.5
    sub = layers_default[::6]
    assert _probe(sub.obsm["X_morphology"], sub.obs["sample"].astype(str).to_numpy()) > 0.95


def test_single_spots_are_harder_than_neighbourhoods(layers_default):
    from sklearn.decomposition import PCA

    own, smoothed = [], []
    for _, sec in list(_sections(layers_default))[:3]:
        X = sec.X.toarray()
        logn = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
        pcs = PCA(10, random_state=0).fit_transform(logn - logn.mean(0))
        _, nn = cKDTree(sec.obsm["spatial"]).query(sec.obsm["spatial"], k=7)
        y = sec.obs["domain"].astype(str).to_numpy()
        own.append(_probe(pcs, y))
        smoothed.append(_probe(pcs[nn].mean(1), y))
    assert np.mean(own) < 0.75 and np.mean(smoothed) > np.mean(own) + 0.1


def test_donors_differ(layers_default):
    """Section pseudo-bulks cluster by donor: the donor effect is larger than the section one."""
    adata = layers_default
    samples = adata.obs["sample"].cat.categories
    bulk = np.vstack(
        [
            np.log(np.asarray(adata.X[(adata.obs["sample"] == s).to_numpy()].sum(0)).ravel() + 1)
            for s in samples
        ]
    )
    bulk -= bulk.mean(1, keepdims=True)
    patient = np.array([s.split("_")[0] for s in samples])
    dist = np.linalg.norm(bulk[:, None] - bulk[None], axis=-1)
    same = (patient[:, None] == patient[None]) & ~np.eye(len(samples), dtype=bool)
    other = patient[:, None] != patient[None]
    assert dist[same].max() < dist[other].min()


def test_layers_with_images():
    adata = simulate_layers(
        n_patients=2, n_sections_per_patient=1, grid_size=(10, 10), n_genes=100, n_markers=5,
        morphology_dim=4, with_images=True, seed=1,
    )  # fmt: skip
    for s in adata.obs["sample"].cat.categories:
        img = adata.uns["spatial"][s]["images"]["hires"]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert adata.uns["spatial"][s]["scalefactors"]["tissue_hires_scalef"] == 0.5
    # white matter is drawn paler than the dense granular layer L2
    img = adata.uns["spatial"]["P1_S1"]["images"]["hires"].astype(float)
    xy = adata.obsm["spatial"][(adata.obs["sample"] == "P1_S1").to_numpy()] * 0.5
    dom = adata.obs.loc[adata.obs["sample"] == "P1_S1", "domain"].to_numpy()
    brightness = {
        d: np.mean([img[int(y) - 5 : int(y) + 5, int(x) - 5 : int(x) + 5].mean()
                    for x, y in xy[dom == d]])
        for d in ("L2", "WM") if (dom == d).any()
    }  # fmt: skip
    if len(brightness) == 2:
        assert brightness["WM"] > brightness["L2"]


def test_layers_refuse_bad_arguments():
    with raises_naming(
        ValueError, "n_sections_per_patient=(1, 2, 3)", "n_patients=2", "one number per donor"
    ):
        simulate_layers(n_patients=2, n_sections_per_patient=(1, 2, 3))
    with raises_naming(ValueError, "grid_size=(5, 30)", "at least (8, 8)"):
        simulate_layers(grid_size=(5, 30))
    with raises_naming(ValueError, "layer_thickness", "7 positive numbers"):
        simulate_layers(layer_thickness=(1, 2, 3))
    with raises_naming(ValueError, "n_genes=50", "at least"):
        simulate_layers(n_genes=50, n_markers=5)


def test_textures_must_name_every_texture_key():
    from histovi.datasets._images import draw_he_images

    adata = simulate(n_patients=1, n_sections_per_patient=1, grid_size=(8, 8), n_genes=125,
                     n_markers=5, morphology_dim=4)  # fmt: skip
    with raises_naming(ValueError, "textures['tumour']", "exactly the keys", "'vacuoles'"):
        draw_he_images(adata, textures={"tumour": {"eosin": 0.5}})


# simulate() at its defaults, seed 0, as the code before the layered simulator produced it: the
# refactoring into shared helpers must not change it (a change of numpy's random streams would
# also show here).
_SIMULATE_SEED0_X_SHA256 = "717ec058117f82e9a117c38e4190eb01466f08f16f42db05281bd815910a53ce"
_SIMULATE_SEED0_DOMAIN_SHA256 = "c48d5b8945e8419d31077a3b1e2a87ba8ba50529a0d194d2f541b09c3061d4c1"


def test_simulate_default_output_is_unchanged():
    adata = simulate(seed=0)
    X = np.asarray(adata.X.toarray(), dtype=np.int32)
    assert int(X.sum()) == 18178403
    assert hashlib.sha256(X.tobytes()).hexdigest() == _SIMULATE_SEED0_X_SHA256
    domains = "".join(adata.obs["domain"].astype(str))
    assert hashlib.sha256(domains.encode()).hexdigest() == _SIMULATE_SEED0_DOMAIN_SHA256
    morph = adata.obsm["X_morphology"].astype(np.float64)
    assert np.nansum(morph) == pytest.approx(-15040.830747353983, rel=1e-9)
    assert adata.obsm["spatial"].sum() == pytest.approx(17211258.65063277, rel=1e-12)


def test_simulate_weak_view_on_every_section():
    kwargs = {"n_patients": 2, "grid_size": (10, 10), "n_genes": 150, "n_markers": 10}
    base = simulate(**kwargs, seed=2)
    weak = simulate(
        **kwargs,
        morphology_signal=0.4,
        morphology_batch_effect=2.0,
        morphology_scale_effect=0.3,
        sections_without_image=0,
        seed=2,
    )
    assert (base.X != weak.X).nnz == 0  # expression is the same study
    assert np.isnan(base.obsm["X_morphology"]).all(1).any()
    assert np.isfinite(weak.obsm["X_morphology"]).all()
    # the default scale of the stain effect is the one simulate() always used
    again = simulate(**kwargs, morphology_scale_effect=0.15, seed=2)
    np.testing.assert_array_equal(base.obsm["X_morphology"], again.obsm["X_morphology"])


def test_morphology_gradient_misleads_within_sections_only():
    kwargs = dict(n_patients=2, grid_size=(12, 12), n_genes=150, morphology_dim=8, seed=4)
    base = simulate(**kwargs)
    graded = simulate(**kwargs, morphology_gradient=3.0)
    # the counts (and everything else) are those of the same seed without the gradient
    np.testing.assert_array_equal(base.X.toarray(), graded.X.toarray())
    extra = graded.obsm["X_morphology"] - base.obsm["X_morphology"]
    finite = np.isfinite(extra).all(1)
    assert finite.sum() > 0
    for sample in graded.obs["sample"].unique():
        rows = (graded.obs["sample"] == sample).to_numpy() & finite
        if not rows.any():
            continue
        d = extra[rows]
        # one direction of the embedding times the position along one axis of the section:
        # it varies within the section, so per-section standardisation does not remove it
        assert np.linalg.matrix_rank(d, tol=1e-4) == 1
        assert d.std(0).max() > 1.0
        xy = graded.obsm["spatial"][rows]
        top = np.argmax(np.abs(d).sum(0))
        design = np.c_[xy, np.ones(len(xy))]
        fitted = design @ np.linalg.lstsq(design, d[:, top], rcond=None)[0]
        assert np.corrcoef(fitted, d[:, top])[0, 1] > 0.999  # linear in position
    with raises_naming(ValueError, "morphology_gradient=-1.0", ">= 0"):
        simulate(**kwargs, morphology_gradient=-1.0)
