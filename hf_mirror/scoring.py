"""Scoring: per-document scores from token-loss deltas, streamed to parquet shards with checkpoints, merged.

Each process owns a shard directory. Scores go to ``part-NNNNNN.parquet`` files, each written atomically at a
checkpoint together with a state file (the top-k candidates) and ``checkpoint.json`` that names both; a
killed run resumes from the last checkpoint without losing or double-counting a document.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hf_mirror.errors import InputError, ScoreError
from hf_mirror.scan import ScannedDoc, Skipped

NORMALIZATIONS = ("none", "zscore", "loo")
AGGREGATIONS = ("mean", "sum", "max")  # over a document's tokens
TOPK_COLUMNS = ["probe_id", "rank", "doc_id", "score", "raw_score", "n_tokens", "text"]
EVIDENCE_COLUMNS = ["probe_id", "doc_id", "position", "token", "base_loss", "mirror_loss", "delta"]
SCORE_COLUMNS = ["probe_id", "doc_id", "score", "raw_score", "n_tokens"]
CHECKPOINT = "checkpoint.json"


def doc_sort_key(doc_id: object) -> tuple:
    """Deterministic order for ids of one type (ints numerically, anything else as text)."""
    return (0, doc_id, "") if isinstance(doc_id, (int, np.integer)) else (1, 0, str(doc_id))


def normalize_scores(raw: np.ndarray, method: str) -> np.ndarray:
    """One document's raw scores across the probes, normalised (needs >= 3 probes for the z-scores).

    ``zscore``: standardise across all probes (removes the drift any perturbation causes; bounded by
    sqrt(n - 1)). ``loo``: each probe against the mean and spread of the *other* probes, which has no such ceiling.
    """
    if method == "none":
        return raw
    if method == "zscore":
        std = raw.std()
        return (raw - raw.mean()) / std if std > 0 else np.zeros_like(raw)
    n = len(raw)
    mean = (raw.sum() - raw) / (n - 1)
    std = np.sqrt(np.maximum(((raw**2).sum() - raw**2) / (n - 1) - mean**2, 0.0))
    return np.divide(raw - mean, std, out=np.zeros_like(raw), where=std > 0)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class _Candidate:
    """A top-k document of one probe, with just that probe's token losses (bounded memory)."""

    score: float
    raw: float
    key: tuple
    doc_id: object
    text: str
    token_ids: np.ndarray
    base: np.ndarray
    mirror: np.ndarray


