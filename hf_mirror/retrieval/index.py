"""The saved index (``hf-mirror index``): a corpus's BM25 index, its verbatim index (n-grams or infini-gram) and its
dense vectors, built in one streaming pass over the corpus and reopened by :class:`CandidateIndex`."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from hf_mirror.corpus import Corpus, as_corpus
from hf_mirror.errors import InputError
from hf_mirror.integrity import check_hashes, hash_files
from hf_mirror.ownership import STAGING, Kind
from hf_mirror.probes import Probe
from hf_mirror.retrieval.bm25 import BM25, PARAMS, document_words
from hf_mirror.retrieval.candidates import Candidates, _chosen, ranked
from hf_mirror.retrieval.dense import Embedder, nearest
from hf_mirror.retrieval.infinigram import BACKEND as INFINI_GRAM
from hf_mirror.retrieval.infinigram import InfiniGramIndex, load_index
from hf_mirror.retrieval.ngram import INDEX_FORMAT, MANIFEST, NGRAM, Extras, NgramIndex, verbatim_part

logger = logging.getLogger(__name__)
INDEX_ENTRIES = (MANIFEST, "bm25", "ngram", "infinigram", "dense", "extras")  # what `hf-mirror index` writes
# its output directory (hf_mirror.ownership); one without hf_mirror.json is adopted when it holds an index
INDEX = Kind("index", INDEX_ENTRIES, adoptable=frozenset(INDEX_ENTRIES),
             legacy=lambda d: _manifest_of(d).get("format") == INDEX_FORMAT, stage=True, marker=MANIFEST)


# ---------------------------------------------------------------------------------------------------- the saved index
INDEX_VERSION = 1
VERBATIM_DIRS = {"ngram": "ngram", INFINI_GRAM: "infinigram"}  # the verbatim index's backend -> its folder
BM25_PARAMS = PARAMS  # what retrieve() uses: bm25s's defaults
_COLUMNS = ("text_column", "id_column", "split", "format", "name")  # what picks the documents and their ids


def tokenizer_key(tokenizer) -> str:
    """The tokenizer an index was built with: its tokenization and special tokens, but not the pad token (the
    pipeline sets one where it is missing, and padding never changes a text's token ids)."""
    from hf_mirror.cache import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer, exclude=("pad_token",))


class _IndexExtras(Extras):
    """What the candidate index needs of each document besides its n-grams: BM25 terms, and a dense vector."""

    def __init__(self, embedder: Embedder | None) -> None:
        self.embedder = embedder
        self.key = ["bm25-words-v1", None if embedder is None else ["mean-last-hidden-v1", embedder.weights,
                                                                     embedder.max_length]]
        self.arrays = ("vector",) if embedder is not None else ()
        self.batch_size = 64

    def __call__(self, batch: list[tuple[object, str, list[int]]]) -> list[dict]:
        out = [{"words": document_words(text)} for _, text, _ in batch]
        if self.embedder is not None:
            for o, v in zip(out, self.embedder([text for _, text, _ in batch]), strict=True):
                o["vector"] = v
        return out


def _rebuild_hint(directory: Path) -> str:
    return (f"build it with `hf-mirror index --model MODEL --corpus CORPUS --output {directory}` (--overwrite "
            "replaces an index), or run without --index to retrieve on the fly")


