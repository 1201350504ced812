"""Morphology embedding throughput and memory (histovi.pp.embed_morphology).

1. Writes a large synthetic H&E-like RGB image (default 20k x 20k px, 0.5 µm/px, tiled JPEG
   TIFF, written tile by tile so the full image is never in memory) and an AnnData whose spots
   point into it through ``uns['spatial'][s]['image_file']``.
2. Embeds a subset of spots with ``stain-texture`` and with timm ``resnet50`` (random weights,
   CPU unless --device), each in a fresh subprocess, and reports tiles/second, peak RSS and the
   tracemalloc peak (Python + numpy allocations). Peak memory far below the image size shows
   that tiles are read region by region.
3. On the built-in simulator with images, k-means on the stain-texture embedding vs the
   ground-truth domains (ARI): does the encoder see the domains?

Writes benchmarks/results/morphology_throughput.{md,json}.

Usage: python benchmarks/morphology_throughput.py [--size 20000] [--n-spots 2000]
       [--n-spots-timm 128] [--device cpu] [--skip-ari]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def write_large_tiff(path: Path, size: int, tile: int = 512, seed: int = 0) -> None:
    """Tiled JPEG TIFF of ``size`` x ``size`` RGB px, generated tile by tile."""
    import anndata as ad
    import pandas as pd
    import tifffile

    from histovi.datasets._images import draw_he_images

    # a bank of H&E-like textures (2 µm/px, upsampled x4 to 0.5 µm/px) to fill the tiles
    n = 6
    ii, jj = np.meshgrid(np.arange(n), np.arange(n))
    xy = np.c_[(100 * ii + 150).ravel(), (100 * jj + 150).ravel()].astype(float)
    small = ad.AnnData(np.zeros((n * n, 1), np.float32))
    small.obs["sample"] = "x"
    small.obs["domain"] = pd.Categorical(np.array(["tumour", "stroma", "immune"])[ii.ravel() % 3])
    small.obsm["spatial"] = xy
    bank = draw_he_images(small, seed=seed)["x"]["images"]["hires"]
    rng = np.random.default_rng(seed)

    def tiles():
        for ty in range(0, size, tile):
            for tx in range(0, size, tile):
                if (tx // tile + ty // tile) % 7 == 0:  # some glass, flagged as background
                    yield np.full((tile, tile, 3), 243, np.uint8)
                    continue
                y0 = rng.integers(0, bank.shape[0] - tile // 4)
                x0 = rng.integers(0, bank.shape[1] - tile // 4)
                t = bank[y0 : y0 + tile // 4, x0 : x0 + tile // 4]
                yield np.repeat(np.repeat(t, 4, 0), 4, 1)

    tifffile.imwrite(
        path,
        tiles(),
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
    )


def make_adata(image: Path, size: int, n_spots: int, seed: int = 0):
    import anndata as ad

    rng = np.random.default_rng(seed)
    margin = 300
    xy = rng.uniform(margin, size - margin, (n_spots, 2))
    adata = ad.AnnData(np.zeros((n_spots, 1), np.float32))
    adata.obs["sample"] = "big"
    adata.obsm["spatial"] = xy  # full-res px of the TIFF
    adata.uns["spatial"] = {
        "big": {
            "image_file": str(image),
            "scalefactors": {"tissue_hires_scalef": 1.0, "um_per_px_fullres": 0.5},
        }
    }
    return adata


def _run(queue, image, size, n_spots, encoder, device, batch_size, num_workers):
    import torch

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    import psutil

    import histovi

    adata = make_adata(Path(image), size, n_spots)
    rss_before = psutil.Process().memory_info().rss / 2**20  # after imports: the baseline
    kw = {"pretrained": False} if encoder != "stain-texture" else {}
    tracemalloc.start()
    t0 = time.perf_counter()
    histovi.pp.embed_morphology(
        adata,
        encoder,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=False,
        **kw,
    )
    dt = time.perf_counter() - t0
    _, peak_py = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rec = adata.uns["histovi"]["morphology"]
    queue.put(
        {
            "encoder": encoder,
            "device": str(device),
            "n_tiles": n_spots,
            "n_valid": int(adata.obs["morphology_valid"].sum()),
            "tile_px": int(rec["tile_px"]),
            "target_mpp": float(rec["target_mpp"]),
            "seconds": dt,
            "tiles_per_s": n_spots / dt,
            "rss_before_mb": rss_before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tracemalloc_peak_mb": peak_py / 2**20,
        }
    )


def measure(image, size, n_spots, encoder, device, batch_size=32, num_workers=0) -> dict:
    ctx = mp.get_context("spawn")  # a fresh process: its peak RSS is this run's alone
    q = ctx.Queue()
    p = ctx.Process(
        target=_run, args=(q, str(image), size, n_spots, encoder, device, batch_size, num_workers)
    )
    p.start()
    out = q.get()
    p.join()
    return out


def simulator_ari(seed: int = 0) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    import histovi

    adata = histovi.datasets.simulate(
        n_patients=2,
        n_sections_per_patient=2,
        grid_size=(16, 16),
        n_genes=150,
        n_markers=10,
        with_images=True,
        sections_without_image=0,
        seed=seed,
    )
    t0 = time.perf_counter()
    histovi.pp.embed_morphology(adata, "stain-texture", progress=False)
    dt = time.perf_counter() - t0
    valid = adata.obs["morphology_valid"].to_numpy()
    emb = adata.obsm["X_morphology"][valid]
    z = (emb - emb.mean(0)) / (emb.std(0) + 1e-8)
    dom = adata.obs["domain"].to_numpy()[valid]
    k = len(np.unique(dom))
    aris = [
        adjusted_rand_score(dom, KMeans(k, n_init=10, random_state=s).fit_predict(z))
        for s in range(3)
    ]
    per_section = {}
    samples = adata.obs["sample"].to_numpy()[valid]
    for s in np.unique(samples):
        m = samples == s
        ks = len(np.unique(dom[m]))
        per_section[str(s)] = adjusted_rand_score(
            dom[m], KMeans(ks, n_init=10, random_state=0).fit_predict(z[m])
        )
    return {
        "n_spots": int(adata.n_obs),
        "n_valid": int(valid.sum()),
        "n_domains": int(k),
        "ari_pooled_mean": float(np.mean(aris)),
        "ari_pooled_sd": float(np.std(aris)),
        "ari_per_section": per_section,
        "embed_seconds": dt,
    }


def _throughput(args, tmp: Path) -> list[dict]:
    image = tmp / "big.tif"
    t0 = time.perf_counter()
    write_large_tiff(image, args.size)
    print(
        f"wrote {args.size}x{args.size} RGB tiled TIFF ({image.stat().st_size / 2**20:.0f} MB on "
        f"disk, {args.size**2 * 3 / 2**20:.0f} MB decoded) in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    rows = []
    for enc, n in (("stain-texture", args.n_spots), ("resnet50", args.n_spots_timm)):
        r = measure(image, args.size, n, enc, args.device, num_workers=args.num_workers)
        print(r, flush=True)
        rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--n-spots", type=int, default=2000)
    ap.add_argument("--n-spots-timm", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--skip-ari", action="store_true")
    ap.add_argument(
        "--skip-throughput",
        action="store_true",
        help="keep the throughput runs of the previous results JSON (rerun only the ARI part)",
    )
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    previous = RESULTS / "morphology_throughput.json"
    if args.skip_throughput and previous.exists():
        old = json.loads(previous.read_text())
        rows, args.size = old["runs"], old["image_px"]
    if not (args.skip_throughput and rows):
        with tempfile.TemporaryDirectory() as tmp:
            rows = _throughput(args, Path(tmp))
    result = {"image_px": args.size, "image_decoded_mb": args.size**2 * 3 / 2**20, "runs": rows}
    previous.write_text(json.dumps(result, indent=2))  # keep throughput even if the ARI part fails
    if not args.skip_ari:
        result["simulator_ari"] = simulator_ari()
        print(result["simulator_ari"], flush=True)
    lines = [
        "# Morphology embedding throughput",
        "",
        f"Image: {args.size} x {args.size} RGB tiled JPEG TIFF on disk "
        f"({result['image_decoded_mb']:.0f} MB decoded), read region by region.",
        "",
        "| encoder | device | tiles | tile px (µm/px) | tiles/s (end to end) | RSS after imports (MB) "
        "| peak RSS (MB) | tracemalloc peak (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {r['device']} | {r['n_tiles']} ({r['n_valid']} valid) | "
            f"{r['tile_px']} ({r['target_mpp']}) | {r['tiles_per_s']:.1f} | {r['rss_before_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{r['tracemalloc_peak_mb']:.0f} |"
        )
    if "simulator_ari" in result:
        a = result["simulator_ari"]
        lines += [
            "",
            f"Simulator ({a['n_spots']} spots, {a['n_domains']} domains, 4 sections with images): "
            f"k-means on the standardised stain-texture embedding vs domain, ARI "
            f"{a['ari_pooled_mean']:.3f} ± {a['ari_pooled_sd']:.3f} (3 seeds, pooled); per section "
            + ", ".join(f"{k}: {v:.3f}" for k, v in a["ari_per_section"].items()),
        ]
    (RESULTS / "morphology_throughput.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "morphology_throughput.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
