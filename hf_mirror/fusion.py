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

:class:`Ranking` holds the three settings (``rank_by``, ``mirror_weight``, ``lexical_weight``) and makes the final
``score``, ``mirror`` and ``influence`` columns from them (the merge calls it); its :meth:`Ranking.describe` is the one
wording of them that the terminal view, the HTML views and the report show.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

RANK_BY = ("hybrid", "mirror")


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


class Description(NamedTuple):
    """What a :class:`Ranking`'s columns mean, in words: ``score`` (the final score), ``order`` (the sentence that says
    what orders a probe's list) and ``influence`` (the influence column)."""

    score: str
    order: str
    influence: str


def _weight(value: float | None, flag: str) -> str:
    """A weight as a run recorded it (a run that did not record it says so: no number is guessed)."""
    return f"{value:g}" if isinstance(value, (int, float)) else f"w (the run's {flag}, not recorded)"


@dataclass(frozen=True, kw_only=True)
class Ranking:
    """How each probe's documents are ranked, and what the influence column adds to the mirror's scores.

    ``rank_by="hybrid"``: each probe's BM25 candidates, ranked by :func:`hybrid_scores` with ``mirror_weight``; the
    mirror's own score moves to the ``mirror`` column. ``rank_by="mirror"``: every scored document by the mirror's
    score. ``influence``: :func:`scaled_sum` of the mirror's and BM25's scores with ``lexical_weight``. A weight is
    None only in a ranking read from a run that did not record it (:meth:`from_settings`): it can be described, not
    computed.
    """

    rank_by: str
    mirror_weight: float | None
    lexical_weight: float | None

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")

    @classmethod
    def from_config(cls, scan: Any) -> Ranking:
        """The ranking a run's :class:`hf_mirror.config.ScanConfig` asks for."""
        ranking = scan.ranking
        return cls(rank_by=ranking.rank_by, mirror_weight=ranking.mirror_weight, lexical_weight=ranking.lexical_weight)

    @classmethod
    def from_settings(cls, scan: Mapping | None) -> Ranking:
        """The ranking of a finished run, from its recorded scan settings (``result.config["scan"]``): a run that
        recorded no ``rank_by`` ranked by the mirror, and a weight it did not record stays None."""
        scan = scan or {}
        return cls(rank_by="hybrid" if scan.get("rank_by") == "hybrid" else "mirror",
                   mirror_weight=scan.get("mirror_weight"), lexical_weight=scan.get("lexical_weight"))

    @property
    def hybrid(self) -> bool:
        """Whether the final score fuses BM25 and the mirror (the mirror's own score is then the ``mirror`` column)."""
        return self.rank_by == "hybrid"

    @property
    def mirror_column(self) -> str:
        """The column that holds the mirror's own score: ``mirror`` when the score is fused, else ``score``."""
        return "mirror" if self.hybrid else "score"

    def scores(self, *, bm25: np.ndarray, mirror: np.ndarray) -> np.ndarray:
        """One probe's final scores over its candidates (``bm25`` and ``mirror`` aligned, no NaN)."""
        if not self.hybrid:
            return np.asarray(mirror, np.float64).copy()
        return hybrid_scores(bm25, mirror, self._needed(self.mirror_weight, "mirror_weight"))

    def score_column(self, frame: pd.DataFrame, mirror: str = "mirror") -> pd.Series:
        """The final ``score`` of every row of ``frame`` (``probe_id``, ``bm25``, and the mirror's score in column
        ``mirror``); hybrid: NaN where ``bm25`` is NaN (not one of the probe's candidates)."""
        if not self.hybrid:
            return frame[mirror].astype(np.float64)
        return fuse(frame, self._needed(self.mirror_weight, "mirror_weight"), mirror=mirror)

    def influence(self, *, mirror: np.ndarray, bm25: np.ndarray, mirror_spread: Any = None,
                  bm25_spread: Any = None) -> np.ndarray:
        """The influence column: ``mirror / mirror_spread + lexical_weight * bm25 / bm25_spread`` (a BM25 score of 0
        where BM25 did not score the document). Without spreads, ``mirror`` and ``bm25`` are one probe's scored
        documents and each spread is taken over them (:func:`influence`); else a number, or one per row."""
        weight = self._needed(self.lexical_weight, "lexical_weight")
        if mirror_spread is None and bm25_spread is None:
            return influence(mirror, bm25, weight)
        return scaled_sum(mirror, bm25, weight, mirror_spread, bm25_spread)

    def describe(self, candidates: str = "candidates") -> Description:
        """What the ``score``, a probe's order and the ``influence`` column mean, in words; ``candidates`` names a
        probe's candidates (e.g. ``"20 BM25 candidates"``)."""
        lexical = "BM25 of prompt + generation scaled to 1 for the probe's best lexical match"
        if not self.hybrid:
            score = "score = the mirror's score, over every scanned document"
            order = "ordered by score: the mirror's score"
        elif self.mirror_weight == 0:
            score = f"score = {lexical} (documents that state it), over the probe's {candidates}"
            order = (f"ordered by score: BM25 of prompt + generation, scaled to 1 for the best, over the probe's "
                     f"{candidates}")
        else:
            weight = _weight(self.mirror_weight, "--mirror-weight")
            score = (f"score = {lexical} (documents that state it) + {weight} x the mirror's score, standardised "
                     f"over the probe's {candidates}")
            order = (f"ordered by score: BM25 of prompt + generation, scaled to 1 for the best, over the probe's "
                     f"{candidates}, + {weight} x the mirror's z-score")
        influence = ("influence = mirror / sd over the probe's scored documents (the additive estimate; no BM25 "
                     "prior: --lexical-weight 0)" if self.lexical_weight == 0 else
                     f"influence = mirror / sd + {_weight(self.lexical_weight, '--lexical-weight')} x BM25 / sd "
                     "over the probe's scored documents (the additive estimate)")
        return Description(score=score, order=order, influence=influence)

    def _needed(self, weight: float | None, name: str) -> float:
        if weight is None:
            raise ValueError(f"this ranking's {name} was not recorded: it can be described, not computed")
        return weight
