"""Mean average precision over every relevant document (a local `evaluate` module, loads offline)."""

from __future__ import annotations

import evaluate
import numpy as np

from benchmarks._common import RANKING_FEATURES, metric_info

_DESCRIPTION = """Mean over queries of the average precision: the precision at the rank of each relevant
document, averaged over all the query's relevant documents (one missing from the ranking counts 0). Unlike MRR and
recall@k it does not saturate once the first answer is first and every answer is in the top k: it still sees the
order of the answers among the other documents. Queries without relevant documents are left out. Ids are compared
as strings."""

_KWARGS = """
Args:
    predictions: one ranked list of document ids per query, best first.
    references: the relevant document ids of each query.
Returns:
    map: the mean average precision.
Example:
    >>> ap = evaluate.load("benchmarks/metrics/average_precision")
    >>> ap.compute(predictions=[["a", "x", "b"]], references=[["a", "b"]])
    {'map': 0.8333333333333333}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class AveragePrecision(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS, RANKING_FEATURES)

    def _compute(self, predictions, references) -> dict:
        values = []
        for ranking, relevant in zip(predictions, references, strict=True):
            wanted = set(map(str, relevant))
            if not wanted:
                continue
            hits = np.cumsum([str(d) in wanted for d in ranking])
            found = np.flatnonzero(np.diff(np.concatenate([[0], hits])))  # 0-based ranks of the relevant ones
            values.append(float(np.sum(hits[found] / (found + 1)) / len(wanted)))
        return {"map": float(np.mean(values)) if values else float("nan")}
