"""The candidate stage: each probe's top-M BM25 documents (the lexical answer, and what a rerank scans)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from hf_mirror.config import parse_candidates  # noqa: F401 (re-exported)
from hf_mirror.probes import Probe


@dataclass
class Candidates:
    """Each probe's top-M documents by BM25 of its prompt + completion, with their scores (best first)."""

    n_documents: int  # documents in the corpus (with text)
    scores: dict[str, dict]  # probe id -> {doc id: BM25 score}

    def union(self) -> set:
        """Every probe's candidates: what a candidates-only scan reads."""
        return {d for chosen in self.scores.values() for d in chosen}


def retrieve(documents: Iterable[tuple[object, object]], probes: Sequence[Probe], m: int,
             k1: float = 1.5, b: float = 0.75) -> Candidates:
    """Each probe's top-``m`` documents by BM25 (bm25s), from one pass over the corpus."""
    import bm25s

    from hf_mirror.baselines.bm25 import words

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # its per-index notes are not the user's business

    ids, texts = [], []
    for doc_id, text in documents:
        if isinstance(text, str) and text.strip():
            ids.append(doc_id)
            texts.append(words(text) or [" "])
    if not ids:
        return Candidates(0, {p.id: {} for p in probes})
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(texts, show_progress=False)
    per_probe = {}
    for p in probes:
        query = words(p.text)
        scores = retriever.get_scores(query) if query else np.zeros(len(ids))
        top = np.argsort(-scores, kind="stable")[:m]
        per_probe[p.id] = {ids[i]: float(scores[i]) for i in top}
    return Candidates(len(ids), per_probe)
