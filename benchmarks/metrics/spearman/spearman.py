"""Spearman rank correlation, e.g. for the linear datamodeling score (a local `evaluate` module)."""

from __future__ import annotations

import evaluate
import numpy as np

from benchmarks._common import average_ranks, metric_info, score_features

_DESCRIPTION = """The Pearson correlation of the average ranks (ties share their mean rank) of predictions and
references. For LDS: predictions = a method's predicted outputs on subset-trained models, references = the
measured outputs. NaN when either side is constant."""

_KWARGS = """
Args:
    predictions: predicted values.
    references: measured values, one per prediction.
Returns:
    spearman: the rank correlation.
Example:
    >>> spearman = evaluate.load("benchmarks/metrics/spearman")
    >>> spearman.compute(predictions=[1, 2, 3, 4], references=[10, 20, 40, 30])
    {'spearman': 0.8}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Spearman(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS, score_features("float64"))

    def _compute(self, predictions, references) -> dict:
        a = average_ranks(np.asarray(predictions, np.float64))
        b = average_ranks(np.asarray(references, np.float64))
        if len(a) < 2 or a.std() == 0 or b.std() == 0:
            return {"spearman": float("nan")}
        return {"spearman": float(np.corrcoef(a, b)[0, 1])}
