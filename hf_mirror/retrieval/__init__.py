"""Retrieval, below the pipeline and provenance: BM25 (implemented once, :mod:`.bm25`), dense retrieval
(:mod:`.dense`), each probe's candidates (:mod:`.candidates`), the verbatim indexes (:mod:`.ngram`, the streaming
corpus pass that also feeds the saved index; :mod:`.infinigram`) and the saved index (:mod:`.index`).

Nothing here imports a module above it: not the pipeline, provenance, the baselines or the method registry
(tests/test_layers.py checks the import graph).
"""

from hf_mirror.retrieval.bm25 import BM25, words
from hf_mirror.retrieval.candidates import Candidates, retrieve
from hf_mirror.retrieval.index import CandidateIndex, build_index

__all__ = ["BM25", "CandidateIndex", "Candidates", "build_index", "retrieve", "words"]
