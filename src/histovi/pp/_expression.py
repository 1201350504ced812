"""Expression embeddings from transcriptomics foundation models, stored as extra obsm views.

:func:`embed_expression` turns each spot's counts into a fixed-length vector and writes it to
``adata.obsm[key_added]``, so that :meth:`histovi.HistoVI.setup_anndata` can take it as an extra
view through ``embedding_keys``. Three routes:

- ``"geneformer"``: rank-value encoding of the spot (Theodoris et al. 2023) fed to a BERT model
  through :mod:`transformers`. The ``geneformer`` package is not on PyPI, so the tokenisation is
  implemented here from its published description and reference code; the weights and the
  token / median dictionaries are Geneformer's own files.
- ``"scgpt"``: cannot run next to histovi (its wheel pins ``scvi-tools<1.0`` and imports
  ``torchtext``, whose binary only loads with torch 2.3). Run scGPT in its own environment and store the result
  in ``obsm``; ``model="scgpt"`` raises an :class:`ImportError` that explains this route.
- ``"pca"``: log1p-normalised PCA of the counts, an offline baseline view.

Every call records what produced the view in ``adata.uns["histovi"]["embeddings"][key_added]``
(model name, source, weights sha256, genes mapped, ...), so a model trained on the view can
refuse a query embedded by a different model.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from .._files import record_uns
from .._threads import keeps_torch_threads
from .._validation import check_adata, check_counts, check_whole_number, get_counts
from ._encoders import sha256_file, sha256_state_dict

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["embed_expression"]

#: Hub repository of the published Geneformer weights and dictionaries.
GENEFORMER_HUB_ID = "ctheodoris/Geneformer"
#: Geneformer normalises every spot to this many counts before dividing by the gene medians.
_GENEFORMER_TARGET_SUM = 10_000
#: Warn when fewer than this fraction of the genes in ``adata`` are in the model's vocabulary.
_WARN_MAPPED_FRACTION = 0.5
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}")
_SUPPORTED = ("geneformer", "scgpt", "pca")

_SCGPT_ROUTE = (
    "scGPT cannot run next to histovi: the scgpt wheel on PyPI (0.2.4) requires "
    "scvi-tools<1.0 (histovi needs >=1.5.1) and imports torchtext, whose last release (0.18) "
    "is compiled against torch 2.3 and fails to load with newer torch. Use the precomputed-embedding route instead: in a separate environment "
    "run `scgpt.tasks.embed_data(adata, model_dir, gene_col=...)`, copy its "
    "obsm['X_scGPT'] into your AnnData (same obs order), e.g. adata.obsm['X_scgpt'] = "
    "emb_adata.obsm['X_scGPT'], and pass embedding_keys={'scgpt': 'X_scgpt'} to "
    "HistoVI.setup_anndata. See docs/embeddings.md."
)


@keeps_torch_threads
def embed_expression(
    adata: AnnData,
    model: str | Any,
    model_path: str | Path | None = None,
    *,
    layer: str | None = None,
    gene_id_key: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    key_added: str | None = None,
    max_length: int | None = None,
    seed: int = 0,
    pooling: str = "mean",
    hidden_layer: int = -1,
    n_comps: int = 50,
    n_top_genes: int | None = 2000,
    dictionary_files: Mapping[str, str | Path] | None = None,
    show_progress: bool = True,
) -> None:
    """Embed each spot's expression with a transcriptomics foundation model (or PCA).

    Writes ``adata.obsm[key_added]`` (float32, one row per spot) and records the model's
    identity in ``adata.uns["histovi"]["embeddings"][key_added]``. Nothing else in ``adata`` is
    changed.

    Parameters
    ----------
    adata
        Spots x genes. ``adata.X`` (or ``adata.layers[layer]``) must hold raw counts.
    model
        ``"geneformer"``, ``"scgpt"`` (raises :class:`ImportError` with the precomputed route),
        ``"pca"``, or an already loaded :class:`transformers.BertModel` /
        :class:`transformers.BertForMaskedLM` with Geneformer's architecture (then
        ``model_path`` or ``dictionary_files`` must locate its dictionaries).
    model_path
        For ``"geneformer"``: a local folder with ``config.json``, the weights
        (``model.safetensors`` or ``pytorch_model.bin``) and the dictionaries
        (``token_dictionary*.pkl|json``, ``gene_median_dictionary*.pkl|json``, optionally
        ``gene_name_id_dict*.pkl|json`` to map gene symbols to Ensembl ids), searched in the
        folder, its parents and their ``geneformer/`` subfolders. Or a hub id
        (``"owner/repo"`` or ``"owner/repo/subfolder"``), downloaded with
        :func:`huggingface_hub.snapshot_download`. Defaults to ``"ctheodoris/Geneformer"``.
    layer
        Layer with the counts; ``None`` uses ``adata.X``.
    gene_id_key
        ``adata.var`` column with Ensembl ids or gene symbols; ``None`` uses ``adata.var_names``.
        Which of the two it holds is detected from the values.
    batch_size
        Spots per forward pass.
    device
        ``"auto"`` (CUDA, then MPS, then CPU), or any :class:`torch.device` string.
    key_added
        ``obsm`` key to write. Defaults to ``"X_geneformer"`` / ``"X_expression_pca"``.
    max_length
        Most tokens per spot, special tokens included; defaults to the model's
        ``max_position_embeddings`` (2048 for Geneformer V1, 4096 for V2). The highest-ranked
        genes are kept.
    seed
        Seeds torch and the PCA solver so that repeated calls give identical embeddings.
    pooling
        ``"mean"`` (mean of the gene tokens' hidden states, special tokens and padding
        excluded, as Geneformer's ``EmbExtractor(emb_mode="cell")``) or ``"cls"`` (the
        ``<cls>`` token, only for dictionaries that have one).
    hidden_layer
        Index into the model's hidden states: ``-1`` the last layer, ``-2`` the second to last
        (Geneformer's recommendation for general-purpose cell embeddings).
    n_comps
        Number of principal components for ``model="pca"``.
    n_top_genes
        For ``model="pca"``: highly variable genes (seurat dispersion) kept before the PCA;
        ``None`` uses all genes.
    dictionary_files
        Explicit dictionary paths overriding the search, keys ``"token"``, ``"median"`` and
        optionally ``"gene_name"``.
    show_progress
        Show a tqdm progress bar over batches.

    Raises
    ------
    ValueError
        Unknown model name, non-count input, no gene mapping to the vocabulary, bad arguments.
    KeyError
        ``layer`` or ``gene_id_key`` not in ``adata``.
    ImportError
        ``model="scgpt"``, or ``transformers`` missing for Geneformer.

    Examples
    --------
    >>> histovi.pp.embed_expression(adata, "pca")  # offline baseline view
    >>> histovi.pp.embed_expression(adata, "geneformer", model_path="~/models/Geneformer-V2-104M")
    >>> histovi.HistoVI.setup_anndata(adata, embedding_keys={"geneformer": "X_geneformer"})
    """
    _validate_common(adata, batch_size=batch_size, max_length=max_length, seed=seed)
    if isinstance(model, str):
        name = model.lower()
        if name not in _SUPPORTED:
            raise ValueError(
                f"model={model!r} is not supported: pass one of {list(_SUPPORTED)} or a loaded "
                "transformers BertModel with Geneformer's architecture."
            )
        if name == "scgpt":
            _raise_scgpt()
        if name == "pca":
            _embed_pca(
                adata,
                layer=layer,
                n_comps=n_comps,
                n_top_genes=n_top_genes,
                seed=seed,
                key_added=key_added or "X_expression_pca",
            )
            return
        loaded = None
    else:
        loaded = model
    _embed_geneformer(
        adata,
        loaded_model=loaded,
        model_path=model_path,
        layer=layer,
        gene_id_key=gene_id_key,
        batch_size=batch_size,
        device=device,
        key_added=key_added or "X_geneformer",
        max_length=max_length,
        seed=seed,
        pooling=pooling,
        hidden_layer=hidden_layer,
        dictionary_files=dictionary_files,
        show_progress=show_progress,
    )


# --------------------------------------------------------------------------------------------
# input checks shared by every route
# --------------------------------------------------------------------------------------------


def _validate_common(adata: AnnData, *, batch_size: int, max_length: int | None, seed: int) -> None:
    check_adata(adata)
    if adata.n_vars == 0:
        raise ValueError(f"adata has no genes ({adata.n_obs} spots x 0 genes): nothing to embed.")
    check_whole_number(batch_size, "batch_size", what="spots per forward pass")
    check_whole_number(max_length, "max_length", minimum=3, allow_none=True)
    check_whole_number(seed, "seed", minimum=None)


def _get_counts(adata: AnnData, layer: str | None) -> sp.csr_matrix:
    """The counts as float64 CSR, after checking every value is a finite non-negative integer."""
    check_counts(adata, layer, n_check=None)
    X = get_counts(adata, layer)
    return (
        sp.csr_matrix(X, dtype=np.float64) if not sp.issparse(X) else X.tocsr().astype(np.float64)
    )


def _record(adata: AnnData, key_added: str, emb: np.ndarray, info: dict[str, Any]) -> None:
    adata.obsm[key_added] = np.ascontiguousarray(emb, dtype=np.float32)
    record_uns(adata, "embeddings", info, key=key_added)


# --------------------------------------------------------------------------------------------
# scGPT
# --------------------------------------------------------------------------------------------


def _raise_scgpt() -> None:
    try:
        import scgpt  # noqa: F401
    except Exception as err:  # scgpt fails at import time with many errors, not only ImportError
        raise ImportError(
            "model='scgpt': the scgpt package is not importable. " + _SCGPT_ROUTE
        ) from err
    # Even where scgpt imports (installed with --no-deps), its pinned dependencies are not met,
    # and no adapter is tested against it here: refuse rather than guess.
    raise ImportError("model='scgpt' is not run in-process by histovi. " + _SCGPT_ROUTE)


# --------------------------------------------------------------------------------------------
# PCA baseline
# --------------------------------------------------------------------------------------------


def _embed_pca(
    adata: AnnData,
    *,
    layer: str | None,
    n_comps: int,
    n_top_genes: int | None,
    seed: int,
    key_added: str,
) -> None:
    import anndata as ad
    import scanpy as sc

    check_whole_number(n_comps, "n_comps", what="principal components")
    check_whole_number(
        n_top_genes, "n_top_genes", minimum=2, allow_none=True, what="None: all genes"
    )
    X = _get_counts(adata, layer)
    n_counts = np.asarray(X.sum(axis=1)).ravel()
    empty = n_counts <= 0
    # Work on a private AnnData so the user's X, layers and uns stay untouched.
    work = ad.AnnData(X=X[~empty].copy())
    n_genes = work.n_vars
    max_comps = min(work.n_obs, n_genes if n_top_genes is None else min(n_genes, n_top_genes)) - 1
    if max_comps < 1:
        raise ValueError(
            f"PCA needs at least 2 spots with counts and 2 genes, adata has "
            f"{work.n_obs} x {n_genes}."
        )
    n_comps_used = min(int(n_comps), max_comps)
    if n_comps_used < n_comps:
        warnings.warn(
            f"n_comps={n_comps} reduced to {n_comps_used} (fewer spots or genes than requested).",
            UserWarning,
            stacklevel=3,
        )
    sc.pp.normalize_total(work, target_sum=_GENEFORMER_TARGET_SUM)
    sc.pp.log1p(work)
    if n_top_genes is not None and n_genes > n_top_genes:
        # PCA on all ~10-30k genes of a real panel is slow and noisier; the usual recipe
        # (seurat dispersion on log data, no extra dependency) keeps the informative ones.
        sc.pp.highly_variable_genes(work, n_top_genes=int(n_top_genes), flavor="seurat")
        work = work[:, work.var["highly_variable"].to_numpy()].copy()
    # arpack with a fixed random_state gives the same components on every call.
    sc.pp.pca(work, n_comps=n_comps_used, svd_solver="arpack", random_state=seed)
    emb = np.full((adata.n_obs, n_comps_used), np.nan, dtype=np.float32)
    emb[~empty] = work.obsm["X_pca"]
    if empty.any():
        warnings.warn(
            f"{int(empty.sum())} of {adata.n_obs} spots have no counts; their rows in "
            f"adata.obsm[{key_added!r}] are NaN (no expression view for them).",
            UserWarning,
            stacklevel=3,
        )
    components = np.ascontiguousarray(work.varm["PCs"], dtype=np.float32)
    info = {
        "model": "pca",
        "source": "log1p(normalize_total(counts, 1e4)) -> HVG -> PCA fitted on this AnnData",
        "weights_sha256": hashlib.sha256(components.tobytes()).hexdigest(),
        "weights_sha256_of": "pca_components",
        # The components are fitted on this data: a query needs its own PCA or a joint one.
        "transferable": False,
        "n_genes_mapped": int(work.n_vars),
        "n_genes_total": int(adata.n_vars),
        "n_comps": int(n_comps_used),
        "layer": layer,
        "n_spots_empty": int(empty.sum()),
        "seed": int(seed),
        "dim": int(n_comps_used),
    }
    _record(adata, key_added, emb, info)


# --------------------------------------------------------------------------------------------
# Geneformer
# --------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> Any:
    from ._encoders import resolve_device  # one device rule for all encoders

    return resolve_device(device)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "model='geneformer' needs the transformers package: pip install 'histovi[fm]' "
            "(or pip install transformers)."
        ) from err
    return transformers


class _DictUnpickler(pickle.Unpickler):
    """Reads Geneformer's dictionary pickles (gene id -> token / median / Ensembl id) and
    nothing else: the only globals it resolves are numpy's scalar and dtype constructors (the
    medians are numpy floats), so a crafted file cannot name a function to run."""

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # the bytes of numpy scalars in protocol-2 pickles
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _load_dict(path: Path) -> dict:
    """A Geneformer dictionary (``.json``, or the ``.pkl`` files Geneformer ships), read
    without running anything named in the file; a clear error for anything but a dict of
    strings and numbers."""
    from .._files import open_regular

    try:
        with open_regular(path, "dictionary file") as f:
            if path.suffix == ".json":
                out = json.loads(f.read().decode())
            else:
                out = _DictUnpickler(f).load()
    except (pickle.UnpicklingError, json.JSONDecodeError, UnicodeDecodeError, EOFError) as err:
        raise ValueError(
            f"{str(path)!r} is not a Geneformer dictionary ({type(err).__name__}: "
            f"{str(err)[:200]}): histovi reads dictionaries of gene ids to tokens, medians or "
            "ids only (a pickle naming any other object is refused); pass the model's own "
            "token_dictionary / gene_median_dictionary files."
        ) from None
    if not isinstance(out, dict) or not all(
        isinstance(k, str)
        and isinstance(v, str | int | float | np.integer | np.floating)
        and not isinstance(v, bool)
        for k, v in out.items()
    ):
        raise ValueError(
            f"{str(path)!r} is not a Geneformer dictionary (expected gene id -> token, median or "
            "id): pass the model's own dictionary files."
        )
    return out


_DICT_PATTERNS = {
    "token": "token_dictionary*",
    "median": "gene_median_dictionary*",
    "gene_name": "gene_name_id_dict*",
}


def _dictionary_candidates(root: Path, pattern: str) -> list[Path]:
    """Dictionary files matching ``pattern`` in ``root``, its parents and their geneformer/ dirs.

    The published hub repository keeps the weights in per-version subfolders and the
    dictionaries in ``geneformer/`` (V1 ones in ``geneformer/gene_dictionaries_30m/``), so the
    search walks up from the weights folder.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for base in [root, *list(root.parents)[:2]]:
        for d in (base, base / "geneformer", base / "geneformer" / "gene_dictionaries_30m"):
            if not d.is_dir():
                continue
            for p in sorted(d.glob(pattern)):
                if p.suffix in (".pkl", ".json") and p.resolve() not in seen:
                    seen.add(p.resolve())
                    found.append(p)
    return found


