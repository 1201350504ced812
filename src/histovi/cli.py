"""The ``histovi`` command line: ``histovi run`` does the whole job in one call.

inputs → morphology embedding → spatial neighbours → HistoVI → domains → metrics → figures →
report, all written into one output folder. Without ``--input`` it runs on the built-in simulated
study (with H&E-like images), so a fresh install can be checked end to end with no data.

Exit codes: 0 success, 2 bad input or usage (one line ``histovi: error: ...`` on stderr, no
traceback), 1 training diverged (one line) or unexpected failure (traceback on stderr), 130
interrupted.

Nothing is lost: ``--out`` holding a finished run is refused without ``--overwrite``; a run killed
midway is finished by running the same command again (training resumes from the last completed
epoch, saved in ``--out``/checkpoints); every output file is written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._constants import LATENT_KEY, MORPHOLOGY_KEY, NEIGHBORS_KEY

#: ``obs`` column the CLI writes its domains to (``'domain'`` is the simulator's ground truth).
DOMAIN_KEY = "histovi_domain"
#: Simulated study of the default run: sized to finish in a few minutes on 2 CPU cores.
DEFAULT_SIM = {"n_patients": 4, "n_sections_per_patient": 2, "grid_size": 20, "n_genes": 600}
#: ``obs`` columns tried, in order, as ground truth when ``--label-key`` is not given.
LABEL_CANDIDATES = ("label", "domain")

EPILOG = """\
what it writes into --out:
  adata.h5ad     the spots with the latent (obsm['X_histovi']), the domains
                 (obs['histovi_domain']) and the morphology embedding (obsm['X_morphology'])
  model/         the trained HistoVI model (histovi.HistoVI.load('model', adata))
  metrics.json   per-sample ARI/NMI (when labels exist), spatial coherence, scib-metrics scores
  *.png          domains per section, UMAP by sample and by domain, training curves
  report.html    one self-contained page with all of the above and the settings used
  .histovi_run.json  the run's options and status ('running' until every output is written)

A folder holding a finished run is never overwritten without --overwrite, and --overwrite
replaces only the files a histovi run recorded writing there (never the input, never files
of yours under an output name). A run killed midway
(Ctrl-C, crash, out of time) is finished by running the same command again: training resumes
from its last completed epoch (--out/checkpoints, removed once the run is complete).

examples:
  histovi run                                   # built-in simulated study, ~6 min on 2 CPUs
  histovi run --input data.h5ad --sample-key sample --label-key label
  histovi run --input ../shared/data/her2st --samples A1 B1 C1 D1 --max-epochs 50
  histovi run --input visium.zarr --encoder resnet50 --n-domains 8 --out results/

input formats:
  .h5ad file     raw counts in X or --layer; obs[--sample-key]; obsm['spatial'] spot centres
                 in full-resolution pixels; H&E in uns['spatial'][sample]['images'] (scanpy /
                 squidpy layout) or uns['spatial'][sample]['image_file']
  folder         one .h5ad plus the image files it names (e.g. the her2st folder)
  .zarr          a SpatialData store (read with histovi.io.from_spatialdata)
