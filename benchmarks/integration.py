"""Cross-sample integration benchmark: HistoVI and its ablations against the peer methods.

Protocol (../shared/EVALUATION.md): every method embeds the same genes of the same pooled
sections; every embedding is clustered the same way (GMM and k-means, k = number of labels,
all spots clustered, labelled spots scored per section with ARI / NMI) with the training seed as
the clustering seed; scib-metrics batch / bio scores on labelled spots; wall time and peak
memory per method.

Usage::

    python benchmarks/integration.py --data sim --methods all --seeds 0 1 2 \\
        --out benchmarks/results/integration

Writes ``<out>/<data>/``: ``table.md`` (also printed), ``results.json``, ``per_section.csv``,
``scores_ARI.png``, ``scores_NMI.png`` and ``domains_<method>.png`` (best seed).

Cost measurement: each method runs in its own Python process (all seeds in it), which imports the
method's libraries and loads the prepared data *before* the memory baseline is taken. Peak memory
is the process's peak resident set size while the method runs minus its RSS just before the
first seed: the larger of (a) a psutil sampler (every 20 ms) and (b) ``resource.getrusage``'s
``ru_maxrss`` when it rose during the method. torch's CPU allocations are seen (tracemalloc would
miss them). Wall time is ``time.perf_counter`` around each seed's call. ``--in-process`` runs the
methods in this process (faster to start, used by the smoke test); its memory numbers are then
only the sampler's and are biased low for methods that reuse memory freed by earlier ones.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data  # noqa: E402
import _methods  # noqa: E402

CLUSTERINGS = ("gmm", "kmeans")
REFERENCES = ("Harmony", "scVI")  # ARI ratios are reported against these


# --------------------------------------------------------------------------- cost measurement


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _maxrss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class PeakRSS:
    """Peak resident set size of this process while a block runs (psutil, every ``interval`` s)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def run_method(
    adata,
    method: str,
    seeds: Sequence[int],
    ctx: _methods.Context,
    emb_dir: Path,
    key: dict | None = None,
) -> dict[str, Any]:
    """Run one method for every seed in this process; save each embedding to ``emb_dir``.

    Returns a record with ``status`` ('ok' | 'failed'), per-seed ``runs`` (wall_s, info) and
    ``peak_mb`` (peak RSS above the RSS before the first seed). With ``key`` (the run's
    settings), each finished seed also leaves ``<method>_seed<S>.json`` beside its embedding,
    so that an interrupted run resumed with ``--reuse`` only trains the seeds it lacks.
    """
    fn, modules = _methods.resolve(method, ctx)
    for module in modules:  # import cost is not the method's
        importlib.import_module(module)
    record: dict[str, Any] = {"method": method, "status": "ok", "runs": []}
    rss0, maxrss0 = _rss_bytes(), _maxrss_bytes()
    with PeakRSS() as sampler:
        for seed in seeds:
            ctx.info = {}
            t0 = time.perf_counter()
            try:
                X = fn(adata, int(seed), ctx)
            except Exception as err:  # a failing peer is reported, never given fake numbers
                record.update(
                    status="failed",
                    error=f"{type(err).__name__}: {err}",
                    traceback=traceback.format_exc(limit=8),
                )
                break
            wall = time.perf_counter() - t0
            X = np.asarray(X, dtype=np.float32)
            if X.ndim != 2 or X.shape[0] != adata.n_obs or not np.isfinite(X).all():
                record.update(
                    status="failed",
                    error=f"bad embedding: shape {X.shape}, finite={bool(np.isfinite(X).all())}",
                )
                break
            ctx.previous[(method, int(seed))] = X
            np.save(emb_dir / f"{_safe(method)}_seed{seed}.npy", X)
            run = {"seed": int(seed), "wall_s": wall, "info": dict(ctx.info)}
            record["runs"].append(run)
            if key is not None:
                seed_peak = max(sampler.peak, _maxrss_bytes()) - rss0
                # written aside and renamed, so a kill mid-write leaves no half record
                path = emb_dir / f"{_safe(method)}_seed{seed}.json"
                path.with_suffix(".tmp").write_text(
                    json.dumps(
                        {"key": key, "run": run, "peak_mb": max(seed_peak, 0) / 2**20},
                        default=str,
                    )
                )
                path.with_suffix(".tmp").replace(path)
    maxrss1 = _maxrss_bytes()
    peak = sampler.peak - rss0
    if maxrss1 > maxrss0:
        peak = max(peak, maxrss1 - rss0)
    record["peak_mb"] = max(peak, 0) / 2**20
    record["baseline_rss_mb"] = rss0 / 2**20
    return record


