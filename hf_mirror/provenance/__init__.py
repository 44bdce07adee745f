"""Provenance checks: verbatim overlap with the corpus (memorization, benchmark leakage) and membership scores."""

from hf_mirror.provenance.leakage import EvalSet, audit_leakage, write_report
from hf_mirror.provenance.membership import min_k_percent, min_k_scores, token_logprobs
from hf_mirror.provenance.memorization import extractable_memorization
from hf_mirror.provenance.ngram import NgramIndex, NgramMatch, Occurrence, Span, ngram_hashes

__all__ = [
    "EvalSet",
    "audit_leakage",
    "extractable_memorization",
    "write_report",
    "NgramIndex",
    "NgramMatch",
    "Occurrence",
    "Span",
    "min_k_percent",
    "min_k_scores",
    "ngram_hashes",
    "token_logprobs",
]
