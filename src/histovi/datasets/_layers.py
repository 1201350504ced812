"""A seeded layered-tissue (cortex-like) simulator: domains carried by depth and neighbourhood.

Each section is a piece of cortex: seven laminar domains (``L1`` … ``L6`` and white matter
``WM``) stacked along a cortical depth ``d`` in [0, 1] that follows a curved axis (bands bounded
by gently arc-shaped boundaries, rotated at random per section, so absolute position does not
identify a layer across sections). Some sections cover only part of the depth range (no L1, or
little white matter), as real sections do.

================== ================================= ======================================
view               what it holds                     how strongly
================== ================================= ======================================
expression         smooth depth programmes (most     gradual: neighbouring layers differ
                   genes) + weak layer markers       little; one spot is hard to classify,
                                                     its neighbourhood helps
morphology         cell density, soma size, myelin   weak (``morphology_signal`` 0.5 vs unit
                   as smooth functions of depth      spot noise) and strongly section-shifted
================== ================================= ======================================

Donors differ by gene-wise log-fold shifts and slightly different layer thicknesses, sections by
smaller shifts and library size, and each section's morphology embedding by its own stain/scanner
scale and shift. The per-section steps (neighbour mixing, negative-binomial counts, morphology
noise and stain effect, AnnData layout, images) are those of :func:`histovi.datasets.simulate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from anndata import AnnData

from ._simulate import (
    _attach_images,
    _check_grid,
    _fm_view,
    _hex_grid,
    _mix_with_ring,
    _neighbour_ring,
    _section_counts,
    _section_morphology,
    _Study,
)

LAYERS = ("L1", "L2", "L3", "L4", "L5", "L6", "WM")
#: Share of the depth range [0, 1] of each layer (L1 thin, L3 and L5 thick, WM thick-ish).
LAYER_THICKNESS = (0.08, 0.08, 0.20, 0.08, 0.18, 0.16, 0.22)

# Morphology features at the middle of each layer (interpolated linearly in depth between
# layer centres, so they change smoothly): cell density, soma size and myelin.
_DENSITY = (0.2, 1.0, 0.6, 1.0, 0.5, 0.7, 0.25)
_SOMA = (0.2, 0.3, 0.7, 0.3, 1.0, 0.5, 0.1)
_MYELIN = (0.0, 0.0, 0.05, 0.1, 0.2, 0.4, 1.0)

#: H&E textures of the layers for :func:`~histovi.datasets._images.draw_he_images`: a cell-poor
#: L1, dense small nuclei in L2 and L4, large pyramidal somata in L3 and L5, fusiform cells in L6
#: and a paler, fibrous white matter with rows of small oligodendrocyte nuclei.
LAYER_TEXTURES: dict[str, dict[str, float]] = {
    "L1": {
        "eosin": 0.55,
        "nuclei": 500,
        "radius": 2.8,
        "elong": 1.2,
        "fibres": 0.15,
        "vacuoles": 0,
    },
    "L2": {
        "eosin": 0.45,
        "nuclei": 4200,
        "radius": 2.8,
        "elong": 1.0,
        "fibres": 0.0,
        "vacuoles": 0,
    },
    "L3": {
        "eosin": 0.50,
        "nuclei": 1900,
        "radius": 3.8,
        "elong": 1.3,
        "fibres": 0.0,
        "vacuoles": 0,
    },
    "L4": {
        "eosin": 0.45,
        "nuclei": 4500,
        "radius": 2.7,
        "elong": 1.0,
        "fibres": 0.0,
        "vacuoles": 0,
    },
    "L5": {
        "eosin": 0.50,
        "nuclei": 1400,
        "radius": 4.6,
        "elong": 1.4,
        "fibres": 0.0,
        "vacuoles": 0,
    },
    "L6": {
        "eosin": 0.50,
        "nuclei": 2600,
        "radius": 3.2,
        "elong": 1.6,
        "fibres": 0.0,
        "vacuoles": 0,
    },
    "WM": {
        "eosin": 0.30,
        "nuclei": 1100,
        "radius": 2.5,
        "elong": 2.2,
        "fibres": 0.35,
        "vacuoles": 0,
    },
}


def _layer_bounds(thickness: np.ndarray) -> np.ndarray:
    """Depths of the 6 boundaries between the 7 layers."""
    return np.cumsum(thickness)[:-1]


def _depth_profile(d: np.ndarray, bounds: np.ndarray, values: Sequence[float]) -> np.ndarray:
    """A per-layer value interpolated linearly in depth between the layers' middles."""
    edges = np.r_[0.0, bounds, 1.0]
    mids = (edges[:-1] + edges[1:]) / 2
    return np.interp(d, mids, values)


