"""Tail-patch scores: a method's document scores against exact counterfactual effects (a local `evaluate` module)."""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from benchmarks._common import average_ranks, metric_info, top_k_share

_DESCRIPTION = """Per probe (one row of scores over every document and its true effects: the change of the probe's
completion log-probability after training on each document, benchmarks.tail_patch): the top-k share is the mean
true effect of the method's top k documents (score descending, ties broken by document order) over the mean of
the k largest true effects (1 = the best possible top k; NaN when that mean is not positive), and the Spearman
correlation of the scores with the effects over all documents (NaN when either side is constant). Both are
averaged over the probes where they are defined; the per-probe values come back too."""

_KWARGS = """
Args:
    predictions: one list of scores per probe, one score per document (higher = supports the probe).
    references: one list of true effects per probe, in the same document order.
    k: the cut-off (default 10).
Returns:
    top_k_share: the mean top-k share; spearman: the mean Spearman correlation;
    top_k_share_per_probe, spearman_per_probe: the values of each probe (NaN where undefined).
Example:
    >>> tail_patch = evaluate.load("benchmarks/metrics/tail_patch")
    >>> tail_patch.compute(predictions=[[0.1, 0.9, 0.9, 0.2, 0.0]], references=[[0.5, -0.2, 0.3, 0.0, 0.1]], k=2)
    {'top_k_share': 0.125, 'spearman': -0.359..., ...}
"""

FEATURES = datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                              "references": datasets.Sequence(datasets.Value("float64"))})


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = average_ranks(a), average_ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class TailPatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS, FEATURES)

    def _compute(self, predictions, references, k: int = 10) -> dict:
        shares, spearmans = [], []
        for scores, truth in zip(predictions, references, strict=True):
            scores, truth = np.asarray(scores, np.float64), np.asarray(truth, np.float64)
            shares.append(top_k_share(scores, truth, k))
            spearmans.append(_spearman(np.nan_to_num(scores, nan=-np.inf), truth))
        return {"top_k_share": _mean(shares), "spearman": _mean(spearmans), "top_k_share_per_probe": shares,
                "spearman_per_probe": spearmans}
