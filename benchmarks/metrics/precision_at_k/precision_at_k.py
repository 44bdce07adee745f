"""Precision at k: the share of each query's top k that is relevant (a local `evaluate` module)."""

from __future__ import annotations

import evaluate
import numpy as np

from benchmarks._common import RANKING_FEATURES, metric_info

_DESCRIPTION = """Mean over queries of |relevant among the top k| / k (a ranking shorter than k counts its
missing places as misses). Ids are compared as strings."""

_KWARGS = """
Args:
    predictions: one ranked list of document ids per query, best first.
    references: the relevant document ids of each query.
    k: the cut-off (default 10).
Returns:
    precision@k: the mean precision at k.
Example:
    >>> precision = evaluate.load("benchmarks/metrics/precision_at_k")
    >>> precision.compute(predictions=[["a", "x", "b"]], references=[["a", "b"]], k=2)
    {'precision@2': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class PrecisionAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS, RANKING_FEATURES)

    def _compute(self, predictions, references, k: int = 10) -> dict:
        if k < 1:
            raise ValueError("k must be at least 1.")
        values = []
        for ranking, relevant in zip(predictions, references, strict=True):
            wanted = set(map(str, relevant))
            values.append(len(wanted & {str(d) for d in ranking[:k]}) / k)
        return {f"precision@{k}": float(np.mean(values)) if values else float("nan")}
