"""merge.py: finished shards into one answer that does not depend on how documents were split over processes; the
BM25 and dense columns, the fused score and the influence column joined at the merge."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hf_mirror.errors import StateError
from hf_mirror.fusion import Ranking, fuse, scaled_sum
from hf_mirror.merge import merge_shards
from hf_mirror.scan import ScannedDoc, Skipped
from hf_mirror.scoring import ScoreBook

PROBES = ["a", "b"]
# doc id -> (probe a's mirror delta, probe b's): documents 2 and 4 tie for probe a
DELTAS = {0: (0.1, 0.9), 1: (0.5, 0.2), 2: (0.7, 0.1), 3: (0.3, 0.4), 4: (0.7, 0.0), 5: (0.2, 0.6)}


class Chars:
    is_fast = False

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def shards(root, world: int, top_k: int = 2, skip: int | None = None, eligible=None) -> list:
    """The documents dealt round-robin to ``world`` finished shards, as ``world`` processes would write them."""
    dirs = []
    for rank in range(world):
        book = ScoreBook(PROBES, sign=1.0, normalize="none", top_k=top_k, shard_dir=root / f"rank-{rank}",
                         eligible=eligible)
        mine = [d for d in DELTAS if d % world == rank]
        skipped = []
        for seq, d in enumerate(mine):
            if d == skip:
                skipped.append(Skipped(d, "empty or whitespace-only", seq))
                continue
            a, b = DELTAS[d]
            book.add(ScannedDoc(doc_id=d, text=f"doc {d}", token_ids=np.array([100, 111]), base=np.zeros(2, np.float32),
                                mirror=np.array([[a, a], [b, b]], np.float32), seq=seq), skipped)
        book.finish(len(mine), skipped, Chars(), {"forward_passes": 3})
        dirs.append(book.dir)
    return dirs


@pytest.mark.parametrize("world", [2, 3])
def test_the_answer_does_not_depend_on_the_number_of_processes(tmp_path, world):
    one = merge_shards(shards(tmp_path / "one", 1), tmp_path / "one", PROBES, 2)
    many = merge_shards(shards(tmp_path / "many", world), tmp_path / "many", PROBES, 2)
    pd.testing.assert_frame_equal(one["topk"], many["topk"])
    pd.testing.assert_frame_equal(one["evidence"], many["evidence"])
    order = ["probe_id", "doc_id"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "one" / "scores.parquet").sort_values(order).reset_index(drop=True),
        pd.read_parquet(tmp_path / "many" / "scores.parquet").sort_values(order).reset_index(drop=True))
    assert one["stats"]["documents"] == many["stats"]["documents"] == 6
    assert many["stats"]["forward_passes"] == 3 * world  # per-process counters are summed


def test_ranks_run_from_one_per_probe_with_ties_broken_by_document_id(tmp_path):
    merged = merge_shards(shards(tmp_path, 2), tmp_path, PROBES, 2)
    topk = merged["topk"]
    assert list(topk.probe_id) == ["a", "a", "b", "b"] and list(topk["rank"]) == [1, 2, 1, 2]
    assert list(topk[topk.probe_id == "a"].doc_id) == [2, 4]  # both 0.7: the lower id first
    assert list(topk[topk.probe_id == "b"].doc_id) == [0, 5]
    ev = merged["evidence"]
    assert list(ev.drop_duplicates(["probe_id", "doc_id"]).doc_id) == [2, 4, 0, 5]  # in rank order
    assert set(ev.token) == {"d", "o"}


def test_skipped_documents_are_collected_in_id_order(tmp_path):
    merged = merge_shards(shards(tmp_path, 2, skip=3), tmp_path, PROBES, 2)
    assert merged["skipped"] == [{"doc_id": 3, "reason": "empty or whitespace-only"}]
    assert merged["stats"]["skipped"] == 1 and merged["stats"]["documents"] == 5


def test_the_fused_score_ranks_the_candidates_and_keeps_the_mirror_beside_it(tmp_path):
    retrieval = {"a": {0: 4.0, 1: 2.0, 3: 1.0}, "b": {5: 1.0, 2: 3.0}}
    eligible = {p: {str(d) for d in docs} for p, docs in retrieval.items()}
    ranking = Ranking(rank_by="hybrid", mirror_weight=0.0, lexical_weight=0.0)
    merged = merge_shards(shards(tmp_path, 2, top_k=6, eligible=eligible), tmp_path, PROBES, 6, retrieval, ranking)
    topk = merged["topk"]
    assert list(topk.columns[-2:]) == ["bm25", "mirror"]
    assert list(topk[topk.probe_id == "a"].doc_id) == [0, 1, 3]  # weight 0: BM25's order, only the candidates
    assert list(topk[topk.probe_id == "b"].doc_id) == [2, 5]
    a = topk[topk.probe_id == "a"]
    assert np.allclose(a.mirror, [DELTAS[d][0] for d in a.doc_id])
    assert np.allclose(a.score, fuse(a.assign(mirror=a.mirror), 0.0))
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert scores.score.isna().sum() == 12 - 5  # every non-candidate: no final score
    assert np.allclose(scores.sort_values(["probe_id", "doc_id"]).mirror,
                       [DELTAS[d][p] for p in (0, 1) for d in sorted(DELTAS)], atol=1e-6)


def test_the_influence_column_scales_each_term_by_its_spread_over_the_scored_documents(tmp_path):
    every = {"a": {d: float(d) for d in DELTAS}, "b": {d: 0.0 for d in DELTAS}}

    def prior(probes, docs):
        return np.array([every[p][d] for p, d in zip(probes, docs, strict=True)], np.float64)

    ranking = Ranking(rank_by="mirror", mirror_weight=0.0, lexical_weight=0.5)
    merged = merge_shards(shards(tmp_path, 2, top_k=6), tmp_path, PROBES, 6, ranking=ranking, lexical=prior)
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    for p, i in (("a", 0), ("b", 1)):
        rows = scores[scores.probe_id == p].sort_values("doc_id")
        mirror = np.array([DELTAS[d][i] for d in rows.doc_id], np.float32).astype(np.float64)
        lexical = np.array([every[p][d] for d in rows.doc_id])
        want = scaled_sum(mirror, lexical, 0.5, mirror.std(), lexical.std())
        assert np.allclose(rows.influence, want), p
    topk = merged["topk"].sort_values(["probe_id", "doc_id"])
    assert np.allclose(topk.influence, scores.sort_values(["probe_id", "doc_id"]).influence)


def test_an_unfinished_shard_is_refused(tmp_path):
    book = ScoreBook(PROBES, sign=1.0, normalize="none", top_k=2, shard_dir=tmp_path / "rank-0")
    book.add(ScannedDoc(doc_id=0, text="x", token_ids=np.array([120]), base=np.zeros(1, np.float32),
                        mirror=np.zeros((2, 1), np.float32), seq=0))
    with pytest.raises(StateError):
        merge_shards([book.dir], tmp_path, PROBES, 2)