class ScoreBook:
    """One process's scores: every (probe, document) score to parquet parts, the top-k kept with evidence.

    ``probe_ids`` ends with ``n_controls`` control probes: they take part in normalisation, never reported.
    Construct with an existing ``shard_dir`` of the same ``run_key`` to resume from its last checkpoint.
    """

    def __init__(
        self,
        probe_ids: Sequence[str],
        sign: float,
        normalize: str,
        top_k: int,
        shard_dir: str | Path,
        n_controls: int = 0,
        run_key: str = "",
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 300.0,
        aggregate: str = "mean",
    ) -> None:
        if aggregate not in AGGREGATIONS:
            raise InputError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}.")
        if normalize not in NORMALIZATIONS:
            raise InputError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}.")
        if normalize != "none" and len(probe_ids) < 3:
            raise InputError(
                "normalize='zscore' needs at least 3 probes or control probes (it compares each document "
                "across probes); add probes or controls, or use normalize='none'."
            )
        if top_k < 1:
            raise InputError("top_k must be at least 1.")
        self.all_ids = list(probe_ids)
        self.probe_ids = self.all_ids[: len(self.all_ids) - n_controls]
        self.sign, self.normalize, self.top_k, self.aggregate = sign, normalize, top_k, aggregate
        self.dir = Path(shard_dir)
        self.run_key = run_key
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, checkpoint_seconds
        self._rows: dict[str, list] = {k: [] for k in SCORE_COLUMNS}
        self._id_type: type | None = None
        self._seen: set = set()
        self._top: list[list[_Candidate]] = [[] for _ in self.probe_ids]
        self._floor: list[tuple | None] = [None] * len(self.probe_ids)
        self._since, self._last_time = 0, time.monotonic()
        self.parts = 0
        self.next_seq = 0  # stream position up to which every document is accounted for
        self.done = False
        self.skipped: list[dict] = []
        self.n_documents = self.n_tokens = 0
        self.counters: dict[str, int] = {}  # extra per-process counts, summed over processes on merge
        self._resume()

    # ---- resume ---------------------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = self.dir / CHECKPOINT
        self.dir.mkdir(parents=True, exist_ok=True)
        if not ckpt.exists():
            for stale in self.dir.glob("*"):  # an unfinished first checkpoint leaves nothing valid
                stale.unlink()
            return
        state = json.loads(ckpt.read_text())
        if state["run_key"] != self.run_key:
            raise InputError(
                f"{self.dir} holds checkpoints of a different run (other model, corpus, probes, settings or "
                "number of processes); use a new --output directory or pass --overwrite."
            )
        self.parts, self.next_seq, self.done = state["parts"], state["next_seq"], state["done"]
        with open(self.dir / state["state"], "rb") as f:
            saved = pickle.load(f)
        self._top, self.skipped = saved["top"], saved["skipped"]
        self.n_documents, self.n_tokens, self._id_type = saved["n_documents"], saved["n_tokens"], saved["id_type"]
        self.counters = saved["counters"]
        for p in range(len(self._top)):
            self._prune(p)
        keep = {self._part_name(i) for i in range(self.parts)} | {state["state"], CHECKPOINT}
        keep |= {"topk.parquet", "evidence.parquet"} if self.done else set()
        for f in self.dir.iterdir():  # parts and states written after the checkpoint are not counted
            if f.name not in keep:
                f.unlink()
        for i in range(self.parts):
            self._seen.update(pq.read_table(self.dir / self._part_name(i), columns=["doc_id"])["doc_id"].to_pylist())

    @staticmethod
    def _part_name(i: int) -> str:
        return f"part-{i:06d}.parquet"

    # ---- adding documents -----------------------------------------------------------------------------
    def add(self, doc: ScannedDoc, skipped: Sequence[Skipped] = (), extra: np.ndarray | None = None) -> np.ndarray:
        """Score one scanned document; ``skipped`` is the scanner's running list of skipped documents.

        ``extra``: raw scores of the last probes of the pool (cached control probes) that were not scanned.
        Returns the document's raw score for every probe of the pool.
        """
        support = self.sign * (doc.mirror - doc.base)  # [probes, tokens]; > 0 where the mirror supports
        raw = getattr(support, self.aggregate)(axis=1).astype(np.float64)
        if extra is not None:
            raw = np.concatenate([raw, np.asarray(extra, np.float64)])
        if len(raw) != len(self.all_ids):
            raise ScoreError(f"Document {doc.doc_id!r} has {len(raw)} probe scores, expected {len(self.all_ids)}.")
        doc.doc_id = self.add_scores(doc.doc_id, doc.text, doc.token_ids, raw, doc.seq, skipped, doc.base, doc.mirror)
        return raw

    def add_scores(
        self,
        doc_id: object,
        text: str,
        token_ids: np.ndarray,
        raw_scores: np.ndarray,
        seq: int,
        skipped: Sequence[Skipped] = (),
        base: np.ndarray | None = None,
        mirror: np.ndarray | None = None,
    ) -> object:
        """Record one document's raw score per probe (and, for the mirror method, its token losses).

        Methods without token losses (baselines) pass ``raw_scores`` only; their top-k carry no evidence.
        Returns the normalised document id.
        """
        doc_id = self._check_id(doc_id)
        raw_all = np.asarray(raw_scores, np.float64)
        n = len(self.probe_ids)
        score, raw = normalize_scores(raw_all, self.normalize)[:n], raw_all[:n]
        self._rows["probe_id"].extend(self.probe_ids)
        self._rows["doc_id"].extend([doc_id] * n)
        self._rows["score"].extend(score.tolist())
        self._rows["raw_score"].extend(raw.tolist())
        self._rows["n_tokens"].extend([len(token_ids)] * n)
        self.n_documents += 1
        self.n_tokens += len(token_ids)
        key = doc_sort_key(doc_id)
        empty = np.empty(0, np.float32)
        for p, s in enumerate(score.tolist()):
            floor = self._floor[p]
            if floor is not None and (-s, key) > floor:
                continue  # worse than the k-th best so far: cannot enter this probe's top-k
            evidence = (base, mirror[p].copy()) if base is not None and mirror is not None else (empty, empty)
            self._top[p].append(_Candidate(s, float(raw[p]), key, doc_id, text, token_ids, *evidence))
            if len(self._top[p]) >= 2 * self.top_k:
                self._prune(p)
        self._since += 1
        if self._since >= self.checkpoint_every or time.monotonic() - self._last_time >= self.checkpoint_seconds:
            self.checkpoint(seq + 1, skipped)
        return doc_id

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

    def _prune(self, p: int) -> None:
        top = self._top[p]
        top.sort(key=lambda c: (-c.score, c.key))
        del top[self.top_k :]
        if len(top) == self.top_k:
            self._floor[p] = (-top[-1].score, top[-1].key)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def checkpoint(self, next_seq: int, skipped: Sequence[Skipped] = (), done: bool = False) -> None:
        """Persist everything up to stream position ``next_seq``: a new part, the top-k state, the pointer."""
        for p in range(len(self._top)):
            self._prune(p)
        known = {s["seq"] for s in self.skipped}
        self.skipped += [{"doc_id": s.doc_id, "reason": s.reason, "seq": s.seq} for s in skipped
                         if self.next_seq <= s.seq < next_seq and s.seq not in known]
        if self._rows["score"]:
            id_type = pa.int64() if self._id_type is int else pa.string()
            schema = pa.schema([("probe_id", pa.string()), ("doc_id", id_type), ("score", pa.float64()),
                                ("raw_score", pa.float64()), ("n_tokens", pa.int64())])
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table(self._rows, schema=schema), sink)
            _atomic_write(self.dir / self._part_name(self.parts), sink.getvalue().to_pybytes())
            self.parts += 1
            for v in self._rows.values():
                v.clear()
        state_name = f"state-{self.parts:06d}-{next_seq}.pkl"
        state = {"top": self._top, "skipped": self.skipped, "n_documents": self.n_documents,
                 "n_tokens": self.n_tokens, "id_type": self._id_type, "counters": self.counters}
        _atomic_write(self.dir / state_name, pickle.dumps(state))
        old = self.dir / CHECKPOINT
        previous = json.loads(old.read_text())["state"] if old.exists() else None
        pointer = {"run_key": self.run_key, "parts": self.parts, "next_seq": next_seq, "state": state_name,
                   "done": done}
        _atomic_write(old, json.dumps(pointer).encode())
        if previous and previous != state_name:
            (self.dir / previous).unlink(missing_ok=True)
        self.next_seq, self.done = next_seq, done
        self._since, self._last_time = 0, time.monotonic()

    def finish(self, next_seq: int, skipped: Sequence[Skipped], tokenizer, counters: dict | None = None) -> None:
        """This shard's top-k and evidence tables, then the final checkpoint (with ``counters`` added)."""
        for k, v in (counters or {}).items():
            self.counters[k] = self.counters.get(k, 0) + v
        topk, evidence = self.topk_frames(tokenizer)
        topk.to_parquet(self.dir / "topk.parquet", index=False)
        evidence.to_parquet(self.dir / "evidence.parquet", index=False)
        self.checkpoint(next_seq, skipped, done=True)

    def topk_frames(self, tokenizer) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``topk`` (one row per probe and rank) and ``evidence`` (one row per token of each top document)."""
        top_rows, ev_rows = [], []
        pieces_cache: dict[tuple, list[str]] = {}
        for p, pid in enumerate(self.probe_ids):
            self._prune(p)
            for rank, c in enumerate(self._top[p], 1):
                top_rows.append({"probe_id": pid, "rank": rank, "doc_id": c.doc_id, "score": c.score,
                                 "raw_score": c.raw, "n_tokens": len(c.token_ids), "text": c.text})
                if not len(c.base):
                    continue  # a method without token-level evidence
                delta = self.sign * (c.mirror - c.base)
                if c.key not in pieces_cache:
                    pieces_cache[c.key] = token_pieces(tokenizer, c.text, c.token_ids)
                for i, piece in enumerate(pieces_cache[c.key]):
                    ev_rows.append({"probe_id": pid, "doc_id": c.doc_id, "position": i, "token": piece,
                                    "base_loss": float(c.base[i]), "mirror_loss": float(c.mirror[i]),
                                    "delta": float(delta[i])})
        return pd.DataFrame(top_rows, columns=TOPK_COLUMNS), pd.DataFrame(ev_rows, columns=EVIDENCE_COLUMNS)


def merge_shards(shard_dirs: Sequence[Path], out: Path, probe_ids: Sequence[str], top_k: int) -> dict:
    """Merge every process's shard into ``scores.parquet`` and return the merged top-k, evidence and stats.

    The merged answer does not depend on how documents were split over processes: ranks are recomputed
    over all shards with the same tie-break (score, then document id).
    """
    writer = None
    for d in shard_dirs:
        for part in sorted(d.glob("part-*.parquet")):
            table = pq.read_table(part)
            if writer is None:
                writer = pq.ParquetWriter(str(out / "scores.parquet.tmp"), table.schema)
            writer.write_table(table.cast(writer.schema))
    if writer is not None:
        writer.close()
        os.replace(out / "scores.parquet.tmp", out / "scores.parquet")
    topk = pd.concat([pd.read_parquet(d / "topk.parquet") for d in shard_dirs], ignore_index=True)
    evidence = pd.concat([pd.read_parquet(d / "evidence.parquet") for d in shard_dirs], ignore_index=True)
    topk = topk.dropna(axis=1, how="all") if topk.empty else topk
    order = {pid: i for i, pid in enumerate(probe_ids)}
    if not topk.empty:
        topk["_p"] = topk["probe_id"].map(order)
        topk["_neg"] = -topk["score"]
        topk = topk.sort_values(["_p", "_neg", "doc_id"], kind="stable").groupby("_p", sort=False).head(top_k)
        topk["rank"] = topk.groupby("_p").cumcount() + 1
        topk = topk.drop(columns=["_p", "_neg"]).reset_index(drop=True)
        keep = topk[["probe_id", "doc_id"]]
        evidence = evidence.merge(keep, on=["probe_id", "doc_id"], how="inner")
        evidence["_p"] = evidence["probe_id"].map(order)
        evidence = evidence.merge(topk[["probe_id", "doc_id", "rank"]], on=["probe_id", "doc_id"])
        evidence = evidence.sort_values(["_p", "rank", "position"]).drop(columns=["_p", "rank"]).reset_index(drop=True)
    skipped, stats = [], {"documents": 0, "tokens": 0}
    for d in shard_dirs:
        state = json.loads((d / CHECKPOINT).read_text())
        with open(d / state["state"], "rb") as f:
            saved = pickle.load(f)
        skipped += [{"doc_id": s["doc_id"], "reason": s["reason"]} for s in saved["skipped"]]
        stats["documents"] += saved["n_documents"]
        stats["tokens"] += saved["n_tokens"]
        for k, v in saved["counters"].items():
            stats[k] = stats.get(k, 0) + v
    skipped.sort(key=lambda s: doc_sort_key(s["doc_id"]))
    stats["skipped"] = len(skipped)
    return {"topk": topk[TOPK_COLUMNS] if not topk.empty else pd.DataFrame(columns=TOPK_COLUMNS),
            "evidence": evidence[EVIDENCE_COLUMNS] if not evidence.empty else pd.DataFrame(columns=EVIDENCE_COLUMNS),
            "skipped": skipped, "stats": stats}


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
