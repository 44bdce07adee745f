"""True-positive rate at a fixed false-positive rate (a local `evaluate` module, loads offline)."""

from __future__ import annotations

import evaluate
import numpy as np

from benchmarks._common import metric_info, score_features

_DESCRIPTION = """The highest true-positive rate among the ROC operating points (thresholds "score >= t")
whose false-positive rate is at most ``fpr``. Examples with equal scores are never separated. NaN when one
class is absent."""

_KWARGS = """
Args:
    predictions: a score per example (higher = more likely positive).
    references: the label per example (1 positive, 0 negative).
    fpr: the largest false-positive rate allowed (default 0.01).
Returns:
    tpr@fpr=<fpr>: the true-positive rate.
Example:
    >>> tpr = evaluate.load("benchmarks/metrics/tpr_at_fpr")
    >>> tpr.compute(predictions=[0.9, 0.8, 0.7, 0.1], references=[1, 0, 1, 0], fpr=0.0)
    {'tpr@fpr=0.0': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class TprAtFpr(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS, score_features("int32"))

    def _compute(self, predictions, references, fpr: float = 0.01) -> dict:
        if not 0.0 <= fpr <= 1.0:
            raise ValueError("fpr must be between 0 and 1.")
        key = f"tpr@fpr={fpr}"
        scores, labels = np.asarray(predictions, np.float64), np.asarray(references) == 1
        n_pos, n_neg = int(labels.sum()), int((~labels).sum())
        if n_pos == 0 or n_neg == 0:
            return {key: float("nan")}
        order = np.argsort(-scores, kind="mergesort")
        s, y = scores[order], labels[order]
        last = np.r_[s[1:] != s[:-1], True]  # operating points: after the last example of each distinct score
        tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
        ok = fp / n_neg <= fpr + 1e-12
        return {key: float(tp[ok].max() / n_pos) if ok.any() else 0.0}
