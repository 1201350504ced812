"""A self-contained HTML report of a ``histovi run`` (a jinja2 template; figures embedded as
base64 PNG)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

#: What each headline metric measures: (range and which way is good, meaning).
METRIC_HELP = {
    "ARI_mean": (
        "-0.5 to 1; higher is better: 1 = domains identical to the labels, 0 = chance",
        "adjusted Rand index of the domains against the labels, mean over labelled sections",
    ),
    "NMI_mean": (
        "0 to 1; higher is better: 1 = identical, 0 = independent",
        "normalised mutual information of the domains and the labels, mean over sections",
    ),
    "spatial_coherence": (
        "0 to 1; higher = more contiguous domains (1 is trivial with a single domain)",
        "share of neighbouring spot pairs that fall in the same domain",
    ),
    "spatial_kappa": (
        "-1 to 1; higher is better: 0 = as contiguous as random labels, 1 = fully contiguous",
        "spatial coherence corrected for chance (Cohen's kappa over neighbour pairs)",
    ),
    "iLISI": (
        "0 to 1; higher = sections better mixed",
        "batch mixing: how many sections a spot's latent neighbours come from (scib-metrics)",
    ),
    "silhouette_batch": (
        "0 to 1; higher = sections better mixed within each label",
        "batch mixing by silhouette width (scib-metrics)",
    ),
    "BRAS": (
        "0 to 1; higher = sections better mixed",
        "batch removal adapted silhouette (scib-metrics)",
    ),
    "graph_connectivity": (
        "0 to 1; higher is better: 1 = every label one connected piece across sections",
        "whether each label's spots stay connected in the latent kNN graph (scib-metrics)",
    ),
    "cLISI": (
        "0 to 1; higher = labels better separated",
        "label purity of each spot's latent neighbours (scib-metrics)",
    ),
    "silhouette_label": (
        "0 to 1; higher = labels better separated",
        "silhouette width of the labels in the latent space, rescaled (scib-metrics)",
    ),
}

_TEMPLATE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>histovi report</title><style>
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
.note { background: #fff8e6; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
</style></head><body>
<h1>histovi run</h1>
<p class="sub">histovi {{ version }} · {{ date }} · {{ seconds }} s</p>
<div class="cards">{% for k, v in cards %}<div class="card"><div class="v">{{ v }}</div>
<div class="k">{{ k }}</div></div>{% endfor %}</div>
{% macro table(header, rows) -%}
<table><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for text, num in row %}<td{% if num %} class="num"{% endif %}>
{{- text }}</td>{% endfor %}</tr>
{% endfor %}</table>
{%- endmacro %}
<h2>Metrics</h2>
{{ table(["metric", "value", "range; which way is good", "meaning"], metrics) }}
{% if missing %}<h2>Sections without an image</h2>
<div class="note"><p>{{ missing.sections | join(", ") }} {{ "has" if missing.sections | length == 1
else "have" }} no H&amp;E image, so {{ "its" if missing.sections | length == 1 else "their" }}
spots have no morphology view: the model places them by their expression and neighbourhood
alone. ARI there is {{ "%.2f" | format(missing.ARI_without_image) }} against
{{ "%.2f" | format(missing.ARI_with_image) }} on the sections with an image.
{% if missing.labels_found_less %}Labels found less often without an image (share of the
label's spots in the domain matched to it, with / without an image):
{% for r in missing.labels_found_less %}{{ r.label }} {{ "%.0f%% / %.0f%%" | format(100 *
r.with_image, 100 * r.without_image) }}{{ "; " if not loop.last else "." }}
{% endfor %}{% endif %}
{% if missing.morphology_only_pairs %}In this simulated study
{% for a, b in missing.morphology_only_pairs %}{{ a }} and {{ b }}{{ ", " if not loop.last }}
{% endfor %} share one expression programme and differ only in their morphology: without an
image nothing can tell them apart.{% endif %}</p></div>{% endif %}
<h2>Per sample</h2>
{{ table(per_sample_header, per_sample) }}
{% if domain_labels %}<h2>Domains and the labels they match</h2>
<p>Each domain is paired with one label (one to one, most shared spots); the figures colour a
domain like its label. "share" is the fraction of the domain's labelled spots that carry it.</p>
{{ table(["domain", "label", "spots", "share"], domain_labels) }}{% endif %}
<h2>Figures</h2>
{% for src, alt, caption in figures %}<figure><img alt="{{ alt }}" src="{{ src }}">
<figcaption>{{ caption }}</figcaption></figure>
{% endfor %}
<h2>Settings</h2>
{{ table(["setting", "value"], settings) }}
<h2>Training</h2>
{{ table(["", ""], summary) }}
<h2>Timings</h2>
{{ table(["step", "seconds"], timings) }}
<p class="sub">Outputs next to this file: adata.h5ad (obsm['X_histovi'] latent,
obs['histovi_domain'] domains), model/ (histovi.HistoVI.load), metrics.json.</p>
</body></html>
"""


