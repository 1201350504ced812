"""Scaling of HistoVI against scVI: time per epoch, the loader's share of it, memory, inference.

For each size (default 10k, 100k and 1M spots) a simulated study is generated once and cached
as an h5ad under ``--cache`` (default ``benchmarks/results/scaling/data``): 2,000 genes, a 64-d
morphology embedding, 40 sections at every size (sections of 256, 2,500 and 25,281 spots for
10k / 100k / 1M, so that the number of batches, which widens every layer of both models, does
not change with the size). It is built section group by section group, ten calls of
:func:`histovi.datasets.simulate` (4 patients x 1 section each, seeds 0-9, so the 40 sections
come from 40 simulated patients), counts sparse and only once (``X``; the simulator's copy in
``layers['counts']`` is dropped), and concatenated on disk (:func:`anndata.experimental.
concat_on_disk`), so that a million spots (7.0 GiB on disk) were simulated in 5.5 minutes on one
CPU thread with a peak of 8.5 GiB, not the whole study in memory twice over.

Each (method, size) then runs in its own subprocess, so that its peak RSS is its own:

* HistoVI with its defaults (``histovi.pp.spatial_neighbors(k=6)``, ``HistoVI(adata)``,
  ``model.train(...)``: morphology view, niche decoder, spatial prior fitted when training ends);
* scVI (``scvi.model.SCVI(adata, n_latent=16)``, its defaults otherwise) on the same counts.

Both train with their defaults (90 % of the spots, ``batch_size=128``, no validation) for one
warm-up epoch and ``--epochs`` timed epochs. Reported per run:

* ``s/epoch``: wall time of a timed epoch (mean), from a Lightning callback;
* ``loader %``: the share of the epoch spent outside the training step, i.e. between one
  ``on_train_batch_end`` and the next ``on_train_batch_start`` (fetching the next minibatch,
  collating, moving it to the device, Lightning's own overhead); ``fetch s`` is the part of it
  spent inside the datasets' ``__getitem__`` and ``niche s`` the part gathering the
  neighbours' counts (HistoVI);
* ``step s``: time inside the training step (forward, backward, optimizer);
* peak RSS (``ru_maxrss``) and the RSS after each phase (read, setup, training, latent);
* the in-memory size of the AnnData (``X`` + ``layers`` + ``obsm``) and ``peak / data``;
* the time of ``get_latent_representation()`` (HistoVI: the spatial posterior, its default),
  and HistoVI's time to fit the spatial prior when training ends;
* HistoVI / scVI ratios per size, and 1M / 100k (or largest / second largest) per method.

``--limit-batches N`` trains on N minibatches per epoch only (Lightning's
``limit_train_batches``); the time per epoch is then *extrapolated* to the full epoch from the
time per batch, and marked so in the table (``~``). Use it for 1M on a CPU, where a full epoch
takes far longer than the loader and memory measurements need.

GPU: ``--accelerator gpu`` (default ``auto``: the GPU when one is present) measures the same on
a GPU; the counts stay in host memory and each minibatch is moved to the device, so the loader
share is what a GPU run has to hide (``--num-workers`` loads minibatches in background
processes). Peak RSS is host memory; the GPU's peak memory is added as ``gpu_peak_gib``. Nothing
here needs a GPU; the CPU numbers are what a laptop or CPU node gives.

    python benchmarks/scaling.py --sizes 10000 100000 --epochs 1 --threads 1
    python benchmarks/scaling.py --sizes 1000000 --epochs 1 --limit-batches 300 --threads 1
    python benchmarks/scaling.py --sizes 100000 --methods histovi --profile   # pyinstrument
    python benchmarks/scaling.py --step   # one training step and one NB likelihood, no data

``--step`` times what one minibatch costs without any data set or loader: a training step
(forward, backward, Adam) of scVI's module and of HistoVI's on synthetic counts of
``--batch-size`` spots x ``--genes`` genes at several shares of non-zero counts, and the
negative-binomial log-likelihood of scvi-tools against HistoVI's (the sparse path below 35 %
non-zero), value and gradients. Results: ``step.json`` and ``step.md`` in ``--out``.

Results: ``scaling.json`` (every run, appended as runs finish) and ``scaling.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

N_SECTIONS = 40
N_CHUNKS = 10  # simulate() calls: N_SECTIONS / N_CHUNKS patients (one section each) per call
N_NEIGHBORS = 6
METHODS = ("scvi", "histovi")
LABEL = {"scvi": "scVI", "histovi": "HistoVI"}


# ----------------------------------------------------------------------------- data
def study_path(cache: Path, n_spots: int, n_genes: int, morph_dim: int) -> Path:
    return Path(cache) / f"study_{n_spots}_g{n_genes}_m{morph_dim}.h5ad"


def make_study(path: Path, n_spots: int, n_genes: int = 2000, morph_dim: int = 64) -> dict:
    """Simulate the study of ``n_spots`` spots into ``path`` (h5ad), chunk by chunk."""
    import anndata as ad
    import numpy as np
    from anndata.experimental import concat_on_disk

    import histovi

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}_chunks"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    per_chunk = n_spots // N_CHUNKS
    sizes = [per_chunk + (1 if c < n_spots % N_CHUNKS else 0) for c in range(N_CHUNKS)]
    per_section = math.ceil(max(sizes) / (N_SECTIONS // N_CHUNKS))
    side = max(8, math.ceil(math.sqrt(per_section)))
    t0 = time.perf_counter()
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
        )
        chunk = chunk[:size]  # the last section of the chunk loses a few spots
        out = ad.AnnData(
            X=chunk.X,  # the counts, once (the simulator also copies them into a layer)
            obs=chunk.obs.astype(str),
            var=chunk.var[[]],
            obsm={k: np.asarray(chunk.obsm[k]) for k in ("spatial", "X_morphology")},
        )
        for col in ("sample", "patient"):
            out.obs[col] = f"C{c}_" + out.obs[col]
        out.obs_names = f"C{c}_" + out.obs_names
        files.append(tmp / f"chunk{c}.h5ad")
        out.write_h5ad(files[-1])
        del chunk, out
        print(f"  simulated chunk {c + 1}/{N_CHUNKS} ({size:,} spots)", flush=True)
    concat_on_disk([str(f) for f in files], str(path), axis=0)
    shutil.rmtree(tmp, ignore_errors=True)
    info = {
        "n_spots": n_spots,
        "n_genes": n_genes,
        "morphology_dim": morph_dim,
        "n_sections": N_SECTIONS,
        "section_grid": [side, side],
        "simulate_sec": time.perf_counter() - t0,
        "simulate_peak_rss_gib": _peak_rss_gib(),
        "file_gib": path.stat().st_size / 2**30,
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info


def anndata_bytes(adata) -> dict:
    """In-memory size of X, layers and obsm (sparse: data + indices + indptr)."""
    import numpy as np
    import scipy.sparse as sp

    def size(a) -> int:
        if sp.issparse(a):
            return int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes)
        if hasattr(a, "group"):  # backed sparse dataset: what it would take in memory
            g = a.group
            return int(sum(g[k].size * g[k].dtype.itemsize for k in ("data", "indices", "indptr")))
        if hasattr(a, "to_numpy"):
            return int(a.to_numpy().nbytes)
        return int(np.asarray(a).nbytes) if not hasattr(a, "nbytes") else int(a.nbytes)

    parts = {"X": size(adata.X) if adata.X is not None else 0}
    # anndata >= 0.12 lists X as layers[None]: counted once
    parts["layers"] = sum(size(adata.layers[k]) for k in adata.layers if k is not None)
    parts["obsm"] = sum(size(adata.obsm[k]) for k in adata.obsm)
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------- one run
def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class _Clock:
    """Accumulated seconds spent in wrapped functions, by name."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.peak_rise: dict[str, float] = {}
        self._wrapped: list = []

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._wrapped):
            setattr(owner, attr, fn)
        self._wrapped.clear()

    def wrap(self, owner, attr: str, name: str):
        import functools

        fn = getattr(owner, attr)
        self._wrapped.append((owner, attr, fn))
        clock = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            peak0 = _peak_rss_gib()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.total[name] = clock.total.get(name, 0.0) + time.perf_counter() - t0
                # how far the call raised the peak RSS (0 if it stayed under an earlier peak)
                rise = _peak_rss_gib() - peak0
                clock.peak_rise[name] = max(clock.peak_rise.get(name, 0.0), rise)

        setattr(owner, attr, timed)


