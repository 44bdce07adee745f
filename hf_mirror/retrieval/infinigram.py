"""An optional infini-gram backend for the verbatim index: a suffix array of the tokenised corpus.

``NgramIndex`` stores every n-gram of one fixed ``n`` with its postings, which grows with ``n`` times the corpus.
``InfiniGramIndex`` stores the corpus tokens once plus a suffix array over them (infini-gram, Liu et al. 2024),
about 7 bytes per token for a 16-bit vocabulary, and answers matches of any length; it is meant for corpora too
large for the n-gram index. It needs ``pip install 'hf_mirror[infinigram]'`` (infini-gram 2.6.0).
Vocabularies over 65535 tokens are stored as 32-bit ids, for which infini-gram's indexer allocates 32 GiB of
memory whatever the corpus size. On disk::

    tokenized.0    each document as a separator (0xffff, or 0xffffffff for vocabularies over 65535 tokens)
                   followed by its token ids, little-endian uint16 (uint32)
    offset.0       uint64 byte offset of each document in tokenized.0
    table.0        the suffix array (infini-gram's format; built by its bundled ``rust_indexing``)
    doc_ids.json   document ids, in corpus order
    manifest.json  backend, tokenizer fingerprint, default n, corpus description, counts (written last)

Like ``NgramIndex``, the index is built in a temporary sibling directory, manifest last, and renamed into place,
so an interrupted build never loads as valid; there is no checkpoint to resume from, a rerun starts over.
``hf-mirror index --backend infini-gram`` (``hf_mirror.retrieval.build_index``) builds one as the ``infinigram/``
folder of its candidate index, beside BM25 (``load_index`` and ``CandidateIndex.verbatim`` open it there). The
build runs in one process: under ``accelerate launch``/``torchrun`` the main process builds while the others wait
at a barrier (so a build longer than the process group's timeout should be run without a launcher), then every
process opens it.

``find`` gives the same ``NgramMatch`` as ``NgramIndex.find`` with the same ``n`` (up to that index's hash
collisions and ``max_postings`` truncation), and ``n`` can be chosen per query.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from hf_mirror.cache import tokenizer_fingerprint, verified_stamps
from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError, RunError
from hf_mirror.integrity import check_hashes, hash_files, remove_dead_writers, writer_dir
from hf_mirror.progress import progress_bar
from hf_mirror.retrieval.ngram import (
    INDEX_FORMAT,
    MANIFEST,
    NGRAM,
    NgramIndex,
    NgramMatch,
    Occurrence,
    Span,
    check_target,
    jsonable_id,
    process_group,
    publish,
    verbatim_manifest,
    verbatim_part,
)

FORMAT = "hf_mirror.infinigram_index"
FORMAT_VERSION = 1
BACKEND = "infini-gram"
INSTALL_HINT = "pip install 'hf_mirror[infinigram]'"
_FILES = ("tokenized.0", "offset.0", "table.0")
_HACK = 100_000  # bytes of overlap between suffix-array parts (infini-gram's indexing.py uses the same)
_SCAN_LIMIT = 1 << 20  # at most this many occurrences of one span are located and sorted into corpus order
# infini-gram's engine classifies the files of its index directory by these substrings of their full path
_ENGINE_KEYWORDS = ("tokenized", "table", "offset", "metadata", "metaoff", "unigram")


def require_infini_gram():
    """The ``infini_gram`` package, or a clear error naming the install command."""
    try:
        import infini_gram
        from infini_gram.engine import InfiniGramEngine  # noqa: F401
    except ImportError as e:
        raise InputError(f"The infini-gram backend needs the infini-gram package: {INSTALL_HINT}") from e
    return infini_gram


def _dtype_for(vocab_size: int, token_dtype: str | None) -> str:
    if token_dtype is None:
        return "u16" if vocab_size <= 0xFFFF else "u32"
    if token_dtype not in ("u16", "u32"):
        raise InputError(f"token_dtype must be 'u16' or 'u32', got {token_dtype!r}.")
    if token_dtype == "u16" and vocab_size > 0xFFFF:
        raise InputError(f"A vocabulary of {vocab_size} tokens does not fit token_dtype='u16'; use 'u32'.")
    return token_dtype


class InfiniGramIndex:
    """A suffix-array index of a corpus (infini-gram). Build with ``build``, reopen with ``load``.

    ``n`` is the default minimum span length of ``find`` (any length can be queried); ``manifest`` and
    ``doc_ids`` are as in ``NgramIndex``.
    """

    def __init__(self, tokenizer, directory: Path, *, doc_ids: list, manifest: dict, engine) -> None:
        self.tokenizer, self.directory = tokenizer, Path(directory)
        self.doc_ids, self.manifest = doc_ids, manifest
        self.n = int(manifest["n"])
        self._engine = engine
        self._width = 2 if manifest["token_dtype"] == "u16" else 4
        self._table = np.memmap(self.directory / "table.0", dtype=np.uint8, mode="r")
        self._ptr_size = int(manifest["ptr_size"])
        self._doc_starts = np.memmap(self.directory / "offset.0", dtype=np.uint64, mode="r")

    def __len__(self) -> int:
        """Number of token positions in the suffix array (tokens plus one separator per document)."""
        return len(self._table) // self._ptr_size

    def __repr__(self) -> str:
        m = self.manifest
        return f"InfiniGramIndex(n={self.n}, documents={m['n_documents']}, tokens={m['n_tokens']})"

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        corpus: Corpus | list[str],
        tokenizer,
        output_dir: str | Path,
        n: int = NGRAM,
        overwrite: bool = False,
        show_progress: bool = False,
        cpus: int | None = None,
        mem_gb: float | None = None,
        token_dtype: str | None = None,
        batch_size: int = 1000,
    ) -> InfiniGramIndex:
        """Tokenise ``corpus`` in one streaming pass, build its suffix array in ``output_dir`` and open it.

        ``n`` is stored as the default minimum span length of ``find``. ``cpus`` (default: all) and ``mem_gb``
        (default: half the machine's memory) size infini-gram's parallel suffix-array jobs; ``token_dtype``
        ('u16' or 'u32') defaults to the narrowest that holds the vocabulary.
        """
        infini_gram = require_infini_gram()
        if n < 1:
            raise InputError(f"n must be a positive number of tokens, got {n}.")
        if not isinstance(corpus, Corpus):
            corpus = Corpus(corpus)
        out = Path(output_dir)
        rank, world, state = process_group()
        if rank == 0:
            try:  # the other processes wait for this one even when it fails (then they fail to load)
                check_target(out, overwrite)
                cls._build(infini_gram, corpus, tokenizer, out, n, show_progress, cpus, mem_gb,
                           token_dtype, batch_size)
            finally:
                if world > 1:
                    state.wait_for_everyone()
        elif world > 1:
            state.wait_for_everyone()
        return cls.load(out, tokenizer)

    @classmethod
    def _build(cls, infini_gram, corpus: Corpus, tokenizer, out: Path, n: int, show_progress: bool,
               cpus: int | None, mem_gb: float | None, token_dtype: str | None,
               batch_size: int) -> None:
        dtype = _dtype_for(len(tokenizer), token_dtype)
        width = 2 if dtype == "u16" else 4
        remove_dead_writers(out)
        tmp = writer_dir(out, "tmp")
        try:
            doc_ids, n_tokens = _write_tokens(corpus, tokenizer, tmp, dtype, batch_size, show_progress)
            if not doc_ids:
                raise InputError("The corpus has no documents; there is nothing to index.")
            ds_size = (tmp / "tokenized.0").stat().st_size
            ptr_size = max(1, int(np.ceil(np.log2(ds_size) / 8)))
            _suffix_array(Path(infini_gram.__file__).parent / "rust_indexing", tmp, width, ptr_size,
                          cpus or os.cpu_count() or 1, _mem_bytes(mem_gb))
            (tmp / "doc_ids.json").write_text(json.dumps(doc_ids))
            manifest = {
                **verbatim_manifest(FORMAT, FORMAT_VERSION, n, tokenizer, corpus, len(doc_ids), n_tokens),
                "backend": BACKEND,
                "infini_gram": _package_version(),
                "token_dtype": dtype,
                "ptr_size": ptr_size,
                "vocab_size": len(tokenizer),
                "eos_token_id": tokenizer.eos_token_id,
                "files": hash_files(tmp, [tmp / name for name in (*_FILES, "doc_ids.json")]),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, directory: str | Path, tokenizer, output: str | Path | None = None) -> InfiniGramIndex:
        """Open an index saved by ``build``; refuse an incomplete one or one built for another tokenizer.

        ``output``: the ``hf-mirror index --output`` directory that holds it (default ``directory``), which the
        rebuild hint of an error names.
        """
        directory = Path(directory)
        path = directory / MANIFEST
        python = ("InfiniGramIndex.build(corpus, tokenizer, output_dir, overwrite=True)" if output is None else
                  "hf_mirror.retrieval.build_index(corpus, tokenizer, output_dir, backend='infini-gram', "
                  "overwrite=True)")
        rebuild = (f"rebuild it with `hf-mirror index --backend infini-gram --overwrite --output "
                   f"{output or directory}` or {python}")
        if not path.is_file():
            raise InputError(f"{directory} is not a complete infini-gram index (no {MANIFEST}): its build was "
                             f"interrupted or it is another kind of directory; {rebuild}.")
        try:
            manifest = json.loads(path.read_bytes().decode("utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 decoding (corrupt bytes)
            raise InputError(f"{path} is damaged ({type(e).__name__}: {e}); {rebuild}.") from e
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise InputError(f"{directory} holds format {manifest.get('format')!r} version "
                             f"{manifest.get('version')!r}, not an hf_mirror infini-gram index version "
                             f"{FORMAT_VERSION}; open it with hf_mirror.provenance.load_index, or {rebuild}.")
        fp = tokenizer_fingerprint(tokenizer)
        if manifest["tokenizer"] != fp:
            raise InputError(
                f"The infini-gram index in {directory} was built with another tokenizer (fingerprint "
                f"{manifest['tokenizer']}, this one is {fp}); load it with the tokenizer it was built with, or "
                f"{rebuild} for this tokenizer.")
        require_infini_gram()
        try:
            # older indexes have no checksums: the counts below only
            check_hashes(directory, manifest.get("files", {}), verified_stamps(directory))
            doc_ids = json.loads((directory / "doc_ids.json").read_text())
            sizes = {name: (directory / name).stat().st_size for name in _FILES}
        except (OSError, ValueError) as e:
            raise InputError(f"The infini-gram index in {directory} is damaged ({e}); {rebuild}.") from e
        width = 2 if manifest["token_dtype"] == "u16" else 4
        positions = sizes["tokenized.0"] // width
        if (len(doc_ids) != manifest["n_documents"] or sizes["offset.0"] != 8 * len(doc_ids)
                or sizes["table.0"] != positions * manifest["ptr_size"]
                or positions != manifest["n_tokens"] + manifest["n_documents"]):
            raise InputError(f"The infini-gram index in {directory} does not match its manifest's counts; "
                             f"{rebuild}.")
        return cls(tokenizer, directory, doc_ids=doc_ids, manifest=manifest, engine=_open_engine(directory, manifest))

    # ---------------------------------------------------------------- querying
    def _ids(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def _segment(self, ids: list[int]) -> tuple[int, int]:
        """Suffix-array rank range ``[lo, hi)`` of the suffixes that start with ``ids``."""
        res = self._engine.find(input_ids=ids)
        if "error" in res:  # the engine reports bad input in the result instead of raising
            raise InputError(f"infini-gram refused the query: {res['error']}")
        return res["segment_by_shard"][0]

    def _occurs(self, ids: list[int]) -> bool:
        lo, hi = self._segment(ids)
        return hi > lo

    def count(self, text: str) -> int:
        """How many times the tokens of ``text`` occur verbatim in the corpus (0 for a text with no tokens)."""
        ids = self._ids(text)
        if not ids:
            return 0
        lo, hi = self._segment(ids)
        return int(hi - lo)

    def _locate(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(document index, token offset) of the suffix-array ranks ``[lo, hi)``, sorted in corpus order."""
        hi = min(hi, lo + _SCAN_LIMIT)
        raw = np.asarray(self._table[lo * self._ptr_size: hi * self._ptr_size]).reshape(-1, self._ptr_size)
        ptrs = (raw.astype(np.uint64) << (np.uint64(8) * np.arange(self._ptr_size, dtype=np.uint64))).sum(
            axis=1, dtype=np.uint64)
        ptrs.sort()  # byte offsets in the corpus: sorting them puts occurrences in (document, offset) order
        docs = np.searchsorted(self._doc_starts, ptrs, side="right") - 1
        offsets = (ptrs - self._doc_starts[docs]) // np.uint64(self._width) - np.uint64(1)  # skip the separator
        return docs.astype(np.int64), offsets.astype(np.int64)

    def find(self, text: str, n: int | None = None, max_postings: int = 1000) -> NgramMatch:
        """The longest spans of ``text`` of at least ``n`` tokens found verbatim in the corpus, and its coverage.

        ``n`` defaults to the index's ``n``. As ``NgramIndex.find``: every span is maximal (no occurrence of it
        extends it on either side) and not contained in a longer span; its occurrences are listed in corpus order
        (at most ``max_postings``; of a span found over 2**20 times, those among the first 2**20 in suffix-array
        order); ``coverage`` is the fraction of the text's tokens inside a found span.
        """
        n = self.n if n is None else n
        if n < 1:
            raise InputError(f"n must be a positive number of tokens, got {n}.")
        ids = self._ids(text)
        m = len(ids)
        covered = np.zeros(m, dtype=bool)
        # reach[i]: end of the longest match starting at i (>= i + n), or -1 when shorter than n. It never
        # decreases over the i with a match, so one extending pointer finds them all in O(m) queries.
        reach = np.full(m, -1, dtype=np.int64)
        end = 0  # ids[i:end] occurs in the corpus whenever end >= i + n
        for i in range(m - n + 1):
            if end < i + n:
                if not self._occurs(ids[i: i + n]):
                    continue
                end = i + n
            while end < m and self._occurs(ids[i: end + 1]):
                end += 1
            reach[i] = end
        spans = []
        for s in np.flatnonzero(reach >= 0).tolist():
            e = int(reach[s])
            if s > 0 and reach[s - 1] >= e:  # ids[s-1:e] occurs: the span starting at s is contained in it
                continue
            covered[s:e] = True
            lo, hi = self._segment(ids[s:e])
            docs, offsets = self._locate(lo, hi)
            occurrences = [Occurrence(self.doc_ids[d], o) for d, o in
                           zip(docs[:max_postings].tolist(), offsets[:max_postings].tolist(), strict=True)]
            spans.append(Span(s, e, self.tokenizer.decode(ids[s:e]), occurrences))
        spans.sort(key=lambda sp: (-sp.length, sp.start))
        return NgramMatch(m, float(covered.mean()) if m else 0.0, spans, covered)


def load_index(directory: str | Path, tokenizer) -> NgramIndex | InfiniGramIndex:
    """Open a verbatim index of either backend, dispatching on its manifest (``NgramIndex`` when unsure); of an
    ``hf-mirror index`` directory, its verbatim part (``ngram/`` or ``infinigram/``, as its manifest records).

    A manifest that cannot be read (truncated, empty, corrupt bytes, not an object) is an ``InputError`` naming it
    and the fix; a missing one is left to ``NgramIndex.load`` ("not a complete n-gram index").
    """
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
    except FileNotFoundError:
        manifest = {}
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 decoding
        raise InputError(f"{path} is damaged ({type(e).__name__}: {e}); rebuild the index with `hf-mirror index "
                         f"--overwrite --output {directory}` (add --backend infini-gram for an infini-gram index) "
                         "or delete it.") from e
    if manifest.get("format") == FORMAT:
        return InfiniGramIndex.load(directory, tokenizer)
    if manifest.get("format") == INDEX_FORMAT and verbatim_part(directory, manifest)[0] == BACKEND:
        return InfiniGramIndex.load(verbatim_part(directory, manifest)[1], tokenizer, output=directory)
    return NgramIndex.load(directory, tokenizer)


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("infini-gram")
    except PackageNotFoundError:
        return None


def _mem_bytes(mem_gb: float | None) -> int:
    if mem_gb is not None:
        if mem_gb <= 0:
            raise InputError(f"mem_gb must be positive, got {mem_gb}.")
        return int(mem_gb * 1024**3)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def _part_ranges(ds_size: int, width: int, cpus: int, mem_bytes: int, hack: int = _HACK) -> list[list[tuple]]:
    """Byte ranges of the ``make-part`` jobs, in batches of at most ``cpus`` parallel jobs.

    As infini-gram's ``indexing.py``: enough batches that each fits in ``mem_bytes``; each part overlaps the
    next by ``hack`` bytes. Parts are kept longer than ``2 * hack`` bytes: a part that reaches the end of the
    data while not being the last one would be indexed twice.
    """
    batches = 1
    while batches * max(1, mem_bytes // (12 if width == 1 else 8)) < ds_size:
        batches *= 2
    jobs = max(1, min(batches * cpus, ds_size // (2 * hack)))
    step = ds_size // jobs
    step += (-step) % width  # parts hold whole tokens
    ranges = [(i * step, min((i + 1) * step + hack, ds_size)) for i in range(jobs)]
    return [ranges[i: i + cpus] for i in range(0, jobs, cpus)]


def _suffix_array(binary: Path, directory: Path, width: int, ptr_size: int, cpus: int, mem_bytes: int,
                  hack: int = _HACK) -> None:
    """Build ``table.0`` from ``tokenized.0`` in ``directory`` with infini-gram's ``rust_indexing``."""
    data = directory / "tokenized.0"
    parts, merged = directory / "parts", directory / "merged"
    parts.mkdir()
    merged.mkdir()
    common = ["--ratio", str(ptr_size), "--token-width", str(width)]
    try:
        for batch in _part_ranges(data.stat().st_size, width, cpus, mem_bytes, hack):
            procs = [subprocess.Popen([str(binary), "make-part", "--data-file", str(data), "--parts-dir",
                                       str(parts), "--start-byte", str(s), "--end-byte", str(e), *common],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for s, e in batch]
            errors = [p.communicate()[1] for p in procs]
            for p, err in zip(procs, errors, strict=True):
                _check_step("make-part", p.returncode, err, width)
        _run_step(binary, "merge", "--data-file", str(data), "--parts-dir", str(parts), "--merged-dir",
                  str(merged), "--num-threads", str(cpus), "--hacksize", str(hack), *common)
        shutil.rmtree(parts)
        _run_step(binary, "concat", "--data-file", str(data), "--merged-dir", str(merged), "--merged-file",
                  str(directory / "table.0"), "--num-threads", str(cpus), *common)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
        shutil.rmtree(merged, ignore_errors=True)


def _run_step(binary: Path, step: str, *args: str) -> None:
    proc = subprocess.run([str(binary), step, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _check_step(step, proc.returncode, proc.stderr)


def _check_step(step: str, returncode: int, stderr: bytes, width: int = 2) -> None:
    if returncode != 0:
        tail = stderr.decode(errors="replace").strip()[-2000:]
        hint = " (with 32-bit tokens its make-part allocates 32 GiB whatever the corpus size)" if width == 4 else ""
        raise RunError(f"infini-gram's rust_indexing {step} failed (exit {returncode}); out of disk space or "
                           f"memory{hint}? {tail}")


def _open_engine(directory: Path, manifest: dict):
    """An ``InfiniGramEngine`` on the index files, opened through a directory of symlinks.

    The engine sorts the files of its index directory by substrings of their full path ('table', 'offset', ...),
    so an index under e.g. ``/data/offsets/`` or next to ``manifest.json`` would be misread (or crash it); the
    symlinks live in a fresh directory whose path has none of those substrings, removed once the engine has
    mapped the files.
    """
    from infini_gram.engine import InfiniGramEngine

    link_dir = None
    for parent in (tempfile.gettempdir(), "/dev/shm", "/tmp", str(Path.home())):
        if not os.path.isdir(parent) or any(k in os.path.abspath(parent) for k in _ENGINE_KEYWORDS):
            continue
        for _ in range(5):
            candidate = tempfile.mkdtemp(prefix="hf_mirror_ig_", dir=parent)
            if not any(k in candidate for k in _ENGINE_KEYWORDS):
                link_dir = candidate
                break
            os.rmdir(candidate)
        if link_dir is not None:
            break
    if link_dir is None:
        raise InputError("Found no temporary directory whose path avoids the words infini-gram's engine reserves "
                         f"{_ENGINE_KEYWORDS}; set TMPDIR to one.")
    try:
        for name in _FILES:
            os.symlink((directory / name).resolve(), os.path.join(link_dir, name))
        vocab = int(manifest["vocab_size"])
        dtype = manifest["token_dtype"]
        vocab = min(vocab, 0xFFFF) if dtype == "u16" else vocab
        eos = manifest.get("eos_token_id")
        eos = int(eos) if isinstance(eos, int) and 0 <= eos < vocab else 0
        return InfiniGramEngine(index_dir=link_dir, eos_token_id=eos, vocab_size=vocab, token_dtype=dtype)
    finally:
        shutil.rmtree(link_dir, ignore_errors=True)


def _write_tokens(corpus: Corpus, tokenizer, tmp: Path, dtype: str, batch_size: int,
                  show_progress: bool) -> tuple[list, int]:
    """Tokenise the corpus into infini-gram's ``tokenized.0`` (each document after a separator) and ``offset.0``
    (each document's byte offset); returns the document ids and the number of tokens."""
    np_dtype, width = (np.uint16, 2) if dtype == "u16" else (np.uint32, 4)
    sep = b"\xff" * width
    doc_ids: list = []
    n_tokens = pos = 0
    bar = progress_bar(desc="tokenizing for infini-gram", unit="doc", disable=not show_progress)
    with open(tmp / "tokenized.0", "wb") as ds, open(tmp / "offset.0", "wb") as od:
        batch: list[tuple[object, str]] = []

        def flush() -> None:
            nonlocal pos, n_tokens
            if not batch:
                return
            encoded = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
            starts = []
            for (doc_id, _), ids in zip(batch, encoded, strict=True):
                arr = np.asarray(ids, dtype=np.int64)
                if len(arr) and (arr.min() < 0 or arr.max() >= (1 << (8 * width)) - 1):
                    raise InputError(f"Document {doc_id!r} has token ids outside the {dtype} range; "
                                     "pass token_dtype='u32'.")
                ds.write(sep + arr.astype(np_dtype).tobytes())
                starts.append(pos)
                pos += width * (1 + len(arr))
                n_tokens += len(arr)
                doc_ids.append(jsonable_id(doc_id))
            od.write(np.asarray(starts, dtype=np.uint64).tobytes())
            bar.update(len(batch))
            batch.clear()

        for doc_id, text in corpus.documents():
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise InputError(f"Document {doc_id!r} is a {type(text).__name__}, not text; pick the text column.")
            batch.append((doc_id, text))
            if len(batch) >= batch_size:
                flush()
        flush()
    bar.close()
    return doc_ids, n_tokens
