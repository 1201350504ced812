"""Reference mapping benchmark: leave one patient out, map it as a query (issue 29 protocol).

Per training seed and held-out patient ``p``:

* **reference** = the other patients; genes: 2,000 HVGs chosen on the reference; spatial
  neighbours k = 6 per section; HistoVI with its defaults. The reference's own domains:
  k-means (k = number of labels) of the reference latent.
* **query** = patient ``p`` with all its genes: ``HistoVI.prepare_query_anndata`` ->
  ``HistoVI.load_query_data`` -> ``train(max_epochs=100)``; ``histovi.tl.transfer_labels``
  carries the reference domains onto the query latent. Score: ARI of the transferred domains
  against ``p``'s labels, mean over ``p``'s labelled sections.
* **joint** = one HistoVI on all patients (HVGs on all), k-means of the joint latent, ARI on
  ``p``'s labelled sections.
* **scVI-scArches**: the same protocol with ``scvi.model.SCVI`` in scArches' settings
  (``encode_covariates=True``, layer norm, no batch norm, 2 layers, dropout 0.2, as in
  scvi-tools' scArches tutorial; HistoVI's epoch rule), query trained 100 epochs without
  weight decay.
* **purity**: the patient purity of each reference's domains (mean over domains of the share
  of its spots from its commonest patient; lower = patients better aligned).
* ``--models``: ``HistoVI``, its variants in the integration benchmark's syntax
  (``HistoVI-noNiche``, ``'HistoVI:n_layers=2,dropout_rate=0.2'``) and ``scVI-scArches``.

Each (model, seed, held-out patient) and each (model, seed) joint model is a job in its own
process; finished jobs are cached in ``<out>/<data>/jobs`` and a rerun does only what is
missing.

Usage::

    python benchmarks/reference_mapping.py --data her2st --seeds 0 1 2
    python benchmarks/reference_mapping.py --data her2st --models HistoVI 'HistoVI:n_layers=2'
    python benchmarks/reference_mapping.py --data sim --seeds 0 --max-epochs 60
"""

from __future__ import annotations

import argparse
import sys
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
import integration  # noqa: E402

QUERY_EPOCHS = 100
#: scVI settings for scArches (scvi-tools' reference-mapping tutorial).
SCVI_ARCHES = {
    "n_layers": 2,
    "dropout_rate": 0.2,
    "encode_covariates": True,
    "use_layer_norm": "both",
    "use_batch_norm": "none",
}
MODELS = ("HistoVI", "scVI-scArches")
SCVI_NAME = "scVI-scArches"


def _n_domains(labels: pd.Series) -> int:
    """k of the protocol's clustering: the number of labels of the whole study."""
    import histovi

    return histovi.metrics.n_label_classes(labels.astype(object).to_numpy(), _data.IGNORE_LABELS)


def _ari(obs: pd.DataFrame, predicted: np.ndarray) -> float:
    """ARI against the labels, mean over the labelled sections."""
    from histovi.metrics import per_sample_scores

    a = AnnData(obs=obs[[_data.SAMPLE_KEY, _data.LABEL_KEY]].copy())
    a.obs["predicted"] = pd.Categorical(predicted)
    return float(per_sample_scores(a, _data.LABEL_KEY, "predicted", _data.SAMPLE_KEY)["ARI"].mean())


def _purity(obs: pd.DataFrame, domains: np.ndarray) -> float:
    from histovi.metrics import cluster_composition

    a = AnnData(obs=obs[[_data.LABEL_KEY, _data.PATIENT_KEY]].copy())
    a.obs["domain"] = domains
    return float(
        cluster_composition(a, "domain", group_key=_data.PATIENT_KEY)["group_share"].mean()
    )


def _histovi_spec(model: str) -> dict[str, Any]:
    """Model arguments of ``HistoVI``, a shorthand or an inline variant (``BASE:key=value``)."""
    base, _, inline = model.partition(":")
    if base not in _methods.VARIANTS or "@" in model or "+" in model:
        raise KeyError(
            f"Unknown model {model!r}: use {SCVI_NAME!r}, one of {list(_methods.VARIANTS)} or a "
            "variant written HistoVI:key=value,..."
        )
    return {**_methods.VARIANTS[base], **_methods.parse_inline(inline)}


def _fit(model: str, adata: AnnData, seed: int, max_epochs: int | None):
    ctx = _methods.Context(max_epochs=max_epochs)
    if model == SCVI_NAME:
        return _methods.fit_scvi(adata, seed, ctx, SCVI_ARCHES)
    return _methods.fit_histovi(adata, seed, ctx, _histovi_spec(model))


