"""The embedded default: demo end to end (fast budget), model cache reuse and atomicity, HTML report, plots."""

from __future__ import annotations

import json
import os
import re
import time

import pandas as pd
import pytest
import torch

from hf_mirror import demo, tiny_lm
from hf_mirror.cli import main
from hf_mirror.demo import DemoModelConfig
from hf_mirror.html import render_html, token_color, write_html
from hf_mirror.probes import Probe, generate_completions
from hf_mirror.results import AttributionResult

# a seconds-scale model for the cache tests: 10 documents, 2 epochs (it learns nothing, it only has to exist)
MICRO = DemoModelConfig(stride=300, vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=64, epochs=2)


@pytest.fixture
def count_training(monkeypatch):
    """Count calls to ``train_tiny_lm`` (the demo imports it at call time from ``hf_mirror.tiny_lm``)."""
    calls = []
    real = tiny_lm.train_tiny_lm

    def counted(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("output_dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_lm, "train_tiny_lm", counted)
    return calls


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("demo") / "run"
    fast = DemoModelConfig.fast()
    report = demo.run_demo(out, n_probes=3, cache_dir=cache, config=fast, corpus_stride=5, show_progress=False)
    return report, cache, out


def test_demo_end_to_end(demo_run):
    report, cache, out = demo_run
    result = report.result
    facts = demo.load_facts()
    assert report.trained and report.model_path.parent == cache / "models"
    assert len(result.probe_ids) == 3
    assert set(report.sources) == set(result.probe_ids)
    by_id = {f["id"]: f for f in facts}
    for probe in result.probes:
        assert probe.completion and probe.completion.strip(), "the model's generation is attributed"
        assert by_id[report.sources[probe.id]]["prompt"] == probe.prompt
        assert len(result.top(probe.id)) == demo.DEMO_SCAN.ranking.top_k
    # every 5th bundled document is scanned (the fast budget), keyed by the id column
    assert len(facts) == 3000 and result.summary()["documents"] == 600
    assert result.config["corpus"]["id_column"] == "id"
    assert set(result.topk["doc_id"]) <= set(by_id)
    for pid, rank in report.source_ranks.items():
        top = result.top(pid)
        expected = top.loc[top["doc_id"] == report.sources[pid], "rank"].tolist()
        assert rank == (expected[0] if expected else None)
    acc = report.model_info["fact_accuracy"]
    assert 0 <= acc["exact"] <= acc["first_3_words"] <= acc["n"] > 0
    saved = json.loads((out / "demo.json").read_text())
    assert saved["top1"] == report.top1 == sum(r == 1 for r in report.source_ranks.values())
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page.split("</title>")[1]
    for doc_id in result.topk["doc_id"]:
        assert f">{doc_id}<" in page
    states = [part.split('<div class="list moved">')[0] for part in page.split('<div class="list states">')[1:]]
    assert len(states) == len(report.source_ranks)  # every probe: "states it" beside "moved the model"
    assert sum('class="tag">source<' in part for part in states) == sum(
        r is not None for r in report.source_ranks.values())
    assert "source document ranked first" in page
    # the library's defaults: raw mean delta, explained in one sentence; no z-score ceiling
    assert result.config["scan"]["normalize"] == "none" and result.config["mirror"]["steps"] == 8
    assert "mean change in the document&#x27;s token loss (nats/token)" in page
    assert not report.reused and not saved["reused"]


def test_demo_rerun_reuses_the_finished_run(demo_run):
    first, cache, out = demo_run
    again = demo.run_demo(out, n_probes=3, cache_dir=cache, config=DemoModelConfig.fast(), corpus_stride=5,
                          show_progress=False)
    assert again.reused and not again.trained and "reused the finished run" in again.summary()
    assert again.result.topk.equals(first.result.topk)
    saved = json.loads((out / "demo.json").read_text())
    assert saved["reused"]
    # the report keeps the timings of the run that made the result, not the reuse's (#27 item 3)
    assert {k: saved["timings"][k] for k in ("model", "attribute", "total")} == first.timings
    assert f"attribution {first.timings['attribute']:.1f}s" in (out / "report.html").read_text()
    assert "time of the run that made this result" in again.summary()


def test_complete_batched_matches_one_by_one(demo_run):
    report, _, _ = demo_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(report.model_path).eval()
    tok = AutoTokenizer.from_pretrained(report.model_path)
    facts = demo.load_facts()[::600][:5]
    batched = demo.complete(model, tok, [f["prompt"] for f in facts], max_new_tokens=20)
    single = generate_completions(model, tok, [Probe(str(i), f["prompt"]) for i, f in enumerate(facts)], 20)
    assert batched == [p.completion for p in single]


def test_fact_accuracy_counts_matches(monkeypatch):
    facts = [
        {"prompt": "a:", "completion": " one two three four"},
        {"prompt": "b:", "completion": " one two three five"},
        {"prompt": "c:", "completion": " six"},
    ]
    monkeypatch.setattr(demo, "complete", lambda model, tok, prompts: [" one two three four "] * len(prompts))
    acc = demo.fact_accuracy(None, None, facts)
    assert (acc["exact"], acc["first_3_words"], acc["n"]) == (1, 2, 3)


def test_model_is_cached_and_reused(tmp_path, count_training):
    path = demo.train_default_model(MICRO, tmp_path, show_progress=False)
    assert len(count_training) == 1 and demo.is_complete(path)
    info = demo.model_info(path)
    assert info["config"]["stride"] == 300 and info["training_documents"] == 10
    again = demo.train_default_model(MICRO, tmp_path, show_progress=False)
    assert again == path and len(count_training) == 1, "a cached model must not be trained again"
    model, tok, _ = demo.load_default_model(MICRO, tmp_path, show_progress=False)
    assert len(count_training) == 1 and model.config.n_embd == 32
    demo.train_default_model(MICRO, tmp_path, retrain=True, show_progress=False)
    assert len(count_training) == 2
    # another config is another cache entry
    other = demo.model_dir(DemoModelConfig(**{**MICRO.__dict__, "seed": 1}), tmp_path)
    assert other != path and other.parent == path.parent
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary directories are left behind"


def test_cache_location_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "c"))
    assert demo.model_dir(MICRO).parent == tmp_path / "c" / "models"
    monkeypatch.delenv(demo.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.model_dir(MICRO).parent == tmp_path / "xdg" / "hf_mirror" / "models"
    monkeypatch.setenv(demo.FAST_ENV, "1")
    assert DemoModelConfig.from_env() == DemoModelConfig.fast()


def test_interrupted_training_leaves_no_loadable_model(tmp_path, monkeypatch):
    def crash(texts, output_dir, **kwargs):
        (output_dir / "config.json").write_text("{}")  # a half-written model
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_lm, "train_tiny_lm", crash)
    with pytest.raises(KeyboardInterrupt):
        demo.train_default_model(MICRO, tmp_path, show_progress=False)
    final = demo.model_dir(MICRO, tmp_path)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []
    monkeypatch.undo()
    # a temporary directory of a training killed long ago (no chance to clean up) is removed by the next one
    stale = final.parent / f".{final.name}.tmp-killed"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert demo.is_complete(demo.train_default_model(MICRO, tmp_path, show_progress=False))
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_cli_demo_reuses_cached_model(demo_run, tmp_path, monkeypatch, capsys, count_training):
    _, cache, _ = demo_run
    monkeypatch.setenv(demo.FAST_ENV, "1")
    out = tmp_path / "cli"
    rc = main(["demo", "--output", str(out), "--probes", "1", "--cache-dir", str(cache), "--no-progress"])
    assert rc == 0
    assert count_training == [], "the warm demo must reuse the cached model"
    text = capsys.readouterr().out
    assert "source document ranked first for" in text and "(cached;" in text
    assert "probe " in text and (out / "report.html").exists()
    assert "\x1b[" not in text, "no colour codes when stdout is not a terminal"
    assert "mirror (raw) = mean change in the document's token loss (nats/token)" in text
    assert "influence = mirror / sd" in text
    assert "[[]]" not in text



