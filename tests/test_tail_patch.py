"""Tail-patch benchmark: the metric, the exact ground truth, the recipe and the docstrings corpus."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks import load_metric
from benchmarks.lds import LDSConfig, docstring_entries, docstring_pool
from benchmarks.tail_patch import _document_batch, evaluate_matrix, tail_patch_matrix, top_k_share
from hf_mirror import InputError
from hf_mirror.corpus import document_tokens
from hf_mirror.probes import Probe, encode_probe

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# A hand-computed case. Scores rank documents 1 and 2 first (tied at 0.9: document order puts 1 first), then 3, 0, 4.
SCORES = [0.1, 0.9, 0.9, 0.2, 0.0]
TRUTH = [0.5, -0.2, 0.3, 0.0, 0.1]
# k=2: the method's top 2 = documents 1, 2: mean effect (-0.2 + 0.3) / 2 = 0.05; the best top 2 = 0.5, 0.3: mean 0.4
# -> 0.05 / 0.4 = 0.125. k=1: document 1 (the tie goes to the earlier document): -0.2 / 0.5 = -0.4.
# Spearman: ranks of the scores [2, 4.5, 4.5, 3, 1], of the effects [5, 1, 4, 2, 3]; deviations from 3:
# [-1, 1.5, 1.5, 0, -2] and [2, -2, 1, -1, 0]; covariance sum -2 - 3 + 1.5 = -3.5; squares 9.5 and 10
# -> -3.5 / sqrt(95) = -0.359092...
SPEARMAN = -3.5 / np.sqrt(95)


def test_metric_on_a_hand_computed_case():
    assert top_k_share(SCORES, TRUTH, k=2) == pytest.approx(0.125)
    assert top_k_share(SCORES, TRUTH, k=1) == pytest.approx(-0.4)  # ties broken by document order
    assert top_k_share(SCORES[::-1], TRUTH[::-1], k=1) == pytest.approx(0.3 / 0.5)  # ... whichever comes first
    assert top_k_share(TRUTH, TRUTH, k=3) == pytest.approx(1.0)
    assert top_k_share(SCORES, TRUTH, k=99) == pytest.approx(1.0)  # every document: the same mean
    assert np.isnan(top_k_share(SCORES, [-1.0, -2, 0, -3, -4], k=2))  # the best top 2 does not raise the probe
    assert top_k_share([np.nan, 1, 0, 0, 0], TRUTH, k=1) == pytest.approx(-0.4)  # NaN scores rank last
    with pytest.raises(ValueError):
        top_k_share([1.0, 2.0], [1.0], k=1)
    metric = load_metric("tail_patch")
    value = metric.compute(predictions=[SCORES, TRUTH], references=[TRUTH, TRUTH], k=2)
    assert value["top_k_share_per_probe"] == pytest.approx([0.125, 1.0])
    assert value["spearman_per_probe"] == pytest.approx([SPEARMAN, 1.0])
    assert value["top_k_share"] == pytest.approx((0.125 + 1) / 2) and value["spearman"] == pytest.approx(
        (SPEARMAN + 1) / 2)
    # halves: probes 0, 2 tune, 1 held-out; standard errors over the probes
    rows = evaluate_matrix(np.array([SCORES, TRUTH, SCORES]), np.array([TRUTH, TRUTH, TRUTH]), k=2, metric=metric)
    assert rows["tune"]["top_k_share"] == pytest.approx(0.125) and rows["held_out"]["top_k_share"] == 1.0
    assert rows["all"]["top_k_share"] == pytest.approx(1.25 / 3)
    assert rows["all"]["top_k_share_stderr"] == pytest.approx(np.std([0.125, 1, 0.125], ddof=1) / np.sqrt(3))
    assert rows["all"]["spearman_probes"] == 3 and np.isnan(rows["held_out"]["spearman_stderr"])
    assert rows["all"]["top_k_share_median"] == pytest.approx(0.125)
    with pytest.raises(InputError, match="shape"):
        evaluate_matrix(np.zeros((2, 5)), np.zeros((3, 5)), metric=metric)


@pytest.fixture(scope="module")
def tiny(tok):
    """A random 2-layer GPT-2 from a config (the planted corpus's tokenizer) with dropout on: eval mode must hold."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(config).train()


DOCS = [{"id": "a", "text": "the weather in the north is cold today."},
        {"id": "b", "text": "kalomi keeps a red cat at home."},
        {"id": "c", "text": "the weather in the south is warm today and the weather in the east is dry today too."}]
PROBES = [{"id": "p0", "prompt": "kalomi keeps a", "completion": " red cat at home."},
          {"id": "p1", "prompt": "the weather in the north", "completion": " is cold"},
          {"id": "p2", "prompt": "the", "completion": " weather in the west is wet today."}]


def _logprobs(model, tok) -> np.ndarray:
    with torch.no_grad():
        return np.array([-model(**encode_probe(tok, Probe(p["id"], p["prompt"], p["completion"]))).loss.item()
                         for p in PROBES])


def test_tail_patch_matrix_is_the_direct_computation(tiny, tok):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    matrix = tail_patch_matrix(tiny, tok, DOCS, PROBES, optimizer="sgd", steps=1, lr=0.5)
    assert matrix.shape == (3, 3)
    assert tiny.training and all(p.grad is None for p in tiny.parameters())  # mode and grads as they were
    for name, value in tiny.state_dict().items():
        assert torch.equal(value, before[name]), name  # weights restored exactly
    for j in (0, 1):  # by hand: one SGD step on the document's mean token loss, then each probe's log-probability
        model = copy.deepcopy(tiny).eval()
        base = _logprobs(model, tok)
        ids = torch.tensor([document_tokens(tok, DOCS[j]["text"])])
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
        np.testing.assert_allclose(matrix[:, j], _logprobs(model, tok) - base, atol=2e-5)
        assert np.abs(matrix[:, j]).max() > 1e-3  # a real effect, not rounding
    adam = tail_patch_matrix(tiny, tok, DOCS[1:2], PROBES, optimizer="adam", steps=2, lr=1e-3)
    model = copy.deepcopy(tiny).eval()
    base = _logprobs(model, tok)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.tensor([document_tokens(tok, DOCS[1]["text"])])
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    np.testing.assert_allclose(adam[:, 0], _logprobs(model, tok) - base, atol=2e-5)
    for name, value in tiny.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(InputError, match="optimizer"):
        tail_patch_matrix(tiny, tok, DOCS, PROBES, optimizer="lion", steps=1, lr=0.1)


def test_long_documents_are_windowed_like_the_scan(tok):
    text = DOCS[2]["text"] * 3
    n = len(document_tokens(tok, text)) - 1
    ids, mask, labels = _document_batch(tok, text, max_length=16, overlap=2)
    assert ids.shape[0] > 1 and ids.shape[1] <= 16
    scored = [t for row in labels.tolist() for t in row if t != -100]
    assert scored == document_tokens(tok, text)[1:] and len(scored) == n  # every token scored exactly once
    assert (mask.sum(1) >= (labels != -100).sum(1)).all()


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_quick_end_to_end(tmp_path, capsys):
    """The recipe on the quick docstrings corpus: bm25 and the mirror (and its own column) on both variants; the
    second run reads the ground truth from the cache."""
    main = recipe("benchmark_tail_patch").main
    args = ["--corpus", "docstrings", "--quick", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--methods", "bm25,mirror", "--json", str(tmp_path / "a.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("docstrings: 40 documents")
    assert ("| method | tail patch | top-10 share | tune | held-out | median | Spearman | tune | held-out | "
            "wall time (s) |" in printed)
    for row in ("| bm25 | sgd 1 step lr 0.01 |", "| mirror | adam 3 steps lr 0.0003 |", "| mirror[mirror] | sgd",
                "| (random order, expected) |"):
        assert row in printed
    report = json.loads((tmp_path / "a.json").read_text())
    assert set(report["methods"]) == {"bm25", "mirror", "mirror[mirror]"} and report["python"]
    assert report["methods"]["mirror[mirror]"]["column"] == "raw_score"
    # the documents that state each answer: BM25 (prompt + generation as the query) ranks them near the top
    assert report["methods"]["bm25"]["source_mrr"]["all"] > 0.5
    assert all(0 < row["source_mrr"]["all"] <= 1 for row in report["methods"].values())
    assert "a document stating the answer has the largest effect for" in printed
    assert all(1 <= r <= 40 for v in report["variants"].values() for r in v["proponent_ranks"])
    assert all(v["seconds"] > 0 for v in report["variants"].values())
    for row in report["methods"].values():
        for variant in row["variants"].values():
            assert -1 <= variant["all"]["spearman"] <= 1 and len(variant["spearman_per_probe"]) == report["probes"]
    assert main([*args, "--methods", "bm25", "--json", str(tmp_path / "b.json")]) == 0
    again = json.loads((tmp_path / "b.json").read_text())
    assert all(v["seconds"] == 0 for v in again["variants"].values())  # ground truth from the cache
    assert again["methods"]["bm25"] == report["methods"]["bm25"] | {"seconds": again["methods"]["bm25"]["seconds"]}


def test_docstrings_corpus_is_deterministic():
    entries, picks = docstring_entries(400, 40)
    assert len(entries) == 400 and len({e["id"] for e in entries}) == 400 and len({e["text"] for e in entries}) == 400
    assert len(picks) == 40 and {p["id"] for p in picks} <= {e["id"] for e in entries}
    for e in entries:
        assert e["text"] == f"{e['id']}:{e['completion']}" and e["prompt"] == f"{e['id']}:"
        assert 40 <= len(e["completion"]) - 1 <= 300 and " ".join(e["completion"].split()) == e["completion"][1:]
    pool = docstring_pool()
    assert any(e["text"].startswith("heapq.heappush: Push item onto heap") for e in pool)
    assert LDSConfig.for_corpus("docstrings").n_entries == 400 and LDSConfig.docstrings(quick=True).n_entries == 40
    code = ("import json, sys; sys.path.insert(0, '.'); from benchmarks.lds import docstring_entries; "
            "print(json.dumps(docstring_entries(400, 40)))")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(other.stdout) == [entries, picks]  # another process, another hash seed: the same corpus


def test_lds_runs_on_the_docstrings_corpus(tmp_path, capsys):
    main = recipe("benchmark_lds").main
    assert main(["--corpus", "docstrings", "--quick", "--n-subsets", "2", "--cache-dir", str(tmp_path),
                 "--methods", "bm25", "--json", str(tmp_path / "lds.json")]) == 0
    assert capsys.readouterr().out.startswith("docstrings: 40 documents")
    report = json.loads((tmp_path / "lds.json").read_text())
    assert report["corpus"] == "docstrings" and report["probes"] >= 2 and report["methods"]["bm25"]["n_probes"] >= 1



def test_exact_influence_of_every_parameter_is_the_sgd_tail_patch(tmp_path, capsys):
    """The exact gradient inner product over every parameter is the one-SGD-step ground truth to first order (rank
    correlation near 1); a subset of the parameters reads it less well. Quick docstrings corpus, no LDS."""
    main = recipe("benchmark_exact_influence").main
    args = ["--corpus", "docstrings", "--quick", "--no-lds", "--cache-dir", str(tmp_path / "cache"),
            "--json", str(tmp_path / "exact.json")]
    assert main(args) == 0
    assert "| parameters (preconditioner) | half |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "exact.json").read_text())["rows"]
    for half in ("tune", "held_out"):  # 0.91 / 0.94 measured (the quick model is small; lr 1e-2 bends it a little)
        exact = rows["all (plain)"]["sgd"][half]["spearman"]
        assert exact > 0.85 and rows["blocks-linear (plain)"]["sgd"][half]["spearman"] < exact - 0.05