def _make_timer(clock: _Clock):
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Per epoch: wall time, time inside the training step, time between steps (the
        loader), and the clock's fetch / niche time."""

        def __init__(self):
            self.epochs: list[dict] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self._t0 = self._last = time.perf_counter()
            self._step = self._gap = 0.0
            self._n = 0
            self._clock0 = dict(clock.total)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            self._gap += now - self._last
            self._tb = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            self._step += now - self._tb
            self._last = now
            self._n += 1

        def on_train_epoch_end(self, trainer, pl_module):
            now = time.perf_counter()
            row = {
                "sec": now - self._t0,
                "step_sec": self._step,
                "loader_sec": self._gap,
                "n_batches": self._n,
            }
            for k, v in clock.total.items():
                row[f"{k}_sec"] = v - self._clock0.get(k, 0.0)
            self.epochs.append(row)

    return StepTimer()


def run_one(
    method: str,
    path: Path,
    epochs: int = 1,
    accelerator: str = "auto",
    devices="auto",
    threads: int = 1,
    limit_batches: int | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    backed: bool = False,
    profile: Path | None = None,
) -> dict:
    """Train ``method`` on the study in ``path`` and measure; returns one result row."""
    import scvi
    import torch

    from histovi.data import _loader, _spatial

    torch.set_num_threads(threads)
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = num_workers
    clock = _Clock()
    clock.wrap(scvi.data.AnnTorchDataset, "__getitem__", "fetch")
    clock.wrap(_loader.NeighborhoodDataset, "niche_counts", "niche")
    clock.wrap(_spatial, "fit_spatial_prior", "spatial_prior_fit")
    try:
        return _measure(
            method, path, clock, epochs, accelerator, devices, limit_batches, batch_size,
            backed, profile,
        )  # fmt: skip
    finally:
        clock.restore()


