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
never leaves a directory that loads as a valid index; the build checkpoints its work in progress next to it
(``.<name>.build/``) and a rerun resumes from there. Under ``accelerate launch``/``torchrun`` every process
indexes its share of the corpus and the main process merges the parts into the single-process index.

Matching is on tokens: a text that contains a document verbatim may still tokenise differently at its edges,
which costs at most a token or two per span.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_mirror.cache import tokenizer_fingerprint, verified_stamps
from hf_mirror.corpus import Corpus
from hf_mirror.distributed import launched_world, process_state
from hf_mirror.errors import InputError
from hf_mirror.integrity import check_hashes, hash_files, remove_dead_writers, writer_dir
from hf_mirror.progress import progress_bar

NGRAM = 13  # the n-gram length of every verbatim index, audit and provenance check by default (GPT-3's 13-grams)
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FORMAT = "hf_mirror.index"  # the top-level manifest of `hf-mirror index` (hf_mirror.retrieval.index)
_REBUILD = ("`hf-mirror index --overwrite --output INDEX_DIR` (the directory given to --index), or "
            "NgramIndex.build(corpus, tokenizer, output_dir=..., overwrite=True)")
_ARRAYS = ("hashes", "docs", "offsets")
_FLUSH_TOKENS = 1 << 20  # checkpoint (or concatenate, in memory) the postings every ~1M n-grams
_DTYPES = {"hashes": np.uint64, "docs": np.uint32, "offsets": np.uint32}
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
        *,
        hashes: np.ndarray,
        docs: np.ndarray,
        offsets: np.ndarray,
        doc_ids: list,
        manifest: dict,
    ) -> None:
        self.tokenizer, self.n = tokenizer, n
        self.hashes, self.docs, self.offsets = hashes, docs, offsets
        self.doc_ids, self.manifest = doc_ids, manifest
        self.extras: dict[str, list] = {}  # per-document values of a build's Extras, in corpus order (main process)

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
        n: int = NGRAM,
        output_dir: str | Path | None = None,
        overwrite: bool = False,
        show_progress: bool = False,
        resume: bool = True,
        checkpoint_ngrams: int = _FLUSH_TOKENS,
        extras: Extras | None = None,
        postings: bool = True,
    ) -> NgramIndex:
        """Index every ``n``-token n-gram of ``corpus`` in one streaming pass; save it when ``output_dir`` is given.

        Under ``accelerate launch`` / ``torchrun`` each process indexes its share of the corpus
        (``Corpus.documents(rank, world)``) and the main process merges the parts into the same index a single
        process builds (``output_dir`` is then required and must be visible to every process).

        With ``output_dir``, work in progress is checkpointed every ``checkpoint_ngrams`` n-grams to a hidden
        sibling directory ``.<name>.build/``; a build interrupted (exception, SIGKILL) resumes from its last
        checkpoint when rerun on the same corpus, tokenizer, ``n`` and number of processes, and restarts
        cleanly otherwise (``resume=False`` always restarts). The index itself is only ever written whole.

        ``extras`` computes more per-document values in the same pass (:class:`Extras`: the BM25 words, a dense
        vector); they are checkpointed with the postings and merged in corpus order into ``index.extras`` on the
        main process. ``postings=False`` runs only that extras pass: no tokenizer, no n-grams (the index is empty;
        what ``hf-mirror index --backend infini-gram`` uses, its verbatim index being a suffix array).
        """
        if n < 1:
            raise InputError(f"n must be a positive number of tokens, got {n}.")
        if checkpoint_ngrams < 1:
            raise InputError(f"checkpoint_ngrams must be positive, got {checkpoint_ngrams}.")
        if not isinstance(corpus, Corpus):
            corpus = Corpus(corpus)
        rank, world, state = process_group()
        if world > 1 and output_dir is None:
            raise InputError("Pass an output directory when building an n-gram index on several processes.")
        out = None if output_dir is None else Path(output_dir)
        fingerprint = corpus.fingerprint()
        built = build_key(corpus, tokenizer, n, extras, postings)  # what the index holds (None: no resume, no reuse)
        key = _digest([built, world])  # what its checkpoints hold
        work = None if out is None else out.parent / f".{out.name}.build"
        if out is not None and not overwrite and extras is None and built is not None and _built(out, built):
            # the same build finished earlier (a rerun after a kill between publishing and clean-up, or a rerun)
            if world > 1:
                state.wait_for_everyone()  # every process has seen the finished index before the clean-up
            if rank == 0:
                remove_finished_checkpoint(out, built)
            return cls.load(out, tokenizer)
        if out is not None and rank == 0:
            check_target(out, overwrite)
        if out is not None and world > 1:
            state.wait_for_everyone()
        part = _Part(None if work is None else work / f"rank-{rank:05d}-of-{world:05d}", key,
                     resume and fingerprint is not None)
        _read_share(part, corpus, tokenizer, n, rank, world, extras, postings, checkpoint_ngrams, show_progress)
        part.checkpoint(done=True)
        if world > 1:
            state.wait_for_everyone()
        if rank == 0:
            parts = [part] if world == 1 else [
                _Part(work / f"rank-{r:05d}-of-{world:05d}", key, True, must_exist=True) for r in range(world)]
            index = cls._merged(parts, corpus, tokenizer, n, world, built)
            if out is not None:
                index.save(out, overwrite=overwrite)
                shutil.rmtree(work, ignore_errors=True)
        if world > 1:
            state.wait_for_everyone()
            if rank != 0:
                index = cls.load(out, tokenizer)
        return index

    @classmethod
    def _merged(cls, parts: list[_Part], corpus: Corpus, tokenizer, n: int, world: int,
                built: str | None) -> NgramIndex:
        """The processes' parts as one index (documents in corpus order), with its manifest and extras."""
        arrays, doc_ids, n_tokens, extras = _merge(parts, corpus, world)
        manifest = {**verbatim_manifest("hf_mirror.ngram_index", FORMAT_VERSION, n, tokenizer, corpus, len(doc_ids),
                                        n_tokens), "n_ngrams": len(arrays["hashes"]), "build_key": built}
        index = cls(tokenizer, n, hashes=arrays["hashes"], docs=arrays["docs"], offsets=arrays["offsets"],
                    doc_ids=doc_ids, manifest=manifest)
        index.extras = extras
        return index

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the index to ``directory`` atomically (temporary directory, manifest last, then rename)."""
        target = check_target(Path(directory), overwrite)
        remove_dead_writers(target)
        tmp = writer_dir(target, "tmp")
        try:
            for name in _ARRAYS:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
            (tmp / "doc_ids.json").write_text(json.dumps(self.doc_ids))
            files = hash_files(tmp, [tmp / f"{name}.npy" for name in _ARRAYS] + [tmp / "doc_ids.json"])
            self.manifest = {**self.manifest, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2, default=str))
            publish(tmp, target)
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
                f"another kind of directory. Rebuild it: {_REBUILD}."
            )
        try:
            manifest = json.loads(path.read_bytes().decode("utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 decoding (corrupt bytes)
            raise InputError(f"{path} is damaged ({type(e).__name__}: {e}); rebuild the index: {_REBUILD}.") from e
        if manifest.get("format") == INDEX_FORMAT:  # `hf-mirror index`: its verbatim part
            backend, part = verbatim_part(directory, manifest)
            if backend != "ngram":
                raise InputError(f"{directory} holds a {backend} verbatim index ({part}), not an n-gram index; open "
                                 "it with hf_mirror.provenance.load_index (audit/provenance --index do).")
            return cls.load(part, tokenizer, mmap)
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
            # older indexes have no checksums: the counts below only
            check_hashes(directory, manifest.get("files", {}), verified_stamps(directory))
            arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r" if mmap else None) for k in _ARRAYS}
            doc_ids = json.loads((directory / "doc_ids.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"The n-gram index in {directory} is damaged ({e}); rebuild it: {_REBUILD}.") from e
        sizes = {len(a) for a in arrays.values()}
        if sizes != {manifest["n_ngrams"]} or len(doc_ids) != manifest["n_documents"]:
            raise InputError(
                f"The n-gram index in {directory} does not match its manifest's counts; rebuild it with "
                "NgramIndex.build."
            )
        return cls(tokenizer, int(manifest["n"]), hashes=arrays["hashes"], docs=arrays["docs"],
                   offsets=arrays["offsets"], doc_ids=doc_ids, manifest=manifest)

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


class Extras:
    """More values per document, computed in the n-gram build's pass (see ``NgramIndex.build``).

    A subclass sets ``key`` (JSON-able: what decides the values, so that a checkpoint made with other extras is not
    resumed), ``arrays`` (names whose values are numpy vectors, stacked per chunk; the other names are stored as
    JSON) and ``batch_size`` (documents per call), and maps a batch of ``(doc_id, text, token_ids)`` to one dict
    of values per document.
    """

    key: object = None
    arrays: tuple[str, ...] = ()
    batch_size: int = 1

    def __call__(self, batch: list[tuple[object, str, list[int]]]) -> list[dict]:
        raise NotImplementedError


def _read_share(part: _Part, corpus: Corpus, tokenizer, n: int, rank: int, world: int, extras: Extras | None,
                postings: bool, checkpoint_ngrams: int, show_progress: bool) -> None:
    """Stream this process's share of the corpus into ``part`` (after the documents it already holds), n-gram
    hashes and extras by batches, checkpointing every ``checkpoint_ngrams`` n-grams."""
    bar = progress_bar(desc="indexing n-grams" if postings else "reading documents", unit="doc",
                       disable=not show_progress or rank != 0)
    bar.update(part.n_docs)
    docs = itertools.islice(corpus.documents(rank, world), part.n_docs, None)
    batch: list[tuple[object, str, list[int]]] = []

    def flush() -> None:
        values = extras(batch) if extras is not None else [None] * len(batch)
        for (doc_id, _, ids), extra in zip(batch, values, strict=True):
            part.add(doc_id, ngram_hashes(ids, n), len(ids), extra)
            if part.n_pending >= checkpoint_ngrams:
                part.checkpoint()
        bar.update(len(batch))
        batch.clear()

    for doc_id, text in docs:
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise InputError(f"Document {doc_id!r} is a {type(text).__name__}, not text; pick the text column.")
        batch.append((doc_id, text, tokenizer(text, add_special_tokens=False)["input_ids"] if postings else []))
        if len(batch) >= (1 if extras is None else extras.batch_size):
            flush()
    flush()
    bar.close()


def process_group():
    """``(rank, world, PartialState or None)``: the accelerate/torchrun process group, if launched in one."""
    if launched_world() <= 1:
        return 0, 1, None
    state = process_state()
    return state.process_index, state.num_processes, state


class _Part:
    """One process's share of a build: postings in chunks, checkpointed to ``directory`` (when given).

    ``directory/progress.json`` (written atomically, after the chunk it names) records the build key, the chunks
    written, and how many documents and tokens they cover; a rerun with the same key continues after them.
    """

    def __init__(self, directory: Path | None, key: str, resume: bool, must_exist: bool = False) -> None:
        self.directory, self.key = directory, key
        self.chunks: list[dict[str, np.ndarray]] = []  # in memory when there is no directory
        self.chunk_files: list[str] = []
        self.doc_ids: list = []  # of the documents not yet checkpointed
        self.n_docs = self.n_tokens = self.n_pending = 0
        self.pending: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS}
        self.pending_extras: dict[str, list] = {}
        if directory is None:
            return
        progress = directory / "progress.json"
        state = None
        if progress.is_file():
            try:
                state = json.loads(progress.read_text())
            except json.JSONDecodeError:
                state = None
        if must_exist and not (state and state.get("key") == key and state.get("done")):
            raise InputError(f"The n-gram index part in {directory} is missing or unfinished; rebuild the index.")
        if resume and state and state.get("key") == key and all((directory / f).is_file() for f in state["chunks"]):
            self.chunk_files, self.n_docs, self.n_tokens = state["chunks"], state["n_docs"], state["n_tokens"]
        else:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)

    def add(self, doc_id: object, hashes: np.ndarray, n_tokens: int, extra: dict | None = None) -> None:
        local = self.n_docs + len(self.doc_ids)
        if local >= np.iinfo(np.uint32).max:
            raise InputError("Too many documents for one n-gram index (at most 2**32 - 1); split the corpus.")
        for name, value in (extra or {}).items():
            self.pending_extras.setdefault(name, []).append(value)
        self.doc_ids.append(jsonable_id(doc_id))
        self.n_tokens += n_tokens
        if len(hashes):
            self.pending["hashes"].append(hashes)
            self.pending["docs"].append(np.full(len(hashes), local, dtype=np.uint32))
            self.pending["offsets"].append(np.arange(len(hashes), dtype=np.uint32))
            self.n_pending += len(hashes)

    def checkpoint(self, done: bool = False) -> None:
        chunk = {k: np.concatenate(v) if v else np.zeros(0, dtype=_DTYPES[k]) for k, v in self.pending.items()}
        for v in self.pending.values():
            v.clear()
        ids, self.doc_ids = self.doc_ids, []
        extras, self.pending_extras = self.pending_extras, {}
        if any(len(v) != len(ids) for v in extras.values()):
            raise AssertionError("every document of an n-gram build must have the same extras")
        self.n_pending = 0
        if self.directory is None:
            self.chunks.append({**chunk, "doc_ids": ids, "extras": extras})
            self.n_docs += len(ids)
            return
        if ids or not self.chunk_files:
            name = f"chunk-{len(self.chunk_files):06d}.npz"
            tmp = self.directory / (name + ".tmp")
            stored = {f"extra_array_{k}": np.stack(v) for k, v in extras.items()
                      if v and isinstance(v[0], np.ndarray)}
            as_json = {k: v for k, v in extras.items() if f"extra_array_{k}" not in stored}
            with open(tmp, "wb") as f:
                np.savez(f, **chunk, **stored, doc_ids=np.array(json.dumps(ids)),
                         extra_json=np.array(json.dumps(as_json)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / name)
            self.chunk_files.append(name)
            self.n_docs += len(ids)
        state = {"key": self.key, "chunks": self.chunk_files, "n_docs": self.n_docs, "n_tokens": self.n_tokens,
                 "done": done}
        tmp = self.directory / "progress.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.directory / "progress.json")

    def load_chunks(self) -> list[dict]:
        if self.directory is None:
            return self.chunks
        out = []
        for name in self.chunk_files:
            with np.load(self.directory / name) as z:
                extras = json.loads(str(z["extra_json"])) if "extra_json" in z.files else {}
                extras.update({k[len("extra_array_"):]: list(z[k]) for k in z.files if k.startswith("extra_array_")})
                out.append({**{k: z[k] for k in _ARRAYS}, "doc_ids": json.loads(str(z["doc_ids"])),
                            "extras": extras})
        return out


def _merge(parts: list[_Part], corpus: Corpus, world: int) -> tuple[dict[str, np.ndarray], list, int, dict]:
    """The parts' postings as one index, documents numbered in corpus order (as a single-process build), and
    the documents' extras in that order."""
    loaded = [p.load_chunks() for p in parts]
    local_ids = [[d for c in chunks for d in c["doc_ids"]] for chunks in loaded]
    positions = _corpus_positions(corpus, local_ids, world)
    order = np.argsort(np.concatenate(positions), kind="stable") if positions else np.zeros(0, dtype=np.int64)
    all_ids = [d for ids in local_ids for d in ids]
    doc_ids = [all_ids[i] for i in order]
    names = {k for chunks in loaded for c in chunks for k in c.get("extras", {})}
    extras = {}
    for k in sorted(names):
        values = [v for chunks in loaded for c in chunks for v in c["extras"].get(k, [None] * len(c["doc_ids"]))]
        extras[k] = [values[i] for i in order]
    new_number = np.empty(len(order), dtype=np.uint32)
    new_number[order] = np.arange(len(order), dtype=np.uint32)
    columns: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS}
    base = 0
    for chunks, ids in zip(loaded, local_ids, strict=True):
        for c in chunks:
            columns["hashes"].append(c["hashes"])
            columns["docs"].append(new_number[base + c["docs"].astype(np.int64)])
            columns["offsets"].append(c["offsets"])
        base += len(ids)
    arrays = {k: np.concatenate(v) if v else np.zeros(0, dtype=_DTYPES[k]) for k, v in columns.items()}
    # postings sorted by n-gram hash, then document (corpus order), then offset: what a one-pass build gives
    perm = np.lexsort((arrays["offsets"], arrays["docs"], arrays["hashes"]))
    arrays = {k: v[perm] for k, v in arrays.items()}
    return arrays, doc_ids, sum(p.n_tokens for p in parts), extras


