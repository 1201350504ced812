"""How much of the pathologist's labels an embedding holds, section by section, unclustered.

The integration benchmark scores clusters of the pooled embedding. This asks the question under
it: could the labels be read from the embedding at all? For each labelled section, a k-nearest-
neighbour classifier (k = 15) is cross-validated (5 stratified folds) on that section's labelled
spots; the score is the balanced accuracy (1 / number of classes = chance). Classes with fewer
than 5 spots in a section are left out of that section.

A second score asks whether the same tissue of different patients lies in the same place: a
kNN classifier fitted on the other labelled sections predicts this section's labels (balanced
accuracy over the classes present in both).

Two references come from the counts alone, per section (no other section, so no batch effect):
16 principal components of the section's log-normalised counts, and the same with the mean of
each spot's spatial neighbours appended (what the tissue layout adds). The embeddings are those
an ``integration.py`` run saved (``<method>_seed<S>.npy`` in the ``work`` / ``embeddings``
folder of each data set of the run) or any
``.npy`` file (rows = the data's spots, in order)::

    python benchmarks/label_probe.py --data her2st \
        --runs benchmarks/results/ablation_norm/s0 --embeddings MoG=latent_MoG.npy

Writes ``<out>/label_probe.csv`` (one row per embedding, seed and section) and
``<out>/label_probe.md`` (mean over seeds per section).

It also says where the benchmark's own clusters go: each embedding (not the section-alone
references) is clustered as ``integration.py`` does (GMM, k = number of labels, all spots,
clustering seed = the embedding's seed), and every cluster is described by its size, the
patient (``obs['patient']``, else the section) most of its spots come from, with that share,
and the label most of its labelled spots carry, with that share; next to it, the embedding's ARI
as ``integration.py`` scores one seed. A cluster that is 95 % one patient's spots spends one of
the k clusters on that patient. Written to ``<out>/composition.csv`` and
``<out>/composition.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data  # noqa: E402

CACHE = Path(__file__).resolve().parent / "results" / "cache"
MIN_CLASS = 5
SECTION_ALONE = ("counts PCA, section alone", "counts PCA + neighbour mean, section alone")


def probe(X: np.ndarray, y: np.ndarray, seed: int = 0, k: int = 15) -> float:
    """5-fold balanced accuracy of a kNN classifier of ``y`` on ``X``, in the embedding's own
    geometry (not standardised: the clusterings of the benchmark are not either)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(k)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, X, y, cv=folds, scoring="balanced_accuracy").mean())


