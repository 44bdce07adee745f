"""Corpus: streaming load from any `datasets` source, per-process sharding, document ids, windowing."""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, Json, load_dataset, load_from_disk
from datasets.distributed import split_dataset_by_node

from hf_mirror.errors import InputError
from hf_mirror.probes import start_token_id

logger = logging.getLogger(__name__)
READ_BATCH = 1024  # rows read from the corpus stream at a time
NO_IDS = "none"  # id_column value that forces running indexes as document ids
DEFAULT_ID = "id"  # the field used for ids when no id_column is given

# file extension -> `datasets` builder name
FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


@dataclass
class Corpus:
    """Where the training documents come from and which columns hold text and ids.

    ``source`` is a Hub dataset name, a local file / glob / directory of files, a directory written by
    ``Dataset.save_to_disk``, a ``Dataset`` / ``IterableDataset``, or an in-memory list of strings or dicts.
    Document ids come from ``id_column``; without one, from the records' ``id`` field when they have one, else
    a document's id is its running index in the stream (0, 1, ...), stable for a corpus (with a warning).
    ``id_column="none"`` forces running indexes.
    """

    source: str | Path | Dataset | IterableDataset | list
    _: KW_ONLY
    text_column: str = "text"
    id_column: str | None = None
    split: str = "train"
    format: str | None = None
    name: str | None = None  # a Hub dataset's configuration
    extra: dict = field(default_factory=dict)  # more keyword arguments for `load_dataset`
    _warned: bool = field(default=False, init=False, repr=False, compare=False)
    _digests: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # file state -> content hash

    def __post_init__(self) -> None:
        if isinstance(self.source, (list, tuple)):
            rows = [{self.text_column: r} if not isinstance(r, dict) else r for r in self.source]
            self.source = Dataset.from_list(rows) if rows else Dataset.from_dict({self.text_column: []})

    def describe(self) -> dict:
        """A JSON-able description for config.json and cache keys."""
        src = self.source
        if isinstance(src, (Dataset, IterableDataset)):
            fp = getattr(src, "_fingerprint", None)
            src = f"<{type(src).__name__} fingerprint={fp}>"
        elif self._local(src):  # resolved: ./c.jsonl and its absolute path are the same corpus (resume, cache, index)
            src = Path(src).resolve()
        return {
            "source": str(src),
            "text_column": self.text_column,
            "id_column": self.id_column,
            "split": self.split,
            "format": self.format,
            "name": self.name,
        }

    def fingerprint(self) -> str | None:
        """Identifies the corpus content for resuming, caching and indexes, or None when it cannot be known.

        Local files: a sha256 of every byte of every file (with its path), so any edit changes it, whatever the
        file's size and even with its size and mtime kept. Computed once per file state (size, mtime, ctime, inode:
        a write always changes the ctime) and object. A ``Dataset``: its own fingerprint; a Hub dataset: its
        ``revision`` (None without one: it could change unseen); an ``IterableDataset`` (a generator): None.
        """
        src = self.source
        if isinstance(src, Dataset):
            return f"dataset:{src._fingerprint}"
        if isinstance(src, IterableDataset):
            return None
        files = self._files()
        if files:
            digests = []
            for path in files:
                st = path.stat()
                state = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                if state not in self._digests:
                    self._digests[state] = content_digest(path)
                digests.append((state[0], self._digests[state]))
            return "files:" + hashlib.sha256(repr(digests).encode()).hexdigest()[:20]
        revision = self.extra.get("revision")
        return None if revision is None else f"hub:{src}:{self.name}:{self.split}:{revision}"

    @staticmethod
    def _local(src: object) -> bool:
        """A path or glob on this machine (as :func:`_load_stream` reads it), not a Hub name or a dataset object."""
        return isinstance(src, (str, Path)) and (Path(src).exists() or any(ch in str(src) for ch in "*?["))

    def _files(self) -> list[Path]:
        """The local files of a path/glob/directory source ([] for other sources)."""
        src = self.source
        if isinstance(src, (Dataset, IterableDataset, DatasetDict, IterableDatasetDict)):
            return []
        path = Path(str(src))
        if any(ch in str(src) for ch in "*?["):
            return sorted(Path(p) for p in glob.glob(str(src), recursive=True) if Path(p).is_file())
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.is_file())
        return [path] if path.is_file() else []

    def check(self) -> None:
        """Validate before any fitting: text files are UTF-8 (naming the line), the columns exist, the corpus has a
        document with a non-empty text, and its ids are unique. Reads each local text file once and the id column
        once (nothing when ids are running positions)."""
        files = self._files()
        for path in files:
            suffixes = [x.lower() for x in path.suffixes]
            if (self.format or FORMATS.get(suffixes[-1] if suffixes else "")) in ("json", "text", "csv"):
                _check_utf8(path)
        try:
            first = next(iter(self.documents()), None)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"Cannot read the corpus {self.describe()['source']} ({type(e).__name__}: {e}).") from e
        if first is None:
            raise self._empty()
        if all(text is None or isinstance(text, str) and not text.strip() for _, text in self.documents()):
            raise InputError(f"Every document of the corpus {self.describe()['source']} has an empty text (column "
                             f"{self.text_column!r}); pass the column that holds the text with --text-column.")
        ids, seen = self._column_ids() or (), set()
        duplicates = list(itertools.islice((i for i in ids if i in seen or seen.add(i)), 5))
        if duplicates:
            more = f" (also {', '.join(map(repr, duplicates[1:]))})" if len(duplicates) > 1 else ""
            raise InputError(f"Duplicate document id {duplicates[0]!r}{more} in the corpus "
                             f"{self.describe()['source']}; ids must be unique. Pick a unique --id-column, or pass "
                             "--id-column none to use each document's running index.")

    def _empty(self) -> InputError:
        return InputError(f"The corpus {self.describe()['source']} has no documents; pass a corpus with at least one "
                          "(check --split and the file).")

    def num_documents(self) -> int | None:
        """The corpus length when it is known without reading it (in-memory datasets, Hub metadata)."""
        src = self.source
        if isinstance(src, Dataset):
            return len(src)
        info = getattr(src, "info", None) if isinstance(src, IterableDataset) else None
        splits = getattr(info, "splits", None) or {}
        split = splits.get(self.split) if hasattr(splits, "get") else None
        return getattr(split, "num_examples", None)

    def stream(self) -> IterableDataset:
        """The corpus as an `IterableDataset` (never materialised in memory)."""
        src = self.source
        if isinstance(src, (DatasetDict, IterableDatasetDict)):
            src = _pick_split(src, self.split)
        if isinstance(src, Dataset):
            return src.to_iterable_dataset()
        if isinstance(src, IterableDataset):
            return src
        return _load_stream(str(src), self.format, self.split, self.name, self.extra)

    def _column_ids(self) -> Iterator[object] | None:
        """Every document id in corpus order, as :meth:`documents` gives them, reading only the id column; None when
        ids are running positions (unique by construction)."""
        ds = self._raw_json_ids(self.stream())
        column = self._id_field(next(_rows(ds)))
        if column is None:
            return None
        as_id = _id_type(ds.features, column)
        batches = ds.select_columns([column]).iter(batch_size=READ_BATCH)
        return (as_id(value) for batch in batches for value in batch[column])

    def documents(self, rank: int = 0, world_size: int = 1) -> Iterator[tuple[object, object]]:
        """Yield ``(doc_id, text)`` for this process's share of the corpus.

        Ids from a column are ints when the column holds integers, else strings (``"0"``, ``1``, ``"2"`` in one JSON
        column become ``"0"``, ``"1"``, ``"2"``).

        With an ``id_column`` the stream is split with ``split_dataset_by_node``; otherwise (the ``id`` field or
        the running index) every process reads the stream and keeps every ``world_size``-th document, so that
        running indexes are global positions (reading is cheap next to the forward passes).
        """
        files = self._files()
        if self.num_documents() == 0 or files and not any(p.stat().st_size for p in files):
            raise self._empty()  # `datasets` would fail on it with a StopIteration
        ds = self._raw_json_ids(self.stream())
        if self.id_column not in (None, NO_IDS) and world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
            indexed: Iterator = ((None, r) for r in _rows(ds))
        else:
            indexed = enumerate(_rows(ds))
            if world_size > 1:
                indexed = itertools.islice(indexed, rank, None, world_size)
        column: str | None = None
        as_id = None
        try:
            for index, row in indexed:
                if as_id is None:
                    column = self._id_field(row)
                    as_id = _id_type(ds.features, column)
                doc_id = index if column is None else as_id(row[column])
                yield doc_id, row[self.text_column]
        except RuntimeError as e:
            if isinstance(e.__cause__, StopIteration):  # how `datasets` streams a file without records
                raise self._empty() from e
            raise

    def _raw_json_ids(self, ds: IterableDataset) -> IterableDataset:
        """An id column of mixed JSON types read as its JSON text: `datasets` would decode the string "0" as 0."""
        column = self.id_column if self.id_column not in (None, NO_IDS) else DEFAULT_ID
        if isinstance((ds.features or {}).get(column), Json) and column != self.text_column:
            ds = ds.cast_column(column, Json(decode=False))
        return ds

    def _id_field(self, row: dict) -> str | None:
        """The field that holds document ids (None: running indexes), after checking the columns exist."""
        self._check_columns(row)
        if self.id_column == NO_IDS:
            self._warn_once("id_column='none': document ids are running positions in the corpus (0, 1, ...), "
                            "not the corpus's own ids.")
            return None
        if self.id_column is not None:
            return self.id_column
        if DEFAULT_ID in row and self.text_column != DEFAULT_ID:
            return DEFAULT_ID
        self._warn_once(f"The corpus has no {DEFAULT_ID!r} column: document ids are running positions (0, 1, ...); "
                        f"pass --id-column to name documents by a column (columns: {sorted(row)}).")
        return None

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            logger.warning(message)
            self._warned = True

    def _check_columns(self, row: dict) -> None:
        id_column = None if self.id_column == NO_IDS else self.id_column
        for col, flag in ((self.text_column, "--text-column"), (id_column, "--id-column")):
            if col is not None and col not in row:
                raise InputError(
                    f"Corpus has no column {col!r}; columns present: {sorted(row)}. Pass the right one with {flag}."
                )