def _find_dictionaries(
    root: Path | None, vocab_size: int, explicit: Mapping[str, str | Path] | None
) -> dict[str, Path | None]:
    explicit = dict(explicit or {})
    unknown = set(explicit) - set(_DICT_PATTERNS)
    if unknown:
        raise ValueError(
            f"dictionary_files has unknown keys {sorted(unknown)}: use 'token', 'median', 'gene_name'."
        )
    out: dict[str, Path | None] = {}
    for key in _DICT_PATTERNS:
        if key in explicit:
            p = Path(explicit[key]).expanduser()
            if not p.is_file():
                raise ValueError(f"dictionary_files[{key!r}] = {str(p)!r} is not a file.")
            out[key] = p
    if root is None and not {"token", "median"} <= set(out):
        raise ValueError(
            "Cannot find Geneformer's token and median dictionaries for a loaded model: pass "
            "model_path=<folder holding token_dictionary*.pkl and gene_median_dictionary*.pkl> "
            "or dictionary_files={'token': ..., 'median': ...}."
        )
    if "token" not in out:
        cands = _dictionary_candidates(root, _DICT_PATTERNS["token"])
        # Several versions of the dictionaries sit side by side in the hub repository: the one
        # whose size equals the model's vocabulary is the one the model was trained with.
        matching = [p for p in cands if len(_load_dict(p)) == vocab_size]
        if not matching:
            raise ValueError(
                f"No token_dictionary*.pkl|json with {vocab_size} entries (the model's "
                f"vocab_size) found in {str(root)!r} or its parents (candidates: "
                f"{[str(c) for c in cands]}): put the model's token dictionary next to its "
                "config.json or pass dictionary_files={'token': ...}."
            )
        out["token"] = matching[0]
    suffix = out["token"].stem.removeprefix("token_dictionary")
    search_root = root if root is not None else out["token"].parent
    for key in ("median", "gene_name"):
        if key in out:
            continue
        cands = _dictionary_candidates(search_root, _DICT_PATTERNS[key])
        if not cands:
            cands = _dictionary_candidates(out["token"].parent, _DICT_PATTERNS[key])
        # Prefer the file with the same version suffix as the token dictionary (e.g. _gc104M).
        same = [p for p in cands if p.stem.endswith(suffix) and p.parent == out["token"].parent]
        same = same or [p for p in cands if p.parent == out["token"].parent] or cands
        out[key] = same[0] if same else None
    if out["median"] is None:
        raise ValueError(
            f"No gene_median_dictionary*.pkl|json found near {str(out['token'])!r}: put the "
            "model's median dictionary next to its token dictionary or pass "
            "dictionary_files={'median': ...}."
        )
    return out


