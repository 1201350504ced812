"""Scaling: seconds per epoch and peak memory of HistoVI against scVI as the study grows.

For each size (default 10k and 100k spots; 1M on request) a simulated study is generated once
and cached as an h5ad under ``--cache`` (default ``benchmarks/results/scaling/data``): 2,000
genes, a 64-d morphology embedding, 40 sections at every size (so that the number of batches,
which widens every layer of both models, does not change), simulated chunk by chunk
(:func:`histovi.datasets.simulate`, 4 patients x 1 section per call) and concatenated on disk.

Each (method, size) runs in its own process (:mod:`_harness`), in the same run:

* HistoVI with its defaults (``histovi.pp.spatial_neighbors(k=6)``, morphology view, niche
  decoder, the domain latent's neighbours' share fitted when training ends);
* scVI (``scvi.model.SCVI(adata, n_latent=16)``) on the same counts.

Both train with ``batch_size=128`` for one warm-up epoch and ``--epochs`` timed epochs.
Reported: seconds per timed epoch (a Lightning callback; with ``--limit-batches N`` only N
minibatches per epoch are run and the time is extrapolated to the full epoch, marked ``~``),
the whole ``train()`` call, ``get_latent_representation()``, the process's peak RSS (data
included) and the GPU's peak memory where there is one, and the ratios HistoVI / scVI.

Other modes:

* ``--step``: one training step (forward, backward, Adam) of scVI's and HistoVI's modules on a
  synthetic minibatch, no data set or loader;
* ``--morphology ENCODER ...``: morphology embedding throughput (tiles per second, peak RSS) of
  :func:`histovi.pp.embed_morphology` on simulated H&E images, per encoder and ``--device``
  (timm encoders with random weights);
* ``--pipeline``: the command line against the Python API on the built-in data, same machine,
  same run: ``histovi run --max-epochs E`` (its training stage, checkpoints included) and
  ``HistoVI.train(max_epochs=E)`` + ``get_latent_representation()`` on the data that run wrote.

Usage::

    python benchmarks/scaling.py --sizes 10000 100000 --epochs 1
    python benchmarks/scaling.py --sizes 1000000 --limit-batches 300
    python benchmarks/scaling.py --step
    python benchmarks/scaling.py --morphology stain-texture resnet50 --device cpu
    python benchmarks/scaling.py --pipeline --epochs 40
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

N_SECTIONS, N_CHUNKS, N_NEIGHBORS = 40, 10, 6
METHODS = ("scVI", "HistoVI")


def study_path(cache: Path, n_spots: int, n_genes: int, morph_dim: int) -> Path:
    return Path(cache) / f"study_{n_spots}_g{n_genes}_m{morph_dim}.h5ad"


def make_study(path: str, n_spots: int, n_genes: int = 2000, morph_dim: int = 64) -> dict:
    """Simulate the study of ``n_spots`` spots into ``path``, chunk by chunk, so that the whole
    study is never in memory twice over."""
    import anndata as ad
    from anndata.experimental import concat_on_disk

    import histovi

    path = Path(path)
    tmp = path.parent / f".{path.stem}_chunks"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes = [n_spots // N_CHUNKS + (c < n_spots % N_CHUNKS) for c in range(N_CHUNKS)]
    side = max(8, math.ceil(math.sqrt(math.ceil(max(sizes) / (N_SECTIONS // N_CHUNKS)))))
    files = []
    for c, size in enumerate(sizes):
        chunk = histovi.datasets.simulate(
            n_patients=N_SECTIONS // N_CHUNKS,
            n_sections_per_patient=1,
            grid_size=(side, side),
            n_genes=n_genes,
            morphology_dim=morph_dim,
            sections_without_image=0,
            seed=c,
        )[:size]
        obs = chunk.obs.astype(str)
        obs[["sample", "patient"]] = f"C{c}_" + obs[["sample", "patient"]]
        obs.index = f"C{c}_" + obs.index
        out = ad.AnnData(X=chunk.X, obs=obs, var=chunk.var[[]])  # counts once, no layer copy
        out.obsm = {k: np.asarray(chunk.obsm[k]) for k in ("spatial", "X_morphology")}
        files.append(str(tmp / f"chunk{c}.h5ad"))
        out.write_h5ad(files[-1])
    concat_on_disk(files, str(path), axis=0)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"n_spots": n_spots, "section_grid": side, "file_gib": path.stat().st_size / 2**30}


def _epoch_timer():
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.epochs: list[tuple[float, int]] = []  # (seconds, minibatches)

        def on_train_epoch_start(self, trainer, pl_module):
            self._t0, self._n = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._n += 1

        def on_train_epoch_end(self, trainer, pl_module):
            self.epochs.append((time.perf_counter() - self._t0, self._n))

    return EpochTimer()


def measure(
    method: str,
    path: str,
    epochs: int = 1,
    limit_batches: int | None = None,
    batch_size: int = 128,
    accelerator: str = "auto",
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train ``method`` on the study in ``path`` and measure (runs in its own process)."""
    import anndata as ad
    import scvi
    import torch

    import histovi

    H.limit_threads(threads)
    scvi.settings.seed = 0
    adata = ad.read_h5ad(path)
    t0 = time.perf_counter()
    if method == "HistoVI":
        histovi.pp.spatial_neighbors(adata, sample_key="sample", n_neighbors=N_NEIGHBORS)
        histovi.HistoVI.setup_anndata(
            adata,
            batch_key="sample",
            morphology_key="X_morphology",
            neighbors_key="spatial_neighbors",
        )
        model = histovi.HistoVI(adata)
    else:
        scvi.model.SCVI.setup_anndata(adata, batch_key="sample")
        model = scvi.model.SCVI(adata, n_latent=16)
    setup_s, timer = time.perf_counter() - t0, _epoch_timer()
    limit = {"limit_train_batches": limit_batches} if limit_batches else {}
    with H.Meter() as train:
        model.train(
            max_epochs=epochs + 1,
            accelerator=accelerator,
            batch_size=batch_size,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=False,
            callbacks=[timer],
            **limit,
        )
    with H.Meter() as latent:
        model.get_latent_representation()
    timed = timer.epochs[1:] or timer.epochs
    sec, n = np.mean([t for t, _ in timed]), np.mean([b for _, b in timed])
    full = math.ceil(len(model.train_indices) / batch_size)
    return {
        "method": method,
        "n_spots": int(adata.n_obs),
        "device": str(model.device),
        "sec_per_epoch": float(sec * full / n),
        "extrapolated": bool(n < full),
        "setup_s": setup_s,
        "train_s": train.wall_s,
        "latent_s": latent.wall_s,
        "peak_rss_gib": H._maxrss() / 2**30,
        "train_peak_above_data_gib": train.peak_mb / 2**10,
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
    }