def _finished_seeds(emb_dir: Path, method: str, key: dict) -> dict[int, dict]:
    """Seeds of ``method`` that an earlier, interrupted run with the same settings finished:
    their per-seed record and embedding are both on disk."""
    done = {}
    for seed in key["seeds"]:
        stem = emb_dir / f"{_safe(method)}_seed{seed}"
        path = stem.with_suffix(".json")
        if not (path.exists() and stem.with_suffix(".npy").exists()):
            continue
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"[{method}] {path.name} is unreadable: seed {seed} runs again", flush=True)
            continue
        same = {k: v for k, v in saved["key"].items() if k != "seeds"} == {
            k: v for k, v in key.items() if k != "seeds"
        }
        if same:
            done[int(seed)] = saved
    return done


def _limit_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads. On a shared, oversubscribed CPU, OpenMP threads spin while
    waiting: one scVI epoch on her2st cost 5x more CPU time with 2 threads than with 1."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _worker(spec_path: str) -> None:
    """Entry point of a method's own process (``--worker spec.json``)."""
    import anndata as ad

    spec = json.loads(Path(spec_path).read_text())
    _limit_threads(spec.get("threads"))
    ctx = _methods.Context(max_epochs=spec["max_epochs"], histovi_variants=spec["variants"])
    adata = ad.read_h5ad(spec["prepared"])
    emb_dir = Path(spec["emb_dir"])
    for dep in spec.get("previous", []):
        for seed in spec["seeds"]:
            path = emb_dir / f"{_safe(dep)}_seed{seed}.npy"
            if path.exists():
                ctx.previous[(dep, int(seed))] = np.load(path)
    record = run_method(adata, spec["method"], spec["seeds"], ctx, emb_dir, spec.get("key"))
    Path(spec["record"]).write_text(json.dumps(record, default=str))


def _run_isolated(
    method: str,
    seeds: Sequence[int],
    prepared: Path,
    work: Path,
    max_epochs: int | None,
    variants: dict,
    previous: list[str],
    threads: int | None = None,
    key: dict | None = None,
) -> dict[str, Any]:
    spec = {
        "key": key,
        "method": method,
        "seeds": [int(s) for s in seeds],
        "prepared": str(prepared),
        "emb_dir": str(work / "embeddings"),
        "max_epochs": max_epochs,
        "variants": variants,
        "previous": previous,
        "record": str(work / f"record_{_safe(method)}.json"),
        "threads": threads,
    }
    spec_path = work / f"spec_{_safe(method)}.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"log_{_safe(method)}.txt"
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=str(work),
        )
    record_path = Path(spec["record"])
    if proc.returncode != 0 or not record_path.exists():
        tail = log.read_text()[-1500:]
        return {
            "method": method,
            "status": "failed",
            "runs": [],
            "error": f"worker exited with code {proc.returncode}; log tail:\n{tail}",
        }
    return json.loads(record_path.read_text())


# --------------------------------------------------------------------------- scoring


def _labels_samples(adata) -> tuple[np.ndarray, np.ndarray]:
    labels = adata.obs[_data.LABEL_KEY].astype(object).to_numpy()
    samples = adata.obs[_data.SAMPLE_KEY].astype(str).to_numpy()
    return labels, samples


def score_embedding(
    adata, X: np.ndarray, method: str, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Protocol scores of one embedding: per-section ARI/NMI and scib-metrics scores."""
    import anndata as ad

    import histovi

    labels, samples = _labels_samples(adata)
    per = histovi.metrics.cluster_and_score(
        X, labels, samples, methods=CLUSTERINGS, seeds=[seed], ignore=_data.IGNORE_LABELS
    ).rename(columns={"method": "clustering"})
    per.insert(0, "embedding", method)
    light = ad.AnnData(
        obs=adata.obs[[_data.SAMPLE_KEY, _data.LABEL_KEY]].copy(), shape=(adata.n_obs, 0)
    )
    light.obsm["X"] = X
    integ = histovi.metrics.integration_scores(
        light,
        "X",
        batch_key=_data.SAMPLE_KEY,
        label_key=_data.LABEL_KEY,
        ignore=_data.IGNORE_LABELS,
    )
    integ.insert(0, "seed", seed)
    integ.insert(0, "embedding", method)
    return per, integ


def pair_probe(X: np.ndarray, labels: np.ndarray, pair: tuple[str, str], seed: int) -> float:
    """Whether the embedding holds the difference between the two domains at all, clustered or
    not: 5-fold balanced accuracy of a logistic regression (on standardised dimensions) telling
    the pair's spots apart, pooled over sections; 0.5 is chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sel = np.isin(labels, pair)
    y = labels[sel] == pair[0]
    if min(y.sum(), (~y).sum()) < 5:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, X[sel], y, cv=folds, scoring="balanced_accuracy").mean())


