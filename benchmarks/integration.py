"""Spatial-integration benchmark: methods x scenarios, every embedding scored the same way.

Protocol (../shared/EVALUATION.md): every method embeds the same genes of the same pooled
sections; every embedding is clustered the same way (GMM and k-means, k = number of labels,
all spots clustered, labelled spots scored per section with ARI / NMI) with the training seed as
the clustering seed; scib-metrics batch / bio scores on labelled spots; patient purity of the
k-means clusters where the data has ``obs['patient']``; wall time and peak memory per method.

Usage::

    # methods x scenarios, with a cross-scenario summary
    python benchmarks/integration.py --data sim sim_weak_batch her2st --methods all \\
        --seeds 0 1 2 --out benchmarks/results/integration
    # a quick comparison of HistoVI settings against scVI (no scib-metrics, no figures)
    python benchmarks/integration.py --data sim --seeds 0 --max-epochs 40 --fast \\
        --methods scVI HistoVI HistoVI:alignment_weight=20 HistoVI:use_niche=False,plan.lr=2e-3
    # the latent scored every 20 epochs during training
    python benchmarks/integration.py --data her2st --methods HistoVI scVI --seeds 0 --curve 20
    # label probe and cluster composition of a finished run's embeddings (nothing retrained)
    python benchmarks/integration.py --data her2st --methods PCA scVI HistoVI --seeds 0 \\
        --reuse --probe --embedding MyModel=latent.npy

Methods are named (``--methods``: names of :mod:`_methods`, or the groups ``all``,
``baselines``, ``histovi``), HistoVI variants written inline (``HistoVI:key=value,...`` or
``HistoVI-noMorph:key=value``; keys ``plan.*`` go to the training plan, ``train.*`` to
``train()``, ``setup.*`` to ``setup_anndata``, the rest to the model; ``scVI:key=value`` alike)
or given with ``--histovi-variant NAME=JSON``, and precomputed embeddings (``--embedding
NAME=PATH``).

Writes per scenario ``<out>/<data>/``: ``table.md`` (also printed), ``results.json``,
``per_section.csv``, ``scores_ARI.png``, ``scores_NMI.png`` and ``domains_<method>.png`` (best
seed); with ``--curve N`` ``curve.csv`` / ``curve.md`` / ``curve.png``; with ``--probe``
``label_probe.csv`` / ``.md`` and ``composition.csv`` / ``.md``. Across scenarios:
``<out>/summary.md`` and ``summary.csv`` (every ``<out>/<data>/results.json``: ARI per method and
scenario, its ratio to the better of Harmony and scVI, the rank).

Cost measurement: each method runs in its own Python process (all seeds in it), which imports the
method's libraries and loads the prepared data *before* the memory baseline is taken. Peak memory
is the process's peak resident set size while the method runs minus its RSS just before the
first seed: the larger of (a) a psutil sampler (every 20 ms) and (b) ``resource.getrusage``'s
``ru_maxrss`` when it rose during the method. torch's CPU allocations are seen (tracemalloc would
miss them). Wall time is ``time.perf_counter`` around each seed's call (less the ``--curve``
scoring). ``--in-process`` runs the methods in this process (faster to start, used by the smoke
test); its memory numbers are then only the sampler's and are biased low for methods that reuse
memory freed by earlier ones.
"""

from __future__ import annotations

import argparse
import hashlib
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
GROUP_KEY = "patient"  # purity and the probe's transfer are by patient where the data has it
EXTRAS = {"patient_purity": "purity", "latent_sd": "latent sd", "posterior_sd": "posterior sd"}


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
    ctx.score = ctx.score or clustering_score  # for --curve
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
            wall = time.perf_counter() - t0 - ctx.info.get("curve_s", 0.0)
            X = np.asarray(X, dtype=np.float32)
            if X.ndim != 2 or X.shape[0] != adata.n_obs or not np.isfinite(X).all():
                record.update(
                    status="failed",
                    error=f"bad embedding: shape {X.shape}, finite={bool(np.isfinite(X).all())}",
                )
                break
            ctx.previous[(method, int(seed))] = X
            np.save(emb_dir / f"{_safe(method)}_seed{seed}.npy", X)
            # other latents of the same model, scored as '<method>@<tag>' without retraining
            for tag, other in ctx.extra.items():
                ctx.previous[(f"{method}@{tag}", int(seed))] = other
                np.save(emb_dir / f"{_safe(f'{method}@{tag}')}_seed{seed}.npy", other)
            ctx.extra = {}
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
    """File-name stem of a method. An inline variant (``HistoVI:key=value,...``) is cut to 80
    characters and gets a hash of its whole name, so two variants never share files."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    if ":" in name:
        safe = safe[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return safe


def _context_spec(ctx: _methods.Context) -> dict[str, Any]:
    """What a worker process needs to rebuild the run's method context."""
    return {
        "max_epochs": ctx.max_epochs,
        "variants": ctx.histovi_variants,
        "curve_every": ctx.curve_every,
        "files": ctx.files,
    }


