"""Base-loss cache: the base model's per-token losses over a corpus, computed once and reused by later runs.

The key covers everything the losses depend on: the model's weights, the tokenizer, the corpus, the windowing,
the precision and the process split. A cache becomes visible only when complete (written to a temporary
directory ``rank-*.tmp-HOST-PID``, every file by write + rename, ``complete.json`` last, then the directory
renamed into place), so an interrupted or killed scan never leaves a partial cache that would be read as valid;
the temporary directories of killed writers on this host are removed by the next commit.
``complete.json`` holds the checksum of every part: a damaged cache is discarded (with a warning), a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hf_mirror.integrity import HOST, alive, atomic_write, check_hashes, damaged, expect, read_json, sha256_bytes

logger = logging.getLogger(__name__)
ROWS_PER_PART = 4096


def default_cache_dir() -> Path:
    """``$HF_MIRROR_CACHE``, else ``$XDG_CACHE_HOME/hf_mirror`` (``~/.cache/hf_mirror``)."""
    if os.environ.get("HF_MIRROR_CACHE"):
        return Path(os.environ["HF_MIRROR_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "hf_mirror"


def verified_stamps(directory: Path) -> Path:
    """Where :func:`~hf_mirror.integrity.check_hashes` remembers the files of an index ``directory`` that passed."""
    return default_cache_dir() / "verified" / f"{sha256_bytes(str(Path(directory).resolve()).encode())[:32]}.json"


@torch.no_grad()
def model_fingerprint(model) -> str:
    """A hash of the model's config and weights (sum and leading values of every tensor: one cheap pass)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        head = flat[:8].float().cpu().numpy().tobytes()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}{flat.double().sum().item():.10e}".encode() + head)
    return h.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer, exclude: tuple[str, ...] = ()) -> str:
    """A hash of the tokenizer's tokenization and special tokens (less the ``exclude`` ones, e.g. ``pad_token``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps({k: v for k, v in tokenizer.special_tokens_map.items() if k not in exclude}, sort_keys=True,
                         default=str)
    return hashlib.sha256((text + special).encode()).hexdigest()[:20]


class BaseLossCache:
    """One process's cached per-document arrays, in its stream order: ``(seq, doc_id, losses)`` rows.

    ``kind="base_losses"``: the base model's token losses; ``kind="control_scores"``: the control probes' raw
    scores of each document (so that a later run with the same controls need not fit or scan them).
    """

    def __init__(self, root: str | Path, key: str, *, rank: int, world: int, kind: str = "base_losses") -> None:
        self.key = key
        self.dir = Path(root) / kind / key / f"rank-{rank:05d}-of-{world:05d}"
        self._tmp = self.dir.with_name(f"{self.dir.name}.tmp-{HOST}-{os.getpid()}")
        self._rows: dict[str, list] = {"seq": [], "doc_id": [], "losses": []}
        self._parts: dict[str, str] = {}  # part name -> sha256, of the parts written so far
        self._valid: bool | None = None

    @property
    def complete(self) -> bool:
        """Whether a complete, intact cache exists (checked once: a damaged one is discarded with a warning)."""
        if self._valid is None:
            if (self.dir / "complete.json").exists():
                self._valid = self._check()
            else:  # commit renames a finished cache into place: a folder without its marker is damaged
                if self.dir.exists():
                    logger.warning("The cache in %s has no complete.json; discarding it and computing it again.",
                                   self.dir)
                    shutil.rmtree(self.dir, ignore_errors=True)
                self._valid = False
        return self._valid

    def _check(self) -> bool:
        marker = self.dir / "complete.json"
        try:
            done = read_json(marker)
            expect(isinstance(done, dict) and isinstance(done.get("documents"), int), f"{marker.name}: schema")
            parts = sorted(p.name for p in self.dir.glob("part-*.parquet"))
            if "parts" in done:  # a checksum per part
                expect(isinstance(done["parts"], dict) and sorted(done["parts"]) == parts, "part list")
                check_hashes(self.dir, done["parts"])
            else:  # a cache written before checksums: the parts' footers and row counts
                rows = sum(pq.read_metadata(self.dir / p).num_rows for p in parts)
                expect(rows == done["documents"], f"{rows} rows for {done['documents']} documents")
        except Exception as e:  # whatever the damage, the cache is only an optimisation: recompute it
            logger.warning("The cache in %s is damaged (%s: %s); discarding it and computing it again.", self.dir,
                           type(e).__name__, e)
            shutil.rmtree(self.dir, ignore_errors=True)
            return False
        return True

    def read(self, start: int = 0) -> Iterator[tuple[int, str, np.ndarray]]:
        """Cached rows from stream position ``start`` on."""
        for part in sorted(self.dir.glob("part-*.parquet")):
            try:
                table = pq.read_table(part)
            except Exception as e:
                raise damaged(part, e, "delete the cache directory (--cache-dir / $HF_MIRROR_CACHE) or pass "
                                       "--no-cache") from e
            for seq, doc_id, losses in zip(*(table[c].to_pylist() for c in ("seq", "doc_id", "losses")), strict=True):
                if seq >= start:
                    yield seq, doc_id, np.asarray(losses, np.float32)

    def add(self, seq: int, doc_id: object, losses: np.ndarray) -> None:
        self._rows["seq"].append(seq)
        self._rows["doc_id"].append(str(doc_id))
        self._rows["losses"].append(losses.astype(np.float32))
        if len(self._rows["seq"]) >= ROWS_PER_PART:
            self._flush()

    def _flush(self) -> None:
        if not self._rows["seq"]:
            return
        self._tmp.mkdir(parents=True, exist_ok=True)
        table = pa.table({"seq": pa.array(self._rows["seq"], pa.int64()),
                          "doc_id": pa.array(self._rows["doc_id"], pa.string()),
                          "losses": pa.array([r.tolist() for r in self._rows["losses"]], pa.list_(pa.float32()))})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        name = f"part-{len(self._parts):06d}.parquet"
        atomic_write(self._tmp / name, data)
        self._parts[name] = sha256_bytes(data)
        for v in self._rows.values():
            v.clear()

    def commit(self, n_documents: int) -> None:
        """Make the written rows visible as a complete cache (one rename: a reader sees all of it or none)."""
        self._flush()
        self._tmp.mkdir(parents=True, exist_ok=True)
        atomic_write(self._tmp / "complete.json", json.dumps({"documents": n_documents, "parts": self._parts}).encode())
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self._valid = None
        if self.dir.exists() and self.complete:  # another process committed the same cache meanwhile: keep it
            self.discard()
        else:
            try:
                os.replace(self._tmp, self.dir)
            except OSError:  # it appeared between the check and the rename
                self._valid = None
                if not self.complete:
                    raise
                self.discard()
        self._valid = True
        self._remove_stale()

    def discard(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Remove the temporary directories that writers on this host left when they were killed mid-write."""
        for tmp in self.dir.parent.glob(f"{self.dir.name}.tmp-*"):
            host, _, pid = tmp.name.rsplit(".tmp-", 1)[1].rpartition("-")
            if host in ("", HOST) and pid.isdigit() and not alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)

