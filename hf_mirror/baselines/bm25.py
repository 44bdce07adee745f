"""BM25 baseline: the probe's prompt + completion as a bag-of-words query against the corpus (``bm25s``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from hf_mirror.baselines._common import Document
from hf_mirror.baselines.scorer import Scorer
from hf_mirror.probes import Probe
from hf_mirror.retrieval.bm25 import BM25, words


class BM25Baseline(Scorer):
    """Scores every document against each probe's text (prompt + completion) with Okapi BM25.

    The index is built from one pass over the documents; BM25 needs corpus-wide statistics (document
    frequencies, mean length) before any document can be scored, so scores for all documents are held in
    memory (probes x documents floats). ``k1``, ``b`` and ``variant`` (a ``bm25s`` method name such as
    ``"lucene"``, ``"robertson"`` or ``"bm25+"``) are passed to ``bm25s.BM25``.
    """

    name = "bm25"
    needs_model = False  # the model is not read: only its tokenizer, for the windows

    def __init__(self, model, tokenizer, *, probes: Sequence[Probe], max_length: int, overlap: int, k1: float = 1.5,
                 b: float = 0.75, variant: str = "lucene") -> None:
        self.queries = [words(p.text) for p in probes]
        self.params = {"k1": k1, "b": b, "method": variant}

    def score(self, documents: Iterable[Document]) -> Iterator[tuple[Document, np.ndarray]]:
        """Each document with its score per probe (documents are kept in memory until indexed)."""
        docs = list(documents)
        if not docs:
            return
        index = BM25.index([words(d.text) or [" "] for d in docs], **self.params)
        scores = np.stack([index.scores(q) for q in self.queries], axis=1)
        for doc, row in zip(docs, scores, strict=True):
            yield doc, row.astype(np.float64)