"""


class InputError(Exception):
    """Bad input or settings: reported as one line on stderr with exit code 2."""


def _message(err: BaseException) -> str:
    # KeyError's str() adds quotes around the message; show the message itself.
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err) or type(err).__name__


# ------------------------------------------------------------------------------- argument parser
def build_parser() -> argparse.ArgumentParser:
    """The ``histovi`` argument parser (subcommands; ``run`` is the first)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="histovi",
        description=(
            "histovi integrates spatial transcriptomics spots from many samples and patients "
            "into one latent space learned from expression, H&E morphology and the spatial "
            "neighbourhood. Use `histovi run` for the whole pipeline."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"histovi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="whole pipeline: embeddings -> model -> domains -> metrics -> figures -> report",
        description=(
            "Run the whole histovi pipeline and write the results into one folder: read the "
            "spots (or simulate a study when --input is not given), embed the H&E tile of each "
            "spot, find spatial neighbours, train a HistoVI model, cluster its latent space into "
            "tissue domains, score them, draw figures and write report.html."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--input",
        "-i",
        metavar="PATH",
        help=".h5ad file, SpatialData .zarr store, or folder with one .h5ad and its images "
        "(default: the built-in simulated study)",
    )
    run.add_argument(
        "--out",
        "-o",
        default="histovi_out",
        metavar="DIR",
        help="output folder, created if needed (default: %(default)s); a folder holding a "
        "finished run is refused unless --overwrite is given",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of a previous run in --out (only the files histovi writes)",
    )
    run.add_argument(
        "--sample-key",
        default="sample",
        metavar="COL",
        help="obs column of the section / sample id; the unit whose effect is "
        "removed (default: %(default)s)",
    )
    run.add_argument(
        "--layer",
        default=None,
        metavar="NAME",
        help="layer with raw integer counts (default: layers['counts'] if present, else X)",
    )
    run.add_argument(
        "--label-key",
        default=None,
        metavar="COL",
        help="obs column of ground-truth labels used for scores and the number of "
        "domains (default: 'label' or 'domain' if present; 'none' to ignore labels)",
    )
    run.add_argument(
        "--n-domains",
        type=int,
        default=None,
        metavar="K",
        help="number of domains (default: number of label classes; without labels "
        "Leiden clustering chooses)",
    )
    run.add_argument(
        "--encoder",
        default="stain-texture",
        metavar="NAME",
        help="morphology encoder for the H&E tiles: 'stain-texture' (built-in, no "
        "weights), a timm name ('resnet50'), 'hf-hub:org/model', a weights file; "
        "'precomputed' to use obsm['X_morphology'] as it is; 'none' to train "
        "without morphology (default: %(default)s)",
    )
    run.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        metavar="N",
        help="training epochs (default: HistoVI.train's rule, 600,000 spot passes "
        "between 20 and 400 epochs: 188 on the built-in study)",
    )
    run.add_argument(
        "--n-top-genes",
        type=int,
        default=2000,
        metavar="N",
        help="highly variable genes kept (scanpy seurat_v3) when the data has more "
        "genes (default: %(default)s; 0 keeps all genes)",
    )
    run.add_argument(
        "--samples",
        nargs="+",
        default=None,
        metavar="ID",
        help="only these values of --sample-key (e.g. --samples A1 B1 C1 D1)",
    )
    run.add_argument(
        "--spatial-smoothing",
        type=int,
        default=0,
        metavar="N",
        help="majority-vote rounds of each domain label with its spatial "
        "neighbours (default: %(default)s)",
    )
    run.add_argument(
        "--accelerator",
        default="auto",
        metavar="NAME",
        help="Lightning accelerator for training and embedding: auto, cpu, gpu "
        "(default: %(default)s)",
    )
    run.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    run.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress messages; only the final summary and errors",
    )
    # Advanced: size of the simulated study (used by the tests to keep runs short).
    run.add_argument(
        "--sim-grid", type=int, default=DEFAULT_SIM["grid_size"], help=argparse.SUPPRESS
    )
    run.add_argument(
        "--sim-patients", type=int, default=DEFAULT_SIM["n_patients"], help=argparse.SUPPRESS
    )
    run.add_argument(
        "--sim-sections",
        type=int,
        default=DEFAULT_SIM["n_sections_per_patient"],
        help=argparse.SUPPRESS,
    )
    run.add_argument(
        "--sim-genes", type=int, default=DEFAULT_SIM["n_genes"], help=argparse.SUPPRESS
    )
    run.set_defaults(func=cmd_run)
    return parser


# ------------------------------------------------------------------------------- progress output
class _Progress:
    """Numbered step messages with timings on stderr (silent with ``--quiet``)."""

    def __init__(self, n_steps: int, quiet: bool):
        self.n_steps, self.quiet, self.i = n_steps, quiet, 0
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"histovi: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, name: str):
        self.i += 1
        self.say(f"[{self.i}/{self.n_steps}] {name} ...")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        self.say(f"[{self.i}/{self.n_steps}] {name}: done in {self.timings[name]:.1f} s")

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


