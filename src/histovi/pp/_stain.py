"""Stain normalisation of H&E tiles (Macenko and Reinhard), compact numpy implementations.

Both normalisers work in two steps so that a query can be normalised exactly like a reference:

- the *target* parameters are fitted once on tiles of the reference data and recorded in
  ``adata.uns['histovi']['morphology']['normalizer']``;
- the *source* parameters are fitted per section (sample) on a subset of its tiles, because a
  section is stained and scanned as one unit: per-tile estimates are noisy on tiles with little
  haematoxylin or eosin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "estimate_chroma_threshold",
    "make_normalizer",
    "tissue_mask",
]

#: Minimum RGB chroma (max - min over channels, 0..255) of a pixel counted as tissue.
TISSUE_CHROMA = 15
#: Pixels darker than this (max over channels) are masked background (e.g. black masks), not tissue.
TISSUE_MIN_BRIGHTNESS = 30


def tissue_mask(tile: np.ndarray, chroma_threshold: float = TISSUE_CHROMA) -> np.ndarray:
    """Boolean mask of stained pixels: coloured (chroma >= threshold) and not black.

    White glass and black masked background both have near-zero chroma, so chroma separates
    them from eosin/haematoxylin stained tissue regardless of brightness.
    """
    t = tile.astype(np.int16)
    mx = t.max(axis=-1)
    chroma = mx - t.min(axis=-1)
    return (chroma >= chroma_threshold) & (mx >= TISSUE_MIN_BRIGHTNESS)


def estimate_chroma_threshold(source, n: int = 16, patch: int = 16, upper: float = 35.0) -> float:
    """Per-image chroma threshold separating glass from tissue (Otsu on patches of the image).

    Scanned glass is often tinted (her2st B4: chroma ~16), so a fixed threshold calls it tissue.
    ``n`` x ``n`` small patches spread over the image are enough for Otsu and cheap to read
    from tiled/pyramidal images. Clipped to [TISSUE_CHROMA, upper] so that an image covered by
    tissue does not get a threshold inside the tissue's own range.
    """
    from skimage.filters import threshold_otsu

    h, w = source.shape
    ps = int(min(patch, h, w))
    pix = []
    for y in np.linspace(0, h - ps, n).astype(int):
        for x in np.linspace(0, w - ps, n).astype(int):
            pix.append(source.read(y, y + ps, x, x + ps).reshape(-1, 3))
    p = np.concatenate(pix).astype(np.int16)
    p = p[p.max(axis=1) >= TISSUE_MIN_BRIGHTNESS]  # black masks are not glass
    if p.shape[0] < 100:
        return float(TISSUE_CHROMA)
    chroma = p.max(axis=1) - p.min(axis=1)
    if np.ptp(chroma) < 2:
        return float(TISSUE_CHROMA)
    return float(np.clip(threshold_otsu(chroma), TISSUE_CHROMA, upper))


def _stack_tissue_pixels(tiles: Sequence[np.ndarray], max_pixels: int, seed: int) -> np.ndarray:
    pix = [t.reshape(-1, 3)[tissue_mask(t).ravel()] for t in tiles]
    pix = np.concatenate(pix, axis=0) if pix else np.zeros((0, 3), np.uint8)
    if pix.shape[0] > max_pixels:
        idx = np.random.default_rng(seed).choice(pix.shape[0], max_pixels, replace=False)
        pix = pix[idx]
    return pix


class MacenkoNormalizer:
    """Macenko et al. (2009) stain normalisation.

    Optical densities ``OD = -log((I + 1) / Io)`` are projected on the plane of their two main
    eigenvectors; the extreme angles (``alpha`` and ``100 - alpha`` percentiles) give the H and E
    stain vectors. Concentrations are rescaled so that their 99th percentile matches the target.
    ``beta`` (minimum OD in every channel) is lower than the paper's 0.15 and ``io`` higher than
    240 because pale, thin sections otherwise leave almost only nuclei to estimate eosin from.
    """

    name = "macenko"

    def __init__(self, io: float = 250.0, alpha: float = 1.0, beta: float = 0.05):
        self.io, self.alpha, self.beta = float(io), float(alpha), float(beta)

    def _od(self, pix: np.ndarray) -> np.ndarray:
        return -np.log((pix.astype(np.float64) + 1.0) / self.io)

    def fit_params(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Stain matrix (2 x 3, rows H then E) and 99th-percentile concentrations of ``pixels``."""
        od = self._od(pixels)
        od = od[np.all(od > self.beta, axis=1)]
        if od.shape[0] < 50:
            raise ValueError(
                "Macenko stain normalisation found fewer than 50 stained pixels in the tiles: "
                "check that spots lie on tissue or pass stain_normalization=None"
            )
        _, vecs = np.linalg.eigh(np.cov(od.T))
        plane = vecs[:, 1:3]  # two largest eigenvectors
        proj = od @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, [self.alpha, 100 - self.alpha])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        # haematoxylin absorbs more red than eosin does: put it first
        he = np.array([v1, v2]) if v1[0] > v2[0] else np.array([v2, v1])
        he = he * np.sign(he.sum(axis=1, keepdims=True))
        he /= np.linalg.norm(he, axis=1, keepdims=True)
        conc = np.linalg.lstsq(he.T, od.T, rcond=None)[0]
        max_c = np.percentile(conc, 99, axis=1)
        return {"stain_matrix": he.astype(np.float64), "max_conc": max_c.astype(np.float64)}

    def transform(
        self, tile: np.ndarray, source: Mapping[str, Any], target: Mapping[str, Any]
    ) -> np.ndarray:
        """Re-stain ``tile`` (uint8 RGB) from the ``source`` stain parameters to ``target``'s."""
        h, w, _ = tile.shape
        od = self._od(tile.reshape(-1, 3))
        he_s = np.asarray(source["stain_matrix"])
        conc = np.linalg.lstsq(he_s.T, od.T, rcond=None)[0]
        conc *= (np.asarray(target["max_conc"]) / np.asarray(source["max_conc"]))[:, None]
        out = self.io * np.exp(-(np.asarray(target["stain_matrix"]).T @ conc))
        out = np.clip(out.T, 0, 255).reshape(h, w, 3).astype(np.uint8)
        # keep background (unstained) pixels untouched so the tissue mask is unaffected
        bg = ~tissue_mask(tile)
        out[bg] = tile[bg]
        return out


