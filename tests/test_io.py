"""histovi.io: folder reader, SpatialData round trip, region readers."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _messages import raises_naming, warns_naming

from histovi.datasets._images import draw_he_images
from histovi.io import FileSource, from_spatialdata, read_folder, to_spatialdata


def _adata(n: int = 5) -> ad.AnnData:
    xs, obs = [], []
    for s in ("a", "b"):
        ii, jj = np.meshgrid(np.arange(n), np.arange(n))
        xy = np.c_[(100 * ii + 50 * (jj % 2) + 120).ravel(), (86.6 * jj + 120).ravel()]
        xs.append(xy.astype(float))
        obs.append(
            pd.DataFrame({"sample": s, "domain": np.where(xy[:, 0] < 300, "tumour", "stroma")})
        )
    obs = pd.concat(obs, ignore_index=True)
    obs.index = [f"spot{i}" for i in range(len(obs))]
    adata = ad.AnnData(
        np.random.default_rng(0).poisson(2, (len(obs), 7)).astype(np.float32), obs=obs
    )
    adata.obs["sample"] = adata.obs["sample"].astype("category")
    adata.obsm["spatial"] = np.vstack(xs)
    adata.uns["spatial"] = draw_he_images(adata, seed=0)
    return adata


def test_spatialdata_zarr_round_trip(tmp_path):
    import spatialdata as sd

    adata = _adata()
    before = adata.copy()
    sdata = to_spatialdata(adata)
    assert set(sdata.images) == {"a_hires", "b_hires"} and set(sdata.shapes) == {
        "a_spots",
        "b_spots",
    }
    sdata.write(tmp_path / "data.zarr")
    back = from_spatialdata(sd.read_zarr(tmp_path / "data.zarr"), table_key="table")
    np.testing.assert_array_equal(back.X, adata.X)
    assert list(back.obs_names) == list(adata.obs_names)
    assert (back.obs["sample"].astype(str) == adata.obs["sample"].astype(str)).all()
    np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"])
    for s in ("a", "b"):
        np.testing.assert_array_equal(
            back.uns["spatial"][s]["images"]["hires"], adata.uns["spatial"][s]["images"]["hires"]
        )
        for k, v in adata.uns["spatial"][s]["scalefactors"].items():
            assert back.uns["spatial"][s]["scalefactors"][k] == pytest.approx(v)
    # the input was not modified (images stay in uns, no region columns added)
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert "images" in adata.uns["spatial"]["a"]


def test_from_spatialdata_derives_pixel_size_from_circle_radius():
    adata = _adata(4)
    sdata = to_spatialdata(adata)
    # as spatialdata-io writes Visium: no scalefactors in the table, radius in full-res px
    sdata.tables["table"].uns.pop("spatial")
    back = from_spatialdata(sdata)
    sf = back.uns["spatial"]["a"]["scalefactors"]
    assert sf["um_per_px_fullres"] == pytest.approx(1.0)  # 55 µm spot of 55 px diameter
    assert sf["tissue_hires_scalef"] == pytest.approx(0.5)


def test_read_folder(tmp_path):
    from PIL import Image

    adata = _adata(4)
    (tmp_path / "images").mkdir()
    for s in ("a", "b"):
        Image.fromarray(adata.uns["spatial"][s].pop("images")["hires"]).save(
            tmp_path / "images" / f"{s}.png"
        )
        adata.uns["spatial"][s]["image_file"] = f"images/{s}.png"
    adata.uns["spatial"]["c"] = {"image_file": "images/c.png", "scalefactors": {}}
    adata.write_h5ad(tmp_path / "study.h5ad")
    with warns_naming(UserWarning, "c.png", "not found or unreadable", "no morphology"):
        got = read_folder(tmp_path)
    assert Path(got.uns["spatial"]["a"]["image_file"]).is_absolute()
    with pytest.warns(UserWarning):
        loaded = read_folder(tmp_path, load_images=True, max_image_size=200)
    img = loaded.uns["spatial"]["a"]["images"]["hires"]
    assert max(img.shape[:2]) == 200 and img.dtype == np.uint8
    assert loaded.uns["spatial"]["a"]["scalefactors"]["tissue_hires_scalef"] < 0.5
    with raises_naming(ValueError, "nope.h5ad", "does not exist", "h5ad="):
        read_folder(tmp_path, h5ad="nope.h5ad")


def test_file_source_regions_tiff_pyramid_and_jpeg(tmp_path):
    import tifffile
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "x.tif") as tw:
        tw.write(img, tile=(64, 64), subifds=1)
        tw.write(img[::2, ::2], tile=(64, 64), subfiletype=1)
    src = FileSource(tmp_path / "x.tif")
    assert src.shapes == [(300, 260), (150, 130)]
    np.testing.assert_array_equal(src.read(10, 90, 30, 200), img[10:90, 30:200])
    assert src.select_level(mpp0=1.0, target_mpp=2.0) == 1
    np.testing.assert_array_equal(src.read(5, 20, 5, 30), img[::2, ::2][5:20, 5:30])
    Image.fromarray(img).save(tmp_path / "x.jpg", quality=95)
    jpg = FileSource(tmp_path / "x.jpg")
    assert jpg.select_level(mpp0=1.0, target_mpp=4.5) == 2  # decoded at 1/4 scale
    assert jpg.read(0, 10, 0, 10).shape == (10, 10, 3)


def test_her2st_folder_reader():
    env = os.environ.get("HISTOVI_SHARED_DATA")
    folder = (
        Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    ) / "her2st"
    if not (folder / "her2st_dev.h5ad").exists():
        pytest.skip(f"her2st data not found at {folder}")
    adata = read_folder(folder)
    files = {s: e["image_file"] for s, e in adata.uns["spatial"].items() if "image_file" in e}
    assert set(files) >= {"A1", "B4"} and all(Path(f).exists() for f in files.values())
