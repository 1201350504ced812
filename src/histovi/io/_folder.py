"""Reader of a folder holding one .h5ad and its H&E images (the her2st layout)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._files import check_regular_file, is_within

__all__ = ["read_folder"]


def read_folder(
    path: str | os.PathLike,
    h5ad: str | None = None,
    *,
    load_images: bool = False,
    max_image_size: int | None = None,
    image_files: Mapping[str, str | os.PathLike] | None = None,
) -> Any:
    """Read ``path/<name>.h5ad`` whose ``uns['spatial'][lib]['image_file']`` name images in ``path``.

    Parameters
    ----------
    path
        Folder with exactly one ``.h5ad`` (or name it with ``h5ad=``) and the image files its
        ``uns['spatial'][lib]['image_file']`` entries name, relative to ``path`` (e.g.
        ``images/A1.jpg``). An entry that leads out of the folder (``../``, an absolute path
        elsewhere, a symbolic link pointing out) is refused: a data folder names its own files,
        and one received from someone else must not make histovi read (and draw into a report)
        files elsewhere on your machine.
    h5ad
        File name of the AnnData inside ``path`` when the folder holds several.
    load_images
        Also load each image into ``uns['spatial'][lib]['images']['hires']`` (scanpy/squidpy
        layout; its scale factor is ``tissue_hires_scalef``). Otherwise images stay on disk and
        :func:`histovi.pp.embed_morphology` reads them when needed.
    max_image_size
        With ``load_images``, downsample images whose longer side exceeds this many pixels (the
        scale factor is adjusted).
    image_files
        Image files you name yourself, by library id: they replace those libraries'
        ``image_file`` entries and may lie anywhere.

    Returns
    -------
    AnnData with ``image_file`` entries made absolute (so the object works from any working
    directory) and a warning naming the samples whose image file is missing.
    """
    import anndata as ad

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"read_folder: {str(folder)!r} is not a folder: pass the data directory")
    if h5ad is None:
        files = sorted(folder.glob("*.h5ad"))
        if len(files) != 1:
            raise ValueError(
                f"read_folder: {str(folder)!r} holds {len(files)} .h5ad files "
                f"({[f.name for f in files]}): name the one to read with h5ad="
            )
        file = files[0]
    else:
        file = folder / h5ad
        if not file.exists():
            raise ValueError(f"read_folder: {str(file)!r} does not exist: check h5ad=")
    try:
        check_regular_file(file, "read_folder: the .h5ad")
        adata = ad.read_h5ad(file)
    except Exception as err:  # h5py / anndata raise OSError, KeyError, ... on bad files
        raise ValueError(
            f"read_folder: {str(file)!r} cannot be read as an AnnData ({type(err).__name__}: "
            f"{err}): the file is corrupted, cut short or not an .h5ad"
        ) from err
    contain_image_files(adata, folder, image_files, who="read_folder")
    missing = []
    for lib, entry in (adata.uns.get("spatial", {}) or {}).items():
        if not isinstance(entry, dict) or "image_file" not in entry:
            continue
        img = Path(entry["image_file"])
        if not img.exists():
            missing.append(f"{lib} ({img})")
            continue
        if load_images:
            from ._image_source import open_image

            try:
                im = open_image(img)
                im.load()
            except Exception as err:  # PIL raises several kinds on corrupted files
                missing.append(f"{lib} ({img}: unreadable, {type(err).__name__}: {err})")
                continue
            with im:
                im = im.convert("RGB")
                sf = entry.setdefault("scalefactors", {})
                scalef = float(sf.get("tissue_hires_scalef", 1.0))
                if max_image_size is not None and max(im.size) > max_image_size:
                    from PIL import Image

                    w0 = im.width
                    r = max_image_size / max(im.size)
                    im = im.resize((round(im.width * r), round(im.height * r)), Image.BILINEAR)
                    scalef *= im.width / w0
                entry["images"] = {"hires": np.asarray(im)}
                sf["tissue_hires_scalef"] = scalef
    if missing:
        warnings.warn(
            "read_folder: image files not found or unreadable for "
            + ", ".join(missing)
            + "; these samples will have no morphology",
            UserWarning,
            stacklevel=2,
        )
    return adata


def contain_image_files(
    adata: Any,
    folder: str | os.PathLike,
    image_files: Mapping[str, str | os.PathLike] | None = None,
    who: str = "read_folder",
) -> None:
    """Make every ``uns['spatial'][lib]['image_file']`` of ``adata`` (read from ``folder``) an
    absolute path inside ``folder``; ``ValueError`` naming the library for one that leads out.
    ``image_files`` (given by the user) replace the entries and are not confined."""
    folder = Path(folder).expanduser()
    spatial = adata.uns.get("spatial", {}) or {}
    explicit = {str(k): Path(v).expanduser() for k, v in (image_files or {}).items()}
    unknown = sorted(set(explicit) - {str(k) for k in spatial})
    if unknown:
        raise ValueError(
            f"{who}: image_files names libraries {unknown} that uns['spatial'] does not have "
            f"(libraries: {sorted(map(str, spatial))})"
        )
    for lib, entry in spatial.items():
        if str(lib) in explicit:
            entry["image_file"] = str(explicit[str(lib)].resolve())
            continue
        if not isinstance(entry, dict) or "image_file" not in entry:
            continue
        img = Path(str(entry["image_file"]))
        img = img if img.is_absolute() else folder / img
        if not is_within(img, folder):
            raise ValueError(
                f"{who}: uns['spatial'][{str(lib)!r}]['image_file'] = "
                f"{str(entry['image_file'])!r} leads out of the data folder {str(folder)!r}: a "
                "data folder may only name its own files. Move the image into the folder, or "
                f"name it yourself with image_files={{{str(lib)!r}: '<path>'}}."
            )
        entry["image_file"] = str(img.resolve())
