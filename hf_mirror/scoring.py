"""Scoring: per-document scores from token-loss deltas, streamed to parquet shards with checkpoints.

Each process owns a shard directory. Scores go to ``part-NNNNNN.parquet`` files, each written atomically at a
checkpoint together with a state file (``state-PARTS-SEQ.npz``: the top-k candidates, counts and the checksum of
every part, no pickle) and ``checkpoint.json`` that names it; a killed run resumes from the last checkpoint
without losing or double-counting a document. A resume validates the state (zip CRCs, schema) and the parts
(sha256) and falls back to the previous intact checkpoint, or to the start, when something is damaged.
:mod:`hf_mirror.merge` joins the finished shards into one answer.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hf_mirror.errors import InputError, ScoreError, StateError
from hf_mirror.integrity import (
    OVERWRITE_HINT,
    atomic_write,
    check_hashes,
    damaged,
    expect,
    read_json,
    sha256_bytes,
    sha256_file,
)
from hf_mirror.scan import ScannedDoc, Skipped

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "zscore", "loo")
AGGREGATIONS = ("mean", "sum", "max")  # over a document's tokens
TOPK_COLUMNS = ["probe_id", "rank", "doc_id", "score", "raw_score", "n_tokens", "text"]
EVIDENCE_COLUMNS = ["probe_id", "doc_id", "position", "token", "base_loss", "mirror_loss", "delta"]
SCORE_COLUMNS = ["probe_id", "doc_id", "score", "raw_score", "n_tokens"]
CHECKPOINT = "checkpoint.json"
STATE_FORMAT = 1
_STATE_NAME = re.compile(r"state-(\d{6})-(\d+)\.npz")
OUTPUTS = ("topk.parquet", "evidence.parquet")  # a finished shard's tables (their checksums are in its last state)


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


@dataclass(kw_only=True)
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
    ``eligible`` (probe id -> document ids) limits which documents may enter each probe's top-k.
    """

    def __init__(
        self,
        probe_ids: Sequence[str],
        *,
        sign: float,
        normalize: str,
        top_k: int,
        shard_dir: str | Path,
        n_controls: int = 0,
        run_key: str = "",
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 300.0,
        aggregate: str = "mean",
        eligible: dict[str, set[str]] | None = None,
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
        # the documents that may enter each probe's top-k (str ids; None: every document)
        self._eligible = None if eligible is None else [eligible.get(p, set()) for p in self.probe_ids]
        self._floor: list[tuple | None] = [None] * len(self.probe_ids)
        self._since, self._last_time = 0, time.monotonic()
        self.parts = 0
        self.next_seq = 0  # stream position up to which every document is accounted for
        self.done = False
        self.skipped: list[dict] = []
        self.n_documents = self.n_tokens = 0
        self.counters: dict[str, int] = {}  # extra per-process counts, summed over processes on merge
        self._part_hashes: list[str] = []  # sha256 of each part, stored in every state
        self._resume()

    # ---- resume ---------------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Resume from the newest intact checkpoint of this run, else start afresh (warning when one was lost)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        pointer = self._read_pointer()
        states = sorted((f.name for f in self.dir.iterdir() if _STATE_NAME.fullmatch(f.name)), key=_state_order,
                        reverse=True)
        hashes: dict[str, str] = {}  # checksums of the parts, each computed once
        chosen = None
        for name in states:
            try:
                meta, arrays = read_state(self.dir / name, "resuming from the previous checkpoint")
                if meta["run_key"] != self.run_key:
                    raise self._other_run()
                self._check_parts(meta, hashes)
            except StateError as e:
                logger.warning("%s (documents after that checkpoint are scanned again).", e)
                continue
            chosen = name
            break
        if chosen is None:
            if pointer is not None and pointer["run_key"] != self.run_key:
                raise self._other_run()
            if states or (self.dir / CHECKPOINT).exists():
                logger.warning("No intact checkpoint left in %s: scanning every document again.", self.dir)
            for stale in self.dir.iterdir():  # an unfinished first checkpoint (or a damaged one) leaves nothing valid
                if stale.is_file():
                    stale.unlink()
            return
        if pointer is not None and pointer["state"] not in states:
            logger.warning("%s names %s, which is missing; resuming from %s (documents after it are scanned again).",
                           self.dir / CHECKPOINT, pointer["state"], chosen)
        self._restore(meta, arrays)
        keep = {self.part_name(i) for i in range(self.parts)} | {CHECKPOINT}
        keep |= {n for n in states if _state_order(n) <= _state_order(chosen)}  # older ones: fallbacks
        if self.done:
            try:
                check_hashes(self.dir, meta["outputs"])
                keep |= set(meta["outputs"])
            except (ValueError, OSError) as e:
                logger.warning("%s; writing this shard's top-k tables again.", e)
                self.done = False
        for f in self.dir.iterdir():  # parts and states written after the checkpoint are not counted
            if f.name not in keep and f.is_file():
                f.unlink()
        if pointer is None or (pointer["state"], pointer["done"]) != (chosen, self.done):
            self._write_pointer(chosen, self.next_seq, self.done)
        for i in range(self.parts):
            self._seen.update(pq.read_table(self.dir / self.part_name(i), columns=["doc_id"])["doc_id"].to_pylist())

    def _other_run(self) -> InputError:
        return InputError(
            f"{self.dir} holds checkpoints of a different run (other model, corpus, probes, settings or "
            "number of processes); use a new --output directory or pass --overwrite."
        )

    def _read_pointer(self) -> dict | None:
        """``checkpoint.json`` when it is intact (it only names the newest state: each state is self-contained)."""
        path = self.dir / CHECKPOINT
        if not path.exists():
            return None
        try:
            pointer = read_json(path)
            expect(isinstance(pointer, dict) and isinstance(pointer.get("run_key"), str)
                   and isinstance(pointer.get("state"), str) and isinstance(pointer.get("done"), bool), "schema")
        except (ValueError, OSError) as e:
            logger.warning("%s; resuming from the newest intact state file instead.", damaged(path, e, "ignoring it"))
            return None
        return pointer

    def _check_parts(self, meta: dict, hashes: dict[str, str]) -> None:
        """Every part the state counts exists with its checksum (``hashes`` caches them across states)."""
        expect_probes = len(self.probe_ids)
        if any(c[0] >= expect_probes for c in meta["candidates"]):
            raise StateError(f"{self.dir} holds a state for more probes than this run; {OVERWRITE_HINT}.")
        for i, digest in enumerate(meta["part_sha256"]):
            part = self.dir / self.part_name(i)
            if part.name not in hashes:
                hashes[part.name] = sha256_file(part) if part.is_file() else ""
            if hashes[part.name] != digest:
                what = "does not match its checksum" if hashes[part.name] else "is missing"
                raise StateError(f"{part} {what}; resuming from an earlier checkpoint")

    def _restore(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.parts, self.next_seq, self.done = meta["parts"], meta["next_seq"], meta["done"]
        self._part_hashes = list(meta["part_sha256"])
        self.skipped, self.counters = meta["skipped"], meta["counters"]
        self.n_documents, self.n_tokens = meta["n_documents"], meta["n_tokens"]
        self._id_type = {"int": int, "str": str, None: None}[meta["id_type"]]
        docs, t, b = [], 0, 0
        for doc_id, text, n_tok, n_base in meta["docs"]:
            docs.append((doc_id, text, arrays["token_ids"][t : t + n_tok], arrays["base"][b : b + n_base]))
            t, b = t + n_tok, b + n_base
        m = 0
        for p, d, score, raw, n_mirror in meta["candidates"]:
            doc_id, text, token_ids, base = docs[d]
            mirror = arrays["mirror"][m : m + n_mirror]
            m += n_mirror
            self._top[p].append(_Candidate(score=float(score), raw=float(raw), key=doc_sort_key(doc_id), doc_id=doc_id,
                                           text=text, token_ids=token_ids, base=base, mirror=mirror))
        for p in range(len(self._top)):
            self._prune(p)

    @staticmethod
    def part_name(i: int) -> str:
        return f"part-{i:06d}.parquet"

    # ---- adding documents -----------------------------------------------------------------------------
    def add(self, doc: ScannedDoc, skipped: Sequence[Skipped] = (), extra: np.ndarray | None = None) -> np.ndarray:
        """Score one scanned document; ``skipped`` is the scanner's running list of skipped documents.

        ``extra``: raw scores of the last probes of the pool (cached control probes) that were not scanned.
        Returns the document's raw score for every probe of the pool.
        """
        if doc.delta is not None:  # the linear read: the first-order change of the sum of the document's losses
            if self.aggregate == "max":
                raise InputError("The linear read gives each document's summed loss change, not its tokens': use "
                                 "--aggregate mean or sum with it, or --read forward.")
            raw = self.sign * doc.delta / (len(doc.token_ids) if self.aggregate == "mean" else 1)
        else:
            raw = self.read_scores(doc.base, doc.mirror)
        if extra is not None:
            raw = np.concatenate([raw, np.asarray(extra, np.float64)])
        if len(raw) != len(self.all_ids):
            raise ScoreError(f"Document {doc.doc_id!r} has {len(raw)} probe scores, expected {len(self.all_ids)}.")
        evidence = (doc.base, doc.mirror) if doc.mirror is not None else (None, None)
        doc.doc_id = self.add_scores(doc.doc_id, doc.text, doc.token_ids, raw, doc.seq, skipped, *evidence)
        return raw

    def read_scores(self, base: np.ndarray, mirror: np.ndarray) -> np.ndarray:
        """Each probe's raw score of a document read by forward passes: its token losses under the probes' mirrors
        (``mirror``: [probes, tokens]) against the base model's (``base``), signed and aggregated over its tokens."""
        support = self.sign * (mirror - base)  # [probes, tokens]; > 0 where the mirror supports
        return getattr(support, self.aggregate)(axis=1).astype(np.float64)

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
            if self._eligible is not None and str(doc_id) not in self._eligible[p]:
                continue  # not one of this probe's candidates
            if floor is not None and (-s, key) > floor:
                continue  # worse than the k-th best so far: cannot enter this probe's top-k
            base_p, mirror_p = (base, mirror[p].copy()) if base is not None and mirror is not None else (empty, empty)
            self._top[p].append(_Candidate(score=s, raw=float(raw[p]), key=key, doc_id=doc_id, text=text,
                                           token_ids=token_ids, base=base_p, mirror=mirror_p))
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
                "or pass --id-column none to use each document's running index."
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
    def checkpoint(self, next_seq: int, skipped: Sequence[Skipped] = (), done: bool = False,
                   outputs: dict[str, str] | None = None) -> None:
        """Persist everything up to stream position ``next_seq``: a new part, the top-k state, the pointer.

        ``outputs``: checksums of the shard's finished tables (with ``done``), verified on resume.
        """
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
            data = sink.getvalue().to_pybytes()
            atomic_write(self.dir / self.part_name(self.parts), data)
            self._part_hashes.append(sha256_bytes(data))
            self.parts += 1
            for v in self._rows.values():
                v.clear()
        state_name = f"state-{self.parts:06d}-{next_seq}.npz"
        atomic_write(self.dir / state_name, self._state_bytes(next_seq, done, outputs or {}))
        self._write_pointer(state_name, next_seq, done)
        states = sorted((f.name for f in self.dir.iterdir() if _STATE_NAME.fullmatch(f.name)), key=_state_order)
        for name in states[:-2]:  # keep this state and the one before it (a fallback)
            (self.dir / name).unlink(missing_ok=True)
        self.next_seq, self.done = next_seq, done
        self._since, self._last_time = 0, time.monotonic()

    def _write_pointer(self, state_name: str, next_seq: int, done: bool) -> None:
        pointer = {"run_key": self.run_key, "parts": self.parts, "next_seq": next_seq, "state": state_name,
                   "done": done}
        atomic_write(self.dir / CHECKPOINT, json.dumps(pointer).encode())

    def _state_bytes(self, next_seq: int, done: bool, outputs: dict[str, str]) -> bytes:
        """The state as an ``.npz`` (no pickle): a JSON ``meta`` plus the candidates' concatenated arrays.

        Documents that are top-k of several probes are stored once; each candidate keeps its own mirror losses.
        """
        index: dict[object, int] = {}
        docs, candidates, tokens, bases, mirrors = [], [], [], [], []
        for p, top in enumerate(self._top):
            for c in top:
                if c.doc_id not in index:
                    index[c.doc_id] = len(docs)
                    docs.append([c.doc_id, c.text, len(c.token_ids), len(c.base)])
                    tokens.append(np.asarray(c.token_ids, np.int64))
                    bases.append(np.asarray(c.base, np.float32))
                candidates.append([p, index[c.doc_id], c.score, c.raw, len(c.mirror)])
                mirrors.append(np.asarray(c.mirror, np.float32))
        meta = {"format": STATE_FORMAT, "run_key": self.run_key, "parts": self.parts, "next_seq": next_seq,
                "done": done, "part_sha256": self._part_hashes, "outputs": outputs, "skipped": self.skipped,
                "n_documents": self.n_documents, "n_tokens": self.n_tokens,
                "id_type": None if self._id_type is None else self._id_type.__name__, "counters": self.counters,
                "docs": docs, "candidates": candidates}
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8),
                 token_ids=_concat(tokens, np.int64), base=_concat(bases, np.float32),
                 mirror=_concat(mirrors, np.float32))
        return buf.getvalue()

    def finish(self, next_seq: int, skipped: Sequence[Skipped], tokenizer, counters: dict | None = None) -> None:
        """This shard's top-k and evidence tables, then the final checkpoint (with ``counters`` added)."""
        for k, v in (counters or {}).items():
            self.counters[k] = self.counters.get(k, 0) + v
        outputs = {}
        for name, frame in zip(OUTPUTS, self.topk_frames(tokenizer), strict=True):
            data = frame.to_parquet(index=False)
            atomic_write(self.dir / name, data)
            outputs[name] = sha256_bytes(data)
        self.checkpoint(next_seq, skipped, done=True, outputs=outputs)

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


