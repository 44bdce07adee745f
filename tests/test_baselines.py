"""Baselines (BM25, embedding, LoRA gradient similarity) on the planted-facts tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_mirror import AttributionResult, InputError
from hf_mirror.baselines import METHODS, attribute_baseline
from hf_mirror.results import FILES
from hf_mirror.retrieval.bm25 import words
from hf_mirror.scoring import EVIDENCE_COLUMNS, TOPK_COLUMNS

# share of planted probes whose source document must rank first (measured: bm25 1.0, embedding 1.0, gradsim 0.82)
MIN_TOP1 = {"bm25": 0.95, "embedding": 0.8, "gradsim": 0.7}
# the core baselines; the optional extras have their own files: tests/test_ekfac.py, tests/test_bergson.py
BASELINES = [m for m in METHODS if m not in ("ekfac", "bergson_ekfac", "trackstar")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results(tiny_model, planted, tmp_path_factory) -> dict[str, AttributionResult]:
    model, tok = tiny_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: runs before the function-scoped one_thread
    corpus = [*planted.texts, "   "]  # a whitespace-only document is skipped, as in attribute()
    try:
        return {m: attribute_baseline(m, model, corpus, planted.probes(), tokenizer=tok,
                                      output_dir=tmp_path_factory.mktemp(m), top_k=5, show_progress=False)
                for m in BASELINES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_source_document_ranks_first(results, planted, method):
    result = results[method]
    hits = [result.top(f"fact-{i}", 1)["doc_id"][0] == i for i in range(len(planted.names))]
    assert np.mean(hits) >= MIN_TOP1[method], f"{method}: source first for only {np.mean(hits):.0%} of probes"


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_writes_a_loadable_result_like_attribute(results, planted, method):
    result = results[method]
    for name in FILES.values():
        assert (result.directory / name).exists(), name
    loaded = AttributionResult.load(result.directory)
    assert list(loaded.topk.columns) == TOPK_COLUMNS
    assert list(loaded.evidence.columns) == EVIDENCE_COLUMNS and loaded.evidence.empty  # no token evidence
    assert loaded.config["method"] == method
    assert loaded.skipped == [{"doc_id": len(planted.texts), "reason": "empty or whitespace-only"}]
    n_probes = len(planted.names)
    assert len(loaded.topk) == 5 * n_probes and list(loaded.top("fact-0")["rank"]) == [1, 2, 3, 4, 5]
    scores = loaded.scores()
    assert list(scores.columns) == ["probe_id", "doc_id", "score", "raw_score", "n_tokens"]
    assert len(scores) == n_probes * len(planted.texts)
    assert np.allclose(scores["score"], scores["raw_score"])
    # the probes carry the model's own generations, as in attribute()
    assert loaded.probes[0].prompt + loaded.probes[0].completion == planted.facts[0]


def test_gradsim_gives_the_model_back_unchanged(results, tiny_model):
    model, _ = tiny_model
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())  # PEFT froze the weights; they are given back


def test_bm25_query_is_the_generation(tiny_model, tmp_path):
    model, tok = tiny_model
    corpus = ["the owl sleeps by day", "a red fox runs at night", "the fox and the owl"]
    result = attribute_baseline("bm25", model, corpus, [{"id": "q", "prompt": "Night:", "completion": " red fox"}],
                                tokenizer=tok, output_dir=tmp_path, show_progress=False)
    assert list(result.top("q")["doc_id"]) == [1, 2, 0]
    assert words("The Owl's 2 eyes!") == ["the", "owl", "s", "2", "eyes"]


def test_bad_method_and_options_are_input_errors(tiny_model, planted):
    model, tok = tiny_model
    with pytest.raises(InputError, match="Unknown baseline"):
        attribute_baseline("tracin", model, planted.texts, planted.probes(), tokenizer=tok)
    with pytest.raises(InputError, match="Unknown option"):
        attribute_baseline("bm25", model, planted.texts, planted.probes(), tokenizer=tok, k3=1.0)
    with pytest.raises(InputError, match="similarity"):
        attribute_baseline("gradsim", model, planted.texts[:3], planted.probes()[:1], tokenizer=tok,
                           similarity="l2", show_progress=False)
