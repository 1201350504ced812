"""Procedural H&E-like images for simulated sections (so morphology has something to see).

Each spot's neighbourhood (Voronoi cell, up to ``tissue_margin_um`` from the spot) is painted
with the texture of the spot's domain: an eosin (pink) background whose density depends on the
domain, haematoxylin (purple) nuclei whose density, size and elongation depend on the domain,
fibres for stroma-like domains and empty vacuoles for adipose-like domains. Each section gets its
own stain colour shift, stain intensity, scanner brightness and blur (the batch effect of
imaging). Colours are composed in optical density with Ruifrok-Johnston H and E vectors, so
``skimage.color.rgb2hed`` recovers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["draw_he_images", "DOMAIN_TEXTURES"]

_H_VEC = np.array([0.650, 0.704, 0.286])
_E_VEC = np.array([0.072, 0.990, 0.105])

#: Texture archetypes cycled over the domains (in category order): eosin density, nuclei per
#: mm², nucleus radius (µm), elongation (>1 stretched), fibre strength, vacuole density per mm².
DOMAIN_TEXTURES: list[dict[str, float]] = [
    {
        "eosin": 0.35,
        "nuclei": 2600,
        "radius": 4.2,
        "elong": 1.0,
        "fibres": 0.0,
        "vacuoles": 0,
    },  # tumour
    {
        "eosin": 0.85,
        "nuclei": 500,
        "radius": 2.6,
        "elong": 2.8,
        "fibres": 0.6,
        "vacuoles": 0,
    },  # stroma
    {
        "eosin": 0.25,
        "nuclei": 6000,
        "radius": 2.6,
        "elong": 1.0,
        "fibres": 0.0,
        "vacuoles": 0,
    },  # immune
    {
        "eosin": 0.55,
        "nuclei": 120,
        "radius": 3.0,
        "elong": 1.5,
        "fibres": 0.0,
        "vacuoles": 450,
    },  # adipose
    {
        "eosin": 0.55,
        "nuclei": 1400,
        "radius": 3.4,
        "elong": 1.3,
        "fibres": 0.2,
        "vacuoles": 0,
    },  # gland
    {
        "eosin": 0.70,
        "nuclei": 1000,
        "radius": 5.0,
        "elong": 1.0,
        "fibres": 0.0,
        "vacuoles": 25,
    },  # mixed
]


def _texture(i: int, rng: np.random.Generator) -> dict[str, float]:
    if i < len(DOMAIN_TEXTURES):
        return DOMAIN_TEXTURES[i]
    # more domains than archetypes: random but fixed per domain (rng seeded by the caller)
    return {
        "eosin": float(rng.uniform(0.2, 0.9)),
        "nuclei": float(rng.uniform(150, 5000)),
        "radius": float(rng.uniform(2.5, 5.0)),
        "elong": float(rng.uniform(1.0, 2.5)),
        "fibres": float(rng.uniform(0, 0.6)),
        "vacuoles": float(rng.choice([0, 0, 40])),
    }


_KEYWORDS = [
    ("tumo", "cancer", "carcinoma", "invasive"),
    ("strom", "connective", "fibro"),
    ("immune", "lymph", "infiltrat"),
    ("adipo", "fat"),
    ("gland", "duct", "epithel"),
]


def _assign_textures(names: list[str], seed: int) -> list[dict[str, float]]:
    """Texture per domain: by name when it names a tissue (tumour, stroma, immune, adipose,
    gland), otherwise (and for a second domain of the same kind) the next unused archetype,
    then random textures. Depends only on the domain names, so sections share textures."""
    chosen: list[int | None] = [None] * len(names)
    used: set[int] = set()
    for i, name in enumerate(names):
        low = name.lower()
        for k, words in enumerate(_KEYWORDS):
            if k not in used and any(w in low for w in words):
                chosen[i] = k
                used.add(k)
                break
    free = [k for k in range(len(DOMAIN_TEXTURES)) if k not in used]
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(len(names)):
        if chosen[i] is None and free:
            chosen[i] = free.pop(0)
        out.append(
            DOMAIN_TEXTURES[chosen[i]]
            if chosen[i] is not None
            else _texture(len(DOMAIN_TEXTURES), rng)
        )
    return out


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed at ``sigma`` px (drawn coarse and upsampled: fast)."""
    f = max(int(sigma // 2), 1)
    small = (-(-shape[0] // f), -(-shape[1] // f))
    n = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / f)
    if f > 1:
        n = np.repeat(np.repeat(n, f, axis=0), f, axis=1)[: shape[0], : shape[1]]
        n = ndimage.uniform_filter(n, f)  # remove the blockiness of the upsampling
    return n / (n.std() + 1e-8)


def _blobs(
    mask: np.ndarray,
    density_mm2: float,
    radius_px: float,
    elong: float,
    px_um: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Soft blob field (0..1) of randomly placed, randomly oriented ellipses inside ``mask``."""
    area_mm2 = mask.sum() * px_um * px_um / 1e6
    n = rng.poisson(density_mm2 * area_mm2)
    if n == 0:
        return np.zeros(mask.shape, np.float32)
    ys, xs = np.nonzero(mask)
    pick = rng.integers(0, ys.size, n)
    cy, cx = ys[pick], xs[pick]
    # stamps from a small bank of sizes x orientations: the loop below only pastes them
    sizes = radius_px * np.array([0.8, 1.0, 1.25])
    angles = np.linspace(0, np.pi, 6, endpoint=False)
    size_k = rng.integers(0, len(sizes), n)
    ang_k = rng.integers(0, len(angles), n) if elong > 1.05 else np.zeros(n, int)
    ext = int(np.ceil(sizes.max() * np.sqrt(elong))) + 1
    oy, ox = np.mgrid[-ext : ext + 1, -ext : ext + 1].astype(np.float32)
    bank = {}
    for i, r in enumerate(sizes):
        a, b = r * np.sqrt(elong), r / np.sqrt(elong)
        for j, th in enumerate(angles):
            u = (ox * np.cos(th) + oy * np.sin(th)) / a
            v = (-ox * np.sin(th) + oy * np.cos(th)) / b
            bank[i, j] = np.clip(1.5 - 1.5 * (u * u + v * v), 0, 1)  # flat top, soft edge
    h, w = mask.shape
    pad = ext + 1
    canvas = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)  # padding avoids edge clipping
    side = 2 * ext + 1
    for k in range(n):
        y0, x0 = cy[k] + pad - ext, cx[k] + pad - ext
        region = canvas[y0 : y0 + side, x0 : x0 + side]
        np.maximum(region, bank[size_k[k], ang_k[k]], out=region)
    field = canvas[pad : pad + h, pad : pad + w]
    return field


def draw_he_images(
    adata: Any,
    domain_key: str = "domain",
    sample_key: str = "sample",
    seed: int = 0,
    *,
    spatial_key: str = "spatial",
    um_per_px_fullres: float = 1.0,
    hires_um_per_px: float = 2.0,
    spot_diameter_um: float = 55.0,
    tissue_margin_um: float | None = None,
    batch_strength: float = 1.0,
    textures: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Draw an H&E-like RGB uint8 image per section from the spots' domains.

    Parameters
    ----------
    adata
        AnnData with ``obs[domain_key]``, ``obs[sample_key]`` and ``obsm[spatial_key]`` (spot
        centres in full-resolution pixels, origin at the image corner). Not modified.
    domain_key, sample_key
        ``obs`` columns of the domain (texture) and the section (one image each).
    seed
        Seed of all randomness (nuclei placement, per-section stain and scanner effects).
    spatial_key
        ``obsm`` key of spot centres.
    um_per_px_fullres
        µm per full-resolution pixel of ``obsm[spatial_key]`` (the simulator uses 1: 1 px = 1 µm).
    hires_um_per_px
        µm per pixel of the drawn ``"hires"`` image (default 2 µm: nuclei of 5-10 µm are a few
        pixels wide and a 30 × 30-spot section at 100 µm spacing is ~1.6k × 1.6k px, ~8 MB).
        ``tissue_hires_scalef = um_per_px_fullres / hires_um_per_px``.
    spot_diameter_um
        Written as ``spot_diameter_fullres`` (in full-resolution pixels).
    tissue_margin_um
        Tissue extends this far from the nearest spot (default: 0.9 × median spot spacing);
        beyond it is white glass.
    batch_strength
        Scales the per-section stain/scanner variation (0: identical imaging of all sections).
    textures
        Texture of named domains, overriding the choice by name: domain -> dict with the keys of
        :data:`DOMAIN_TEXTURES` (``eosin``, ``nuclei``, ``radius``, ``elong``, ``fibres``,
        ``vacuoles``). Domains not named keep the texture they would get without it.

    Returns
    -------
    A new dict for ``adata.uns['spatial']``: ``{sample: {"images": {"hires": uint8 (h, w, 3)},
    "scalefactors": {"tissue_hires_scalef", "spot_diameter_fullres", "um_per_px_fullres"},
    "metadata": {...}}}``. The image covers full-resolution coordinates from 0 to the largest
    spot coordinate plus the margin.
    """
    for key in (domain_key, sample_key):
        if key not in adata.obs:
            raise KeyError(
                f"adata.obs[{key!r}] not found: pass {'domain_key' if key == domain_key else 'sample_key'}= naming an obs column"
            )
    if spatial_key not in adata.obsm:
        raise KeyError(f"adata.obsm[{spatial_key!r}] not found: pass spatial_key=")
    if hires_um_per_px <= 0 or um_per_px_fullres <= 0:
        raise ValueError("hires_um_per_px and um_per_px_fullres must be positive")
    xy_all = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    if not np.isfinite(xy_all).all() or (xy_all < 0).any():
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must be finite, non-negative pixel coordinates"
        )
    dom = adata.obs[domain_key]
    cats = (
        list(dom.cat.categories)
        if isinstance(dom.dtype, pd.CategoricalDtype)
        else sorted(pd.unique(dom.astype(str)))
    )
    dom_code = pd.Categorical(
        dom.astype(str) if not isinstance(dom.dtype, pd.CategoricalDtype) else dom, categories=cats
    ).codes
    domain_textures = _domain_textures(cats, seed, textures)
    samples = adata.obs[sample_key].astype(str).to_numpy()
    scalef = um_per_px_fullres / hires_um_per_px
    px_um = hires_um_per_px
    out: dict[str, dict[str, Any]] = {}
    for s_idx, sample in enumerate(pd.unique(samples)):
        rng = np.random.default_rng([seed, s_idx, 11])
        rows = np.flatnonzero(samples == sample)
        xy_um = xy_all[rows] * um_per_px_fullres
        img = _draw_section(
            xy_um, dom_code[rows], domain_textures, px_um, tissue_margin_um, batch_strength, rng
        )
        out[str(sample)] = {
            "images": {"hires": img},
            "scalefactors": {
                "tissue_hires_scalef": float(scalef),
                "spot_diameter_fullres": float(spot_diameter_um / um_per_px_fullres),
                "um_per_px_fullres": float(um_per_px_fullres),
            },
            "metadata": {"source": "histovi.datasets.draw_he_images", "seed": int(seed)},
        }
    return out


def _domain_textures(cats, seed: int, textures) -> list[dict[str, float]]:
    """The texture of each domain category: chosen by name (:func:`_assign_textures`), or as
    given in ``textures`` (domain -> dict with exactly the keys of :data:`DOMAIN_TEXTURES`)."""
    domain_textures = _assign_textures([str(c) for c in cats], seed)
    if textures_by_name := dict(textures or {}):
        keys = set(DOMAIN_TEXTURES[0])
        for name, tex in textures_by_name.items():
            if set(tex) != keys:
                raise ValueError(
                    f"textures[{name!r}] must have exactly the keys {sorted(keys)}, "
                    f"got {sorted(tex)}"
                )
        domain_textures = [
            dict(textures_by_name[str(c)]) if str(c) in textures_by_name else t
            for c, t in zip(cats, domain_textures, strict=True)
        ]
    return domain_textures


def _draw_section(
    xy_um, codes, domain_textures, px_um: float, tissue_margin_um, batch_strength: float, rng
) -> np.ndarray:
    """The RGB uint8 image of one section with spots at ``xy_um`` of domain ``codes``: tissue
    around the spots (a ragged edge), each domain's texture of eosin, nuclei, fibres and
    vacuoles, then the section's stain, brightness and focus variation."""
    tree = cKDTree(xy_um)
    if tissue_margin_um is None:
        d, _ = tree.query(xy_um, k=2) if len(xy_um) > 1 else (np.array([[0, 100.0]]), None)
        margin = 0.9 * float(np.median(d[:, 1]))
    else:
        margin = float(tissue_margin_um)
    w = int(np.ceil((xy_um[:, 0].max() + 2 * margin) / px_um))
    h = int(np.ceil((xy_um[:, 1].max() + 2 * margin) / px_um))
    # domain map: nearest spot of each 4 µm cell (Voronoi), upsampled to the image grid
    f = max(int(round(4.0 / px_um)), 1)
    gy, gx = np.mgrid[0 : -(-h // f), 0 : -(-w // f)]
    dist, nn = tree.query(np.c_[(gx.ravel() + 0.5) * f * px_um, (gy.ravel() + 0.5) * f * px_um])
    dist = np.repeat(np.repeat(dist.reshape(gy.shape), f, 0), f, 1)[:h, :w]
    nn = np.repeat(np.repeat(nn.reshape(gy.shape), f, 0), f, 1)[:h, :w]
    # ragged tissue edge: the margin wobbles with smooth noise (never below the hex
    # grid's covering radius, 0.58 x spacing, so no holes open between spots)
    tissue = dist <= margin * (1 + 0.2 * np.tanh(_smooth_noise((h, w), 30 / px_um, rng)))
    pix_dom = np.where(tissue, codes[nn], -1)

    eos = np.zeros((h, w), np.float32)
    hem = np.zeros((h, w), np.float32)
    e_noise = 1 + 0.15 * _smooth_noise((h, w), 8 / px_um, rng)
    for d_idx, t in enumerate(domain_textures):
        m = pix_dom == d_idx
        if not m.any():
            continue
        e_field = t["eosin"] * e_noise[m]
        if t["fibres"] > 0:  # collagen fibres: noise stretched along one (random) axis
            sig = (1.0, 8.0) if rng.random() < 0.5 else (8.0, 1.0)
            fib = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sig)
            e_field = e_field * (1 + t["fibres"] * np.tanh(2 * fib[m] / (fib.std() + 1e-8)))
        if t["vacuoles"] > 0:  # adipocytes: large empty cells, thin eosin membranes
            vac = _blobs(m, t["vacuoles"], 24 / px_um, 1.1, px_um, rng)
            e_field = e_field * (1 - 0.95 * vac[m])
        eos[m] = e_field
        nuc = _blobs(m, t["nuclei"], t["radius"] / px_um, t["elong"], px_um, rng)
        hem[m] = nuc[m] * (1.1 + 0.15 * rng.standard_normal(m.sum()).astype(np.float32))
    # per-section imaging: stain vectors drift, stain amounts and scanner brightness vary
    bs = batch_strength
    h_vec = _H_VEC + bs * rng.normal(0, 0.06, 3)
    e_vec = _E_VEC + bs * rng.normal(0, 0.06, 3)
    h_vec, e_vec = (np.abs(v) / np.linalg.norm(v) for v in (h_vec, e_vec))
    h_amt, e_amt = 1 + bs * rng.normal(0, 0.12, 2)
    od = (hem[..., None] * h_amt * h_vec + eos[..., None] * e_amt * e_vec * 0.6).astype(np.float32)
    rgb = 245.0 * np.exp(-od) * (1 + bs * rng.normal(0, 0.03))
    blur = abs(bs * rng.normal(0.5, 0.3))
    if blur > 0.05:
        rgb = ndimage.gaussian_filter(rgb, (blur, blur, 0))
    rgb += rng.normal(0, 2.0, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)
