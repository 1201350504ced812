"""histovi.pp.embed_morphology: layouts, encoders, validity masks, reference reuse."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from _messages import raises_naming, warns_naming

from histovi.datasets._images import draw_he_images
from histovi.pp import embed_morphology
from histovi.pp._stain import MacenkoNormalizer, ReinhardNormalizer, fit_from_tiles

FAST = {"tile_size_um": 64.0, "target_mpp": 2.0, "progress": False}  # 32 px tiles


def _grid_adata(n: int = 8, samples=("s1", "s2")) -> ad.AnnData:
    """Hex grid (100 µm) per sample, three domains in vertical bands; 1 px = 1 µm."""
    xs, obs = [], []
    for s in samples:
        ii, jj = np.meshgrid(np.arange(n), np.arange(n))
        x = 100 * ii + 50 * (jj % 2) + 120
        y = 100 * np.sqrt(3) / 2 * jj + 120
        xy = np.c_[x.ravel(), y.ravel()].astype(float)
        band = np.digitize(xy[:, 0], np.quantile(xy[:, 0], [1 / 3, 2 / 3]))
        dom = np.array(["tumour", "stroma", "immune"])[band]
        xs.append(xy)
        obs.append(pd.DataFrame({"sample": s, "domain": dom}))
    obs = pd.concat(obs, ignore_index=True)
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(np.zeros((len(obs), 2), np.float32), obs=obs)
    adata.obs["sample"] = adata.obs["sample"].astype("category")
    adata.obs["domain"] = pd.Categorical(adata.obs["domain"], ["tumour", "stroma", "immune"])
    adata.obsm["spatial"] = np.vstack(xs)
    return adata


@pytest.fixture(scope="module")
def he_adata() -> ad.AnnData:
    adata = _grid_adata(n=6)
    adata.uns["spatial"] = draw_he_images(adata, seed=3)
    return adata


def _fresh(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    out.uns.pop("histovi", None)
    return out


def test_stain_texture_separates_domains_and_writes_documented_keys(he_adata):
    adata = _fresh(he_adata)
    before_obs = list(adata.obs.columns)
    before_img = adata.uns["spatial"]["s1"]["images"]["hires"].copy()
    embed_morphology(adata, **FAST)
    emb = adata.obsm["X_morphology"]
    assert emb.dtype == np.float32 and emb.shape[0] == adata.n_obs
    assert adata.obs["morphology_valid"].all()  # every spot lies on drawn tissue
    assert np.isfinite(emb).all()
    # only the documented keys were added
    assert list(adata.obs.columns) == before_obs + ["morphology_valid"]
    assert set(adata.obsm) == {"spatial", "X_morphology"}
    np.testing.assert_array_equal(adata.uns["spatial"]["s1"]["images"]["hires"], before_img)
    rec = adata.uns["histovi"]["morphology"]
    assert rec["encoder"] == "stain-texture" and rec["tile_px"] == 32
    assert len(rec["feature_names"]) == emb.shape[1]
    # textures differ by domain: domains are predictable from the features across both
    # sections (chance 1/3; k-means ARI on the simulator is in the benchmark)
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    z = (emb - emb.mean(0)) / (emb.std(0) + 1e-8)
    acc = cross_val_score(KNeighborsClassifier(5), z, adata.obs["domain"], cv=4).mean()
    assert acc > 0.8


def test_copy_leaves_input_untouched(he_adata):
    adata = _fresh(he_adata)
    out = embed_morphology(adata, copy=True, **FAST)
    assert "X_morphology" not in adata.obsm and "histovi" not in adata.uns
    assert "X_morphology" in out.obsm


def test_border_outside_and_background_tiles():
    base = _grid_adata(n=4, samples=("s1",))
    sp = draw_he_images(base, seed=1)
    tissue = sp["s1"]["images"]["hires"][60:160, 60:160]  # a patch of tissue (2 µm px)
    img = np.tile(tissue, (3, 3, 1))  # 300 x 300 px = 600 x 600 µm, tissue everywhere
    img[:, 200:] = 244  # right third: white glass
    adata = ad.AnnData(np.zeros((5, 1), np.float32))
    adata.obs["sample"] = "s1"
    # centre, at the left border (half the tile outside), outside, on glass, black corner
    adata.obsm["spatial"] = np.array(
        [[300, 300], [1, 300], [-80, 300], [520, 300], [40, 40]], float
    )
    img[:40, :40] = 0  # masked black background (as in her2st A1/A2)
    adata.uns["spatial"] = {
        "s1": {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": 0.5, "um_per_px_fullres": 1.0},
        }
    }
    embed_morphology(adata, **FAST)
    valid = adata.obs["morphology_valid"].to_numpy()
    np.testing.assert_array_equal(valid, [True, True, False, False, False])
    emb = adata.obsm["X_morphology"]
    assert np.isfinite(emb[valid]).all() and np.isnan(emb[~valid]).all()
    # the border tile is half white canvas: its stained fraction is about half of the centre's
    tf = list(adata.uns["histovi"]["morphology"]["feature_names"]).index("tissue_fraction")
    assert 0.3 < emb[1, tf] / emb[0, tf] < 0.7


def test_missing_image_gives_nan_rows_and_warning(he_adata):
    adata = _fresh(he_adata)
    adata.uns["spatial"] = {k: dict(v) for k, v in adata.uns["spatial"].items()}
    del adata.uns["spatial"]["s2"]["images"]
    with warns_naming(UserWarning, "'s2'", "no image", "obsm['X_morphology']"):
        embed_morphology(adata, **FAST)
    s2 = (adata.obs["sample"] == "s2").to_numpy()
    assert np.isnan(adata.obsm["X_morphology"][s2]).all()
    assert not adata.obs["morphology_valid"][s2].any()
    assert np.isfinite(adata.obsm["X_morphology"][~s2]).all()


def test_no_image_at_all_is_refused(he_adata):
    adata = _fresh(he_adata)
    adata.uns["spatial"] = {
        k: {"scalefactors": v["scalefactors"]} for k, v in adata.uns["spatial"].items()
    }
    with (
        pytest.warns(UserWarning),
        raises_naming(ValueError, "uns['spatial']", "no section has a usable image", "image_dir="),
    ):
        embed_morphology(adata, **FAST)


def _small_transform():
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


def test_timm_random_model_with_its_data_config(he_adata):
    adata = _fresh(he_adata)[:12].copy()
    embed_morphology(adata, "test_convnext", pretrained=False, device="cpu", **FAST)
    rec = adata.uns["histovi"]["morphology"]
    assert adata.obsm["X_morphology"].shape == (12, rec["feature_dim"])
    assert rec["encoder_kind"] == "timm" and len(rec["weights_sha256"]) == 64
    assert np.isfinite(adata.obsm["X_morphology"]).all()


def test_local_weights_file_loads_identically(he_adata, tmp_path):
    import timm

    adata = _fresh(he_adata)[:10].copy()
    model = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    kw = {"transform": _small_transform(), "device": "cpu", **FAST}
    a1 = embed_morphology(adata, model, copy=True, **kw)
    a2 = embed_morphology(adata, "test_convnext", checkpoint_path=path, copy=True, **kw)
    np.testing.assert_allclose(
        a1.obsm["X_morphology"], a2.obsm["X_morphology"], rtol=1e-5, atol=1e-6
    )
    assert a2.uns["histovi"]["morphology"]["weights_sha256"] != "none"
    # a bare .safetensors file with the architecture in config.json beside it: no network
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text('{"architecture": "test_convnext", "num_classes": 0}')
    a3 = embed_morphology(adata, str(folder / "model.safetensors"), copy=True, **kw)
    np.testing.assert_allclose(
        a1.obsm["X_morphology"], a3.obsm["X_morphology"], rtol=1e-5, atol=1e-6
    )
    with raises_naming(
        ValueError,
        "bare.pth",
        "without its architecture",
        "encoder='<timm name>'",
        "checkpoint_path=",
    ):
        torch.save(model.state_dict(), tmp_path / "bare.pth")
        embed_morphology(adata, str(tmp_path / "bare.pth"), copy=True, **kw)


def test_bad_encoder_name_is_refused(he_adata):
    with raises_naming(
        ValueError, "encoder='no_such_model_xyz'", "timm.list_models()", "'stain-texture'"
    ):
        embed_morphology(_fresh(he_adata), "no_such_model_xyz", pretrained=False, **FAST)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_query_reuses_reference_settings(he_adata, tmp_path, method):
    ref = _fresh(he_adata)
    embed_morphology(ref, n_components=4, stain_normalization=method, **FAST)
    rec = ref.uns["histovi"]["morphology"]
    assert rec["normalizer"]["method"] == method and rec["pca"]["components"].shape[0] == 4
    # the record survives h5ad and reproduces the embedding exactly
    ref.write_h5ad(tmp_path / "ref.h5ad")
    ref_disk = ad.read_h5ad(tmp_path / "ref.h5ad")
    query = _fresh(he_adata)
    embed_morphology(query, reference=ref_disk, progress=False)
    np.testing.assert_allclose(
        query.obsm["X_morphology"], ref.obsm["X_morphology"], rtol=1e-4, atol=1e-4
    )
    # settings that differ from the reference are refused, naming the argument
    for bad in (
        {"tile_size_um": 80.0},
        {"target_mpp": 1.0},
        {"n_components": 3},
        {"stain_normalization": "reinhard" if method == "macenko" else "macenko"},
    ):
        name = next(iter(bad))
        with raises_naming(ValueError, f"{name}=", "differs from the reference", f"drop {name}="):
            embed_morphology(_fresh(he_adata), reference=rec, progress=False, **bad)


def test_query_with_different_weights_is_refused(he_adata):
    import timm

    small = _fresh(he_adata)[:6].copy()
    kw = {"transform": _small_transform(), "device": "cpu", **FAST}
    torch.manual_seed(0)
    m1 = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    embed_morphology(small, m1, **kw)
    torch.manual_seed(1)
    m2 = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    with raises_naming(ValueError, "encoder weights", "reference's", "same weights"):
        embed_morphology(
            small.copy(),
            m2,
            reference=small,
            transform=_small_transform(),
            device="cpu",
            progress=False,
        )
    q = small.copy()
    embed_morphology(
        q, m1, reference=small, transform=_small_transform(), device="cpu", progress=False
    )
    np.testing.assert_allclose(
        q.obsm["X_morphology"], small.obsm["X_morphology"], rtol=1e-5, atol=1e-6
    )


def test_spatialdata_input_matches_anndata(he_adata):
    from histovi.io import to_spatialdata

    adata = _fresh(he_adata)
    embed_morphology(adata, **FAST)
    sdata = to_spatialdata(_fresh(he_adata))
    embed_morphology(sdata, **FAST)
    table = sdata.tables["table"]
    np.testing.assert_allclose(
        table.obsm["X_morphology"], adata.obsm["X_morphology"], rtol=1e-4, atol=1e-5
    )
    assert table.obs["morphology_valid"].all()


def test_image_file_layout_png_and_tiff(he_adata, tmp_path):
    import tifffile
    from PIL import Image

    adata = _fresh(he_adata)
    embed_morphology(adata, **FAST)
    files = _fresh(he_adata)
    files.uns["spatial"] = {}
    (tmp_path / "images").mkdir()
    for i, (s, entry) in enumerate(he_adata.uns["spatial"].items()):
        img = entry["images"]["hires"]
        if i == 0:
            Image.fromarray(img).save(tmp_path / "images" / f"{s}.png")
            name = f"images/{s}.png"
        else:  # tiled TIFF with a pyramid: read region by region
            with tifffile.TiffWriter(tmp_path / "images" / f"{s}.tif") as tw:
                tw.write(img, tile=(64, 64), subifds=1)
                tw.write(img[::2, ::2], tile=(64, 64), subfiletype=1)
            name = f"images/{s}.tif"
        files.uns["spatial"][s] = {"image_file": name, "scalefactors": dict(entry["scalefactors"])}
    embed_morphology(files, image_dir=tmp_path, **FAST)
    np.testing.assert_allclose(
        files.obsm["X_morphology"], adata.obsm["X_morphology"], rtol=1e-5, atol=1e-6
    )
    # without image_dir the relative files are not found: warned and NaN, not a crash
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path.parent)
        with (
            warns_naming(UserWarning, "'s1'", "'s2'", "not found", "image_dir="),
            pytest.raises(ValueError),
        ):
            embed_morphology(_fresh(files), **FAST)
    finally:
        os.chdir(cwd)


def test_stain_normalizers_move_colour_towards_target(he_adata):
    from histovi.io import ArraySource
    from histovi.pp._morphology import read_tile

    def tiles(sample):
        src = ArraySource(he_adata.uns["spatial"][sample]["images"]["hires"])
        xy = he_adata.obsm["spatial"][(he_adata.obs["sample"] == sample).to_numpy()] * 0.5
        return [read_tile(src, x, y, 16, 32)[0] for x, y in xy[:20]]

    t1, t2 = tiles("s1"), tiles("s2")
    # the defining property: re-fitting on normalised tiles gives (nearly) the target's stain
    # parameters: stain vectors for Macenko, Lab mean/std for Reinhard
    for norm, key in ((MacenkoNormalizer(), "stain_matrix"), (ReinhardNormalizer(), "mean")):
        target, source = fit_from_tiles(norm, t1), fit_from_tiles(norm, t2)
        moved = [norm.transform(t, source, target) for t in t2]
        refit = fit_from_tiles(norm, moved)
        before = np.abs(source[key] - target[key]).max()
        after = np.abs(refit[key] - target[key]).max()
        assert after < 0.5 * before, (type(norm).__name__, before, after)
        # a section normalised to its own parameters is (nearly) unchanged
        same = norm.transform(t1[0], target, target).astype(float)
        assert np.abs(same - t1[0]).mean() < 3.0


def _her2st_dir() -> Path:
    env = os.environ.get("HISTOVI_SHARED_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return root / "her2st"


def test_her2st_tiles_land_on_tissue():
    folder = _her2st_dir()
    if not (folder / "her2st_dev.h5ad").exists():
        pytest.skip(f"her2st data not found at {folder}")
    full = ad.read_h5ad(folder / "her2st_dev.h5ad", backed="r")
    keep = full.obs["sample"].isin(["A1", "B4"]).to_numpy()
    obs = full.obs.loc[keep, ["sample"]].copy()
    idx = np.flatnonzero(keep)
    rng = np.random.default_rng(0)
    pick = np.sort(
        np.concatenate(
            [
                rng.choice(idx[obs["sample"].to_numpy() == s], 100, replace=False)
                for s in ("A1", "B4")
            ]
        )
    )
    adata = ad.AnnData(
        np.zeros((pick.size, 1), np.float32), obs=full.obs.iloc[pick][["sample"]].copy()
    )
    adata.obs["sample"] = adata.obs["sample"].astype(str)
    adata.obsm["spatial"] = np.asarray(full.obsm["spatial"][pick])
    adata.uns["spatial"] = {s: full.uns["spatial"][s] for s in ("A1", "B4")}
    full.file.close()
    # the same spots moved to the image corner (off tissue): black mask (A1) or glass (B4)
    off = adata.copy()
    off.obsm["spatial"] = np.full_like(adata.obsm["spatial"], 120.0) + rng.uniform(
        0, 60, adata.obsm["spatial"].shape
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 3 µm/px: B4 (1.4 µm/px JPEG) is decoded at half scale, A1 (3.2 µm/px) as is
        kw = {"image_dir": folder, "tile_size_um": 100.0, "target_mpp": 3.0, "progress": False}
        embed_morphology(adata, **kw)
        embed_morphology(off, **kw)
    for s in ("A1", "B4"):
        m = (adata.obs["sample"] == s).to_numpy()
        assert adata.obs["morphology_valid"][m].mean() > 0.9, s
        assert off.obs["morphology_valid"][m].mean() < 0.1, s
    rec = adata.uns["histovi"]["morphology"]["sections"]
    assert rec["B4"]["mpp_from"] == "um_per_px_fullres" and rec["B4"]["level"] == 1
    # tissue tiles carry texture: haematoxylin spread is far above the flat background's
    names = list(adata.uns["histovi"]["morphology"]["feature_names"])
    emb = adata.obsm["X_morphology"][:, names.index("H_locstd_2um")]
    assert np.nanmedian(emb) > 0.05


# ------------------------------------------------------------------ resumable embedding
def _simulated_with_images():
    import histovi

    return histovi.datasets.simulate(
        n_patients=2,
        n_sections_per_patient=2,
        grid_size=(8, 8),
        n_genes=125,
        n_markers=5,
        morphology_dim=4,
        with_images=True,
        seed=0,
    )


class _Interrupted(RuntimeError):
    pass


def _interrupt_after(monkeypatch, n_sections: int):
    """Make embed_morphology stop (as a crash would) once ``n_sections`` sections are saved."""
    from histovi.pp import _morphology

    original = _morphology._SectionStore.save_section
    saved = []

    def save_then_crash(self, plan, *args, **kwargs):
        original(self, plan, *args, **kwargs)
        saved.append(plan["section"].name)
        if len(saved) == n_sections:
            raise _Interrupted(plan["section"].name)

    monkeypatch.setattr(_morphology._SectionStore, "save_section", save_then_crash)
    return saved


def _embedded_sections(monkeypatch) -> list:
    """Names of the sections whose tiles are read from here on."""
    from histovi.pp import _morphology

    original = _morphology._chroma_threshold
    names = []

    def spy(plan):
        names.append(plan["section"].name)
        return original(plan)

    monkeypatch.setattr(_morphology, "_chroma_threshold", spy)
    return names


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stain_normalization": "macenko", "n_components": 5}],
    ids=["stain-texture", "macenko+pca"],
)
def test_checkpoint_dir_resumes_after_an_interruption(tmp_path, monkeypatch, kwargs):
    adata = _simulated_with_images()
    with_image = [s for s, e in adata.uns["spatial"].items() if "images" in e]
    assert len(with_image) == 3  # the last section has no image (NaN rows)
    full = adata.copy()
    with warns_naming(UserWarning, "'P2_S2'", "no image", "NaN"):
        embed_morphology(full, **FAST, **kwargs)

    ckpt = tmp_path / "ckpt"
    first = adata.copy()
    with monkeypatch.context() as m:
        saved = _interrupt_after(m, 2)
        with warns_naming(UserWarning, "'P2_S2'", "no image", "NaN"), pytest.raises(_Interrupted):
            embed_morphology(first, checkpoint_dir=ckpt, **FAST, **kwargs)
    assert saved == with_image[:2]
    assert len(list(ckpt.glob("section_*.npz"))) == 2
    assert not list(ckpt.glob(".*.tmp"))  # no partial file left behind
    assert (ckpt / "stain.json").exists() == ("stain_normalization" in kwargs)

    resumed = adata.copy()
    with monkeypatch.context() as m:
        read = _embedded_sections(m)
        with warns_naming(UserWarning, "'P2_S2'", "no image", "NaN"):
            embed_morphology(resumed, checkpoint_dir=ckpt, **FAST, **kwargs)
    assert read == with_image[2:]  # the saved sections' images were not read again
    np.testing.assert_array_equal(resumed.obsm["X_morphology"], full.obsm["X_morphology"])
    np.testing.assert_array_equal(resumed.obs["morphology_valid"], full.obs["morphology_valid"])
    rec, ref = resumed.uns["histovi"]["morphology"], full.uns["histovi"]["morphology"]
    assert set(rec["sections"]) == set(ref["sections"])
    for name in with_image:
        assert rec["sections"][name] == pytest.approx(ref["sections"][name])

    # a finished run again: nothing is read, the same result
    again = adata.copy()
    with monkeypatch.context() as m:
        read = _embedded_sections(m)
        with warns_naming(UserWarning, "'P2_S2'", "no image", "NaN"):
            embed_morphology(again, checkpoint_dir=ckpt, **FAST, **kwargs)
    assert read == []
    np.testing.assert_array_equal(again.obsm["X_morphology"], full.obsm["X_morphology"])


def test_checkpoint_dir_refuses_other_settings(tmp_path):
    adata = _simulated_with_images()
    ckpt = tmp_path / "ckpt"
    with warns_naming(UserWarning, "'P2_S2'", "no image", "NaN"):
        embed_morphology(adata.copy(), checkpoint_dir=ckpt, **FAST)
    other = {**FAST, "tile_size_um": 80.0}
    with (
        warns_naming(UserWarning, "'P2_S2'", "no image", "NaN"),
        raises_naming(
            ValueError, "checkpoint_dir", "tile_px", "another checkpoint_dir", "delete that folder"
        ),
    ):
        embed_morphology(adata.copy(), checkpoint_dir=ckpt, **other)
    # other spots under the same section name
    moved = adata.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] + 3.0
    with (
        warns_naming(UserWarning, "'P2_S2'", "no image", "NaN"),
        raises_naming(
            ValueError,
            "checkpoint_dir",
            "spot_centres",
            "another checkpoint_dir",
            "delete that folder",
        ),
    ):
        embed_morphology(moved, checkpoint_dir=ckpt, **FAST)


def test_checkpoint_dir_with_a_random_timm_model(tmp_path, monkeypatch):
    adata = _simulated_with_images()
    adata = adata[adata.obs["sample"].isin(["P1_S1", "P1_S2"])].copy()
    import timm

    torch.manual_seed(0)  # one random model for every call (weights cannot be downloaded)
    model = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    kwargs = {"encoder": model, "transform": _small_transform(), "device": "cpu", **FAST}
    full = adata.copy()
    embed_morphology(full, **kwargs)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(_Interrupted):
            embed_morphology(adata.copy(), checkpoint_dir=ckpt, **kwargs)
    resumed = adata.copy()
    embed_morphology(resumed, checkpoint_dir=ckpt, **kwargs)
    np.testing.assert_array_equal(resumed.obsm["X_morphology"], full.obsm["X_morphology"])


def test_decoded_images_are_released_section_by_section(he_adata, tmp_path, monkeypatch):
    """Image files decoded whole (PNG / JPEG) are held for one section at a time, not all of
    them until the end."""
    from PIL import Image

    from histovi.io import _image_source

    files = _fresh(he_adata)
    files.uns["spatial"] = {}
    for s, entry in he_adata.uns["spatial"].items():
        Image.fromarray(entry["images"]["hires"]).save(tmp_path / f"{s}.png")
        files.uns["spatial"][s] = {
            "image_file": f"{s}.png",
            "scalefactors": dict(entry["scalefactors"]),
        }
    sources, held = [], []
    init, open_ = _image_source.FileSource.__init__, _image_source.FileSource._open

    def track_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sources.append(self)

    def track_open(self):
        out = open_(self)
        held.append(sum(src._handle is not None for src in sources))
        return out

    monkeypatch.setattr(_image_source.FileSource, "__init__", track_init)
    monkeypatch.setattr(_image_source.FileSource, "_open", track_open)
    embed_morphology(files, image_dir=tmp_path, **FAST)
    assert len(sources) == 2 and held and max(held) == 1
    assert all(src._handle is None for src in sources)
    assert files.obs["morphology_valid"].all()
