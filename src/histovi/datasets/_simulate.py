"""A seeded multi-patient simulator of spatial transcriptomics: histovi's built-in default data.

The simulated tissue is built so that each view of a spot has something to add:

================== ================= ================= ===================================
domain             expression        morphology        what separates it
================== ================= ================= ===================================
tumour             own programme     own               expression
stroma_adjacent    stroma            stroma            neighbourhood only (next to tumour)
stroma_distal      stroma            stroma            neighbourhood only (far from tumour)
immune             own programme     own               expression
gland              gland             gland             morphology only
gland_in_situ      gland             atypical gland    morphology only
adipose            own programme     own               expression
================== ================= ================= ===================================

Patients differ by gene-wise log-fold shifts (the patient effect that makes naive pooling cluster
by patient), sections by smaller shifts and library size, and each section's morphology
embedding by its own stain/scanner shift. Some domains are absent in some patients.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

DOMAINS = (
    "tumour",
    "stroma_adjacent",
    "stroma_distal",
    "immune",
    "gland",
    "gland_in_situ",
    "adipose",
)
# Which expression programme and which morphology class each domain uses (see module table).
_EXPRESSION_PROGRAMME = {
    "tumour": 0,
    "stroma_adjacent": 1,
    "stroma_distal": 1,
    "immune": 2,
    "gland": 3,
    "gland_in_situ": 3,
    "adipose": 4,
}
_MORPHOLOGY_CLASS = {
    "tumour": 0,
    "stroma_adjacent": 1,
    "stroma_distal": 1,
    "immune": 2,
    "gland": 3,
    "gland_in_situ": 4,
    "adipose": 5,
}
#: Names of the expression programmes (``var['marker_of']`` of their marker genes).
_PROGRAMMES = ("tumour", "stroma", "immune", "gland", "adipose")
# Domains absent from a patient, cycled over patients (patient 0 has every domain).
_ABSENT_BY_PATIENT = ((), ("immune",), ("tumour", "stroma_adjacent"), ("adipose",))

SPOT_SPACING_UM = 100.0  # Visium centre-to-centre distance
SPOT_DIAMETER_UM = 55.0


def _check_grid(grid_size) -> None:
    if min(grid_size) < 8:
        raise ValueError(f"grid_size={grid_size} is too small: use at least (8, 8) spots.")


def _hex_grid(n_rows: int, n_cols: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = cols * SPOT_SPACING_UM + (rows % 2) * SPOT_SPACING_UM / 2
    y = rows * SPOT_SPACING_UM * np.sqrt(3) / 2
    return np.column_stack([x.ravel(), y.ravel()]).astype(np.float64)


#: Sections with more spots than this get a sparse ring matrix: the dense one (and the pairwise
#: distances behind it) grows with the square of the spots, 10 GB for a 160 x 160 grid. Smaller
#: sections keep the dense product, whose floating-point sums (and so the simulated counts) the
#: sparse one does not reproduce bit for bit.
_DENSE_RING_MAX_SPOTS = 4096


def _neighbour_ring(xy: np.ndarray) -> np.ndarray | sp.csr_matrix:
    """(n, n) matrix of each spot's ring of nearest neighbours on the hexagonal grid: boolean
    and dense up to ``_DENSE_RING_MAX_SPOTS`` spots, a sparse 0/1 matrix above."""
    if len(xy) > _DENSE_RING_MAX_SPOTS:
        from scipy.spatial import cKDTree

        pairs = cKDTree(xy).query_pairs(1.1 * SPOT_SPACING_UM, output_type="ndarray")
        rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
        cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
        ring = sp.csr_matrix(
            (np.ones(len(rows)), (rows, cols)), shape=(len(xy), len(xy)), dtype=np.float64
        )
        ring.sort_indices()
        return ring
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    return (d2 > 0) & (d2 < (1.1 * SPOT_SPACING_UM) ** 2)


def _mix_with_ring(values: np.ndarray, ring: np.ndarray, spot_mixing: float) -> np.ndarray:
    """Blend each row with the mean of its ring of neighbours (spots capture their neighbours'
    mRNA): ``(1 - spot_mixing) * own + spot_mixing * ring mean``."""
    n_ring = np.asarray(ring.sum(1)).reshape(-1, 1)
    neigh_mean = np.asarray(ring @ values) / np.maximum(n_ring, 1)
    return (1 - spot_mixing) * values + spot_mixing * neigh_mean


def _section_counts(
    rates: np.ndarray,
    patient_shift: np.ndarray,
    section_effect: float,
    library_size: float,
    dispersion: float,
    rng: np.random.Generator,
) -> sp.csr_matrix:
    """Negative-binomial counts of one section from per-spot relative rates: the patient's and a
    section's gene-wise log-fold shifts, a section library size (×/÷ 1.35) and spot library
    sizes (×/÷ 1.28), then a Gamma-Poisson draw."""
    shift = patient_shift + rng.normal(0, section_effect, rates.shape[1])
    rates = rates * np.exp(shift)
    rates /= rates.sum(1, keepdims=True)
    lib = library_size * np.exp(rng.normal(0, 0.3)) * rng.lognormal(0, 0.25, len(rates))
    mu = rates * lib[:, None]
    # Gamma-Poisson draw of negative-binomial counts.
    return sp.csr_matrix(rng.poisson(rng.gamma(dispersion, mu / dispersion)))


def _section_morphology(
    means: np.ndarray,
    batch_effect: float,
    scale_effect: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Morphology embedding of one section: per-spot means plus unit spot noise, then the
    section's stain/scanner effect (a scale, log-sd ``scale_effect``, and a shift, sd
    ``batch_effect`` per dimension)."""
    n, dim = means.shape
    m = means + rng.normal(0, 1.0, (n, dim))
    return m * np.exp(rng.normal(0, scale_effect)) + rng.normal(0, batch_effect, dim)