def _corpus_positions(corpus: Corpus, local_ids: list[list], world: int) -> list[np.ndarray]:
    """Each process's documents' positions in the corpus stream, mirroring ``Corpus.documents`` sharding."""
    if world == 1:
        return [np.arange(len(local_ids[0]), dtype=np.int64)]
    by_example = corpus.id_column is None or corpus.stream().num_shards % world != 0
    if by_example:  # process r holds documents r, r + world, r + 2 world, ...
        return [r + world * np.arange(len(ids), dtype=np.int64) for r, ids in enumerate(local_ids)]
    # split by shards (files): recover the order from one pass over the id column
    where: dict[object, list[int]] = {}
    for pos, (doc_id, _) in enumerate(corpus.documents()):
        where.setdefault(jsonable_id(doc_id), []).append(pos)
    taken: dict[object, int] = {}
    out = []
    for ids in local_ids:
        pos = np.empty(len(ids), dtype=np.int64)
        for i, d in enumerate(ids):
            k = taken.get(d, 0)
            pos[i] = where[d][k]
            taken[d] = k + 1
        out.append(pos)
    return out


def publish(tmp: Path, target: Path) -> None:
    """Move the finished index in ``tmp`` to ``target`` by renames, replacing an earlier index there: a reader
    sees the old index or the new one, never a mix."""
    remove_dead_writers(target)
    old = None
    if target.exists():
        old = writer_dir(target, "old")
        os.replace(target, old / "index")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_key(corpus: Corpus, tokenizer, n: int, extras: Extras | None = None, postings: bool = True) -> str | None:
    """What an n-gram index's content depends on (its manifest's ``build_key``); None for a corpus without a
    stable fingerprint (such an index is never taken as up to date)."""
    fingerprint = corpus.fingerprint()
    if fingerprint is None:
        return None
    return _digest([FORMAT_VERSION, n, tokenizer_fingerprint(tokenizer), corpus.describe(), fingerprint,
                    None if extras is None else extras.key, *([] if postings else ["no postings"])])