def as_corpus(corpus) -> Corpus:
    """``corpus`` as a :class:`Corpus`: one as it is, else a path, Hub name, ``Dataset``/``IterableDataset`` or list
    of documents wrapped in one with the default columns (InputError for anything else)."""
    if isinstance(corpus, Corpus):
        return corpus
    if isinstance(corpus, (str, Path, Dataset, IterableDataset, list, tuple)):
        return Corpus(corpus)
    raise InputError(f"Cannot use a {type(corpus).__name__} as a corpus; pass a path, a Hub name or a Dataset.")


def _id_type(features, column: str | None):
    """How a value of the id column becomes a document id: as it is when the column holds integers (or its type is
    not known), else as a string, so ids of mixed types are all kept as text and never read as numbers."""
    feature = (features or {}).get(column) if column is not None else None
    if isinstance(feature, Json):  # JSON text (_raw_json_ids): a string is unquoted, any other value kept as written
        return lambda raw: json.loads(raw) if isinstance(raw, str) and raw.startswith('"') else str(raw)
    integers = str(getattr(feature, "dtype", "")).startswith(("int", "uint"))
    return (lambda value: value) if feature is None or integers else str


def _pick_split(dd, split: str):
    if split not in dd:
        raise InputError(f"Corpus has no split {split!r}; splits present: {sorted(dd)}. Pass one with --split.")
    return dd[split]


