"""Per-spot morphology embeddings from H&E tiles: :func:`embed_morphology`.

Tiles are streamed: at most ``batch_size`` tiles per worker plus the image region they need are
held at a time. Baseline JPEG/PNG files are decoded once per section and released when the
section is done, so many large images do not accumulate in memory; TIFF, zarr and SpatialData
images are read region by region.

With ``checkpoint_dir`` each finished section is saved (one ``.npz`` file per section, written
atomically; the stain-normalisation parameters too), and a rerun after an interruption loads
the sections found there instead of embedding them again (their images are not read). A
section saved with other settings (encoder or its weights, tile geometry, stain normalisation,
spots) is refused with what differs: use another folder or delete it. The PCA of
``n_components`` is fitted at the end over all sections, so the files hold the encoder's
features.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .._constants import MORPHOLOGY_KEY, UNS_KEY
from .._files import atomic_write, open_regular, record_uns, storable
from .._threads import keeps_torch_threads
from .._validation import check_whole_number
from ..io._sections import Section, anndata_sections, choose_source, spatialdata_sections
from ._encoders import STAIN_TEXTURE, resolve_encoder
from ._stain import estimate_chroma_threshold, fit_from_tiles, make_normalizer, tissue_mask

logger = logging.getLogger(__name__)

__all__ = ["embed_morphology", "VALID_KEY", "RECORD_KEY"]

#: ``adata.obs`` key of the boolean mask of spots whose tile was embedded.
VALID_KEY = "morphology_valid"
#: ``adata.uns[UNS_KEY]`` sub-key holding the settings of the last embedding.
RECORD_KEY = "morphology"
#: Tile side in µm when not given: about two Visium spot diameters of context, i.e. the
#: 224 px field of view of pathology foundation models at 0.5 µm per pixel.
DEFAULT_TILE_SIZE_UM = 112.0
DEFAULT_MIN_TISSUE = 0.1
_N_FIT_TILES = 32  # tiles per section used to fit stain normalisation


# --------------------------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------------------------
def read_tile(
    source: Any, cx: float, cy: float, half: float, tile_px: int, chroma_threshold: float = 15.0
) -> tuple[np.ndarray | None, float]:
    """Square RGB tile of side ``2 * half`` source pixels centred at (cx, cy), resized to ``tile_px``.

    The part of the tile outside the image is filled white (background), so it counts as
    non-tissue. Returns (None, 0.0) when the centre lies outside the image.
    """
    from PIL import Image

    h, w = source.shape
    if not (0 <= cx < w and 0 <= cy < h):
        return None, 0.0
    x0, y0 = int(np.floor(cx - half)), int(np.floor(cy - half))
    n = max(int(round(2 * half)), 1)
    canvas = np.full((n, n, 3), 255, dtype=np.uint8)
    ry0, ry1, rx0, rx1 = max(y0, 0), min(y0 + n, h), max(x0, 0), min(x0 + n, w)
    canvas[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = source.read(ry0, ry1, rx0, rx1)
    if n != tile_px:
        canvas = np.asarray(Image.fromarray(canvas).resize((tile_px, tile_px), Image.BILINEAR))
    return canvas, float(tissue_mask(canvas, chroma_threshold).mean())


class _TileDataset(Dataset):
    """Tiles of one section; each item is (index, valid, tissue fraction, encoder input)."""

    def __init__(
        self,
        source: Any,
        centres_px: np.ndarray,
        half: float,
        tile_px: int,
        min_tissue: float,
        preprocess: Callable | None,
        stain: Callable | None = None,
        chroma_threshold: float = 15.0,
    ):
        self.source, self.centres, self.half, self.tile_px = source, centres_px, half, tile_px
        self.min_tissue, self.preprocess, self.stain = min_tissue, preprocess, stain
        self.chroma_threshold = chroma_threshold

    def __len__(self) -> int:
        return len(self.centres)

    def __getitem__(self, i: int):
        cx, cy = self.centres[i]
        tile, frac = read_tile(self.source, cx, cy, self.half, self.tile_px, self.chroma_threshold)
        valid = tile is not None and frac >= self.min_tissue
        if self.preprocess is None:  # raw tiles (stain fitting)
            out = tile if valid else np.zeros((self.tile_px, self.tile_px, 3), np.uint8)
            return i, valid, frac, torch.from_numpy(np.ascontiguousarray(out))
        if not valid:
            return i, False, frac, self.preprocess.placeholder()
        if self.stain is not None:
            tile = self.stain(tile)
        return i, True, frac, self.preprocess(tile)


class _StainFn:
    """Picklable tile re-staining with fixed source/target parameters."""

    def __init__(self, normalizer: Any, source: Mapping, target: Mapping):
        self.normalizer, self.source, self.target = normalizer, source, target

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        return self.normalizer.transform(tile, self.source, self.target)


# --------------------------------------------------------------------------------------------
# reference records
# --------------------------------------------------------------------------------------------
def _get_record(reference: Any) -> dict:
    if reference is None:
        return {}
    if isinstance(reference, Mapping) and "encoder" in reference:
        return dict(reference)
    uns = getattr(reference, "uns", None)
    if uns is None and hasattr(reference, "tables"):
        for t in reference.tables.values():
            if RECORD_KEY in t.uns.get(UNS_KEY, {}):
                uns = t.uns
                break
    rec = (uns or {}).get(UNS_KEY, {}).get(RECORD_KEY) if uns is not None else None
    if not rec:
        raise ValueError(
            f"reference has no uns[{UNS_KEY!r}][{RECORD_KEY!r}] record: run "
            "histovi.pp.embed_morphology on the reference first, or pass its record dict"
        )
    return dict(rec)


def _check_same(name: str, given: Any, recorded: Any) -> None:
    if given is None:
        return
    if isinstance(given, float) or isinstance(recorded, float):
        same = recorded is not None and np.isclose(float(given), float(recorded), rtol=1e-9)
    else:
        same = given == recorded
    if not same:
        raise ValueError(
            f"{name}={given!r} differs from the reference embedding ({name}={recorded!r}): a query "
            f"must be embedded with the reference's settings; drop {name}= to reuse them"
        )


# --------------------------------------------------------------------------------------------
# main entry point
# --------------------------------------------------------------------------------------------
@keeps_torch_threads
def embed_morphology(
    data: Any,
    encoder: str | os.PathLike | torch.nn.Module | None = None,
    *,
    tile_size_um: float | None = None,
    target_mpp: float | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    sample_key: str = "sample",
    key_added: str = MORPHOLOGY_KEY,
    n_components: int | None = None,
    stain_normalization: str | None = None,
    num_workers: int = 0,
    transform: Callable | None = None,
    reference: Any = None,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    image_dir: str | os.PathLike | None = None,
    image_key: str | Mapping[str, str] | None = None,
    mpp_fullres: float | Mapping[str, float] | None = None,
    spot_diameter_um: float = 55.0,
    min_tissue_fraction: float | None = None,
    spatial_key: str = "spatial",
    table_key: str = "table",
    seed: int = 0,
    copy: bool = False,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> Any:
    """Embed the H&E tile around every spot with an image encoder.

    The ``tile_size_um``-wide tile centred on each spot is read at the image resolution closest
    to ``target_mpp``, resized to ``round(tile_size_um / target_mpp)`` pixels, optionally
    stain-normalised and encoded; tiles are streamed, section by section (see the module notes).

    Parameters
    ----------
    data
        An :class:`~anndata.AnnData` with ``obsm[spatial_key]`` spot centres in full-resolution
        pixels and either ``uns['spatial'][lib]['images']['hires'|'lowres']`` arrays (scanpy /
        squidpy) or ``uns['spatial'][lib]['image_file']`` files (her2st layout; relative to
        ``image_dir``), where ``lib`` are the values of ``obs[sample_key]``; or a
        :class:`~spatialdata.SpatialData` whose table ``table_key`` annotates shapes/points that
        share a coordinate system with an image (results go into that table).
    encoder
        ``"stain-texture"`` (default; built-in, no weights), a timm model name (``"resnet50"``),
        an ``"hf-hub:org/model"`` id, a path to a weights file (``.pth``/``.safetensors``, with
        the architecture in a ``config.json`` next to it or inside the file) or to an HF-style
        folder, or a :class:`torch.nn.Module` (with ``transform``). With ``reference`` and no
        encoder, the reference's encoder is rebuilt from its record.
    tile_size_um, target_mpp
        Side of the tile in µm (default 112: spot plus context, 224 px at 0.5 µm) and pixel size
        of the tiles in µm (default 0.5 for neural encoders, as pathology foundation models; 1.0
        for ``"stain-texture"``).
    batch_size, num_workers, device, progress
        Tiles per batch; DataLoader worker processes reading tiles; ``"auto"`` (CUDA / MPS when
        available), ``"cpu"``, ``"cuda"``, ...; show a tqdm progress bar.
    sample_key, key_added
        ``obs`` column of each spot's section / library id (``uns['spatial']`` key); ``obsm``
        key of the embedding.
    n_components
        If given, standardise the features and reduce them by PCA (fitted on valid tiles).
    stain_normalization
        ``None``, ``"macenko"`` or ``"reinhard"``. Target stain parameters are fitted on tiles
        of ``data`` (or taken from ``reference``); source parameters per section.
    transform
        Tile transform for a user module (PIL RGB image -> (C, H, W) tensor). timm models use
        their own data config.
    reference
        An AnnData / SpatialData embedded before, or its ``uns['histovi']['morphology']`` record:
        reuse its encoder, tile geometry, stain target and PCA so the query lands in the same
        space. Settings given explicitly that differ from the reference raise ``ValueError``.
    pretrained, checkpoint_path, model_kwargs
        Passed to timm: random weights for tests, a local weights file (no network), extra
        :func:`timm.create_model` arguments.
    image_dir, image_key
        Folder that relative ``image_file`` paths refer to; which image to use (``"hires"``,
        ``"lowres"``, a SpatialData image name or a mapping region -> image name; default: the
        finest one needed for ``target_mpp``).
    mpp_fullres, spot_diameter_um
        µm per full-resolution pixel (or per SpatialData coordinate unit), a number or a mapping
        sample -> number; overrides ``scalefactors['um_per_px_fullres']`` and the estimate from
        the spot diameter in pixels and ``spot_diameter_um`` (55 µm for Visium).
    min_tissue_fraction
        Tiles with a smaller fraction of stained pixels (white glass, black masks, outside the
        image) are invalid: NaN rows and ``obs['morphology_valid'] = False``. Default 0.1.
    spatial_key, table_key
        ``obsm`` key of spot centres (AnnData); table of a SpatialData object.
    seed
        Seed of the tile subset used for stain fitting.
    copy
        Return a modified copy instead of writing into ``data`` (AnnData only).
    checkpoint_dir
        Folder where each section's features are saved as soon as it is done; the same call run
        again after an interruption loads them instead of reading the images again, with the
        result of an uninterrupted run. A folder of other settings or data is refused, naming
        what differs (see the module notes).

    Returns
    -------
    ``None`` (or the AnnData copy with ``copy=True``). Writes into the AnnData (the SpatialData
    table): ``obsm[key_added]`` float32 (n_obs, d), NaN rows for invalid spots;
    ``obs['morphology_valid']`` bool; ``uns['histovi']['morphology']``: encoder name and kind,
    weights SHA-256, tile_size_um, target_mpp, tile_px, min_tissue_fraction, stain normaliser
    (method, target and per-section source parameters), PCA (mean, scale, components), feature
    names and per-section details. Nothing else in ``data`` is changed.
    """
    rec = _get_record(reference)
    _check_arguments(key_added, spatial_key, batch_size, num_workers, stain_normalization)
    check_whole_number(n_components, "n_components", allow_none=True, what="PCA components")
    tiles = _tile_settings(
        rec, encoder, tile_size_um, target_mpp, min_tissue_fraction, stain_normalization
    )
    if rec:
        _check_same("n_components", n_components, _reference_n_components(rec))
    enc = _encoder(
        rec, encoder, tiles, pretrained, checkpoint_path, transform, model_kwargs, device
    )
    adata, sections = _read_sections(
        data,
        copy=copy,
        sample_key=sample_key,
        spatial_key=spatial_key,
        table_key=table_key,
        image_dir=image_dir,
        image_key=image_key,
        mpp_fullres=mpp_fullres,
        spot_diameter_um=spot_diameter_um,
    )
    plans, missing = _plan_sections(sections, tiles, key_added, spatial_key)
    store = _SectionStore.open(checkpoint_dir, enc, tiles, seed)
    stain = _stain_normalisation(plans, tiles, rec, store, seed)
    emb, valid, per_section = _embed_plans(
        adata.n_obs, plans, enc, tiles, stain, store, batch_size, num_workers, progress
    )
    emb, pca_rec = _reduce(emb, valid, rec, n_components)
    _write(adata, key_added, emb, valid, enc, tiles, stain[0], pca_rec, per_section, missing, rec)
    return adata if copy else None


# --------------------------------------------------------------------------------------------
# the steps of embed_morphology
# --------------------------------------------------------------------------------------------
def _check_arguments(key_added, spatial_key, batch_size, num_workers, stain_normalization):
    if key_added == spatial_key:
        raise ValueError(
            f"key_added={key_added!r} is spatial_key: the embedding would replace the spot "
            "coordinates it is cut from; pass another key_added (default 'X_morphology')."
        )
    check_whole_number(batch_size, "batch_size", what="tiles per batch")
    check_whole_number(num_workers, "num_workers", minimum=0, what="DataLoader worker processes")
    if stain_normalization is not None:
        make_normalizer(stain_normalization)  # validates the name


def _reference_n_components(rec: Mapping[str, Any]) -> Any:
    return int(rec["pca"]["n_components"]) if "pca" in rec else "none"


def _tile_settings(
    rec, encoder, tile_size_um, target_mpp, min_tissue_fraction, stain_normalization
) -> dict[str, Any]:
    """The tile geometry, tissue threshold and stain normalisation: the reference's for a query
    (settings given explicitly must equal them), defaults filled in and checked otherwise."""
    if rec:
        norm = rec.get("stain_normalization", "none")
        _check_same("tile_size_um", tile_size_um, rec["tile_size_um"])
        _check_same("target_mpp", target_mpp, rec["target_mpp"])
        _check_same("stain_normalization", stain_normalization, norm)
        _check_same("min_tissue_fraction", min_tissue_fraction, rec["min_tissue_fraction"])
        tile_size_um, target_mpp = float(rec["tile_size_um"]), float(rec["target_mpp"])
        min_tissue_fraction = float(rec["min_tissue_fraction"])
        stain_normalization = None if norm == "none" else norm
    tile_size_um = DEFAULT_TILE_SIZE_UM if tile_size_um is None else float(tile_size_um)
    if not np.isfinite(tile_size_um) or tile_size_um <= 0:
        raise ValueError(f"tile_size_um={tile_size_um!r} must be a positive number of µm")
    min_tissue_fraction = (
        DEFAULT_MIN_TISSUE if min_tissue_fraction is None else float(min_tissue_fraction)
    )
    if not 0 <= min_tissue_fraction <= 1:
        raise ValueError(f"min_tissue_fraction={min_tissue_fraction!r} must lie in [0, 1]")
    if target_mpp is None:
        is_builtin = encoder is None or (isinstance(encoder, str) and encoder == STAIN_TEXTURE)
        target_mpp = 1.0 if is_builtin else 0.5
    target_mpp = float(target_mpp)
    if not np.isfinite(target_mpp) or target_mpp <= 0:
        raise ValueError(f"target_mpp={target_mpp!r} must be a positive number of µm per pixel")
    return {
        "tile_size_um": tile_size_um,
        "target_mpp": target_mpp,
        "tile_px": max(int(round(tile_size_um / target_mpp)), 8),
        "min_tissue_fraction": min_tissue_fraction,
        "stain_normalization": stain_normalization,
    }


def _encoder(rec, encoder, tiles, pretrained, checkpoint_path, transform, model_kwargs, device):
    """The encoder (:func:`resolve_encoder`); for a query, the reference's (rebuilt from its
    record when ``encoder`` is None, checked against it otherwise)."""
    if rec and encoder is None:
        encoder, checkpoint_path = _encoder_from_record(rec, checkpoint_path)
        pretrained = bool(rec.get("pretrained", pretrained))
    enc = resolve_encoder(
        encoder,
        target_mpp=tiles["target_mpp"],
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        transform=transform,
        model_kwargs=model_kwargs,
        device=device,
    )
    if rec:
        _check_encoder(enc, rec)
    return enc


def _check_encoder(enc: Any, rec: Mapping[str, Any]) -> None:
    """A query's encoder must be the reference's: same name, weights and width."""
    _check_same("encoder", enc.name, rec["encoder"])
    if enc.weights_sha256 != rec["weights_sha256"]:
        raise ValueError(
            f"encoder weights (sha256 {enc.weights_sha256[:12]}…) differ from the reference's "
            f"({str(rec['weights_sha256'])[:12]}…): embed the query with the very same weights "
            "(same checkpoint_path / module) as the reference"
        )
    if enc.dim != int(rec["feature_dim"]):
        raise ValueError(
            f"encoder gives {enc.dim} features but the reference has {rec['feature_dim']}"
        )


def _read_sections(data: Any, *, copy: bool, table_key: str, **kwargs: Any):
    """The AnnData written into (the SpatialData table, or ``data`` or its copy) and its
    sections (spots, image sources and the transform between them)."""
    image_key = kwargs.pop("image_key")
    spatial_key, image_dir = kwargs.pop("spatial_key"), kwargs.pop("image_dir")
    if hasattr(data, "tables") and hasattr(data, "images"):
        if copy:
            raise ValueError(
                "copy=True is for AnnData input; a SpatialData table is written in place"
            )
        return spatialdata_sections(data, table_key=table_key, image_key=image_key, **kwargs)
    if hasattr(data, "obsm") and hasattr(data, "uns"):
        adata = data.copy() if copy else data
        sections = anndata_sections(
            adata,
            spatial_key=spatial_key,
            image_dir=image_dir,
            image_key=image_key if isinstance(image_key, str | type(None)) else None,
            **kwargs,
        )
        return adata, sections
    raise ValueError(f"data must be an AnnData or a SpatialData object; got {type(data).__name__}")


def _plan_sections(sections: list[Section], tiles: Mapping[str, Any], key_added, spatial_key):
    """Plans of the sections with an image (a warning names those without; an error when no
    section has one), and the sections without."""
    missing = [s for s in sections if s.missing]
    if missing:
        warnings.warn(
            "no image for sample(s) "
            + ", ".join(f"{s.name!r} ({s.missing})" for s in missing)
            + f": their rows of obsm[{key_added!r}] are NaN; other samples are embedded",
            UserWarning,
            stacklevel=3,
        )
    present = [s for s in sections if not s.missing]
    if not present:
        why = "; ".join(f"{s.name!r}: {s.missing}" for s in missing[:3])
        raise ValueError(
            "no section has a usable image: add uns['spatial'][lib]['images'] or 'image_file' "
            "(with image_dir=), or SpatialData images sharing a coordinate system with the spots"
            + (f" ({why}{'; ...' if len(missing) > 3 else ''})" if why else "")
        )
    plans = [_plan(sec, tiles["target_mpp"], tiles["tile_size_um"]) for sec in present]
    _check_geometry(plans, spatial_key)
    return plans, missing


def _stain_normalisation(plans, tiles, rec, store, seed):
    """The stain record (method, target and per-section source parameters: the reference's
    target for a query, fitted on tiles of every section otherwise) and each section's tile
    re-staining; read from ``store`` when a previous run saved them."""
    method = tiles["stain_normalization"]
    if method is None:
        return {}, {}
    normalizer = make_normalizer(method)
    saved = store.load_stain(plans) if store is not None else None
    if saved is not None:
        target, sources = saved
    else:
        fit_tiles = {}
        for p in plans:
            fit_tiles[p["section"].name] = _sample_tiles(
                p, tiles["tile_px"], tiles["min_tissue_fraction"], seed
            )
            _release(p["source"])
        if rec:
            target = {k: np.asarray(v) for k, v in rec["normalizer"]["target"].items()}
        else:
            pooled = [t for ts in fit_tiles.values() for t in ts]
            target = fit_from_tiles(normalizer, pooled, seed=seed)
        sources = {}
        for name, section_tiles in fit_tiles.items():
            if not section_tiles:
                continue
            try:
                sources[name] = fit_from_tiles(normalizer, section_tiles, seed=seed)
            except ValueError:
                sources[name] = target  # too little stain to fit: leave that section as is
        if store is not None:
            store.save_stain(plans, target, sources)
    stain_fns = {name: _StainFn(normalizer, src, target) for name, src in sources.items()}
    return {"method": method, "target": target, "source": sources}, stain_fns


def _embed_plans(n_obs, plans, enc, tiles, stain, store, batch_size, num_workers, progress):
    """Encoder features (n_obs, dim; NaN rows where no valid tile), validity and per-section
    details, section by section (a section saved in ``store`` is loaded, not embedded).
    ``stain`` is the stain record and each section's re-staining (:func:`_stain_normalisation`)."""
    norm_rec, stain_fns = stain
    emb = np.full((n_obs, enc.dim), np.nan, dtype=np.float32)
    valid = np.zeros(n_obs, dtype=bool)
    total = sum(len(p["section"].rows) for p in plans)
    bar = tqdm(total=total, desc=f"embed_morphology[{enc.name}]", unit="tile", disable=not progress)
    per_section = {}
    for p in plans:
        sec = p["section"]
        done = store.load_section(p, norm_rec) if store is not None else None
        if done is not None:
            emb[sec.rows], valid[sec.rows] = done["embedding"], done["valid"]
            per_section[sec.name] = done["info"]
            bar.update(len(sec.rows))
            continue
        _embed_section(
            p, enc, tiles, stain_fns.get(sec.name), emb, valid, batch_size, num_workers, bar
        )
        per_section[sec.name] = {
            "image": str(getattr(p["source"], "label", "")),
            "level": int(p["source"].level),
            "image_mpp": float(p["mpp"]),
            "mpp_from": sec.info.get("mpp_from", ""),
            "tissue_chroma_threshold": float(p["chroma_threshold"]),
            "n_spots": len(sec.rows),
            "n_valid": int(valid[sec.rows].sum()),
        }
        if store is not None:
            store.save_section(p, norm_rec, emb[sec.rows], valid[sec.rows], per_section[sec.name])
    bar.close()
    # an encoder may return non-finite features on odd tiles: treat them as invalid, never as 0
    bad = valid & ~np.isfinite(emb).all(axis=1)
    if bad.any():
        warnings.warn(
            f"{int(bad.sum())} tiles gave non-finite features; marked invalid", stacklevel=3
        )
        emb[bad], valid[bad] = np.nan, False
    return emb, valid, per_section