def _morphology_gradient(
    xy: np.ndarray, dim: int, strength: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth nuisance across one section (uneven staining, illumination, section thickness):
    the spot's position along a random axis of the section, in [-1, 1], times a random direction
    of the embedding with sd ``strength`` per dimension. Unrelated to the domains, it survives
    per-section standardisation and pulls neighbouring spots together in the image view."""
    angle = rng.uniform(0, 2 * np.pi)
    t = xy @ np.array([np.cos(angle), np.sin(angle)])
    t = 2 * (t - t.min()) / max(t.max() - t.min(), 1e-9) - 1
    return strength * t[:, None] * rng.normal(0, 1.0, dim)[None, :]


def _jitter_coords(xy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Spot centres in µm (= full-resolution pixels) with sub-pixel jitter; the one-spacing offset
    keeps pixel coordinates positive (images are drawn from pixel 0, as on a real slide scan)."""
    return xy + SPOT_SPACING_UM + rng.normal(0, 1.0, xy.shape)


def _scalefactors() -> dict:
    return {"spot_diameter_fullres": SPOT_DIAMETER_UM, "um_per_px_fullres": 1.0}


def _fm_view(
    feats: np.ndarray,
    ring,
    spot_mixing: float,
    proj: np.ndarray,
    shift: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """What an expression foundation model returns for the spots of one section: their
    features (mixed with the ring of neighbours like the counts) projected, plus the patient's
    shift and unit spot noise."""
    if spot_mixing > 0:
        feats = _mix_with_ring(feats, ring, spot_mixing)
    e = feats @ proj + shift + rng.normal(0, 1.0, (len(feats), proj.shape[1]))
    return e.astype(np.float32)


class _Study:
    """The sections of a simulated study, added one by one and assembled into the AnnData:
    counts in ``X`` and ``layers['counts']``, categorical ``sample``, ``patient`` and ``domain``
    (categories in study / ``domains`` order, unused ones dropped), ``obsm['spatial']``,
    ``obsm['X_morphology']`` (NaN for the last ``sections_without_image`` sections) and
    ``obsm['X_fm']`` when simulated, ``var['marker_of']``."""

    def __init__(self, n_sections: int, sections_without_image: int):
        self.first_without_image = n_sections - sections_without_image
        self.counts, self.obs, self.coords, self.morph, self.fm = [], [], [], [], []
        self.uns_spatial: dict = {}
        self.without_image: list[str] = []

    def add(self, sample, patient, columns: dict, counts, morph, xy, rng, fm=None) -> None:
        """One section: its counts, morphology, spot grid (jittered here with ``rng``), obs
        columns besides sample and patient, and foundation-model view."""
        if len(self.obs) >= self.first_without_image:
            morph[:] = np.nan
            self.without_image.append(sample)
        self.counts.append(counts)
        self.morph.append(morph.astype(np.float32))
        if fm is not None:
            self.fm.append(fm)
        self.coords.append(_jitter_coords(xy, rng))
        self.obs.append(
            pd.DataFrame(
                {"sample": sample, "patient": patient, **columns},
                index=[f"{sample}_{i}" for i in range(len(xy))],
            )
        )
        self.uns_spatial[sample] = {"scalefactors": _scalefactors()}

    def assemble(self, domains, n_genes: int, markers, marker_names, record: dict) -> AnnData:
        obs_df = pd.concat(self.obs)
        for col, cats in (
            ("sample", list(dict.fromkeys(obs_df["sample"]))),
            ("patient", list(dict.fromkeys(obs_df["patient"]))),
            ("domain", list(domains)),
        ):
            obs_df[col] = pd.Categorical(obs_df[col], categories=cats)
        obs_df["domain"] = obs_df["domain"].cat.remove_unused_categories()
        X = sp.vstack(self.counts).tocsr().astype(np.float32)
        adata = AnnData(
            X=X, obs=obs_df, var=pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)])
        )
        adata.layers["counts"] = X.copy()
        adata.obsm["spatial"] = np.vstack(self.coords)
        adata.obsm["X_morphology"] = np.vstack(self.morph)
        if self.fm:
            adata.obsm["X_fm"] = np.vstack(self.fm)
        adata.uns["spatial"] = self.uns_spatial
        adata.var["marker_of"] = "none"
        for genes, name in zip(markers, marker_names, strict=True):
            adata.var.iloc[genes, adata.var.columns.get_loc("marker_of")] = name
        adata.uns["histovi_simulation"] = record
        return adata