def _section_depth(
    xy: np.ndarray, d_range: tuple[float, float], curvature: float, rng: np.random.Generator
) -> np.ndarray:
    """Cortical depth of every spot of one section (below 0: beyond the pial surface).

    Depth runs along a random direction; iso-depth lines are circular arcs (radius
    ``extent / curvature``, centre on a random side) with a slight wobble, and depth is scaled
    so the section spans ``d_range``.
    """
    rel = xy - xy.mean(0)
    extent = float(np.ptp(xy, 0).max())
    theta = rng.uniform(0, 2 * np.pi)
    axis = np.array([np.cos(theta), np.sin(theta)])
    t = rel @ axis
    u = rel @ np.array([-axis[1], axis[0]])
    k = curvature * rng.uniform(0.5, 1.5)
    side = rng.choice([-1.0, 1.0])  # gyral crown (concave towards WM) or sulcal fundus
    if k > 1e-6:
        radius = extent / k
        centre = side * radius * axis
        s = side * (radius - np.linalg.norm(rel - centre, axis=1))
    else:
        s = t
    wobble = (
        0.015
        * extent
        * np.sin(2 * np.pi * u / extent * rng.uniform(0.5, 1.2) + rng.uniform(0, 2 * np.pi))
    )
    s = s + wobble
    d_lo, d_hi = d_range
    return d_lo + (s - s.min()) / np.ptp(s) * (d_hi - d_lo)


