"""AnnData (scanpy/squidpy or image-file layout) <-> SpatialData conversion."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pandas as pd

from ._image_source import FileSource
from ._sections import anndata_sections, spatialdata_sections

__all__ = ["from_spatialdata", "to_spatialdata"]

REGION_KEY = "region"
INSTANCE_KEY = "spot_id"


def _spots_name(sample: str) -> str:
    return f"{sample}_spots"


def _image_name(sample: str) -> str:
    return f"{sample}_hires"


def to_spatialdata(
    adata: Any,
    *,
    sample_key: str = "sample",
    spatial_key: str = "spatial",
    image_dir: str | os.PathLike | None = None,
    image_key: str = "hires",
    multiscale_min_size: int = 4096,
    table_key: str = "table",
) -> Any:
    """Convert an AnnData with spots and per-sample H&E images into a SpatialData object.

    Per sample ``s`` (values of ``obs[sample_key]``): circles ``"{s}_spots"`` (centres from
    ``obsm[spatial_key]``, radius ``spot_diameter_fullres / 2``) and image ``"{s}_hires"`` (from
    ``uns['spatial'][s]['images'][image_key]`` or the ``image_file``), both in a coordinate
    system named ``s`` whose unit is the full-resolution pixel (sections have unrelated frames).
    Images larger than ``multiscale_min_size`` pixels are written as pyramids. The table is a
    copy of ``adata`` without the image arrays, annotating the circles through
    ``obs['region']`` / ``obs['spot_id']``; scalefactors stay in ``uns['spatial']``.
    ``adata`` is not modified.
    """
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if sample_key not in adata.obs:
        raise KeyError(
            f"adata.obs[{sample_key!r}] not found: pass sample_key= naming the section column"
        )
    sections = anndata_sections(
        adata,
        sample_key=sample_key,
        spatial_key=spatial_key,
        image_dir=image_dir,
        image_key=image_key,
        mpp_fullres=None,
    )
    spatial = adata.uns.get("spatial", {}) or {}
    shapes, images = {}, {}
    regions = np.empty(adata.n_obs, dtype=object)
    for sec in sections:
        name = sec.name
        sf = (spatial.get(name, {}) or {}).get("scalefactors", {}) or {}
        radius = float(sf.get("spot_diameter_fullres", 1.0)) / 2
        shapes[_spots_name(name)] = ShapesModel.parse(
            sec.centres,
            geometry=0,
            radius=np.full(len(sec.rows), radius),
            index=pd.Index(sec.rows, name=INSTANCE_KEY),
            transformations={name: Identity()},
        )
        regions[sec.rows] = _spots_name(name)
        if not sec.sources:
            continue
        src = sec.sources[0]
        if isinstance(src, FileSource):
            arr = src.read(0, src.shapes[0][0], 0, src.shapes[0][1])
        else:
            arr = src.read(0, src.shape[0], 0, src.shape[1])
        scale = 1.0 / src.scalef  # image px -> full-res px
        pyramid = [2, 2, 2] if max(arr.shape[:2]) > multiscale_min_size else None
        images[_image_name(name)] = Image2DModel.parse(
            np.moveaxis(arr, -1, 0),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=pyramid,
            transformations={name: Scale([scale, scale], axes=("y", "x"))},
        )
    table = adata.copy()
    uns_spatial = {}
    for lib, entry in spatial.items():
        entry = {k: v for k, v in entry.items() if k != "images"}  # pixels live in sdata.images
        uns_spatial[lib] = entry
    table.uns["spatial"] = uns_spatial
    table.obs[REGION_KEY] = pd.Categorical(
        regions, categories=[_spots_name(s.name) for s in sections]
    )
    table.obs[INSTANCE_KEY] = np.arange(adata.n_obs)
    table = TableModel.parse(
        table,
        region=[_spots_name(s.name) for s in sections],
        region_key=REGION_KEY,
        instance_key=INSTANCE_KEY,
    )
    return sd.SpatialData(images=images, shapes=shapes, tables={table_key: table})


def from_spatialdata(
    sdata: Any,
    table_key: str = "table",
    *,
    sample_key: str = "sample",
    image_key: str | dict[str, str] | None = None,
    max_image_size: int | None = 4000,
    spatial_key: str = "spatial",
    mpp_fullres: float | dict[str, float] | None = None,
) -> Any:
    """AnnData in scanpy/squidpy layout from a SpatialData table and the images of its regions.

    Each annotated region (shapes/points element) becomes one library: ``obs[sample_key]``
    (kept when present, else the region name), ``obsm[spatial_key]`` the spot centres in the
    coordinate system shared with the image, and ``uns['spatial'][lib]`` with ``images['hires']``
    (the pyramid level whose longer side is at most ``max_image_size`` px, or the finest level
    if none is; ``None`` loads no pixels) and ``scalefactors`` (``tissue_hires_scalef``, the
    spot diameter and ``um_per_px_fullres`` when known). ``sdata`` is not modified.
    """
    table, sections = spatialdata_sections(
        sdata,
        table_key=table_key,
        sample_key=sample_key,
        image_key=image_key,
        mpp_fullres=mpp_fullres,
    )
    adata = table.copy()
    attrs = adata.uns.pop("spatialdata_attrs", {})
    xy = np.full((adata.n_obs, 2), np.nan)
    labels = np.empty(adata.n_obs, dtype=object)
    spatial = {k: dict(v) for k, v in (adata.uns.get("spatial", {}) or {}).items()}
    for sec in sections:
        xy[sec.rows] = sec.centres
        labels[sec.rows] = sec.name
        entry = spatial.setdefault(sec.name, {})
        sf = dict(entry.get("scalefactors", {}) or {})
        if sec.mpp_units is not None:
            sf.setdefault("um_per_px_fullres", float(sec.mpp_units))
            if "spot_diameter_fullres" not in sf and sec.info.get("mpp_from") == "circle radius":
                sf["spot_diameter_fullres"] = 55.0 / float(sec.mpp_units)
        if sec.sources and max_image_size is not None:
            src = sec.sources[0]
            fits = [i for i, s in enumerate(src.shapes) if max(s) <= max_image_size]
            src.level = min(fits) if fits else 0
            lin = src.to_image[:2, :2] / src.factor
            if not np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9) or not np.isclose(
                lin[0, 0], lin[1, 1]
            ):
                warnings.warn(
                    f"image of {sec.name!r} is rotated/sheared relative to the spots: not loaded "
                    "into uns['spatial'] (use the SpatialData object directly)",
                    stacklevel=2,
                )
            else:
                arr = src.read(0, src.shape[0], 0, src.shape[1])
                entry["images"] = {"hires": arr}
                sf["tissue_hires_scalef"] = float(lin[0, 0])
                if np.abs(src.to_image[:2, 2]).max() > 1e-6:
                    # image origin differs from the coordinate origin: shift spot coordinates
                    # into the image frame so that image px = spatial * scalef holds
                    xy[sec.rows] = sec.centres + src.to_image[:2, 2] / src.factor / lin[0, 0]
        entry["scalefactors"] = sf
    if attrs:
        for col in (attrs.get("region_key"), attrs.get("instance_key")):
            if col in adata.obs and col != sample_key:
                del adata.obs[col]
    if sample_key not in adata.obs:
        adata.obs[sample_key] = pd.Categorical(labels)
    adata.obsm[spatial_key] = xy
    adata.uns["spatial"] = spatial
    return adata