def pair_separation(adata, X: np.ndarray, method: str, seed: int) -> list[dict[str, Any]]:
    """For simulated domain pairs that only one view separates: ARI between the two domains and
    the protocol's clusters, restricted to the pair's spots, per section holding both (1: the
    pair falls in different clusters, 0: mixed), averaged over sections."""
    from sklearn.metrics import adjusted_rand_score

    import histovi

    labels, samples = _labels_samples(adata)
    labels = labels.astype(str)
    # only the pairs whose two domains the data hold (none in the layered scenarios)
    pairs = {n: p for n, p in _data.SIM_DOMAIN_PAIRS.items() if np.isin(p, labels).all()}
    if not pairs:
        return []
    k = histovi.metrics.n_label_classes(adata.obs[_data.LABEL_KEY], _data.IGNORE_LABELS)
    probes = {name: pair_probe(X, labels, pair, seed) for name, pair in pairs.items()}
    rows = []
    for clustering in CLUSTERINGS:
        clusters = histovi.tl.cluster_embedding(X, k, clustering, random_state=seed)
        for pair_name, (a, b) in pairs.items():
            scores = []
            for s in np.unique(samples):
                sel = (samples == s) & np.isin(labels, (a, b))
                if (labels[sel] == a).sum() >= 5 and (labels[sel] == b).sum() >= 5:
                    scores.append(adjusted_rand_score(labels[sel], clusters[sel]))
            if scores:
                rows.append(
                    {
                        "embedding": method,
                        "seed": seed,
                        "clustering": clustering,
                        "pair": pair_name,
                        "pair_ARI": float(np.mean(scores)),
                        "pair_probe": probes[pair_name],
                    }
                )
    return rows


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize_all(
    per: pd.DataFrame,
    integ: pd.DataFrame,
    records: dict[str, dict],
    methods: Sequence[str],
    pairs: pd.DataFrame | None,
) -> pd.DataFrame:
    """One row per method: ARI / NMI (mean over GMM and k-means, then mean ± sd over seeds),
    per clustering, scib-metrics batch / bio, cost and ratios to the references."""
    import histovi

    rows = []
    for method in methods:
        rec = records[method]
        row: dict[str, Any] = {"method": method, "status": rec["status"]}
        if rec["status"] != "ok" or method not in set(per["embedding"]):
            row["note"] = rec.get("error", "").splitlines()[0] if rec.get("error") else ""
            rows.append(row)
            continue
        p = per[per["embedding"] == method]
        both = histovi.metrics.summarize(p.drop(columns=["clustering"]))
        row["n_seeds"] = int(both["n_seeds"].iloc[0])
        for m in ("ARI", "NMI"):
            row[m], row[f"{m}_sd"] = (
                float(both[f"{m}_mean"].iloc[0]),
                float(both[f"{m}_std"].iloc[0]),
            )
        by = histovi.metrics.summarize(p)
        for _, r in by.iterrows():
            row[f"ARI_{r['clustering']}"] = float(r["ARI_mean"])
            row[f"NMI_{r['clustering']}"] = float(r["NMI_mean"])
        q = integ[integ["embedding"] == method]
        for metric, g in q.groupby("metric", sort=False):
            row[metric] = float(g["value"].mean())
        for kind in ("batch", "bio"):
            per_seed = q[q["kind"] == kind].groupby("seed")["value"].mean()
            row[kind], row[f"{kind}_sd"] = _mean_std(per_seed.to_numpy())
        if pairs is not None and not pairs.empty:
            pp = pairs[pairs["embedding"] == method]
            for pair, g in pp.groupby("pair", sort=False):
                row[f"pair: {pair}"] = float(g["pair_ARI"].mean())
                if "pair_probe" in g:
                    row[f"probe: {pair}"] = float(g["pair_probe"].mean())
        walls = [r["wall_s"] for r in rec["runs"]]
        # median: the first seed also pays one-off warm-up (numba / torch JIT, lazy imports)
        row["wall_s"], row["wall_s_first"] = float(np.median(walls)), float(walls[0])
        row["peak_mb"] = rec.get("peak_mb", float("nan"))
        epochs = {r["info"].get("epochs") for r in rec["runs"] if r["info"].get("epochs")}
        row["epochs"] = "/".join(str(e) for e in sorted(epochs)) if epochs else ""
        row["settings"] = rec["runs"][0]["info"].get("settings", "") if rec["runs"] else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    for ref in REFERENCES:
        ref_ari = (
            table.loc[(table["method"] == ref) & (table["status"] == "ok"), "ARI"]
            if "ARI" in table
            else pd.Series(dtype=float)
        )
        col = f"ARI/{ref}"
        table[col] = (
            table["ARI"] / float(ref_ari.iloc[0]) if len(ref_ari) and "ARI" in table else np.nan
        )
    return table


