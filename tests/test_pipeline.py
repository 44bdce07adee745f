"""End-to-end attribution behaviour on a tiny model with planted facts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hf_mirror import (
    AttributionResult,
    Corpus,
    MirrorConfig,
    RankingConfig,
    ScanConfig,
    ScoringConfig,
    WindowConfig,
    attribute,
)
from hf_mirror.errors import InputError
from hf_mirror.mirror import load_mirrors
from hf_mirror.probes import Probe, encode_probe
from hf_mirror.scan import token_losses


def test_planted_fact_source_ranks_first(planted, tmp_path):
    # Every planted document has the probe's template ("X keeps a C A at home."), so each mirror also moves
    # all 40 of them: this toy needs the per-document z-score (0.95 first vs 0.80 with the raw default, which
    # the fact-tracing, LDS and SmolLM2 benchmarks chose; docs/benchmarks.md).
    result = attribute(
        str(planted.model_dir), planted.texts, planted.probes(), output_dir=tmp_path, show_progress=False,
        mirror=MirrorConfig(fit="steps", steps=5, rank=8), scan=ScanConfig(scoring=ScoringConfig(normalize="zscore"),
                                                                           ranking=RankingConfig(rank_by="mirror")),
    )
    hits = [result.top(f"fact-{i}", 1)["doc_id"][0] == i for i in range(len(planted.names))]
    assert np.mean(hits) >= 0.9, f"source document ranked first for only {np.mean(hits):.0%} of probes"
    # the model's own greedy completion was used as the generation to explain
    p0 = result.probes[0]
    assert planted.facts[0] == p0.prompt + p0.completion


def test_zero_steps_gives_zero_scores(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    result = attribute(
        model,
        planted.texts[:10],
        planted.probes()[:3],
        tokenizer=tok,
        output_dir=tmp_path,
        mirror=MirrorConfig(fit="steps", steps=0),
        scan=ScanConfig(scoring=ScoringConfig(normalize="none"), ranking=RankingConfig(rank_by="mirror")),
        show_progress=False,
    )
    scores = result.scores()
    assert len(scores) == 30
    assert (scores["score"] == 0).all() and (result.evidence["delta"] == 0).all()


def _scores(result: AttributionResult) -> pd.DataFrame:
    return result.scores().sort_values(["probe_id", "doc_id"]).reset_index(drop=True)


def test_batch_size_does_not_change_scores(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    kw = dict(tokenizer=tok, mirror=MirrorConfig(fit="steps", steps=2), show_progress=False)
    long_doc = " ".join(planted.facts[:6])  # windowed at max_length=16, padded next to short documents
    corpus = [*planted.texts[:12], long_doc]
    a = attribute(
        model,
        corpus,
        planted.probes()[:4],
        output_dir=tmp_path / "a",
        scan=ScanConfig(windows=WindowConfig(batch_size=1, max_length=16, overlap=4),
                        scoring=ScoringConfig(normalize="none"), ranking=RankingConfig(rank_by="mirror")),
        **kw,
    )
    b = attribute(
        model,
        corpus,
        planted.probes()[:4],
        output_dir=tmp_path / "b",
        scan=ScanConfig(windows=WindowConfig(batch_size=8, max_length=16, overlap=4),
                        scoring=ScoringConfig(normalize="none"), ranking=RankingConfig(rank_by="mirror")),
        **kw,
    )
    np.testing.assert_allclose(_scores(a)["score"], _scores(b)["score"], atol=1e-5)
    assert list(a.topk["doc_id"]) == list(b.topk["doc_id"])


def test_same_seed_same_result(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    kw = dict(tokenizer=tok, mirror=MirrorConfig(seed=7), show_progress=False)
    a = attribute(model, planted.texts, planted.probes()[:5], output_dir=tmp_path / "a", **kw)
    b = attribute(model, planted.texts, planted.probes()[:5], output_dir=tmp_path / "b", **kw)
    pd.testing.assert_frame_equal(_scores(a), _scores(b))
    pd.testing.assert_frame_equal(a.evidence, b.evidence)


def test_completion_only_loss_ignores_prompt(tiny_model):
    model, tok = tiny_model
    probe = Probe("p", "bedube keeps a", " white eagle at home.")
    enc = encode_probe(tok, probe)
    n_prompt = 1 + len(tok("bedube keeps a", add_special_tokens=False)["input_ids"])
    assert (enc["labels"][0, :n_prompt] == -100).all()
    assert (enc["labels"][0, n_prompt:] == enc["input_ids"][0, n_prompt:]).all()
    # the probe loss equals the mean loss of the completion tokens only
    with torch.no_grad():
        losses = token_losses(model, enc["input_ids"], torch.ones_like(enc["input_ids"]))[0]
        loss = model(**enc).loss
    assert loss.item() == pytest.approx(losses[n_prompt - 1 :].mean().item(), rel=1e-5)
    full = encode_probe(tok, probe, include_prompt=True)
    assert (full["labels"][0, 1:] == full["input_ids"][0, 1:]).all()


def test_long_document_is_windowed_and_every_token_scored_once(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    long_doc = " ".join(planted.facts)  # hundreds of tokens, max_length 24
    n_tokens = len(tok(long_doc, add_special_tokens=False)["input_ids"])
    result = attribute(
        model,
        [long_doc, planted.facts[0]],
        planted.probes()[:3],
        tokenizer=tok,
        output_dir=tmp_path,
        scan=ScanConfig(windows=WindowConfig(max_length=24, overlap=6),
                        ranking=RankingConfig(rank_by="mirror", top_k=2)),
        show_progress=False,
    )
    ev = result.token_deltas("fact-0", 0)
    assert n_tokens > 24 * 5
    assert list(ev["position"]) == list(range(n_tokens))
    assert "".join(ev["token"]) == long_doc
    assert result.top("fact-0")["n_tokens"].max() == n_tokens
    # the first window's base losses equal a plain forward pass over the same prefix
    ids = torch.tensor([[tok.eos_token_id, *tok(long_doc, add_special_tokens=False)["input_ids"][:23]]])
    with torch.no_grad():
        ref = token_losses(model, ids, torch.ones_like(ids))[0].numpy()
    np.testing.assert_allclose(ev["base_loss"][:23], ref, atol=1e-5)


def test_adapters_are_standard_peft_and_reload(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    result = attribute(
        model,
        planted.texts[:5],
        planted.probes()[:2],
        tokenizer=tok,
        output_dir=tmp_path,
        scan=ScanConfig(scoring=ScoringConfig(normalize="none"), ranking=RankingConfig(rank_by="mirror")),
        show_progress=False,
    )
    names = [r["adapter"] for r in result.probe_records]
    assert all((tmp_path / "adapters" / n / "adapter_config.json").exists() for n in names)
    peft_model = load_mirrors(model, tmp_path / "adapters", names)
    try:
        peft_model.set_adapter(names[0])
        doc = result.top("fact-0", 1)
        ev = result.token_deltas("fact-0", doc["doc_id"][0])
        ids = torch.tensor([[tok.eos_token_id, *tok(doc["text"][0], add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            mirror = token_losses(peft_model, ids, torch.ones_like(ids))[0].numpy()
        np.testing.assert_allclose(ev["mirror_loss"], mirror, atol=1e-5)
    finally:
        peft_model.unload()
        for p in model.parameters():  # PEFT froze the shared fixture's weights
            p.requires_grad_(True)


def test_result_roundtrip(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    corpus = Corpus([{"key": f"doc-{i}", "text": t} for i, t in enumerate(planted.texts[:8])], id_column="key")
    result = attribute(
        model,
        corpus,
        planted.probes()[:3],
        tokenizer=tok,
        output_dir=tmp_path / "run",
        scan=ScanConfig(ranking=RankingConfig(rank_by="mirror", top_k=3)),
        show_progress=False,
    )
    for name in ("topk.parquet", "scores.parquet", "probes.jsonl", "config.json", "evidence.parquet"):
        assert (tmp_path / "run" / name).exists()
    topk = pd.read_parquet(tmp_path / "run" / "topk.parquet")
    assert {"probe_id", "rank", "doc_id", "score"} <= set(topk.columns)
    assert sorted(topk["rank"].unique()) == [1, 2, 3]
    loaded = AttributionResult.load(tmp_path / "run")
    pd.testing.assert_frame_equal(loaded.top("fact-1"), result.top("fact-1"))
    assert loaded.top("fact-1", 2)["doc_id"].tolist() == result.top("fact-1")["doc_id"][:2].tolist()
    assert set(loaded.scores()["doc_id"]) == {f"doc-{i}" for i in range(8)}
    assert len(loaded.scores_dataset()) == 24
    assert loaded.config["mirror"]["steps"] == MirrorConfig().steps and loaded.config["versions"]["peft"]
    copy = loaded.save(tmp_path / "copy")
    assert AttributionResult.load(copy).token_deltas("fact-1", "doc-1")["token"].str.cat() == planted.texts[1]


def test_normalisations_by_hand():
    from hf_mirror.scoring import normalize_scores

    raw = np.array([3.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(normalize_scores(raw, "none"), raw)
    np.testing.assert_allclose(normalize_scores(raw, "zscore"), [np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3),
                                                                 -1 / np.sqrt(3)])
    loo = normalize_scores(raw, "loo")  # probe 0 against [1, 1, 1]: zero spread -> 0; probe 1 against [3, 1, 1]
    spread = np.std([3.0, 1.0, 1.0])
    np.testing.assert_allclose(loo, [0.0, (1 - 5 / 3) / spread, (1 - 5 / 3) / spread, (1 - 5 / 3) / spread])
    ceiling = normalize_scores(np.array([10.0, 0.1, 0.0, -0.1, 0.05]), "loo")[0]
    assert ceiling > 2 * np.sqrt(4)  # no sqrt(n - 1) ceiling, unlike the z-score


def test_aggregations_of_token_deltas(tiny_model, planted, tmp_path):
    """sum = mean x tokens; max is the largest token delta, taken from the same token losses as the evidence."""
    model, tok = tiny_model
    kw = dict(tokenizer=tok, mirror=MirrorConfig(fit="steps", steps=2), show_progress=False)
    runs = {agg: attribute(model, planted.texts[:10], planted.probes()[:3], output_dir=tmp_path / agg,
                           scan=ScanConfig(scoring=ScoringConfig(normalize="none", aggregate=agg),
                                           ranking=RankingConfig(rank_by="mirror", top_k=10)), **kw)
            for agg in ("mean", "sum", "max")}
    mean, total, top = (_scores(runs[a]) for a in ("mean", "sum", "max"))
    np.testing.assert_allclose(total["score"], mean["score"] * mean["n_tokens"], rtol=1e-5, atol=1e-6)
    assert (top["score"] >= mean["score"] - 1e-7).all() and (top["score"] > mean["score"] + 1e-6).any()
    ev = runs["max"].evidence.groupby(["probe_id", "doc_id"])["delta"].max()
    best = runs["max"].topk.set_index(["probe_id", "doc_id"])["raw_score"]
    np.testing.assert_allclose(best.to_numpy(), ev.loc[best.index].to_numpy(), rtol=1e-5)
    with pytest.raises(InputError, match="aggregate must be one of"):
        attribute(model, planted.texts[:3], planted.probes()[:3], output_dir=tmp_path / "bad",
                  scan=ScanConfig(scoring=ScoringConfig(aggregate="median"), ranking=RankingConfig(rank_by="mirror")),
                  **kw)


def test_caller_model_comes_back_unchanged(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    attribute(model, planted.texts[:4], planted.probes()[:3], tokenizer=tok, output_dir=tmp_path / "run",
              scan=ScanConfig(scoring=ScoringConfig(normalize="none"), ranking=RankingConfig(rank_by="mirror")),
              show_progress=False)
    after = dict(model.named_parameters())
    assert set(after) == set(before)  # no LoRA layers left behind
    for n, (grad, value) in before.items():
        assert after[n].requires_grad == grad and torch.equal(after[n].detach(), value), n