def transfer(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = 15):
    """Balanced accuracy on ``test`` of a kNN classifier fitted on ``train`` (other sections),
    over the test classes that the training spots have."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    test = test & np.isin(y, np.unique(y[train]))
    clf = KNeighborsClassifier(k).fit(X[train], y[train])
    return float(balanced_accuracy_score(y[test], clf.predict(X[test])))


def _labelled(labels: np.ndarray) -> np.ndarray:
    """Spots with a label the benchmark scores (not missing, not ignored)."""
    return pd.notna(labels) & ~pd.Series(labels).isin(_data.IGNORE_LABELS).to_numpy()


def scored_spots(adata) -> dict[str, np.ndarray]:
    """Per labelled section: boolean mask of the spots scored (ignored labels and classes with
    fewer than MIN_CLASS spots in the section left out)."""
    labels = adata.obs[_data.LABEL_KEY].astype(object)
    samples = adata.obs[_data.SAMPLE_KEY].astype(str).to_numpy()
    ok = _labelled(labels.to_numpy())
    out = {}
    for s in pd.unique(samples[ok]):
        mask = ok & (samples == s)
        counts = labels[mask].value_counts()
        keep = labels.isin(counts.index[counts >= MIN_CLASS]).to_numpy()
        if (counts >= MIN_CLASS).sum() >= 2:
            out[s] = mask & keep
    return out


def section_references(adata, n_comps: int = 16) -> dict[str, np.ndarray]:
    """Count-only references computed within each section (rows of other sections are NaN)."""
    import scanpy as sc

    refs = {
        SECTION_ALONE[0]: np.full((adata.n_obs, n_comps), np.nan),
        SECTION_ALONE[1]: np.full((adata.n_obs, 2 * n_comps), np.nan),
    }
    samples = adata.obs[_data.SAMPLE_KEY].astype(str).to_numpy()
    neighbors = adata.obsm["spatial_neighbors"]
    for s in scored_spots(adata):
        idx = np.flatnonzero(samples == s)
        sub = adata[idx].copy()
        sub.X = sub.layers["counts"].astype(np.float32)
        sc.pp.normalize_total(sub, target_sum=1e4)
        sc.pp.log1p(sub)
        sc.pp.pca(sub, n_comps=n_comps, random_state=0)
        pcs = np.full((adata.n_obs, n_comps), np.nan)
        pcs[idx] = sub.obsm["X_pca"]
        # neighbour row numbers are global and stay within the section
        nb_mean = pcs[neighbors[idx]].mean(1)
        refs[SECTION_ALONE[0]][idx] = pcs[idx]
        refs[SECTION_ALONE[1]][idx] = np.hstack([pcs[idx], nb_mean])
    return refs


def run_embeddings(runs: list[str], data: str) -> dict[tuple[str, int], np.ndarray]:
    """Embeddings an integration.py run saved, keyed by (method, seed)."""
    out = {}
    for run in runs:
        paths = sorted((Path(run) / data / "work" / "embeddings").glob("*_seed*.npy"))
        if not paths:
            raise SystemExit(
                f"--runs {run}: no saved embeddings of {data!r} there; pass the --out folder of "
                f"an integration.py run with --data {data}."
            )
        for path in paths:
            m = re.fullmatch(r"(.+)_seed(\d+)", path.stem)
            out[(m.group(1), int(m.group(2)))] = np.load(path)
    return out


def cluster_composition(
    X: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int, seed: int = 0
) -> pd.DataFrame:
    """One row per GMM cluster of the pooled embedding (the benchmark's clustering): size,
    commonest group and its share of the cluster, commonest label among the cluster's labelled
    spots and its share (NaN where the cluster has no labelled spot); largest cluster first."""
    from histovi.tl import cluster_embedding

    clusters = cluster_embedding(X, k, "gmm", random_state=seed)
    labelled = _labelled(labels)
    rows = []
    for c in np.unique(clusters):
        member = clusters == c
        group = pd.Series(groups[member]).value_counts(normalize=True)
        label = pd.Series(labels[member & labelled].astype(str)).value_counts(normalize=True)
        rows.append(
            {
                "cluster": int(c),
                "n_spots": int(member.sum()),
                "group": str(group.index[0]),
                "group_share": float(group.iloc[0]),
                "label": str(label.index[0]) if len(label) else "",
                "label_share": float(label.iloc[0]) if len(label) else np.nan,
            }
        )
    return pd.DataFrame(rows).sort_values("n_spots", ascending=False, ignore_index=True)


def _composition_markdown(table: pd.DataFrame, data: str, group_key: str) -> str:
    lines = [
        f"Where the clusters go on {data}: GMM on the pooled embedding, k = number of labels, "
        f"clusters largest first; each cell is `spots; commonest {group_key} (share); commonest "
        "label (share of the cluster's labelled spots)`. ARI: the benchmark's score of the embedding "
        "(GMM and k-means, clustering seed = the embedding's seed, mean over labelled "
        "sections).\n",
        "| embedding | seed | ARI | "
        + " | ".join(f"cluster {i + 1}" for i in range(table["rank"].max() + 1))
        + " |",
        "|---|---|---|" + "---|" * (table["rank"].max() + 1),
    ]
    for (name, seed), part in table.groupby(["embedding", "seed"], sort=False):
        cells = [
            f"{r.n_spots}; {r.group} ({r.group_share:.2f}); "
            + (f"{r.label} ({r.label_share:.2f})" if r.label else "no label")
            for r in part.sort_values("rank").itertuples()
        ]
        ari = part["ARI"].iloc[0]
        lines.append(f"| {name} | {seed} | {ari:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown(table: pd.DataFrame) -> str:
    head = ["embedding", *map(str, table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=list(_data.SCENARIOS), default="her2st")
    parser.add_argument("--runs", nargs="*", default=[], help="integration.py --out folders")
    parser.add_argument(
        "--embeddings", nargs="*", default=[], metavar="NAME=PATH", help="extra .npy embeddings"
    )
    parser.add_argument("--out", default="benchmarks/results/label_probe")
    args = parser.parse_args(argv)

    # Check the inputs before the (slow) data loading.
    embeddings = run_embeddings(args.runs, args.data)
    for item in args.embeddings:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).is_file():
            raise SystemExit(
                f"--embeddings {item!r}: pass NAME=PATH with PATH an existing .npy file."
            )
        embeddings[(name, 0)] = np.load(path)
    for (name, _), X in embeddings.items():
        if X.ndim != 2 or not np.isfinite(X).all():
            raise SystemExit(f"{name}: pass a 2-d embedding without NaN/inf (shape {X.shape}).")
    from histovi.metrics import cluster_and_score, n_label_classes

    adata = _data.load(args.data, cache_dir=CACHE)
    labels = adata.obs[_data.LABEL_KEY].astype(object).to_numpy()
    sections = scored_spots(adata)
    embeddings.update({(name, 0): X for name, X in section_references(adata).items()})

    rows = []
    for (name, seed), X in embeddings.items():
        if X.shape[0] != adata.n_obs:
            raise SystemExit(f"{name}: {X.shape[0]} rows, the data has {adata.n_obs} spots.")
        for s, mask in sections.items():
            others = np.zeros(adata.n_obs, dtype=bool)
            for other, other_mask in sections.items():
                if other != s:
                    others |= other_mask
            rows.append(
                {
                    "embedding": name,
                    "seed": seed,
                    "section": s,
                    "n_classes": len(pd.unique(labels[mask])),
                    "balanced_accuracy": probe(X[mask], labels[mask], seed),
                    # section-alone references have no coordinates shared between sections
                    # (and a single labelled section has nothing to transfer from)
                    "transfer": np.nan
                    if name in SECTION_ALONE or not others.any()
                    else transfer(X, labels, others, mask),
                }
            )
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "label_probe.csv", index=False)
    wide = table.pivot_table("balanced_accuracy", "embedding", "section", aggfunc="mean")
    wide["mean"] = wide.mean(1)
    wide.insert(0, "seeds", table.groupby("embedding")["seed"].nunique().astype(str))
    across = table.pivot_table(
        "transfer", "embedding", "section", aggfunc="mean", dropna=False
    ).reindex(wide.index)
    across = across.add_prefix("transfer ")
    across["transfer mean"] = across.mean(1)
    wide = wide.join(across)
    classes = table.groupby("section")["n_classes"].first()
    md = (
        f"Label probe on {args.data}: 5-fold balanced accuracy of a kNN classifier (k = 15) per "
        "section (chance = 1 / classes: "
        + ", ".join(f"{s} {1 / c:.2f}" for s, c in classes.items())
        + "); transfer: a kNN classifier fitted on the other labelled sections (other patients) "
        "predicts this section, balanced accuracy over the classes both have. The first says "
        "whether the embedding holds the labels within a section, the second whether the same "
        "tissue of different patients lies in the same place.\n\n"
        + _markdown(wide.sort_values("mean", ascending=False))
    )
    (out / "label_probe.md").write_text(md)
    print(md)

    group_key = "patient" if "patient" in adata.obs else "sample"
    groups = adata.obs[group_key].astype(str).to_numpy()
    k = n_label_classes(labels, _data.IGNORE_LABELS)  # the benchmark's k
    parts = []
    for (name, seed), X in embeddings.items():
        if name in SECTION_ALONE:
            continue
        part = cluster_composition(X, labels, groups, k, seed)
        # the benchmark's score of this embedding: GMM and k-means, clustering seed = its seed
        score = cluster_and_score(
            X, labels, adata.obs[_data.SAMPLE_KEY].to_numpy(), n_clusters=k, seeds=(seed,)
        )
        parts.append(
            part.assign(
                embedding=name,
                seed=seed,
                ARI=score["ARI"].mean(),
                NMI=score["NMI"].mean(),
                rank=np.arange(len(part)),
            )
        )
    composition = pd.concat(parts, ignore_index=True)
    composition.to_csv(out / "composition.csv", index=False)
    md = _composition_markdown(composition, args.data, group_key)
    (out / "composition.md").write_text(md)
    print(md)
    return table


if __name__ == "__main__":
    main()