class CandidateIndex:
    """A corpus's retrieval indexes, built once by :func:`build_index` (``hf-mirror index``) and reused.

    On disk::

        manifest.json   format, tokenizer and corpus fingerprints, corpus columns, counts (written last)
        bm25/           bm25s's own save (BM25.save/load) and doc_ids.json: the documents with text, corpus order
        ngram/          the verbatim n-gram index (NgramIndex; audit/provenance --index open it), or
        infinigram/     with --backend infini-gram, instead: its suffix array (InfiniGramIndex), which the manifest
                        records as "verbatim": {"backend": "infini-gram", "dir": "infinigram"} (without that entry,
                        an index is the n-gram layout)
        dense/          (--dense) vectors.npy, float32 [documents, hidden], opened memory-mapped; doc_ids.json

    The index is built in ``.hf_mirror-new/`` inside the directory and moved into place with its manifest when
    complete, so a directory without a manifest is a half-written index and is refused.
    """

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory, self.manifest = Path(directory), manifest
        self._bm25 = None
        self._bm25_ids: list | None = None
        self._bm25_rows: dict | None = None  # doc id -> its row in the BM25 index

    def __repr__(self) -> str:
        m = self.manifest
        backend, n = verbatim_part(self.directory, m)[0], (m.get("verbatim") or m.get("ngram") or {}).get("n")
        return (f"CandidateIndex(documents={m['n_documents']}, bm25={m['bm25']['documents']}, "
                f"{backend}=n{n}, dense={None if m.get('dense') is None else m['dense']['dim']})")

    @property
    def n_documents(self) -> int:
        """Documents with text (what BM25 indexes, and what ``retrieve`` counts)."""
        return int(self.manifest["bm25"]["documents"])

    @classmethod
    def load(cls, directory: str | Path, tokenizer=None, corpus: Corpus | None = None) -> CandidateIndex:
        """Open a saved index; refuse a half-written one, or one built for another tokenizer or corpus (when given)."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            building = directory / STAGING
            why = (f"its build was interrupted ({building} holds the unfinished build: rerun the same `hf-mirror "
                   "index` command to finish it)" if building.exists() else
                   "a half-written index, or another kind of directory" if directory.exists() else "it does not exist")
            raise InputError(f"{directory} is not a complete hf-mirror index (no {MANIFEST}: {why}); "
                             f"{_rebuild_hint(directory)}.")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path} is damaged ({e}); {_rebuild_hint(directory)}.") from e
        if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
            kind = manifest.get("format") if isinstance(manifest, dict) else None
            what = ("only a verbatim index (for audit/provenance), with no BM25 index"
                    if kind in ("hf_mirror.ngram_index", "hf_mirror.infinigram_index") else f"format {kind!r}")
            raise InputError(f"{directory} holds {what}, not an hf-mirror candidate index; "
                             f"{_rebuild_hint(directory)}.")
        if manifest.get("version") != INDEX_VERSION:
            raise InputError(f"{directory} is an index of version {manifest.get('version')!r}, this hf-mirror reads "
                             f"version {INDEX_VERSION}; {_rebuild_hint(directory)}.")
        index = cls(directory, manifest)
        if tokenizer is not None:
            fp = tokenizer_key(tokenizer)
            if manifest["tokenizer"] != fp:
                raise InputError(f"The index in {directory} was built with another tokenizer (fingerprint "
                                 f"{manifest['tokenizer']}, this model's is {fp}); rebuild it with this model: "
                                 f"{_rebuild_hint(directory)}.")
        if corpus is not None:
            index.check_corpus(corpus)
        return index

    def check_corpus(self, corpus: Corpus) -> None:
        """Refuse a corpus other than the one indexed (its content, or the columns that pick documents and ids)."""
        built, now = self.manifest["corpus_fingerprint"], corpus.fingerprint()
        if now is None:
            raise InputError(f"The corpus {corpus.describe()['source']} has no stable fingerprint (a generator, an "
                             "IterableDataset or a Hub dataset without a revision), so the index in "
                             f"{self.directory} cannot be checked against it; pass the corpus as files or a Dataset, "
                             "or run without --index.")
        if built != now:
            raise InputError(f"The index in {self.directory} was built from other corpus content (fingerprint "
                             f"{built} -> {now}: the corpus was edited, replaced or moved since); rebuild it with "
                             f"--overwrite: {_rebuild_hint(self.directory)}.")
        was, given = self.manifest["corpus"], corpus.describe()
        changed = [f"{k} {was.get(k)!r} -> {given.get(k)!r}" for k in _COLUMNS if was.get(k) != given.get(k)]
        if changed:
            raise InputError(f"The index in {self.directory} was built with other corpus settings ({', '.join(changed)}"
                             f"); pass the same ones, or {_rebuild_hint(self.directory)}.")

    def _bm25_index(self) -> BM25 | None:
        if self._bm25 is None and self.n_documents:
            try:
                self._verify("bm25")
                self._bm25 = BM25.load(self.directory / "bm25", self.n_documents)
                self._bm25_ids = json.loads((self.directory / "bm25" / "doc_ids.json").read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"The BM25 index in {self.directory} is damaged ({type(e).__name__}: {e}); "
                                 f"{_rebuild_hint(self.directory)}.") from e
            if len(self._bm25_ids) != self.n_documents:
                raise InputError(f"The BM25 index in {self.directory} does not match its manifest; "
                                 f"{_rebuild_hint(self.directory)}.")
        return self._bm25

    def retrieve(self, probes: Sequence[Probe], m: int, embedder: Embedder | None = None,
                 keep_all: Callable[[int], bool] = lambda n: False) -> Candidates:
        """Each probe's top-``m`` documents by BM25 from the saved index: what :func:`retrieve` gives on the corpus.

        With ``embedder`` (:meth:`embedder`: the dense retriever), the union with each probe's top-``m`` documents
        by cosine similarity of its prompt + completion's embedding to theirs; every candidate has its BM25 score.
        """
        retriever = self._bm25_index()
        if retriever is None:
            return _chosen(Candidates(0, {p.id: {} for p in probes}, None if embedder is None else
                                      {p.id: {} for p in probes}), m)
        near = None if embedder is None else self._dense_candidates(probes, m, embedder)
        per_probe, every = ranked(retriever, self._bm25_ids, probes, m)
        # the dense candidates' BM25 scores (bm25s scores every document)
        added = {} if near is None else {p.id: {d: float(every[p.id][self._bm25_rows[d]]) for d in near[p.id]}
                                         for p in probes}
        kept = (self._bm25_ids, every) if keep_all(self.n_documents) else None
        found = _chosen(Candidates(self.n_documents, per_probe, near, kept), m, dense=near is not None)
        for probe_id, docs in added.items():
            for d, score in docs.items():
                found.scores[probe_id].setdefault(d, score)
        return found

    def embedder(self, model, tokenizer, batch_size: int = 16) -> Embedder:
        """The dense retriever's query embedder: ``model`` pooled as the index's documents were. Refuses an index
        without dense vectors, or one whose vectors another model made."""
        dense = self.manifest.get("dense")
        fix = (f"rebuild it with this model: `hf-mirror index --dense --model MODEL --corpus CORPUS --output "
               f"{self.directory} --overwrite`, or leave dense out of --retrievers")
        if dense is None:
            raise InputError(f"--retrievers dense needs dense vectors, and the index in {self.directory} has none "
                             f"(it was built without --dense); {fix}.")
        embedder = Embedder(model, tokenizer, batch_size, dense["max_length"])
        if dense.get("model_weights") != embedder.weights:
            raise InputError(f"The dense vectors in {self.directory} were made by other model weights (fingerprint "
                             f"{dense.get('model_weights')}, this model's is {embedder.weights}); {fix}.")
        return embedder

    def _dense_candidates(self, probes: Sequence[Probe], m: int, embedder: Embedder) -> dict[str, dict]:
        """Each probe's ``m`` documents with text nearest its embedding: {doc id: cosine similarity}, best first."""
        if not probes:
            return {}
        if self._bm25_rows is None:
            self._bm25_rows = {d: i for i, d in enumerate(self._bm25_ids)}
        textless = int(self.manifest["n_documents"]) - self.n_documents  # in the dense index, not BM25's
        rows = self.nearest(np.stack(embedder([p.text for p in probes])), m + textless)
        return {p.id: dict(itertools.islice(((d, s) for d, s in row if d in self._bm25_rows), m))
                for p, row in zip(probes, rows, strict=True)}

    def verbatim(self, tokenizer) -> NgramIndex | InfiniGramIndex:
        """The verbatim index (what ``audit``/``provenance --index`` use): n-grams, or infini-gram's suffix array."""
        return load_index(self.directory, tokenizer)

    def dense(self) -> tuple[np.ndarray, list] | None:
        """The dense index: document vectors (float32, memory-mapped) and their ids; None when not built."""
        if self.manifest.get("dense") is None:
            return None
        try:
            self._verify("dense")
            vectors = np.load(self.directory / "dense" / "vectors.npy", mmap_mode="r")
            ids = json.loads((self.directory / "dense" / "doc_ids.json").read_text())
            if vectors.shape != (len(ids), self.manifest["dense"]["dim"]) or len(ids) != self.manifest["n_documents"]:
                raise ValueError(f"vectors of shape {vectors.shape} for {len(ids)} documents do not match the manifest")
        except (OSError, ValueError) as e:
            raise InputError(f"The dense index in {self.directory} is damaged ({type(e).__name__}: {e}); "
                             f"{_rebuild_hint(self.directory)}.") from e
        return vectors, ids

    def _verify(self, part: str) -> None:
        """Every file of ``part`` (bm25, dense) is there with the checksum the build recorded, else ValueError."""
        from hf_mirror.cache import verified_stamps

        files = {k: v for k, v in self.manifest.get("files", {}).items() if k.startswith(f"{part}/")}
        check_hashes(self.directory, files, verified_stamps(self.directory))

    def nearest(self, queries: np.ndarray, m: int, block: int = 1 << 16) -> list[list[tuple[object, float]]]:
        """The ``m`` documents nearest each query vector by cosine similarity (dense index), best first (ties: the
        earlier document). The vectors are read in blocks of ``block`` rows and only each query's best ``m`` are
        kept, so memory does not grow with the corpus."""
        found = self.dense()
        if found is None:
            raise InputError(f"The index in {self.directory} has no dense index; rebuild it with --dense.")
        vectors, ids = found
        return nearest(vectors, ids, queries, m, block)


