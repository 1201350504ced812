"""Wall time per epoch and peak memory of HistoVI vs scVI as the number of spots grows.

Each (method, size) runs in its own subprocess so that peak RSS (``ru_maxrss``) belongs to that run
alone. The data are simulated (histovi.datasets.simulate) with the same genes for both methods;
HistoVI uses its defaults (morphology view, niche decoder over k=6 neighbours, adversarial
alignment). Reported: seconds per epoch (mean over the timed epochs, after one warm-up epoch),
peak RSS, and HistoVI / scVI ratios.

    python benchmarks/speed.py --sizes 10000 100000 --epochs 2 --out benchmarks/results/speed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _one_run(method: str, n_spots: int, n_genes: int, epochs: int, threads: int = 1) -> dict:
    import numpy as np
    import scvi
    import torch

    import histovi

    torch.set_num_threads(threads)
    grid = (28, 28)
    n_sections = max(2, int(np.ceil(n_spots / (grid[0] * grid[1]))))
    n_patients = min(4, n_sections)
    t0 = time.perf_counter()
    adata = histovi.datasets.simulate(
        n_patients=n_patients,
        n_sections_per_patient=int(np.ceil(n_sections / n_patients)),
        grid_size=grid,
        n_genes=n_genes,
        sections_without_image=0,
        seed=0,
    )
    adata = adata[:n_spots].copy()
    t_sim = time.perf_counter() - t0
    scvi.settings.seed = 0
    if method == "histovi":
        histovi.pp.spatial_neighbors(adata, sample_key="sample")
        histovi.HistoVI.setup_anndata(
            adata,
            layer="counts",
            batch_key="sample",
            morphology_key="X_morphology",
            neighbors_key="spatial_neighbors",
        )
        model = histovi.HistoVI(adata)
    else:
        scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="sample")
        model = scvi.model.SCVI(adata, n_latent=16)

    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_start(self, trainer, pl_module):
            self._t = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self._t)

    timer = EpochTimer()
    model.train(
        max_epochs=epochs + 1,
        train_size=1.0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        logger=False,
    )
    t0 = time.perf_counter()
    model.get_latent_representation()
    t_latent = time.perf_counter() - t0
    timed = timer.times[1:] or timer.times
    return {
        "method": method,
        "n_spots": int(adata.n_obs),
        "n_genes": n_genes,
        "sec_per_epoch": float(np.mean(timed)),
        "latent_sec": t_latent,
        "simulate_sec": t_sim,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch_threads": __import__("torch").get_num_threads(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="benchmarks/results/speed")
    parser.add_argument("--_child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        print(
            json.dumps(
                _one_run(args._child[0], int(args._child[1]), args.genes, args.epochs, args.threads)
            )
        )
        return

    rows = []
    for n in args.sizes:
        for method in ("scvi", "histovi"):
            cmd = [
                sys.executable,
                __file__,
                "--_child",
                method,
                str(n),
                "--genes",
                str(args.genes),
                "--epochs",
                str(args.epochs),
                "--threads",
                str(args.threads),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode != 0 or not line:
                print(f"{method} n={n} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[-1]))
            print(f"done {method} n={n}: {rows[-1]['sec_per_epoch']:.1f} s/epoch", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| spots | scVI s/epoch | HistoVI s/epoch | time ratio | scVI peak GiB | HistoVI peak GiB | memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["method"], r["n_spots"]): r for r in rows}
    for n in sorted({r["n_spots"] for r in rows}):
        s, h = by.get(("scvi", n)), by.get(("histovi", n))
        if not (s and h):
            continue
        lines.append(
            f"| {n:,} | {s['sec_per_epoch']:.2f} | {h['sec_per_epoch']:.2f} | "
            f"{h['sec_per_epoch'] / s['sec_per_epoch']:.2f} | {s['peak_rss_gib']:.2f} | "
            f"{h['peak_rss_gib']:.2f} | {h['peak_rss_gib'] / s['peak_rss_gib']:.2f} |"
        )
    table = "\n".join(lines)
    (out / "speed.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
