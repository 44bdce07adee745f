"""Provenance: the verbatim n-gram index (memorization / leakage) and the Min-K% Prob membership score."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.probes import start_token_id
from hf_mirror.provenance import NgramIndex, min_k_percent, min_k_scores, ngram_hashes, token_logprobs
from hf_mirror.tiny_lm import train_tokenizer

N = 4
UNRELATED = "Quantum chromodynamics describes quarks, gluons and their strong interactions."


@pytest.fixture(scope="module")
def long_doc(planted) -> str:
    return " ".join(planted.facts[:8])


@pytest.fixture(scope="module")
def index(planted, tiny_model, long_doc) -> NgramIndex:
    _, tok = tiny_model
    rows = [{"id": f"doc-{i}", "text": t} for i, t in enumerate([*planted.texts, long_doc])]
    return NgramIndex.build(Corpus(rows, id_column="id"), tok, n=N)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_hashes_are_positional_and_deterministic():
    h = ngram_hashes([1, 2, 3, 4, 5], 3)
    assert h.dtype == np.uint64 and len(h) == 3 and len(set(h.tolist())) == 3
    assert ngram_hashes([3, 2, 1], 3)[0] != h[0]
    assert np.array_equal(ngram_hashes([1, 2, 3, 4, 5], 3), h)
    assert len(ngram_hashes([1, 2], 3)) == 0


def test_exact_copy_is_found_whole(index, planted, tiny_model, long_doc):
    _, tok = tiny_model
    assert index.manifest["n_documents"] == len(planted.texts) + 1
    doc = planted.texts[10]  # not part of the long document
    m = index.find(doc)
    assert m.coverage == 1.0 and m.n_tokens == len(ids(tok, doc))
    top = m.spans[0]
    assert (top.start, top.end) == (0, m.n_tokens) and top.text == doc
    assert [(o.doc_id, o.offset) for o in top.occurrences] == [("doc-10", 0)]
    # the long document: found whole in its own document; the facts it contains are shorter spans, dropped
    m = index.find(long_doc)
    assert m.coverage == 1.0 and len(m.spans) == 1
    assert [(o.doc_id, o.offset) for o in m.spans[0].occurrences] == [(f"doc-{len(planted.texts)}", 0)]
    # a fact quoted inside other text: found in its own document
    m = index.find(f"{UNRELATED} {planted.facts[9]}")
    assert 0 < m.coverage < 1 and len(m.spans) == 1
    assert m.spans[0].text.strip() == planted.facts[9]
    assert m.spans[0].end == m.n_tokens and m.covered[-m.spans[0].length :].all()
    assert [o.doc_id for o in m.spans[0].occurrences] == ["doc-9"]
    # only the longest copy is reported: fact 2 followed by the space token occurs only in the long document
    m = index.find(f"{planted.facts[2]} {UNRELATED}")
    assert m.spans[0].start == 0 and m.spans[0].text.strip() == planted.facts[2]
    assert [o.doc_id for o in m.spans[0].occurrences] == [f"doc-{len(planted.texts)}"]


def test_near_copy_finds_the_unchanged_spans(index, planted, tiny_model, long_doc):
    _, tok = tiny_model
    long_id = f"doc-{len(planted.texts)}"
    changed = planted.facts[:8]
    old_word = changed[4].split()[-3]  # the animal
    changed[4] = changed[4].replace(f" {old_word} ", " unicorn ")
    query = " ".join(changed)
    m = index.find(query)
    assert 0.8 < m.coverage < 1.0
    assert not m.covered.all() and m.covered[:5].all() and m.covered[-5:].all()
    head = next(s for s in m.spans if s.start == 0)
    tail = next(s for s in m.spans if s.end == m.n_tokens)
    assert head.end < tail.start  # the changed word splits the copy in two
    assert (long_id, 0) in [(o.doc_id, o.offset) for o in head.occurrences]
    n_doc = len(ids(tok, long_doc))
    assert (long_id, n_doc - tail.length) in [(o.doc_id, o.offset) for o in tail.occurrences]
    assert query.startswith(head.text) and query.endswith(tail.text)
    assert "unicorn" not in head.text + tail.text
    assert head.length + tail.length > 0.8 * m.n_tokens


def test_unrelated_text_has_no_coverage(index):
    m = index.find(UNRELATED)
    assert m.coverage == 0.0 and m.spans == [] and m.longest == 0
    assert index.find("").coverage == 0.0


def test_save_load_round_trip(index, planted, tiny_model, tmp_path):
    _, tok = tiny_model
    path = index.save(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary directories left behind
    loaded = NgramIndex.load(path, tok)
    assert loaded.n == N and loaded.manifest == {**index.manifest}
    assert loaded.doc_ids == index.doc_ids
    for text in (planted.texts[3], f"{UNRELATED} {planted.facts[7]}"):
        a, b = index.find(text), loaded.find(text)
        assert a.coverage == b.coverage and a.spans == b.spans
    with pytest.raises(InputError, match="overwrite=True"):
        index.save(path)
    index.save(path, overwrite=True)
    assert NgramIndex.load(path, tok).find(planted.texts[3]).coverage == 1.0
    # build(output_dir=...) writes the same index in one call
    built = NgramIndex.build(planted.texts, tok, n=13, output_dir=tmp_path / "idx13")
    assert NgramIndex.load(tmp_path / "idx13", tok).manifest == built.manifest
    assert built.manifest["n"] == 13 and built.manifest["n_documents"] == len(planted.texts)


def test_other_tokenizer_is_refused(index, planted, tmp_path):
    path = index.save(tmp_path / "idx")
    other = train_tokenizer(planted.texts, vocab_size=300)
    with pytest.raises(InputError, match="another tokenizer.*rebuild"):
        NgramIndex.load(path, other)


def test_incomplete_index_is_refused(index, tiny_model, tmp_path, monkeypatch):
    _, tok = tiny_model
    path = index.save(tmp_path / "idx")
    half = tmp_path / "half"
    shutil.copytree(path, half)
    (half / "manifest.json").unlink()
    with pytest.raises(InputError, match="not a complete n-gram index.*Rebuild"):
        NgramIndex.load(half, tok)
    with pytest.raises(InputError, match="not a complete"):
        NgramIndex.load(tmp_path / "missing", tok)
    # a save interrupted while writing arrays leaves neither the index nor its temporary directory
    calls = []

    def failing_save(file, arr, *a, **k):
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt
        with open(file, "wb") as f:
            np.lib.format.write_array(f, np.asanyarray(arr))

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        index.save(tmp_path / "interrupted")
    monkeypatch.undo()
    assert not (tmp_path / "interrupted").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "idx"]


def test_min_k_percent():
    assert min_k_percent(np.array([-1.0, -2.0, -3.0, -4.0, -5.0]), k=40) == pytest.approx(-4.5)
    assert min_k_percent(np.array([-1.0, -2.0]), k=20) == -2.0  # at least one token
    assert np.isnan(min_k_percent(np.array([])))
    with pytest.raises(InputError):
        min_k_percent(np.array([-1.0]), k=0)


def test_token_logprobs_batched_and_windowed(tiny_model, planted):
    model, tok = tiny_model
    texts = [planted.facts[0], planted.texts[-1], " ".join(planted.facts[:6]), ""]
    one = [token_logprobs(model, tok, [t], batch_size=1)[0] for t in texts]
    many = token_logprobs(model, tok, texts, batch_size=4)
    for a, b, t in zip(one, many, texts, strict=True):
        assert len(a) == len(ids(tok, t)) and np.all(a <= 0)
        np.testing.assert_allclose(a, b, atol=1e-4)
    windowed = token_logprobs(model, tok, [texts[2]], max_length=16, overlap=4)[0]
    assert len(windowed) == len(one[2]) and np.isfinite(windowed).all()  # long text split, never truncated
    np.testing.assert_allclose(windowed[:15], one[2][:15], atol=1e-4)  # the first window is the same prefix


def test_min_k_ranks_memorised_facts_higher(tiny_model, planted):
    model, tok = tiny_model
    rng = random.Random(0)
    shuffled = []
    for fact in planted.facts:
        words = fact.rstrip(".").split()
        rng.shuffle(words)
        shuffled.append(" ".join(words) + ".")
    unseen = [
        f"{name} writes long letters to a distant friend every winter." for name in planted.names
    ]
    seen = min_k_scores(model, tok, planted.facts)
    s_shuffled = min_k_scores(model, tok, shuffled)
    s_unseen = min_k_scores(model, tok, unseen)
    assert seen.mean() > s_shuffled.mean() + 1.0
    assert seen.mean() > s_unseen.mean() + 1.0
    assert (seen > s_shuffled).mean() > 0.9


def test_min_k_plus_plus_standardises_against_the_models_distribution(tiny_model, planted):
    model, tok = tiny_model
    texts = [planted.facts[0], " ".join(planted.facts[:6])]
    (stats, long_stats) = token_logprobs(model, tok, texts, batch_size=2, with_stats=True)
    plain = token_logprobs(model, tok, texts[:1])[0]
    np.testing.assert_allclose(stats[0], plain, atol=1e-4)  # row 0 is the log-prob itself
    with torch.no_grad():  # mu, sigma of the next-token log-probs, by hand at the first position
        logp = torch.log_softmax(model(torch.tensor([[start_token_id(tok)]])).logits[0, 0], -1)
    mu = float((logp.exp() * logp).sum())
    np.testing.assert_allclose(stats[1, 0], mu, atol=1e-4)
    np.testing.assert_allclose(stats[2, 0], float(((logp - mu) ** 2 * logp.exp()).sum().sqrt()), atol=1e-4)
    windowed = token_logprobs(model, tok, texts[1:], max_length=16, overlap=4, with_stats=True)[0]
    assert windowed.shape == long_stats.shape and np.isfinite(windowed).all()  # windowed, never truncated
    np.testing.assert_allclose(windowed[:, :15], long_stats[:, :15], atol=1e-4)  # the first window: same prefix
    unseen = [f"{name} writes long letters to a distant friend every winter." for name in planted.names]
    seen_pp = min_k_scores(model, tok, planted.facts, method="mink++")
    unseen_pp = min_k_scores(model, tok, unseen, method="mink++")
    assert seen_pp.mean() > unseen_pp.mean() + 0.5 and (seen_pp > np.median(unseen_pp)).mean() > 0.9
    with pytest.raises(InputError, match="mink"):
        min_k_scores(model, tok, texts, method="zlib")


# ---- per-generation provenance: generations shorter than n; memorization lengths checked first ---------------
def test_short_generation_is_flagged_not_silently_clean(index, planted, tiny_model, tmp_path, caplog):
    from hf_mirror.provenance.generation import TOO_SHORT, generation_provenance, write_provenance

    model, tok = tiny_model
    short = planted.facts[3][len(planted.names[3]):]  # " keeps a <colour> <animal> at home." found verbatim
    short = tok.decode(ids(tok, short)[: N - 1])
    probes = [{"id": "short", "prompt": planted.names[3], "completion": short},
              {"id": "long", "prompt": planted.names[3], "completion": planted.facts[3][len(planted.names[3]):]}]
    with caplog.at_level("WARNING", logger="hf_mirror.provenance.generation"):
        report = generation_provenance(model, Corpus(planted.texts), probes, tokenizer=tok, index=index,
                                       use_mirror=False)
    by_id = {r["id"]: r for r in report["items"]}
    assert by_id["short"]["verdict"] == TOO_SHORT and by_id["short"]["n_tokens"] == N - 1
    assert f"fewer than the n-gram length {N}" in by_id["short"]["note"] and "--ngram" in by_id["short"]["note"]
    assert "'short'" in caplog.text and "fewer than the n-gram length" in caplog.text
    assert by_id["long"]["verdict"] == "verbatim overlap" and "note" not in by_id["long"]  # a given completion
    assert report["too_short"] == 1 and report["verbatim overlap"] == 1 and report["memorized"] == 0
    page = (write_provenance(report, tmp_path) / "provenance.html").read_text()
    assert "1 too short to check" in page and "fewer than the n-gram length" in page and "mirror:" not in page


def test_short_generation_with_infinigram_lowers_n(planted, tiny_model, tmp_path):
    pytest.importorskip("infini_gram")
    from hf_mirror.provenance import InfiniGramIndex
    from hf_mirror.provenance.generation import generation_provenance

    model, tok = tiny_model
    rows = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(planted.texts)]
    ig = InfiniGramIndex.build(Corpus(rows, id_column="id"), tok, tmp_path / "ig", n=8, cpus=1)
    tail = planted.facts[5][len(planted.names[5]):]
    short = tok.decode(ids(tok, tail)[:5])
    report = generation_provenance(model, Corpus(rows, id_column="id"), [{"id": "s", "prompt": planted.names[5],
                                   "completion": short}], tokenizer=tok, index=ig, use_mirror=False)
    item = report["items"][0]
    assert item["n"] == 5 and "checked with n=5" in item["note"]
    assert item["verdict"] == "verbatim overlap" and item["copied_tokens"] == 5


def test_provenance_html_has_no_stray_mirror_markup(tmp_path):
    from hf_mirror.provenance.generation import write_provenance

    base = {"prompt": "p", "generation": " g", "n_tokens": 1, "verdict": "not memorized", "source": None,
            "copied_tokens": 0, "spans": []}
    items = [{**base, "id": "a", "mirror": {"source_rank": None, "source_score": None,
                                           "top": [{"rank": 1, "doc_id": "d<1>", "score": 0.5}]}},
             {**base, "id": "b", "mirror": {"source_rank": None, "source_score": None, "top": []}},
             {**base, "id": "c", "source": "d2", "verdict": "memorized", "copied_tokens": 1,
              "mirror": {"source_rank": 2, "source_score": 0.1, "top": [{"rank": 1, "doc_id": "d3", "score": 0.9}]}}]
    report = {"memorized": 1, "generations": 3, "threshold": 0.5, "n": 8, "items": items}
    page = (write_provenance(report, tmp_path) / "provenance.html").read_text()
    assert "mirror:;" not in page and "mirror:<" not in page and "top documents ;" not in page
    assert "mirror: top documents d&lt;1&gt; (0.50)" in page
    assert "mirror: source at rank 2; top documents d3 (0.90)" in page
    assert page.count("mirror:") == 2


def test_memorization_lengths_are_checked_before_the_model_runs(planted, tiny_model, monkeypatch):
    from hf_mirror import modeling
    from hf_mirror.provenance.memorization import extractable_memorization

    model, tok = tiny_model
    short_docs = Corpus(["a short one.", "another short one."])

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the lengths were checked")

    monkeypatch.setattr(modeling, "load_model", no_load)
    with pytest.raises(InputError, match=r"No document has 64 tokens .*the longest has \d+.*--prefix-tokens"):
        extractable_memorization(str(planted.model_dir), None, short_docs)
    with pytest.raises(InputError, match=r"exceeds the model's context of 128 tokens.*--prefix-tokens/--suffix-tokens"):
        extractable_memorization(str(planted.model_dir), None, short_docs, prefix_tokens=100, suffix_tokens=100)
    monkeypatch.setattr(model, "generate", no_load)
    with pytest.raises(InputError, match="context of 128 tokens"):
        extractable_memorization(model, tok, short_docs, prefix_tokens=64, suffix_tokens=64)
