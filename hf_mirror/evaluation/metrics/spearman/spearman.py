"""Spearman rank correlation, e.g. for the linear datamodeling score (a local `evaluate` module)."""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

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
    >>> spearman = evaluate.load("hf_mirror/evaluation/metrics/spearman")
    >>> spearman.compute(predictions=[1, 2, 3, 4], references=[10, 20, 40, 30])
    {'spearman': 0.8}
"""


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Spearman(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references) -> dict:
        a = _average_ranks(np.asarray(predictions, np.float64))
        b = _average_ranks(np.asarray(references, np.float64))
        if len(a) < 2 or a.std() == 0 or b.std() == 0:
            return {"spearman": float("nan")}
        return {"spearman": float(np.corrcoef(a, b)[0, 1])}
