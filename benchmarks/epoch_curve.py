"""Domain ARI and validation ELBO as training goes on: how many epochs are enough?

Trains one model (HistoVI with its defaults, or scVI as the integration benchmark runs it) for
``--epochs`` epochs (default: HistoVI's rule) with a 10 % validation split, and every
``--every`` epochs clusters the latent with the EVALUATION protocol (GMM + k-means, k = number
of labels, clustering seeds 0-2, per labelled section) and records the train and validation
ELBO. The curve shows whether the ARI peaks before the end, and whether the validation ELBO
(what early stopping watches) peaks at the same place.

    python benchmarks/epoch_curve.py --data her2st --model histovi --seed 0 --every 20

Writes ``<out>/<data>_<model>_seed<seed>.json`` and ``.png`` and prints a table.
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


def make_model(name: str, adata, kwargs: dict):
    import scvi

    import histovi

    if name == "scvi":
        scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key=_data.SAMPLE_KEY)
        return scvi.model.SCVI(adata, n_latent=16, **kwargs)
    histovi.HistoVI.setup_anndata(
        adata,
        layer="counts",
        batch_key=_data.SAMPLE_KEY,
        morphology_key="X_morphology" if "X_morphology" in adata.obsm else None,
        neighbors_key="spatial_neighbors",
    )
    return histovi.HistoVI(adata, **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=list(_data.SCENARIOS), default="sim")
    parser.add_argument("--model", choices=["histovi", "scvi"], default="histovi")
    parser.add_argument("--epochs", type=int, default=None, help="default: 400 (scVI's rule)")
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kwargs", default="", help="model keyword arguments as JSON, e.g. '{\"cycle_weight\": 0}'"
    )
    parser.add_argument("--out", default="benchmarks/results/epoch_curve")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.every < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error(f"--every {args.every} and --epochs {args.epochs} must be at least 1")
    try:
        model_kwargs = json.loads(args.kwargs) if args.kwargs else {}
    except json.JSONDecodeError as err:
        parser.error(
            f"--kwargs {args.kwargs!r} is not JSON ({err}); e.g. '{{\"cycle_weight\": 0}}'"
        )

    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    from histovi.metrics import cluster_and_score

    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    adata = _data.load(args.data, cache_dir=CACHE)
    labels = adata.obs[_data.LABEL_KEY].astype(object)
    labels = labels.where(labels.notna(), None).to_numpy()
    samples = adata.obs[_data.SAMPLE_KEY].to_numpy()
    model = make_model(args.model, adata, model_kwargs)
    n = adata.n_obs
    epochs = args.epochs or 400  # past the default, to see both sides of the peak
    rows: list[dict] = []

    class Score(Callback):
        """Score the latent every ``--every`` epochs (module in eval mode, then back)."""

        def on_train_epoch_end(self, trainer, pl_module):
            epoch = trainer.current_epoch + 1
            if epoch % args.every and epoch != epochs:
                return
            module = model.module
            module.eval()
            trained, model.is_trained_ = model.is_trained_, True  # scvi-tools refuses otherwise
            z = model.get_latent_representation()
            model.is_trained_ = trained
            module.train()
            s = cluster_and_score(z, labels, samples, seeds=(0, 1, 2))
            by = s.groupby("method")["ARI"].mean()
            m = trainer.callback_metrics
            row = {
                "epoch": epoch,
                "ARI": float(s["ARI"].mean()),
                "ARI_gmm": float(by.get("gmm", np.nan)),
                "ARI_kmeans": float(by.get("kmeans", np.nan)),
                "NMI": float(s["NMI"].mean()),
                "elbo_train": float(m.get("elbo_train", np.nan)),
                "elbo_validation": float(m.get("elbo_validation", np.nan)),
                "kl_weight": float(getattr(pl_module, "kl_weight", np.nan)),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"| {epoch} | {row['ARI']:.3f} | {row['ARI_gmm']:.3f} | {row['ARI_kmeans']:.3f} | "
                f"{row['NMI']:.3f} | {row['elbo_train']:.1f} | {row['elbo_validation']:.1f} | "
                f"{row['kl_weight']:.3f} | {row['seconds']:.0f} |",
                flush=True,
            )

    print(f"{args.data} {args.model} seed {args.seed}: {n} spots, {epochs} epochs")
    print("| epoch | ARI | ARI GMM | ARI k-means | NMI | ELBO train | ELBO val | KL weight | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        train_size=0.9,
        check_val_every_n_epoch=1,
        callbacks=[Score()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.data}_{args.model}_seed{args.seed}"
    stem.with_suffix(".json").write_text(
        json.dumps({"args": vars(args), "epochs": epochs, "rows": rows}, indent=1)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(ep, [r["ARI"] for r in rows], "o-")
    ax[0].set(xlabel="epoch", ylabel="ARI (mean GMM, k-means)", title=f"{args.data} {args.model}")
    ax[1].plot(ep, [r["elbo_train"] for r in rows], label="train")
    ax[1].plot(ep, [r["elbo_validation"] for r in rows], label="validation")
    ax[1].set(xlabel="epoch", ylabel="ELBO (loss)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    print(f"wrote {stem}.json, {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
