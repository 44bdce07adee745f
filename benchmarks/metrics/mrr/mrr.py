"""Mean reciprocal rank of the first relevant document (a local `evaluate` module, loads offline)."""

from __future__ import annotations

import evaluate
import numpy as np

from benchmarks._common import RANKING_FEATURES, metric_info

_DESCRIPTION = """Mean over queries of 1 / (rank of the first relevant document in the ranking); a query whose
ranking holds no relevant document contributes 0. Ids are compared as strings."""

_KWARGS = """
Args:
    predictions: one ranked list of document ids per query, best first.
    references: the relevant document ids of each query.
Returns:
    mrr: the mean reciprocal rank.
Example:
    >>> mrr = evaluate.load("benchmarks/metrics/mrr")
    >>> mrr.compute(predictions=[["a", "b"], ["b", "a"]], references=[["a"], ["a"]])
    {'mrr': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Mrr(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS, RANKING_FEATURES)

    def _compute(self, predictions, references) -> dict:
        reciprocal = []
        for ranking, relevant in zip(predictions, references, strict=True):
            wanted = set(map(str, relevant))
            rank = next((i for i, d in enumerate(ranking, 1) if str(d) in wanted), None)
            reciprocal.append(0.0 if rank is None else 1.0 / rank)
        return {"mrr": float(np.mean(reciprocal)) if reciprocal else float("nan")}