def _embed_section(plan, enc, tiles, stain, emb, valid, batch_size, num_workers, bar) -> None:
    """Read, re-stain and encode the tiles of one section into its rows of ``emb``."""
    sec = plan["section"]
    _chroma_threshold(plan)
    ds = _TileDataset(
        plan["source"],
        plan["centres_px"],
        plan["half"],
        tiles["tile_px"],
        tiles["min_tissue_fraction"],
        enc.preprocess,
        stain,
        plan["chroma_threshold"],
    )
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=enc.device.type == "cuda",
        sampler=plan["order"],
    )
    for idx, ok, _frac, x in loader:
        idx, ok = idx.numpy(), ok.numpy().astype(bool)
        if ok.any():
            emb[sec.rows[idx[ok]]] = enc.embed(x[torch.from_numpy(ok)])
        valid[sec.rows[idx[ok]]] = True
        bar.update(len(idx))
    del loader, ds
    _release(plan["source"])  # a decoded JPEG/PNG is not kept past its section


def _reduce(emb, valid, rec, n_components):
    """The reference's PCA (a query), or one fitted on the valid tiles when ``n_components``
    is given; the embedding as it is otherwise."""
    pca_rec: dict[str, Any] | None = None
    if rec and "pca" in rec:
        pca_rec = {k: np.asarray(v) for k, v in rec["pca"].items()}
    elif n_components is not None:
        pca_rec = _fit_pca(emb[valid], n_components)
    if pca_rec is None:
        return emb, None
    out = np.full((len(emb), int(pca_rec["components"].shape[0])), np.nan, np.float32)
    z = (emb[valid] - pca_rec["mean"]) / pca_rec["scale"]
    out[valid] = (z @ pca_rec["components"].T).astype(np.float32)
    return out, pca_rec


