"""Retrieve-then-rerank: a cheap BM25 candidate stage, so the mirror scans only each probe's top-M documents."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from hf_mirror.config import parse_candidates  # noqa: F401 (re-exported)
from hf_mirror.errors import InputError
from hf_mirror.probes import Probe


def bm25_candidates(documents: Iterable[tuple[object, object]], probes: Sequence[Probe], m: int,
                    k1: float = 1.5, b: float = 0.75) -> tuple[set, dict[str, list]]:
    """The top-``m`` documents of each probe by BM25 of its prompt + completion, from one pass over the corpus.

    Returns the union of their ids (what the mirror then scans) and each probe's candidate list.
    """
    try:
        import bm25s
    except ImportError as e:  # an optional dependency
        raise InputError("--candidates needs bm25s: pip install 'hf-mirror[eval]'.") from e
    from hf_mirror.baselines.bm25 import words

    ids, texts = [], []
    for doc_id, text in documents:
        if isinstance(text, str) and text.strip():
            ids.append(doc_id)
            texts.append(words(text) or [" "])
    if not ids:
        return set(), {p.id: [] for p in probes}
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(texts, show_progress=False)
    per_probe = {}
    for p in probes:
        query = words(p.text)
        scores = retriever.get_scores(query) if query else np.zeros(len(ids))
        top = np.argsort(-scores, kind="stable")[:m]
        per_probe[p.id] = [ids[i] for i in top]
    return {d for chosen in per_probe.values() for d in chosen}, per_probe