def _map_query(model: str, reference, query_raw: AnnData, seed: int, epochs: int) -> np.ndarray:
    """The query's latent after scArches mapping into ``reference``."""
    import scvi

    from histovi import HistoVI

    scvi.settings.seed = seed
    if model != SCVI_NAME:
        query = HistoVI.prepare_query_anndata(query_raw, reference)
        qmodel = HistoVI.load_query_data(query, reference)
        train: dict[str, Any] = {}
    else:
        query = _methods._counts_adata(query_raw)
        scvi.model.SCVI.prepare_query_anndata(query, reference)
        qmodel = scvi.model.SCVI.load_query_data(query, reference)
        train = {"plan_kwargs": {"weight_decay": 0.0}}
    with _methods._scratch_cwd():
        qmodel.train(max_epochs=epochs, enable_progress_bar=False, **train)
    return qmodel.get_latent_representation()


def holdout_job(
    data: str,
    patient: str,
    seed: int,
    model: str = "HistoVI",
    max_epochs: int | None = None,
    query_epochs: int = QUERY_EPOCHS,
    threads: int | None = 1,
    key: dict | None = None,
) -> dict[str, Any]:
    """One model, held-out patient and seed (runs in its own process)."""
    H.limit_threads(threads)
    raw = _data.load_raw(data, H.DEFAULT_CACHE)
    is_query = (raw.obs[_data.PATIENT_KEY] == patient).to_numpy()
    reference = _data.prepare(raw[~is_query].copy())
    query_raw = raw[is_query].copy()
    row: dict[str, Any] = {"patient": patient, "seed": seed, "key": key}
    with H.Meter() as meter:
        ref = _fit(model, reference, seed, max_epochs)
        z_ref = ref.get_latent_representation()
        z_query = _map_query(model, ref, query_raw, seed, query_epochs)
    k = _n_domains(raw.obs[_data.LABEL_KEY])
    domains, moved = integration.transfer_domains(z_ref, z_query, k, seed)
    row[f"{model} query"] = _ari(query_raw.obs, moved)
    row[f"{model} reference purity"] = _purity(reference.obs, domains)
    row[f"{model} reference unchanged"] = bool(
        np.array_equal(ref.get_latent_representation(), z_ref)
    )
    row[f"{model} s"] = meter.wall_s
    return row


def joint_job(
    data: str,
    seed: int,
    model: str = "HistoVI",
    max_epochs: int | None = None,
    threads: int | None = 1,
    key: dict | None = None,
) -> dict[str, Any]:
    """One model trained on every patient; ARI of the k-means domains per patient."""
    import histovi

    H.limit_threads(threads)
    adata = _data.prepare(_data.load_raw(data, H.DEFAULT_CACHE))
    out: dict[str, Any] = {"seed": seed, "key": key}
    z = _fit(model, adata, seed, max_epochs).get_latent_representation()
    k = _n_domains(adata.obs[_data.LABEL_KEY])
    domains = histovi.tl.cluster_embedding(z, k, "kmeans", random_state=seed).astype(str)
    patients = adata.obs[_data.PATIENT_KEY].astype(str).to_numpy()
    for p in np.unique(patients):
        sel = patients == p
        out[f"{model} joint {p}"] = _ari(adata.obs[sel], domains[sel])
    return out


def _run(out_dir: Path, name: str, function: str, kwargs: dict, isolate: bool) -> dict:
    """A job, from the cache when it finished earlier with the same settings."""
    path = out_dir / "jobs" / f"{name}.json"
    cached = H.load_json(path)
    if cached is not None and cached.get("key") == kwargs["key"]:
        return cached
    result = H.run_job(
        "reference_mapping", function, kwargs, out_dir / "logs" / f"{name}.txt", isolate
    )
    if result.get("status") != "failed":
        H.save_json(path, result)
    print(f"[{name}] {result}", flush=True)
    return result


COLUMNS = ("joint", "query", "Δ query−joint", "reference purity")