def _measure(
    method, path, clock, epochs, accelerator, devices, limit_batches, batch_size, backed, profile
) -> dict:
    import anndata as ad
    import numpy as np
    import scvi
    import torch

    import histovi

    rss = {"start": _rss_gib()}
    loadavg_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r" if backed else None)
    read_sec = time.perf_counter() - t0
    rss["read"] = _rss_gib()
    row = {"method": method, "n_spots": int(adata.n_obs), "n_genes": int(adata.n_vars)}
    neighbors_sec = None
    t0 = time.perf_counter()
    if method == "histovi":
        t1 = time.perf_counter()
        histovi.pp.spatial_neighbors(adata, sample_key="sample", n_neighbors=N_NEIGHBORS)
        neighbors_sec = time.perf_counter() - t1
        histovi.HistoVI.setup_anndata(
            adata,
            batch_key="sample",
            morphology_key="X_morphology",
            neighbors_key="spatial_neighbors",
        )
        model = histovi.HistoVI(adata)
    elif method == "scvi":
        scvi.model.SCVI.setup_anndata(adata, batch_key="sample")
        model = scvi.model.SCVI(adata, n_latent=16)
    else:
        raise ValueError(f"unknown method {method!r}")
    setup_sec = time.perf_counter() - t0
    rss["setup"] = _rss_gib()
    data = anndata_bytes(adata)

    timer = _make_timer(clock)
    trainer_kwargs = {}
    if limit_batches:
        trainer_kwargs["limit_train_batches"] = int(limit_batches)
    if profile is not None:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
        profiler.start()
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs + 1,
        accelerator=accelerator,
        devices=devices,
        batch_size=batch_size,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[timer],
        **trainer_kwargs,
    )
    train_sec = time.perf_counter() - t0
    if profile is not None:
        profiler.stop()
        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        Path(profile).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        profiler.write_html(str(Path(profile).with_suffix(".html")))
    rss["train"] = _rss_gib()
    peak_train = _peak_rss_gib()
    gpu_peak = None
    if torch.cuda.is_available():
        gpu_peak = torch.cuda.max_memory_allocated() / 2**30

    t0 = time.perf_counter()
    peak0 = _peak_rss_gib()
    latent = model.get_latent_representation()
    latent_sec = time.perf_counter() - t0
    rss["latent"] = _rss_gib()
    latent_peak_rise = _peak_rss_gib() - peak0

    timed = timer.epochs[1:] or timer.epochs
    mean = {k: float(np.mean([e[k] for e in timed])) for k in timed[0]}
    n_train = int(len(model.train_indices)) if model.train_indices is not None else adata.n_obs
    full_batches = math.ceil(n_train / batch_size)
    extrapolated = bool(limit_batches) and mean["n_batches"] < full_batches
    scale = full_batches / mean["n_batches"] if extrapolated else 1.0
    row.update(
        {
            "n_sections": int(adata.obs["sample"].nunique()),
            "device": str(model.device),
            "loadavg_start": loadavg_start,
            "torch_threads": torch.get_num_threads(),
            "batch_size": batch_size,
            "backed": backed,
            "epochs_timed": len(timed),
            "batches_per_epoch": full_batches,
            "batches_timed": int(mean["n_batches"]),
            "extrapolated": extrapolated,
            "sec_per_epoch": mean["sec"] * scale,
            "step_sec": mean["step_sec"] * scale,
            "loader_sec": mean["loader_sec"] * scale,
            "fetch_sec": mean.get("fetch_sec", 0.0) * scale,
            "niche_sec": mean.get("niche_sec", 0.0) * scale,
            "loader_share": mean["loader_sec"] / mean["sec"],
            "ms_per_batch": 1e3 * mean["sec"] / mean["n_batches"],
            "read_sec": read_sec,
            "neighbors_sec": neighbors_sec,
            "setup_sec": setup_sec,
            "train_sec": train_sec,
            "spatial_prior_fit_sec": clock.total.get("spatial_prior_fit"),
            "latent_sec": latent_sec,
            "latent_shape": list(np.shape(latent)),
            "data_gib": data["total"] / 2**30,
            "data_parts_gib": {k: v / 2**30 for k, v in data.items()},
            "rss_gib": rss,
            "peak_rss_train_gib": peak_train,
            "peak_rss_gib": _peak_rss_gib(),
            "peak_rise_gib": {**clock.peak_rise, "get_latent_representation": latent_peak_rise},
            "gpu_peak_gib": gpu_peak,
            "loadavg_end": os.getloadavg()[0],
            "epochs": timer.epochs,
        }
    )
    row["peak_over_data"] = row["peak_rss_gib"] / row["data_gib"]
    return row