def _attach_images(
    adata: AnnData, without_image: list[str], seed: int, textures: dict | None = None
) -> None:
    """Draw an H&E-like image per section (:func:`~._images.draw_he_images`) into
    ``uns['spatial']``, except for the sections in ``without_image``."""
    from ._images import draw_he_images

    images = draw_he_images(
        adata, domain_key="domain", sample_key="sample", seed=seed, textures=textures
    )
    for sample, entry in images.items():
        if sample in without_image:
            continue
        adata.uns["spatial"].setdefault(sample, {})
        adata.uns["spatial"][sample].setdefault("scalefactors", {}).update(
            entry.get("scalefactors", {})
        )
        adata.uns["spatial"][sample]["images"] = entry["images"]


def _section_layout(
    xy: np.ndarray, absent: tuple[str, ...], rng: np.random.Generator
) -> np.ndarray:
    """Assign a domain to every spot of one section: bands, blobs and a ring around the tumour."""
    x, y = xy[:, 0], xy[:, 1]
    width, height = np.ptp(x), np.ptp(y)
    u, v = (x - x.min()) / width, (y - y.min()) / height
    phase = rng.uniform(0, 2 * np.pi)
    domain = np.full(len(xy), "stroma_distal", dtype=object)

    # Adipose: a wavy band along the top; glands: a wavy band along the bottom, split in two halves
    # (normal gland vs in situ) that differ only in morphology.
    adipose_edge = 0.82 + 0.05 * np.sin(2 * np.pi * u + phase)
    domain[v > adipose_edge] = "adipose"
    gland_edge = 0.25 + 0.05 * np.sin(3 * np.pi * u + phase)
    gland = v < gland_edge
    split = rng.uniform(0.35, 0.65)
    domain[gland & (u < split)] = "gland"
    domain[gland & (u >= split)] = "gland_in_situ"

    # Tumour: a blob in the middle band; the stroma within ~2 spot rings of it is "adjacent".
    centre = np.array([rng.uniform(0.3, 0.7) * width, rng.uniform(0.45, 0.6) * height])
    centre += xy.min(0)
    radius = rng.uniform(0.14, 0.2) * width
    dist = np.linalg.norm(xy - centre, axis=1)
    in_middle = (v >= gland_edge) & (v <= adipose_edge)
    if "tumour" not in absent:
        domain[(dist < radius) & in_middle] = "tumour"
        ring = (dist >= radius) & (dist < radius + 2.2 * SPOT_SPACING_UM) & in_middle
        domain[ring] = "stroma_adjacent"

    # Immune infiltrate: a few small blobs in the distal stroma.
    for _ in range(3):
        c = xy.min(0) + rng.uniform([0.1, 0.35], [0.9, 0.75]) * [width, height]
        blob = np.linalg.norm(xy - c, axis=1) < rng.uniform(1.2, 1.8) * SPOT_SPACING_UM
        domain[blob & (domain == "stroma_distal")] = "immune"

    for d in absent:
        if d in ("gland", "gland_in_situ", "adipose", "immune"):
            domain[domain == d] = "stroma_distal"
    return domain


