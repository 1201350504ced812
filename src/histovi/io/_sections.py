"""Resolve, per section, where its spots lie in which image and at what physical pixel size.

Shared by :func:`histovi.pp.embed_morphology` and the SpatialData converters. Three layouts:

1. scanpy/squidpy AnnData: ``uns['spatial'][lib]['images']['hires'|'lowres']`` arrays with
   ``scalefactors['tissue_hires_scalef'|'tissue_lowres_scalef']``;
2. AnnData with image files (her2st layout): ``uns['spatial'][lib]['image_file']``, a path relative
   to ``image_dir`` (and inside it) or absolute; image pixels = ``obsm['spatial'] * tissue_hires_scalef``
   (scalef 1 when absent, i.e. the file is the full-resolution image);
3. SpatialData: shapes/points annotated by a table; SpatialData transformations map spot centres
   into image pixels of each pyramid level.

Physical pixel size: ``mpp_fullres`` (user) > ``scalefactors['um_per_px_fullres']`` > the spot
diameter (``spot_diameter_fullres`` or circle radius) assuming ``spot_diameter_um`` (55 µm, Visium).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._files import is_within
from ._image_source import ArraySource, DaskSource, FileSource, ImageReadError, _Source

#: scalefactor key for each image key of the scanpy layout
_SCALEF_KEYS = {"hires": "tissue_hires_scalef", "lowres": "tissue_lowres_scalef", "fullres": None}


@dataclass
class Section:
    """One tissue section: its spots, their image and the geometry linking them."""

    name: str
    rows: np.ndarray
    centres: np.ndarray
    to_image: np.ndarray | None = None  # 3x3 affine: centre units -> level-0 image pixels
    mpp_units: float | None = None  # µm per centre unit
    sources: list[_Source] = field(default_factory=list)  # candidate images (pick one level)
    missing: str = ""  # why the section has no usable image
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def mpp0(self) -> float:
        """µm per level-0 image pixel."""
        lin = np.linalg.inv(self.to_image)[:2, :2]
        return float(self.mpp_units * np.sqrt(abs(np.linalg.det(lin))))


def _per_sample(value: float | Mapping[str, float] | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        v = value.get(name)
        return None if v is None else float(v)
    return float(value)


def _mpp_from_scalefactors(
    sf: Mapping[str, Any], user: float | None, spot_diameter_um: float
) -> tuple[float | None, str]:
    if user is not None:
        if not np.isfinite(user) or user <= 0:
            raise ValueError(f"mpp_fullres={user!r} must be a positive number of µm per pixel")
        return user, "mpp_fullres"
    if sf.get("um_per_px_fullres") is not None:
        return float(sf["um_per_px_fullres"]), "um_per_px_fullres"
    if sf.get("spot_diameter_fullres"):
        return spot_diameter_um / float(sf["spot_diameter_fullres"]), "spot_diameter_fullres"
    return None, ""


def anndata_sections(
    adata: Any,
    *,
    sample_key: str = "sample",
    spatial_key: str = "spatial",
    image_dir: str | os.PathLike | None = None,
    image_key: str | None = None,
    mpp_fullres: float | Mapping[str, float] | None = None,
    spot_diameter_um: float = 55.0,
) -> list[Section]:
    """Sections of an AnnData in the scanpy/squidpy or the image-file (her2st) layout."""
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{spatial_key!r}] (spot centres in full-resolution pixels) not found: "
            "add it or pass spatial_key="
        )
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"adata.obsm[{spatial_key!r}] must be (n_obs, 2); got {xy.shape}")
    xy = xy[:, :2]
    spatial = adata.uns.get("spatial", {}) or {}
    if sample_key in adata.obs:
        labels = adata.obs[sample_key].astype(str).to_numpy()
    elif len(spatial) == 1:
        labels = np.full(adata.n_obs, next(iter(spatial)), dtype=object)
    else:
        raise KeyError(
            f"adata.obs[{sample_key!r}] not found and uns['spatial'] holds {len(spatial)} "
            "libraries: pass sample_key= naming the obs column of the library ids"
        )
    names = pd.unique(labels)
    sections = []
    for name in names:
        rows = np.flatnonzero(labels == name)
        sec = Section(str(name), rows, xy[rows])
        sections.append(sec)
        lib = spatial.get(name)
        if lib is None:
            sec.missing = "no uns['spatial'] entry"
            continue
        sf = dict(lib.get("scalefactors", {}) or {})
        mpp, how = _mpp_from_scalefactors(sf, _per_sample(mpp_fullres, sec.name), spot_diameter_um)
        if mpp is None:
            sec.missing = (
                "no pixel size: scalefactors lack um_per_px_fullres and spot_diameter_fullres "
                "(pass mpp_fullres=)"
            )
            continue
        sec.mpp_units = mpp
        sec.info["mpp_from"] = how
        images = lib.get("images", {}) or {}
        candidates = (
            [image_key] if image_key is not None else [k for k in images if k in _SCALEF_KEYS]
        )
        for key in candidates:
            if key not in images:
                continue
            skey = _SCALEF_KEYS.get(key, f"tissue_{key}_scalef")
            scalef = 1.0 if skey is None else sf.get(skey)
            if scalef is None:
                continue
            src = ArraySource(images[key])
            src.scalef = float(scalef)
            src.label = key
            sec.sources.append(src)
        if not sec.sources and lib.get("image_file"):
            path = Path(str(lib["image_file"]))
            if not path.is_absolute():
                # relative to the folder the user names (or the working directory), and inside
                # it: a record must not lead the reader out of its data folder
                base = Path(image_dir).expanduser() if image_dir is not None else Path(".")
                path = base / path
                if not is_within(path, base):
                    raise ValueError(
                        f"uns['spatial'][{name!r}]['image_file'] = {str(lib['image_file'])!r} "
                        f"leads out of {'image_dir' if image_dir is not None else 'the working directory'} "
                        f"{str(base.resolve())!r}: relative image paths must stay inside it. Move "
                        "the image there, or set the entry to the image's absolute path yourself."
                    )
            if not path.exists():
                sec.missing = f"image file {str(path)!r} not found (pass image_dir=)"
                continue
            try:
                src = FileSource(path)
            except ImageReadError as err:
                sec.missing = str(err)
                continue
            src.scalef = float(sf.get("tissue_hires_scalef", 1.0))
            src.label = str(path)
            sec.sources.append(src)
        if not sec.sources:
            sec.missing = "no image (uns['spatial'][lib]['images'] or ['image_file'])"
    for sec in sections:
        for src in sec.sources:
            # a single scale per section: sources differ only in scalef, compare through mpp
            src.to_image = np.diag([src.scalef, src.scalef, 1.0])
    return sections


def _affine_xy(transformation: Any) -> np.ndarray:
    return np.asarray(
        transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float
    )


def _image_levels(image: Any) -> list[Any]:
    """Dask arrays (c, y, x) of a SpatialData image, finest first."""
    if hasattr(image, "children") and len(getattr(image, "children", {})):
        levels = []
        for key in sorted(
            image.children, key=lambda k: int("".join(c for c in k if c.isdigit()) or 0)
        ):
            node = image[key]
            var = list(node.data_vars)[0] if hasattr(node, "data_vars") else "image"
            levels.append(node[var].data)
        return levels
    return [image.data]


def spatialdata_sections(
    sdata: Any,
    *,
    table_key: str = "table",
    sample_key: str = "sample",
    image_key: str | Mapping[str, str] | None = None,
    mpp_fullres: float | Mapping[str, float] | None = None,
    spot_diameter_um: float = 55.0,
) -> tuple[Any, list[Section]]:
    """The annotating table of ``sdata`` and one section per annotated region."""
    from spatialdata import get_centroids
    from spatialdata.transformations import get_transformation

    if not hasattr(sdata, "tables") or not hasattr(sdata, "images"):
        raise TypeError(
            f"expected a SpatialData object, got {type(sdata).__name__}: read the store with "
            "spatialdata.read_zarr(path) (an AnnData needs no conversion)"
        )
    if table_key not in sdata.tables:
        raise KeyError(
            f"SpatialData has no table {table_key!r} (tables: {list(sdata.tables)}): pass table_key="
        )
    table = sdata.tables[table_key]
    attrs = table.uns.get("spatialdata_attrs", {})
    if not attrs:
        raise ValueError(
            f"table {table_key!r} does not annotate any element (uns['spatialdata_attrs'] missing): "
            "parse it with spatialdata.models.TableModel.parse(..., region=, region_key=, instance_key=)"
        )
    region_key, instance_key = attrs["region_key"], attrs["instance_key"]
    regions = attrs["region"]
    regions = [regions] if isinstance(regions, str) else list(regions)
    for role, key in (("region_key", region_key), ("instance_key", instance_key)):
        if key not in table.obs:
            raise KeyError(
                f"table {table_key!r} names obs[{key!r}] as its {role} (uns['spatialdata_attrs']) "
                f"but has no such column (columns: {list(table.obs.columns)}): parse the table "
                "again with spatialdata.models.TableModel.parse(..., region_key=, instance_key=)"
            )
    region_of_row = table.obs[region_key].astype(str).to_numpy()
    unknown = ~np.isin(region_of_row, regions)
    if unknown.any():
        raise ValueError(
            f"{int(unknown.sum())} rows of table {table_key!r} have obs[{region_key!r}] values "
            f"{sorted(set(region_of_row[unknown]))[:5]} that are not among the regions the table "
            f"annotates ({regions}): fix obs[{region_key!r}], or list those elements in the "
            "table's region (TableModel.parse(..., region=[...]))"
        )
    spatial_uns = table.uns.get("spatial", {}) or {}
    sections = []
    for region in regions:
        rows = np.flatnonzero(region_of_row == region)
        if region not in sdata.shapes and region not in sdata.points:
            raise KeyError(
                f"table {table_key!r} annotates {region!r}, which is not a shapes or points element "
                "of the SpatialData object"
            )
        element = sdata[region]
        name = region
        if sample_key in table.obs and rows.size:
            vals = table.obs[sample_key].iloc[rows].astype(str).unique()
            if len(vals) == 1:
                name = vals[0]
        element_cs = list(get_transformation(element, get_all=True))
        # candidate images: those sharing a coordinate system with the spots
        if isinstance(image_key, Mapping):
            wanted = [image_key[region]] if region in image_key else []
        elif isinstance(image_key, str):
            wanted = [image_key]
        else:
            wanted = list(sdata.images)
        cs = None
        imgs = []
        for key in wanted:
            if key not in sdata.images:
                raise KeyError(
                    f"image_key {key!r} is not an image of the SpatialData object: {list(sdata.images)}"
                )
            shared = [
                c for c in get_transformation(sdata.images[key], get_all=True) if c in element_cs
            ]
            if shared:
                cs = cs or shared[0]
                if cs in shared:
                    imgs.append(key)
        cs = cs or element_cs[0]
        cent = get_centroids(element, coordinate_system=cs)
        cent = cent.compute() if hasattr(cent, "compute") else cent
        ids = table.obs[instance_key].iloc[rows].to_numpy()
        absent = ~pd.Index(ids).isin(cent.index)
        if absent.any():
            raise KeyError(
                f"{int(absent.sum())} table rows of region {region!r} name instances "
                f"(obs[{instance_key!r}], e.g. {list(ids[absent][:3])}) that element "
                f"{region!r} does not have (its index runs {cent.index.min()}..{cent.index.max()}): "
                "the table and the element do not match; fix obs[" + repr(instance_key) + "]"
            )
        centres = cent.loc[ids, ["x", "y"]].to_numpy(dtype=float)
        sec = Section(str(name), rows, centres)
        sec.info.update(region=region, coordinate_system=cs)
        sections.append(sec)
        sf = dict((spatial_uns.get(name, {}) or {}).get("scalefactors", {}) or {})
        mpp, how = _mpp_from_scalefactors(sf, _per_sample(mpp_fullres, name), spot_diameter_um)
        if mpp is None and "radius" in getattr(element, "columns", []):
            # circles: Visium spot diameter in cs units (radius is in the element's own units)
            scale = np.sqrt(abs(np.linalg.det(_affine_xy(get_transformation(element, cs))[:2, :2])))
            diam = 2 * float(np.median(element["radius"])) * scale
            mpp, how = spot_diameter_um / diam, "circle radius"
        if mpp is None:
            sec.missing = "no pixel size (pass mpp_fullres=, µm per coordinate-system unit)"
            continue
        sec.mpp_units, sec.info["mpp_from"] = mpp, how
        for key in imgs:
            img = sdata.images[key]
            src = DaskSource(_image_levels(img))
            src.to_image = np.linalg.inv(_affine_xy(get_transformation(img, cs)))
            src.label = key
            sec.sources.append(src)
        if not sec.sources:
            sec.missing = f"no image in coordinate system {cs!r}"
    return table, sections


def choose_source(sec: Section, target_mpp: float) -> tuple[_Source, float]:
    """Pick (image, level) reading pixels closest to ``target_mpp`` (not coarser when possible).

    Returns the source (its level selected) and the µm per pixel of that level.
    """
    best = None
    for src in sec.sources:
        lin = np.linalg.inv(src.to_image)[:2, :2]
        mpp0 = sec.mpp_units * float(np.sqrt(abs(np.linalg.det(lin))))
        lvl = src.select_level(mpp0, target_mpp)
        mpp = mpp0 * src.factors[lvl]
        fine_enough = mpp <= target_mpp * (1 + 1e-6)
        # prefer fine-enough levels, then the coarsest of those (less to read); else the finest
        rank = (fine_enough, mpp if fine_enough else -mpp)
        if best is None or rank > best[0]:
            best = (rank, src, mpp, lvl)
    assert best is not None
    _, src, mpp, lvl = best
    src.level = lvl
    sec.to_image = src.to_image
    return src, mpp
