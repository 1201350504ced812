"""The ``histovi`` command line: ``histovi run`` does the whole job in one call.

A thin shell over :func:`histovi.pipeline.run` (which a notebook can call too): it parses the
options, runs the pipeline and turns its errors into exit codes. Only the standard library is
imported until a run starts, so ``--help`` and a bad command line answer at once.

Exit codes: 0 success, 2 bad input or usage (one line ``histovi: error: ...`` on stderr, no
traceback), 1 training diverged (one line) or unexpected failure (traceback on stderr), 130
interrupted.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from ._outdir import STATUS_FILE
from .pipeline import DOMAIN_KEY, InputError, RunOptions

__all__ = ["DOMAIN_KEY", "STATUS_FILE", "build_parser", "main", "options"]

EPILOG = """\
what it writes into --out:
  adata.h5ad     the spots with the latent (obsm['X_histovi']), the domains
                 (obs['histovi_domain']) and the morphology embedding (obsm['X_morphology'])
  model/         the trained HistoVI model (histovi.HistoVI.load('model', adata))
  metrics.json   per-sample ARI/NMI (when labels exist), spatial coherence, scib-metrics scores
  *.png          domains per section, UMAP by sample, domain and label, training curves
  report.html    one self-contained page with all of the above and the settings used
  .histovi_run.json  the run's options and status ('running' until every output is written)

The options and the input are checked first, then --out. A folder holding a finished run is
never overwritten without --overwrite, and --overwrite replaces only the files a histovi run
recorded writing there (never the input, never files of yours under an output name). A run
killed midway (Ctrl-C, crash, out of time) is finished by running the same command again:
training resumes from its last checkpoint (--out/checkpoints: after the first epoch, then at
most once a minute; removed once the run is complete).

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

The same run from Python: histovi.pipeline.run(out="histovi_out", max_epochs=50, ...).
"""

#: (flags, keyword arguments of add_argument) of the options that decide a run's results.
_RUN_OPTIONS: list[tuple[tuple[str, ...], dict]] = [
    (
        ("--input", "-i"),
        dict(
            metavar="PATH",
            help=".h5ad file, SpatialData .zarr store, or folder with one .h5ad and its images "
            "(default: the built-in simulated study)",
        ),
    ),
    (
        ("--sample-key",),
        dict(
            metavar="COL",
            help="obs column of the section / sample id; the unit whose effect is removed "
            "(default: %(default)s)",
        ),
    ),
    (
        ("--layer",),
        dict(
            metavar="NAME",
            help="layer with raw integer counts (default: layers['counts'] if present, else X)",
        ),
    ),
    (
        ("--label-key",),
        dict(
            metavar="COL",
            help="obs column of ground-truth labels used for scores and the number of domains "
            "(default: 'label' or 'domain' if present; 'none' to ignore labels)",
        ),
    ),
    (
        ("--n-domains",),
        dict(
            type=int,
            metavar="K",
            help="number of domains (default: number of label classes; without labels Leiden "
            "clustering chooses)",
        ),
    ),
    (
        ("--encoder",),
        dict(
            metavar="NAME",
            help="morphology encoder for the H&E tiles: 'stain-texture' (built-in, no weights), "
            "a timm name ('resnet50'), 'hf-hub:org/model', a weights file; 'precomputed' to use "
            "obsm['X_morphology'] as it is; 'none' to train without morphology "
            "(default: %(default)s)",
        ),
    ),
    (
        ("--max-epochs",),
        dict(
            type=int,
            metavar="N",
            help="training epochs (default: HistoVI.train's rule, 600,000 spot passes between "
            "20 and 400 epochs: 188 on the built-in study)",
        ),
    ),
    (
        ("--n-top-genes",),
        dict(
            type=int,
            metavar="N",
            help="highly variable genes kept (scanpy seurat_v3) when the data has more genes "
            "(default: %(default)s; 0 keeps all genes)",
        ),
    ),
    (
        ("--samples",),
        dict(nargs="+", metavar="ID", help="only these values of --sample-key (e.g. A1 B1 C1)"),
    ),
    (
        ("--spatial-smoothing",),
        dict(
            type=int,
            metavar="N",
            help="majority-vote rounds of each domain label with its spatial neighbours "
            "(default: %(default)s)",
        ),
    ),
    (
        ("--accelerator",),
        dict(
            metavar="NAME",
            help="Lightning accelerator for training and embedding: auto, cpu, gpu "
            "(default: %(default)s)",
        ),
    ),
    (("--seed",), dict(type=int, help="random seed (default: %(default)s)")),
    # size of the built-in simulated study (used by the tests to keep runs short)
    (("--sim-grid",), dict(type=int, help=argparse.SUPPRESS)),
    (("--sim-patients",), dict(type=int, help=argparse.SUPPRESS)),
    (("--sim-sections",), dict(type=int, help=argparse.SUPPRESS)),
    (("--sim-genes",), dict(type=int, help=argparse.SUPPRESS)),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``histovi`` argument parser (subcommands; ``run`` is the first)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="histovi",
        description=(
            "histovi integrates spatial transcriptomics spots from many samples and patients\n"
            "into one latent space learned from expression, H&E morphology and the spatial\n"
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
            "Run the whole histovi pipeline and write the results into one folder: read the\n"
            "spots (or simulate a study when --input is not given), embed the H&E tile of each\n"
            "spot, find spatial neighbours, train a HistoVI model, cluster its latent space into\n"
            "tissue domains, score them, draw figures and write report.html."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = RunOptions()
    for flags, kwargs in _RUN_OPTIONS:
        dest = flags[0].lstrip("-").replace("-", "_")
        run.add_argument(*flags, dest=dest, default=getattr(defaults, dest), **kwargs)
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
    talk = run.add_mutually_exclusive_group()
    talk.add_argument(
        "--quiet", "-q", action="store_true", help="no progress; only the summary and errors"
    )
    talk.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="also the libraries' log lines and warnings (Lightning, scvi-tools, squidpy)",
    )
    run.set_defaults(func=cmd_run)
    return parser


def options(args: argparse.Namespace) -> RunOptions:
    """The run's options from the parsed command line."""
    from dataclasses import fields

    return RunOptions(**{f.name: getattr(args, f.name) for f in fields(RunOptions)})


def cmd_run(args: argparse.Namespace) -> int:
    """``histovi run``: see :func:`build_parser` for the options."""
    from dataclasses import asdict

    from .pipeline import run

    result = run(
        args.out,
        overwrite=args.overwrite,
        quiet=args.quiet,
        verbose=args.verbose,
        **asdict(options(args)),
    )
    m, s = result.metrics, result.summary
    headline = [f"{k} {m[k]:.3f}" for k in ("ARI_mean", "NMI_mean") if k in m]
    headline.append(f"spatial coherence {m['spatial_coherence']:.3f}")
    print(
        f"histovi run finished in {result.seconds:.0f} s: {s['n_spots']} spots, "
        f"{s['n_samples']} samples, {s['n_domains']} domains; "
        + ", ".join(headline)
        + f"\nreport: {result.report}\noutputs: {result.out.resolve()} "
        "(adata.h5ad, model/, metrics.json, *.png)"
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
        print("histovi: interrupted; run the same command again to finish the run", file=sys.stderr)
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