class _SectionStore:
    """Finished sections of one embedding run in ``checkpoint_dir`` (``embed_morphology``).

    One ``section_<hash of its name>.npz`` per section: its rows of the embedding (the encoder's
    features, before any PCA), their validity, the per-section record, and what they were
    computed from (``meta``: the encoder and its weights, the tile geometry, the stain
    normalisation, the section's image and spot centres). ``stain.json`` holds the fitted stain
    parameters. Every file is written to a temporary name and renamed, so an interruption
    leaves either the whole file or none.
    """

    @classmethod
    def open(cls, folder, enc: Any, tiles: Mapping[str, Any], seed: int) -> _SectionStore | None:
        """The store in ``folder`` for this encoder, tile geometry and seed (None: no folder)."""
        if folder is None:
            return None
        norm = tiles["stain_normalization"] or "none"
        settings = {**enc.describe(), "feature_dim": enc.dim, **tiles, "stain_normalization": norm}
        return cls(folder, {**settings, "seed": seed})

    def __init__(self, folder: str | os.PathLike, settings: Mapping[str, Any]):
        from pathlib import Path

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings = {k: storable(v, json=True) for k, v in settings.items()}

    # ---------------------------------------------------------------- sections
    def _path(self, name: str):
        import hashlib

        return self.folder / f"section_{hashlib.sha1(name.encode()).hexdigest()[:16]}.npz"

    def _meta(self, plan: Mapping[str, Any], norm_rec: Mapping[str, Any]) -> dict[str, Any]:
        sec, source = plan["section"], plan["source"]
        stain = (norm_rec or {}).get("source", {}).get(sec.name)
        return {
            **self.settings,
            "section": sec.name,
            "n_spots": len(sec.rows),
            "spot_centres_sha256": _digest(np.asarray(plan["centres_px"], np.float64)),
            "image": str(getattr(source, "label", "")),
            "level": int(source.level),
            "stain_source_sha256": _digest(stain) if stain is not None else "none",
            "stain_target_sha256": (
                _digest((norm_rec or {}).get("target")) if norm_rec else "none"
            ),
        }

    def load_section(self, plan, norm_rec) -> dict[str, Any] | None:
        path = self._path(plan["section"].name)
        if not path.exists():
            return None
        try:
            with open_regular(path, "checkpoint file") as fh, np.load(fh, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                out = {
                    "embedding": np.asarray(f["embedding"], np.float32),
                    "valid": np.asarray(f["valid"], bool),
                    "info": json.loads(str(f["info"])),
                }
        except Exception as err:  # noqa: BLE001 - any unreadable file is embedded again
            warnings.warn(
                f"checkpoint {str(path)!r} of section {plan['section'].name!r} cannot be read "
                f"({type(err).__name__}): the section is embedded again",
                UserWarning,
                stacklevel=3,
            )
            return None
        self._compare(meta, self._meta(plan, norm_rec), f"section {plan['section'].name!r}")
        return out

    def save_section(self, plan, norm_rec, embedding, valid, info) -> None:
        meta = self._meta(plan, norm_rec)

        def write(f):
            np.savez(
                f,
                embedding=np.asarray(embedding, np.float32),
                valid=np.asarray(valid, bool),
                meta=np.array(json.dumps(meta)),
                info=np.array(json.dumps(storable(info, json=True))),
            )

        atomic_write(self._path(plan["section"].name), write)

    # ---------------------------------------------------------------- stain parameters
    def _stain_meta(self, plans) -> dict[str, Any]:
        return {
            **self.settings,
            "sections": [
                [
                    p["section"].name,
                    _digest(np.asarray(p["centres_px"], np.float64)),
                    str(getattr(p["source"], "label", "")),
                    int(p["source"].level),
                ]
                for p in plans
            ],
        }

    def load_stain(self, plans):
        path = self.folder / "stain.json"
        if not path.exists():
            return None
        with open_regular(path, "checkpoint file") as fh:  # never a FIFO, which would block
            saved = json.loads(fh.read().decode())
        self._compare(saved["meta"], self._stain_meta(plans), "the stain normalisation")

        def arrays(params):
            return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}

        return arrays(saved["target"]), {k: arrays(v) for k, v in saved["source"].items()}

    def save_stain(self, plans, target, sources) -> None:
        record = {
            "meta": self._stain_meta(plans),
            "target": storable(target, json=True),
            "source": {k: storable(v, json=True) for k, v in sources.items()},
        }
        text = json.dumps(record)
        atomic_write(self.folder / "stain.json", lambda f: f.write(text.encode()))

    def _compare(self, saved: Mapping[str, Any], now: Mapping[str, Any], what: str) -> None:
        now = json.loads(json.dumps(storable(now, json=True)))  # as it reads back from the file
        differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if differ:
            detail = "; ".join(
                f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in differ[:4]
            )
            raise ValueError(
                f"checkpoint_dir {str(self.folder)!r} holds {what} embedded with other settings "
                f"or data ({detail}): pass another checkpoint_dir, or delete that folder to embed "
                "again"
            )