def verbatim_part(directory: str | Path, manifest: dict) -> tuple[str, Path]:
    """The verbatim index inside an ``hf-mirror index`` directory (manifest format ``INDEX_FORMAT``): its backend
    ("ngram", "infini-gram") and folder. A manifest without a "verbatim" entry is the n-gram layout (``ngram/``)."""
    part = manifest.get("verbatim")
    if not isinstance(part, dict):
        part = {"backend": "ngram", "dir": (manifest.get("ngram") or {}).get("dir", "ngram")}
    return str(part.get("backend")), Path(directory) / str(part.get("dir"))


def remove_finished_checkpoint(directory: Path, key: str | None) -> None:
    """Delete the build checkpoint beside ``directory`` when ``directory`` holds the finished index of build
    ``key``: what a kill after publishing and before the clean-up leaves."""
    work = directory.parent / f".{directory.name}.build"
    if key is not None and work.exists() and _built(directory, key):
        shutil.rmtree(work, ignore_errors=True)


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _built(directory: Path, key: str) -> bool:
    """Whether ``directory`` holds a finished n-gram index of the build ``key``."""
    try:
        return json.loads((directory / MANIFEST).read_text()).get("build_key") == key
    except (OSError, ValueError, AttributeError):
        return False


def verbatim_manifest(kind: str, version: int, n: int, tokenizer, corpus: Corpus, n_documents: int,
                      n_tokens: int) -> dict:
    """What every verbatim index's manifest says first: its format, n, tokenizer, corpus and counts."""
    return {"format": kind, "version": version, "n": n, "tokenizer": tokenizer_fingerprint(tokenizer),
            "corpus": corpus.describe(), "corpus_fingerprint": corpus.fingerprint(), "n_documents": n_documents,
            "n_tokens": n_tokens}


def jsonable_id(doc_id: object) -> object:
    if isinstance(doc_id, (str, int, float, bool)) or doc_id is None:
        return doc_id
    if isinstance(doc_id, np.generic):
        return doc_id.item()
    return str(doc_id)


def check_target(directory: Path, overwrite: bool) -> Path:
    """``directory``, refused when it holds something and ``overwrite`` is not set."""
    if directory.exists() and not overwrite and (not directory.is_dir() or any(directory.iterdir())):
        raise InputError(f"{directory} already exists and is not empty; pass --overwrite (overwrite=True in Python) "
                         "or choose another path.")
    return directory
