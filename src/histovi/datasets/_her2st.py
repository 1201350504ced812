"""The HER2-positive breast cancer study (Andersson et al. 2021, almaan/her2st) in histovi's
folder layout: one ``.h5ad`` plus the H&E images it names (see :func:`histovi.io.read_folder`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: Where the study comes from (cited in the docs and in errors).
HER2ST_SOURCE = (
    "Andersson et al. 2021, Nat Commun 12:6012 (doi:10.1038/s41467-021-26271-2); counts, "
    "spot coordinates, H&E images and pathologist labels in the public repository "
    "https://github.com/almaan/her2st (archived on Zenodo, doi:10.5281/zenodo.4751624)"
)
#: Environment variable naming a local her2st folder.
HER2ST_ENV = "HISTOVI_HER2ST"


def _has_h5ad(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.h5ad"))


def _cache_dir() -> Path:
    import pooch

    return Path(pooch.os_cache("histovi")) / "her2st"


def her2st(
    path: str | os.PathLike | None = None,
    download: bool = False,
    url: str | None = None,
    known_hash: str | None = None,
    load_images: bool = False,
) -> Any:
    """Read the her2st study (patients' sections, H&E images, pathologist labels).

    The folder holds one ``.h5ad`` (raw counts, ``obs['sample']``, ``obs['patient']``,
    ``obs['label']`` on the labelled sections, ``obsm['spatial']`` in full-resolution pixels,
    ``uns['spatial'][sample]['image_file']``) and an ``images/`` folder. It is found, in order,
    at ``path``, at ``$HISTOVI_HER2ST``, and in the download cache
    (``pooch.os_cache('histovi')/her2st``).

    Parameters
    ----------
    path
        Local folder. Nothing is downloaded when it holds the ``.h5ad``.
    download
        When no local copy is found, fetch the archive ``url`` into the cache with
        :func:`pooch.retrieve`, check its SHA-256 against ``known_hash``, unpack it (``.zip`` or
        ``.tar.gz``) and read it. Off by default: histovi never downloads unless asked.
    url, known_hash
        Archive of the folder layout above (e.g. one your lab hosts, built from the public
        repository) and its ``"sha256:..."`` hash. Both are required with ``download=True`` so
        that what is read is exactly what was checked.
    load_images
        Load the images into ``uns['spatial'][sample]['images']['hires']`` (see
        :func:`histovi.io.read_folder`); by default they are read from disk when needed.

    Returns
    -------
    AnnData from :func:`histovi.io.read_folder` (image paths made absolute).

    Examples
    --------
    >>> adata = histovi.datasets.her2st("../shared/data/her2st")  # doctest: +SKIP
    """
    from ..io import read_folder

    candidates = []
    if path is not None:
        candidates.append(Path(path).expanduser())
    if os.environ.get(HER2ST_ENV):
        candidates.append(Path(os.environ[HER2ST_ENV]).expanduser())
    cache = _cache_dir()
    candidates.append(cache)
    for folder in candidates:
        if _has_h5ad(folder):
            return read_folder(folder, load_images=load_images)
        # an unpacked archive may hold the layout one level down
        inner = [d for d in folder.glob("*") if _has_h5ad(d)] if folder.is_dir() else []
        if len(inner) == 1:
            return read_folder(inner[0], load_images=load_images)

    if not download:
        where = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(
            f"her2st data not found (looked in: {where}): pass path= to a folder with the .h5ad "
            f"and images/, set ${HER2ST_ENV}, or use download=True with url= and known_hash=. "
            f"Source: {HER2ST_SOURCE}."
        )
    if not url or not known_hash:
        raise ValueError(
            "download=True needs url= (an archive of the her2st folder layout) and known_hash= "
            "('sha256:...') so that the download is checked; histovi does not fetch unverified "
            "files."
        )
    import pooch

    processor = (
        pooch.Unzip(extract_dir=".") if url.endswith(".zip") else pooch.Untar(extract_dir=".")
    )
    pooch.retrieve(url, known_hash=known_hash, path=cache, processor=processor, progressbar=True)
    return her2st(path=cache, download=False, load_images=load_images)