def simulate(
    n_patients: int = 4,
    n_sections_per_patient: int = 2,
    grid_size: tuple[int, int] = (28, 28),
    n_genes: int = 600,
    n_markers: int = 25,
    marker_lfc: float = 1.6,
    patient_effect: float = 0.7,
    section_effect: float = 0.25,
    library_size: float = 2500.0,
    dispersion: float = 6.0,
    spot_mixing: float = 0.15,
    morphology_dim: int = 32,
    morphology_signal: float = 1.5,
    morphology_batch_effect: float = 1.0,
    morphology_scale_effect: float = 0.15,
    morphology_gradient: float = 0.0,
    sections_without_image: int = 1,
    absent_domains: bool = True,
    with_images: bool = False,
    expression_embedding_dim: int = 0,
    seed: int = 0,
) -> AnnData:
    """Simulate a multi-patient spatial transcriptomics study (histovi's default data).

    Parameters
    ----------
    n_patients, n_sections_per_patient
        Study size; every section is its own sample (``obs['sample']``, e.g. ``"P1_S2"``).
    grid_size
        Rows and columns of the Visium-like hexagonal grid of each section (100 µm spacing).
    n_genes, n_markers, marker_lfc
        Genes simulated, marker genes per expression programme and their log-fold change.
    patient_effect, section_effect
        Standard deviation of gene-wise log-fold shifts per patient and per section: the batch
        effects that make naively pooled spots cluster by patient.
    library_size, dispersion
        Mean UMI count per spot (varies ×/÷ 1.35 per section) and negative-binomial inverse
        dispersion.
    spot_mixing
        Fraction of a spot's expression that comes from its ring of neighbours (spots capture
        mRNA of neighbouring cells).
    morphology_dim, morphology_signal, morphology_batch_effect, morphology_scale_effect
        Width of the simulated morphology embedding (``obsm['X_morphology']``), the standard
        deviation of the morphology class means (the distance between classes, against unit spot
        noise), and each section's stain/scanner effect: a shift of standard deviation
        ``morphology_batch_effect`` per dimension after a scaling of the whole section's embedding
        by ``exp(N(0, morphology_scale_effect))``. A weak, strongly section-shifted view on every
        section is e.g. ``morphology_signal=0.4, morphology_batch_effect=2.0,
        morphology_scale_effect=0.3, sections_without_image=0``.
    morphology_gradient
        Standard deviation per dimension of a smooth nuisance across each section of the image
        view (uneven staining or illumination: the position along a random axis of the section
        times a random direction of the embedding; 0, the default, adds none). Unlike the stain
        shift it is not removed by per-section standardisation: a view that misleads.
    sections_without_image
        Number of sections (the last ones) whose morphology is missing (NaN rows), as in studies
        where some sections have no H&E image.
    absent_domains
        Drop some domains in some patients (patient 2 has no immune infiltrate, patient 3 no
        tumour, patient 4 no adipose tissue).
    expression_embedding_dim
        When positive, also simulate what a transcriptomics foundation model would return for
        each spot (``obsm['X_fm']``, this width): a fixed random projection of the spot's mix of
        expression programmes (signal 2 per unit of composition), a patient shift (sd 0.5, weaker
        than in the counts) and unit spot noise. Drawn from its own random stream, so the rest of
        the data is the same with or without it.
    with_images
        Also draw an H&E-like image per section (``uns['spatial'][sample]['images']['hires']``)
        so that :func:`histovi.pp.embed_morphology` can run on the data.
    seed
        Seed of every random draw: the same seed gives the same data.

    Returns
    -------
    AnnData with raw counts in ``X`` and ``layers['counts']``; ``obs`` columns ``sample``,
    ``patient`` and ``domain`` (ground truth); ``obsm['spatial']`` (µm, equal to full-resolution
    pixels) and ``obsm['X_morphology']``; ``uns['spatial'][sample]['scalefactors']``.
    """
    if n_patients < 1 or n_sections_per_patient < 1:
        raise ValueError("n_patients and n_sections_per_patient must be at least 1.")
    _check_grid(grid_size)
    if n_genes < 5 * n_markers:
        raise ValueError(f"n_genes={n_genes} must be at least 5 * n_markers ({5 * n_markers}).")
    if not morphology_gradient >= 0:
        raise ValueError(
            f"morphology_gradient={morphology_gradient} must be >= 0 (0: no staining gradient)."
        )
    rng = np.random.default_rng(seed)
    n_programmes = 5
    n_morph_classes = 6

    # Gene programmes: a shared baseline plus marker genes per programme.
    baseline = rng.normal(0, 1.0, n_genes)
    programmes = np.tile(baseline, (n_programmes, 1))
    markers = rng.permutation(n_genes)[: n_programmes * n_markers].reshape(n_programmes, n_markers)
    for p in range(n_programmes):
        programmes[p, markers[p]] += marker_lfc * rng.uniform(0.7, 1.3, n_markers)
    morph_means = rng.normal(0, morphology_signal, (n_morph_classes, morphology_dim))
    fm_rng = np.random.default_rng([seed, 7])
    gradient_rng = np.random.default_rng([seed, 11])
    fm_dim = int(expression_embedding_dim)
    fm_proj = fm_rng.normal(0, 2.0, (n_programmes, max(fm_dim, 1)))

    xy = _hex_grid(*grid_size)
    ring = _neighbour_ring(xy) if spot_mixing > 0 else None
    study = _Study(n_patients * n_sections_per_patient, sections_without_image)
    for p in range(n_patients):
        patient = f"P{p + 1}"
        absent = _ABSENT_BY_PATIENT[p % len(_ABSENT_BY_PATIENT)] if absent_domains else ()
        patient_shift = rng.normal(0, patient_effect, n_genes)
        fm_patient_shift = fm_rng.normal(0, 0.5, max(fm_dim, 1))
        for s in range(n_sections_per_patient):
            domain = _section_layout(xy, absent, rng)
            # Expression: log-rates per spot, mixed with the mean of the 6 nearest spots.
            prog = np.array([_EXPRESSION_PROGRAMME[d] for d in domain])
            rates = np.exp(programmes[prog])
            rates /= rates.sum(1, keepdims=True)
            if spot_mixing > 0:
                rates = _mix_with_ring(rates, ring, spot_mixing)
            # what an expression foundation model sees: the spot's mix of programmes
            fm = np.eye(n_programmes)[prog] if fm_dim else None
            if fm_dim:
                fm = _fm_view(fm, ring, spot_mixing, fm_proj, fm_patient_shift, fm_rng)
            counts = _section_counts(
                rates, patient_shift, section_effect, library_size, dispersion, rng
            )
            # Morphology embedding: class mean + spot noise, then the section's stain shift.
            mclass = np.array([_MORPHOLOGY_CLASS[d] for d in domain])
            m = _section_morphology(
                morph_means[mclass], morphology_batch_effect, morphology_scale_effect, rng
            )
            if morphology_gradient > 0:
                # own generator: the counts and the rest of the study stay those of the same seed
                # without the gradient
                m = m + _morphology_gradient(xy, morphology_dim, morphology_gradient, gradient_rng)
            sample = f"{patient}_S{s + 1}"
            study.add(sample, patient, {"domain": domain}, counts, m, xy, rng, fm)

    record = {"expression_programme": _EXPRESSION_PROGRAMME, "morphology_class": _MORPHOLOGY_CLASS}
    adata = study.assemble(DOMAINS, n_genes, markers, _PROGRAMMES, {"seed": seed, **record})
    if with_images:
        _attach_images(adata, study.without_image, seed)
    return adata
