"""Quick sweep of HistoVI settings against scVI, for choosing defaults.

One process, one training seed per call, scored with the EVALUATION protocol (GMM + k-means with
k = number of labels, all spots clustered, per labelled section ARI/NMI, clustering seeds 0-2).
Lighter than ``integration.py`` (no peers, no scib-metrics); the numbers behind the default
``alignment_weight`` come from here.

    python benchmarks/variant_sweep.py --data her2st --epochs 40 --seed 0 \
        --variants scvi histovi histovi:alignment_weight=20 histovi:use_niche=False,alignment_weight=0
    python benchmarks/variant_sweep.py --data sim --epochs 40 --seed 0 \
        --variants scvi histovi:alignment_weight=0 histovi:alignment_weight=5 histovi:alignment_weight=20

A variant is ``scvi`` or ``histovi[:key=value,...]`` (model keyword arguments; keys starting with
``plan.`` go to the training plan, e.g. ``histovi:plan.n_epochs_kl_warmup=None`` trains with the
full KL weight from the first epoch, keys starting with ``train.`` to ``train``, e.g.
``histovi:train.early_stopping=True``, keys starting with ``setup.`` to ``setup_anndata``, e.g.
``histovi:setup.categorical_covariate_keys=patient`` (a list of one key)). Results are appended to ``<out>/sweep.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data  # noqa: E402

CACHE = Path(__file__).resolve().parent / "results" / "cache"


def _parse_variant(text: str) -> tuple[str, dict]:
    name, _, args = text.partition(":")
    kwargs = {}
    for part in filter(None, args.split(",")):
        key, value = part.split("=")
        if value in ("True", "False"):
            kwargs[key] = value == "True"
        elif value == "None":
            kwargs[key] = None
        else:
            try:
                kwargs[key] = float(value) if "." in value or "e" in value else int(value)
            except ValueError:
                kwargs[key] = value
    return name, kwargs


def patient_purity(z: np.ndarray, patients: np.ndarray, k: int, seed: int = 0) -> float:
    """Mean share of a k-means cluster's spots that come from its most frequent patient
    (1 = every domain is patient-specific; 1 / n_patients = perfectly mixed)."""
    import pandas as pd
    from sklearn.cluster import KMeans

    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(z)
    table = pd.crosstab(labels, patients)
    return float((table.max(1) / table.sum(1)).mean())


def _pair_scores(adata, z, name: str, seed: int) -> dict[str, float]:
    """Simulator only: separation of the domain pairs that one view alone separates."""
    if args_data_is_sim(adata):
        import integration

        rows = integration.pair_separation(adata, z, name, seed)
        out = {}
        for short, pair in (("morph_pair", "morphology-only"), ("niche_pair", "neighbourhood")):
            mine = [r for r in rows if r["pair"].startswith(pair)]
            out[short] = float(np.mean([r["pair_ARI"] for r in mine])) if mine else float("nan")
            # whether the latent holds the difference at all (0.5 = chance)
            out[f"{short}_probe"] = float(mine[0]["pair_probe"]) if mine else float("nan")
        return out
    return {}


def args_data_is_sim(adata) -> bool:
    return adata.uns.get("benchmark", {}).get("scenario", "") in _data.SIM_SCENARIOS


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=list(_data.SCENARIOS), default="sim")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["scvi", "histovi"])
    parser.add_argument("--out", default="benchmarks/results/sweep")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--n-neighbors",
        type=int,
        default=None,
        help="recompute the spatial neighbour graph with this k (default: the data's, k = 6)",
    )
    parser.add_argument(
        "--save-latent",
        action="store_true",
        help="also write each variant's posterior means to <out>/latent_<variant>_s<seed>.npy",
    )
    args = parser.parse_args(argv)

    import scvi
    import torch

    import histovi
    from histovi.metrics import cluster_and_score

    torch.set_num_threads(args.threads)  # several of these share 2 cores: 1 each
    adata = _data.load(args.data, cache_dir=CACHE)
    if args.n_neighbors is not None:
        histovi.pp.spatial_neighbors(adata, sample_key="sample", n_neighbors=args.n_neighbors)
    label_key = _data.LABEL_KEY
    morphology_key = "X_morphology" if "X_morphology" in adata.obsm else None
    labels = adata.obs[label_key].astype(object).where(adata.obs[label_key].notna(), None)
    patient_key = "patient" if "patient" in adata.obs else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| data | variant | seed | epochs | ARI | NMI | ARI GMM | ARI k-means | purity | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for text in args.variants:
        name, kwargs = _parse_variant(text)
        plan_kwargs = {k[5:]: kwargs.pop(k) for k in list(kwargs) if k.startswith("plan.")}
        train_kwargs = {k[6:]: kwargs.pop(k) for k in list(kwargs) if k.startswith("train.")}
        setup_kwargs = {k[6:]: kwargs.pop(k) for k in list(kwargs) if k.startswith("setup.")}
        if "categorical_covariate_keys" in setup_kwargs:
            setup_kwargs["categorical_covariate_keys"] = [
                setup_kwargs["categorical_covariate_keys"]
            ]
        scvi.settings.seed = args.seed
        t0 = time.perf_counter()
        if name == "scvi":
            scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="sample", **setup_kwargs)
            model = scvi.model.SCVI(adata, n_latent=16, **kwargs)
        elif name == "histovi":
            histovi.HistoVI.setup_anndata(
                adata,
                layer="counts",
                batch_key="sample",
                morphology_key=morphology_key,
                neighbors_key="spatial_neighbors",
                **setup_kwargs,
            )
            model = histovi.HistoVI(adata, **kwargs)
        else:
            raise SystemExit(f"unknown variant {text!r}: use scvi or histovi[:key=value,...]")
        model.train(
            max_epochs=args.epochs,
            plan_kwargs=plan_kwargs,
            enable_progress_bar=False,
            enable_model_summary=False,
            **train_kwargs,
        )
        z, z_var = model.get_latent_representation(return_dist=True)
        scores = cluster_and_score(
            z, labels.to_numpy(), adata.obs["sample"].to_numpy(), seeds=(0, 1, 2)
        )
        by = scores.groupby("method")["ARI"].mean()
        k = int(labels.dropna().nunique())
        purity = patient_purity(z, adata.obs[patient_key].to_numpy(), k) if patient_key else np.nan
        row = {
            "data": args.data,
            "variant": text,
            "seed": args.seed,
            "epochs": args.epochs,
            "n_neighbors": int(adata.obsm["spatial_neighbors"].shape[1]),
            "epochs_trained": len(model.history["elbo_train"]),
            "ARI": float(scores["ARI"].mean()),
            "NMI": float(scores["NMI"].mean()),
            "ARI_gmm": float(by.get("gmm", np.nan)),
            "ARI_kmeans": float(by.get("kmeans", np.nan)),
            "patient_purity": purity,
            # Spread of the posterior means and the posterior sd, mean over latent dimensions:
            # the cycle term shrinks both several-fold relative to scVI's (see README).
            "latent_sd": float(z.std(0).mean()),
            "posterior_sd": float(np.sqrt(z_var).mean()),
            **_pair_scores(adata, z, text, args.seed),
            "seconds": time.perf_counter() - t0,
        }
        if args.save_latent:
            safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in text)
            np.save(out / f"latent_{safe}_s{args.seed}.npy", z)
        with open(out / "sweep.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(
            f"| {row['data']} | {text} | {args.seed} | {args.epochs} | {row['ARI']:.3f} | "
            f"{row['NMI']:.3f} | {row['ARI_gmm']:.3f} | {row['ARI_kmeans']:.3f} | "
            f"{purity:.2f} | {row['seconds']:.0f} | trained {row['epochs_trained']} epochs |"
            f" latent sd {row['latent_sd']:.2f} posterior sd {row['posterior_sd']:.2f} |"
            + (
                f" pairs morph {row['morph_pair']:.2f} (probe {row['morph_pair_probe']:.2f})"
                f" niche {row['niche_pair']:.2f} (probe {row['niche_pair_probe']:.2f})"
                if "morph_pair" in row
                else ""
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