def _load_stream(src: str, fmt: str | None, split: str, name: str | None, extra: dict) -> IterableDataset:
    path = Path(src)
    if path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists()
    ):
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            ds = _pick_split(ds, split)
        return ds.to_iterable_dataset()
    if fmt is None and (path.is_file() or any(ch in src for ch in "*?[")):
        suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
        fmt = FORMATS.get(suffixes[-1].lower() if suffixes else "")
        if fmt is None:
            raise InputError(
                f"Cannot tell the format of {src!r} from its extension; pass --format "
                f"(one of {sorted(set(FORMATS.values()))})."
            )
    if fmt is not None:
        if path.is_dir():
            files = sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            files = [src]
        kwargs = dict(extra)
        if fmt == "csv" and path.suffix.lower() == ".tsv":
            kwargs.setdefault("delimiter", "\t")
        with _local_only():
            return load_dataset(fmt, data_files={split: files}, split=split, streaming=True, **kwargs)
    if path.exists():
        with _local_only():
            return load_dataset(str(path), name=name, split=split, streaming=True, **extra)
    try:
        return load_dataset(src, name=name, split=split, streaming=True, **extra)
    except (FileNotFoundError, ConnectionError) as e:
        raise InputError(
            f"Corpus {src!r} is neither a local file or directory nor a reachable Hub dataset ({e}); "
            "check the path, or the dataset name and your connection (HF_DATASETS_OFFLINE)."
        ) from e


