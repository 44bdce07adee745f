"""The final ranking, and the influence estimate: how the mirror's scores and BM25's combine.

Ranking. For each probe, over its BM25 candidates: ``score = bm25 / max(bm25) + weight * z(mirror)``, where ``z`` is the
mirror score standardised over those candidates. The lexical term is in [0, 1], so a small weight lets the mirror
reorder documents whose lexical match is close and leaves clear lexical answers first. The default weight,
``config.MIRROR_WEIGHT`` = 0 (BM25's order), was chosen on the tune halves of the hybrid benchmark: no weight
beat BM25 there (docs/benchmarks_hybrid.md). ``rank_by="mirror"`` ranks by the mirror alone.

Influence. The additive estimate of what each document does to the probe (the column a linear datamodel sums):
``influence = mirror / sd(mirror) + lexical_weight * bm25 / sd(bm25)``, each spread taken over the probe's
scored documents: the mirror's counterfactual signal with an optional lexical prior of fixed relative strength. The
default weight, 0 (the mirror's own scores, rescaled per probe, which no per-probe correlation sees), was chosen on
the tune halves of the tail-patch and LDS benchmarks with the gradient mirror (docs/benchmarks_tail_patch.md); 0.5
suited the step-fitted mirror (docs/benchmarks_lds_real_text.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def hybrid_scores(bm25: np.ndarray, mirror: np.ndarray, weight: float) -> np.ndarray:
    """One probe's final scores over its candidates (``bm25`` and ``mirror`` aligned, no NaN)."""
    bm25, mirror = np.asarray(bm25, np.float64), np.asarray(mirror, np.float64)
    top = bm25.max() if len(bm25) else 0.0
    lexical = bm25 / top if top > 0 else np.zeros_like(bm25)
    spread = mirror.std() if len(mirror) > 1 else 0.0
    z = (mirror - mirror.mean()) / spread if spread > 0 else np.zeros_like(mirror)
    return lexical + weight * z


def fuse(frame: pd.DataFrame, weight: float, mirror: str = "mirror") -> pd.Series:
    """The final score of every row of ``frame`` (``probe_id``, ``bm25``, ``mirror``): NaN where ``bm25`` is NaN
    (not one of the probe's candidates)."""
    out = pd.Series(np.nan, index=frame.index, dtype=np.float64)
    candidates = frame[frame["bm25"].notna()]
    for _, rows in candidates.groupby("probe_id", sort=False):
        out.loc[rows.index] = hybrid_scores(rows["bm25"].to_numpy(), rows[mirror].to_numpy(), weight)
    return out


def influence(mirror: np.ndarray, bm25: np.ndarray, weight: float) -> np.ndarray:
    """One probe's influence estimate over its scored documents (``mirror`` and ``bm25`` aligned, no NaN; a
    document BM25 did not score counts 0)."""
    mirror, bm25 = np.asarray(mirror, np.float64), np.asarray(bm25, np.float64)
    return scaled_sum(mirror, bm25, weight, mirror.std(), bm25.std())


def scaled_sum(mirror: np.ndarray, bm25: np.ndarray, weight: float, mirror_spread, bm25_spread) -> np.ndarray:
    """``mirror / mirror_spread + weight * bm25 / bm25_spread`` (spreads: numbers, or one per row); a zero spread
    drops its term (it carries nothing)."""
    mirror, bm25 = np.asarray(mirror, np.float64), np.asarray(bm25, np.float64)
    mirror_spread, bm25_spread = np.asarray(mirror_spread, np.float64), np.asarray(bm25_spread, np.float64)
    own = np.divide(mirror, mirror_spread, out=np.zeros_like(mirror), where=mirror_spread > 0)
    return own + weight * np.divide(bm25, bm25_spread, out=np.zeros_like(bm25), where=bm25_spread > 0)
