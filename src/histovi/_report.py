"""A self-contained HTML report of a ``histovi run`` (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.1em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; min-width: 8em; }
.card .v { font-size: 1.5em; font-weight: 600; } .card .k { color: #666; font-size: 0.85em; }
"""

_CAPTIONS = {
    "domains.png": "Domains found by clustering the pooled latent space, one panel per section "
    "(over the H&E image where there is one). One clustering for all sections: a colour means "
    "the same domain everywhere.",
    "labels.png": "Ground-truth labels of the labelled sections, for comparison.",
    "umap.png": "UMAP of the latent space coloured by sample (well mixed = sample effect "
    "removed) and by domain (separated = structure kept).",
    "training.png": "Training curves (train and validation) of each loss term over epochs.",
}

_METRIC_HELP = {
    "ARI_mean": "adjusted Rand index of domains vs labels, mean over labelled sections",
    "NMI_mean": "normalised mutual information of domains vs labels, mean over labelled sections",
    "spatial_coherence": "fraction of neighbouring spot pairs in the same domain",
    "spatial_kappa": "coherence corrected for chance (0 = random, 1 = contiguous domains)",
    "iLISI": "batch mixing in the latent kNN graph (scib-metrics)",
    "silhouette_batch": "batch mixing by silhouette (scib-metrics)",
    "BRAS": "batch removal adapted silhouette (scib-metrics)",
    "graph_connectivity": "labels connected across batches in the kNN graph (scib-metrics)",
    "cLISI": "label separation in the latent kNN graph (scib-metrics)",
    "silhouette_label": "label separation by silhouette (scib-metrics)",
}


def _fmt(value: Any) -> tuple[str, bool]:
    if isinstance(value, float):
        return (f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"), True
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}", True
    return html.escape(str(value)), False


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for v in row:
            text, num = _fmt(v)
            cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _frame(df: pd.DataFrame) -> str:
    rows = [[None if pd.isna(v) else v for v in r] for r in df.itertuples(index=False)]
    rows = [
        [
            "–"
            if v is None
            else (
                float(v)
                if hasattr(v, "dtype") and v.dtype.kind == "f"
                else int(v)
                if hasattr(v, "dtype") and v.dtype.kind in "iu"
                else v
            )
            for v in r
        ]
        for r in rows
    ]
    return _table(rows, list(df.columns))


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(_CAPTIONS.get(path.name, path.stem))
    return (
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def write_report(
    path: str | Path,
    settings: Mapping[str, Any],
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    per_sample: pd.DataFrame,
    figures: Sequence[Path],
    timings: Mapping[str, float],
) -> Path:
    """Write ``report.html``: headline numbers, metrics, per-sample scores, figures, settings.

    Parameters
    ----------
    path
        File to write.
    settings
        What was run (input, genes, encoder, model, epochs, ...), shown as a table.
    summary
        Data size and training facts (spots, samples, domains, epochs, final ELBO).
    metrics
        Scalar metrics (keys of ``_METRIC_HELP`` are explained; lists and dicts are skipped).
    per_sample
        One row per sample (ARI/NMI when labels exist, spatial coherence, kappa).
    figures
        PNG files embedded in order.
    timings
        Seconds per pipeline step.

    Returns
    -------
    The path written.
    """
    from . import __version__

    path = Path(path)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    cards = [
        ("spots", summary["n_spots"]),
        ("samples", summary["n_samples"]),
        ("domains", summary["n_domains"]),
    ]
    cards += [
        (k.replace("_mean", ""), scalars[k]) for k in ("ARI_mean", "NMI_mean") if k in scalars
    ]
    cards.append(("spatial coherence", scalars["spatial_coherence"]))
    card_html = "".join(
        f'<div class="card"><div class="v">{_fmt(v)[0]}</div><div class="k">{html.escape(k)}</div></div>'
        for k, v in cards
    )
    metric_rows = [[k, v, _METRIC_HELP.get(k, "")] for k, v in scalars.items()]
    body = [
        "<h1>histovi run</h1>",
        f'<p class="sub">histovi {html.escape(__version__)} · '
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · "  # noqa: UP017
        f"{sum(timings.values()):.0f} s</p>",
        f'<div class="cards">{card_html}</div>',
        "<h2>Metrics</h2>",
        _table(metric_rows, ["metric", "value", "meaning"]),
        "<h2>Per sample</h2>",
        _frame(per_sample),
        "<h2>Figures</h2>",
        *[_img(Path(f)) for f in figures],
        "<h2>Settings</h2>",
        _table([[k, v] for k, v in settings.items()], ["setting", "value"]),
        "<h2>Training</h2>",
        _table([[k, v] for k, v in summary.items()], ["", ""]),
        "<h2>Timings</h2>",
        _table([[k, v] for k, v in timings.items()], ["step", "seconds"]),
        "<p class='sub'>Outputs next to this file: adata.h5ad (obsm['X_histovi'] latent, "
        "obs['histovi_domain'] domains), model/ (histovi.HistoVI.load), metrics.json.</p>",
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>histovi report</title><style>"
        + _CSS
        + "</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