def _digest(value: Any) -> str:
    import hashlib

    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value).tobytes() + str(value.shape).encode()
    else:
        data = json.dumps(storable(value, json=True), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def _encoder_from_record(rec: Mapping[str, Any], checkpoint_path: Any) -> tuple[Any, Any]:
    """The reference's encoder (and weights file) rebuilt from its record: a built-in, timm,
    hub or weights-file encoder; never a user module or a pickled module file."""
    if rec.get("encoder_kind") not in ("builtin", "timm", "hf-hub", "checkpoint"):
        raise ValueError(
            f"the reference was embedded with a user module ({rec.get('encoder')!r}): pass the "
            "same module as encoder= (its weights are checked against the reference's sha256)"
        )
    if rec.get("encoder_kind") != "checkpoint":
        return rec["encoder"], checkpoint_path
    encoder, checkpoint_path = rec["encoder"], rec["checkpoint_path"]
    if str(encoder).startswith("file:"):
        # a whole pickled module: loading it runs code, and its path comes from a data file,
        # not from the user
        raise ValueError(
            f"the reference was embedded with a pickled module file {str(checkpoint_path)!r}, "
            "which histovi does not open from a data file's record (unpickling runs code). If you "
            "trust that file, load it yourself (torch.load(path, weights_only=False)) and pass it "
            "as encoder="
        )
    if not os.path.exists(checkpoint_path):
        raise ValueError(
            f"the reference encoder's weights file {checkpoint_path!r} is gone: pass "
            f"encoder={encoder!r}, checkpoint_path='<same weights>'"
        )
    return encoder, checkpoint_path


#: A section whose spot centres span less than this share of its image's side is suspicious.
_MIN_IMAGE_SPAN = 0.05


def _check_geometry(plans: list[dict[str, Any]], spatial_key: str) -> None:
    """Warn when a section's spots do not lie on its image: most centres outside it, or all of
    them within a sliver of it (a wrong scale factor, or coordinates in another unit)."""
    for p in plans:
        sec, src = p["section"], p["source"]
        h, w = src.shape
        c = p["centres_px"][np.isfinite(p["centres_px"]).all(1)]
        if not len(c):
            continue
        outside = float(((c[:, 0] < 0) | (c[:, 0] >= w) | (c[:, 1] < 0) | (c[:, 1] >= h)).mean())
        where = (
            f"spot centres span x {c[:, 0].min():.0f}..{c[:, 0].max():.0f}, y "
            f"{c[:, 1].min():.0f}..{c[:, 1].max():.0f} on its {w} x {h} px image"
        )
        fix = (
            f"check its scale factor (uns['spatial'][{sec.name!r}]['scalefactors'], "
            f"tissue_hires_scalef) and that obsm[{spatial_key!r}] holds full-resolution pixels"
        )
        if outside > 0.5:
            warnings.warn(
                f"{outside:.0%} of the spots of sample {sec.name!r} lie outside its image "
                f"({where}): {fix}; spots off the image get NaN rows.",
                UserWarning,
                stacklevel=3,
            )
        elif len(c) > 1 and np.ptp(c, axis=0).max() < _MIN_IMAGE_SPAN * max(h, w):
            warnings.warn(
                f"the spots of sample {sec.name!r} cover a patch under {_MIN_IMAGE_SPAN:.0%} of "
                f"its image's side ({where}): {fix}.",
                UserWarning,
                stacklevel=3,
            )


def _plan(sec: Section, target_mpp: float, tile_size_um: float) -> dict[str, Any]:
    """Choose the image level for a section and map its spot centres to that level's pixels."""
    source, mpp = choose_source(sec, target_mpp)
    homog = np.c_[sec.centres, np.ones(len(sec.centres))]
    px0 = (homog @ sec.to_image.T)[:, :2]
    centres_px = px0 / source.factor
    # read rows in raster order: neighbouring tiles share image chunks (TIFF tiles, dask chunks)
    order = np.lexsort((centres_px[:, 0], np.floor(centres_px[:, 1] / 256)))
    return {
        "section": sec,
        "source": source,
        "mpp": mpp,
        "centres_px": centres_px,
        "half": tile_size_um / mpp / 2.0,
        "order": order.tolist(),
        # estimated when the section's tiles are first read (_chroma_threshold): estimating it
        # here would decode every JPEG/PNG of the study before the first one is embedded
        "chroma_threshold": None,
    }


def _chroma_threshold(plan: dict[str, Any]) -> float:
    """The section's glass/tissue chroma threshold, estimated once from its image."""
    if plan["chroma_threshold"] is None:
        plan["chroma_threshold"] = estimate_chroma_threshold(plan["source"])
    return plan["chroma_threshold"]


def _release(source: Any) -> None:
    """Drop a file source's decoded image (it is decoded again if read again)."""
    if hasattr(source, "release"):
        source.release()


def _sample_tiles(plan: Mapping[str, Any], tile_px: int, min_tissue: float, seed: int) -> list:
    """A fixed random subset of valid raw tiles of one section (for stain fitting)."""
    n = len(plan["centres_px"])
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=min(n, 4 * _N_FIT_TILES), replace=False)
    ds = _TileDataset(
        plan["source"],
        plan["centres_px"],
        plan["half"],
        tile_px,
        min_tissue,
        None,
        chroma_threshold=_chroma_threshold(plan),
    )
    tiles = []
    for i in np.sort(idx):
        _, ok, _, t = ds[int(i)]
        if ok:
            tiles.append(t.numpy())
        if len(tiles) >= _N_FIT_TILES:
            break
    return tiles