def test_cli_demo_keeps_a_users_files(demo_run, tmp_path, monkeypatch, capsys):
    """The demo's output follows attribute's ownership rule: a user's file, at the top or inside adapters/, is
    refused with or without --overwrite and kept; the report files are listed in the manifest."""
    _, cache, _ = demo_run
    monkeypatch.setenv(demo.FAST_ENV, "1")
    argv = ["demo", "--probes", "1", "--cache-dir", str(cache), "--no-progress"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        assert main([*argv, "--output", str(mine), *extra]) == 2
        assert "notes.txt" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = tmp_path / "out"
    assert main([*argv, "--output", str(out)]) == 0
    assert {"report.html", "demo.json"} <= set(json.loads((out / "hf_mirror.json").read_text())["files"])
    (out / "adapters" / "mine.txt").write_text("mine")
    capsys.readouterr()
    assert main([*argv, "--output", str(out), "--overwrite"]) == 2
    assert "adapters/mine.txt" in capsys.readouterr().err and (out / "adapters" / "mine.txt").read_text() == "mine"

# ---- HTML and plots on a synthetic result (exact control over ids, text and deltas) -----------------------
def _synthetic(tmp_path) -> AttributionResult:
    tokens = ["<b>bold</b>", " & ", "fine", "\n", " bad"]
    deltas = [0.8, 0.0, 0.2, 0.0, -0.4]
    ev = pd.DataFrame(
        {
            "probe_id": "p<1>",
            "doc_id": "doc\"x'",
            "position": range(5),
            "token": tokens,
            "base_loss": [1.0] * 5,
            "mirror_loss": [1.0 + d for d in deltas],
            "delta": deltas,
        }
    )
    ev2 = ev.assign(doc_id="d2", delta=[-0.1] * 5)
    topk = pd.DataFrame(
        {
            "probe_id": ["p<1>", "p<1>"],
            "rank": [1, 2],
            "doc_id": ["doc\"x'", "d2"],
            "score": [2.0, -0.5],
            "raw_score": [0.12, -0.1],
            "n_tokens": [5, 5],
            "text": ["".join(tokens)] * 2,
        }
    )
    scores = pd.DataFrame(
        {"probe_id": "p<1>", "doc_id": [f"n{i}" for i in range(50)], "score": torch.randn(50).tolist()}
    )
    scores.to_parquet(tmp_path / "scores.parquet")
    probes = [{"id": "p<1>", "prompt": "x <y>:", "completion": " 'z' & w", "probe_loss_before": 0.5}]
    config = {"model": "m", "scan": {"top_k": 2, "normalize": "zscore"}, "stats": {"documents": 50}}
    return AttributionResult(tmp_path, topk=topk, evidence=pd.concat([ev, ev2]), probes=probes, skipped=[],
                             config=config)


def test_html_escapes_and_shades(tmp_path):
    result = _synthetic(tmp_path)
    page = render_html(result)
    assert result._repr_html_() == page
    assert "<b>bold" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "p&lt;1&gt;" in page and "x &lt;y&gt;:" in page and "&#x27;z&#x27; &amp; w" in page
    assert "doc&quot;x&#x27;" in page
    assert "<script" not in page and "<style>" in page
    assert "supports the generation" in page and 'class="ramp"' in page  # the legend
    spans = re.findall(r'<span style="background:([^"]+)" title="delta ([^ ]+) ', page)
    assert len(spans) == 10
    colors = dict(zip(["strong", "zero", "weak", "nl", "neg"], [c for c, _ in spans[:5]], strict=True))
    assert colors["strong"] == token_color(0.8, 0.8) and colors["strong"].startswith("rgba(22,163,74,0.85")
    assert colors["zero"] == "transparent" and colors["neg"].startswith("rgba(220,38,38,")
    # bars: width relative to the largest |score|, red for negative scores
    assert 'class="bar pos" style="width:100.0%"' in page and 'class="bar neg" style="width:25.0%"' in page
    path = write_html(result, tmp_path / "r.html", sources={"p<1>": "d2"})
    assert path.read_text().count('class="tag">source<') == 1


def test_plots_return_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    result = _synthetic(tmp_path)
    fig = result.plot_scores("p<1>", k=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert fig.axes[0].patches, "a histogram was drawn"
    assert sum(1 for line in fig.axes[0].lines) == 2, "one marker per top-k document"
    fig2 = result.plot_token_deltas("p<1>", k=2)
    assert isinstance(fig2, Figure) and len(fig2.axes) == 2
    heights = [p.get_height() for p in fig2.axes[0].patches]
    assert heights == pytest.approx([0.8, 0.0, 0.2, 0.0, -0.4])
    fig2.savefig(tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 1000
