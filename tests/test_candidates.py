"""Retrieve-then-rerank: BM25 picks each probe's candidates, the mirror scores only those, with the same scores."""

from __future__ import annotations

import numpy as np
import pytest

from hf_mirror import InputError, RankingConfig, RetrievalConfig, ScanConfig, ScoringConfig, SpeedConfig, attribute
from hf_mirror.config import parse_candidates


def test_parse_candidates():
    assert parse_candidates("bm25:200") == 200 and parse_candidates("7") == 7 and parse_candidates(None) is None
    assert parse_candidates("all") is None and parse_candidates("auto") == "auto"
    for bad in ("tfidf:5", "bm25:0", "bm25:x"):
        with pytest.raises(InputError, match="bm25:M"):
            parse_candidates(bad)


def test_rerank_scores_only_candidates_and_keeps_the_answer(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    probes = planted.probes()[:8]
    kw = dict(tokenizer=tok, show_progress=False)
    scoring = ScoringConfig(normalize="none", exact_head=0)  # the scan's scores (the exact head is over what it scans)
    full = attribute(model, planted.texts, probes, output_dir=tmp_path / "full",
                     scan=ScanConfig(scoring=scoring, ranking=RankingConfig(rank_by="mirror"),
                                     speed=SpeedConfig(cache=False)), **kw)
    rerank = attribute(model, planted.texts, probes, output_dir=tmp_path / "rerank",
                       scan=ScanConfig(scoring=scoring, retrieval=RetrievalConfig(candidates=3),
                                       ranking=RankingConfig(rank_by="mirror")), **kw)
    n_candidates = rerank.config["candidate_documents"]
    assert 8 <= n_candidates <= 24 and rerank.config["stats"]["documents"] == n_candidates
    # the rerank reads a fraction of the corpus's tokens (passes say less: the linear read packs short windows)
    assert rerank.config["stats"]["window_tokens"] < full.config["stats"]["window_tokens"] / 2
    assert full.scores()["bm25"].notna().all()  # a full scan: every document's BM25 score
    assert rerank.scores()["bm25"].notna().sum() <= 8 * 3  # a rerank: the candidates' only
    for i, p in enumerate(probes):  # the planted source (document i) survives the BM25 cut and ranks first
        assert rerank.top(p["id"], 1)["doc_id"][0] == i
        assert rerank.top(p["id"], 1)["bm25"][0] > 0  # the lexical answer beside the mirror's: it is a candidate
    a = full.scores().set_index(["probe_id", "doc_id"])["score"]
    b = rerank.scores().set_index(["probe_id", "doc_id"])["score"]
    np.testing.assert_allclose(b, a.loc[b.index], atol=1e-5)


def test_hybrid_keeps_clear_lexical_answers_and_lets_the_mirror_break_near_ties():
    import pandas as pd

    from hf_mirror.fusion import fuse

    frame = pd.DataFrame({"probe_id": ["p"] * 4, "doc_id": ["a", "b", "c", "d"], "bm25": [10.0, 5.0, 4.9, None],
                          "mirror": [0.0, -1.0, 3.0, 9.0]})
    score = fuse(frame, weight=0.1)
    assert score.isna().tolist() == [False, False, False, True]  # d is not a candidate: no final score
    order = frame.assign(score=score).dropna(subset=["score"]).sort_values("score", ascending=False)["doc_id"]
    assert order.tolist() == ["a", "c", "b"]  # a stays first; c overtakes b (lexical near-tie, mirror far ahead)


def test_default_run_ranks_candidates_by_the_hybrid_with_both_answers(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    probes = planted.probes()[:4]
    result = attribute(model, planted.texts, probes, tokenizer=tok, output_dir=tmp_path / "hybrid",
                       show_progress=False)
    assert result.config["scan"]["rank_by"] == "hybrid" and result.config["candidate_documents"] is None
    scores = result.scores()
    assert scores["raw_score"].notna().all() and len(scores) == 4 * len(planted.texts)  # full influence column
    for i, p in enumerate(probes):
        top = result.top(p["id"])
        assert top["doc_id"][0] == i and top[["bm25", "mirror", "raw_score"]].notna().all().all()
        assert len(result.token_deltas(p["id"], top["doc_id"][0])) > 0  # evidence for the final top documents
        mine = scores[scores["probe_id"] == p["id"]]
        assert mine["score"].notna().sum() == 20  # the probe's 20 BM25 candidates get a final score
        ranked = mine.dropna(subset=["score"])  # the default weight (0): the candidates in BM25's order
        np.testing.assert_allclose(ranked["score"], ranked["bm25"] / ranked["bm25"].max(), rtol=1e-12)
        assert (ranked["mirror"].std() > 0) and ranked["influence"].notna().all()  # the mirror's answer beside it


def test_the_influence_column_is_the_mirror_plus_the_lexical_prior_over_every_document(tiny_model, planted,
                                                                                       tmp_path):
    """``influence`` = mirror / sd + lexical_weight x BM25 / sd over each probe's scored documents (BM25 of every
    document, 0 where it shares no word), in scores.parquet and the top-k alike; weight 0 is the mirror alone."""
    from hf_mirror.fusion import influence
    from hf_mirror.probes import Probe
    from hf_mirror.retrieval import retrieve

    model, tok = tiny_model
    probes = planted.probes()[:3]
    texts = [*planted.texts, "zzz qqq"]  # a document that shares no word with any probe: BM25 0
    runs = {w: attribute(model, texts, probes, tokenizer=tok, output_dir=tmp_path / f"w{w}", show_progress=False,
                         scan=ScanConfig(ranking=RankingConfig(lexical_weight=w))) for w in (0.5, 0.0)}
    result = runs[0.5]
    assert result.config["scan"]["lexical_weight"] == 0.5
    scores = result.scores()
    done = [Probe(p["id"], p["prompt"], r["completion"]) for p, r in zip(probes, result.probe_records, strict=True)]
    every = retrieve(enumerate(texts), done, 20, keep_all=lambda n: True)
    for p in done:
        mine = scores[scores["probe_id"] == p.id].sort_values("doc_id")
        lexical = every.bm25([p.id] * len(mine), mine["doc_id"].tolist())
        assert lexical[-1] == 0.0 and (lexical > 0).sum() > 20  # beyond the 20 candidates
        np.testing.assert_allclose(mine["bm25"], lexical, rtol=1e-6)  # each scored document's BM25 score
        np.testing.assert_allclose(mine["influence"], influence(mine["mirror"], lexical, 0.5), rtol=1e-9)
        top = result.top(p.id).merge(mine[["doc_id", "influence"]], on="doc_id", suffixes=("", "_all"))
        np.testing.assert_allclose(top["influence"], top["influence_all"], rtol=1e-12)
        alone = runs[0.0].scores().query("probe_id == @p.id").sort_values("doc_id")
        np.testing.assert_allclose(alone["influence"], mine["mirror"] / mine["mirror"].std(ddof=0), rtol=1e-9)


def test_scaled_sum_drops_a_term_without_spread():
    from hf_mirror.fusion import scaled_sum

    np.testing.assert_allclose(scaled_sum(np.array([1.0, 3.0]), np.array([2.0, 0.0]), 0.5, 2.0, 0.0), [0.5, 1.5])
    np.testing.assert_allclose(scaled_sum(np.array([1.0, 3.0]), np.array([2.0, 0.0]), 0.5, np.array([0.0, 1.0]),
                                          np.array([4.0, 4.0])), [0.25, 3.0])


def test_the_hybrid_rule_is_chosen_on_tune_halves_then_by_average_precision_then_the_least_mirror():
    import pandas as pd

    from benchmarks.hybrid import choose, evaluate_rules

    docs = [f"d{i}" for i in range(6)]
    # probe p0's answer d1 is BM25's second (a near-tie) and the mirror's first; p1's answer d0 wins both
    bm25 = pd.DataFrame({"probe_id": ["p0"] * 6 + ["p1"] * 6, "doc_id": docs * 2,
                         "score": [5.0, 4.9, 1, 1, 0, 0, 6.0, 2, 1, 1, 0, 0]})
    mirror = pd.DataFrame({"probe_id": ["p0"] * 6 + ["p1"] * 6, "doc_id": docs * 2,
                           "raw_score": [0.0, 0.9, 0, 0, 0.1, 0, 0.8, 0, 0, 0, 0, 0.9]})
    rules = evaluate_rules(mirror, bm25, {"p0": ["d1"], "p1": ["d0"]}, k=2, rules=("bm25", "hybrid@20:0.1", "mirror"))
    assert rules["bm25"]["tune"]["mrr"] == 0.5 and rules["hybrid@20:0.1"]["tune"]["mrr"] == 1.0
    assert rules["mirror"]["held_out"]["mrr"] == 0.5 and rules["hybrid@20:0.1"]["held_out"]["mrr"] == 1.0
    assert rules["bm25"]["tune"]["map"] == 0.5  # one answer per probe: average precision = reciprocal rank
    assert choose({"b": {"rules": rules}}, k=2) == "hybrid@20:0.1"  # the best tune MRR + recall@2

    def report(maps: dict[str, float]) -> dict:  # every rule tied on MRR + recall@10, with these tune MAPs
        return {"b": {"rules": {r: {"tune": {"mrr": 1.0, "recall@10": 1.0, "map": m}} for r, m in maps.items()}}}

    assert choose(report({"bm25": 0.97, "hybrid@20:0.05": 0.96, "mirror": 0.99})) == "mirror"  # the best MAP
    assert choose(report({"mirror": 0.97, "hybrid@20:0.05": 0.97, "bm25": 0.97})) == "bm25"  # then the least mirror


def test_the_default_rule_is_bm25s_order_of_the_candidates():
    """The library's default weight (0) ranks exactly as BM25 does, here and in `attribute` (hf_mirror.fusion)."""
    import pandas as pd

    from benchmarks.fact_tracing import rankings
    from benchmarks.hybrid import DEFAULT_RULE, fuse
    from hf_mirror.config import MIRROR_WEIGHT, ScanConfig

    assert ScanConfig().ranking.mirror_weight == MIRROR_WEIGHT == 0 and DEFAULT_RULE == "hybrid@20:0"
    rng = np.random.default_rng(0)
    n = 60
    probes = np.repeat(["p0", "p1", "p2"], n)
    bm25 = pd.DataFrame({"probe_id": probes, "doc_id": [f"d{i}" for i in range(n)] * 3,
                         "score": rng.integers(0, 8, 3 * n).astype(float)})  # many exact ties
    mirror = bm25[["probe_id", "doc_id"]].assign(raw_score=rng.normal(size=3 * n))
    ids = ["p0", "p1", "p2"]
    assert rankings(fuse(mirror, bm25, DEFAULT_RULE), ids) == rankings(fuse(mirror, bm25, "bm25"), ids)
    assert rankings(fuse(mirror, bm25, "hybrid@20:0.5"), ids) != rankings(fuse(mirror, bm25, "bm25"), ids)


def test_paired_comparison_counts_each_probe_the_rule_wins_or_loses_against_bm25():
    import pandas as pd

    from benchmarks.hybrid import format_paired, paired

    docs = [f"d{i}" for i in range(4)]
    ids = [f"p{i}" for i in range(4)]  # tune: p0, p2; held out: p1, p3
    # p0: the mirror lifts the answer d1 from BM25's second to first; p2: it pushes the answer d0 to second
    bm25 = pd.DataFrame({"probe_id": sum([[p] * 4 for p in ids], []), "doc_id": docs * 4,
                         "score": [5.0, 4.9, 1, 0, 9, 1, 0, 0, 5.0, 4.9, 1, 0, 9, 1, 0, 0]})
    mirror = pd.DataFrame({"probe_id": bm25["probe_id"], "doc_id": bm25["doc_id"],
                           "raw_score": [0, 9.0, 0, 0, 1, 0, 0, 0, 0, 9.0, 0, 0, 1, 0, 0, 0]})
    answers = {"p0": ["d1"], "p1": ["d0"], "p2": ["d0"], "p3": ["d0"]}
    out = paired(mirror, bm25, answers, "hybrid@20:1.0", k=1, resamples=200)
    tune, held = out["tune"]["mrr"], out["held_out"]["mrr"]
    assert (tune["wins"], tune["losses"], tune["mean"]) == (1, 1, 0.0) and tune["ci95"][0] < 0 < tune["ci95"][1]
    assert (held["wins"], held["losses"], held["mean"], held["ci95"]) == (0, 0, 0.0, [0.0, 0.0])
    report = {"b": {"paired": {"rule": "hybrid@20:1.0", **out}}}
    assert "| b | hybrid@20:1.0 | tune | mrr | +0.000 |" in format_paired(report) and "1 / 1 |" in format_paired(report)


def test_normalized_mirror_table_is_each_documents_normalisation_across_probes_in_table_order():
    import pandas as pd

    from benchmarks.hybrid import normalized
    from hf_mirror.scoring import normalize_scores

    probes, docs = ["p2", "p0", "p1"], ["b", "a"]  # neither sorted: halves follow the table's order
    raw = {("p2", "b"): 3.0, ("p0", "b"): 1.0, ("p1", "b"): 2.0, ("p2", "a"): 0.5, ("p0", "a"): 0.0, ("p1", "a"): 4.0}
    table = pd.DataFrame([(p, d, raw[p, d]) for p in probes for d in docs], columns=["probe_id", "doc_id", "raw_score"])
    assert normalized(table, "none") is table
    for method in ("zscore", "loo"):
        out = normalized(table, method)
        assert list(zip(out["probe_id"], out["doc_id"], strict=True)) == list(zip(table["probe_id"], table["doc_id"],
                                                                                  strict=True))
        for d in docs:
            want = normalize_scores(np.array([raw[p, d] for p in probes]), method)
            np.testing.assert_allclose(out.set_index(["probe_id", "doc_id"]).loc[[(p, d) for p in probes],
                                                                                   "raw_score"], want)


def test_auto_scans_every_document_up_to_a_size_that_depends_on_the_read():
    """``--candidates auto``: the forward read scans every document up to FULL_SCAN_MAX, the linear read (whose cost
    hardly grows with the probes) up to LINEAR_FULL_SCAN_MAX; an explicit rule holds whatever the read."""
    from hf_mirror.config import FULL_SCAN_MAX, LINEAR_FULL_SCAN_MAX, RetrievalConfig

    auto = RetrievalConfig()
    assert not auto.candidates_only(FULL_SCAN_MAX, "forward") and auto.candidates_only(FULL_SCAN_MAX + 1, "forward")
    assert not auto.candidates_only(LINEAR_FULL_SCAN_MAX, "linear")
    assert auto.candidates_only(LINEAR_FULL_SCAN_MAX + 1, "linear") and LINEAR_FULL_SCAN_MAX >= 100_000
    for read in ("forward", "linear"):
        assert RetrievalConfig(candidates="bm25:5").candidates_only(10, read)
        assert not RetrievalConfig(candidates="all").candidates_only(10**9, read)