def _worker(spec_path: str) -> None:
    """Entry point of a method's own process (``--worker spec.json``)."""
    import anndata as ad

    spec = json.loads(Path(spec_path).read_text())
    _limit_threads(spec.get("threads"))
    c = spec["context"]
    ctx = _methods.Context(
        max_epochs=c["max_epochs"],
        histovi_variants=c["variants"],
        curve_every=c["curve_every"],
        files=c["files"],
    )
    adata = ad.read_h5ad(spec["prepared"])
    emb_dir = Path(spec["emb_dir"])
    for dep in spec.get("previous", []):
        for seed in spec["seeds"]:
            path = emb_dir / f"{_safe(dep)}_seed{seed}.npy"
            if path.exists():
                ctx.previous[(dep, int(seed))] = np.load(path)
    record = run_method(adata, spec["method"], spec["seeds"], ctx, emb_dir, spec.get("key"))
    Path(spec["record"]).write_text(json.dumps(record, default=str))


def _dependencies(method: str) -> list[str]:
    """Methods whose saved embeddings a method reuses (scVI+agg: scVI's; '<variant>@<tag>':
    its own file, written by the variant's run; '<variant>@agg': the variant's '@own')."""
    if method == "scVI+agg":
        return ["scVI"]
    base, tag = _methods.split_latent_tag(method)
    if tag is not None:
        return [f"{base}@{_methods.AGGREGATED_TAGS.get(tag, (tag,))[0]}"]
    return []