def scaling_table(rows: list[dict]) -> str:
    """One row per run, then HistoVI / scVI per size."""
    df = pd.DataFrame(rows).sort_values(["n_spots", "method"], ascending=[True, False])
    runs = df[["n_spots", "method", "device"]].copy()
    runs["s/epoch"] = [
        ("~" if e else "") + f"{s:.2f}"
        for s, e in zip(df["sec_per_epoch"], df["extrapolated"], strict=True)
    ]
    for col in ("train_s", "latent_s", "peak_rss_gib", "train_peak_above_data_gib", "gpu_peak_gib"):
        runs[col] = df[col]
    ratios = []
    for n, g in df.groupby("n_spots"):
        by = g.set_index("method")
        if set(METHODS) <= set(by.index):
            h, s = by.loc["HistoVI"], by.loc["scVI"]
            ratios.append(
                {
                    "spots": n,
                    "s/epoch HistoVI / scVI": h.sec_per_epoch / s.sec_per_epoch,
                    "peak RSS HistoVI / scVI": h.peak_rss_gib / s.peak_rss_gib,
                }
            )
    md = H.markdown(runs, 2)
    if ratios:
        md += "\n" + H.markdown(pd.DataFrame(ratios), 2)
    return md + "\n~: extrapolated from the timed minibatches (--limit-batches).\n"


def time_steps(batch_size: int = 128, n_genes: int = 2000, morph_dim: int = 64) -> list[dict]:
    """ms per training step of scVI's and HistoVI's modules on synthetic minibatches."""
    import torch
    from scvi import REGISTRY_KEYS
    from scvi.module import VAE

    from histovi.module._module import NICHE_KEY, HistoVAE, view_registry_key

    gen = torch.Generator().manual_seed(0)
    rows = []
    for density in (0.1, 0.45, 0.9):
        rate = torch.full((batch_size, n_genes), -math.log1p(-density))
        tensors = {
            REGISTRY_KEYS.X_KEY: torch.poisson(rate, generator=gen),
            REGISTRY_KEYS.BATCH_KEY: torch.randint(0, N_SECTIONS, (batch_size, 1), generator=gen),
            REGISTRY_KEYS.LABELS_KEY: torch.zeros(batch_size, 1),
            NICHE_KEY: torch.poisson(rate * N_NEIGHBORS, generator=gen),
            view_registry_key("morphology"): torch.randn(batch_size, morph_dim, generator=gen),
        }
        modules = {
            "scVI": VAE(n_genes, n_batch=N_SECTIONS, n_latent=16),
            "HistoVI": HistoVAE(n_genes, N_SECTIONS, view_dims={"morphology": morph_dim}),
        }
        row: dict[str, Any] = {"non-zero share": density}
        for name, module in modules.items():
            opt = torch.optim.Adam(module.parameters(), 1e-3)
            for i in range(35):  # 5 warm-up steps, 30 timed
                if i == 5:
                    t0 = time.perf_counter()
                loss = module(tensors, loss_kwargs={"kl_weight": 0.5})[2].loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            row[f"{name} step ms"] = (time.perf_counter() - t0) / 30 * 1e3
        row["HistoVI / scVI"] = row["HistoVI step ms"] / row["scVI step ms"]
        rows.append(row)
    return rows


