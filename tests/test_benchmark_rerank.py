"""The retrieve-then-rerank benchmark: padded corpus of real distractors, and the quick recipe end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchmarks.fact_tracing import FactTracingConfig, build_benchmark
from benchmarks.rerank import cost_goal, distractor_pool, padded_corpus
from hf_mirror.errors import InputError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "benchmark_rerank.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Where the quick fact-tracing model is trained once and reused by the recipe tests."""
    return tmp_path_factory.mktemp("rerank") / "model"


def test_padded_corpus_keeps_the_training_documents_and_adds_unseen_real_text():
    bench = build_benchmark(FactTracingConfig.quick())
    docs = padded_corpus(bench, 2000)
    assert len(docs) == 2000 and len({d["id"] for d in docs}) == 2000
    train = {d["id"]: d["text"] for d in bench.documents}
    by_id = {d["id"]: d["text"] for d in docs}
    assert all(by_id[i] == t for i, t in train.items())  # every training document, unchanged
    pads = [d for d in docs if d["id"] not in train]
    assert not {d["text"] for d in pads} & set(train.values())  # no distractor repeats a training text
    assert docs == padded_corpus(bench, 2000)  # deterministic
    assert [d["id"] for d in docs[:20]] != [d["id"] for d in bench.documents[:20]]  # shuffled together
    pool = distractor_pool()
    assert len(pool) >= 100_000 and {d["source"] for d in pool} == {"city", "country", "wordnet"}
    with pytest.raises(InputError):
        padded_corpus(bench, 10)


def test_quick_rerank_benchmark(tmp_path, capsys, model_dir):
    spec = importlib.util.spec_from_file_location("benchmark_rerank", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "rerank.json"
    threads = torch.get_num_threads()
    try:
        assert recipe.main(["--quick", "--docs", "800", "--model-dir", str(model_dir), "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the recipe runs on one thread
    printed = capsys.readouterr().out
    assert "| method | documents scored | wall time (s) | speedup | MRR | recall@10 | MRR retained |" in printed
    for row in ("| mirror, full scan (800 docs) |", "| mirror, BM25 top-20 rerank |",
                "| default (hybrid, full scan) | 800 |", "| BM25 alone |"):  # auto: 800 docs are scanned in full
        assert row in printed
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert list(methods) == ["full", "rerank", "default", "bm25"] and report["documents"] == 800
    assert methods["default"]["per_probe"] is None
    assert 1 <= len(report["probes"]) <= 4
    # the rerank scores each candidate exactly as the full scan does (z-scored across the same probe pool)
    assert report["rerank_vs_full_max_abs_diff_raw"] < 1e-4 and report["rerank_vs_full_max_abs_diff"] < 1e-2
    assert methods["rerank"]["documents_scored"] <= 20 * len(report["probes"]) < methods["full"]["documents_scored"]
    assert methods["rerank"]["forward_passes"] < methods["full"]["forward_passes"]
    for row in methods.values():
        assert 0 <= row["mrr"] <= 1 and 0 <= row["recall@10"] <= 1 and row["seconds"] > 0
    assert methods["bm25"]["mrr"] > 0.5
    assert (model_dir / "config.json").exists()  # kept for --model-dir reuse
    # the cost goal: the default (a full scan here) against BM25 + one forward pass over the corpus
    assert report["forward_seconds"] > 0
    goal = cost_goal(report)
    assert goal["unit"] == methods["bm25"]["seconds"] + report["forward_seconds"]
    assert goal["ratio"] == methods["default"]["seconds"] / goal["unit"]
    assert "Goal (#25): the default's influence column complete at 800 documents in at most 3x" in printed


def test_rerank_benchmark_runs_the_chosen_rows(tmp_path, capsys, model_dir):
    """``--methods`` leaves out the full scan (no speedup column then); a bad name is refused."""
    spec = importlib.util.spec_from_file_location("benchmark_rerank", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(InputError):
            recipe.main(["--quick", "--methods", "default,bogus"])
        assert recipe.main(["--quick", "--docs", "800", "--methods", "bm25, rerank", "--model-dir", str(model_dir),
                            "--json", str(tmp_path / "r.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| method | documents scored | wall time (s) | MRR | recall@10 |\n" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["methods"]) == ["rerank", "bm25"] and "rerank_vs_full_max_abs_diff" not in report
    assert report["methods"]["rerank"]["per_probe"] == 20
