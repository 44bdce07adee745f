"""Area under the ROC curve of scores against binary labels (a local `evaluate` module, loads offline)."""

from __future__ import annotations

import evaluate
import numpy as np

from benchmarks._common import average_ranks, metric_info, score_features

_DESCRIPTION = """The probability that a random positive scores above a random negative (ties count one half),
i.e. the Mann-Whitney U statistic divided by n_pos * n_neg. NaN when one class is absent."""

_KWARGS = """
Args:
    predictions: a score per example (higher = more likely positive).
    references: the label per example (1 positive, 0 negative).
Returns:
    auroc: the area under the ROC curve.
Example:
    >>> auroc = evaluate.load("benchmarks/metrics/auroc")
    >>> auroc.compute(predictions=[0.9, 0.2, 0.6, 0.4], references=[1, 0, 0, 1])
    {'auroc': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Auroc(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS, score_features("int32"))

    def _compute(self, predictions, references) -> dict:
        scores, labels = np.asarray(predictions, np.float64), np.asarray(references) == 1
        n_pos, n_neg = int(labels.sum()), int((~labels).sum())
        if n_pos == 0 or n_neg == 0:
            return {"auroc": float("nan")}
        rank_sum = average_ranks(scores)[labels].sum()
        return {"auroc": float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))}
