"""Tests of histovi.pl: every figure is built on tiny synthetic data, with the expected axes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from histovi import pl  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _sections(n_samples: int = 3, side: int = 6, with_image: bool = False) -> ad.AnnData:
    rng = np.random.default_rng(0)
    coords = np.array([(x * 100.0 + 50, y * 100.0 + 50) for x in range(side) for y in range(side)])
    obs, spatial = [], []
    for s in range(n_samples):
        dom = (coords[:, 0] > 300).astype(int) + (coords[:, 1] > 300).astype(int)
        obs.append(pd.DataFrame({"sample": f"S{s}", "domain": dom.astype(str)}))
        spatial.append(coords)
    obs = pd.concat(obs, ignore_index=True)
    obs.index = [f"spot{i}" for i in range(len(obs))]
    obs["domain"] = pd.Categorical(obs["domain"])
    obs["score"] = rng.random(len(obs))
    adata = ad.AnnData(np.zeros((len(obs), 1), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = np.vstack(spatial)
    adata.obsm["X_histovi"] = rng.normal(size=(len(obs), 4)).astype(np.float32)
    if with_image:
        adata.uns["spatial"] = {
            "S0": {
                "images": {"hires": rng.random((60, 60, 3))},
                "scalefactors": {"tissue_hires_scalef": 0.1, "spot_diameter_fullres": 80.0},
            }
        }
    return adata


def test_domains_without_image(tmp_path):
    adata = _sections()
    fig = pl.domains(adata, ncols=2, save=tmp_path / "domains.png")
    assert len(fig.axes) == 3  # the unused 4th panel is removed
    assert [ax.get_title() for ax in fig.axes] == ["S0", "S1", "S2"]
    ax = fig.axes[0]
    assert ax.yaxis_inverted()  # image convention without an image
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["0", "1", "2"]
    assert (tmp_path / "domains.png").stat().st_size > 0


def test_domains_with_image_maps_coordinates():
    adata = _sections(n_samples=2, with_image=True)
    fig = pl.domains(adata, samples=["S0", "S1"])
    ax0, ax1 = fig.axes
    assert len(ax0.get_images()) == 1 and len(ax1.get_images()) == 0
    # spots mapped by tissue_hires_scalef onto the 60-px image
    offsets = ax0.collections[0].get_offsets()
    assert offsets[:, 0].max() == pytest.approx(55.0)
    assert len(pl.domains(adata, img=False).axes[0].get_images()) == 0


def test_domains_continuous_and_errors():
    adata = _sections(n_samples=2)
    fig = pl.domains(adata, color="score")
    assert len(fig.axes) == 3  # two panels and a colour bar
    with pytest.raises(KeyError, match=r"obs\['cluster'\].*histovi.tl.domains"):
        pl.domains(adata, color="cluster")
    with pytest.raises(ValueError, match=r"\['S9'\]"):
        pl.domains(adata, samples=["S9"])
    no_xy = adata.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(KeyError, match=r"obsm\['spatial'\]"):
        pl.domains(no_xy)


def test_latent_umap_leaves_adata_untouched_unless_key_added():
    adata = _sections(n_samples=2)
    fig = pl.latent_umap(adata, color=("sample", "domain"))
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["sample", "domain"]
    assert "X_umap" not in adata.obsm and "neighbors" not in adata.uns
    fig = pl.latent_umap(adata, color="domain", key_added="X_umap_histovi")
    assert len(fig.axes) == 1
    assert adata.obsm["X_umap_histovi"].shape == (adata.n_obs, 2)
    with pytest.raises(KeyError, match=r"obs\['patient'\]"):
        pl.latent_umap(adata, color="patient")


def _history() -> dict[str, pd.DataFrame]:
    epochs = pd.Index(np.arange(5), name="epoch")

    def frame(name: str, start: float) -> pd.DataFrame:
        return pd.DataFrame({name: start / (1 + epochs.to_numpy())}, index=epochs)

    return {
        "elbo_train": frame("elbo_train", 100),
        "elbo_validation": frame("elbo_validation", 110),
        "reconstruction_loss_train": frame("reconstruction_loss_train", 90),
        "reconstruction_loss_validation": frame("reconstruction_loss_validation", 95),
        "kl_local_train": frame("kl_local_train", 10),
        "train_loss_epoch": frame("train_loss_epoch", 100),
        "validation_loss": frame("validation_loss", 105),
        "train_loss_step": frame("train_loss_step", 100),
    }


def test_training_curves_one_panel_per_family():
    fig = pl.training_curves(_history())
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["elbo", "reconstruction_loss", "kl_local", "loss"]
    elbo = fig.axes[0]
    assert sorted(line.get_label() for line in elbo.get_lines()) == ["train", "validation"]
    assert len(fig.axes[2].get_lines()) == 1
    fig = pl.training_curves(_history(), keys=["elbo_train"])
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="model.history"):
        pl.training_curves({})
    with pytest.raises(KeyError, match="elbo_test"):
        pl.training_curves(_history(), keys=["elbo_test"])


def test_scores_from_protocol_table_and_summary():
    df = pd.DataFrame(
        {
            "method": ["pca"] * 4 + ["histovi"] * 4,
            "seed": [0, 0, 1, 1] * 2,
            "sample": ["A1", "B1"] * 4,
            "ARI": [0.2, 0.4, 0.4, 0.6, 0.5, 0.5, 0.7, 0.7],
        }
    )
    fig = pl.scores(df)
    assert len(fig.axes) == 1
    bars = fig.axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx([0.4, 0.6])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["pca", "histovi"]
    summary = pd.DataFrame({"method": ["a", "b"], "ARI_mean": [0.3, 0.5], "ARI_std": [0.1, 0.0]})
    assert [b.get_height() for b in pl.scores(summary).axes[0].patches] == pytest.approx([0.3, 0.5])
    df["clustering"] = ["gmm", "kmeans"] * 4
    fig = pl.scores(df, hue="clustering")
    assert len(fig.axes[0].patches) == 4
    with pytest.raises(KeyError, match="embedding"):
        pl.scores(df, x="embedding")


def test_match_colors_gives_each_domain_its_labels_colour():
    adata = _sections(n_samples=2)
    # domains named otherwise than the labels, one label split over two domains
    names = {"0": "c", "1": "a", "2": "b"}
    domains = adata.obs["domain"].astype(str).map(names).to_numpy(dtype=object)
    domains[:3] = "extra"
    adata.obs["cluster"] = pd.Categorical(domains)
    pairs = pl.match_colors(adata, "cluster", "domain")
    assert pairs == {"c": "0", "a": "1", "b": "2"}
    label = dict(zip(["0", "1", "2"], adata.uns["domain_colors"], strict=True))
    cluster = dict(
        zip(adata.obs["cluster"].cat.categories, adata.uns["cluster_colors"], strict=True)
    )
    assert all(cluster[c] == label[lab] for c, lab in pairs.items())
    assert cluster["extra"] not in label.values()  # unmatched: a colour no label has
    # the figures use them: the same colour for a domain and its label
    fig = pl.domains(adata, color="cluster", samples=["S1"])
    drawn = {
        t.get_text(): h.get_color()
        for t, h in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles, strict=True)
    }
    assert drawn["c"] == label["0"]


def test_training_curves_leave_out_constant_terms():
    history = _history()
    history["kl_global_train"] = pd.DataFrame(
        {"kl_global_train": np.zeros(5)}, index=pd.Index(np.arange(5), name="epoch")
    )
    fig = pl.training_curves(history)
    assert "kl_global" not in [ax.get_title() for ax in fig.axes]
    assert any("kl_global = 0" in t.get_text() for t in fig.texts)
    assert "kl_global" in [
        ax.get_title() for ax in pl.training_curves(history, drop_flat=False).axes
    ]


def test_warnings_inside_histovi_point_at_the_callers_line():
    """A decorator adds a frame: the warnings of decorated functions (stacklevel counted for
    the undecorated one) still name the line that called histovi, here this file."""
    import warnings

    from histovi._threads import keeps_torch_threads

    @keeps_torch_threads
    def inner():
        warnings.warn("from inside", UserWarning, stacklevel=2)

    @keeps_torch_threads
    def outer():
        inner()

    for call in (inner, outer):
        with pytest.warns(UserWarning, match="from inside") as caught:
            call()
        assert [w.filename for w in caught] == [__file__], call.__name__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):  # filters still apply where the warning is raised
            inner()