def _run_isolated(
    method: str,
    seeds: Sequence[int],
    prepared: Path,
    work: Path,
    ctx: _methods.Context,
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
        "context": _context_spec(ctx),
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


def _light(adata, X: np.ndarray | None = None, *columns: str):
    """An AnnData with only the sample and label columns (and ``columns``) of ``adata`` and the
    embedding ``X`` in ``obsm['X']``: what the metrics read."""
    import anndata as ad

    keys = list(dict.fromkeys([_data.SAMPLE_KEY, _data.LABEL_KEY, *columns]))
    light = ad.AnnData(obs=adata.obs[keys].copy(), shape=(adata.n_obs, 0))
    if X is not None:
        light.obsm["X"] = X
    return light


def _cluster(adata, X: np.ndarray, method: str, seed: int) -> np.ndarray:
    """The protocol's clustering: k = number of labels, all spots."""
    import histovi

    k = histovi.metrics.n_label_classes(adata.obs[_data.LABEL_KEY], _data.IGNORE_LABELS)
    return histovi.tl.cluster_embedding(X, k, method, random_state=seed)


def _cluster_and_score(adata, X: np.ndarray, seed: int) -> pd.DataFrame:
    import histovi

    labels, samples = _labels_samples(adata)
    return histovi.metrics.cluster_and_score(
        X, labels, samples, methods=CLUSTERINGS, seeds=[seed], ignore=_data.IGNORE_LABELS
    )


def clustering_score(adata, X: np.ndarray, seed: int) -> dict[str, float]:
    """The protocol's score of one embedding (what ``--curve`` records): ARI, mean over labelled
    sections and over GMM and k-means, ARI per clustering, and NMI."""
    s = _cluster_and_score(adata, X, seed)
    by = s.groupby("method")["ARI"].mean()
    return {
        "ARI": float(s["ARI"].mean()),
        **{f"ARI_{c}": float(by[c]) for c in CLUSTERINGS},
        "NMI": float(s["NMI"].mean()),
    }


def score_embedding(
    adata, X: np.ndarray, method: str, seed: int, integration: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Protocol scores of one embedding: per-section ARI/NMI and (with ``integration``)
    scib-metrics scores."""
    import histovi

    per = _cluster_and_score(adata, X, seed).rename(columns={"method": "clustering"})
    per.insert(0, "embedding", method)
    if not integration:
        return per, pd.DataFrame(columns=["embedding", "seed", "metric", "kind", "value"])
    integ = histovi.metrics.integration_scores(
        _light(adata, X),
        "X",
        batch_key=_data.SAMPLE_KEY,
        label_key=_data.LABEL_KEY,
        ignore=_data.IGNORE_LABELS,
    )
    integ.insert(0, "seed", seed)
    integ.insert(0, "embedding", method)
    return per, integ


def extra_scores(adata, X: np.ndarray, method: str, seed: int, info: dict) -> list[dict]:
    """Per-seed extras, as tidy rows: ``patient_purity`` (mean over k-means clusters of the
    share of their spots from their commonest patient, where the data has ``obs['patient']``:
    1 = every cluster is one patient's) and, from scVI / HistoVI, ``latent_sd`` (sd of the
    posterior means) and ``posterior_sd`` (means over latent dimensions)."""
    import histovi

    values = {k: info[k] for k in ("latent_sd", "posterior_sd") if k in info}
    if GROUP_KEY in adata.obs:
        light = _light(adata, None, GROUP_KEY)
        light.obs["cluster"] = _cluster(adata, X, "kmeans", seed)
        comp = histovi.metrics.cluster_composition(
            light, "cluster", _data.LABEL_KEY, GROUP_KEY, ignore=_data.IGNORE_LABELS
        )
        values["patient_purity"] = float(comp["group_share"].mean())
    return [{"embedding": method, "seed": seed, "metric": m, "value": v} for m, v in values.items()]


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

    labels, samples = _labels_samples(adata)
    labels = labels.astype(str)
    # only the pairs whose two domains the data hold (none in the layered scenarios)
    pairs = {n: p for n, p in _data.SIM_DOMAIN_PAIRS.items() if np.isin(p, labels).all()}
    if not pairs:
        return []
    probes = {name: pair_probe(X, labels, pair, seed) for name, pair in pairs.items()}
    rows = []
    for clustering in CLUSTERINGS:
        clusters = _cluster(adata, X, clustering, seed)
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


def pair_ceilings(adata) -> dict[str, float]:
    """For each simulated domain pair the data hold: the table's ARI (per labelled section, mean
    over sections) of a clustering that is the ground truth except that the pair is one
    cluster, i.e. the most an embedding that does not separate the pair can score."""
    from sklearn.metrics import adjusted_rand_score

    labels, samples = _labels_samples(adata)
    scored = pd.notna(labels) & ~np.isin(labels.astype(str), _data.IGNORE_LABELS)
    labels = labels.astype(str)
    ceilings = {}
    for name, (a, b) in _data.SIM_DOMAIN_PAIRS.items():
        if not np.isin((a, b), labels[scored]).all():
            continue
        merged = np.where(labels == a, b, labels)
        ceilings[name] = float(
            np.mean(
                [
                    adjusted_rand_score(labels[sel], merged[sel])
                    for s in np.unique(samples[scored])
                    for sel in [scored & (samples == s)]
                ]
            )
        )
    return ceilings


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize_all(
    per: pd.DataFrame,
    integ: pd.DataFrame,
    records: dict[str, dict],
    methods: Sequence[str],
    pairs: pd.DataFrame | None,
    extra: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per method: ARI / NMI (mean over GMM and k-means, then mean ± sd over seeds),
    per clustering, scib-metrics batch / bio, extras, cost and ratios to the references."""
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
            if (q["kind"] == kind).any():
                per_seed = q[q["kind"] == kind].groupby("seed")["value"].mean()
                row[kind], row[f"{kind}_sd"] = _mean_std(per_seed.to_numpy())
        if extra is not None and not extra.empty:
            for metric, g in extra[extra["embedding"] == method].groupby("metric", sort=False):
                row[metric] = float(g["value"].mean())
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


def _md(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a markdown table (floats with ``digits`` decimals, NaN as '–')."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, None, digits) for v in row) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(table: pd.DataFrame, title: str, notes: Sequence[str] = ()) -> str:
    """The main table, the scib-metrics detail and the pair separation as markdown."""
    from histovi.metrics import INTEGRATION_METRICS

    def get(r, k):
        v = r.get(k, np.nan)
        return v if not (isinstance(v, float) and np.isnan(v)) else None

    extras = {c: h for c, h in EXTRAS.items() if c in table and table[c].notna().any()}
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
        *extras.values(),
    ]
    rows = []
    for _, r in table.iterrows():
        if r["status"] != "ok":
            rows.append([r["method"], f"{r['status']}: {r.get('note', '')}"[:160]])
            continue
        rows.append(
            [
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
                *(_fmt(get(r, c), None, 2) for c in extras),
            ]
        )
    lines = [
        f"### {title}",
        "",
        _md(pd.DataFrame([r + [""] * (len(head) - len(r)) for r in rows], columns=head)),
    ]
    ok = table[table["status"] == "ok"]
    metrics = [m for m, _ in INTEGRATION_METRICS if m in table]
    if len(ok) and metrics:
        lines += [
            "scib-metrics on labelled spots (mean over seeds):",
            "",
            _md(ok[["method", *metrics]]),
        ]
    pair_cols = [c for c in table.columns if c.startswith("pair: ")]
    pair_cols += [c for c in table.columns if c.startswith("probe: ")]
    if len(ok) and pair_cols:
        heads = [c[6:] if c.startswith("pair: ") else c[7:] + " (probe)" for c in pair_cols]
        lines += [
            "Separation of domain pairs that one view alone separates (ARI on the "
            "pair's spots, mean over sections, clusterings and seeds; (probe): 5-fold "
            "balanced accuracy of a logistic regression telling the pair apart from the "
            "embedding, 0.5 = chance, i.e. whether the embedding holds the difference at "
            "all):",
            "",
            _md(ok[["method", *pair_cols]].set_axis(["method", *heads], axis=1)),
        ]
    if notes:
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip("\n") + "\n"


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
    view = _light(adata)
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
        clusters = _cluster(adata, embeddings[(method, best)], "gmm", best)
        draw(
            _relabel(clusters, labels, mask),
            f"{data_name}: {method}, GMM, seed {best}",
            f"domains_{_safe(method)}.png",
        )
    return written


def curve_tables(records: dict[str, dict], out: Path, title: str, make_figures: bool) -> list[str]:
    """``--curve``: the rows the neural methods recorded during training, as ``curve.csv``,
    ``curve.md`` (one table per method, mean over seeds) and ``curve.png``."""
    rows = [
        {"method": m, "seed": r["seed"], **c}
        for m, rec in records.items()
        for r in rec.get("runs", [])
        for c in r["info"].get("curve", [])
    ]
    if not rows:
        return []
    curve = pd.DataFrame(rows)
    curve.to_csv(out / "curve.csv", index=False)
    mean = curve.drop(columns="seed").groupby(["method", "epoch"], sort=False).mean()
    lines = [
        f"### {title}: the latent scored during training",
        "",
        "ARI / NMI as in the table (clustering seed = training seed), mean over seeds; ELBO of "
        "the training and the validation (10 %) spots; KL weight of the warm-up; train s: "
        "training time so far, scoring left out.",
        "",
    ]
    for method, g in mean.groupby(level="method", sort=False):
        lines += [f"#### {method}", "", _md(g.reset_index("epoch"))]
    (out / "curve.md").write_text("\n".join(lines))
    if not make_figures:
        return ["curve.csv", "curve.md"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, g in mean.groupby(level="method", sort=False):
        g = g.reset_index("epoch")
        ax[0].plot(g["epoch"], g["ARI"], "o-", label=method)
        ax[1].plot(g["epoch"], g["elbo_validation"], label=f"{method} (validation)")
    ax[0].set(xlabel="epoch", ylabel="ARI (mean GMM, k-means)", title=title)
    ax[1].set(xlabel="epoch", ylabel="validation ELBO (loss)")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=100)
    plt.close(fig)
    return ["curve.csv", "curve.md", "curve.png"]


def probe_tables(
    adata, embeddings: dict[tuple[str, int], np.ndarray], per: pd.DataFrame, out: Path, data: str
) -> list[str]:
    """``--probe``: :func:`histovi.metrics.label_probe` of every embedding and of two count-only
    references computed within each section (16 PCs of its log-normalised counts, and with the
    mean over each spot's spatial neighbours appended), and
    :func:`histovi.metrics.cluster_composition` of every embedding's GMM clusters (the
    protocol's, clustering seed = training seed) next to its score."""
    from histovi.metrics import cluster_composition, label_probe

    if not embeddings:
        return []
    group = GROUP_KEY if GROUP_KEY in adata.obs else _data.SAMPLE_KEY
    light = _light(adata, None, group)
    keys = {"label_key": _data.LABEL_KEY, "sample_key": _data.SAMPLE_KEY}
    probes, comps = [], []
    for (method, seed), X in embeddings.items():
        light.obsm["X"] = X
        probe = label_probe(
            light, "X", group_key=group, seed=seed, ignore=_data.IGNORE_LABELS, **keys
        )
        probes.append(probe.assign(embedding=method, seed=seed))
        light.obs["cluster"] = _cluster(adata, X, "gmm", seed)
        comp = cluster_composition(light, "cluster", _data.LABEL_KEY, group, _data.IGNORE_LABELS)
        p = per[(per["embedding"] == method) & (per["seed"] == seed)]
        comps.append(
            comp.assign(embedding=method, seed=seed, ARI=p["ARI"].mean(), rank=range(len(comp)))
        )
    samples = adata.obs[_data.SAMPLE_KEY].astype(str).to_numpy()
    nbrs = np.asarray(adata.obsm["spatial_neighbors"])
    for s in probes[0]["sample"]:  # the section-alone references
        idx = np.flatnonzero(samples == s)
        local = np.full(adata.n_obs, -1)
        local[idx] = np.arange(len(idx))
        pcs = _methods._pca_matrix(adata[idx], 0, n_comps=16)
        section = light[idx].copy()
        for name, X in (
            ("counts PCA, section alone", pcs),
            (
                "counts PCA + neighbour mean, section alone",
                np.hstack([pcs, pcs[local[nbrs[idx]]].mean(axis=1)]),
            ),
        ):
            section.obsm["X"] = X
            probes.append(
                label_probe(section, "X", ignore=_data.IGNORE_LABELS, **keys).assign(
                    embedding=name, seed=0
                )
            )
    table = pd.concat(probes, ignore_index=True)
    table.to_csv(out / "label_probe.csv", index=False)
    wide = table.pivot_table("within", "embedding", "sample", aggfunc="mean", sort=False)
    wide["mean"] = wide.mean(axis=1)
    across = table.pivot_table(
        "transfer", "embedding", "sample", aggfunc="mean", dropna=False, sort=False
    )
    across = across.reindex(wide.index).add_prefix("transfer ")
    across["transfer mean"] = across.mean(axis=1)
    wide = wide.join(across).sort_values("mean", ascending=False).reset_index()
    wide.insert(1, "seeds", wide["embedding"].map(table.groupby("embedding")["seed"].nunique()))
    chance = table.groupby("sample")["chance"].first()
    md = (
        f"Label probe on {data}: 5-fold balanced accuracy of a kNN classifier (k = 15) within "
        "each section (chance: " + ", ".join(f"{s} {c:.2f}" for s, c in chance.items()) + "); "
        f"transfer: a kNN classifier fitted on the labelled sections of the other {group}s "
        "predicts this section (balanced accuracy over the classes both have). The first says "
        "whether the embedding holds the labels within a section, the second whether the same "
        f"tissue of different {group}s lies in the same place. Mean over seeds.\n\n" + _md(wide)
    )
    comp = pd.concat(comps, ignore_index=True)
    comp.to_csv(out / "composition.csv", index=False)
    comp["cell"] = [
        f"{r.n_spots}; {r.group} ({r.group_share:.2f}); "
        + (f"{r.label} ({r.label_share:.2f})" if r.label else "no label")
        for r in comp.itertuples()
    ]
    cells = comp.pivot_table("cell", ["embedding", "seed", "ARI"], "rank", "first", sort=False)
    md_comp = (
        f"Where the clusters go on {data}: GMM on the pooled embedding, k = number of labels, "
        f"clusters largest first; each cell is `spots; commonest {group} (share); commonest "
        "label (share of the cluster's labelled spots)`. ARI: the table's score of the "
        "embedding and seed (GMM and k-means, mean over labelled sections).\n\n"
        + _md(cells.rename(columns=lambda i: f"cluster {i + 1}").reset_index().fillna(""))
    )
    (out / "label_probe.md").write_text(md)
    (out / "composition.md").write_text(md_comp)
    print(md + "\n" + md_comp, flush=True)
    return ["label_probe.csv", "label_probe.md", "composition.csv", "composition.md"]


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
    fast: bool = False,
    curve_every: int | None = None,
    probe: bool = False,
    n_neighbors: int | None = None,
    embedding_files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the benchmark on one scenario and write its outputs; returns the results as a dict.

    Parameters
    ----------
    data
        A scenario of :data:`_data.SCENARIOS` (``'her2st'``, ``'sim'``, ``'sim_weak_batch'``...).
    methods
        Method names (:func:`_methods.method_names`), inline variants
        (``HistoVI:key=value,...``, ``scVI:key=value,...``) and ``embedding_files`` names.
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
    fast
        No scib-metrics and no figures: quick comparisons.
    curve_every
        Score the latent of scVI / HistoVI methods every this many epochs during training
        (validation ELBO on 10 % of the spots): ``curve.csv`` / ``curve.md``.
    probe
        Label probe and cluster composition of every embedding (:func:`probe_tables`).
    n_neighbors
        Recompute the spatial neighbours with this k (default: the data's, 6).
    embedding_files
        Name -> ``.npy`` file of precomputed embeddings (rows = the data's spots), scored as
        methods.
    """
    if not seeds:
        raise ValueError("`seeds` is empty: pass at least one seed (the protocol asks for 3).")
    variants = dict(_methods.HISTOVI_VARIANTS if histovi_variants is None else histovi_variants)
    ctx = _methods.Context(
        max_epochs=max_epochs,
        histovi_variants=variants,
        curve_every=curve_every,
        files=dict(embedding_files or {}),
    )
    known = _methods.method_names(ctx)
    unknown = [m for m in methods if m not in known and _methods.variant_of(m, ctx) is None]
    if unknown:
        raise KeyError(
            f"Unknown methods {unknown}: choose from {known} (or 'all'), or write a variant "
            "inline as HistoVI:key=value,... or scVI:key=value,..."
        )
    # known order runs scVI before scVI+agg, so that the latter reuses its latent
    methods = [m for m in known if m in set(methods)] + [
        m for m in dict.fromkeys(methods) if m not in known
    ]
    out_dir = Path(out).resolve() / data  # absolute: workers run with cwd = work/
    work = out_dir / "work"
    (work / "embeddings").mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else Path(__file__).resolve().parent / "results" / "cache"

    t0 = time.perf_counter()
    adata = _data.load(data, cache_dir=cache)
    if n_neighbors:
        import histovi

        histovi.pp.spatial_neighbors(adata, sample_key=_data.SAMPLE_KEY, n_neighbors=n_neighbors)
        adata.uns["benchmark"]["n_neighbors"] = int(n_neighbors)
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
        variant = _methods.variant_of(method, ctx)
        key = {
            "seeds": [int(x) for x in seeds],
            "max_epochs": max_epochs,
            "variant": ctx.files.get(method) or (variant[1] if variant else None),
            "n_obs": int(adata.n_obs),
            "n_vars": int(adata.n_vars),
        }
        key.update({k: v for k, v in (("curve", curve_every), ("n_neighbors", n_neighbors)) if v})
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
                ctx,
                previous=_dependencies(method),
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

    per_parts, integ_parts, pair_rows, extra_rows = [], [], [], []
    is_sim = data in _data.SIM_SCENARIOS
    info = {(m, r["seed"]): r["info"] for m, rec in records.items() for r in rec["runs"]}
    for (method, seed), X in embeddings.items():
        per, integ = score_embedding(adata, X, method, seed, integration=not fast)
        per_parts.append(per)
        integ_parts.append(integ)
        extra_rows += extra_scores(adata, X, method, seed, info[(method, seed)])
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
    table = summarize_all(per, integ, records, methods, pairs, pd.DataFrame(extra_rows))

    notes = [
        f"{adata.n_obs} spots, {adata.n_vars} genes, {adata.obs[_data.SAMPLE_KEY].nunique()} "
        f"sections (batch = section); morphology: {adata.uns['benchmark']['morphology']}; "
        f"seeds {list(seeds)} (training seed = clustering seed)"
        + (f"; spatial neighbours recomputed with k = {n_neighbors}" if n_neighbors else "")
        + ".",
        "ARI / NMI: per labelled section, mean over sections, then over GMM and k-means "
        "(k = number of labels, all spots clustered); ± is the sd over seeds.",
        "batch / bio: "
        + (
            "not computed (--fast)"
            if fast
            else "mean of the scib-metrics batch (iLISI, silhouette_batch, BRAS, "
            "graph_connectivity) and bio (cLISI, silhouette_label) scores on labelled spots"
        )
        + ".",
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
    if extra_rows:
        notes.append(
            "purity: mean over k-means clusters of the share of their spots from their "
            "commonest patient (1 = every cluster is one patient's); latent sd: sd of the "
            "posterior means, posterior sd: the posterior's (means over latent dimensions; "
            "scVI / HistoVI only)."
        )
    for pair_name, ceiling in pair_ceilings(adata).items():
        notes.append(
            f"ceiling without the pair {pair_name.split(': ')[-1]}: ARI {ceiling:.3f} for a "
            "clustering that is the ground truth except that the pair is one cluster."
        )
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
    if make_figures and not fast and not per.empty:
        written = figures(
            adata,
            per,
            embeddings,
            out_dir,
            [m for m in methods if records[m]["status"] == "ok"],
            data,
        )
    written += curve_tables(records, out_dir, data, make_figures and not fast)
    if probe:
        written += probe_tables(adata, embeddings, per, out_dir, data)
    result = {
        "data": data,
        "config": {
            "methods": list(methods),
            "seeds": [int(s) for s in seeds],
            "max_epochs": max_epochs,
            "in_process": in_process,
            "histovi_variants": variants,
            "fast": fast,
            "curve_every": curve_every,
            "embedding_files": ctx.files,
            **adata.uns["benchmark"],
        },
        "table": json.loads(table.to_json(orient="records")),
        "per_section": json.loads(per.to_json(orient="records")),
        "integration": json.loads(integ.to_json(orient="records")),
        "pairs": pair_rows,
        "extra": extra_rows,
        "records": records,
        "figures": written,
        "total_wall_s": time.perf_counter() - t0,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print(md, flush=True)
    return result


def write_summary(out: str | os.PathLike) -> str:
    """``<out>/summary.md`` and ``summary.csv`` from every ``<out>/<data>/results.json``: rows =
    methods; per scenario the ARI (mean ± sd over seeds), its ratio to the better of Harmony
    and scVI there, and the method's rank by ARI (1 = best), with the mean rank."""
    out = Path(out)
    order = {d: i for i, d in enumerate(_data.SCENARIOS)}
    paths = sorted(
        out.glob("*/results.json"), key=lambda p: (order.get(p.parent.name, len(order)), p)
    )
    rows, notes = [], []
    for path in paths:
        res = json.loads(path.read_text())
        t = pd.DataFrame(res["table"])
        ok = t[(t["status"] == "ok") & t["ARI"].notna()] if "ARI" in t else t.iloc[:0]
        refs = ok[ok["method"].isin(REFERENCES)]
        best = refs.loc[refs["ARI"].idxmax()] if len(refs) else None
        rank = ok["ARI"].rank(ascending=False, method="min")
        for i, r in t.iterrows():
            ari = r.get("ARI", np.nan)
            rows.append(
                {
                    "method": r["method"],
                    "scenario": res["data"],
                    "status": r["status"],
                    "ARI": ari,
                    "ARI_sd": r.get("ARI_sd", np.nan),
                    "ARI/best_ref": ari / best["ARI"] if best is not None else np.nan,
                    "rank": rank.get(i, np.nan),
                }
            )
        cfg = res["config"]
        notes.append(
            f"{res['data']}: seeds {cfg['seeds']}, max_epochs {cfg['max_epochs'] or 'default'}"
            + (f", best reference {best['method']}" if best is not None else ", no reference")
        )
    if not rows:
        raise FileNotFoundError(f"no <data>/results.json under {out}: nothing to summarise.")
    long = pd.DataFrame(rows)
    methods, scenarios = (list(dict.fromkeys(long[c])) for c in ("method", "scenario"))

    def wide(values) -> pd.DataFrame:  # rows = methods, columns = scenarios
        w = long.assign(v=list(values)).pivot(index="method", columns="scenario", values="v")
        return w.reindex(index=methods, columns=scenarios)

    columns = ("ARI", "ARI_sd", "ARI/best_ref", "rank", "status")
    csv = pd.concat({c: wide(long[c]) for c in columns}, axis=1)
    csv = csv[[(c, s) for s in scenarios for c in columns]].set_axis(
        [f"{s} {c}" for s in scenarios for c in columns], axis=1
    )
    csv["mean rank"] = wide(long["rank"]).astype(float).mean(axis=1)
    csv.reset_index().to_csv(out / "summary.csv", index=False)
    status = wide(long["status"])

    def cells(texts) -> pd.DataFrame:  # a method that did not run shows its status
        return wide(texts).where(status == "ok", status.fillna("–")).reset_index()

    ranks = cells(_fmt(v, None, 0) for v in long["rank"])
    ranks["mean"] = [_fmt(v, None, 1) for v in csv["mean rank"]]
    md = "\n".join(
        [
            "### Summary across scenarios",
            "",
            "ARI (mean over labelled sections, GMM and k-means; mean ± sd over seeds):",
            "",
            _md(cells(map(_fmt, long["ARI"], long["ARI_sd"]))),
            "ARI / the better of Harmony and scVI in the scenario:",
            "",
            _md(cells(_fmt(v, None, 2) for v in long["ARI/best_ref"])),
            "Rank by ARI (1 = best; mean over the scenarios where the method ran):",
            "",
            _md(ranks),
            *[f"- {n}" for n in notes],
        ]
    )
    (out / "summary.md").write_text(md + "\n")
    return md + "\n"


def rebuild_report(out_dir: str | os.PathLike) -> str:
    """Rewrite ``table.md`` (and ``curve.md``) of a finished run from its ``results.json`` (no
    recomputation); given a ``--out`` folder, every scenario's and ``summary.md``."""
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    if not path.exists():
        runs = sorted(p.parent for p in out_dir.glob("*/results.json"))
        if not runs:
            raise FileNotFoundError(
                f"{path} not found: pass the folder of a finished run (<out>/<data>) or its --out."
            )
        return "".join(rebuild_report(run) for run in runs) + write_summary(out_dir)
    res = json.loads(path.read_text())
    per, integ = pd.DataFrame(res["per_section"]), pd.DataFrame(res["integration"])
    if integ.empty:
        integ = pd.DataFrame(columns=["embedding", "seed", "metric", "kind", "value"])
    pairs = pd.DataFrame(res["pairs"]) if res["pairs"] else None
    methods = res["config"]["methods"]
    extra = pd.DataFrame(res.get("extra", []))
    table = summarize_all(per, integ, res["records"], methods, pairs, extra)
    old = (out_dir / "table.md").read_text().split("\n- ", 1)
    notes = ("- " + old[1]).rstrip("\n").split("\n") if len(old) > 1 else []
    md = markdown_table(table, f"{res['data']} — integration benchmark", [n[2:] for n in notes])
    (out_dir / "table.md").write_text(md)
    curve_tables(res["records"], out_dir, res["data"], make_figures=False)
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


def _parse_embedding(text: str) -> tuple[str, str]:
    name, _, path = text.partition("=")
    if not name or not path or not Path(path).is_file():
        raise argparse.ArgumentTypeError(
            f"--embedding {text!r}: pass NAME=PATH with PATH an existing .npy file "
            "(rows = the data's spots, in order)."
        )
    return name, str(Path(path).resolve())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\nCost measurement")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=["sim"],
        choices=_data.SCENARIOS,
        metavar="DATA",
        help="one or more scenarios: " + ", ".join(_data.SCENARIOS),
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["all"],
        help="method names, or 'all' / 'baselines' / 'histovi', or variants inline: "
        "HistoVI:key=value,... (plan.* -> training plan, train.* -> train(), setup.* -> "
        "setup_anndata, others -> model), HistoVI-noMorph:key=value, scVI:key=value; known: "
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
        "--embedding",
        action="append",
        type=_parse_embedding,
        default=[],
        metavar="NAME=PATH",
        help="score a precomputed embedding (.npy, rows = the data's spots) as a method",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run methods in this process (no per-method memory isolation)",
    )
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument(
        "--fast", action="store_true", help="no scib-metrics, no figures: quick comparisons"
    )
    parser.add_argument(
        "--curve",
        type=int,
        metavar="N",
        help="score the latent of scVI / HistoVI methods every N epochs during training",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="label probe per section and cluster composition of every embedding",
    )
    parser.add_argument(
        "--n-neighbors", type=int, help="recompute the spatial neighbours with this k (default 6)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per method (0: torch's default)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished methods of an earlier run in the same --out",
    )
    parser.add_argument(
        "--rebuild-report",
        metavar="DIR",
        help="only rewrite DIR/table.md from DIR/results.json (DIR = an --out folder: every "
        "scenario's and summary.md)",
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
    for flag, value in (("--curve", args.curve), ("--n-neighbors", args.n_neighbors)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: pass a whole number of at least 1")
    variants = dict(_methods.HISTOVI_VARIANTS)
    variants.update(dict(args.histovi_variant))
    files = dict(args.embedding)
    ctx = _methods.Context(histovi_variants=variants)
    groups = {
        "all": _methods.method_names(ctx),
        "baselines": list(_methods.BASELINES),
        "histovi": list(variants),
    }
    methods: list[str] = []
    for m in args.methods:
        methods += groups.get(m, [m])
    methods += [name for name in files if name not in methods]
    for data in args.data:
        if args.merge:
            merge_runs(args.merge, args.out, data, methods)
        run_benchmark(
            data,
            methods,
            args.seeds,
            args.out,
            max_epochs=args.max_epochs,
            in_process=args.in_process,
            histovi_variants=variants,
            make_figures=not args.no_figures,
            threads=args.threads or None,
            reuse=args.reuse or bool(args.merge),
            fast=args.fast,
            curve_every=args.curve,
            probe=args.probe,
            n_neighbors=args.n_neighbors,
            embedding_files=files,
        )
    print(write_summary(args.out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