def _fmt(value: Any) -> tuple[str, bool]:
    """Cell text and whether it is a number (right-aligned)."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–", False
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()  # numpy scalars
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, float):
        return (f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"), True
    if isinstance(value, int):
        return f"{value:,}", True
    return str(value), False


def _rows(rows: Sequence[Sequence[Any]]) -> list[list[tuple[str, bool]]]:
    return [[_fmt(v) for v in row] for row in rows]


def _captions(metrics: Mapping[str, Any], validation: bool) -> dict[str, str]:
    matched = "domain_labels" in metrics
    colours = (
        " Each domain has the colour of the label it matches (table above), as in every figure."
        if matched
        else " One clustering for all sections: a colour means the same domain everywhere."
    )
    splits = "training and validation" if validation else "training"
    return {
        "domains.png": "Domains found by clustering the pooled latent space, one panel per "
        "section (over the H&E image where there is one)." + colours,
        "labels.png": "Ground-truth labels of the labelled sections, in the colours of the "
        "domains matched to them.",
        "umap.png": "UMAP of the latent space coloured by sample (well mixed = sample effect "
        "removed), by domain and by label (separated = structure kept).",
        "training.png": f"The {splits} curve of each loss term over epochs "
        + (
            "(all spots train the model: there is no validation curve)."
            if splits == "training"
            else "."
        )
        + " Terms that stay constant are named below the panels instead of drawn.",
    }


def write_report(
    path: str | Path,
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    per_sample: pd.DataFrame,
    figures: Sequence[Path],
    validation: bool = False,
) -> Path:
    """Write ``report.html``: headline numbers, metrics with their meaning, sections without an
    image, per-sample scores, domains and their labels, figures, settings, timings.

    Parameters
    ----------
    path
        File to write.
    summary
        Data size and training facts (spots, samples, domains, epochs, final ELBO).
    metrics
        The content of ``metrics.json``: scalar metrics (explained when in
        :data:`METRIC_HELP`), ``settings``, ``timings_s`` and, when present,
        ``domain_labels`` and ``sections_without_image``.
    per_sample
        One row per sample (image, ARI/NMI when labels exist, spatial coherence, kappa).
    figures
        PNG files embedded in order.
    validation
        Whether the training curves include validation curves (for the caption).

    Returns
    -------
    The path written.
    """
    import jinja2

    from . import __version__

    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    order = list(METRIC_HELP)
    scalars = dict(sorted(scalars.items(), key=lambda kv: (order + [kv[0]]).index(kv[0])))
    cards = [("spots", summary["n_spots"]), ("samples", summary["n_samples"])]
    cards += [("domains", summary["n_domains"])]
    cards += [
        (k.replace("_mean", ""), scalars[k]) for k in ("ARI_mean", "NMI_mean") if k in scalars
    ]
    cards.append(("spatial coherence", scalars["spatial_coherence"]))
    captions = _captions(metrics, validation)
    timings = metrics.get("timings_s", {})
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    page = env.from_string(_TEMPLATE).render(
        version=__version__,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=f"{sum(timings.values()):.0f}",
        cards=[(k, _fmt(v)[0]) for k, v in cards],
        metrics=_rows([[k, v, *METRIC_HELP.get(k, ("", ""))] for k, v in scalars.items()]),
        missing=metrics.get("sections_without_image"),
        per_sample_header=list(per_sample.columns),
        per_sample=_rows(per_sample.itertuples(index=False)),
        domain_labels=_rows(
            [
                [r["domain"], r["label"], r["spots"], r["share"]]
                for r in metrics.get("domain_labels", [])
            ]
        ),
        figures=[
            (
                "data:image/png;base64," + base64.b64encode(Path(f).read_bytes()).decode("ascii"),
                Path(f).stem,
                captions.get(Path(f).name, Path(f).stem),
            )
            for f in figures
        ],
        settings=_rows(list(metrics.get("settings", {}).items())),
        summary=_rows(list(summary.items())),
        timings=_rows(list(timings.items())),
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
