"""The merge: every process's shard into one answer (``scores.parquet``, the ranked top-k and its evidence).

Ranks are recomputed over all shards with one tie-break (score, then document id), so the answer does not depend
on how documents were split over processes. The mixed read's exact values (:func:`exact_head` picks the documents,
the pipeline reads them again) replace the shards' first-order ones for their pairs as the parts and top-k rows are
read. The retrieval scores join the mirror's here, and the run's :class:`hf_mirror.fusion.Ranking` makes the final
``score``, ``mirror`` and ``influence`` columns from them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hf_mirror.fusion import Ranking
from hf_mirror.integrity import OVERWRITE_HINT, checked, damaged, read_json
from hf_mirror.scoring import CHECKPOINT, EVIDENCE_COLUMNS, TOPK_COLUMNS, ScoreBook, doc_sort_key, read_state

_FIX = f"rerun the same command to resume from the last intact checkpoint, or {OVERWRITE_HINT}"  # damaged shards


def merge_shards(shard_dirs: Sequence[Path], out: Path, probe_ids: Sequence[str], top_k: int,
                 retrieval: dict[str, dict] | None = None, ranking: Ranking | None = None,
                 lexical: Callable[[Sequence, Sequence], np.ndarray] | None = None,
                 dense: dict[str, dict] | None = None, exact: pd.DataFrame | None = None) -> dict:
    """Merge every process's shard into ``scores.parquet`` and return the merged top-k, evidence and stats.

    The merged answer does not depend on how documents were split over processes: ranks are recomputed
    over all shards with the same tie-break (score, then document id). ``retrieval`` (probe id -> {doc id:
    BM25 score} of its candidates) becomes a ``bm25`` column beside the mirror's scores (NaN: not a candidate; in
    ``scores.parquet`` every document's BM25 score where ``lexical`` knows it).
    ``ranking`` (None: the score stays the shards' own, as a baseline method's) owns the final columns. A hybrid one
    makes the final ``score`` from BM25 and the mirror's score (kept as ``mirror``) over each probe's candidates
    (needs ``retrieval``; the shards' top-k must hold them all), NaN elsewhere. With ``lexical`` (a (probe ids, doc
    ids) -> BM25 score lookup of every document) it adds the ``influence`` column, each term scaled by its spread
    over the probe's scored documents (:meth:`hf_mirror.fusion.Ranking.influence`). ``dense`` (probe id -> {doc id:
    cosine similarity} of the dense retriever's candidates) becomes a ``dense`` column in both tables (NaN: not a
    dense candidate). ``exact`` (rows of ``probe_id``, ``doc_id``, ``score``, ``raw_score``, ``n_tokens`` and
    ``text``: the mixed read's exact scores) replaces the shards' own scores of those pairs everywhere, before any
    column is computed from them; a pair may then enter a probe's top-k or leave it (each shard's top-k must hold
    ``top_k`` plus the number of exact rows per probe, so that what moves up from below is there).
    """
    states = [_final_state(d) for d in shard_dirs]
    bm25 = _Lookup(retrieval)
    topk = _shard_topk(shard_dirs)
    replace = None if exact is None or exact.empty else _Exact(exact)
    if replace is not None:
        topk = replace.topk(topk)
    fused = ranking is not None and ranking.hybrid
    if fused and retrieval is None:
        raise ValueError("a hybrid ranking needs each probe's BM25 candidates (retrieval)")
    estimate = (None if ranking is None or lexical is None else
                _Influence(_parts(shard_dirs, states, replace, ["probe_id", "doc_id", "score"]), bm25=lexical,
                           ranking=ranking))
    if estimate is not None and not topk.empty:
        topk["influence"] = estimate(topk["probe_id"], topk["doc_id"], topk["score"])
    if retrieval is not None and not topk.empty:
        topk["bm25"] = bm25(topk["probe_id"], topk["doc_id"])
    similarity = None if dense is None else _Lookup(dense)
    if similarity is not None and not topk.empty:
        topk["dense"] = similarity(topk["probe_id"], topk["doc_id"])
    if fused and not topk.empty:
        topk["mirror"] = topk["score"]
        topk["score"] = ranking.score_column(topk)
        topk = topk[topk["score"].notna()]
    final = _Lookup.of(topk) if fused else None
    every = None if retrieval is None else lexical if lexical is not None else bm25  # every document's, if known
    _write_scores(_parts(shard_dirs, states, replace), out, {"bm25": every, "dense": similarity}, final,
                  estimate)
    evidence = pd.concat([checked(d / "evidence.parquet", pd.read_parquet, _FIX) for d in shard_dirs],
                         ignore_index=True)
    topk, evidence = _ranked(topk, evidence, probe_ids, top_k)
    columns = [*TOPK_COLUMNS, *(["bm25"] if retrieval is not None else []), *(["dense"] if dense is not None else []),
               *(["mirror"] if fused else []), *(["influence"] if estimate is not None else [])]
    return {"topk": topk[columns] if not topk.empty else pd.DataFrame(columns=columns),
            "evidence": evidence[EVIDENCE_COLUMNS] if not evidence.empty else pd.DataFrame(columns=EVIDENCE_COLUMNS),
            **_totals(states)}


def exact_head(shard_dirs: Sequence[Path], n: int) -> pd.DataFrame:
    """Each probe's ``n`` documents with the largest raw score by magnitude over every finished shard (ties: the smaller
    document id first), as rows of ``probe_id``, ``doc_id``, ``raw_score``, ``n_tokens`` and ``text`` (where a shard's
    top-k holds it, else None): the documents the mixed read reads again exactly (:func:`merge_shards`'s ``exact``)."""
    states = [_final_state(d) for d in shard_dirs]
    head = None
    for part in _parts(shard_dirs, states, columns=["probe_id", "doc_id", "raw_score", "n_tokens"]):
        frame = part.to_pandas()
        head = _largest(frame if head is None else pd.concat([head, frame], ignore_index=True), n)
    if head is None:
        return pd.DataFrame(columns=["probe_id", "doc_id", "raw_score", "n_tokens", "text"])
    topk = _shard_topk(shard_dirs)
    texts = dict(zip(topk["doc_id"].astype(str), topk["text"], strict=True))
    return head.assign(text=pd.Series([texts.get(str(d)) for d in head["doc_id"]], head.index, object)
                       ).reset_index(drop=True)


def _largest(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """Each probe's ``n`` rows of ``frame`` with the largest ``raw_score`` by magnitude (ties: the smaller doc id)."""
    frame = frame.assign(_abs=frame["raw_score"].abs()).sort_values(["probe_id", "_abs", "doc_id"],
                                                                   ascending=[True, False, True], kind="stable")
    return frame.groupby("probe_id", sort=False).head(n).drop(columns="_abs")


def _shard_topk(shard_dirs: Sequence[Path]) -> pd.DataFrame:
    """Every shard's top-k rows, one frame."""
    return pd.concat([checked(d / "topk.parquet", pd.read_parquet, _FIX) for d in shard_dirs], ignore_index=True)


def _parts(shard_dirs: Sequence[Path], states: list[dict], exact: _Exact | None = None,
           columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Every shard's score parts in order (``columns`` of them; None: all), with the exact scores in place."""
    for d, meta in zip(shard_dirs, states, strict=True):
        for i in range(meta["parts"]):
            table = checked(d / ScoreBook.part_name(i), lambda p: pq.read_table(p, columns=columns), _FIX)
            yield table if exact is None else exact(table)


class _Exact:
    """The mixed read's exact ``score`` and ``raw_score`` of some (probe, document) pairs, put in place of the shards'
    own: in a score part (called on it) and among the top-k rows (:meth:`topk`)."""

    COLUMNS = ("score", "raw_score")

    def __init__(self, rows: pd.DataFrame) -> None:
        self.rows = rows
        self.values = {(p, str(d)): v for p, d, *v in zip(rows["probe_id"], rows["doc_id"], rows["score"],
                                                          rows["raw_score"], strict=True)}

    def __call__(self, table: pa.Table) -> pa.Table:
        keys = zip(table["probe_id"].to_pylist(), map(str, table["doc_id"].to_pylist()), strict=True)
        hits = [(i, self.values[k]) for i, k in enumerate(keys) if k in self.values]
        if not hits:
            return table
        at, values = np.array([i for i, _ in hits]), np.array([v for _, v in hits], np.float64)
        for j, name in enumerate(self.COLUMNS):
            if name in table.column_names:
                column = table[name].to_numpy().astype(np.float64)  # a copy
                column[at] = values[:, j]
                table = table.set_column(table.schema.get_field_index(name), name, pa.array(column, pa.float64()))
        return table

    def topk(self, topk: pd.DataFrame) -> pd.DataFrame:
        """The shards' top-k rows without the exact pairs, and the exact rows beside them (ranked later)."""
        stale = [(p, str(d)) in self.values for p, d in zip(topk["probe_id"], topk["doc_id"], strict=True)]
        fresh = self.rows.assign(rank=0)[TOPK_COLUMNS]
        kept = topk[~np.array(stale, bool)]
        return fresh.reset_index(drop=True) if kept.empty else pd.concat([kept, fresh], ignore_index=True)


class _Lookup:
    """A (probe id, document id) -> value table, read by columns (NaN where absent)."""

    def __init__(self, values: dict[str, dict] | None) -> None:
        self.values = {(p, str(d)): v for p, docs in (values or {}).items() for d, v in docs.items()}

    @classmethod
    def of(cls, frame: pd.DataFrame, column: str = "score") -> _Lookup:
        out = cls({})
        out.values = {(p, str(d)): v for p, d, v in zip(frame["probe_id"], frame["doc_id"], frame[column],
                                                         strict=True)}
        return out

    def __call__(self, probes: Sequence, docs: Sequence) -> np.ndarray:
        return np.array([self.values.get((p, str(d)), np.nan) for p, d in zip(probes, docs, strict=True)],
                        np.float64)


class _Influence:
    """The influence column: each probe's mirror and BM25 scores, scaled by their spread over its scored documents
    (one read of every score part to measure the spreads)."""

    def __init__(self, parts: Iterable[pa.Table], *, bm25: Callable, ranking: Ranking) -> None:
        self.bm25, self.ranking = bm25, ranking
        sums: dict[str, np.ndarray] = {}  # probe id -> [n, sum m, sum m^2, sum b, sum b^2]
        for table in parts:
            part = table.to_pandas()
            part = part.assign(b=bm25(part["probe_id"], part["doc_id"])).dropna(subset=["score", "b"])
            part = part.assign(m2=part["score"] ** 2, b2=part["b"] ** 2, n=1.0)
            for probe, row in part.groupby("probe_id")[["n", "score", "m2", "b", "b2"]].sum().iterrows():
                sums[probe] = sums.get(probe, 0) + row.to_numpy(np.float64)
        self.spreads = {p: (_spread(n, m, m2), _spread(n, b, b2)) for p, (n, m, m2, b, b2) in sums.items()}

    def __call__(self, probes: Sequence, docs: Sequence, mirror: Sequence) -> np.ndarray:
        spreads = np.array([self.spreads.get(p, (0.0, 0.0)) for p in probes], np.float64).reshape(-1, 2)
        lexical = np.nan_to_num(self.bm25(probes, docs))
        return self.ranking.influence(mirror=np.asarray(mirror, np.float64), bm25=lexical,
                                      mirror_spread=spreads[:, 0], bm25_spread=spreads[:, 1])


def _spread(n: float, total: float, squares: float) -> float:
    """The population standard deviation from a count, a sum and a sum of squares."""
    return float(np.sqrt(max(squares / n - (total / n) ** 2, 0.0))) if n else 0.0


def _final_state(shard: Path) -> dict:
    """The metadata of a finished shard's last state."""
    pointer = checked(shard / CHECKPOINT, read_json, _FIX)
    name = pointer.get("state") if isinstance(pointer, dict) else None
    if not isinstance(name, str):
        raise damaged(shard / CHECKPOINT, ValueError("no state named"), _FIX)
    return read_state(shard / name, _FIX)[0]


def _write_scores(parts: Iterable[pa.Table], out: Path, retrieval: dict[str, Callable | None],
                  final: _Lookup | None, estimate: _Influence | None) -> None:
    """The score parts into one ``scores.parquet`` (with each retriever's score, ``bm25`` and ``dense``, where known;
    with a hybrid ranking, ``mirror`` and the final ``score``; with the estimate, ``influence``), written
    atomically."""
    writer = None
    for table in parts:
        keys = table["probe_id"].to_pylist(), table["doc_id"].to_pylist()
        if estimate is not None:
            table = table.append_column("influence", pa.array(estimate(*keys, table["score"].to_numpy()),
                                                              pa.float64()))
        for name, lookup in retrieval.items():
            if lookup is not None:
                table = table.append_column(name, pa.array(lookup(*keys), pa.float64()))
        if final is not None:
            table = table.append_column("mirror", table["score"]).set_column(
                table.schema.get_field_index("score"), "score", pa.array(final(*keys), pa.float64()))
        if writer is None:
            writer = pq.ParquetWriter(str(out / "scores.parquet.tmp"), table.schema, write_page_checksum=True)
        writer.write_table(table.cast(writer.schema))
    if writer is not None:
        writer.close()
        os.replace(out / "scores.parquet.tmp", out / "scores.parquet")


def _ranked(topk: pd.DataFrame, evidence: pd.DataFrame, probe_ids: Sequence[str],
            top_k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each probe's best ``top_k`` rows over all shards, ranked (score, then document id), and their evidence."""
    if topk.empty:
        return topk.dropna(axis=1, how="all"), evidence
    order = {pid: i for i, pid in enumerate(probe_ids)}
    topk["_p"] = topk["probe_id"].map(order)
    topk["_neg"] = -topk["score"]
    topk = topk.sort_values(["_p", "_neg", "doc_id"], kind="stable").groupby("_p", sort=False).head(top_k)
    topk["rank"] = topk.groupby("_p").cumcount() + 1
    topk = topk.drop(columns=["_p", "_neg"]).reset_index(drop=True)
    evidence = evidence.merge(topk[["probe_id", "doc_id", "rank"]], on=["probe_id", "doc_id"], how="inner")
    evidence["_p"] = evidence["probe_id"].map(order)
    evidence = evidence.sort_values(["_p", "rank", "position"]).drop(columns=["_p", "rank"]).reset_index(drop=True)
    return topk, evidence


def _totals(states: list[dict]) -> dict:
    """The skipped documents and the summed counts of every shard."""
    skipped, stats = [], {"documents": 0, "tokens": 0}
    for saved in states:
        skipped += [{"doc_id": s["doc_id"], "reason": s["reason"]} for s in saved["skipped"]]
        stats["documents"] += saved["n_documents"]
        stats["tokens"] += saved["n_tokens"]
        for k, v in saved["counters"].items():
            stats[k] = stats.get(k, 0) + v
    skipped.sort(key=lambda s: doc_sort_key(s["doc_id"]))
    stats["skipped"] = len(skipped)
    return {"skipped": skipped, "stats": stats}
