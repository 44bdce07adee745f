"""Pieces shared by the bundled metric modules (they import it from the installed package)."""

from __future__ import annotations

import datasets
import numpy as np

RANKING_FEATURES = datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                      "references": datasets.Sequence(datasets.Value("string"))})


def score_features(reference_type: str) -> datasets.Features:
    """A float score per example against a reference of ``reference_type`` (e.g. "int32" labels)."""
    return datasets.Features({"predictions": datasets.Value("float64"),
                              "references": datasets.Value(reference_type)})


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), np.float64)
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e - 1) / 2 + 1
    return ranks
