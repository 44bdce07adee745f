"""results.py: an AttributionResult written and read back, its views (top, token deltas, scores, moved) and the
refusals of a damaged or incomplete result directory."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hf_mirror.errors import InputError, StateError
from hf_mirror.results import FILES, AttributionResult

TOPK = pd.DataFrame({
    "probe_id": ["p", "p", "q"], "rank": [1, 2, 1], "doc_id": [4, 1, 1], "score": [0.9, 0.4, 0.3],
    "raw_score": [0.9, 0.4, 0.3], "n_tokens": [2, 2, 2], "text": ["ab", "cd", "cd"],
})
EVIDENCE = pd.DataFrame({
    "probe_id": ["p", "p", "p", "p"], "doc_id": [4, 4, 1, 1], "position": [1, 0, 0, 1], "token": ["b", "a", "c", "d"],
    "base_loss": [1.0, 2.0, 1.0, 1.0], "mirror_loss": [1.5, 2.0, 1.1, 1.0], "delta": [0.5, 0.0, 0.1, 0.0],
})
SCORES = pd.DataFrame({
    "probe_id": ["p"] * 5, "doc_id": [0, 1, 2, 3, 4], "score": [np.nan, 0.4, np.nan, np.nan, 0.9],
    "raw_score": [0.05, 0.2, 0.7, 0.1, 0.3], "n_tokens": [2] * 5, "bm25": [0.0, 1.0, 0.0, 0.0, 2.0],
    "mirror": [0.05, 0.2, 0.7, 0.1, 0.3],
})
CONFIG = {"method": "mirror", "scan": {"top_k": 2}, "stats": {"documents": 5, "tokens": 10, "skipped": 1}}


@pytest.fixture
def saved(tmp_path) -> AttributionResult:
    probes = [{"id": "p", "prompt": "x", "completion": " y"}, {"id": "q", "prompt": "z", "completion": " w"}]
    out = tmp_path / "run"
    out.mkdir()
    SCORES.to_parquet(out / FILES["scores"], index=False)
    skipped = [{"doc_id": 9, "reason": "empty or whitespace-only"}]
    AttributionResult(out, topk=TOPK, evidence=EVIDENCE, probes=probes, skipped=skipped, config=CONFIG).save(out)
    return AttributionResult.load(out)


def test_a_saved_result_reads_back_the_same(saved):
    pd.testing.assert_frame_equal(saved.topk, TOPK)
    assert saved.probe_ids == ["p", "q"] and saved.probes[0].text == "x y"
    assert saved.skipped == [{"doc_id": 9, "reason": "empty or whitespace-only"}]
    assert saved.summary() == {"probes": 2, "documents": 5, "tokens": 10, "skipped": 1}
    assert "2 probes, 5 documents, 1 skipped" in repr(saved)


def test_top_is_the_probes_ranking_and_refuses_more_than_was_kept(saved):
    top = saved.top("p")
    assert list(top.doc_id) == [4, 1] and list(top["rank"]) == [1, 2] and "probe_id" not in top
    assert list(saved.top("p", 1).doc_id) == [4]
    with pytest.raises(InputError, match="Only the top 2 documents were kept; rerun with --top-k 3"):
        saved.top("p", 3)
    with pytest.raises(InputError, match="Unknown probe 'nope'"):
        saved.top("nope")


def test_token_deltas_are_in_token_order_for_a_top_document_only(saved):
    deltas = saved.token_deltas("p", 4)
    assert list(deltas.token) == ["a", "b"] and list(deltas.delta) == [0.0, 0.5]
    assert list(saved.token_deltas("p", "4").token) == ["a", "b"]  # an id as text finds it too
    with pytest.raises(InputError, match="evidence is kept for each probe's top-k documents only"):
        saved.token_deltas("p", 2)


def test_moved_ranks_every_scanned_document_by_the_mirror_whatever_the_score_ranks_by(saved):
    moved = saved.moved("p", k=3)
    assert list(moved.doc_id) == [2, 4, 1] and list(moved.columns) == ["doc_id", "mirror", "raw_score", "bm25"]
    assert saved.scores().shape == SCORES.shape
    assert len(saved.scores_dataset()) == 5


def test_a_result_without_evidence_refuses_token_deltas_naming_the_mirror(tmp_path):
    out = tmp_path / "bm25"
    config = {**CONFIG, "method": "bm25", "stats": {"documents": 0, "skipped": 0}}
    probes = [{"id": "p", "prompt": "x"}, {"id": "q", "prompt": "z"}]
    AttributionResult(out, topk=TOPK, evidence=EVIDENCE.iloc[:0], probes=probes, skipped=[], config=config).save(out)
    result = AttributionResult.load(out)
    assert not result.has_token_evidence
    with pytest.raises(InputError, match=r"\(bm25\) has no token-level evidence.*--method mirror"):
        result.token_deltas("p", 4)
    assert result.scores().empty  # no scores file, and no document counted: an empty table


def test_damaged_or_incomplete_results_are_refused(saved):
    d = saved.directory
    (d / FILES["scores"]).rename(d / "away.parquet")
    with pytest.raises(StateError, match="scores.parquet is missing"):
        AttributionResult.load(d).scores()  # documents were scored: the file must be there
    (d / FILES["skipped"]).write_text("")
    with pytest.raises(StateError, match="skipped.jsonl is damaged"):
        AttributionResult.load(d)
    (d / FILES["probes"]).write_text(json.dumps({"id": "p", "prompt": "x"}) + "\n")
    with pytest.raises(StateError, match="probes missing"):
        AttributionResult.load(d)
    (d / FILES["config"]).unlink()
    with pytest.raises(StateError, match="not a complete hf-mirror result"):
        AttributionResult.load(d)
    with pytest.raises(StateError, match="is not a directory"):
        AttributionResult.load(d / "nothing")