def _hub_snapshot(hub_id: str) -> Path:
    """Download a Geneformer model (and its dictionaries) from the Hugging Face hub."""
    from huggingface_hub import snapshot_download

    parts = hub_id.strip("/").split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = ["geneformer/*.pkl", "geneformer/gene_dictionaries_30m/*.pkl"]
    patterns += [f"{sub}/*"] if sub else ["*.json", "*.safetensors", "*.bin"]
    try:
        local = Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as err:
        raise ValueError(
            f"Could not download {hub_id!r} from the Hugging Face hub ({err}). Offline? "
            "Download the model folder elsewhere and pass model_path=<local folder>."
        ) from err
    return local / sub if sub else local


def _load_geneformer(model_path: str | Path | None) -> tuple[Any, Path, str]:
    """Load a BertModel from a local folder or a hub id; return (model, folder, source)."""
    transformers = _import_transformers()
    source = str(model_path) if model_path is not None else GENEFORMER_HUB_ID
    local = Path(source).expanduser()
    if not local.exists():
        if model_path is not None and (
            Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") < 1
        ):
            raise ValueError(
                f"model_path={source!r} does not exist: pass a folder with config.json, the "
                "weights and the dictionaries, or a hub id such as 'ctheodoris/Geneformer'."
            )
        local = _hub_snapshot(source)
    if not (local / "config.json").is_file():
        raise ValueError(
            f"{str(local)!r} has no config.json: point model_path at the folder holding the "
            "Geneformer weights (e.g. .../Geneformer-V2-104M)."
        )
    from .._files import check_regular_file

    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        if (local / name).exists():  # a FIFO there would block transformers' reader
            check_regular_file(local / name, "Geneformer file")
    # BertModel.from_pretrained also reads BertForMaskedLM / classifier checkpoints (it strips
    # the 'bert.' prefix and ignores the heads), which is how Geneformer models are saved.
    # The masked-LM head is unused here; silence transformers' report of its unexpected keys.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = transformers.BertModel.from_pretrained(str(local), add_pooling_layer=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, local, source