def table(rows: list[dict], joints: dict[int, dict], models: Sequence[str]) -> pd.DataFrame:
    """One row per model and held-out patient (mean ± sd over seeds), and per model the mean
    over patients."""
    df = pd.DataFrame(rows)
    out = []
    for model in models:
        if f"{model} query" not in df:
            continue
        d = pd.DataFrame(
            {
                "patient": df["patient"],
                "seed": df["seed"],
                "joint": [
                    joints.get(s, {}).get(f"{model} joint {p}", np.nan)
                    for p, s in zip(df["patient"], df["seed"], strict=True)
                ],
                **{c: df.get(f"{model} {c}", np.nan) for c in COLUMNS if c not in ("joint",)},
            }
        ).dropna(subset=["query"])
        d["Δ query−joint"] = d["query"] - d["joint"]
        cols = list(COLUMNS)
        per_seed_mean = d.groupby("seed")[cols].mean().assign(patient="**mean**")
        for patient, g in [*d.groupby("patient"), ("**mean**", per_seed_mean)]:
            cells = {"model": model, "held-out": patient, "seeds": len(g)}
            cells.update(
                {c: H.fmt(g[c].mean(), g[c].std(ddof=1) if len(g) > 1 else None) for c in cols}
            )
            out.append(cells)
    return pd.DataFrame(out)


def _slug(model: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model)


def run(
    data: str,
    seeds: Sequence[int],
    out: str | Path,
    max_epochs: int | None = None,
    query_epochs: int = QUERY_EPOCHS,
    holdout: Sequence[str] | None = None,
    isolate: bool = True,
    threads: int | None = 1,
    models: Sequence[str] = MODELS,
) -> dict[str, Any]:
    """Run the benchmark on one study, write ``table.md`` and ``results.json``."""
    for model in models:
        if model != SCVI_NAME:
            _histovi_spec(model)
    raw = _data.load_raw(data, H.DEFAULT_CACHE)
    patients = sorted(raw.obs[_data.PATIENT_KEY].astype(str).unique())
    holdout = list(holdout or patients)
    if len(patients) < 2 or set(holdout) - set(patients):
        raise ValueError(f"--holdout {holdout}: choose among the study's patients {patients}.")
    out_dir = Path(out).resolve() / data
    key = {
        "max_epochs": max_epochs,
        "query_epochs": query_epochs,
        "code": H.code_version(("histovi", "scvi")),
    }
    common = {"data": data, "max_epochs": max_epochs, "threads": threads, "key": key}
    by_job: dict[tuple[str, int], dict] = {}
    joints: dict[int, dict] = {}
    failed = []
    for seed in seeds:
        for model in models:
            tag = f"{_slug(model)}_seed{seed}"
            kwargs = {**common, "seed": seed, "model": model}
            joint = _run(out_dir, f"joint_{tag}", "joint_job", kwargs, isolate)
            if joint.get("status") == "failed":
                failed.append(joint)
            else:
                joints.setdefault(seed, {}).update(joint)
            for p in holdout:
                kwargs = {**common, "seed": seed, "model": model, "patient": p}
                row = _run(
                    out_dir,
                    f"holdout_{p}_{tag}",
                    "holdout_job",
                    {**kwargs, "query_epochs": query_epochs},
                    isolate,
                )
                if row.get("status") == "failed":
                    failed.append(row)
                else:
                    by_job.setdefault((p, seed), {}).update(row)
    rows = list(by_job.values())
    result = {
        "data": data, "seeds": list(seeds), "models": list(models), "key": key,
        "rows": rows, "joints": joints, "failed": failed,
    }  # fmt: skip
    md = [f"### {data}: reference mapping, one patient held out", ""]
    if rows:
        md += [H.markdown(table(rows, joints, models)), ""]
    md += [
        f"- query: {query_epochs} epochs; reference and joint: "
        f"{max_epochs or 'each model’s epoch rule'}; domains: k-means, k = number of labels; "
        "ARI on the held-out patient's labelled sections. query: the reference's domains "
        "transferred; purity: patient purity of the reference's domains. Δ: query − joint (the goal: ≥ −0.03).",
        *(f"- failed: {f.get('error', f)}" for f in failed),
    ]
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    H.save_json(out_dir / "results.json", result)
    print("\n".join(md), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["her2st"], choices=_data.SCENARIOS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-epochs", type=int, help="reference and joint models")
    parser.add_argument("--query-epochs", type=int, default=QUERY_EPOCHS)
    parser.add_argument("--holdout", nargs="+", help="patients to hold out (default: all)")
    parser.add_argument("--out", default="benchmarks/results/reference_mapping")
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        help=f"{SCVI_NAME}, HistoVI, its shorthands or inline variants HistoVI:key=value,...",
    )
    args = parser.parse_args(argv)
    for data in args.data:
        run(
            data,
            args.seeds,
            args.out,
            args.max_epochs,
            args.query_epochs,
            args.holdout,
            not args.in_process,
            args.threads,
            args.models,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