def _fit_pca(x: np.ndarray, n_components: int) -> dict[str, np.ndarray]:
    """Standardise then PCA (features of the stain-texture encoder have different units)."""
    from sklearn.decomposition import PCA

    if x.shape[0] < 2:
        raise ValueError(
            f"n_components={n_components} needs at least 2 valid tiles; got {x.shape[0]}: "
            "check the images or pass n_components=None"
        )
    k = min(n_components, x.shape[0], x.shape[1])
    if k < n_components:
        warnings.warn(f"n_components reduced from {n_components} to {k} (data size)", stacklevel=3)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    pca = PCA(n_components=k, random_state=0).fit((x - mean) / scale)
    return {
        "n_components": k,
        "mean": mean.astype(np.float64),
        "scale": scale.astype(np.float64),
        "components": pca.components_.astype(np.float64),
        "explained_variance_ratio": pca.explained_variance_ratio_.astype(np.float64),
    }


def _write(adata, key_added, emb, valid, enc, tiles, norm_rec, pca_rec, per_section, missing, rec):
    """The embedding, its validity and the record of how it was made, into ``adata``."""
    for s in missing:
        per_section[s.name] = {"n_spots": len(s.rows), "n_valid": 0, "missing": s.missing}
    adata.obsm[key_added] = emb
    adata.obs[VALID_KEY] = valid
    record = {
        **enc.describe(),
        "feature_dim": enc.dim,
        "feature_names": list(enc.feature_names),
        **tiles,
        "stain_normalization": tiles["stain_normalization"] or "none",
        "normalizer": norm_rec or None,
        "pca": pca_rec,
        "key_added": key_added,
        "sections": per_section,
        "reference_encoder_sha256": rec.get("weights_sha256") if rec else None,
    }
    record_uns(adata, RECORD_KEY, record)
    n_valid = int(valid.sum())
    logger.info("embedded %d / %d spots with %s", n_valid, adata.n_obs, enc.name)
    if n_valid == 0:
        warnings.warn(
            f"no spot got a usable tile: every row of obsm[{key_added!r}] is NaN. Check the "
            "images and their scale factors, or lower min_tissue_fraction "
            f"(now {tiles['min_tissue_fraction']}).",
            UserWarning,
            stacklevel=3,
        )