def simulate_layers(
    n_patients: int = 3,
    n_sections_per_patient: int | Sequence[int] = (4, 2, 2),
    grid_size: tuple[int, int] = (28, 28),
    n_genes: int = 600,
    n_depth_programmes: int = 6,
    depth_effect: float = 0.2,
    n_markers: int = 10,
    marker_lfc: float = 0.5,
    layer_thickness: Sequence[float] = LAYER_THICKNESS,
    curvature: float = 0.8,
    partial_sections: float = 0.3,
    patient_effect: float = 0.5,
    section_effect: float = 0.2,
    library_size: float = 1500.0,
    dispersion: float = 5.0,
    spot_mixing: float = 0.2,
    morphology_dim: int = 32,
    morphology_signal: float = 0.5,
    morphology_batch_effect: float = 1.5,
    morphology_scale_effect: float = 0.3,
    sections_without_image: int = 0,
    with_images: bool = False,
    expression_embedding_dim: int = 0,
    seed: int = 0,
) -> AnnData:
    """Simulate a multi-donor study of layered (cortex-like) tissue.

    Domain identity is carried mostly by position and neighbourhood: expression changes
    gradually with cortical depth, layer markers are weak, and the morphology embedding is a
    weak, strongly section-shifted view present on every section. The layout of the returned
    AnnData is that of :func:`histovi.datasets.simulate`.

    Parameters
    ----------
    n_patients, n_sections_per_patient
        Donors and sections per donor: one number for every donor, or one per donor (default: 3
        donors with 4, 2 and 2 sections). Every section is its own sample (``obs['sample']``,
        e.g. ``"P1_S2"``).
    grid_size
        Rows and columns of the Visium-like hexagonal grid of each section (100 µm spacing);
        spots beyond the pial surface are left out, so sections have up to this many spots.
    n_genes, n_depth_programmes, depth_effect
        Genes simulated; smooth depth programmes (Gaussian bumps evenly spaced over depth [0, 1],
        sd 0.5 / (n - 1)), and the sd of each gene's loading on each programme: every gene's
        log-rate is a smooth random function of depth (plus a baseline, sd 1).
    n_markers, marker_lfc
        Marker genes per layer and their log-fold change in that layer only (×0.7-1.3 per gene):
        small, so that one spot is hard to classify.
    layer_thickness
        Share of the depth range of each of the 7 layers (normalised to sum to 1); each donor's
        thicknesses vary ×/÷ 1.1.
    curvature
        Section extent / radius of the arcs bounding the layers (0: straight bands); each section
        draws ×0.5-1.5 of it, on a random side, along a random direction.
    partial_sections
        Probability that a section (other than a donor's first, which covers the whole depth
        range) covers only part of it: it starts below L1 or stops just inside the white matter.
    patient_effect, section_effect
        Standard deviation of gene-wise log-fold shifts per donor and per section.
    library_size, dispersion
        Mean UMI count per spot (varies ×/÷ 1.35 per section and ×/÷ 1.28 per spot) and
        negative-binomial inverse dispersion.
    spot_mixing
        Fraction of a spot's expression that comes from its ring of neighbours.
    morphology_dim, morphology_signal, morphology_batch_effect, morphology_scale_effect
        Width of the morphology embedding (``obsm['X_morphology']``); the strength of its depth
        signal against unit spot noise per dimension (three features, cell density, soma size
        and myelin, each in [0, 1] and changing smoothly with depth, along orthogonal directions
        of root-mean-square ``morphology_signal`` per dimension: the convention of
        :func:`~histovi.datasets.simulate`); each section's stain/scanner effect: a scale
        ``exp(N(0, morphology_scale_effect))`` and a shift of sd ``morphology_batch_effect`` per
        dimension.
    sections_without_image
        Number of sections (the last ones) whose morphology is missing (NaN rows; default: none).
    with_images
        Also draw an H&E-like image per section (``uns['spatial'][sample]['images']['hires']``,
        textures :data:`LAYER_TEXTURES`, a stain/scanner shift per section).
    expression_embedding_dim
        When positive, also simulate an expression foundation-model embedding (``obsm['X_fm']``,
        this width): a fixed random projection (sd 1) of the spot's depth programmes and of its
        layer indicator times ``marker_lfc``, both mixed with the neighbours like the counts, a
        donor shift (sd 0.5) and unit spot noise. Drawn from its own random stream, so the rest of
        the data is the same with or without it.
    seed
        Seed of every random draw: the same seed gives the same data.

    Returns
    -------
    AnnData with raw counts in ``X`` and ``layers['counts']``; ``obs`` columns ``sample``,
    ``patient``, ``domain`` (ground-truth layer) and ``depth`` (cortical depth in [0, 1]);
    ``obsm['spatial']`` (µm, equal to full-resolution pixels) and ``obsm['X_morphology']``;
    ``var['marker_of']`` (the layer a gene marks, or ``"none"``);
    ``uns['spatial'][sample]['scalefactors']``.
    """
    sections = _sections_per_donor(n_patients, n_sections_per_patient)
    thickness = _check_layers(
        grid_size, n_genes, n_markers, n_depth_programmes, layer_thickness, partial_sections
    )
    n_layers = len(LAYERS)
    rng = np.random.default_rng(seed)
    cortex = _Cortex(
        rng, n_genes, n_depth_programmes, depth_effect, n_markers, marker_lfc, morphology_dim
    )
    fm_rng = np.random.default_rng([seed, 7])
    fm_dim = int(expression_embedding_dim)
    fm_proj = fm_rng.normal(0, 1.0, (n_depth_programmes + n_layers, max(fm_dim, 1)))

    grid = _hex_grid(*grid_size)
    study = _Study(sum(sections), sections_without_image)
    for p, n_sec in enumerate(sections):
        patient = f"P{p + 1}"
        donor_thickness = thickness * np.exp(rng.normal(0, 0.1, n_layers))
        bounds = _layer_bounds(donor_thickness / donor_thickness.sum())
        patient_shift = rng.normal(0, patient_effect, n_genes)
        fm_patient_shift = fm_rng.normal(0, 0.5, max(fm_dim, 1))
        for s in range(n_sec):
            xy, depth = _section_spots(grid, s, bounds, partial_sections, curvature, rng)
            layer = np.searchsorted(bounds, depth, side="right")
            ring = _neighbour_ring(xy)
            # Expression: smooth depth profiles + weak markers, mixed with the ring of neighbours.
            phi = cortex.programmes(depth)
            rates = cortex.rates(phi, layer)
            if spot_mixing > 0:
                rates = _mix_with_ring(rates, ring, spot_mixing)
            fm = None
            if fm_dim:
                feats = np.hstack([phi, marker_lfc * np.eye(n_layers)[layer]])
                fm = _fm_view(feats, ring, spot_mixing, fm_proj, fm_patient_shift, fm_rng)
            counts = _section_counts(
                rates, patient_shift, section_effect, library_size, dispersion, rng
            )
            # Morphology: weak depth features + spot noise, then the section's stain effect.
            m = _section_morphology(
                cortex.morphology(depth, bounds, morphology_signal),
                morphology_batch_effect,
                morphology_scale_effect,
                rng,
            )
            columns = {"domain": np.asarray(LAYERS, dtype=object)[layer], "depth": depth}
            study.add(f"{patient}_S{s + 1}", patient, columns, counts, m, xy, rng, fm)

    record = {"simulator": "simulate_layers", "seed": seed, "layers": list(LAYERS)}
    record["layer_thickness"] = thickness.tolist()
    adata = study.assemble(LAYERS, n_genes, cortex.markers, LAYERS, record)
    if with_images:
        _attach_images(adata, study.without_image, seed, textures=LAYER_TEXTURES)
    return adata


