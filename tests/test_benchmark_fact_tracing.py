"""Bundled metrics (local `evaluate` modules) and the fact-tracing benchmark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks import METRICS, load_metric, metric_path
from benchmarks.fact_tracing import (
    METHODS,
    QUERY_TEMPLATES,
    TRAIN_TEMPLATES,
    FactTracingConfig,
    build_benchmark,
    rankings,
    retrieval_metrics,
)
from hf_mirror import InputError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "benchmark_fact_tracing.py"


def test_every_metric_loads_offline():
    for name in METRICS:
        assert (metric_path(name) / f"{name}.py").exists()
        assert load_metric(name) is not None
    with pytest.raises(InputError, match="Unknown metric"):
        metric_path("bleu")


def test_ranking_metrics_on_hand_computed_examples():
    # first relevant document at ranks 1, 2 and 4
    predictions = [["a", "x"], ["x", "a"], ["x", "y", "z", "a"]]
    references = [["a"], ["a"], ["a"]]
    assert load_metric("mrr").compute(predictions=predictions, references=references)["mrr"] == pytest.approx(
        (1 + 0.5 + 0.25) / 3)
    assert load_metric("mrr").compute(predictions=[["x"]], references=[["a"]])["mrr"] == 0.0
    recall = load_metric("recall_at_k")
    assert recall.compute(predictions=predictions, references=references, k=2)["recall@2"] == pytest.approx(2 / 3)
    assert recall.compute(predictions=[["a", "x", "b"]], references=[["a", "b", "c"]], k=3)["recall@3"] == \
        pytest.approx(2 / 3)
    precision = load_metric("precision_at_k")
    assert precision.compute(predictions=[["a", "x", "b"]], references=[["a", "b"]], k=2)["precision@2"] == 0.5
    assert precision.compute(predictions=[["a"]], references=[["a"]], k=4)["precision@4"] == 0.25
    ap = load_metric("average_precision")  # precision at each answer's rank, over all the query's answers
    assert ap.compute(predictions=[["a", "x", "b"]], references=[["a", "b"]])["map"] == pytest.approx((1 + 2 / 3) / 2)
    assert ap.compute(predictions=[["x", "a"], ["a"]], references=[["a", "b"], ["a"]])["map"] == pytest.approx(
        (0.5 / 2 + 1) / 2)  # b is missing from the first ranking: it counts 0
    assert ap.compute(predictions=[["b", "a", "x"]], references=[["a", "b"]])["map"] == 1.0  # MRR and recall@2 alike
    assert ap.compute(predictions=[["b", "x", "a"]], references=[["a", "b"]])["map"] < 1.0  # ... but not AP


def test_ranking_metrics_accumulate_batches_and_compare_ids_as_text():
    mrr = load_metric("mrr")
    mrr.add_batch(predictions=[["1", "2"]], references=[["2"]])
    mrr.add_batch(predictions=[["3"]], references=[["3"]])
    assert mrr.compute()["mrr"] == pytest.approx(0.75)


def test_auroc_and_tpr_at_fpr():
    auroc = load_metric("auroc")
    assert auroc.compute(predictions=[0.9, 0.2, 0.6, 0.4], references=[1, 0, 0, 1])["auroc"] == 0.75
    assert auroc.compute(predictions=[0.5, 0.5, 0.1], references=[1, 0, 0])["auroc"] == 0.75  # a tie counts 1/2
    assert auroc.compute(predictions=[3, 2, 1], references=[1, 1, 0])["auroc"] == 1.0
    tpr = load_metric("tpr_at_fpr")
    scores, labels = [0.9, 0.8, 0.7, 0.6, 0.1], [1, 0, 1, 1, 0]
    assert tpr.compute(predictions=scores, references=labels, fpr=0.0)["tpr@fpr=0.0"] == pytest.approx(1 / 3)
    assert tpr.compute(predictions=scores, references=labels, fpr=0.5)["tpr@fpr=0.5"] == 1.0
    # tied scores cannot be split: the only point with FPR 0 is "nothing positive"
    assert tpr.compute(predictions=[1, 1], references=[1, 0], fpr=0.0)["tpr@fpr=0.0"] == 0.0


def test_spearman():
    spearman = load_metric("spearman")
    assert spearman.compute(predictions=[1, 2, 3, 4], references=[10, 20, 40, 30])["spearman"] == pytest.approx(0.8)
    assert spearman.compute(predictions=[1, 2, 3], references=[3, 2, 1])["spearman"] == pytest.approx(-1.0)
    # ties take their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert spearman.compute(predictions=[5, 5, 9], references=[1, 2, 3])["spearman"] == pytest.approx(0.8660254)


def test_fact_tracing_benchmark_is_built_from_real_facts():
    cfg = FactTracingConfig(n_countries=30, n_queries=10)
    bench = build_benchmark(cfg)
    texts = {d["id"]: d["text"] for d in bench.documents}
    assert len(bench.queries) == 10 and len({d["id"] for d in bench.documents}) == len(bench.documents)
    for q in bench.queries:
        props = bench.proponents[q["id"]]
        assert len(props) == len(TRAIN_TEMPLATES)
        assert all(q["answer"] in texts[d] and q["country"] in texts[d] for d in props)
        # the query phrasing is held out of training
        assert not any(t.startswith(q["prompt"]) for t in texts.values())
    assert not set(QUERY_TEMPLATES) & set(TRAIN_TEMPLATES)
    china = next(q for q in bench.queries if q["country"] == "China")
    assert china["answer"] == "Beijing"


def test_rankings_break_ties_by_document_id():
    scores = pd.DataFrame({"probe_id": ["p"] * 3, "doc_id": ["b", "a", "c"], "score": [1.0, 1.0, 2.0]})
    ranked = rankings(scores, ["p"])
    assert ranked == {"p": ["c", "a", "b"]}
    assert retrieval_metrics(ranked, {"p": ["b"]}, k=2) == {"mrr": pytest.approx(1 / 3), "recall@2": 0.0,
                                                                "map": pytest.approx(1 / 3)}


def test_quick_benchmark_runs_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_fact_tracing", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "ftrace.json"
    threads = torch.get_num_threads()
    try:
        assert recipe.main(["--quick", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the recipe runs on one thread
    printed = capsys.readouterr().out
    assert "| method | MRR | recall@10 | wall time (s) |" in printed
    for method in METHODS:
        assert f"| {method} |" in printed
    report = json.loads(out.read_text())
    assert report["correct"] >= 1 and set(report["methods"]) == set(METHODS)
    assert report["methods"]["bm25"]["mrr"] > 0.5


def test_sweep_scores_settings_on_disjoint_halves(tmp_path):
    from benchmarks.fact_tracing import FactTracingConfig
    from benchmarks.sweep import Setting, format_table, run_sweep, split_half

    tune, test = split_half([f"q{i}" for i in range(40)])
    assert tune and test and not set(tune) & set(test) and len(tune) + len(test) == 40
    assert split_half(["q3", "q1"]) == split_half(["q3", "q1"])
    grid = [Setting("default"), Setting("steps=0", {"steps": 0}), Setting("twice", ensemble=("default", "default"))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        report = run_sweep(FactTracingConfig.quick(), grid, tmp_path / "sweep", tmp_path / "model")
    finally:
        torch.set_num_threads(threads)
    rows = {(r["setting"], r["normalize"], r["aggregate"]): r for r in report["rows"]}
    assert set(report["tune"]) | set(report["test"]) and not set(report["tune"]) & set(report["test"])
    assert len(report["tune"]) + len(report["test"]) == report["correct"]
    # averaging a setting with itself changes nothing; a mirror that never moved ranks nothing
    for key in ("tune mrr", "test mrr"):
        assert rows[("twice", "none", "mean")][key] == pytest.approx(rows[("default", "none", "mean")][key])
        assert rows[("default", "none", "mean")][key] > rows[("steps=0", "none", "mean")][key]
    assert report["best"]["setting"] != "steps=0"
    assert "| **" in format_table(report)
    with pytest.raises(InputError, match="must come earlier"):
        run_sweep(FactTracingConfig.quick(), [Setting("x", ensemble=("default",))], tmp_path / "s2", tmp_path / "model")