# --------------------------------------------------------------------------- reporting


def _fmt(x: Any, sd: Any = None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if sd is not None and isinstance(sd, float) and np.isfinite(sd):
        return f"{x:.{digits}f} ± {sd:.{digits}f}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(table: pd.DataFrame, title: str, notes: Sequence[str] = ()) -> str:
    """The main table, the scib-metrics detail and the pair separation as markdown."""
    from histovi.metrics import INTEGRATION_METRICS

    def get(r, k):
        v = r.get(k, np.nan)
        return v if not (isinstance(v, float) and np.isnan(v)) else None

    head = [
        "method",
        "ARI",
        "ARI GMM",
        "ARI k-means",
        "NMI",
        "batch",
        "bio",
        "wall s",
        "peak MB",
        "epochs",
        "ARI/Harmony",
        "ARI/scVI",
    ]
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for _, r in table.iterrows():
        if r["status"] != "ok":
            cells = [r["method"], f"{r['status']}: {r.get('note', '')}"[:160]] + [""] * (
                len(head) - 2
            )
        else:
            cells = [
                r["method"],
                _fmt(get(r, "ARI"), get(r, "ARI_sd")),
                _fmt(get(r, "ARI_gmm")),
                _fmt(get(r, "ARI_kmeans")),
                _fmt(get(r, "NMI"), get(r, "NMI_sd")),
                _fmt(get(r, "batch")),
                _fmt(get(r, "bio")),
                _fmt(get(r, "wall_s"), None, 1),
                _fmt(get(r, "peak_mb"), None, 0),
                str(r.get("epochs", "") or ""),
                _fmt(get(r, "ARI/Harmony"), None, 2),
                _fmt(get(r, "ARI/scVI"), None, 2),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    ok = table[table["status"] == "ok"]
    if len(ok):
        metrics = [m for m, _ in INTEGRATION_METRICS]
        lines += [
            "",
            "scib-metrics on labelled spots (mean over seeds):",
            "",
            "| method | " + " | ".join(metrics) + " |",
            "|---|" + "|".join("---" for _ in metrics) + "|",
        ]
        for _, r in ok.iterrows():
            lines.append(
                "| " + r["method"] + " | " + " | ".join(_fmt(get(r, m)) for m in metrics) + " |"
            )
        pair_cols = [c for c in table.columns if c.startswith("pair: ")]
        pair_cols += [c for c in table.columns if c.startswith("probe: ")]
        if pair_cols:
            heads = [c[6:] if c.startswith("pair: ") else c[7:] + " (probe)" for c in pair_cols]
            lines += [
                "",
                "Separation of domain pairs that one view alone separates (ARI on the "
                "pair's spots, mean over sections, clusterings and seeds; (probe): 5-fold "
                "balanced accuracy of a logistic regression telling the pair apart from the "
                "embedding, 0.5 = chance, i.e. whether the embedding holds the difference at "
                "all):",
                "",
                "| method | " + " | ".join(heads) + " |",
                "|---|" + "|".join("---" for _ in pair_cols) + "|",
            ]
            for _, r in ok.iterrows():
                lines.append(
                    "| "
                    + r["method"]
                    + " | "
                    + " | ".join(_fmt(get(r, c)) for c in pair_cols)
                    + " |"
                )
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _relabel(clusters: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Name clusters after the label they overlap most (Hungarian matching on labelled spots),
    so that colours of the domain maps are comparable with the ground truth."""
    from scipy.optimize import linear_sum_assignment

    cl = np.unique(clusters)
    lab = np.unique(labels[mask].astype(str))
    overlap = np.array(
        [[np.sum(mask & (clusters == c) & (labels.astype(str) == lb)) for lb in lab] for c in cl]
    )
    rows, cols = linear_sum_assignment(-overlap)
    names = {c: f"cluster {c}" for c in cl}
    for r, c in zip(rows, cols, strict=True):
        if overlap[r, c] > 0:
            names[cl[r]] = lab[c]
    return np.array([names[c] for c in clusters], dtype=object)


def figures(
    adata,
    per: pd.DataFrame,
    embeddings: dict[tuple[str, int], np.ndarray],
    out: Path,
    methods: Sequence[str],
    data_name: str,
) -> list[str]:
    """Scores bar plots and the domain maps of each method's best seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import histovi
    from histovi.tl._utils import labelled_mask

    written = []
    for metric in ("ARI", "NMI"):
        fig = histovi.pl.scores(
            per,
            metric=metric,
            x="embedding",
            hue="clustering",
            title=f"{data_name}: per-section {metric}",
            save=out / f"scores_{metric}.png",
        )
        plt.close(fig)
        written.append(f"scores_{metric}.png")
    labels, samples = _labels_samples(adata)
    mask = labelled_mask(labels.astype(object), _data.IGNORE_LABELS)
    shown = list(dict.fromkeys(samples[mask]))[:4]
    k = histovi.metrics.n_label_classes(adata.obs[_data.LABEL_KEY], _data.IGNORE_LABELS)
    import anndata as ad

    view = ad.AnnData(obs=adata.obs[[_data.SAMPLE_KEY]].copy(), shape=(adata.n_obs, 0))
    view.obsm["spatial"] = np.asarray(adata.obsm["spatial"])
    view.uns["spatial"] = adata.uns.get("spatial", {})
    gt = labels.astype(object).copy()
    gt[~mask] = "NA"
    img_root = _data.her2st_dir() if data_name == "her2st" else None

    def draw(domains, title: str, name: str) -> None:
        view.obs["domain"] = pd.Categorical(domains)
        fig = histovi.pl.domains(
            view, color="domain", samples=shown, img_root=img_root, title=title, save=out / name
        )
        plt.close(fig)
        written.append(name)

    draw(gt.astype(str), f"{data_name}: ground truth", "domains_truth.png")
    for method in methods:
        p = per[per["embedding"] == method]
        if p.empty:
            continue
        best = int(p.groupby("seed")["ARI"].mean().idxmax())
        clusters = histovi.tl.cluster_embedding(
            embeddings[(method, best)], k, "gmm", random_state=best
        )
        draw(
            _relabel(clusters, labels, mask),
            f"{data_name}: {method}, GMM, seed {best}",
            f"domains_{_safe(method)}.png",
        )
    return written


# --------------------------------------------------------------------------- driver


def run_benchmark(
    data: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    max_epochs: int | None = None,
    in_process: bool = False,
    histovi_variants: dict[str, dict] | None = None,
    make_figures: bool = True,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = 1,
    reuse: bool = False,
) -> dict[str, Any]:
    """Run the benchmark and write its outputs; returns the results as a dict.

    Parameters
    ----------
    data
        A scenario of :data:`_data.SCENARIOS` (``'her2st'``, ``'sim'``, ``'sim_weak_batch'``...).
    methods
        Method names (:func:`_methods.method_names`).
    seeds
        Training = clustering seeds (at least 3 for the protocol).
    out
        Output folder; results go to ``out/<data>/``.
    max_epochs
        Epochs of every neural method (``None``: HistoVI's rule, scVI the same number, AESTETIK
        its own default).
    in_process
        Run the methods in this process instead of one process per method.
    histovi_variants
        HistoVI variants (name -> model kwargs); defaults to ``_methods.HISTOVI_VARIANTS``.
    make_figures
        Draw the figures.
    cache_dir
        Cache of expensive inputs (her2st morphology); default ``benchmarks/results/cache``.
    threads
        torch threads per method (``None``: torch's default). 1 by default: on a shared CPU
        machine extra OpenMP threads mostly spin.
    reuse
        Reuse a method's finished record (and embeddings) from an earlier run in the same
        ``out/<data>/work`` when it ran with the same seeds, epochs and settings (resume an
        interrupted run, or add a method to a finished one); of a method that was interrupted,
        reuse the seeds it finished (same epochs and settings) and train only the others.
    """
    if not seeds:
        raise ValueError("`seeds` is empty: pass at least one seed (the protocol asks for 3).")
    variants = dict(_methods.HISTOVI_VARIANTS if histovi_variants is None else histovi_variants)
    ctx = _methods.Context(max_epochs=max_epochs, histovi_variants=variants)
    known = _methods.method_names(ctx)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise KeyError(f"Unknown methods {unknown}: choose from {known} (or 'all').")
    # known order runs scVI before scVI+agg, so that the latter reuses its latent
    methods = [m for m in known if m in set(methods)]
    out_dir = Path(out).resolve() / data  # absolute: workers run with cwd = work/
    work = out_dir / "work"
    (work / "embeddings").mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else Path(__file__).resolve().parent / "results" / "cache"

    t0 = time.perf_counter()
    adata = _data.load(data, cache_dir=cache)
    print(
        f"[data] {data}: {adata.n_obs} spots x {adata.n_vars} genes, "
        f"{adata.obs[_data.SAMPLE_KEY].nunique()} sections, morphology: "
        f"{adata.uns['benchmark']['morphology']} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    prepared = work / "prepared.h5ad"
    if not in_process:
        adata.write_h5ad(prepared)

    records: dict[str, dict] = {}
    embeddings: dict[tuple[str, int], np.ndarray] = {}
    if in_process:
        _limit_threads(threads)
    for method in methods:
        reason = _methods.unavailable_reason(method, ctx)
        if reason:
            records[method] = {
                "method": method,
                "status": "unavailable",
                "error": reason,
                "runs": [],
            }
            print(f"[{method}] unavailable: {reason}", flush=True)
            continue
        t = time.perf_counter()
        key = {
            "seeds": [int(x) for x in seeds],
            "max_epochs": max_epochs,
            "variant": variants.get(method),
            "n_obs": int(adata.n_obs),
            "n_vars": int(adata.n_vars),
        }
        old_path = work / f"record_{_safe(method)}.json"
        old = json.loads(old_path.read_text()) if reuse and old_path.exists() else None
        if old is not None and old.get("status") == "ok" and old.get("key") == key:
            records[method] = old
            for r in old["runs"]:
                path = work / "embeddings" / f"{_safe(method)}_seed{r['seed']}.npy"
                embeddings[(method, r["seed"])] = np.load(path)
            print(f"[{method}] reused from {old_path}", flush=True)
            continue
        done = _finished_seeds(work / "embeddings", method, key) if reuse else {}
        todo = [int(x) for x in seeds if int(x) not in done]
        if done:
            print(f"[{method}] seeds {sorted(done)} reused from an interrupted run", flush=True)
        if not todo:
            rec = {"method": method, "status": "ok", "runs": []}
        elif in_process:
            rec = run_method(adata, method, todo, ctx, work / "embeddings", key)
        else:
            rec = _run_isolated(
                method,
                todo,
                prepared,
                work,
                max_epochs,
                variants,
                previous=["scVI"] if method == "scVI+agg" else [],
                threads=threads,
                key=key,
            )
        if done:
            rec["runs"] = sorted(
                [d["run"] for d in done.values()] + rec["runs"], key=lambda r: r["seed"]
            )
            rec["peak_mb"] = max([rec.get("peak_mb", 0.0)] + [d["peak_mb"] for d in done.values()])
            rec["resumed_seeds"] = sorted(done)
        if method == "scVI+agg" and "scVI" in records and records["scVI"]["status"] == "ok":
            # the CellCharter latent is scVI's plus aggregation: charge scVI's cost to it too
            scvi_runs = {r["seed"]: r for r in records["scVI"]["runs"]}
            for r in rec["runs"]:
                if r["info"].get("reused_scVI") and r["seed"] in scvi_runs:
                    r["wall_s"] += scvi_runs[r["seed"]]["wall_s"]
                    r["info"].setdefault("epochs", scvi_runs[r["seed"]]["info"].get("epochs"))
            rec["peak_mb"] = max(rec.get("peak_mb", 0.0), records["scVI"].get("peak_mb", 0.0))
        rec["key"] = key
        rec["in_process"] = bool(in_process)
        old_path.write_text(json.dumps(rec, default=str))
        records[method] = rec
        for r in rec["runs"]:
            path = work / "embeddings" / f"{_safe(method)}_seed{r['seed']}.npy"
            embeddings[(method, r["seed"])] = np.load(path)
        status = rec["status"] + (
            f" ({rec.get('error', '')[:300]})" if rec["status"] != "ok" else ""
        )
        print(f"[{method}] {status}; {time.perf_counter() - t:.0f} s", flush=True)

    per_parts, integ_parts, pair_rows = [], [], []
    is_sim = data in _data.SIM_SCENARIOS
    for (method, seed), X in embeddings.items():
        per, integ = score_embedding(adata, X, method, seed)
        per_parts.append(per)
        integ_parts.append(integ)
        if is_sim:
            pair_rows += pair_separation(adata, X, method, seed)
    per = (
        pd.concat(per_parts, ignore_index=True)
        if per_parts
        else pd.DataFrame(
            columns=["embedding", "clustering", "seed", "sample", "n_spots", "ARI", "NMI"]
        )
    )
    integ = (
        pd.concat(integ_parts, ignore_index=True)
        if integ_parts
        else pd.DataFrame(columns=["embedding", "seed", "metric", "kind", "value"])
    )
    pairs = pd.DataFrame(pair_rows) if pair_rows else None
    table = summarize_all(per, integ, records, methods, pairs)

    notes = [
        f"{adata.n_obs} spots, {adata.n_vars} genes, {adata.obs[_data.SAMPLE_KEY].nunique()} "
        f"sections (batch = section); morphology: {adata.uns['benchmark']['morphology']}; "
        f"seeds {list(seeds)} (training seed = clustering seed).",
        "ARI / NMI: per labelled section, mean over sections, then over GMM and k-means "
        "(k = number of labels, all spots clustered); ± is the sd over seeds.",
        "batch / bio: mean of the scib-metrics batch (iLISI, silhouette_batch, BRAS, "
        "graph_connectivity) and bio (cLISI, silhouette_label) scores on labelled spots.",
        "wall s: per seed (median over seeds: the first seed also pays one-off warm-up); "
        "peak MB: peak RSS above the loaded data, one process per method"
        + (
            " (some methods ran in-process: their sampler-only peaks are biased low)"
            if any(r.get("in_process") for r in records.values())
            else ""
        )
        + ".",
        "max_epochs: "
        + (
            str(max_epochs) + " for every neural method"
            if max_epochs
            else "HistoVI's rule (scVI the same), AESTETIK's own default (100)"
        ),
    ]
    for m in methods:
        rec = records[m]
        if rec["status"] == "ok" and rec["runs"]:
            notes.append(f"{m}: {rec['runs'][0]['info'].get('settings', '')}")
        elif rec["status"] != "ok":
            notes.append(f"{m}: {rec['status']}: {rec.get('error', '')[:400]}")
    title = f"{data} — integration benchmark"
    md = markdown_table(table, title, notes)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(md)
    per.to_csv(out_dir / "per_section.csv", index=False)
    written = []
    if make_figures and not per.empty:
        written = figures(
            adata,
            per,
            embeddings,
            out_dir,
            [m for m in methods if records[m]["status"] == "ok"],
            data,
        )
    result = {
        "data": data,
        "config": {
            "methods": list(methods),
            "seeds": [int(s) for s in seeds],
            "max_epochs": max_epochs,
            "in_process": in_process,
            "histovi_variants": variants,
            **adata.uns["benchmark"],
        },
        "table": json.loads(table.to_json(orient="records")),
        "per_section": json.loads(per.to_json(orient="records")),
        "integration": json.loads(integ.to_json(orient="records")),
        "pairs": pair_rows,
        "records": records,
        "figures": written,
        "total_wall_s": time.perf_counter() - t0,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print(md, flush=True)
    return result


def rebuild_report(out_dir: str | os.PathLike) -> str:
    """Rewrite ``table.md`` of a finished run from its ``results.json`` (no recomputation)."""
    path = Path(out_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass the folder of a finished run.")
    res = json.loads(path.read_text())
    per, integ = pd.DataFrame(res["per_section"]), pd.DataFrame(res["integration"])
    pairs = pd.DataFrame(res["pairs"]) if res["pairs"] else None
    methods = res["config"]["methods"]
    table = summarize_all(per, integ, res["records"], methods, pairs)
    old = (Path(out_dir) / "table.md").read_text().split("\n- ", 1)
    notes = ("- " + old[1]).rstrip("\n").split("\n") if len(old) > 1 else []
    md = markdown_table(table, f"{res['data']} — integration benchmark", [n[2:] for n in notes])
    (Path(out_dir) / "table.md").write_text(md)
    return md


def merge_runs(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    data: str,
    methods: Sequence[str] | None = None,
) -> list[str]:
    """Pool finished methods of runs split over processes or machines (one seed each, say).

    Copies each source's ``<source>/<data>/work`` records and embeddings into ``out/<data>/work``,
    joining the seeds of one method when every source ran it with the same epochs, settings and
    data; :func:`run_benchmark` with ``reuse=True`` and the pooled seeds then only scores them.
    Only ``methods`` are taken when given (a source may hold others). A method and seed found in
    two sources is refused. Returns the merged method names.
    """
    work = Path(out).resolve() / data / "work"
    (work / "embeddings").mkdir(parents=True, exist_ok=True)
    merged: dict[str, dict] = {}
    for source in sources:
        src = Path(source).resolve() / data / "work"
        if not src.is_dir():
            raise FileNotFoundError(f"--merge {source}: no {src} (was it run with --data {data}?)")
        for path in sorted(src.glob("record_*.json")):
            rec = json.loads(path.read_text())
            if rec.get("status") != "ok":
                continue
            name = rec["method"]
            if methods is not None and name not in methods:
                continue
            if name in merged:
                have, key = merged[name], rec["key"]
                same = {k: v for k, v in key.items() if k != "seeds"}
                if same != {k: v for k, v in have["key"].items() if k != "seeds"}:
                    raise ValueError(
                        f"--merge: {name} ran with different settings in {source} ({same}) than "
                        f"in an earlier source ({have['key']}); merge only runs of one "
                        "configuration."
                    )
                # The same settings do not prove the same model: a library default may have
                # changed between two runs. Two runs of one seed are refused, not picked from.
                twice = sorted({r["seed"] for r in have["runs"]} & {r["seed"] for r in rec["runs"]})
                if twice:
                    raise ValueError(
                        f"--merge: {name} seed(s) {twice} are in {source} and in an earlier "
                        "source; pass each run of a method and seed once (leave one source "
                        "out, or leave the method out of --methods)."
                    )
            for r in rec["runs"]:
                emb = f"{_safe(name)}_seed{r['seed']}.npy"
                shutil.copyfile(src / "embeddings" / emb, work / "embeddings" / emb)
            if name not in merged:
                merged[name] = rec
                continue
            have["runs"] += rec["runs"]
            have["peak_mb"] = max(have.get("peak_mb", 0.0), rec.get("peak_mb", 0.0))
    for name, rec in merged.items():
        rec["runs"].sort(key=lambda r: r["seed"])
        rec["key"]["seeds"] = [r["seed"] for r in rec["runs"]]
        (work / f"record_{_safe(name)}.json").write_text(json.dumps(rec, default=str))
    return list(merged)


def _parse_variant(text: str) -> tuple[str, dict]:
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"--histovi-variant {text!r}: write NAME='{{\"alignment_weight\": 10}}'"
        )
    try:
        kwargs = json.loads(spec)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--histovi-variant {name}: bad JSON ({err})") from err
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError(f"--histovi-variant {name}: JSON must be an object")
    return name, kwargs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="sim", choices=_data.SCENARIOS)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["all"],
        help="method names, or 'all' / 'baselines' / 'histovi'; known: "
        + ", ".join(_methods.method_names()),
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/integration")
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="epochs of every neural method (default: the model's rule)",
    )
    parser.add_argument(
        "--histovi-variant",
        action="append",
        type=_parse_variant,
        default=[],
        metavar="NAME=JSON",
        help="extra HistoVI variant (model kwargs)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run methods in this process (no per-method memory isolation)",
    )
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per method (0: torch's default)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished methods of an earlier run in the same --out",
    )
    parser.add_argument(
        "--rebuild-report", metavar="DIR", help="only rewrite DIR/table.md from DIR/results.json"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="pool the finished methods of earlier --out DIRs (e.g. one seed each) into --out, "
        "then score them with --seeds (the pooled seeds) and --reuse",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if args.rebuild_report:
        print(rebuild_report(args.rebuild_report))
        return 0
    variants = dict(_methods.HISTOVI_VARIANTS)
    variants.update(dict(args.histovi_variant))
    ctx = _methods.Context(histovi_variants=variants)
    groups = {
        "all": _methods.method_names(ctx),
        "baselines": list(_methods.BASELINES),
        "histovi": list(variants),
    }
    methods: list[str] = []
    for m in args.methods:
        methods += groups.get(m, [m])
    if args.merge:
        merge_runs(args.merge, args.out, args.data, methods)
    run_benchmark(
        args.data,
        methods,
        args.seeds,
        args.out,
        max_epochs=args.max_epochs,
        in_process=args.in_process,
        histovi_variants=variants,
        make_figures=not args.no_figures,
        threads=args.threads or None,
        reuse=args.reuse or bool(args.merge),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