def content_digest(path: Path, block: int = 1 << 20) -> str:
    """sha256 of every byte of a file, read in ``block``-byte chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _check_utf8(path: Path) -> None:
    """InputError naming the first line of ``path`` that is not UTF-8 (compressed files are left to the reader)."""
    if path.suffix.lower() in (".gz", ".bz2", ".xz", ".zst"):
        return
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno} is not UTF-8 text (byte {e.start + 1} of the line); re-encode the "
                                 "file as UTF-8.") from None


@dataclass
class Window:
    """A slice of one document's tokens: ``input_ids[n_context:]`` are the tokens it scores."""

    doc_seq: int  # position of the document in this process's stream
    start: int  # index, in the document's scored tokens, of the first token this window scores
    input_ids: list[int]
    n_context: int


def document_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of a document, preceded by one start token so that its first token is scored too."""
    return [start_token_id(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]]


def windows(seq: list[int], max_length: int, overlap: int) -> list[tuple[int, list[int], int]]:
    """Split ``seq`` (start token + document tokens) into windows of at most ``max_length`` tokens.

    Returns ``(start, input_ids, n_context)`` per window: the window scores ``input_ids[n_context:]``,
    which are document tokens ``start, start+1, ...`` (0-based, start token excluded). Consecutive windows
    repeat ``overlap`` tokens as context, so every document token is scored exactly once.
    """
    if max_length < 2:
        raise InputError("max_length must be at least 2.")
    overlap = max(1, min(overlap, max_length - 1))
    out = []
    lo = 1  # first position in seq to score
    n = len(seq)
    while lo < n:
        ctx = 1 if lo == 1 else overlap
        hi = min(n, lo + max_length - ctx)
        out.append((lo - 1, seq[lo - ctx : hi], ctx))
        lo = hi
    return out


@contextmanager
def _local_only() -> Iterator[None]:
    """Load local files without any network call (``datasets`` otherwise pings the Hub to count the load)."""
    import datasets.config as cfg

    saved = cfg.HF_HUB_OFFLINE, cfg.HF_UPDATE_DOWNLOAD_COUNTS
    cfg.HF_HUB_OFFLINE, cfg.HF_UPDATE_DOWNLOAD_COUNTS = True, False
    try:
        yield
    finally:
        cfg.HF_HUB_OFFLINE, cfg.HF_UPDATE_DOWNLOAD_COUNTS = saved


def _rows(ds: IterableDataset) -> Iterator[dict]:
    """The rows of ``ds``, read in Arrow batches of :data:`READ_BATCH` (several times faster than row by row on a
    large file; a read error mid-batch means that batch's rows are read again on resume, none is lost)."""
    for batch in ds.iter(batch_size=READ_BATCH):
        names = list(batch)
        for values in zip(*(batch[k] for k in names), strict=True):
            yield dict(zip(names, values, strict=True))