def _sections_per_donor(n_patients, n_sections_per_patient) -> list[int]:
    if n_patients < 1:
        raise ValueError("n_patients must be at least 1.")
    if isinstance(n_sections_per_patient, (int, np.integer)):
        sections = [int(n_sections_per_patient)] * n_patients
    else:
        sections = [int(s) for s in n_sections_per_patient]
        if len(sections) != n_patients:
            raise ValueError(
                f"n_sections_per_patient={tuple(n_sections_per_patient)} names {len(sections)} "
                f"donors but n_patients={n_patients}: give one number per donor."
            )
    if min(sections) < 1:
        raise ValueError("n_sections_per_patient must be at least 1 for every donor.")
    return sections


def _check_layers(
    grid_size, n_genes, n_markers, n_depth_programmes, layer_thickness, partial_sections
) -> np.ndarray:
    """The layer thicknesses (normalised to sum to 1), after checking the study's layout."""
    _check_grid(grid_size)
    n_layers = len(LAYERS)
    if n_genes < 2 * n_layers * n_markers:
        raise ValueError(
            f"n_genes={n_genes} must be at least 2 * 7 * n_markers ({2 * n_layers * n_markers})."
        )
    if n_depth_programmes < 2:
        raise ValueError(f"n_depth_programmes={n_depth_programmes} must be at least 2.")
    thickness = np.asarray(layer_thickness, dtype=float)
    if thickness.shape != (n_layers,) or not (thickness > 0).all():
        raise ValueError(
            f"layer_thickness needs {n_layers} positive numbers, got {layer_thickness}."
        )
    if not 0 <= partial_sections <= 1:
        raise ValueError(f"partial_sections={partial_sections} must be a probability.")
    return thickness / thickness.sum()


class _Cortex:
    """What depth does to a spot of a layered study: its genes' log-rates (a baseline, smooth
    depth profiles of Gaussian bumps over depth and weak layer markers) and its morphology
    (three depth features along orthogonal directions of the embedding, each of root-mean-square
    1 per dimension, as simulate()'s class means have sd 1 per dimension before the signal)."""

    def __init__(
        self, rng, n_genes, n_depth_programmes, depth_effect, n_markers, marker_lfc, morph_dim
    ):
        n_layers = len(LAYERS)
        self.baseline = rng.normal(0, 1.0, n_genes)
        self.centres = np.linspace(0, 1, n_depth_programmes)
        self.width = 0.5 / (n_depth_programmes - 1)
        self.loadings = rng.normal(0, depth_effect, (n_genes, n_depth_programmes))
        self.markers = rng.permutation(n_genes)[: n_layers * n_markers].reshape(n_layers, n_markers)
        self.marker_lfcs = np.zeros((n_layers, n_genes))
        for layer in range(n_layers):
            self.marker_lfcs[layer, self.markers[layer]] = marker_lfc * rng.uniform(
                0.7, 1.3, n_markers
            )
        q = np.linalg.qr(rng.normal(size=(max(morph_dim, 3), 3)))[0].T[:, :morph_dim]
        self.directions = q * np.sqrt(morph_dim)

    def programmes(self, depth: np.ndarray) -> np.ndarray:
        return np.exp(-((depth[:, None] - self.centres) ** 2) / (2 * self.width**2))

    def rates(self, phi: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """Relative expression rates of spots with depth programmes ``phi`` in ``layer``."""
        log_rates = self.baseline + phi @ self.loadings.T + self.marker_lfcs[layer]
        rates = np.exp(log_rates - log_rates.max(1, keepdims=True))
        return rates / rates.sum(1, keepdims=True)

    def morphology(self, depth: np.ndarray, bounds: np.ndarray, signal: float) -> np.ndarray:
        """Mean morphology embedding of spots at ``depth`` (cell density, soma size, myelin)."""
        feats = np.column_stack(
            [_depth_profile(depth, bounds, v) for v in (_DENSITY, _SOMA, _MYELIN)]
        )
        return signal * feats @ self.directions


def _section_spots(grid, s: int, bounds, partial_sections: float, curvature: float, rng):
    """The spots of a donor's section ``s`` (those of ``grid`` below the pial surface) and
    their depth in [0, 1]: the section spans the whole cortex (a little pia cut off), or (not
    the donor's first) part of it, starting below L1 or stopping just inside the white matter."""
    d_range = (rng.uniform(-0.06, 0.0), rng.uniform(0.95, 1.1))
    kind = rng.random()
    if s > 0 and kind < partial_sections / 2:  # starts below L1
        d_range = (bounds[0] + rng.uniform(0.01, 0.04), d_range[1])
    elif s > 0 and kind < partial_sections:  # stops just inside the white matter
        d_range = (d_range[0], bounds[-1] + rng.uniform(0.02, 0.06))
    depth = _section_depth(grid, d_range, curvature, rng)
    keep = depth >= 0
    return grid[keep], np.clip(depth[keep], 0.0, 1.0)
