"""The candidate stage: each probe's top-M BM25 documents (the lexical answer, and what a rerank scans), from one
pass over the corpus (:func:`retrieve`) or from a saved index (:meth:`hf_mirror.retrieval.CandidateIndex.retrieve`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hf_mirror.probes import Probe
from hf_mirror.retrieval.bm25 import BM25, document_words, top, words

logger = logging.getLogger(__name__)


@dataclass
class Candidates:
    """Each probe's candidates with their BM25 scores: its top-M documents by BM25 of its prompt + completion (best
    first) and, with the dense retriever, also its top-M by cosine similarity (after them, with their BM25 score,
    0 where they share no word with the probe; their similarities in ``dense``)."""

    n_documents: int  # documents in the corpus (with text)
    scores: dict[str, dict]  # probe id -> {doc id: BM25 score}
    dense: dict[str, dict] | None = None  # probe id -> {doc id: cosine similarity} of its dense top-M (None: no dense)
    every: tuple[list, dict[str, np.ndarray]] | None = None  # (doc ids, probe id -> BM25 score of each) when kept
    _rows: dict | None = field(default=None, init=False, repr=False, compare=False)

    def union(self) -> set:
        """Every probe's candidates: what a candidates-only scan reads."""
        return {d for chosen in self.scores.values() for d in chosen}

    def bm25(self, probes: Sequence, docs: Sequence) -> np.ndarray:
        """Each (probe id, doc id) pair's BM25 score: of every document when kept (``every``: 0 for a document
        without text), else of the candidates (NaN for the others)."""
        if self.every is None:
            table = {(p, str(d)): s for p, chosen in self.scores.items() for d, s in chosen.items()}
            return np.array([table.get((p, str(d)), np.nan) for p, d in zip(probes, docs, strict=True)], np.float64)
        ids, scores = self.every
        if self._rows is None:
            self._rows = {str(d): i for i, d in enumerate(ids)}
        row = self._rows
        return np.array([scores[p][row[str(d)]] if str(d) in row else 0.0 for p, d in zip(probes, docs, strict=True)],
                        np.float64)


def retrieve(documents: Iterable[tuple[object, object]], probes: Sequence[Probe], m: int,
             k1: float = 1.5, b: float = 0.75, keep_all: Callable[[int], bool] = lambda n: False) -> Candidates:
    """Each probe's top-``m`` documents by BM25 (bm25s), from one pass over the corpus; with ``keep_all(n)`` true
    for the corpus's ``n`` documents with text, every document's score too (``Candidates.every``)."""
    ids, texts = [], []
    for doc_id, text in documents:
        terms = document_words(text)
        if terms is not None:
            ids.append(doc_id)
            texts.append(terms)
    if not ids:
        return Candidates(0, {p.id: {} for p in probes})
    per_probe, every = ranked(BM25.index(texts, k1=k1, b=b, method="lucene"), ids, probes, m)
    return _chosen(Candidates(len(ids), per_probe, every=(ids, every) if keep_all(len(ids)) else None), m)


def ranked(index: BM25, ids: Sequence, probes: Sequence[Probe],
           m: int) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Each probe's top-``m`` documents of ``index`` (``ids`` in index order) by BM25 of its prompt + completion,
    ``{doc id: score}`` best first, and every document's score (float32) per probe."""
    per_probe, every = {}, {}
    for p in probes:
        scores = index.scores(words(p.text))
        per_probe[p.id] = {ids[i]: float(scores[i]) for i in top(scores, m)}
        every[p.id] = np.asarray(scores, np.float32)
    return per_probe, every


def _chosen(found: Candidates, m: int, dense: bool = False) -> Candidates:
    """The documented fallbacks: M above the corpus size keeps every document; a probe that shares no word with
    the corpus (every BM25 score 0) has no BM25 candidates, with a warning (its top-M would be arbitrary): only
    its dense ones where ``dense``, else none."""
    if m > found.n_documents:
        logger.info("%d BM25 candidates per probe asked of a corpus of %d documents with text: every document is a "
                    "candidate.", m, found.n_documents)
    for probe_id, chosen in found.scores.items():
        if chosen and not any(s > 0 for s in chosen.values()):
            logger.warning("Probe %r shares no word with the corpus (every BM25 score is 0): %s", probe_id,
                           "it has only its dense candidates, which the hybrid ranks by the mirror." if dense else
                           "it has no candidates, so the hybrid ranks no document for it; rank it by the mirror "
                           "alone with --rank-by mirror --candidates all.")
            found.scores[probe_id] = {}
    return found


