"""The whole histovi job in one call: :func:`run` (what ``histovi run`` does, from Python too).

inputs → morphology embedding → spatial neighbours → HistoVI → domains → metrics → figures →
report, all written into one output folder. Without ``input`` it runs on the built-in simulated
study (with H&E-like images), so a fresh install can be checked end to end with no data::

    import histovi

    result = histovi.pipeline.run(out="histovi_out", max_epochs=50)
    result.metrics["ARI_mean"], result.adata.obsm["X_histovi"]

Options, the input's path and the output folder are checked before any work (the input first),
and the input's contents before anything in the folder is replaced; errors name the command
line's option (``--sample-key``), the keyword of the same name here. Nothing is lost: a folder
holding a finished run is refused unless ``overwrite``; a run killed midway is finished by
running it again with the same options (training resumes from its last checkpoint); see
:mod:`histovi._outdir`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ._constants import LATENT_KEY, MORPHOLOGY_KEY, NEIGHBORS_KEY
from ._outdir import InputError, RunFolder, atomic_file, check_out

__all__ = ["DOMAIN_KEY", "InputError", "RunOptions", "RunResult", "run"]

#: ``obs`` column the run writes its domains to (``'domain'`` is the simulator's ground truth).
DOMAIN_KEY = "histovi_domain"
#: ``obs`` columns tried, in order, as ground truth when ``label_key`` is not given.
LABEL_CANDIDATES = ("label", "domain")
#: Input formats by how they are recognised.
INPUT_FORMATS = "a .h5ad file, a SpatialData .zarr store or a folder with one .h5ad and its images"

STEPS = (
    "load data",
    "select genes",
    "morphology embedding",
    "spatial neighbours",
    "train HistoVI",
    "domains",
    "metrics",
    "figures",
    "write outputs",
)


@dataclass
class RunOptions:
    """The options that decide a run's results (``histovi run``'s options of the same names).

    ``sim_*`` size the built-in simulated study used when there is no ``input`` (4 patients x 2
    sections of 20 x 20 spots, 600 genes: a few minutes on 2 CPU cores)."""

    input: str | None = None
    sample_key: str = "sample"
    layer: str | None = None
    label_key: str | None = None
    n_domains: int | None = None
    encoder: str = "stain-texture"
    max_epochs: int | None = None
    n_top_genes: int = 2000
    samples: list[str] | None = None
    spatial_smoothing: int = 0
    accelerator: str = "auto"
    seed: int = 0
    sim_grid: int = 20
    sim_patients: int = 4
    sim_sections: int = 2
    sim_genes: int = 600

    def record(self) -> dict[str, Any]:
        """The options as the run record stores them (with the input file's size and time, so
        a resumed run is refused when the input changed)."""
        options = dict(sorted(asdict(self).items()))
        if self.input is not None:
            path = Path(self.input).expanduser()
            if path.exists():
                stat = path.stat()
                options["input"] = str(path.resolve())
                options["input_file"] = [int(stat.st_size), int(stat.st_mtime)]
        return json.loads(json.dumps(options, default=str))


@dataclass
class RunResult:
    """What :func:`run` made: the spots with the latent and domains, the trained model, the
    scores (as in ``metrics.json``) and the files written."""

    adata: Any
    model: Any
    metrics: dict[str, Any]
    per_sample: Any
    out: Path
    report: Path
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- progress
class Progress:
    """Numbered step messages with timings on stderr (silent when ``quiet``)."""

    def __init__(self, quiet: bool):
        self.quiet, self.i = quiet, 0
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"histovi: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, name: str):
        self.i += 1
        self.say(f"[{self.i}/{len(STEPS)}] {name} ...")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        self.say(f"[{self.i}/{len(STEPS)}] {name}: done in {self.timings[name]:.1f} s")

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


def _message(err: BaseException) -> str:
    # KeyError's str() adds quotes around the message; show the message itself.
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err) or type(err).__name__


@contextlib.contextmanager
def as_input_error(what: str):
    """Turn the library's validation errors (ValueError/KeyError with a fix) into InputError."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, KeyError, FileNotFoundError, IsADirectoryError, TypeError) as err:
        raise InputError(f"{what}: {_message(err)}") from err