# ----------------------------------------------------------------------------- report
def _fmt(x, spec=".2f", missing="–"):
    return missing if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """Markdown tables: one row per run, then the ratios."""
    lines = [
        "| spots | method | s/epoch | loader % | step s | fetch s | niche s | "
        "latent s | prior fit s | peak RSS GiB | data GiB | peak / data |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["n_spots"], METHODS.index(r["method"]))):
        ep = ("~" if r["extrapolated"] else "") + _fmt(r["sec_per_epoch"], ".1f")
        lines.append(
            f"| {r['n_spots']:,} | {LABEL[r['method']]} | {ep} | "
            f"{100 * r['loader_share']:.0f} | {_fmt(r['step_sec'], '.1f')} | "
            f"{_fmt(r['fetch_sec'], '.1f')} | {_fmt(r['niche_sec'] or None, '.1f')} | "
            f"{_fmt(r['latent_sec'], '.1f')} | {_fmt(r['spatial_prior_fit_sec'], '.1f')} | "
            f"{r['peak_rss_gib']:.2f} | {r['data_gib']:.2f} | {r['peak_over_data']:.2f} |"
        )
    by = {(r["method"], r["n_spots"]): r for r in rows}
    sizes = sorted({r["n_spots"] for r in rows})
    ratio_lines = [
        "",
        "| spots | HistoVI / scVI time per epoch | peak RSS | latent time |",
        "|---|---|---|---|",
    ]
    any_ratio = False
    for n in sizes:
        s, h = by.get(("scvi", n)), by.get(("histovi", n))
        if s and h:
            any_ratio = True
            ratio_lines.append(
                f"| {n:,} | {h['sec_per_epoch'] / s['sec_per_epoch']:.2f} | "
                f"{h['peak_rss_gib'] / s['peak_rss_gib']:.2f} | "
                f"{h['latent_sec'] / s['latent_sec']:.2f} |"
            )
    if any_ratio:
        lines += ratio_lines
    if len(sizes) >= 2:
        big, small = sizes[-1], sizes[-2]
        growth = [
            "",
            f"| method | {big:,} / {small:,} time per epoch | peak RSS |",
            "|---|---|---|",
        ]
        for m in METHODS:
            a, b = by.get((m, big)), by.get((m, small))
            if a and b:
                growth.append(
                    f"| {LABEL[m]} | {a['sec_per_epoch'] / b['sec_per_epoch']:.2f} | "
                    f"{a['peak_rss_gib'] / b['peak_rss_gib']:.2f} |"
                )
        if len(growth) > 3:
            lines += growth
    if any(r["extrapolated"] for r in rows):
        lines.append("")
        lines.append(
            "~: extrapolated from the timed minibatches (--limit-batches) to the full epoch."
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one step
def _ms_per_call(fn, repeats: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def _train_step(module, opt, tensors):
    _, _, out = module(tensors, loss_kwargs={"kl_weight": 0.5})
    opt.zero_grad()
    out.loss.backward()
    opt.step()


def _scvi_nb(x, mu, theta):
    from scvi.distributions import NegativeBinomial

    return NegativeBinomial(mu=mu, theta=theta).log_prob(x).sum(-1)


def _nb_pass(likelihood, x, mu, log_theta):
    likelihood(x, mu, log_theta.exp()).sum().backward()


def time_steps(batch_size: int, n_genes: int, morph_dim: int, densities=(0.1, 0.45, 0.9)):
    """ms per training step of scVI's and HistoVI's modules, and per NB likelihood (value and
    gradients), on synthetic minibatches at each share of non-zero counts."""
    import torch
    from scvi import REGISTRY_KEYS
    from scvi.module import VAE

    from histovi.module._module import NICHE_KEY, HistoVAE, nb_log_likelihood, view_registry_key

    gen = torch.Generator().manual_seed(0)
    n_batch = N_SECTIONS
    rows = []
    for density in densities:
        rate = torch.full((batch_size, n_genes), -math.log1p(-density))
        x = torch.poisson(rate, generator=gen)
        # the niche: k neighbours' counts summed (denser than one spot's)
        niche = sum(torch.poisson(rate, generator=gen) for _ in range(N_NEIGHBORS))
        tensors = {
            REGISTRY_KEYS.X_KEY: x,
            REGISTRY_KEYS.BATCH_KEY: torch.randint(0, n_batch, (batch_size, 1), generator=gen),
            REGISTRY_KEYS.LABELS_KEY: torch.zeros(batch_size, 1),
            NICHE_KEY: niche,
            view_registry_key("morphology"): torch.randn(batch_size, morph_dim, generator=gen),
        }
        modules = {
            "scvi": VAE(n_genes, n_batch=n_batch, n_latent=16),
            "histovi": HistoVAE(
                n_genes,
                n_batch,
                view_dims={"morphology": morph_dim},
                normalize_input=True,
                view_gating=True,
                spatial_prior=True,
            ),
        }
        row = {"density": round(float((x > 0).float().mean()), 3)}
        for name, module in modules.items():
            module.train()
            opt = torch.optim.Adam(module.parameters(), 1e-3)
            row[f"{name}_step_ms"] = _ms_per_call(partial(_train_step, module, opt, tensors))
        mu = (torch.rand(batch_size, n_genes, generator=gen) * 3 + 0.05).requires_grad_()
        log_theta = torch.randn(n_genes, generator=gen).requires_grad_()
        for name, likelihood in (("scvi", _scvi_nb), ("histovi", nb_log_likelihood)):
            row[f"{name}_nb_ms"] = _ms_per_call(partial(_nb_pass, likelihood, x, mu, log_theta))
        row["step_ratio"] = row["histovi_step_ms"] / row["scvi_step_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def step_table(rows) -> str:
    lines = [
        "| non-zero share | scVI step ms | HistoVI step ms | HistoVI / scVI | NB scvi-tools ms "
        "| NB HistoVI ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['density']:.2f} | {r['scvi_step_ms']:.1f} | {r['histovi_step_ms']:.1f} "
            f"| {r['step_ratio']:.2f} | {r['scvi_nb_ms']:.1f} | {r['histovi_nb_ms']:.1f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--morphology-dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs, after one warm-up")
    parser.add_argument(
        "--limit-batches",
        type=int,
        default=None,
        help="minibatches per epoch (Lightning limit_train_batches); the time per epoch is "
        "then extrapolated to the full epoch",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default)")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--backed", action="store_true", help="read the counts backed ('r')")
    parser.add_argument("--profile", action="store_true", help="pyinstrument report per run")
    parser.add_argument(
        "--step", action="store_true", help="time one training step and one NB likelihood only"
    )
    parser.add_argument("--out", default="benchmarks/results/scaling")
    parser.add_argument("--cache", default=None, help="study cache (default OUT/data)")
    parser.add_argument("--_make", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "data"
    devices = int(args.devices) if args.devices.isdigit() else args.devices

    if args.step:
        import torch

        torch.set_num_threads(args.threads)
        out.mkdir(parents=True, exist_ok=True)
        rows = time_steps(args.batch_size, args.genes, args.morphology_dim)
        (out / "step.json").write_text(json.dumps(rows, indent=1))
        table = step_table(rows)
        (out / "step.md").write_text(table + "\n")
        print(table)
        return
    if args._make:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        path = study_path(cache, args._make, args.genes, args.morphology_dim)
        print(json.dumps(make_study(path, args._make, args.genes, args.morphology_dim)))
        return
    if args._child:
        method, n = args._child[0], int(args._child[1])
        profile = None
        if args.profile:
            profile = out / f"profile_{method}_{n}{'_backed' if args.backed else ''}.txt"
        row = run_one(
            method,
            study_path(cache, n, args.genes, args.morphology_dim),
            epochs=args.epochs,
            accelerator=args.accelerator,
            devices=devices,
            threads=args.threads,
            limit_batches=args.limit_batches,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            backed=args.backed,
            profile=profile,
        )
        print("RESULT " + json.dumps(row))
        return

    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    common = ["--genes", str(args.genes), "--morphology-dim", str(args.morphology_dim)]
    common += ["--out", str(out), "--cache", str(cache), "--threads", str(args.threads)]
    results = out / "scaling.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    for n in args.sizes:
        path = study_path(cache, n, args.genes, args.morphology_dim)
        if not path.exists():
            print(f"simulating {n:,} spots into {path}", flush=True)
            subprocess.run(
                [sys.executable, __file__, "--_make", str(n), *common], env=env, check=True
            )
        for method in args.methods:
            cmd = [sys.executable, __file__, "--_child", method, str(n), *common]
            cmd += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
            cmd += ["--accelerator", args.accelerator, "--devices", str(args.devices)]
            cmd += ["--num-workers", str(args.num_workers)]
            if args.limit_batches:
                cmd += ["--limit-batches", str(args.limit_batches)]
            if args.backed:
                cmd.append("--backed")
            if args.profile:
                cmd.append("--profile")
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if res.returncode != 0 or not line:
                print(f"{method} n={n:,} failed:\n{res.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(line[-1][len("RESULT ") :])
            row["wall_sec"] = time.perf_counter() - t0
            row["command"] = " ".join(["python", "benchmarks/scaling.py", *(argv or sys.argv[1:])])
            key = (row["method"], row["n_spots"], row["backed"], row["device"])
            rows = [r for r in rows if (r["method"], r["n_spots"], r["backed"], r["device"]) != key]
            rows.append(row)
            results.write_text(json.dumps(rows, indent=2))
            print(
                f"done {method} n={n:,}: {row['sec_per_epoch']:.1f} s/epoch"
                f"{' (extrapolated)' if row['extrapolated'] else ''}, "
                f"peak {row['peak_rss_gib']:.2f} GiB, run {row['wall_sec']:.0f} s",
                flush=True,
            )
    shown = [r for r in rows if r["n_spots"] in args.sizes and r["backed"] == args.backed]
    text = table(shown)
    (out / "scaling.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
