"""Integration benchmark: methods x studies, every embedding scored the same way.

Protocol (../shared/EVALUATION.md): every method embeds the same genes of the same pooled
sections (batch = section); every embedding is clustered the same way (Gaussian mixture and
k-means, k = number of labels, all spots clustered), labelled spots are scored per section
(ARI, NMI), averaged over sections, over the two clusterings and over training seeds (the
clustering seed is the training seed; ± is the sd over seeds); scib-metrics batch / bio scores
on labelled spots; the patient purity of the k-means clusters; *transfer*, whether the
embedding's domains carry over between patients (leave one patient out: k-means of the other
patients' spots, their domains moved onto the left-out patient by
:func:`histovi.tl.transfer_labels`, ARI on its labelled sections; the joint-latent version of
``reference_mapping.py``, available for every method); wall time and peak memory of each
method, run in its own process (:mod:`_harness`).

Usage::

    python benchmarks/integration.py --data starmap her2st --methods all --seeds 0 1 2
    python benchmarks/integration.py --data sim_tiny --methods PCA scVI HistoVI HistoVI@own \\
        "HistoVI:niche_weight=2,plan.lr=2e-3" --seeds 0 --max-epochs 20 --fast
    python benchmarks/integration.py --data starmap --methods all --seeds 0 1 2 --reuse  # rescore

Embeddings are cached per (study, method, seed) in ``<out>/<data>/embeddings`` with the
settings and code versions they were made with: a rerun trains only what is missing or stale
(an interrupted run resumes); ``--reuse`` trains nothing and scores what is cached. Writes per
study ``<out>/<data>/table.md`` (also printed), ``results.json``, ``per_section.csv`` and
figures, and across studies ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data  # noqa: E402
import _harness as H  # noqa: E402
import _methods  # noqa: E402

CLUSTERINGS = ("gmm", "kmeans")
SCIB = ("iLISI", "silhouette_batch", "BRAS", "graph_connectivity", "cLISI", "silhouette_label")


# --------------------------------------------------------------------------- embedding jobs


def _stem(emb_dir: Path, name: str, seed: int) -> Path:
    return Path(emb_dir) / f"{H.safe_name(name)}_seed{seed}"


def embed_job(
    job: str,
    seeds: list[int],
    prepared: str | AnnData,
    emb_dir: str,
    key: dict,
    max_epochs: int | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train ``job`` for every seed and save each embedding it gives with its record (runs in
    the job's own process): the method's libraries are imported and the data loaded before the
    measured block."""
    import anndata as ad

    H.limit_threads(threads)
    method = _methods.resolve(job)
    for module in method.modules:
        importlib.import_module(module)
    adata = ad.read_h5ad(prepared) if isinstance(prepared, str) else prepared
    for seed in seeds:
        ctx = _methods.Context(max_epochs=max_epochs)
        try:
            with H.Meter() as meter:
                out = method.run(adata, int(seed), ctx)
        except _methods.NotApplicable as err:
            return {"status": "n/a", "error": str(err)}
        except Exception as err:  # a failing peer is reported, never given numbers
            traceback.print_exc()  # into the job's log
            return {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        for suffix, X in (out if isinstance(out, dict) else {"": out}).items():
            X = np.asarray(X, dtype=np.float32)
            if X.shape[0] != adata.n_obs or not np.isfinite(X).all():
                return {"status": "failed", "error": f"bad embedding {X.shape}, not all finite"}
            stem = _stem(Path(emb_dir), job + suffix, seed)
            np.save(stem.with_suffix(".npy"), X)
            record = {"key": key, "seed": int(seed), "info": ctx.info}
            H.save_json(
                stem.with_suffix(".json"),
                {**record, "wall_s": meter.wall_s, "peak_mb": meter.peak_mb},
            )
    return {"status": "ok"}


def _cached(emb_dir: Path, name: str, seed: int, key: dict, reuse: bool) -> dict | None:
    """The record of a cached embedding made with ``key`` (``reuse``: whatever code made it)."""
    rec = H.load_json(_stem(emb_dir, name, seed).with_suffix(".json"))
    if rec is None or not _stem(emb_dir, name, seed).with_suffix(".npy").exists():
        return None
    old, new = dict(rec["key"]), dict(key)
    if reuse:
        old.pop("code", None), new.pop("code", None)
    return rec if old == new else None


def run_methods(
    adata: AnnData,
    methods: Sequence[str],
    seeds: Sequence[int],
    work: Path,
    key: dict,
    isolate: bool = True,
    reuse: bool = False,
    threads: int | None = 1,
) -> dict[str, dict]:
    """Train what the cache lacks, one job (process) per method; returns each job's status."""
    emb_dir = work / "embeddings"
    emb_dir.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, list[str]] = {}
    for name in methods:
        jobs.setdefault(_methods.split_tag(name)[0], []).append(name)
    prepared: str | AnnData = adata
    if isolate:  # written when the first job needs it
        prepared = str(work / "prepared.h5ad")
        Path(prepared).unlink(missing_ok=True)
    status: dict[str, dict] = {}
    for job, names in jobs.items():
        reason = _methods.unavailable_reason(job)
        if reason:
            status[job] = {"status": "unavailable", "error": reason}
            print(f"[{job}] unavailable: {reason}", flush=True)
            continue
        jkey = {**key, "code": H.code_version(_methods.resolve(job).modules)}
        todo = [
            int(s) for s in seeds if any(_cached(emb_dir, n, s, jkey, reuse) is None for n in names)
        ]
        if not todo or reuse:
            status[job] = {"status": "ok" if not todo else "not run (--reuse)"}
            continue
        if isolate and not Path(prepared).exists():
            adata.write_h5ad(prepared)
        t0 = time.perf_counter()
        kwargs = {
            "job": job,
            "seeds": todo,
            "prepared": prepared,
            "emb_dir": str(emb_dir),
            "key": jkey,
            "max_epochs": key.get("max_epochs"),
            "threads": threads,
        }
        log = work / "logs" / f"{H.safe_name(job)}.txt"
        status[job] = H.run_job("integration", "embed_job", kwargs, log, isolate)
        print(f"[{job}] seeds {todo}: {status[job]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return status


# --------------------------------------------------------------------------- scoring


def ilisi(adata: AnnData, X: np.ndarray) -> float:
    """iLISI on labelled spots (the kNN graph of :func:`histovi.metrics.integration_scores`)."""
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    from histovi.tl._utils import labelled_mask

    mask = labelled_mask(adata.obs[_data.LABEL_KEY].astype(object).to_numpy(), _data.IGNORE_LABELS)
    k = int(min(90, mask.sum() - 1))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(X[mask]).kneighbors(X[mask])
    batches = adata.obs[_data.SAMPLE_KEY].astype(str).to_numpy()[mask]
    return float(scib_metrics.ilisi_knn(NeighborsResults(indices=idx, distances=dist), batches))


def score(adata: AnnData, X: np.ndarray, seed: int, fast: bool) -> tuple[pd.DataFrame, dict]:
    """Per-section ARI / NMI of both clusterings, and the embedding's other scores: scib-metrics
    (``fast``: iLISI only) and the patient purity of the k-means clusters (mean over clusters
    of the share of their spots from their commonest patient; 1: each cluster is one
    patient's)."""
    import histovi

    labels = adata.obs[_data.LABEL_KEY].astype(object).to_numpy()
    per = histovi.metrics.cluster_and_score(
        X,
        labels,
        adata.obs[_data.SAMPLE_KEY].to_numpy(),
        methods=CLUSTERINGS,
        seeds=[seed],
        ignore=_data.IGNORE_LABELS,
    )
    light = AnnData(obs=adata.obs[[_data.SAMPLE_KEY, _data.LABEL_KEY, _data.PATIENT_KEY]].copy())
    light.obsm["X"] = X
    if fast:
        scores = {"iLISI": ilisi(adata, X)}
    else:
        integ = histovi.metrics.integration_scores(light, "X", ignore=_data.IGNORE_LABELS)
        scores = dict(zip(integ["metric"], integ["value"], strict=True))
    if light.obs[_data.PATIENT_KEY].nunique() > 1:
        k = histovi.metrics.n_label_classes(labels, _data.IGNORE_LABELS)
        light.obs["cluster"] = histovi.tl.cluster_embedding(X, k, "kmeans", random_state=seed)
        comp = histovi.metrics.cluster_composition(
            light, "cluster", _data.LABEL_KEY, _data.PATIENT_KEY, _data.IGNORE_LABELS
        )
        scores["purity"] = float(comp["group_share"].mean())
        scores["transfer"] = transfer_ari(adata, X, k, seed)
    return per, scores


def transfer_domains(z_ref: np.ndarray, z_query: np.ndarray, k: int, seed: int):
    """k-means domains (k clusters) of the reference spots ``z_ref``, and those domains moved onto
    the query spots ``z_query`` by :func:`histovi.tl.transfer_labels` (the protocol's step from a
    reference to a new patient): ``(reference domains, query domains)`` as strings."""
    import histovi

    domains = histovi.tl.cluster_embedding(z_ref, k, "kmeans", random_state=seed).astype(str)
    ref = AnnData(obs=pd.DataFrame({"domain": domains}, index=np.arange(len(z_ref)).astype(str)))
    ref.obsm["Z"] = z_ref
    query = AnnData(obs=pd.DataFrame(index=np.arange(len(z_query)).astype(str)))
    query.obsm["Z"] = z_query
    moved = histovi.tl.transfer_labels(ref, query, "domain", use_rep="Z", inplace=False)
    return domains, moved["domain"].astype(str).to_numpy()


def transfer_ari(adata: AnnData, X: np.ndarray, k: int, seed: int) -> float:
    """Leave one patient out within one embedding: the other patients' k-means domains moved
    onto the left-out patient (:func:`transfer_domains`); ARI per labelled section of the
    left-out patient, mean over sections then patients. Domains that mean "this patient"
    transfer at ARI ~ 0 while scoring well section by section."""
    from histovi.metrics import per_sample_scores

    patients = adata.obs[_data.PATIENT_KEY].astype(str).to_numpy()
    labels = adata.obs[_data.LABEL_KEY]
    aris = []
    for p in np.unique(patients):
        held = patients == p
        if labels[held].isna().all():
            continue
        _, moved = transfer_domains(X[~held], X[held], k, seed)
        light = AnnData(obs=adata.obs.loc[held, [_data.SAMPLE_KEY, _data.LABEL_KEY]].copy())
        light.obs["domain"] = pd.Categorical(moved)
        scores = per_sample_scores(
            light, _data.LABEL_KEY, "domain", _data.SAMPLE_KEY, ignore=_data.IGNORE_LABELS
        )
        aris.append(float(scores["ARI"].mean()))
    return float(np.mean(aris)) if aris else float("nan")


def method_row(name: str, per: pd.DataFrame, scores: pd.DataFrame, recs: list[dict]) -> dict:
    """One row of the study's table: ARI / NMI (mean over sections and clusterings, then mean
    and sd over seeds), the other scores (mean over seeds), cost and settings."""
    by_seed = per.groupby("seed")[["ARI", "NMI"]].mean()
    row: dict[str, Any] = {"method": name, "status": "ok", "n_seeds": len(by_seed)}
    for m in ("ARI", "NMI"):
        row[m] = float(by_seed[m].mean())
        row[f"{m}_sd"] = float(by_seed[m].std(ddof=1)) if len(by_seed) > 1 else np.nan
    for clustering, g in per.groupby("method"):
        row[f"ARI_{clustering}"] = float(g.groupby("seed")["ARI"].mean().mean())
    row.update(scores.drop(columns="seed").mean().to_dict())
    row["wall_s"] = float(np.median([r["wall_s"] for r in recs]))
    row["peak_mb"] = float(max(r["peak_mb"] for r in recs))
    row["epochs"] = "/".join(
        sorted({str(r["info"]["epochs"]) for r in recs if "epochs" in r["info"]})
    )
    tag = _methods.split_tag(name)[1]
    extra = {
        "+agg": " + aggregate_neighbors(n_hops=2)",
        "@own": "; own latent (spatial=False)",
        "+anchors": " + tl.anchor_sections (10 mutual neighbours, share 0.5)",
    }
    row["settings"] = recs[0]["info"].get("settings", "") + extra.get(tag, "")
    return row


def score_all(adata, methods, seeds, work, key, status, fast, reuse):
    """Score every cached embedding; a method without one is a row with its status."""
    rows, pers, embeddings = [], [], {}
    for name in methods:
        job = _methods.split_tag(name)[0]
        jkey = {**key, "code": H.code_version(_methods.resolve(job).modules)}
        per_parts, score_rows, recs = [], [], []
        for seed in seeds:
            rec = _cached(work / "embeddings", name, seed, jkey, reuse)
            if rec is None:
                continue
            X = np.load(_stem(work / "embeddings", name, seed).with_suffix(".npy"))
            per, scores = score(adata, X, seed, fast)
            per_parts.append(per.assign(embedding=name))
            score_rows.append({"seed": seed, **scores})
            recs.append(rec)
            embeddings[(name, seed)] = X
        if not recs:
            st = status.get(job, {"status": "not run"})
            rows.append({"method": name, "status": st["status"], "note": st.get("error", "")})
            continue
        pers.append(pd.concat(per_parts, ignore_index=True))
        rows.append(method_row(name, pers[-1], pd.DataFrame(score_rows), recs))
        if len(recs) < len(seeds):
            rows[-1]["note"] = f"{status.get(job, {}).get('status')}: " + str(
                status.get(job, {}).get("error", "seeds missing")
            )
    per = pd.concat(pers, ignore_index=True) if pers else pd.DataFrame()
    return pd.DataFrame(rows), per, embeddings


# --------------------------------------------------------------------------- reporting


def study_table(table: pd.DataFrame, adata: AnnData, seeds, fast: bool, max_epochs) -> str:
    """The study's markdown: one row per method, the scib-metrics detail, the notes."""
    info = adata.uns["benchmark"]
    ok = table["status"] == "ok"
    main = pd.DataFrame({"method": table["method"]})
    main["ARI"] = [
        H.fmt(r.get("ARI"), r.get("ARI_sd")) if o else r["status"]
        for o, (_, r) in zip(ok, table.iterrows(), strict=True)
    ]
    for col, head in (
        ("NMI", "NMI"),
        ("iLISI", "iLISI"),
        ("purity", "purity"),
        ("transfer", "transfer"),
    ):
        main[head] = table[col] if col in table else np.nan
    main["wall s"] = table["wall_s"].round(1) if "wall_s" in table else np.nan
    main["peak MB"] = table["peak_mb"].round(0) if "peak_mb" in table else np.nan
    main["epochs"] = table.get("epochs", "")
    lines = [f"### {info['scenario']}", "", H.markdown(main.fillna(""))]
    detail = [c for c in (*SCIB, "ARI_gmm", "ARI_kmeans") if c in table]
    if ok.any() and not fast:
        lines += ["scib-metrics on labelled spots; ARI per clustering (mean over seeds):", ""]
        lines += [H.markdown(table.loc[ok, ["method", *detail]])]
    lines += [
        f"- {info['n_spots']} spots, {info['n_genes']} genes, {info['n_samples']} sections "
        f"(batch = section), spatial neighbours k = {info['n_neighbors']}; image view: "
        f"{info['morphology']}; seeds {list(seeds)} (training seed = clustering seed); "
        f"max_epochs: {max_epochs or 'each method’s default'}.",
        "- ARI / NMI: per labelled section, mean over sections, GMM and k-means (k = number "
        "of labels, all spots clustered), then over seeds (± sd). iLISI: scib-metrics on "
        "labelled spots. purity: patient purity of the k-means clusters (1 = every cluster is "
        "one patient's). transfer: ARI of domains moved onto a left-out patient from k-means "
        "of the others (mean over patients). wall s: median over seeds; peak MB: peak RSS above the loaded data.",
    ]
    for _, r in table.iterrows():
        text = r.get("settings") if r["status"] == "ok" else r.get("note")
        if isinstance(text, str) and text:
            lines.append(f"- {r['method']}: {text}")
    return "\n".join(lines) + "\n"


def _relabel(clusters: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Clusters named after the label they overlap most (Hungarian matching), for maps."""
    from scipy.optimize import linear_sum_assignment

    known = pd.notna(labels)
    table = pd.crosstab(clusters[known], labels[known].astype(str))
    rows, cols = linear_sum_assignment(-table.to_numpy())
    names = {c: f"cluster {c}" for c in np.unique(clusters)}
    names.update({table.index[r]: table.columns[c] for r, c in zip(rows, cols, strict=True)})
    return np.array([names[c] for c in clusters], dtype=object)


def figures(adata: AnnData, per: pd.DataFrame, embeddings: dict, out: Path) -> None:
    """ARI bars per method and the domain maps (GMM) of each method's best seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import histovi

    name = adata.uns["benchmark"]["scenario"]
    plt.close(histovi.pl.scores(per, "ARI", x="embedding", hue="method", save=out / "ARI.png"))
    labels = adata.obs[_data.LABEL_KEY].astype(object).to_numpy()
    k = histovi.metrics.n_label_classes(labels, _data.IGNORE_LABELS)
    view = AnnData(
        obs=adata.obs[[_data.SAMPLE_KEY]].copy(), obsm={"spatial": adata.obsm["spatial"]}
    )
    shown = list(dict.fromkeys(adata.obs[_data.SAMPLE_KEY][pd.notna(labels)].astype(str)))[:4]
    maps = {"truth": np.where(pd.notna(labels), labels, "NA").astype(str)}
    for method, g in per.groupby("embedding", sort=False):
        best = int(g.groupby("seed")["ARI"].mean().idxmax())
        gmm = histovi.tl.cluster_embedding(embeddings[(method, best)], k, "gmm", random_state=best)
        maps[method] = _relabel(gmm, labels)
    for method, domains in maps.items():
        view.obs["domain"] = pd.Categorical(domains)
        fig = histovi.pl.domains(
            view,
            samples=shown,
            title=f"{name}: {method}",
            img=False,
            save=out / f"domains_{H.safe_name(method)}.png",
        )
        plt.close(fig)


def write_summary(out: Path) -> str:
    """``summary.md``: ARI (± sd) and iLISI of every method in every study of ``out``, with the
    mean rank by ARI."""
    order = {d: i for i, d in enumerate(_data.SCENARIOS)}
    results = [json.loads(p.read_text()) for p in Path(out).glob("*/results.json")]
    results.sort(key=lambda r: order.get(r["data"], len(order)))
    if not results:
        return ""
    cells, ilisi_cells, ranks = {}, {}, {}
    for res in results:
        t = pd.DataFrame(res["table"])
        ok = t[t["status"] == "ok"] if "ARI" in t else t.iloc[:0]
        rank = ok.set_index("method")["ARI"].rank(ascending=False) if len(ok) else pd.Series()
        for _, r in t.iterrows():
            good = r["status"] == "ok"
            cells.setdefault(r["method"], {})[res["data"]] = (
                H.fmt(r["ARI"], r.get("ARI_sd")) if good else r["status"]
            )
            ilisi_cells.setdefault(r["method"], {})[res["data"]] = r.get("iLISI") if good else None
            if good:
                ranks.setdefault(r["method"], []).append(rank[r["method"]])
    ari = pd.DataFrame.from_dict(cells, orient="index").rename_axis("method").reset_index()
    ari["mean rank"] = [np.mean(ranks[m]) if m in ranks else np.nan for m in ari["method"]]
    il = pd.DataFrame.from_dict(ilisi_cells, orient="index").rename_axis("method").reset_index()
    md = "\n".join(
        [
            "### Summary: ARI (± sd over seeds)",
            "",
            H.markdown(ari.fillna("–"), 1),
            "### Summary: iLISI",
            "",
            H.markdown(il),
        ]
    )
    (Path(out) / "summary.md").write_text(md)
    return md


# --------------------------------------------------------------------------- driver


def expand(methods: Sequence[str]) -> list[str]:
    """Groups (``all``, ``baselines``, ``peers``, ``histovi``) expanded; unknown names refused."""
    names = list(dict.fromkeys(m for g in methods for m in _methods.GROUPS.get(g, [g])))
    for name in names:
        _methods.check_name(name)
    return names


def run_benchmark(
    data: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    max_epochs: int | None = None,
    isolate: bool = True,
    reuse: bool = False,
    fast: bool = False,
    make_figures: bool = True,
    threads: int | None = 1,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the benchmark on one study, write its outputs and return them (``results.json``)."""
    if not seeds:
        raise ValueError("`seeds` is empty: pass at least one seed (the protocol asks for 3).")
    methods = expand(methods)
    out_dir = Path(out).resolve() / data
    t0 = time.perf_counter()
    adata = _data.load(data, cache_dir or H.DEFAULT_CACHE)
    print(f"[data] {data}: {adata.n_obs} spots x {adata.n_vars} genes", flush=True)
    key = {"data": data, "n_obs": adata.n_obs, "n_vars": adata.n_vars, "max_epochs": max_epochs}
    status = run_methods(adata, methods, seeds, out_dir, key, isolate, reuse, threads)
    table, per, embeddings = score_all(adata, methods, seeds, out_dir, key, status, fast, reuse)
    md = study_table(table, adata, seeds, fast, max_epochs)
    (out_dir / "table.md").write_text(md)
    if not per.empty:
        per.to_csv(out_dir / "per_section.csv", index=False)
        if make_figures and not fast:
            figures(adata, per, embeddings, out_dir)
    result = {
        "data": data,
        "config": {
            "methods": methods,
            "seeds": list(seeds),
            "max_epochs": max_epochs,
            "fast": fast,
            **adata.uns["benchmark"],
        },
        "table": json.loads(table.to_json(orient="records")),
        "per_section": json.loads(per.to_json(orient="records")),
        "total_wall_s": time.perf_counter() - t0,
    }
    H.save_json(out_dir / "results.json", result)
    print(md, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="+", default=["starmap"], choices=_data.SCENARIOS)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["all"],
        help=f"names, groups {list(_methods.GROUPS)} or variants HistoVI:key=value,... "
        f"(+ '@own'); known: {', '.join(_methods.GROUPS['all'])}",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/integration")
    parser.add_argument("--max-epochs", type=int, help="epochs of every neural method")
    parser.add_argument("--fast", action="store_true", help="iLISI only of scib, no figures")
    parser.add_argument("--reuse", action="store_true", help="train nothing: score the cache")
    parser.add_argument("--in-process", action="store_true", help="no process per method")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per method")
    args = parser.parse_args(argv)
    try:
        methods = expand(args.methods)
    except (KeyError, ValueError) as err:
        parser.error(err.args[0])
    for data in args.data:
        run_benchmark(
            data,
            methods,
            args.seeds,
            args.out,
            args.max_epochs,
            not args.in_process,
            args.reuse,
            args.fast,
            not args.no_figures,
            args.threads,
        )
    print(write_summary(Path(args.out)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