@contextlib.contextmanager
def _console(quiet: bool, verbose: bool):
    """Library chatter off (unless ``verbose``); with ``quiet`` the progress bars go too."""
    import os

    # imported first: Lightning, scvi-tools and spatialdata (squidpy's logger) set their
    # loggers' levels when imported, over the levels set here
    import scvi  # noqa: F401
    import squidpy  # noqa: F401

    from ._quiet import quiet_libraries

    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_libraries(verbose=verbose, all_warnings=True))
        if quiet and not verbose:
            # tqdm bars of the library (tiles, clustering seeds) write to stderr directly
            devnull = stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115
            stack.enter_context(contextlib.redirect_stderr(devnull))
            stack.enter_context(contextlib.redirect_stdout(devnull))
        yield


# ------------------------------------------------------------------------------- checks
def check_options(opts: RunOptions) -> None:
    """Options and the input's path, checked before the output folder and before any work."""
    limits = [("n_domains", 2), ("max_epochs", 1), ("n_top_genes", 0), ("spatial_smoothing", 0)]
    for name, low in limits:
        value = getattr(opts, name)
        if value is not None and value < low:
            what = "0 (all genes) or positive" if name == "n_top_genes" else f"at least {low}"
            raise InputError(f"--{name.replace('_', '-')} {value} must be {what}")
    if opts.input is None:
        for name in ("sim_grid", "sim_patients", "sim_sections", "sim_genes"):
            if getattr(opts, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        return
    path = Path(opts.input).expanduser()
    if not path.exists():
        raise InputError(f"--input {str(path)!r} does not exist: give {INPUT_FORMATS}")
    if _input_format(path) is None:
        raise InputError(
            f"--input {str(path)!r}: unknown format {path.suffix!r}; give {INPUT_FORMATS}"
        )


def _input_format(path: Path) -> str | None:
    if path.suffix == ".zarr" or (path.is_dir() and (path / "zmetadata").exists()):
        return "SpatialData store"
    if path.is_dir():
        return "folder (.h5ad + images)"
    if path.suffix == ".h5ad":
        return ".h5ad file"
    return None


# ------------------------------------------------------------------------------- stages
def load_input(opts: RunOptions) -> tuple[Any, dict[str, Any]]:
    """The spots to integrate and a description of where they came from."""
    from . import datasets, io

    if opts.input is None:
        sim = {
            "n_patients": opts.sim_patients,
            "n_sections_per_patient": opts.sim_sections,
            "grid_size": (opts.sim_grid, opts.sim_grid),
            "n_genes": opts.sim_genes,
            "n_markers": min(25, opts.sim_genes // 5),
            "with_images": True,
            "seed": opts.seed,
        }
        adata = datasets.simulate(**sim)
        sim["grid_size"] = list(sim["grid_size"])
        return adata, {
            "input": "built-in simulated study (histovi.datasets.simulate)",
            **{f"simulate.{k}": v for k, v in sim.items()},
        }
    path = Path(opts.input).expanduser()
    kind = _input_format(path)
    with as_input_error(f"cannot read --input {str(path)!r}"):
        if kind == "SpatialData store":
            import spatialdata

            from ._files import check_store_tree

            if path.is_dir():  # read file by file: no FIFO, no link out of the store
                check_store_tree(path, "--input")
            adata = io.from_spatialdata(spatialdata.read_zarr(path), sample_key=opts.sample_key)
        elif kind == "folder (.h5ad + images)":
            adata = io.read_folder(path)
        else:
            adata = _read_h5ad(path)
    return adata, {"input": str(path.resolve()), "input format": kind}


def _read_h5ad(path: Path) -> Any:
    import anndata as ad

    from ._files import check_regular_file
    from .io._folder import contain_image_files

    check_regular_file(path, "--input")  # a FIFO would block the reader forever
    try:
        adata = ad.read_h5ad(path)
    except OSError as err:  # h5py: not an HDF5 file, truncated, ...
        raise ValueError(f"{err} (the file is corrupted, cut short or not an .h5ad)") from err
    # images it names lie beside it: a file from elsewhere must not make histovi read (and draw
    # into the report) images elsewhere on this machine
    contain_image_files(adata, path.parent, who=f"--input {str(path)!r}")
    return adata


def check_input(adata: Any, opts: RunOptions) -> tuple[Any, str | None, str | None]:
    """Validate keys and subset samples; return ``(adata, layer, label_key)``."""
    key = opts.sample_key
    if key not in adata.obs:
        raise InputError(
            f"--sample-key {key!r} is not a column of adata.obs (columns: "
            f"{', '.join(map(str, adata.obs.columns)) or 'none'}): pass the column that names "
            "each spot's section"
        )
    if adata.obs[key].isna().any():
        raise InputError(f"adata.obs[{key!r}] has missing values: give every spot a sample id")
    adata.obs[key] = adata.obs[key].astype(str).astype("category")
    if opts.samples:
        known = set(adata.obs[key].cat.categories)
        unknown = [s for s in opts.samples if s not in known]
        if unknown:
            raise InputError(
                f"--samples {' '.join(unknown)} not found in adata.obs[{key!r}] (values: "
                f"{', '.join(sorted(known))})"
            )
        adata = adata[adata.obs[key].isin(opts.samples).to_numpy()].copy()
        adata.obs[key] = adata.obs[key].cat.remove_unused_categories()
    if "spatial" not in adata.obsm:
        raise InputError(
            "adata.obsm['spatial'] (spot centres) not found: store the spot "
            "coordinates there (scanpy / squidpy convention)"
        )
    return adata, _check_layer(adata, opts.layer), _label_key(adata, opts.label_key)


def _check_layer(adata: Any, layer: str | None) -> str | None:
    from ._validation import check_counts

    if layer is None and "counts" in adata.layers:
        layer = "counts"
    layers = [str(k) for k in adata.layers.keys() if k is not None]
    if layer is not None and layer not in layers:
        raise InputError(
            f"--layer {layer!r} is not in adata.layers ({', '.join(layers) or 'none'}): "
            "name the layer with raw counts, or leave --layer out to use X"
        )
    with as_input_error("counts"):
        check_counts(adata, layer)
    return layer


def _label_key(adata: Any, label_key: str | None) -> str | None:
    if label_key is not None and label_key.lower() == "none":
        return None
    if label_key is not None and label_key not in adata.obs:
        raise InputError(
            f"--label-key {label_key!r} is not a column of adata.obs: pass the column of the "
            "ground-truth labels, or 'none'"
        )
    if label_key is None:
        label_key = next((c for c in LABEL_CANDIDATES if c in adata.obs), None)
    if label_key is not None and adata.obs[label_key].notna().sum() == 0:
        return None
    return label_key


def select_genes(adata: Any, layer: str | None, n_top: int, sample_key: str) -> tuple[Any, str]:
    """Keep the ``n_top`` highly variable genes (seurat_v3 on counts) when there are more."""
    import scanpy as sc

    if n_top == 0 or adata.n_vars <= n_top:
        return adata, f"all {adata.n_vars} genes"
    try:
        # Per-sample HVG ranks favour genes variable within sections over genes that only
        # differ between them (the batch effect), as recommended for integration.
        hvg = sc.pp.highly_variable_genes(
            adata,
            flavor="seurat_v3",
            n_top_genes=n_top,
            layer=layer,
            batch_key=sample_key,
            inplace=False,
        )
        how = f"{n_top} of {adata.n_vars} genes (seurat_v3, per {sample_key})"
    except ValueError:
        # seurat_v3's loess fit fails on samples with very few spots; rank on the pool instead.
        hvg = sc.pp.highly_variable_genes(
            adata, flavor="seurat_v3", n_top_genes=n_top, layer=layer, inplace=False
        )
        how = f"{n_top} of {adata.n_vars} genes (seurat_v3, pooled)"
    return adata[:, hvg["highly_variable"].to_numpy()].copy(), how


def _has_images(adata: Any) -> bool:
    spatial = adata.uns.get("spatial", {}) or {}
    return any(
        isinstance(e, dict) and ("images" in e or "image_file" in e) for e in spatial.values()
    )


def morphology(adata: Any, opts: RunOptions, progress: bool) -> str:
    """Embed the H&E tiles (or keep / skip the morphology view); return what was done."""
    import numpy as np

    from . import pp

    enc = opts.encoder
    if enc.lower() == "none":
        adata.obsm.pop(MORPHOLOGY_KEY, None)
        return "none (trained on expression and neighbourhood only)"
    if enc.lower() == "precomputed":
        if MORPHOLOGY_KEY not in adata.obsm:
            raise InputError(
                f"--encoder precomputed but adata.obsm[{MORPHOLOGY_KEY!r}] not found: embed the "
                "tiles with histovi.pp.embed_morphology first, or pass --encoder stain-texture"
            )
        return f"precomputed obsm['{MORPHOLOGY_KEY}']"
    if not _has_images(adata):
        if MORPHOLOGY_KEY in adata.obsm:
            return f"no images found: precomputed obsm['{MORPHOLOGY_KEY}'] used"
        return "no images found: trained without morphology"
    device = {"gpu": "cuda"}.get(opts.accelerator, opts.accelerator)
    with as_input_error(f"morphology embedding with --encoder {enc!r}"):
        pp.embed_morphology(
            adata,
            encoder=enc,
            sample_key=opts.sample_key,
            key_added=MORPHOLOGY_KEY,
            device=device,
            progress=progress,
            seed=opts.seed,
        )
    valid = ~np.isnan(np.asarray(adata.obsm[MORPHOLOGY_KEY])).any(1)
    if not valid.any():
        adata.obsm.pop(MORPHOLOGY_KEY)
        return f"{enc}: no usable tile (trained without morphology)"
    n_features = adata.obsm[MORPHOLOGY_KEY].shape[1]
    return f"{enc}: {n_features} features, {valid.sum()} of {len(valid)} spots with a tile"


def train_model(
    adata: Any, opts: RunOptions, layer: str | None, out: Path, quiet: bool, verbose: bool
) -> Any:
    """Set up and train HistoVI (the API's training rule; a killed run resumes from
    ``out/checkpoints``), and store its latent in ``obsm['X_histovi']``."""
    from . import HistoVI

    morph = MORPHOLOGY_KEY if MORPHOLOGY_KEY in adata.obsm else None
    with as_input_error("model setup"):
        HistoVI.setup_anndata(
            adata,
            layer=layer,
            batch_key=opts.sample_key,
            morphology_key=morph,
            neighbors_key=NEIGHBORS_KEY,
            labels_key=None,
        )
    model = HistoVI(adata)
    with as_input_error("training"):
        model.train(
            max_epochs=opts.max_epochs,
            accelerator=opts.accelerator,
            enable_progress_bar=not quiet,
            enable_model_summary=False,
            checkpoint_dir=out / "checkpoints",
            verbose=verbose,
        )
    adata.obsm[LATENT_KEY] = model.get_latent_representation()
    return model


def find_domains(adata: Any, opts: RunOptions, label_key: str | None) -> str:
    """Cluster the latent into domains (``obs['histovi_domain']``); return what was done."""
    from . import tl

    n_domains = opts.n_domains
    if n_domains is None and label_key is not None:
        from .metrics import n_label_classes

        n_domains = n_label_classes(adata.obs[label_key])
    method = "gmm" if n_domains is not None else "leiden"
    tl.domains(
        adata,
        n_domains=n_domains,
        use_rep=LATENT_KEY,
        method=method,
        spatial_smoothing=opts.spatial_smoothing,
        sample_key=opts.sample_key,
        key_added=DOMAIN_KEY,
        random_state=opts.seed,
    )
    how = f"{method}, {adata.obs[DOMAIN_KEY].nunique()} domains"
    if opts.n_domains:
        how += " (k from --n-domains)"
    elif n_domains:
        how += f" (k = label classes in obs['{label_key}'])"
    if opts.spatial_smoothing:
        how += f", {opts.spatial_smoothing} smoothing rounds"
    return how


def compute_metrics(adata: Any, label_key: str | None, sample_key: str) -> tuple[dict, Any]:
    """metrics.json content and the per-sample table of the report."""
    from . import metrics

    coherence = metrics.spatial_coherence(
        adata, cluster_key=DOMAIN_KEY, neighbors_key=NEIGHBORS_KEY, sample_key=sample_key
    )
    overall = coherence[coherence["sample"] == "all"].iloc[0]
    per_sample = coherence[coherence["sample"] != "all"][["sample", "coherence", "kappa"]]
    result: dict[str, Any] = {
        "spatial_coherence": float(overall["coherence"]),
        "spatial_kappa": float(overall["kappa"]),
    }
    if label_key is not None:
        scores = metrics.per_sample_scores(adata, label_key, DOMAIN_KEY, sample_key=sample_key)
        per_sample = scores.merge(per_sample, on="sample", how="right")
        result["ARI_mean"] = float(scores["ARI"].mean())
        result["NMI_mean"] = float(scores["NMI"].mean())
        # the shared evaluation protocol (GMM and k-means, 3 seeds) and scib-metrics scores
        evaluation = metrics.evaluate(
            adata,
            use_rep=LATENT_KEY,
            label_key=label_key,
            batch_key=sample_key,
            sample_key=sample_key,
            neighbors_key=NEIGHBORS_KEY,
        )
        result["evaluation"] = json.loads(evaluation.to_json(orient="records"))
        for row in evaluation.itertuples():
            if row.group in ("batch", "bio"):
                result[row.metric] = float(row.value)
    per_sample = _with_image_column(adata, per_sample, sample_key)
    result["per_sample"] = json.loads(per_sample.to_json(orient="records"))
    if label_key is not None:
        result["domain_labels"] = _domain_labels(adata, label_key)
        missing = _missing_view(adata, per_sample, label_key, sample_key)
        if missing:
            result["sections_without_image"] = missing
    return result, per_sample


def _sections_with_morphology(adata: Any, sample_key: str) -> dict[str, bool]:
    import numpy as np
    import pandas as pd

    samples = adata.obs[sample_key].astype(str)
    if MORPHOLOGY_KEY not in adata.obsm:
        return dict.fromkeys(pd.unique(samples), False)
    valid = ~np.isnan(np.asarray(adata.obsm[MORPHOLOGY_KEY], dtype=float)).any(1)
    return {str(s): bool(v) for s, v in pd.Series(valid).groupby(samples.to_numpy()).any().items()}


def _with_image_column(adata: Any, per_sample: Any, sample_key: str) -> Any:
    has = _sections_with_morphology(adata, sample_key)
    per_sample = per_sample.copy()
    per_sample.insert(1, "image", [has.get(str(s), False) for s in per_sample["sample"]])
    return per_sample


def _domain_labels(adata: Any, label_key: str) -> list[dict[str, Any]]:
    """Each domain with the label it is matched to (one to one, most overlap) and the share of
    its labelled spots that carry that label."""
    from .pl import match_categories

    matched = match_categories(adata.obs[DOMAIN_KEY], adata.obs[label_key])
    obs = adata.obs[[DOMAIN_KEY, label_key]].dropna().astype(str)
    rows = []
    for domain, spots in obs.groupby(DOMAIN_KEY, observed=True):
        label = matched.get(str(domain))
        share = float((spots[label_key] == label).mean()) if label is not None else 0.0
        rows.append({"domain": str(domain), "label": label, "spots": len(spots), "share": share})
    return rows


def _missing_view(adata: Any, per_sample: Any, label_key: str, sample_key: str) -> dict | None:
    """What the sections without a morphology view cost: their ARI against the others', and
    the labels found less often there (recall of each label in its matched domain)."""
    import pandas as pd

    if "ARI" not in per_sample or per_sample["image"].all() or not per_sample["image"].any():
        return None
    from .pl import match_categories

    scored = per_sample.dropna(subset=["ARI"])
    without = scored[~scored["image"]]
    if without.empty:
        return None
    matched = match_categories(adata.obs[DOMAIN_KEY], adata.obs[label_key])
    to_domain = {label: domain for domain, label in matched.items()}
    obs = adata.obs[[sample_key, DOMAIN_KEY, label_key]].dropna().astype(str)
    pairs = zip(obs[DOMAIN_KEY], obs[label_key], strict=True)
    obs["found"] = [to_domain.get(lab) == dom for dom, lab in pairs]
    obs["image"] = obs[sample_key].map(dict(zip(scored["sample"], scored["image"], strict=True)))
    recall = obs.dropna(subset=["image"]).pivot_table(
        index=label_key, columns="image", values="found", aggfunc="mean"
    )
    recall = recall.reindex(columns=[True, False])
    worse = recall[(recall[True] - recall[False]) > 0.2].sort_values(False)
    return {
        "sections": [str(s) for s in without["sample"]],
        "ARI_without_image": float(without["ARI"].mean()),
        "ARI_with_image": float(scored[scored["image"]]["ARI"].mean()),
        "labels_found_less": [
            {"label": str(lab), "with_image": float(r[True]), "without_image": float(r[False])}
            for lab, r in worse.iterrows()
            if pd.notna(r[False])
        ],
        "morphology_only_pairs": _morphology_only_pairs(adata),
    }


def _morphology_only_pairs(adata: Any) -> list[list[str]]:
    """Domains of the simulator that share an expression programme but not a morphology class:
    only the image tells them apart (empty for other data)."""
    sim = adata.uns.get("histovi_simulation") or {}
    programme, morph = sim.get("expression_programme") or {}, sim.get("morphology_class") or {}
    names = sorted(programme)
    return [
        [a, b]
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if programme[a] == programme[b] and morph.get(a) != morph.get(b)
    ]


def figures(
    adata: Any, model: Any, out: Path, label_key: str | None, sample_key: str
) -> list[Path]:
    """Domain maps, UMAPs and training curves as PNG files in ``out`` (domains coloured like
    the labels they match, the same colours in every figure)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from . import pl

    paths = []

    def save(fig, name):
        path = out / name
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
        paths.append(path)

    if label_key is not None:
        pl.match_colors(adata, DOMAIN_KEY, label_key)
    n = adata.obs[sample_key].nunique()
    panels = {"sample_key": sample_key, "panel_size": 3.0}
    save(
        pl.domains(
            adata,
            color=DOMAIN_KEY,
            ncols=min(n, 6 if n > 8 else 4),
            title="histovi domains",
            **panels,
        ),
        "domains.png",
    )
    if label_key is not None:
        labelled = adata.obs[label_key].notna().groupby(adata.obs[sample_key], observed=True)
        samples = [s for s, has in labelled.any().items() if has]
        title = f"ground truth ({label_key})"
        fig = pl.domains(
            adata,
            color=label_key,
            samples=samples,
            ncols=min(len(samples), 4),
            title=title,
            **panels,
        )
        save(fig, "labels.png")
    colors = [sample_key, DOMAIN_KEY] + ([label_key] if label_key is not None else [])
    umap = pl.latent_umap(
        adata,
        use_rep=LATENT_KEY,
        color=colors,
        key_added="X_umap",
        random_state=0,
        panel_size=4.0,
    )
    save(umap, "umap.png")
    save(pl.training_curves(model.history), "training.png")
    return paths


def _h5ad_safe(value: Any) -> Any:
    """uns entries h5py can store: None becomes 'None', tuples become lists."""
    if isinstance(value, dict):
        return {str(k): _h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, tuple | list) and not all(isinstance(v, int | float | str) for v in value):
        return {str(i): _h5ad_safe(v) for i, v in enumerate(value)}
    if isinstance(value, tuple):
        return list(value)
    if value is None:
        return "None"
    return value


def write_outputs(
    folder: RunFolder, adata: Any, model: Any, settings: dict, summary: dict, result: dict
) -> None:
    """model/, adata.h5ad and metrics.json, each recorded in the run record once written."""
    out = folder.out
    model.save(out / "model", overwrite=True, save_anndata=False)
    folder.wrote("model")
    for key in [k for k in adata.uns if k.endswith("_colors") or k in ("histovi",)]:
        adata.uns[key] = _h5ad_safe(adata.uns[key])
    adata.uns["histovi_run"] = _h5ad_safe({"settings": settings})
    with atomic_file(out / "adata.h5ad") as tmp:
        adata.write_h5ad(tmp)
    folder.wrote("adata.h5ad")
    with atomic_file(out / "metrics.json") as tmp:
        from ._files import storable

        record = storable({"summary": summary, **result}, json=True)
        tmp.write_text(json.dumps(record, indent=2, default=str, allow_nan=False))
    folder.wrote("metrics.json")


# ------------------------------------------------------------------------------- the run
def run(
    out: str | Path = "histovi_out",
    *,
    overwrite: bool = False,
    quiet: bool = False,
    verbose: bool = False,
    **options: Any,
) -> RunResult:
    """Run the whole pipeline and write its outputs into ``out``; see the module notes.

    Parameters
    ----------
    out
        Output folder (created). One holding a finished run is refused unless ``overwrite``;
        one holding an unfinished run of the same options is finished.
    overwrite
        Replace the outputs of a previous run (only the files a histovi run recorded writing).
    quiet
        No progress messages or bars.
    verbose
        Show the libraries' log lines and warnings (Lightning, scvi-tools, squidpy, ...).
    **options
        The fields of :class:`RunOptions` (``input``, ``sample_key``, ``max_epochs``, ...).

    Returns
    -------
    :class:`RunResult`. Raises :class:`InputError` for bad input, options or output folder.
    """
    known = {f.name for f in fields(RunOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"run() got unknown options {unknown}: pass fields of RunOptions")
    opts = RunOptions(**options)
    check_options(opts)
    out = Path(out).expanduser()
    record = opts.record()
    folder = RunFolder(out, record, check_out(out, record, overwrite))
    prog = Progress(quiet)
    if folder.mode == "resume":
        prog.say(f"finishing the unfinished run in {out} (training resumes from its checkpoint)")
    with _console(quiet, verbose):
        return _run(opts, folder, prog, quiet, verbose)


def _run(opts: RunOptions, folder: RunFolder, prog: Progress, quiet: bool, verbose: bool):
    import scvi

    from . import pp
    from ._report import write_report

    scvi.settings.seed = opts.seed
    settings: dict[str, Any] = {}
    with prog.step(STEPS[0]):
        adata, source = load_input(opts)
        adata, layer, label_key = check_input(adata, opts)
        folder.start()  # only now, with a valid input, are a previous run's outputs replaced
        settings.update(source)
        n_samples = adata.obs[opts.sample_key].nunique()
        prog.say(
            f"  {adata.n_obs} spots, {adata.n_vars} genes, {n_samples} samples; labels: {label_key}"
        )
    with prog.step(STEPS[1]), as_input_error("gene selection"):
        adata, settings["genes"] = select_genes(adata, layer, opts.n_top_genes, opts.sample_key)
    with prog.step(STEPS[2]):
        settings["morphology"] = morphology(adata, opts, progress=not quiet)
        prog.say(f"  {settings['morphology']}")
    with prog.step(STEPS[3]), as_input_error("spatial neighbours"):
        pp.spatial_neighbors(adata, sample_key=opts.sample_key)
        settings["spatial neighbours"] = "6 nearest spots within each sample (squidpy)"
    with prog.step(STEPS[4]):
        model = train_model(adata, opts, layer, folder.out, quiet, verbose)
        # epochs in all (a resumed run's history holds only the epochs run this time)
        settings["model"] = model._model_summary_string
        settings["epochs"] = int(model.history["elbo_train"].index[-1]) + 1
    with prog.step(STEPS[5]):
        settings["domains"] = find_domains(adata, opts, label_key)
    with prog.step(STEPS[6]):
        result, per_sample = compute_metrics(adata, label_key, opts.sample_key)
    with prog.step(STEPS[7]):
        pngs = figures(adata, model, folder.out, label_key, opts.sample_key)
        for png in pngs:
            folder.wrote(png.name)
    with prog.step(STEPS[8]):
        settings.update(
            {
                "sample key": opts.sample_key,
                "layer": layer or "X",
                "label key": label_key or "none",
                "seed": opts.seed,
                "accelerator": opts.accelerator,
                "output": str(folder.out.resolve()),
            }
        )
        summary = {
            "n_spots": int(adata.n_obs),
            "n_genes": int(adata.n_vars),
            "n_samples": int(n_samples),
            "n_domains": int(adata.obs[DOMAIN_KEY].nunique()),
            "label_key": label_key,
            "epochs": settings["epochs"],
            "final_elbo_train": float(model.history["elbo_train"].iloc[-1, 0]),
        }
        result = {"settings": settings, "timings_s": prog.timings, **result}
        write_outputs(folder, adata, model, settings, summary, result)
        report = folder.out / "report.html"
        with atomic_file(report) as tmp:
            validation = any("validation" in str(k) for k in model.history)
            write_report(tmp, summary, result, per_sample, pngs, validation=validation)
        folder.wrote("report.html")
        folder.complete()
    return RunResult(
        adata=adata,
        model=model,
        metrics=result,
        per_sample=per_sample,
        out=folder.out,
        report=report,
        seconds=prog.total,
        summary=summary,
    )
