"""EK-FAC influence baseline (kronfluence, an optional extra) on the planted-facts tiny model."""

from __future__ import annotations

import copy
import importlib.util
import sys

import numpy as np
import pytest
import torch

from hf_mirror import AttributionResult, InputError
from hf_mirror.baselines import METHODS, attribute_baseline
from hf_mirror.baselines._common import iter_documents
from hf_mirror.baselines.ekfac import EKFACBaseline, linearize_conv1d, tracked_linear_modules
from hf_mirror.probes import Probe
from hf_mirror.results import FILES
from hf_mirror.scoring import EVIDENCE_COLUMNS, TOPK_COLUMNS

HAS_KRONFLUENCE = importlib.util.find_spec("kronfluence") is not None
needs_kronfluence = pytest.mark.skipif(not HAS_KRONFLUENCE,
                                       reason="kronfluence is not installed (pip install 'hf-mirror[ekfac]')")


pytestmark = pytest.mark.usefixtures("one_thread")


def fact_probes(planted) -> list[dict]:
    """The planted probes with their facts as completions (no generation needed)."""
    probes = []
    for p, fact in zip(planted.probes(), planted.facts, strict=True):
        probes.append({**p, "completion": fact[len(p["prompt"]):]})
    return probes


@pytest.fixture(scope="module")
def ekfac_result(tiny_model, planted, tmp_path_factory):
    if not HAS_KRONFLUENCE:
        pytest.skip("kronfluence is not installed")
    model, tok = tiny_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return attribute_baseline("ekfac", model, [*planted.texts, "   "], fact_probes(planted), tokenizer=tok,
                                  output_dir=tmp_path_factory.mktemp("ekfac"), top_k=3, show_progress=False,
                                  batch_size=32)
    finally:
        torch.set_num_threads(threads)


def test_ekfac_is_a_registered_baseline():
    assert "ekfac" in METHODS


@needs_kronfluence
def test_source_document_ranks_first(ekfac_result, planted):
    # measured: source first for 40/40 probes (ekfac, true or empirical Fisher); 27/40 with strategy="identity"
    hits = [ekfac_result.top(f"fact-{i}", 1)["doc_id"][0] == i for i in range(len(planted.names))]
    assert np.mean(hits) >= 0.9, f"source first for only {np.mean(hits):.0%} of probes"
    scores = ekfac_result.scores()
    own = scores[scores["probe_id"] == "fact-0"].set_index("doc_id")["score"]
    assert own[0] > 0 and own[0] > own.drop(0).max()  # positive = supports the probe


@needs_kronfluence
def test_writes_a_loadable_result_like_the_other_baselines(ekfac_result, planted):
    loaded = AttributionResult.load(ekfac_result.directory)
    for name in FILES.values():
        assert (loaded.directory / name).exists(), name
    assert list(loaded.topk.columns) == TOPK_COLUMNS and list(loaded.evidence.columns) == EVIDENCE_COLUMNS
    assert loaded.evidence.empty and loaded.config["method"] == "ekfac"
    assert loaded.skipped == [{"doc_id": len(planted.texts), "reason": "empty or whitespace-only"}]
    scores = loaded.scores()
    assert len(scores) == len(planted.names) * len(planted.texts)
    assert np.allclose(scores["score"], scores["raw_score"])


@needs_kronfluence
def test_scorer_sums_windows_and_removes_its_scratch(tiny_model, planted):
    model, tok = tiny_model
    probes = [Probe(**p) for p in fact_probes(planted)[:2]]
    # the probes' context: 32 tokens
    scorer = EKFACBaseline(model, tok, probes=probes, max_length=32, overlap=2, batch_size=4)
    skipped = []
    docs = list(iter_documents(enumerate(planted.texts[:4]), tok, 6, 2, skipped))
    assert all(len(d.windows) >= 2 for d in docs)  # 6-token windows: every document is split
    rows = list(scorer.score(iter(docs)))
    assert [d for d, _ in rows] == docs
    scores = np.stack([row for _, row in rows])
    assert scores.shape == (4, 2) and np.isfinite(scores).all()
    assert scores[0, 0] > scores[1:, 0].max() and scores[1, 1] > np.delete(scores[:, 1], 1).max()  # own fact
    assert scorer.workdir.exists()
    scorer.close()
    assert not scorer.workdir.exists()


@needs_kronfluence
def test_caller_model_is_untouched(ekfac_result, tiny_model):
    from transformers.pytorch_utils import Conv1D

    model, _ = tiny_model
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert not any(type(m).__module__.startswith("kronfluence") for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_conv1d_becomes_an_equivalent_linear(tiny_model):
    model, _ = tiny_model
    linear = linearize_conv1d(copy.deepcopy(model))
    names = tracked_linear_modules(linear)
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" not in names
    n_layer = len(model.transformer.h)
    assert tracked_linear_modules(linear, ["c_fc"]) == [f"transformer.h.{i}.mlp.c_fc" for i in range(n_layer)]
    ids = torch.tensor([[5, 9, 17, 3, 8]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, linear(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(InputError, match="No linear layer"):
        tracked_linear_modules(linear, ["q_proj"])


def test_missing_kronfluence_names_the_extra(tiny_model, planted, monkeypatch):
    model, tok = tiny_model
    monkeypatch.setitem(sys.modules, "kronfluence", None)  # import kronfluence now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'hf-mirror\[ekfac\]'"):
        attribute_baseline("ekfac", model, planted.texts[:3], fact_probes(planted)[:1], tokenizer=tok,
                           show_progress=False)


@needs_kronfluence
def test_bad_options_are_input_errors(tiny_model, planted):
    model, tok = tiny_model
    with pytest.raises(InputError, match="strategy"):
        attribute_baseline("ekfac", model, planted.texts[:3], fact_probes(planted)[:1], tokenizer=tok,
                           strategy="hessian", show_progress=False)
    with pytest.raises(InputError, match="damping"):
        attribute_baseline("ekfac", model, planted.texts[:3], fact_probes(planted)[:1], tokenizer=tok,
                           damping=-1.0, show_progress=False)