def _weights_file_hash(folder: Path | None) -> str | None:
    """sha256 of the weights file, comparable with the hub's published LFS hash."""
    if folder is not None:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                return sha256_file(folder / name)
    return None


def _detect_id_type(ids: np.ndarray) -> str:
    stripped = [str(i) for i in ids[: min(len(ids), 2000)]]
    n_ens = sum(bool(_ENSEMBL_RE.match(s)) for s in stripped)
    return "ensembl" if n_ens >= 0.5 * len(stripped) else "symbol"


def _map_genes(
    adata: AnnData,
    gene_id_key: str | None,
    token_dict: dict,
    median_dict: dict,
    name_id_dict: dict | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Map adata's genes to vocabulary tokens.

    Returns the var positions that map, the token of each, the median of each, and the detected
    id type. Several var rows mapping to one token are all kept; their counts are summed later.
    """
    if gene_id_key is None:
        ids = np.asarray(adata.var_names, dtype=str)
        where = "adata.var_names"
    else:
        if gene_id_key not in adata.var.columns:
            raise KeyError(
                f"gene_id_key={gene_id_key!r} not found in adata.var (columns: "
                f"{list(adata.var.columns)}): name the column with Ensembl ids or gene symbols, "
                "or pass gene_id_key=None to use adata.var_names."
            )
        ids = np.asarray(adata.var[gene_id_key].astype(str), dtype=str)
        where = f"adata.var[{gene_id_key!r}]"
    id_type = _detect_id_type(ids)
    if id_type == "ensembl":
        # Drop version suffixes (ENSG00000141510.17 -> ENSG00000141510): vocabularies are unversioned.
        ensembl = np.array([s.split(".", 1)[0] for s in ids])
    else:
        if name_id_dict is None:
            raise ValueError(
                f"{where} holds gene symbols (e.g. {ids[:3].tolist()}), but no "
                "gene_name_id_dict*.pkl (symbol -> Ensembl id) was found with the model: pass "
                "gene_id_key=<var column with Ensembl ids>, or add the model's "
                "gene_name_id_dict via dictionary_files={'gene_name': ...}."
            )
        ensembl = np.array([str(name_id_dict.get(s, "")) for s in ids])
    pos = np.array(
        [i for i, e in enumerate(ensembl) if e in token_dict and e in median_dict], dtype=np.int64
    )
    n_mapped = len(pos)
    if n_mapped == 0:
        raise ValueError(
            f"None of the {len(ids)} genes in {where} (e.g. {ids[:3].tolist()}, read as "
            f"{id_type}) is in the model's vocabulary: pass gene_id_key=<var column with Ensembl "
            "ids or symbols of the model's species>."
        )
    n_tokens = len({ensembl[i] for i in pos})
    if n_tokens < _WARN_MAPPED_FRACTION * len(ids):
        warnings.warn(
            f"Only {n_tokens} of {len(ids)} genes in {where} ({100 * n_tokens / len(ids):.0f}%, "
            f"read as {id_type}) map to the model's vocabulary; the embedding ignores the rest. "
            "Check gene_id_key and the species.",
            UserWarning,
            stacklevel=4,
        )
    tokens = np.array([token_dict[ensembl[i]] for i in pos], dtype=np.int64)
    medians = np.array([median_dict[ensembl[i]] for i in pos], dtype=np.float64)
    if not np.all(np.isfinite(medians)) or np.any(medians <= 0):
        raise ValueError(
            "The median dictionary holds non-positive or non-finite medians for some mapped "
            "genes: it does not match Geneformer's format (gene -> nonzero median)."
        )
    return pos, tokens, medians, id_type


def _rank_value_encode(
    X: sp.csr_matrix,
    n_counts: np.ndarray,
    medians: np.ndarray,
    tokens: np.ndarray,
    max_genes: int,
) -> list[np.ndarray]:
    """Geneformer's rank value encoding of each row of ``X`` (vocabulary genes only).

    Each spot is scaled to 10,000 counts (over all its genes), each gene divided by its median
    over the pretraining corpus, and the detected genes sorted by that value, highest first.
    Ties keep column order (stable sort), so the encoding is deterministic.
    """
    out: list[np.ndarray] = []
    for i in range(X.shape[0]):
        start, end = X.indptr[i], X.indptr[i + 1]
        cols, vals = X.indices[start:end], X.data[start:end]
        keep = vals > 0
        cols, vals = cols[keep], vals[keep]
        if n_counts[i] <= 0 or cols.size == 0:
            out.append(np.empty(0, dtype=np.int64))
            continue
        scaled = vals / n_counts[i] * _GENEFORMER_TARGET_SUM / medians[cols]
        order = np.argsort(-scaled, kind="stable")
        out.append(tokens[cols[order[:max_genes]]])
    return out


def _embed_geneformer(
    adata: AnnData,
    *,
    loaded_model: Any | None,
    model_path: str | Path | None,
    layer: str | None,
    gene_id_key: str | None,
    batch_size: int,
    device: str,
    key_added: str,
    max_length: int | None,
    seed: int,
    pooling: str,
    hidden_layer: int,
    dictionary_files: Mapping[str, str | Path] | None,
    show_progress: bool,
) -> None:
    import torch

    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling={pooling!r} must be 'mean' or 'cls'.")
    # Validate the cheap inputs before loading weights.
    X = _get_counts(adata, layer)
    bert, folder, dict_root, source = _geneformer_model(loaded_model, model_path)
    config = bert.config
    dicts = _find_dictionaries(dict_root, int(config.vocab_size), dictionary_files)
    token_dict = _load_dict(dicts["token"])
    median_dict = _load_dict(dicts["median"])
    name_id_dict = _load_dict(dicts["gene_name"]) if dicts.get("gene_name") is not None else None
    tokens = _Tokens(token_dict, config, pooling, max_length, hidden_layer)

    pos, gene_tokens, medians, id_type = _map_genes(
        adata, gene_id_key, token_dict, median_dict, name_id_dict
    )
    # Geneformer scales by the spot's total counts over all genes, not only vocabulary genes.
    n_counts = np.asarray(X.sum(axis=1)).ravel()
    # Sum counts of var rows that map to the same token (duplicated symbols), as the reference
    # tokenizer's collapse_gene_ids does, so each token appears at most once per spot.
    uniq_tokens, inverse = np.unique(gene_tokens, return_inverse=True)
    collapse = sp.csr_matrix(
        (np.ones(len(pos)), (np.arange(len(pos)), inverse)), shape=(len(pos), len(uniq_tokens))
    )
    X_vocab = (X[:, pos] @ collapse).tocsr()
    X_vocab.sort_indices()
    uniq_medians = np.zeros(len(uniq_tokens))
    uniq_medians[inverse] = medians  # same gene -> same median

    dev = _resolve_device(device)
    torch.manual_seed(seed)
    # A loaded model is the user's object: restore its mode and device afterwards.
    was_training = bert.training
    orig_device = next(bert.parameters()).device
    bert.eval()
    bert.to(dev)
    emb = np.full((adata.n_obs, int(config.hidden_size)), np.nan, dtype=np.float32)
    n_empty = 0
    starts = range(0, adata.n_obs, batch_size)
    iterator = tqdm(starts, desc="geneformer", unit="batch", disable=not show_progress)
    try:
        with torch.inference_mode():
            for start in iterator:
                stop = min(start + batch_size, adata.n_obs)
                seqs = _rank_value_encode(
                    X_vocab[start:stop],
                    n_counts[start:stop],
                    uniq_medians,
                    uniq_tokens,
                    tokens.max_length - tokens.n_special,
                )
                rows = [i for i, s in enumerate(seqs) if s.size > 0]
                n_empty += len(seqs) - len(rows)
                if rows:  # spots without any vocabulary gene keep NaN: no expression view
                    pooled = tokens.embed(bert, [seqs[i] for i in rows], dev)
                    emb[np.arange(start, stop)[rows]] = pooled
    finally:
        bert.train(was_training)
        bert.to(orig_device)

    if n_empty:
        warnings.warn(
            f"{n_empty} of {adata.n_obs} spots have no counts in vocabulary genes; their rows in "
            f"adata.obsm[{key_added!r}] are NaN (no expression view for them).",
            UserWarning,
            stacklevel=3,
        )
    info = {
        "model": "geneformer",
        "source": source,
        "architecture": type(bert).__name__,
        # The state-dict hash is the same whether the weights came from a folder, the hub or a
        # loaded object, so a query embedded by the same weights always matches its reference.
        "weights_sha256": sha256_state_dict(bert),
        "weights_sha256_of": "state_dict",
        "weights_file_sha256": _weights_file_hash(folder),
        "token_dictionary": dicts["token"].name,
        "token_dictionary_sha256": sha256_file(dicts["token"]),
        "vocab_size": int(config.vocab_size),
        "transferable": True,
        "n_genes_mapped": int(len(uniq_tokens)),
        "n_genes_total": int(adata.n_vars),
        "gene_id_type": id_type,
        "gene_id_key": gene_id_key,
        "layer": layer,
        "max_length": int(tokens.max_length),
        "pooling": pooling,
        "hidden_layer": int(hidden_layer),
        "n_spots_empty": int(n_empty),
        "seed": int(seed),
        "dim": int(config.hidden_size),
    }
    _record(adata, key_added, emb, info)


def _geneformer_model(loaded_model: Any | None, model_path) -> tuple[Any, Any, Any, str]:
    """The BERT encoder, the folder of its weights file (None for a loaded model), the folder
    where its dictionaries are looked for, and where it came from."""
    if loaded_model is None:
        bert, folder, source = _load_geneformer(model_path)
        return bert, folder, folder, source
    transformers = _import_transformers()
    if not isinstance(loaded_model, transformers.PreTrainedModel) or not hasattr(
        loaded_model.config, "max_position_embeddings"
    ):
        raise ValueError(
            f"model of type {type(loaded_model).__name__} is not supported: pass "
            f"{list(_SUPPORTED)} or a transformers BERT model with Geneformer's architecture."
        )
    # A BertForMaskedLM (or classifier) wraps the encoder we need as .bert.
    bert = getattr(loaded_model, "bert", loaded_model)
    name_or_path = getattr(loaded_model.config, "_name_or_path", "") or ""
    if model_path is not None:
        dict_root = Path(model_path).expanduser()
    elif name_or_path and Path(name_or_path).is_dir():
        dict_root = Path(name_or_path)
    else:
        dict_root = None
    return bert, None, dict_root, str(model_path or name_or_path or "loaded object")


class _Tokens:
    """Geneformer's special tokens and sequence limits for one model and token dictionary, and
    the pooled hidden states of a batch of rank-value encoded spots."""

    def __init__(self, token_dict: dict, config: Any, pooling: str, max_length, hidden_layer):
        self.cls_id = token_dict.get("<cls>")
        # Geneformer V2 closes each sequence with <eos>; one intermediate release used <sep>.
        self.end_id = (
            token_dict.get("<eos>", token_dict.get("<sep>")) if self.cls_id is not None else None
        )
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        self.pad_id = token_dict.get("<pad>", pad)
        if pooling == "cls" and self.cls_id is None:
            raise ValueError(
                "pooling='cls' needs a <cls> token, but the token dictionary has none (Geneformer "
                "V1): use pooling='mean'."
            )
        self.n_special = int(self.cls_id is not None) + int(self.end_id is not None)
        model_max = int(config.max_position_embeddings)
        if max_length is None:
            max_length = model_max
        elif max_length > model_max:
            raise ValueError(
                f"max_length={max_length} exceeds the model's max_position_embeddings={model_max}: "
                f"pass max_length<={model_max}."
            )
        n_hidden = int(config.num_hidden_layers) + 1
        if not -n_hidden <= hidden_layer < n_hidden:
            raise ValueError(
                f"hidden_layer={hidden_layer} out of range for a model with {n_hidden} hidden "
                f"states (embeddings + {n_hidden - 1} layers): use -1 (last) or -2 (second to last)."
            )
        self.max_length, self.pooling, self.hidden_layer = max_length, pooling, hidden_layer

    def embed(self, bert: Any, seqs: list[np.ndarray], dev: Any) -> np.ndarray:
        """Pooled hidden states of the spots' token sequences (special tokens added)."""
        import torch

        if self.cls_id is not None:
            end = [self.end_id] if self.end_id is not None else []
            seqs = [np.concatenate([[self.cls_id], s, end]) for s in seqs]
        lengths = np.array([len(s) for s in seqs])
        ids = np.full((len(seqs), lengths.max()), self.pad_id, dtype=np.int64)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = s
        ids_t = torch.from_numpy(ids).to(dev)
        mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
        mask = mask.to(dev, dtype=torch.long)
        out = bert(input_ids=ids_t, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[self.hidden_layer].float()
        if self.pooling == "cls":
            return hidden[:, 0].cpu().numpy()
        # Average over gene tokens only: skip <cls>, <eos> and padding.
        gene_mask = mask.clone()
        if self.cls_id is not None:
            gene_mask[:, 0] = 0
        if self.end_id is not None:
            last = torch.from_numpy(lengths - 1).to(dev)
            gene_mask[torch.arange(len(seqs), device=dev), last] = 0
        w = gene_mask.to(hidden.dtype).unsqueeze(-1)
        return ((hidden * w).sum(1) / w.sum(1)).cpu().numpy()
