"""Quick sweep of HistoVI settings against scVI, for choosing defaults.

One process, one training seed per call, scored with the EVALUATION protocol (GMM + k-means with
k = number of labels, all spots clustered, per labelled section ARI/NMI, clustering seeds 0-2).
Lighter than ``integration.py`` (no peers, no scib-metrics); the numbers behind the default
``alignment_weight`` come from here.

    python benchmarks/variant_sweep.py --data her2st --epochs 40 --seed 0 \
        --variants scvi histovi histovi:alignment_weight=20 histovi:use_niche=False,alignment_weight=0
    python benchmarks/variant_sweep.py --data sim --epochs 40 --seed 0 \
        --variants scvi histovi:alignment_weight=0 histovi:alignment_weight=5 histovi:alignment_weight=20

A variant is ``scvi`` or ``histovi[:key=value,...]`` (HistoVI keyword arguments). Results are
appended to ``<out>/sweep.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HER2ST = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st" / "her2st_dev.h5ad"
)


def _parse_variant(text: str) -> tuple[str, dict]:
    name, _, args = text.partition(":")
    kwargs = {}
    for part in filter(None, args.split(",")):
        key, value = part.split("=")
        kwargs[key] = {"True": True, "False": False}.get(value, None)
        if kwargs[key] is None:
            kwargs[key] = float(value) if "." in value or "e" in value else int(value)
    return name, kwargs


def load(data: str, n_top_genes: int = 2000):
    import scanpy as sc

    import histovi

    if data == "her2st":
        adata = sc.read_h5ad(HER2ST)
        adata.layers["counts"] = adata.X.copy()
        sc.pp.highly_variable_genes(
            adata, flavor="seurat_v3", n_top_genes=n_top_genes, batch_key="sample", layer="counts"
        )
        adata = adata[:, adata.var["highly_variable"]].copy()
        label_key, morphology_key = "label", None
    else:
        adata = histovi.datasets.simulate(grid_size=(20, 20), seed=0)
        label_key, morphology_key = "domain", "X_morphology"
    histovi.pp.spatial_neighbors(adata, sample_key="sample", n_neighbors=6)
    return adata, label_key, morphology_key


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=["her2st", "sim"], default="sim")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["scvi", "histovi"])
    parser.add_argument("--out", default="benchmarks/results/sweep")
    args = parser.parse_args(argv)

    import scvi
    import torch

    import histovi
    from histovi.metrics import cluster_and_score

    torch.set_num_threads(1)  # several of these share 2 cores; see benchmarks/README.md
    adata, label_key, morphology_key = load(args.data)
    labels = adata.obs[label_key].astype(object).where(adata.obs[label_key].notna(), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| data | variant | seed | epochs | ARI | NMI | ARI GMM | ARI k-means | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for text in args.variants:
        name, kwargs = _parse_variant(text)
        scvi.settings.seed = args.seed
        t0 = time.perf_counter()
        if name == "scvi":
            scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="sample")
            model = scvi.model.SCVI(adata, n_latent=16, **kwargs)
        elif name == "histovi":
            histovi.HistoVI.setup_anndata(
                adata,
                layer="counts",
                batch_key="sample",
                morphology_key=morphology_key,
                neighbors_key="spatial_neighbors",
            )
            model = histovi.HistoVI(adata, **kwargs)
        else:
            raise SystemExit(f"unknown variant {text!r}: use scvi or histovi[:key=value,...]")
        model.train(max_epochs=args.epochs, enable_progress_bar=False, enable_model_summary=False)
        z = model.get_latent_representation()
        scores = cluster_and_score(
            z, labels.to_numpy(), adata.obs["sample"].to_numpy(), seeds=(0, 1, 2)
        )
        by = scores.groupby("method")["ARI"].mean()
        row = {
            "data": args.data,
            "variant": text,
            "seed": args.seed,
            "epochs": args.epochs,
            "ARI": float(scores["ARI"].mean()),
            "NMI": float(scores["NMI"].mean()),
            "ARI_gmm": float(by.get("gmm", np.nan)),
            "ARI_kmeans": float(by.get("kmeans", np.nan)),
            "seconds": time.perf_counter() - t0,
        }
        with open(out / "sweep.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(
            f"| {row['data']} | {text} | {args.seed} | {args.epochs} | {row['ARI']:.3f} | "
            f"{row['NMI']:.3f} | {row['ARI_gmm']:.3f} | {row['ARI_kmeans']:.3f} | "
            f"{row['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