def _state_order(name: str) -> tuple[int, int]:
    parts, seq = _STATE_NAME.fullmatch(name).groups()  # type: ignore[union-attr]
    return int(parts), int(seq)


def _concat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def read_state(path: Path, fix: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A state file, validated (zip CRCs, array types, JSON schema); any damage raises StateError."""
    try:
        data = path.read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad = z.testzip()  # reads every member: checks its CRC
            expect(bad is None, f"bad CRC in {bad}")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            expect(sorted(z.files) == ["base", "meta", "mirror", "token_ids"], f"members {sorted(z.files)}")
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            arrays = {k: z[k] for k in ("token_ids", "base", "mirror")}
        _check_meta(meta, arrays)
    except Exception as e:  # whatever the damage (zip, npy header, JSON, schema): one clear error
        raise damaged(path, e, fix) from e
    return meta, arrays


def _check_meta(meta: object, arrays: dict[str, np.ndarray]) -> None:
    expect(isinstance(meta, dict) and meta.get("format") == STATE_FORMAT, "not an hf_mirror state")
    assert isinstance(meta, dict)
    fields = {"run_key": str, "parts": int, "next_seq": int, "done": bool, "part_sha256": list, "outputs": dict,
              "skipped": list, "n_documents": int, "n_tokens": int, "counters": dict, "docs": list, "candidates": list}
    for k, t in fields.items():
        expect(isinstance(meta.get(k), t), f"field {k!r}")
    expect(meta.get("id_type") in (None, "int", "str"), "field 'id_type'")
    expect(len(meta["part_sha256"]) == meta["parts"], "one checksum per part")
    expect(all(isinstance(s, dict) and {"doc_id", "reason", "seq"} <= set(s) for s in meta["skipped"]), "skipped")
    for k, dtype in (("token_ids", np.int64), ("base", np.float32), ("mirror", np.float32)):
        expect(arrays[k].dtype == dtype and arrays[k].ndim == 1, f"array {k!r}")
    ok = all(isinstance(d, list) and len(d) == 4 and isinstance(d[1], str) for d in meta["docs"])
    expect(ok and sum(d[2] for d in meta["docs"]) == len(arrays["token_ids"])
           and sum(d[3] for d in meta["docs"]) == len(arrays["base"]), "documents")
    ok = all(isinstance(c, list) and len(c) == 5 and c[0] >= 0 and 0 <= c[1] < len(meta["docs"])
             for c in meta["candidates"])
    expect(ok and sum(c[4] for c in meta["candidates"]) == len(arrays["mirror"]), "candidates")


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