@contextlib.contextmanager
def _as_input_error(what: str):
    """Turn the library's validation errors (ValueError/KeyError with a fix) into exit code 2."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, KeyError, FileNotFoundError, IsADirectoryError, TypeError) as err:
        raise InputError(f"{what}: {_message(err)}") from err


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    """Keep the console readable: the numbered steps replace the libraries' INFO lines and
    Lightning banners; warnings are silenced; with ``--quiet`` progress bars go too."""
    names = (
        "lightning",
        "lightning.pytorch",
        "pytorch_lightning",
        "lightning.fabric",
        "scvi",
        "squidpy",
        "histovi",
    )
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR if quiet else logging.WARNING)
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if quiet:
            # tqdm bars of the library (tiles, clustering seeds) write to stderr directly
            devnull = stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115
            stack.enter_context(contextlib.redirect_stderr(devnull))
            stack.enter_context(contextlib.redirect_stdout(devnull))
        try:
            yield
        finally:
            for n, lvl in levels.items():
                logging.getLogger(n).setLevel(lvl)


# ------------------------------------------------------------------------------- pipeline stages
def load_input(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The spots to integrate and a description of where they came from."""
    import anndata as ad

    from . import datasets, io

    if args.input is None:
        for name in ("sim_grid", "sim_patients", "sim_sections", "sim_genes"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        sim = {
            "n_patients": args.sim_patients,
            "n_sections_per_patient": args.sim_sections,
            "grid_size": (args.sim_grid, args.sim_grid),
            "n_genes": args.sim_genes,
            "n_markers": min(25, args.sim_genes // 5),
            "with_images": True,
            "seed": args.seed,
        }
        adata = datasets.simulate(**sim)
        sim["grid_size"] = list(sim["grid_size"])
        return adata, {
            "input": "built-in simulated study (histovi.datasets.simulate)",
            **{f"simulate.{k}": v for k, v in sim.items()},
        }

    path = Path(args.input).expanduser()
    if not path.exists():
        raise InputError(
            f"--input {str(path)!r} does not exist: give a .h5ad file, a "
            "SpatialData .zarr store or a folder with one .h5ad and its images"
        )
    with _as_input_error(f"cannot read --input {str(path)!r}"):
        if path.suffix == ".zarr" or (path.is_dir() and (path / "zmetadata").exists()):
            import spatialdata

            from ._files import check_store_tree

            if path.is_dir():  # read file by file: no FIFO, no link out of the store
                check_store_tree(path, "--input")
            adata = io.from_spatialdata(spatialdata.read_zarr(path), sample_key=args.sample_key)
            kind = "SpatialData store"
        elif path.is_dir():
            adata = io.read_folder(path)
            kind = "folder (.h5ad + images)"
        elif path.suffix == ".h5ad":
            from ._files import check_regular_file
            from .io._folder import contain_image_files

            check_regular_file(path, "--input")  # a FIFO would block the reader forever
            try:
                adata = ad.read_h5ad(path)
            except OSError as err:  # h5py: not an HDF5 file, truncated, ...
                raise ValueError(
                    f"{err} (the file is corrupted, cut short or not an .h5ad)"
                ) from err
            # images it names lie beside it: a file from elsewhere must not make histovi read
            # (and draw into the report) images elsewhere on this machine
            contain_image_files(adata, path.parent, who=f"--input {str(path)!r}")
            kind = ".h5ad file"
        else:
            raise InputError(
                f"--input {str(path)!r}: unknown format {path.suffix!r}; give a "
                ".h5ad file, a SpatialData .zarr store or a folder"
            )
    return adata, {"input": str(path.resolve()), "input format": kind}


def check_input(adata: Any, args: argparse.Namespace) -> tuple[Any, str | None, str | None]:
    """Validate keys and subset samples; return ``(adata, layer, label_key)``."""
    from ._validation import check_counts

    key = args.sample_key
    if key not in adata.obs:
        raise InputError(
            f"--sample-key {key!r} is not a column of adata.obs (columns: "
            f"{', '.join(map(str, adata.obs.columns)) or 'none'}): pass the column that names "
            "each spot's section"
        )
    if adata.obs[key].isna().any():
        raise InputError(f"adata.obs[{key!r}] has missing values: give every spot a sample id")
    adata.obs[key] = adata.obs[key].astype(str).astype("category")
    if args.samples:
        known = set(adata.obs[key].cat.categories)
        unknown = [s for s in args.samples if s not in known]
        if unknown:
            raise InputError(
                f"--samples {' '.join(unknown)} not found in adata.obs[{key!r}] (values: "
                f"{', '.join(sorted(known))})"
            )
        adata = adata[adata.obs[key].isin(args.samples).to_numpy()].copy()
        adata.obs[key] = adata.obs[key].cat.remove_unused_categories()
    if "spatial" not in adata.obsm:
        raise InputError(
            "adata.obsm['spatial'] (spot centres) not found: store the spot "
            "coordinates there (scanpy / squidpy convention)"
        )

    layer = args.layer
    if layer is None and "counts" in adata.layers:
        layer = "counts"
    layers = [str(k) for k in adata.layers.keys() if k is not None]
    if layer is not None and layer not in layers:
        raise InputError(
            f"--layer {layer!r} is not in adata.layers ({', '.join(layers) or 'none'}): "
            "name the layer with raw counts, or leave --layer out to use X"
        )
    with _as_input_error("counts"):
        check_counts(adata, layer)

    label_key = args.label_key
    if label_key is not None and label_key.lower() == "none":
        label_key = None
    elif label_key is not None and label_key not in adata.obs:
        raise InputError(
            f"--label-key {label_key!r} is not a column of adata.obs: pass the column of the "
            "ground-truth labels, or 'none'"
        )
    elif label_key is None:
        label_key = next((c for c in LABEL_CANDIDATES if c in adata.obs), None)
    if label_key is not None and adata.obs[label_key].notna().sum() == 0:
        label_key = None
    if args.n_domains is not None and args.n_domains < 2:
        raise InputError(f"--n-domains {args.n_domains} must be at least 2")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise InputError(f"--max-epochs {args.max_epochs} must be at least 1")
    if args.n_top_genes < 0:
        raise InputError(f"--n-top-genes {args.n_top_genes} must be 0 (all genes) or positive")
    return adata, layer, label_key


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


def morphology(adata: Any, args: argparse.Namespace) -> str:
    """Embed the H&E tiles (or keep / skip the morphology view); return what was done."""
    from . import pp

    enc = args.encoder
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
    device = {"gpu": "cuda", "auto": "auto", "cpu": "cpu"}.get(args.accelerator, args.accelerator)
    with _as_input_error(f"morphology embedding with --encoder {enc!r}"):
        pp.embed_morphology(
            adata,
            encoder=enc,
            sample_key=args.sample_key,
            key_added=MORPHOLOGY_KEY,
            device=device,
            progress=not args.quiet,
            seed=args.seed,
        )
    valid = ~np.isnan(np.asarray(adata.obsm[MORPHOLOGY_KEY])).any(1)
    if not valid.any():
        adata.obsm.pop(MORPHOLOGY_KEY)
        return f"{enc}: no usable tile (trained without morphology)"
    return f"{enc}: {adata.obsm[MORPHOLOGY_KEY].shape[1]} features, {valid.sum()} of {len(valid)} spots with a tile"


def compute_metrics(
    adata: Any, label_key: str | None, sample_key: str
) -> tuple[dict[str, Any], pd.DataFrame]:
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
    result["per_sample"] = json.loads(per_sample.to_json(orient="records"))
    return result, per_sample


def figures(
    adata: Any, model: Any, out: Path, label_key: str | None, sample_key: str
) -> list[Path]:
    """Domain maps, UMAPs and training curves as PNG files in ``out``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from . import pl

    n = adata.obs[sample_key].nunique()
    ncols = min(n, 6 if n > 8 else 4)
    paths = []

    def save(fig, name):
        path = out / name
        with _atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
        paths.append(path)

    save(
        pl.domains(
            adata,
            color=DOMAIN_KEY,
            sample_key=sample_key,
            ncols=ncols,
            panel_size=3.0,
            title="histovi domains",
        ),
        "domains.png",
    )
    if label_key is not None:
        labelled = adata.obs[label_key].notna().groupby(adata.obs[sample_key], observed=True).any()
        samples = [s for s, has in labelled.items() if has]
        save(
            pl.domains(
                adata,
                color=label_key,
                sample_key=sample_key,
                samples=samples,
                ncols=min(len(samples), 4),
                panel_size=3.0,
                title=f"ground truth ({label_key})",
            ),
            "labels.png",
        )
    colors = [sample_key, DOMAIN_KEY] + ([label_key] if label_key is not None else [])
    save(
        pl.latent_umap(
            adata,
            use_rep=LATENT_KEY,
            color=colors,
            key_added="X_umap",
            random_state=0,
            panel_size=4.0,
        ),
        "umap.png",
    )
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


# ------------------------------------------------------------------------------- output folder
#: What ``histovi run`` writes into ``--out``: the only paths ``--overwrite`` replaces.
OUTPUT_FILES = (
    "adata.h5ad",
    "metrics.json",
    "report.html",
    "domains.png",
    "labels.png",
    "umap.png",
    "training.png",
)
OUTPUT_DIRS = ("model", "checkpoints")
#: Status of the run in ``--out``: its options, and 'running' until every output is written.
STATUS_FILE = ".histovi_run.json"
#: Options that do not change what a run computes.
_NEUTRAL_OPTIONS = ("out", "overwrite", "quiet", "func", "command")


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that decide a run's results (and the input file's size and time)."""
    options = {k: v for k, v in sorted(vars(args).items()) if k not in _NEUTRAL_OPTIONS}
    if args.input is not None:
        path = Path(args.input).expanduser()
        if path.exists():
            stat = path.stat()
            options["input"] = str(path.resolve())
            options["input_file"] = [int(stat.st_size), int(stat.st_mtime)]
    return json.loads(json.dumps(options, default=str))


@contextlib.contextmanager
def _atomic_file(path: Path):
    """Yield a temporary name beside ``path``; rename it to ``path`` once written."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


#: Files histovi writes inside its output folders (the only ones ``--overwrite`` removes there).
_DIR_FILES = {
    "model": ("model.pt", "adata.h5ad", "mdata.h5mu"),
    "checkpoints": ("last.ckpt",),
}


def _write_status(
    out: Path, status: str, options: dict[str, Any], written: dict[str, Any] | None = None
) -> None:
    """The run record: its status and options, and every output it wrote (name -> size and
    modification time, or 'dir'), so that ``--overwrite`` removes only what a run wrote."""
    from . import __version__

    record = {
        "status": status,
        "histovi": __version__,
        "options": options,
        "time": time.time(),
        "written": dict(written or {}),
    }
    with _atomic_file(out / STATUS_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def _file_stamp(path: Path) -> list[int]:
    st = os.lstat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _read_status(out: Path) -> dict[str, Any] | None:
    """The run record in ``out`` (None when there is none; status 'unreadable' when the file is
    not one: a folder, a FIFO, bad JSON)."""
    from ._files import open_regular

    path = out / STATUS_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        with open_regular(path, "run record") as f:
            status = json.loads(f.read().decode())
    except (OSError, ValueError):
        return {"status": "unreadable"}
    if not isinstance(status, dict) or not isinstance(status.get("status"), str):
        return {"status": "unreadable"}
    return status


def _existing_outputs(out: Path) -> list[str]:
    return [
        n for n in (*OUTPUT_FILES, *OUTPUT_DIRS) if (out / n).exists() or (out / n).is_symlink()
    ]


def _not_written_by_histovi(out: Path, status: dict[str, Any] | None) -> list[str]:
    """Output names in ``out`` that no histovi run recorded writing (or changed since)."""
    existing = _existing_outputs(out)
    if status is None or status.get("status") == "unreadable":
        return existing
    written = status.get("written")
    if not isinstance(written, dict):
        return []  # the record of an earlier histovi, which listed no files: its outputs
    bad = []
    for name in existing:
        path, rec = out / name, written.get(name)
        if rec is None:
            bad.append(name)
        elif rec == "dir":
            if path.is_symlink() or not path.is_dir():
                bad.append(name)
        elif path.is_symlink() or not path.is_file() or _file_stamp(path) != list(rec):
            bad.append(f"{name} (changed since histovi wrote it)")
    return bad


def _input_conflicts(out: Path, args: argparse.Namespace) -> list[str]:
    """Outputs of ``out`` that are (or hold, or lie in) the input: never to be replaced."""
    if args.input is None:
        return []
    from ._files import is_within

    inp = Path(args.input).expanduser()
    if not inp.exists():
        return []
    conflicts = []
    if inp.is_dir() and out.exists() and out.resolve() == inp.resolve():
        conflicts.append("--out is the --input folder")
    for name in (*OUTPUT_FILES, STATUS_FILE, *OUTPUT_DIRS):
        path = out / name
        if not path.exists():
            continue
        try:
            same = os.path.samefile(path, inp)
        except OSError:
            same = False
        if same or is_within(inp, path) or (inp.is_dir() and is_within(path, inp)):
            conflicts.append(name)
    return conflicts


def _remove_outputs(out: Path) -> None:
    """Remove the outputs a previous run wrote (checked by :func:`check_out`): its files, and
    in its folders only the files histovi writes there (a folder left non-empty is kept)."""
    for name in OUTPUT_FILES:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
    for name in OUTPUT_DIRS:
        _remove_histovi_dir(out / name)
    (out / STATUS_FILE).unlink(missing_ok=True)


def _remove_histovi_dir(folder: Path) -> None:
    if folder.is_symlink() or not folder.is_dir():
        return
    ours = _DIR_FILES.get(folder.name, ())
    for f in folder.iterdir():
        temporary = f.name.startswith(".") and f.name.endswith(".tmp")
        if (f.name in ours or temporary) and (f.is_file() or f.is_symlink()):
            f.unlink()
    try:
        folder.rmdir()
    except OSError:  # files histovi did not write: kept, and the folder with them
        pass


def check_out(out: Path, args: argparse.Namespace) -> str:
    """Check ``--out`` before any work; return 'new', 'resume' or 'overwrite'.

    An output that is (or holds) the input is refused whatever the options. A folder with a
    finished run (or with outputs and no status) is refused unless ``--overwrite``; with it,
    only files a histovi run recorded writing there are replaced (anything else under an output
    name is refused). One with an unfinished run of the same options is finished; one with an
    unfinished run of other options is refused.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file: pass a folder")
    conflicts = _input_conflicts(out, args)
    if conflicts:
        raise InputError(
            f"--out {str(out)!r} would replace the input {str(args.input)!r} "
            f"({', '.join(conflicts)}): histovi never writes over or deletes its input; choose "
            "another --out"
        )
    options = run_options(args)
    status = _read_status(out)
    existing = _existing_outputs(out)
    foreign = _not_written_by_histovi(out, status)
    if args.overwrite:
        if status is not None and status.get("status") == "unreadable":
            raise InputError(
                f"--out {str(out)!r} holds a {STATUS_FILE} that is not a histovi run record: "
                "histovi does not replace files it did not write; choose another --out"
            )
        if foreign:
            raise InputError(
                f"--out {str(out)!r} holds {', '.join(foreign)}, which no histovi run recorded "
                "writing there: --overwrite replaces only histovi's own outputs. Move them away "
                "or choose another --out"
            )
        return "overwrite" if existing or status else "new"
    if status is not None and status.get("status") == "running":
        before = status.get("options") or {}
        differ = sorted(k for k in set(before) | set(options) if before.get(k) != options.get(k))
        if differ:
            shown = ", ".join(
                f"--{k.replace('_', '-')} {before.get(k)!r} (now {options.get(k)!r})"
                for k in differ
            )
            raise InputError(
                f"--out {str(out)!r} holds an unfinished run with other options ({shown}): run "
                "the same command again to finish it, pass --overwrite to start over, or "
                "choose another --out"
            )
        if foreign:
            raise InputError(
                f"--out {str(out)!r} holds {', '.join(foreign)}, which the unfinished run did "
                "not write: move them away or choose another --out"
            )
        return "resume"
    if status is not None or existing:
        what = ", ".join(existing) or STATUS_FILE
        raise InputError(
            f"--out {str(out)!r} already holds the outputs of a previous run ({what}): pass "
            "--overwrite to replace them, or choose another --out"
        )
    return "new"


def start_out(out: Path, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Once the input is valid: remove a previous run's outputs (``--overwrite``) and mark the
    run as running. Returns the record of what the run has written (a resumed run's so far)."""
    written: dict[str, Any] = {}
    if mode == "resume":
        written = dict((_read_status(out) or {}).get("written") or {})
    written["checkpoints"] = "dir"  # train(checkpoint_dir=) creates it
    try:
        if mode == "overwrite":
            _remove_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_status(out, "running", run_options(args), written)
    except OSError as err:
        raise InputError(f"cannot write into --out {str(out)!r}: {err.strerror or err}") from err
    return written


def _wrote(out: Path, written: dict[str, Any], name: str, options: dict[str, Any]) -> None:
    """Record that the run wrote ``out / name`` (a file's size and time, or a folder)."""
    path = out / name
    written[name] = "dir" if path.is_dir() else _file_stamp(path)
    _write_status(out, "running", options, written)


# ------------------------------------------------------------------------------- the command
def cmd_run(args: argparse.Namespace) -> int:
    """``histovi run``: see :func:`build_parser` for the options."""
    import scvi

    from . import HistoVI, pp, tl
    from ._report import write_report

    steps = [
        "load data",
        "select genes",
        "morphology embedding",
        "spatial neighbours",
        "train HistoVI",
        "domains",
        "metrics",
        "figures",
        "write outputs",
    ]
    prog = _Progress(len(steps), args.quiet)
    out = Path(args.out).expanduser()
    mode = check_out(out, args)
    if mode == "resume":
        prog.say(f"finishing the unfinished run in {out} (training resumes from its checkpoint)")
    settings: dict[str, Any] = {}

    with _quiet_libraries(args.quiet):
        scvi.settings.seed = args.seed
        with prog.step(steps[0]):
            adata, source = load_input(args)
            adata, layer, label_key = check_input(adata, args)
            # only now, with a valid input, are a previous run's outputs replaced
            written = start_out(out, args, mode)
            options = run_options(args)
            settings.update(source)
            prog.say(
                f"  {adata.n_obs} spots, {adata.n_vars} genes, "
                f"{adata.obs[args.sample_key].nunique()} samples; labels: {label_key}"
            )
        with prog.step(steps[1]):
            with _as_input_error("gene selection"):
                adata, how = select_genes(adata, layer, args.n_top_genes, args.sample_key)
            settings["genes"] = how
        with prog.step(steps[2]):
            settings["morphology"] = morphology(adata, args)
            prog.say(f"  {settings['morphology']}")
        with prog.step(steps[3]):
            with _as_input_error("spatial neighbours"):
                pp.spatial_neighbors(adata, sample_key=args.sample_key)
            settings["spatial neighbours"] = "6 nearest spots within each sample (squidpy)"
        with prog.step(steps[4]):
            morph = MORPHOLOGY_KEY if MORPHOLOGY_KEY in adata.obsm else None
            with _as_input_error("model setup"):
                HistoVI.setup_anndata(
                    adata,
                    layer=layer,
                    batch_key=args.sample_key,
                    morphology_key=morph,
                    neighbors_key=NEIGHBORS_KEY,
                    labels_key=None,
                )
            model = HistoVI(adata)
            # One training rule for the API and the CLI: the built-in study once trained a
            # fixed 40 epochs, too short for the batch-conditioned encoder to align its
            # patients (benchmarks/README.md, "Cycle weight").
            with _as_input_error("training"):
                model.train(
                    max_epochs=args.max_epochs,
                    accelerator=args.accelerator,
                    enable_progress_bar=not args.quiet,
                    enable_model_summary=False,
                    # a killed run, run again, resumes from its last completed epoch
                    checkpoint_dir=out / "checkpoints",
                )
            # epochs in all (a resumed run's history holds only the epochs run this time)
            n_epochs = int(model.history["elbo_train"].index[-1]) + 1
            settings["model"] = model._model_summary_string
            settings["epochs"] = n_epochs
            adata.obsm[LATENT_KEY] = model.get_latent_representation()
        with prog.step(steps[5]):
            n_domains = args.n_domains
            if n_domains is None and label_key is not None:
                from .metrics import n_label_classes

                n_domains = n_label_classes(adata.obs[label_key])
            method = "gmm" if n_domains is not None else "leiden"
            tl.domains(
                adata,
                n_domains=n_domains,
                use_rep=LATENT_KEY,
                method=method,
                spatial_smoothing=args.spatial_smoothing,
                sample_key=args.sample_key,
                key_added=DOMAIN_KEY,
                random_state=args.seed,
            )
            found = adata.obs[DOMAIN_KEY].nunique()
            settings["domains"] = (
                f"{method}, {found} domains"
                + (
                    " (k from --n-domains)"
                    if args.n_domains
                    else f" (k = label classes in obs['{label_key}'])"
                    if n_domains
                    else ""
                )
                + (f", {args.spatial_smoothing} smoothing rounds" if args.spatial_smoothing else "")
            )
        with prog.step(steps[6]):
            result, per_sample = compute_metrics(adata, label_key, args.sample_key)
        with prog.step(steps[7]):
            pngs = figures(adata, model, out, label_key, args.sample_key)
            for png in pngs:
                _wrote(out, written, png.name, options)
        with prog.step(steps[8]):
            settings.update(
                {
                    "sample key": args.sample_key,
                    "layer": layer or "X",
                    "label key": label_key or "none",
                    "seed": args.seed,
                    "accelerator": args.accelerator,
                    "output": str(out.resolve()),
                }
            )
            model.save(out / "model", overwrite=True, save_anndata=False)
            _wrote(out, written, "model", options)
            for key in [k for k in adata.uns if k.endswith("_colors") or k in ("histovi",)]:
                adata.uns[key] = _h5ad_safe(adata.uns[key])
            adata.uns["histovi_run"] = _h5ad_safe({"settings": settings})
            with _atomic_file(out / "adata.h5ad") as tmp:
                adata.write_h5ad(tmp)
            _wrote(out, written, "adata.h5ad", options)
            summary = {
                "n_spots": int(adata.n_obs),
                "n_genes": int(adata.n_vars),
                "n_samples": int(adata.obs[args.sample_key].nunique()),
                "n_domains": int(adata.obs[DOMAIN_KEY].nunique()),
                "label_key": label_key,
                "epochs": n_epochs,
                "final_elbo_train": float(model.history["elbo_train"].iloc[-1, 0]),
            }
            metrics_json = {
                "summary": summary,
                "settings": settings,
                "timings_s": prog.timings,
                **result,
            }
            with _atomic_file(out / "metrics.json") as tmp:
                tmp.write_text(json.dumps(metrics_json, indent=2, default=str))
            _wrote(out, written, "metrics.json", options)
            report = out / "report.html"
            with _atomic_file(report) as tmp:
                write_report(
                    tmp,
                    settings=settings,
                    summary=summary,
                    metrics=result,
                    per_sample=per_sample,
                    figures=pngs,
                    timings=prog.timings,
                )
            written["report.html"] = _file_stamp(report)
            # every output is complete: the run is finished and its checkpoint is not needed
            _remove_histovi_dir(out / "checkpoints")
            if not (out / "checkpoints").exists():
                written.pop("checkpoints", None)
            _write_status(out, "complete", options, written)

    headline = [f"{k} {result[k]:.3f}" for k in ("ARI_mean", "NMI_mean") if k in result]
    headline.append(f"spatial coherence {result['spatial_coherence']:.3f}")
    print(
        f"histovi run finished in {prog.total:.0f} s: {summary['n_spots']} spots, "
        f"{summary['n_samples']} samples, {summary['n_domains']} domains; "
        + ", ".join(headline)
        + f"\nreport: {report}\noutputs: {out.resolve()} (adata.h5ad, model/, metrics.json, *.png)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``histovi`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except InputError as err:
        print(f"histovi: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "histovi: interrupted; run the same command again to finish the run",
            file=sys.stderr,
        )
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns any failure into exit code 1
        from .model._training import TrainingDivergedError

        if isinstance(err, TrainingDivergedError):
            print(f"histovi: error: {err}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(
            "histovi: error: unexpected failure (traceback above); please report it with the "
            "command line you used",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