def build_index(corpus: Corpus | list[str], tokenizer, output_dir: str | Path, *, n: int = NGRAM, model=None,
                overwrite: bool = False, show_progress: bool = False, resume: bool = True,
                dense_batch_size: int = 16, checkpoint_ngrams: int | None = None,
                backend: str = "ngram") -> CandidateIndex:
    """Build a corpus's candidate index (BM25, a verbatim index and, given ``model``, dense vectors) in one pass.

    One streaming pass over ``corpus`` feeds BM25, the dense vectors and (``backend="ngram"``) the verbatim n-gram
    index: under ``accelerate launch`` / ``torchrun`` each process reads its share (and embeds it on its device)
    and the main process merges them in corpus order, so the index does not depend on the number of processes.
    With ``backend="infini-gram"`` the verbatim index is infini-gram's suffix array (``infinigram/``), built by
    :meth:`InfiniGramIndex.build` in a tokenising pass of its own on the main process (the BM25 pass then builds
    no n-grams). ``output_dir`` is owned (:mod:`hf_mirror.ownership`: ``hf_mirror.json``): a directory holding files
    ``hf-mirror index`` did not write is refused, even with ``overwrite``. The index is built in
    ``output_dir/.hf_mirror-new/`` (the n-gram pass checkpoints there: an interrupted build resumes when rerun with
    the same inputs; the infini-gram backend's build starts over) and swapped in when complete, replacing only an
    earlier index's files (``overwrite``). It is keyed by the corpus
    fingerprint, its columns and the tokenizer: :meth:`CandidateIndex.load` refuses another corpus or tokenizer.
    """
    from hf_mirror.ownership import MANIFEST as OWN_MANIFEST
    from hf_mirror.ownership import Output, open_shared
    from hf_mirror.retrieval.infinigram import require_infini_gram
    from hf_mirror.retrieval.ngram import process_group

    if backend not in VERBATIM_DIRS:
        raise InputError(f"Unknown verbatim index backend {backend!r}; choose among {list(VERBATIM_DIRS)}.")
    if backend == INFINI_GRAM:
        require_infini_gram()  # before the corpus pass
    corpus = as_corpus(corpus)
    out = Path(output_dir)
    rank, world, state = process_group()
    embedder = None if model is None else Embedder(model, tokenizer, dense_batch_size)
    extras = _IndexExtras(embedder)
    key = _build_key(corpus, tokenizer, n, extras, backend)
    # a corpus without a stable fingerprint: another build every time (never the same run)
    identity = {"index": key or f"unverifiable corpus, {os.getpid()}-{time.time_ns()}", "processes": world}
    if not overwrite and key is not None and _manifest_of(out).get("build_key") == key:
        if rank == 0:
            Output.check(out, None, overwrite, INDEX)  # nothing foreign beside it
        logger.info("%s already holds this index (same corpus, tokenizer and settings); --overwrite rebuilds it.", out)
        return CandidateIndex.load(out, tokenizer)
    if rank == 0:
        corpus.check()  # readable and not empty, before anything is written
    output, tmp = open_shared(out, identity, overwrite, INDEX)
    with output if output is not None else nullcontext():  # the main process's lock, released however it ends
        if rank == 0:
            for part in tmp.iterdir():  # what a build killed after its n-gram pass left; its checkpoint is kept
                if part.name not in (".ngram.build", OWN_MANIFEST):
                    shutil.rmtree(part, ignore_errors=True) if part.is_dir() else part.unlink(missing_ok=True)
        if world > 1:
            state.wait_for_everyone()
        more = {} if checkpoint_ngrams is None else {"checkpoint_ngrams": checkpoint_ngrams}
        documents, verbatim = _corpus_passes(corpus, tokenizer, tmp, backend, n, extras,
                                             dict(show_progress=show_progress, resume=resume, **more))
        if world > 1:
            state.wait_for_everyone()  # every process has opened the indexes before the directory moves
        if output is not None:
            _write_index(tmp, corpus, tokenizer, documents, embedder, verbatim, world, key, backend)
            output.finish()  # swapped in for an earlier index
    if world > 1:
        state.wait_for_everyone()
    return CandidateIndex.load(out, tokenizer)


