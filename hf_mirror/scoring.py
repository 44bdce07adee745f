"""Scoring: per-document scores from token-loss deltas, streamed to parquet, with each probe's top-k kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hf_mirror.errors import InputError
from hf_mirror.scan import ScannedDoc

NORMALIZATIONS = ("none", "zscore")
TOPK_COLUMNS = ["probe_id", "rank", "doc_id", "score", "raw_score", "n_tokens", "text"]
EVIDENCE_COLUMNS = ["probe_id", "doc_id", "position", "token", "base_loss", "mirror_loss", "delta"]


def doc_sort_key(doc_id: object) -> tuple:
    """Deterministic order for ids of one type (ints numerically, anything else as text)."""
    return (0, doc_id, "") if isinstance(doc_id, (int, np.integer)) else (1, 0, str(doc_id))


def normalize_scores(raw: np.ndarray, method: str) -> np.ndarray:
    """``zscore``: remove each document's common drift across probes (needs >= 2 probes)."""
    if method == "none":
        return raw
    std = raw.std()
    return (raw - raw.mean()) / std if std > 0 else np.zeros_like(raw)


@dataclass
class _Candidate:
    score: float
    key: tuple
    doc: ScannedDoc


class ScoreBook:
    """Consumes scanned documents: writes every (probe, document) score, keeps the top-k with evidence."""

    def __init__(
        self,
        probe_ids: Sequence[str],
        sign: float,
        normalize: str,
        top_k: int,
        scores_path: str | Path,
        n_controls: int = 0,
        flush_rows: int = 65536,
    ) -> None:
        """``probe_ids`` ends with ``n_controls`` control probes: used for normalisation, never reported."""
        if normalize not in NORMALIZATIONS:
            raise InputError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}.")
        if normalize == "zscore" and len(probe_ids) < 3:
            raise InputError(
                "normalize='zscore' needs at least 3 probes or control probes (it compares each document "
                "across probes); add probes or controls, or use normalize='none'."
            )
        if top_k < 1:
            raise InputError("top_k must be at least 1.")
        self.all_ids = list(probe_ids)
        self.probe_ids = self.all_ids[: len(self.all_ids) - n_controls]
        self.sign = sign
        self.normalize = normalize
        self.top_k = top_k
        self.path = Path(scores_path)
        self.flush_rows = flush_rows
        self._rows: dict[str, list] = {k: [] for k in ("probe_id", "doc_id", "score", "raw_score", "n_tokens")}
        self._writer: pq.ParquetWriter | None = None
        self._id_type: type | None = None
        self._seen: set = set()
        self._top: list[list[_Candidate]] = [[] for _ in self.probe_ids]

    def add(self, doc: ScannedDoc) -> None:
        doc.doc_id = doc_id = self._check_id(doc.doc_id)
        support = self.sign * (doc.mirror - doc.base)  # [probes, tokens]; > 0 where the mirror supports
        raw_all = support.mean(axis=1).astype(np.float64)
        n = len(self.probe_ids)
        score = normalize_scores(raw_all, self.normalize)[:n]
        raw = raw_all[:n]
        self._rows["probe_id"].extend(self.probe_ids)
        self._rows["doc_id"].extend([doc_id] * n)
        self._rows["score"].extend(score.tolist())
        self._rows["raw_score"].extend(raw.tolist())
        self._rows["n_tokens"].extend([len(doc.token_ids)] * n)
        if len(self._rows["score"]) >= self.flush_rows:
            self._flush()
        key = doc_sort_key(doc_id)
        for p, s in enumerate(score.tolist()):
            top = self._top[p]
            top.append(_Candidate(s, key, doc))
            if len(top) >= 2 * self.top_k:
                self._prune(top)

    def _check_id(self, doc_id: object) -> object:
        if isinstance(doc_id, np.integer):
            doc_id = int(doc_id)
        kind = int if isinstance(doc_id, int) and not isinstance(doc_id, bool) else str
        if self._id_type is None:
            self._id_type = kind
        elif kind is not self._id_type:
            raise InputError(
                f"Document id {doc_id!r} is a {kind.__name__} but earlier ids are {self._id_type.__name__}s; "
                "use an id column of one type."
            )
        doc_id = doc_id if kind is int else str(doc_id)
        if doc_id in self._seen:
            raise InputError(
                f"Duplicate document id {doc_id!r}; ids must be unique. Pick a unique --id-column, "
                "or leave it out to use each document's running index."
            )
        self._seen.add(doc_id)
        return doc_id

    def _prune(self, top: list[_Candidate]) -> None:
        top.sort(key=lambda c: (-c.score, c.key))
        del top[self.top_k :]

    def _flush(self) -> None:
        if not self._rows["score"]:
            return
        id_type = pa.int64() if self._id_type is int else pa.string()
        schema = pa.schema(
            [
                ("probe_id", pa.string()),
                ("doc_id", id_type),
                ("score", pa.float64()),
                ("raw_score", pa.float64()),
                ("n_tokens", pa.int64()),
            ]
        )
        table = pa.table(self._rows, schema=schema)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(str(self.path), schema)
        self._writer.write_table(table)
        for v in self._rows.values():
            v.clear()

    def finish(self) -> list[list[_Candidate]]:
        """Close the score file; return each probe's top-k candidates, best first."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
        for top in self._top:
            self._prune(top)
        return self._top

    def topk_frames(self, tokenizer) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``topk`` (one row per probe and rank) and ``evidence`` (one row per token of each top document)."""
        top_rows, ev_rows = [], []
        pieces_cache: dict[tuple, list[str]] = {}
        for p, pid in enumerate(self.probe_ids):
            for rank, c in enumerate(self._top[p], 1):
                d = c.doc
                top_rows.append(
                    {
                        "probe_id": pid,
                        "rank": rank,
                        "doc_id": d.doc_id,
                        "score": c.score,
                        "raw_score": float(self.sign * (d.mirror[p] - d.base).mean()),
                        "n_tokens": len(d.token_ids),
                        "text": d.text,
                    }
                )
                if c.key not in pieces_cache:
                    pieces_cache[c.key] = token_pieces(tokenizer, d.text, d.token_ids)
                pieces = pieces_cache[c.key]
                delta = self.sign * (d.mirror[p] - d.base)
                for i, piece in enumerate(pieces):
                    ev_rows.append(
                        {
                            "probe_id": pid,
                            "doc_id": d.doc_id,
                            "position": i,
                            "token": piece,
                            "base_loss": float(d.base[i]),
                            "mirror_loss": float(d.mirror[p, i]),
                            "delta": float(delta[i]),
                        }
                    )
        return (
            pd.DataFrame(top_rows, columns=TOPK_COLUMNS),
            pd.DataFrame(ev_rows, columns=EVIDENCE_COLUMNS),
        )


def token_pieces(tokenizer, text: str, token_ids: np.ndarray) -> list[str]:
    """The text of each token, such that the pieces concatenate back to ``text`` where offsets allow."""
    n = len(token_ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) == n:
            starts = [s for s, _ in offsets]
            # each piece runs to the next token's start, so whitespace stays attached and nothing is lost
            bounds = [0, *starts[1:], len(text)]
            pieces = [text[bounds[i] : bounds[i + 1]] for i in range(n)]
            if "".join(pieces) == text:
                return pieces
    return [tokenizer.decode([int(t)]) for t in token_ids]
