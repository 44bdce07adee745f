"""Provenance checks: verbatim overlap with the corpus, mirror attribution of evaluation items and generations,
membership scores; benchmark leakage audits and memorization reports."""

from hf_mirror.provenance.generation import generation_provenance, write_provenance
from hf_mirror.provenance.leakage import EvalSet, audit_leakage, combined_scores, robust_z, write_report
from hf_mirror.provenance.membership import min_k_percent, min_k_scores, token_logprobs
from hf_mirror.provenance.memorization import extractable_memorization
from hf_mirror.provenance.mirror_leakage import EvalItem, make_items, mirror_leakage, split_item, stand_out
from hf_mirror.retrieval.infinigram import InfiniGramIndex, load_index
from hf_mirror.retrieval.ngram import NgramIndex, NgramMatch, Occurrence, Span, ngram_hashes

__all__ = [
    "EvalItem",
    "EvalSet",
    "InfiniGramIndex",
    "audit_leakage",
    "combined_scores",
    "generation_provenance",
    "load_index",
    "make_items",
    "mirror_leakage",
    "robust_z",
    "split_item",
    "stand_out",
    "write_provenance",
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