def _write_index(tmp: Path, corpus: Corpus, tokenizer, documents: NgramIndex, embedder: Embedder | None,
                 verbatim: dict, world: int, key: str | None, backend: str) -> None:
    """Save BM25 (and the dense vectors) beside the verbatim index in ``tmp``, the manifest last (main process)."""
    n_bm25 = _save_bm25(tmp / "bm25", documents)
    dense = None if embedder is None else _save_dense(tmp / "dense", documents, embedder)
    if backend != "ngram":
        shutil.rmtree(tmp / "extras")  # the extras pass's per-document values, now in bm25/ and dense/
    manifest = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "tokenizer": tokenizer_key(tokenizer),
        "corpus": corpus.describe(),
        "corpus_fingerprint": corpus.fingerprint(),
        "n_documents": len(documents.doc_ids),
        "processes": world,
        "bm25": {"dir": "bm25", "documents": n_bm25, **BM25_PARAMS, "terms": "lowercase \\w+ words"},
        **verbatim,
        "dense": dense,
        "files": hash_files(tmp, sorted(p for d in ("bm25", "dense") for p in (tmp / d).rglob("*") if p.is_file())),
        "build_key": key,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def _corpus_passes(corpus: Corpus, tokenizer, tmp: Path, backend: str, n: int, extras: _IndexExtras,
                   options: dict) -> tuple[NgramIndex, dict]:
    """The build's passes over the corpus, into ``tmp``: every document's extras (BM25 words, vector) in an
    ``NgramIndex`` (with the n-gram postings for the n-gram backend; without them, in ``extras/``, for
    infini-gram, whose suffix array :meth:`InfiniGramIndex.build` makes) and the verbatim index's manifest entry."""
    if backend == "ngram":
        ngram = NgramIndex.build(corpus, tokenizer, n=n, output_dir=tmp / "ngram", extras=extras, **options)
        return ngram, {"ngram": {"dir": "ngram", "n": n, "ngrams": len(ngram)}}
    documents = NgramIndex.build(corpus, tokenizer, n=n, output_dir=tmp / "extras", extras=extras, postings=False,
                                 **options)
    part = VERBATIM_DIRS[backend]
    verbatim = InfiniGramIndex.build(corpus, tokenizer, tmp / part, n=n, show_progress=options["show_progress"])
    return documents, {"verbatim": {"backend": backend, "dir": part, "n": n,
                                    "tokens": verbatim.manifest["n_tokens"]}}


