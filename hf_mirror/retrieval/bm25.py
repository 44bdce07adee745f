"""Okapi BM25 over lowercase words (bm25s), implemented once: the candidate stage, the saved index and the BM25
baseline all index and score through :class:`BM25`."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WORD = re.compile(r"\w+")
PARAMS = {"k1": 1.5, "b": 0.75, "method": "lucene"}  # bm25s's defaults: what the candidates and the index use


def words(text: str) -> list[str]:
    """The lowercase word tokens of ``text`` (runs of letters, digits and underscores)."""
    return WORD.findall(text.lower())


def document_words(text: object) -> list[str] | None:
    """A document's BM25 terms (None: no text, not indexed). bm25s cannot index an empty token list: a document with
    text but without words gets a placeholder that no query contains."""
    return (words(text) or [" "]) if isinstance(text, str) and text.strip() else None


class BM25:
    """A bm25s index of documents' terms, scoring a query's words against every document (in index order)."""

    def __init__(self, retriever, n_documents: int) -> None:
        self.retriever, self.n_documents = retriever, n_documents

    @classmethod
    def index(cls, terms: Sequence[list[str]], **params) -> BM25:
        """Index each document's terms (:func:`document_words`); ``params`` are ``bm25s.BM25``'s (default
        :data:`PARAMS`)."""
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # its per-index notes are not the user's business
        retriever = bm25s.BM25(**(params or PARAMS))
        retriever.index(list(terms), show_progress=False)
        return cls(retriever, len(terms))

    @classmethod
    def load(cls, directory: str | Path, n_documents: int) -> BM25:
        """bm25s's own save, as :meth:`save` wrote it."""
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)
        return cls(bm25s.BM25.load(str(directory), show_progress=False), n_documents)

    def save(self, directory: str | Path) -> None:
        self.retriever.save(str(directory), show_progress=False)

    def scores(self, query: list[str]) -> np.ndarray:
        """Every document's score for the query's words (all 0 for a query without words)."""
        return self.retriever.get_scores(query) if query else np.zeros(self.n_documents)


def top(scores: np.ndarray, m: int) -> np.ndarray:
    """The positions of the ``m`` best scores, best first (ties: the earlier document)."""
    return np.argsort(-scores, kind="stable")[:m]