def morphology_job(encoder: str, n_spots: int, device: str, threads: int | None = 1) -> dict:
    """Tiles per second of one encoder on simulated H&E sections (runs in its own process)."""
    import histovi

    H.limit_threads(threads)
    side = max(8, math.ceil(math.sqrt(n_spots / 4)))
    adata = histovi.datasets.simulate(
        n_patients=2,
        n_sections_per_patient=2,
        grid_size=(side, side),
        n_genes=150,
        n_markers=10,
        with_images=True,
        sections_without_image=0,
    )
    with H.Meter() as meter:
        histovi.pp.embed_morphology(
            adata, encoder, device=device, progress=False, pretrained=encoder == "stain-texture"
        )
    return {
        "encoder": encoder,
        "device": device,
        "tiles": adata.n_obs,
        "tiles/s": adata.n_obs / meter.wall_s,
        "peak MB above start": meter.peak_mb,
    }


def pipeline_vs_api(out: Path, epochs: int) -> list[dict]:
    """Seconds per epoch of the CLI's training stage and of the API on the same data."""
    import re
    import subprocess

    import anndata as ad

    run_dir = out / "pipeline_run"
    cmd = [sys.executable, "-m", "histovi", "run", "--out", str(run_dir), "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--max-epochs", str(epochs)], capture_output=True, text=True)
    whole = time.perf_counter() - start
    found = re.search(r"train HistoVI: done in ([0-9.]+) s", proc.stdout + proc.stderr)
    if proc.returncode or not found:
        raise RuntimeError(f"histovi run failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    import histovi

    adata = ad.read_h5ad(run_dir / "adata.h5ad")
    histovi.HistoVI.setup_anndata(
        adata, layer="counts" if "counts" in adata.layers else None, batch_key="sample",
        morphology_key="X_morphology", neighbors_key="spatial_neighbors",
    )  # fmt: skip
    model = histovi.HistoVI(adata)
    start = time.perf_counter()
    model.train(max_epochs=epochs, enable_progress_bar=False)
    model.get_latent_representation()
    api = time.perf_counter() - start
    cli = float(found.group(1))
    common = {"spots": adata.n_obs, "epochs": epochs}
    return [
        {"how": "histovi run", **common, "s/epoch": cli / epochs, "train_s": cli, "whole_s": whole},
        {"how": "HistoVI.train", **common, "s/epoch": api / epochs, "train_s": api},
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--morphology-dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs, after one warm-up")
    parser.add_argument("--limit-batches", type=int, help="minibatches per epoch, extrapolated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--step", action="store_true", help="one training step of each module")
    parser.add_argument("--morphology", nargs="+", metavar="ENCODER", help="tiles per second")
    parser.add_argument("--n-tiles", type=int, default=1000, help="tiles for --morphology")
    parser.add_argument("--device", default="cpu", help="device for --morphology")
    parser.add_argument("--pipeline", action="store_true", help="CLI vs API, built-in data")
    parser.add_argument("--out", default="benchmarks/results/scaling")
    parser.add_argument("--cache", help="study cache (default OUT/data)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        H.limit_threads(args.threads)
        md = H.markdown(pd.DataFrame(time_steps(args.batch_size, args.genes, args.morphology_dim)))
        (out / "step.md").write_text(md)
        print(md)
        return 0
    if args.pipeline:
        epochs = max(args.epochs, 40)
        md = H.markdown(pd.DataFrame(pipeline_vs_api(out, epochs)), 2)
        (out / "pipeline.md").write_text(md)
        print(md)
        return 0
    if args.morphology:
        rows = [
            H.run_job(
                "scaling",
                "morphology_job",
                {
                    "encoder": e,
                    "n_spots": args.n_tiles,
                    "device": args.device,
                    "threads": args.threads,
                },
                out / "logs" / f"m_{e}.txt",
            )
            for e in args.morphology
        ]
        md = H.markdown(pd.DataFrame(rows), 1)
        (out / "morphology.md").write_text(md)
        print(md)
        return 0
    cache = Path(args.cache).resolve() if args.cache else out / "data"
    results = out / "scaling.json"
    rows = H.load_json(results) or []
    for n in args.sizes:
        path = study_path(cache, n, args.genes, args.morphology_dim)
        if not path.exists():
            kwargs = {
                "path": str(path),
                "n_spots": n,
                "n_genes": args.genes,
                "morph_dim": args.morphology_dim,
            }
            print(H.run_job("scaling", "make_study", kwargs, out / "logs" / f"make_{n}.txt"))
        for method in args.methods:
            kwargs = {
                "method": method,
                "path": str(path),
                "epochs": args.epochs,
                "limit_batches": args.limit_batches,
                "batch_size": args.batch_size,
                "accelerator": args.accelerator,
                "threads": args.threads,
            }
            row = H.run_job("scaling", "measure", kwargs, out / "logs" / f"{method}_{n}.txt")
            print(f"{method} n={n:,}: {row}", flush=True)
            if row.get("status") == "failed":
                continue
            same = (row["method"], row["n_spots"], row["device"])
            rows = [r for r in rows if (r["method"], r["n_spots"], r["device"]) != same] + [row]
            H.save_json(results, rows)
    md = scaling_table([r for r in rows if r["n_spots"] in args.sizes]) if rows else ""
    (out / "scaling.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
