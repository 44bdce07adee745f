"""The benchmarks of hf_mirror, beside the package and not installed with it: attribution metrics as local
`evaluate` modules (they load offline) and the benchmark builders that ``recipes/benchmark_*.py`` run. They use
hf_mirror's public API only."""

from __future__ import annotations

from pathlib import Path

from hf_mirror.errors import InputError

METRICS = ("mrr", "recall_at_k", "average_precision", "precision_at_k", "auroc", "tpr_at_fpr", "spearman",
           "tail_patch")

__all__ = ["METRICS", "load_metric", "metric_path"]


def metric_path(name: str) -> Path:
    """The directory of a bundled metric module (pass it to ``evaluate.load``)."""
    if name not in METRICS:
        raise InputError(f"Unknown metric {name!r}; bundled metrics: {list(METRICS)}.")
    return Path(__file__).parent / "metrics" / name


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a bundled metric (one of :data:`METRICS`): no Hub access needed."""
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)
