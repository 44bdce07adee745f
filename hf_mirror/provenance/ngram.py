"""A verbatim token n-gram index of a corpus: which spans of a text occur word for word in which documents.

Built in one streaming pass over ``Corpus.documents()``, tokenised with the model's tokenizer. Every n-gram
of ``n`` tokens is stored as a 64-bit hash with its posting (document, token offset), in three parallel numpy
arrays sorted by hash; lookups are ``np.searchsorted``. On disk::

    hashes.npy  uint64[N]   sorted n-gram hashes
    docs.npy    uint32[N]   index into doc_ids.json
    offsets.npy uint32[N]   token offset of the n-gram in its document
    doc_ids.json            document ids, in corpus order
    manifest.json           tokenizer fingerprint, n, corpus description, counts (its presence marks completion)

An index is written to a temporary directory, manifest last, and renamed into place, so an interrupted build
never leaves a directory that loads as a valid index. Matching is on tokens: a text that contains a document
verbatim may still tokenise differently at its edges, which costs at most a token or two per span.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_mirror.cache import tokenizer_fingerprint
from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.progress import progress_bar

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ARRAYS = ("hashes", "docs", "offsets")
_FLUSH_TOKENS = 1 << 20  # concatenate per-document postings into one chunk every ~1M n-grams
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial rolling hash


def _mix(tokens: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of each token id: spreads small ids over all 64 bits."""
    z = tokens.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def ngram_hashes(tokens: Iterable[int] | np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every n-gram of ``tokens`` (``len - n + 1`` of them; empty when shorter than ``n``)."""
    mixed = _mix(np.asarray(tokens, dtype=np.int64))
    m = len(mixed) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):  # wraps modulo 2**64, silently for arrays
        h = h * _MULT + mixed[j : j + m]
    return h


@dataclass
class Occurrence:
    """Where a span occurs in the corpus: the document and the token offset of the span's first token."""

    doc_id: object
    offset: int


@dataclass
class Span:
    """A maximal run of query tokens ``[start, end)`` found verbatim in the corpus."""

    start: int
    end: int
    text: str
    occurrences: list[Occurrence] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class NgramMatch:
    """What of a text occurs verbatim in the corpus.

    ``coverage`` is the fraction of the text's tokens inside at least one n-gram found in the corpus;
    ``spans`` are the longest verbatim spans, longest first; ``covered`` flags each query token.
    """

    n_tokens: int
    coverage: float
    spans: list[Span]
    covered: np.ndarray

    @property
    def longest(self) -> int:
        """Length in tokens of the longest verbatim span (0 when none)."""
        return max((s.length for s in self.spans), default=0)


class NgramIndex:
    """Hashed token n-grams of a corpus with (document, offset) postings. Build with ``build``, reopen with ``load``."""

    def __init__(
        self,
        tokenizer,
        n: int,
        hashes: np.ndarray,
        docs: np.ndarray,
        offsets: np.ndarray,
        doc_ids: list,
        manifest: dict,
    ) -> None:
        self.tokenizer, self.n = tokenizer, n
        self.hashes, self.docs, self.offsets = hashes, docs, offsets
        self.doc_ids, self.manifest = doc_ids, manifest

    def __len__(self) -> int:
        return len(self.hashes)

    def __repr__(self) -> str:
        m = self.manifest
        return f"NgramIndex(n={self.n}, documents={m['n_documents']}, tokens={m['n_tokens']}, ngrams={m['n_ngrams']})"

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        corpus: Corpus | list[str],
        tokenizer,
        n: int = 13,
        output_dir: str | Path | None = None,
        overwrite: bool = False,
        show_progress: bool = False,
    ) -> NgramIndex:
        """Index every ``n``-token n-gram of ``corpus`` in one streaming pass; save it when ``output_dir`` is given."""
        if n < 1:
            raise InputError(f"n must be a positive number of tokens, got {n}.")
        if not isinstance(corpus, Corpus):
            corpus = Corpus(corpus)
        out = None if output_dir is None else _check_target(Path(output_dir), overwrite)
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS}
        pending: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS}
        n_pending = n_tokens = 0
        doc_ids: list = []
        bar = progress_bar(desc="indexing n-grams", unit="doc", disable=not show_progress)
        for doc_id, text in corpus.documents():
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise InputError(f"Document {doc_id!r} is a {type(text).__name__}, not text; pick the text column.")
            if len(doc_ids) >= np.iinfo(np.uint32).max:
                raise InputError("Too many documents for one n-gram index (at most 2**32 - 1); split the corpus.")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            n_tokens += len(ids)
            h = ngram_hashes(ids, n)
            if len(h):
                pending["hashes"].append(h)
                pending["docs"].append(np.full(len(h), len(doc_ids), dtype=np.uint32))
                pending["offsets"].append(np.arange(len(h), dtype=np.uint32))
                n_pending += len(h)
            doc_ids.append(_jsonable_id(doc_id))
            if n_pending >= _FLUSH_TOKENS:
                _flush(pending, chunks)
                n_pending = 0
            bar.update(1)
        bar.close()
        _flush(pending, chunks)
        arrays = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.uint64 if k == "hashes" else np.uint32)
                  for k, v in chunks.items()}
        order = np.argsort(arrays["hashes"], kind="stable")  # stable: postings of an n-gram stay in corpus order
        arrays = {k: v[order] for k, v in arrays.items()}
        manifest = {
            "format": "hf_mirror.ngram_index",
            "version": FORMAT_VERSION,
            "n": n,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "corpus": corpus.describe(),
            "corpus_fingerprint": corpus.fingerprint(),
            "n_documents": len(doc_ids),
            "n_tokens": n_tokens,
            "n_ngrams": len(arrays["hashes"]),
        }
        index = cls(tokenizer, n, arrays["hashes"], arrays["docs"], arrays["offsets"], doc_ids, manifest)
        if out is not None:
            index.save(out, overwrite=overwrite)
        return index

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the index to ``directory`` atomically (temporary directory, manifest last, then rename)."""
        target = _check_target(Path(directory), overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            for name in _ARRAYS:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
            (tmp / "doc_ids.json").write_text(json.dumps(self.doc_ids))
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2, default=str))
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "index")
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, directory: str | Path, tokenizer, mmap: bool = True) -> NgramIndex:
        """Open an index saved by ``build``/``save``; refuse an incomplete one or one built for another tokenizer."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise InputError(
                f"{directory} is not a complete n-gram index (no {MANIFEST}): its build was interrupted or it is "
                "another kind of directory. Rebuild it with NgramIndex.build(corpus, tokenizer, output_dir=...)."
            )
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON ({e}); rebuild the index with NgramIndex.build.") from e
        if manifest.get("format") != "hf_mirror.ngram_index" or manifest.get("version") != FORMAT_VERSION:
            raise InputError(
                f"{directory} holds format {manifest.get('format')!r} version {manifest.get('version')!r}, not an "
                f"hf_mirror n-gram index version {FORMAT_VERSION}; rebuild it with NgramIndex.build."
            )
        fp = tokenizer_fingerprint(tokenizer)
        if manifest["tokenizer"] != fp:
            raise InputError(
                f"The n-gram index in {directory} was built with another tokenizer (fingerprint "
                f"{manifest['tokenizer']}, this one is {fp}); load it with the tokenizer it was built with, or "
                "rebuild it for this tokenizer with NgramIndex.build(corpus, tokenizer, output_dir=...)."
            )
        try:
            arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r" if mmap else None) for k in _ARRAYS}
            doc_ids = json.loads((directory / "doc_ids.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(
                f"The n-gram index in {directory} is damaged ({e}); rebuild it with NgramIndex.build."
            ) from e
        sizes = {len(a) for a in arrays.values()}
        if sizes != {manifest["n_ngrams"]} or len(doc_ids) != manifest["n_documents"]:
            raise InputError(
                f"The n-gram index in {directory} does not match its manifest's counts; rebuild it with "
                "NgramIndex.build."
            )
        return cls(tokenizer, int(manifest["n"]), arrays["hashes"], arrays["docs"], arrays["offsets"], doc_ids,
                   manifest)

    # ---------------------------------------------------------------- querying
    def find(self, text: str, max_postings: int = 1000) -> NgramMatch:
        """The longest spans of ``text`` found verbatim in the corpus, and the fraction of its tokens covered.

        A span is a run of consecutive query n-grams that continue each other in one document, so every
        reported occurrence is a real contiguous copy (up to 64-bit hash collisions). Spans contained in a
        longer span are dropped. At most ``max_postings`` occurrences of each query n-gram are followed
        (corpus order), which bounds the work for boilerplate n-grams; coverage counts them all.
        """
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        n_tok = len(ids)
        covered = np.zeros(n_tok, dtype=bool)
        h = ngram_hashes(ids, self.n)
        if len(h) == 0 or len(self.hashes) == 0:
            return NgramMatch(n_tok, 0.0, [], covered)
        lo = np.searchsorted(self.hashes, h, side="left")
        hi = np.searchsorted(self.hashes, h, side="right")
        found = np.flatnonzero(hi > lo)
        if len(found) == 0:
            return NgramMatch(n_tok, 0.0, [], covered)
        delta = np.zeros(n_tok + 1, dtype=np.int64)
        np.add.at(delta, found, 1)
        np.add.at(delta, found + self.n, -1)
        covered = np.cumsum(delta[:-1]) > 0
        # every (query position, posting) pair of the found n-grams
        counts = np.minimum(hi[found] - lo[found], max_postings)
        qpos = np.repeat(found, counts)
        starts = np.repeat(lo[found], counts)
        within = np.arange(len(qpos)) - np.repeat(np.cumsum(counts) - counts, counts)
        post = starts + within
        doc = np.asarray(self.docs[post], dtype=np.int64)
        off = np.asarray(self.offsets[post], dtype=np.int64)
        # chain pairs on the same diagonal (document, offset - query position) with consecutive positions
        order = np.lexsort((qpos, off - qpos, doc))
        qpos, doc, off = qpos[order], doc[order], off[order]
        diag = off - qpos
        new_run = np.ones(len(qpos), dtype=bool)
        new_run[1:] = (doc[1:] != doc[:-1]) | (diag[1:] != diag[:-1]) | (qpos[1:] != qpos[:-1] + 1)
        run_start = np.flatnonzero(new_run)
        run_end = np.append(run_start[1:], len(qpos)) - 1
        by_range: dict[tuple[int, int], list[Occurrence]] = {}
        for a, b in zip(run_start.tolist(), run_end.tolist(), strict=True):
            key = (int(qpos[a]), int(qpos[b]) + self.n)
            by_range.setdefault(key, []).append(Occurrence(self.doc_ids[doc[a]], int(off[a])))
        spans = []
        ranges = sorted(by_range, key=lambda r: (r[0], -r[1]))
        reach = -1
        for s, e in ranges:  # sorted by start, longest first: a range is contained iff an earlier one reaches past it
            if e <= reach:
                continue
            reach = e
            text_span = self.tokenizer.decode(ids[s:e].tolist())
            spans.append(Span(s, e, text_span, by_range[(s, e)]))
        spans.sort(key=lambda sp: (-sp.length, sp.start))
        return NgramMatch(n_tok, float(covered.mean()), spans, covered)


def _flush(pending: dict[str, list[np.ndarray]], chunks: dict[str, list[np.ndarray]]) -> None:
    for k, parts in pending.items():
        if parts:
            chunks[k].append(np.concatenate(parts))
            parts.clear()


def _jsonable_id(doc_id: object) -> object:
    if isinstance(doc_id, (str, int, float, bool)) or doc_id is None:
        return doc_id
    if isinstance(doc_id, np.generic):
        return doc_id.item()
    return str(doc_id)


def _check_target(directory: Path, overwrite: bool) -> Path:
    if directory.exists() and not overwrite and (not directory.is_dir() or any(directory.iterdir())):
        raise InputError(f"{directory} already exists and is not empty; pass overwrite=True or choose another path.")
    return directory
