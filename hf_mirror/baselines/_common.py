"""Shared pieces of the baselines: the documents a baseline scores, and batching model windows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hf_mirror.corpus import document_tokens, windows
from hf_mirror.errors import InputError
from hf_mirror.scan import Skipped


@dataclass(kw_only=True)
class Document:
    """One non-empty corpus document: ``token_ids`` are its model tokens (start token excluded)."""

    seq: int
    doc_id: object
    text: str
    token_ids: list[int]
    windows: list[tuple[int, list[int], int]] = field(default_factory=list)


def iter_documents(
    documents: Iterable[tuple[object, object]],
    tokenizer,
    max_length: int,
    overlap: int,
    skipped: list[Skipped],
) -> Iterator[Document]:
    """Tokenised, windowed documents; missing, empty and token-less ones go to ``skipped`` (as in the scan)."""
    for seq, (doc_id, text) in enumerate(documents):
        if text is None or (isinstance(text, str) and not text.strip()):
            skipped.append(Skipped(doc_id, "missing text" if text is None else "empty or whitespace-only", seq))
            continue
        if not isinstance(text, str):
            raise InputError(
                f"Document {doc_id!r} has non-string text ({type(text).__name__}); point --text-column at a string "
                "column."
            )
        ids = document_tokens(tokenizer, text)
        if len(ids) < 2:
            skipped.append(Skipped(doc_id, "no tokens after tokenization", seq))
            continue
        yield Document(seq=seq, doc_id=doc_id, text=text, token_ids=ids[1:], windows=windows(ids, max_length, overlap))