def _build_key(corpus: Corpus, tokenizer, n: int, extras: _IndexExtras, backend: str = "ngram") -> str | None:
    """What an index's content depends on: its n-gram part's, BM25's parameters, the verbatim backend (None: never
    reused)."""
    from hf_mirror.retrieval.ngram import build_key

    ngram = build_key(corpus, tokenizer, n, extras)
    if ngram is None:
        return None
    other = [] if backend == "ngram" else [backend]  # the n-gram layout's key as before: its indexes stay up to date
    return hashlib.sha256(json.dumps([INDEX_VERSION, BM25_PARAMS, ngram, *other]).encode()).hexdigest()[:16]


def _manifest_of(directory: Path) -> dict:
    """The manifest of a finished index in ``directory``, or {} (none, or unreadable)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _save_bm25(directory: Path, ngram: NgramIndex) -> int:
    """The BM25 index of the documents that have words (bm25s's own save) and their ids; returns their number."""
    words = ngram.extras.get("words", [])
    keep = [i for i, w in enumerate(words) if w is not None]
    ids = [ngram.doc_ids[i] for i in keep]
    directory.mkdir()
    if ids:
        BM25.index([words[i] for i in keep], **BM25_PARAMS).save(directory)
    (directory / "doc_ids.json").write_text(json.dumps(ids))
    return len(ids)


def _save_dense(directory: Path, ngram: NgramIndex, embedder: Embedder) -> dict:
    """Every document's vector as one ``.npy`` (opened memory-mapped) and their ids; returns its manifest entry."""
    directory.mkdir()
    vectors = np.stack(ngram.extras["vector"]).astype(np.float32)
    np.save(directory / "vectors.npy", vectors)
    (directory / "doc_ids.json").write_text(json.dumps(ngram.doc_ids))
    return {"dir": directory.name, "dim": int(vectors.shape[1]), "model_weights": embedder.weights,
            "pooling": "mean of the last hidden states over the document's tokens", "max_length": embedder.max_length}
