"""Candidate rules judged by tail-patch (benchmarks/candidates.py): the restriction to each probe's own candidates,
the recall of the true top k, and the recipe end to end on the quick capitals corpus."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.candidates import recall, restricted_matrix, rules
from hf_mirror import InputError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_probe_ranks_only_its_own_candidates_above_the_rest():
    # p's candidates are a and b (BM25 scores); c was scanned for another probe (influence, no BM25 score)
    scores = pd.DataFrame({"probe_id": ["p", "p", "p", "q", "q"], "doc_id": ["a", "b", "c", "c", "a"],
                           "influence": [-2.0, -3.0, 5.0, 1.0, 0.5], "bm25": [1.0, 0.5, np.nan, 2.0, 0.0]})
    matrix, mask = restricted_matrix(scores, ["p", "q"], ["a", "b", "c", "d"])
    assert mask.tolist() == [[True, True, False, False], [True, False, True, False]]
    # c's high influence does not count for p: below its candidates, tied with d, which nobody scanned
    assert matrix[0].tolist() == [-2.0, -3.0, -4.0, -4.0]
    assert matrix[1].tolist() == [0.5, -0.5, 1.0, -0.5]


def test_recall_of_the_true_top_k():
    truth = np.array([[0.9, 0.1, 0.5, 0.0], [0.0, 0.2, 0.3, 0.4]])
    mask = np.array([[True, False, False, True], [False, False, True, True]])
    out = recall(mask, truth, k=2)  # probe 0's top 2 = {0, 2}: one found; probe 1's = {3, 2}: both
    assert out["per_probe"] == [0.5, 1.0] and out["tune"] == 0.5 and out["held_out"] == 1.0 and out["all"] == 0.75


def test_rules_share_a_budget():
    assert rules([5]) == {"bm25:10": {"candidates": 10, "retrievers": ["bm25"]},
                          "bm25+dense:5": {"candidates": 5, "retrievers": ["bm25", "dense"]}}
    with pytest.raises(InputError, match="positive"):
        rules([0])


def test_recipe_quick_end_to_end(tmp_path, capsys):
    """Every document, then each rule: a full scan finds the whole true top 10; a BM25 rule scans its 2M own
    candidates per probe; the dense rule at most 2M."""
    spec = importlib.util.spec_from_file_location("benchmark_candidates", ROOT / "recipes" / "benchmark_candidates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--sizes", "3", "--cache-dir", str(tmp_path / "cache"),
                        "--json", str(tmp_path / "c.json"), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("capitals: 56 documents") and "| rule | candidates / probe |" in printed
    report = json.loads((tmp_path / "c.json").read_text())
    assert list(report["rules"]) == ["all", "bm25:6", "bm25+dense:3"]
    full, lexical, dense = report["rules"].values()
    assert full["candidates_per_probe"] == 56 and lexical["candidates_per_probe"] == 6
    assert 3 <= dense["candidates_per_probe"] <= 6
    for variant in ("sgd", "adam"):
        assert full["variants"][variant]["recall"]["all"] == 1.0
        assert full["variants"][variant]["all"]["top_k_share"] > lexical["variants"][variant]["all"]["top_k_share"]