class ReinhardNormalizer:
    """Reinhard et al. (2001) colour transfer: match per-channel mean/std in CIE-Lab space."""

    name = "reinhard"

    def fit_params(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Lab mean and standard deviation of the stained ``pixels`` (n x 3 uint8)."""
        from skimage.color import rgb2lab

        if pixels.shape[0] < 50:
            raise ValueError(
                "Reinhard stain normalisation found fewer than 50 stained pixels in the tiles: "
                "check that spots lie on tissue or pass stain_normalization=None"
            )
        lab = rgb2lab(pixels.reshape(-1, 1, 3)).reshape(-1, 3)
        return {"mean": lab.mean(axis=0), "std": np.maximum(lab.std(axis=0), 1e-6)}

    def transform(
        self, tile: np.ndarray, source: Mapping[str, Any], target: Mapping[str, Any]
    ) -> np.ndarray:
        """Map ``tile``'s Lab statistics from ``source`` to ``target`` (stained pixels only)."""
        from skimage.color import lab2rgb, rgb2lab

        mask = tissue_mask(tile)
        out = tile.copy()
        if not mask.any():
            return out
        lab = rgb2lab(tile[mask].reshape(-1, 1, 3)).reshape(-1, 3)
        lab = (lab - np.asarray(source["mean"])) / np.asarray(source["std"])
        lab = lab * np.asarray(target["std"]) + np.asarray(target["mean"])
        rgb = lab2rgb(lab.reshape(-1, 1, 3)).reshape(-1, 3)
        out[mask] = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
        return out


def make_normalizer(method: str) -> MacenkoNormalizer | ReinhardNormalizer:
    """Return the normaliser for ``method`` ('macenko' or 'reinhard')."""
    if method == "macenko":
        return MacenkoNormalizer()
    if method == "reinhard":
        return ReinhardNormalizer()
    raise ValueError(
        f"stain_normalization={method!r} is not supported: use None, 'macenko' or 'reinhard'"
    )


def fit_from_tiles(
    normalizer: MacenkoNormalizer | ReinhardNormalizer,
    tiles: Sequence[np.ndarray],
    max_pixels: int = 200_000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Fit stain parameters on the stained pixels of ``tiles`` (subsampled for speed)."""
    return normalizer.fit_params(_stack_tissue_pixels(tiles, max_pixels, seed))
