"""Baseline attribution methods (BM25, embedding similarity, LoRA gradient similarity, EK-FAC influence via the
optional ``kronfluence``, bergson's EK-FAC and TrackStar), same result type.

``attribute_baseline(method, model, corpus, probes, ...)`` returns an :class:`~hf_mirror.AttributionResult`
written like :func:`hf_mirror.attribute`'s (``topk``, ``scores``, ``probes``, ``skipped``, ``config``; the
evidence table is empty: baselines give no per-token losses). Scores are reported raw (``normalize="none"``),
higher = more supporting. Every baseline is a :class:`Scorer` (:mod:`hf_mirror.baselines.scorer`): it runs in a
single process and does not resume.
"""

from __future__ import annotations

from hf_mirror import methods
from hf_mirror.baselines.bm25 import BM25Baseline
from hf_mirror.baselines.ekfac import EKFACBaseline
from hf_mirror.baselines.embedding import EmbeddingBaseline
from hf_mirror.baselines.gradsim import GradSimBaseline
from hf_mirror.baselines.scorer import Scorer, attribute_baseline

METHODS = {name: methods.load(name) for name in methods.BASELINES}  # the registry's scorers

__all__ = ["METHODS", "BM25Baseline", "EKFACBaseline", "EmbeddingBaseline", "GradSimBaseline", "Scorer",
           "attribute_baseline"]
