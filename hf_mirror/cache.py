"""Base-loss cache: the base model's per-token losses over a corpus, computed once and reused by later runs.

The key covers everything the losses depend on: the model's weights, the tokenizer, the corpus, the windowing,
the precision and the process split. A cache becomes visible only when complete (written to a temporary
directory, then renamed), so an interrupted scan never leaves a partial cache that would be read as valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROWS_PER_PART = 4096


def default_cache_dir() -> Path:
    """``$HF_MIRROR_CACHE``, else ``$XDG_CACHE_HOME/hf_mirror`` (``~/.cache/hf_mirror``)."""
    if os.environ.get("HF_MIRROR_CACHE"):
        return Path(os.environ["HF_MIRROR_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "hf_mirror"


@torch.no_grad()
def model_fingerprint(model) -> str:
    """A hash of the model's config and weights (sum and leading values of every tensor: one cheap pass)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        head = flat[:8].float().cpu().numpy().tobytes()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}{flat.double().sum().item():.10e}".encode() + head)
    return h.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((text + special).encode()).hexdigest()[:20]


class BaseLossCache:
    """One process's cached per-document arrays, in its stream order: ``(seq, doc_id, losses)`` rows.

    ``kind="base_losses"``: the base model's token losses; ``kind="control_scores"``: the control probes' raw
    scores of each document (so that a later run with the same controls need not fit or scan them).
    """

    def __init__(self, root: str | Path, key: str, rank: int, world: int, kind: str = "base_losses") -> None:
        self.key = key
        self.dir = Path(root) / kind / key / f"rank-{rank:05d}-of-{world:05d}"
        self._tmp = self.dir.with_name(f"{self.dir.name}.tmp-{os.getpid()}")
        self._rows: dict[str, list] = {"seq": [], "doc_id": [], "losses": []}
        self._parts = 0

    @property
    def complete(self) -> bool:
        return (self.dir / "complete.json").exists()

    def read(self, start: int = 0) -> Iterator[tuple[int, str, np.ndarray]]:
        """Cached rows from stream position ``start`` on."""
        for part in sorted(self.dir.glob("part-*.parquet")):
            table = pq.read_table(part)
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
        pq.write_table(table, self._tmp / f"part-{self._parts:06d}.parquet")
        self._parts += 1
        for v in self._rows.values():
            v.clear()

    def commit(self, n_documents: int) -> None:
        """Make the written rows visible as a complete cache."""
        self._flush()
        self._tmp.mkdir(parents=True, exist_ok=True)
        (self._tmp / "complete.json").write_text(json.dumps({"documents": n_documents}))
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, self.dir)

    def discard(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
