"""Metrics of an integrated embedding: per-section ARI/NMI under the shared evaluation
protocol, scib-metrics batch mixing and biology conservation, spatial coherence, a kNN label
probe per section and the composition of clusters."""

from ._clustering import cluster_and_score, n_label_classes, per_sample_scores, summarize
from ._evaluate import evaluate
from ._integration import INTEGRATION_METRICS, integration_scores
from ._probe import cluster_composition, label_probe
from ._spatial import spatial_coherence

__all__ = [
    "INTEGRATION_METRICS",
    "cluster_and_score",
    "cluster_composition",
    "evaluate",
    "integration_scores",
    "label_probe",
    "n_label_classes",
    "per_sample_scores",
    "spatial_coherence",
    "summarize",
]
