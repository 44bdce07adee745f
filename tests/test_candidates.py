"""Retrieve-then-rerank: BM25 picks each probe's candidates, the mirror scores only those, with the same scores."""

from __future__ import annotations

import numpy as np
import pytest

from hf_mirror import InputError, ScanConfig, attribute
from hf_mirror.candidates import parse_candidates


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
    full = attribute(model, planted.texts, probes, output_dir=tmp_path / "full",
                     scan=ScanConfig(normalize="none", cache=False), **kw)
    rerank = attribute(model, planted.texts, probes, output_dir=tmp_path / "rerank",
                       scan=ScanConfig(normalize="none", candidates=3), **kw)
    n_candidates = rerank.config["candidate_documents"]
    assert 8 <= n_candidates <= 24 and rerank.config["stats"]["documents"] == n_candidates
    assert rerank.config["stats"]["forward_passes"] < full.config["stats"]["forward_passes"] / 2
    assert full.scores()["bm25"].notna().all()  # 60 documents: all within the default 100 candidates
    for i, p in enumerate(probes):  # the planted source (document i) survives the BM25 cut and ranks first
        assert rerank.top(p["id"], 1)["doc_id"][0] == i
        assert rerank.top(p["id"], 1)["bm25"][0] > 0  # the lexical answer beside the mirror's: it is a candidate
    a = full.scores().set_index(["probe_id", "doc_id"])["score"]
    b = rerank.scores().set_index(["probe_id", "doc_id"])["score"]
    np.testing.assert_allclose(b, a.loc[b.index], atol=1e-5)
