"""Recall at k: the share of each query's relevant documents found in its top k (a local `evaluate` module)."""

from __future__ import annotations

import evaluate
import numpy as np

from benchmarks._common import RANKING_FEATURES, metric_info

_DESCRIPTION = """Mean over queries of |relevant among the top k| / |relevant|. Queries without relevant
documents are left out. Ids are compared as strings."""

_KWARGS = """
Args:
    predictions: one ranked list of document ids per query, best first.
    references: the relevant document ids of each query.
    k: the cut-off (default 10).
Returns:
    recall@k: the mean recall at k.
Example:
    >>> recall = evaluate.load("benchmarks/metrics/recall_at_k")
    >>> recall.compute(predictions=[["a", "x", "b"]], references=[["a", "b"]], k=2)
    {'recall@2': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RecallAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS, RANKING_FEATURES)

    def _compute(self, predictions, references, k: int = 10) -> dict:
        if k < 1:
            raise ValueError("k must be at least 1.")
        recalls = []
        for ranking, relevant in zip(predictions, references, strict=True):
            wanted = set(map(str, relevant))
            if wanted:
                recalls.append(len(wanted & {str(d) for d in ranking[:k]}) / len(wanted))
        return {f"recall@{k}": float(np.mean(recalls)) if recalls else float("nan")}
