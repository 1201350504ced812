"""Reference mapping benchmark: hold out one patient, map it into a reference of the others.

Protocol (per training seed, per held-out patient ``p``):

* **reference** = every other patient. Genes: 2000 HVGs (scanpy ``seurat_v3`` on counts,
  ``batch_key='sample'``) chosen on the reference only; spatial neighbours k = 6 per section.
  HistoVI (defaults) trains on it for ``--max-epochs`` epochs.
* **query** = patient ``p`` with all its genes and no neighbours:
  :meth:`histovi.HistoVI.prepare_query_anndata` aligns the genes (zero-fills missing ones) and
  computes its neighbours with the reference's settings; :meth:`~histovi.HistoVI.load_query_data`
  maps it and the query model trains ``--query-epochs`` epochs (several values may be given:
  each gets its own query model on the same reference).
* **label transfer**: the reference spots carry their ground-truth labels (where labelled;
  'undetermined' is dropped); :func:`histovi.tl.transfer_labels` (scArches' weighted kNN) votes
  them onto the query latent. Optionally a classifier head (an MLP on the frozen latent, like
  scANVI's classifier: one hidden layer of 128) is trained on the reference labels instead.
* **score**: ARI of transferred labels vs. truth on each labelled section of ``p`` (mean over
  its labelled sections; her2st: the patient's section 1, the simulator: all its sections).
* **joint** (like for like): one HistoVI on all patients (HVGs chosen on all of them, as a user
  training jointly would), then the same kNN transfer from the other patients' labelled spots to
  ``p``'s spots inside the joint latent.
* **scVI + scArches**: ``scvi.model.SCVI`` with scArches' settings (``encode_covariates=True``,
  layer norm, no batch norm, 2 layers, dropout 0.2 as in the scvi-tools scArches tutorial) on
  the same reference genes and epochs (HistoVI's epoch rule unless ``--max-epochs``),
  ``SCVI.load_query_data`` with the same query epochs and
  weight decay 0, the same kNN transfer.
* **cost**: wall time of the query model's ``train`` over that of the joint model's ``train``.
* **reference unchanged** (bit for bit, ``torch.equal`` / ``np.array_equal``): the reference
  model's parameters and its latent of its spots before vs. after query training, and the
  reference weights inside the query model (reference columns of the grown covariate layers
  included). The query model's latent of the reference spots is reported as the max absolute
  difference to the reference model's: the query's first layers are wider (zero inputs in the
  new-category columns), so BLAS sums those dot products in a different order and the result
  can differ in the last float bits (about 1e-6) even though every weight is identical.

Usage::

    python benchmarks/reference_mapping.py --data sim --max-epochs 60 --query-epochs 10 30 \\
        --seeds 0

Writes ``<out>/<data>/table.md`` (also printed) and ``results.json``. Runs split over processes
(one seed, or some held-out patients, each) are pooled with ``--merge DIR1 DIR2 --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data  # noqa: E402
from _methods import _quiet_cwd  # noqa: E402

LABEL_KEY = "label"
SAMPLE_KEY = "sample"
PATIENT_KEY = "patient"
MORPHOLOGY_KEY = "X_morphology"
NEIGHBORS_KEY = "spatial_neighbors"
REP = "X_latent"
N_NEIGHBORS_TRANSFER = 15
#: Simulator sizes: name -> keyword arguments of :func:`histovi.datasets.simulate` (4 patients).
SIM_DATA: dict[str, dict[str, Any]] = {
    "sim": {},
    "sim_small": {"grid_size": (14, 14), "n_genes": 300, "n_markers": 15, "morphology_dim": 16},
}
#: scVI settings for scArches (scvi-tools' reference-mapping tutorial).
SCVI_ARCHES = {
    "n_latent": 16,
    "n_layers": 2,
    "dropout_rate": 0.2,
    "encode_covariates": True,
    "use_layer_norm": "both",
    "use_batch_norm": "none",
}
TRAIN_QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


# --------------------------------------------------------------------------- data


def load_raw(name: str, cache_dir: Path, seed: int = 0) -> AnnData:
    """All genes, ``layers['counts']``, ``obs[sample, patient, label]`` (NaN = unlabelled,
    'undetermined' removed), ``obsm['spatial']`` and the morphology embedding where there is
    one. No gene selection and no neighbours: each model gets its own."""
    if name in SIM_DATA:
        import histovi

        adata = histovi.datasets.simulate(seed=seed, **SIM_DATA[name])
        adata.obs[LABEL_KEY] = adata.obs["domain"].astype(str)
    elif name == "her2st":
        adata = _data.read_her2st_counts()
        morph, source = _data._her2st_morphology(adata, _data.her2st_dir(), cache_dir)
        if morph is not None:
            adata.obsm[MORPHOLOGY_KEY] = np.asarray(morph, dtype=np.float32)
        adata.uns["benchmark_morphology"] = source
    else:
        raise KeyError(f"Unknown data {name!r}: use one of {[*SIM_DATA, 'her2st']}.")
    label = adata.obs[LABEL_KEY].astype(object)
    label = label.where(label.notna() & (label.astype(str) != "undetermined"), None)
    adata.obs[LABEL_KEY] = pd.Categorical(label)
    adata.obs[PATIENT_KEY] = adata.obs[PATIENT_KEY].astype(str)
    adata.obs[SAMPLE_KEY] = adata.obs[SAMPLE_KEY].astype(str)
    keep_obsm = {k: adata.obsm[k] for k in ("spatial", MORPHOLOGY_KEY) if k in adata.obsm}
    out = AnnData(
        X=adata.layers["counts"],
        obs=adata.obs[[SAMPLE_KEY, PATIENT_KEY, LABEL_KEY]].copy(),
        var=pd.DataFrame(index=adata.var_names),
        obsm=keep_obsm,
    )
    out.layers["counts"] = out.X
    return out


def prepare_training(adata: AnnData, n_top_genes: int) -> AnnData:
    """HVGs chosen on this AnnData and k = 6 spatial neighbours per section (a copy)."""
    import histovi

    sub = _data.select_genes(adata, n_top_genes, batch_key=SAMPLE_KEY)
    histovi.pp.spatial_neighbors(sub, sample_key=SAMPLE_KEY, n_neighbors=_data.N_NEIGHBORS)
    return sub


def _has_morphology(adata: AnnData) -> bool:
    return MORPHOLOGY_KEY in adata.obsm and bool(
        (~np.isnan(adata.obsm[MORPHOLOGY_KEY]).any(1)).any()
    )


# --------------------------------------------------------------------------- models


def train_histovi(adata: AnnData, seed: int, max_epochs: int | None):
    """HistoVI with its defaults; returns ``(model, train seconds)``."""
    import scvi

    from histovi import HistoVI

    scvi.settings.seed = seed
    HistoVI.setup_anndata(
        adata,
        layer="counts",
        batch_key=SAMPLE_KEY,
        morphology_key=MORPHOLOGY_KEY if _has_morphology(adata) else None,
        neighbors_key=NEIGHBORS_KEY,
    )
    model = HistoVI(adata)
    with _quiet_cwd():
        t0 = time.perf_counter()
        model.train(max_epochs=max_epochs, **TRAIN_QUIET)
        seconds = time.perf_counter() - t0
    return model, seconds


def train_scvi_reference(adata: AnnData, seed: int, max_epochs: int | None):
    import scvi

    scvi.settings.seed = seed
    a = AnnData(
        X=adata.layers["counts"].copy(),
        obs=adata.obs[[SAMPLE_KEY]].copy(),
        var=pd.DataFrame(index=adata.var_names),
    )
    scvi.model.SCVI.setup_anndata(a, batch_key=SAMPLE_KEY)
    model = scvi.model.SCVI(a, **SCVI_ARCHES)
    if max_epochs is None:
        # HistoVI's rule, as in integration.py: scVI's own rule (400 epochs below 20,000
        # spots) over-integrates her2st (jointly: ARI 0.137 at 400 epochs, 0.324 at 90).
        from histovi.model._model import default_max_epochs

        max_epochs = default_max_epochs(a.n_obs)
    with _quiet_cwd():
        t0 = time.perf_counter()
        model.train(max_epochs=max_epochs, **TRAIN_QUIET)
        seconds = time.perf_counter() - t0
    return model, seconds


def map_scvi_query(query_raw: AnnData, ref_model, seed: int, epochs: int):
    import scvi

    scvi.settings.seed = seed
    q = AnnData(
        X=query_raw.layers["counts"].copy(),
        obs=query_raw.obs[[SAMPLE_KEY]].copy(),
        var=pd.DataFrame(index=query_raw.var_names),
    )
    scvi.model.SCVI.prepare_query_anndata(q, ref_model)
    qmodel = scvi.model.SCVI.load_query_data(q, ref_model)
    with _quiet_cwd():
        t0 = time.perf_counter()
        qmodel.train(max_epochs=epochs, plan_kwargs={"weight_decay": 0.0}, **TRAIN_QUIET)
        seconds = time.perf_counter() - t0
    return qmodel.get_latent_representation(), seconds


def reference_weights_kept(ref_module, query_module) -> bool:
    """Every reference parameter is bit-identical inside the query model.

    Same-shaped tensors must be equal; the first layers that take the covariates are wider in the
    query (new categories' columns), so their reference columns are compared where
    :func:`histovi.model._model._restore_covariate_columns` puts them: per covariate, the
    reference's categories first, then the new ones. The adversary's output layer (unused by
    queries) is skipped.
    """
    import torch

    def cols(cats):  # scvi-tools gives a single-category covariate no column
        return [c if c > 1 else 0 for c in cats]

    ref_cols, qry_cols = cols(ref_module.cat_list), cols(query_module.cat_list)
    qstate = query_module.state_dict()
    for key, w_ref in ref_module.state_dict().items():
        w_q = qstate[key]
        if w_q.shape == w_ref.shape:
            if not torch.equal(w_q, w_ref):
                return False
        elif key.startswith("batch_classifier"):
            continue
        elif w_q.shape[0] == w_ref.shape[0] and w_q.ndim == 2:
            n_other = w_ref.shape[1] - sum(ref_cols)
            if not torch.equal(w_q[:, :n_other], w_ref[:, :n_other]):
                return False
            r0 = q0 = n_other
            for rc, qc in zip(ref_cols, qry_cols, strict=True):
                if not torch.equal(w_q[:, q0 : q0 + rc], w_ref[:, r0 : r0 + rc]):
                    return False
                r0, q0 = r0 + rc, q0 + qc
        else:
            return False
    return True


# --------------------------------------------------------------------------- scoring


def _light(obs: pd.DataFrame, z: np.ndarray) -> AnnData:
    a = AnnData(obs=obs[[SAMPLE_KEY, LABEL_KEY]].copy(), shape=(len(obs), 0))
    a.obsm[REP] = np.asarray(z, dtype=np.float32)
    return a


def knn_transfer(ref_obs, z_ref, qry_obs, z_qry) -> np.ndarray:
    """Labels voted by :func:`histovi.tl.transfer_labels` (scArches' weighted kNN)."""
    import histovi

    ref, qry = _light(ref_obs, z_ref), _light(qry_obs, z_qry)
    out = histovi.tl.transfer_labels(
        ref,
        qry,
        label_key=LABEL_KEY,
        use_rep=REP,
        n_neighbors=N_NEIGHBORS_TRANSFER,
        inplace=False,
    )
    return out[LABEL_KEY].astype(str).to_numpy()


def head_transfer(ref_obs, z_ref, z_qry, seed: int) -> np.ndarray:
    """An MLP classifier on the frozen latent trained on the reference labels (scANVI's
    classifier shape: one hidden layer of 128), standardised inputs, early stopping."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    known = ref_obs[LABEL_KEY].notna().to_numpy()
    clf = make_pipeline(
        StandardScaler(),
        MLPClassifier(
            hidden_layer_sizes=(128,), early_stopping=True, max_iter=300, random_state=seed
        ),
    )
    clf.fit(z_ref[known], ref_obs[LABEL_KEY][known].astype(str).to_numpy())
    return clf.predict(z_qry)


def ari_by_section(qry_obs: pd.DataFrame, predicted: np.ndarray) -> tuple[float, dict[str, float]]:
    """Mean ARI over the query's labelled sections, and each section's."""
    from histovi.metrics import per_sample_scores

    a = AnnData(obs=qry_obs[[SAMPLE_KEY, LABEL_KEY]].copy(), shape=(len(qry_obs), 0))
    a.obs["predicted"] = pd.Categorical(predicted)
    df = per_sample_scores(a, LABEL_KEY, "predicted", sample_key=SAMPLE_KEY)
    per = {str(s): float(v) for s, v in zip(df["sample"], df["ARI"], strict=True)}
    return float(df["ARI"].mean()), per


# --------------------------------------------------------------------------- one held-out patient


def run_holdout(
    raw: AnnData,
    patient: str,
    seed: int,
    max_epochs: int | None,
    query_epochs: Sequence[int],
    n_top_genes: int,
    joint: dict[str, Any],
    with_scvi: bool,
    with_head: bool,
) -> list[dict[str, Any]]:
    import warnings

    import torch

    from histovi import HistoVI

    is_q = (raw.obs[PATIENT_KEY] == patient).to_numpy()
    ref = prepare_training(raw[~is_q].copy(), n_top_genes)
    query_raw = raw[is_q].copy()
    model, ref_seconds = train_histovi(ref, seed, max_epochs)
    z_ref = model.get_latent_representation()
    state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}

    # the joint model's latent of this split, for the like-for-like comparison
    jz, jobs = joint["z"], joint["obs"]
    j_q = (jobs[PATIENT_KEY] == patient).to_numpy()
    ari_joint, ari_joint_per = ari_by_section(
        jobs[j_q], knn_transfer(jobs[~j_q], jz[~j_q], jobs[j_q], jz[j_q])
    )
    ari_joint_head = (
        ari_by_section(jobs[j_q], head_transfer(jobs[~j_q], jz[~j_q], jz[j_q], seed))[0]
        if with_head
        else None
    )
    scvi_ref = None
    if with_scvi:
        scvi_ref, scvi_ref_seconds = train_scvi_reference(ref, seed, max_epochs)

    rows = []
    for epochs in query_epochs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            query = HistoVI.prepare_query_anndata(query_raw, model)
        qmodel = HistoVI.load_query_data(query, model)
        with _quiet_cwd():
            t0 = time.perf_counter()
            qmodel.train(max_epochs=epochs, **TRAIN_QUIET)
            q_seconds = time.perf_counter() - t0
        z_q = qmodel.get_latent_representation()
        # reference unchanged: the reference model bit for bit (parameters and latent), the
        # reference weights inside the query model bit for bit, and the query model's latent
        # of the reference spots. The last one is equal only up to float rounding: its first
        # layers are wider (zero inputs in the new columns) and BLAS accumulates a wider dot
        # product in a different order, so it is reported as the max |difference|.
        same_params = all(torch.equal(v, state[k]) for k, v in model.module.state_dict().items())
        same_ref_latent = bool(np.array_equal(model.get_latent_representation(), z_ref))
        weights_kept = reference_weights_kept(model.module, qmodel.module)
        z_via_query = qmodel.get_latent_representation(ref)
        max_diff_via_query = float(np.abs(z_via_query - z_ref).max())
        same_via_query = bool(np.array_equal(z_via_query, z_ref))
        pred = knn_transfer(ref.obs, z_ref, query.obs, z_q)
        ari_q, ari_q_per = ari_by_section(query.obs, pred)
        row: dict[str, Any] = {
            "patient": patient,
            "seed": seed,
            "query_epochs": int(epochs),
            "ref_epochs": len(model.history["elbo_train"]),
            "joint_epochs": joint["epochs"],
            "n_ref_spots": int(ref.n_obs),
            "n_query_spots": int(query.n_obs),
            "n_ref_genes": int(ref.n_vars),
            "query_genes_zero_filled": int(
                (~model.adata.var_names.isin(query_raw.var_names)).sum()
            ),
            "prepare_warnings": [str(w.message) for w in caught],
            "ARI_query_knn": ari_q,
            "ARI_query_knn_per_section": ari_q_per,
            "ARI_joint_knn": ari_joint,
            "ARI_joint_knn_per_section": ari_joint_per,
            "query_seconds": q_seconds,
            "ref_seconds": ref_seconds,
            "joint_seconds": joint["seconds"],
            "query_over_joint_time": q_seconds / joint["seconds"],
            "reference_params_unchanged": bool(same_params),
            "reference_latent_unchanged": same_ref_latent,
            "query_model_reference_weights_equal": weights_kept,
            "query_model_on_reference_bitwise_equal": same_via_query,
            "query_model_on_reference_max_abs_diff": max_diff_via_query,
        }
        if with_head:
            row["ARI_query_head"] = ari_by_section(
                query.obs, head_transfer(ref.obs, z_ref, z_q, seed)
            )[0]
            row["ARI_joint_head"] = ari_joint_head
        if with_scvi:
            zs_ref = scvi_ref.get_latent_representation()
            zs_q, s_seconds = map_scvi_query(query_raw, scvi_ref, seed, epochs)
            row["ARI_scvi_scarches_knn"] = ari_by_section(
                query.obs, knn_transfer(ref.obs, zs_ref, query.obs, zs_q)
            )[0]
            row["scvi_query_seconds"] = s_seconds
            row["scvi_ref_seconds"] = scvi_ref_seconds
            row["scvi_ref_epochs"] = len(scvi_ref.history["elbo_train"])
        rows.append(row)
        print(
            f"  {patient} seed={seed} query_epochs={epochs}: ARI query {ari_q:.3f} | joint "
            f"{ari_joint:.3f} | scVI {row.get('ARI_scvi_scarches_knn', float('nan')):.3f} | "
            f"time {row['query_over_joint_time']:.1%} | unchanged "
            f"{same_params and same_ref_latent and weights_kept} (|dz| via query "
            f"{max_diff_via_query:.1e})",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- table


def _fmt(values: pd.Series, pct: bool = False) -> str:
    v = values.dropna().astype(float)
    if v.empty:
        return "—"
    m = f"{v.mean():.1%}" if pct else f"{v.mean():.3f}"
    if len(v) > 1:
        m += f" ± {v.std(ddof=0) * (100 if pct else 1):.{1 if pct else 3}f}"
    return m


def make_table(rows: list[dict[str, Any]]) -> str:
    """One line per (held-out patient, query epochs), mean ± sd over seeds; plus the mean."""
    df = pd.DataFrame(rows)
    df["unchanged"] = (
        df["reference_params_unchanged"]
        & df["reference_latent_unchanged"]
        & df["query_model_reference_weights_equal"]
    )
    cols = [
        ("ARI query-mapped (kNN)", "ARI_query_knn", False),
        ("ARI query (MLP head)", "ARI_query_head", False),
        ("ARI joint (kNN)", "ARI_joint_knn", False),
        ("ARI joint (MLP head)", "ARI_joint_head", False),
        ("ARI scVI-scArches (kNN)", "ARI_scvi_scarches_knn", False),
        ("query/joint time", "query_over_joint_time", True),
    ]
    cols = [c for c in cols if c[1] in df]
    header = [
        "held-out patient",
        "query epochs",
        *[c[0] for c in cols],
        "Δ query−joint",
        "reference unchanged (bitwise)",
        "max abs Δz ref via query",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def line(name, sub):
        delta = sub["ARI_query_knn"] - sub["ARI_joint_knn"]
        cells = [name, str(int(sub["query_epochs"].iloc[0]))]
        cells += [_fmt(sub[c[1]], c[2]) for c in cols]
        cells += [
            _fmt(delta),
            "yes" if sub["unchanged"].all() else "NO",
            f"{sub['query_model_on_reference_max_abs_diff'].max():.1e}",
        ]
        return "| " + " | ".join(cells) + " |"

    for (patient, _epochs), sub in df.groupby(["patient", "query_epochs"], sort=True):
        lines.append(line(patient, sub))
    for epochs, sub in df.groupby("query_epochs", sort=True):
        # mean over patients first, then spread over seeds
        per_seed = sub.groupby("seed").mean(numeric_only=True).reset_index()
        per_seed["query_epochs"] = epochs
        per_seed["unchanged"] = bool(sub["unchanged"].all())
        lines.append(line("**mean**", per_seed))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _write(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))


def merge(dirs: Sequence[str | Path], data: str, out: str | Path) -> dict[str, Any]:
    """Pool the rows of finished runs (one seed or a few held-out patients each, run in
    parallel processes) into one table; runs with different settings are refused."""
    rows: list[dict[str, Any]] = []
    settings: list[dict[str, Any]] = []
    for d in dirs:
        path = Path(d) / data / "results.json"
        if not path.exists():
            raise SystemExit(f"--merge: {path} not found (run with --out {d} --data {data} first).")
        result = json.loads(path.read_text())
        if result.get("settings", {}).get("partial"):
            print(f"--merge: {path} is a partial run; using its finished rows", flush=True)
        else:
            settings.append(result["settings"])
        rows += result["rows"]
    for key in ("max_epochs", "n_top_genes", "transfer", "scvi_arches"):
        values = {json.dumps(s.get(key), sort_keys=True) for s in settings}
        if len(values) > 1:
            raise SystemExit(f"--merge: runs differ in {key}: {sorted(values)}; not pooled.")
    # Runs before the scVI reference followed HistoVI's epoch rule trained it for scVI's 400
    # epochs and did not record the number: not comparable with later runs.
    scvi_rows = [r for r in rows if r.get("ARI_scvi_scarches_knn") is not None]
    if 0 < sum("scvi_ref_epochs" in r for r in scvi_rows) < len(scvi_rows):
        raise SystemExit(
            "--merge: some runs do not record their scVI reference epochs (made before scVI "
            "followed HistoVI's epoch rule); rerun them or pool without them."
        )
    seen = [(r["patient"], r["seed"], r["query_epochs"]) for r in rows]
    dupes = sorted({x for x in seen if seen.count(x) > 1})
    if dupes:
        raise SystemExit(f"--merge: (patient, seed, query epochs) in more than one run: {dupes}")
    table = make_table(rows)
    out_dir = Path(out) / data
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(table + "\n")
    merged = {
        "settings": {"data": data, "merged_from": [str(d) for d in dirs], "runs": settings},
        "rows": rows,
        "table": table,
    }
    _write(out_dir, merged)
    print(table)
    return merged


def run(
    data: str,
    seeds: Sequence[int],
    max_epochs: int | None,
    query_epochs: Sequence[int],
    holdout: Sequence[str] | None = None,
    out: str | Path = "benchmarks/results/reference_mapping",
    n_top_genes: int = _data.N_HVG,
    with_scvi: bool = True,
    with_head: bool = True,
    cache_dir: str | Path | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Run the benchmark, write ``<out>/<data>/table.md`` and ``results.json``."""
    import torch

    if any(int(e) < 1 for e in query_epochs):
        raise ValueError(f"--query-epochs {list(query_epochs)}: every value must be >= 1.")
    torch.set_num_threads(threads)  # 1: several benchmarks share 2 cores (see README)
    cache = Path(cache_dir) if cache_dir else Path(__file__).resolve().parent / "results" / "cache"
    raw = load_raw(data, cache, seed=0)
    patients = sorted(raw.obs[PATIENT_KEY].unique())
    holdout = list(holdout or patients)
    unknown = set(holdout) - set(patients)
    if unknown:
        raise ValueError(f"--holdout {sorted(unknown)} not in the data's patients {patients}.")
    print(
        f"{data}: {raw.n_obs} spots, {raw.n_vars} genes, patients {patients}, "
        f"morphology: {_has_morphology(raw)}",
        flush=True,
    )
    out_dir = Path(out) / data
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for seed in seeds:
        joint_ad = prepare_training(raw, n_top_genes)
        jmodel, jseconds = train_histovi(joint_ad, seed, max_epochs)
        joint = {
            "z": jmodel.get_latent_representation(),
            "obs": joint_ad.obs[[SAMPLE_KEY, PATIENT_KEY, LABEL_KEY]].copy(),
            "seconds": jseconds,
            "epochs": len(jmodel.history["elbo_train"]),
        }
        print(
            f"seed {seed}: joint HistoVI {joint['epochs']} epochs in {jseconds:.0f} s", flush=True
        )
        for patient in holdout:
            rows += run_holdout(
                raw,
                patient,
                seed,
                max_epochs,
                query_epochs,
                n_top_genes,
                joint,
                with_scvi,
                with_head,
            )
            # partial results survive an interrupted run
            _write(out_dir, {"settings": {"data": data, "partial": True}, "rows": rows})
    table = make_table(rows)
    settings = {
        "data": data,
        "seeds": list(seeds),
        "max_epochs": max_epochs,
        "query_epochs": list(query_epochs),
        "n_top_genes": n_top_genes,
        "transfer": f"histovi.tl.transfer_labels, n_neighbors={N_NEIGHBORS_TRANSFER}",
        "scvi_arches": SCVI_ARCHES,
        "morphology": raw.uns.get(
            "benchmark_morphology", "simulated" if data in SIM_DATA else None
        ),
        "command": " ".join(sys.argv),
        "total_seconds": time.perf_counter() - t_start,
    }
    (out_dir / "table.md").write_text(table + "\n")
    result = {"settings": settings, "rows": rows, "table": table}
    _write(out_dir, result)
    print(table)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="sim_small", choices=[*SIM_DATA, "her2st"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="epochs of the reference, joint and scVI reference models "
        "(default: HistoVI's rule for each)",
    )
    parser.add_argument(
        "--query-epochs",
        nargs="+",
        type=int,
        default=[50],
        help="epochs of the query models (HistoVI and scVI); several values "
        "each get a query model on the same reference",
    )
    parser.add_argument(
        "--holdout", nargs="+", default=None, help="patients to hold out (default: every patient)"
    )
    parser.add_argument("--n-top-genes", type=int, default=_data.N_HVG)
    parser.add_argument("--no-scvi", action="store_true", help="skip scVI + scArches")
    parser.add_argument("--no-head", action="store_true", help="skip the MLP classifier head")
    parser.add_argument("--out", default="benchmarks/results/reference_mapping")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        default=None,
        help="pool the rows of finished runs (their --out folders) into one table in --out; "
        "trains nothing",
    )
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.data, args.out)
        return 0
    run(
        args.data,
        args.seeds,
        args.max_epochs,
        args.query_epochs,
        args.holdout,
        args.out,
        args.n_top_genes,
        not args.no_scvi,
        not args.no_head,
        threads=args.threads,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
