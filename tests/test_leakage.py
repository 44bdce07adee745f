"""Leakage audit: exact and near copies of evaluation items are flagged with evidence; clean items are not."""

from __future__ import annotations

import json

import pytest

from hf_mirror.cli import main


def _files(planted, tmp_path, items):
    corpus = tmp_path / "corpus.jsonl"
    long_docs = [" ".join(planted.facts[i : i + 5]) for i in range(0, 40, 5)]  # 8 documents of 5 facts
    corpus.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(long_docs)))
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text("".join(json.dumps(r) + "\n" for r in items))
    return corpus, evalset, long_docs


def test_audit_flags_copies_with_evidence(planted, tmp_path, capsys):
    exact = " ".join(planted.facts[10:12])  # two facts copied verbatim from doc2
    near = " ".join(planted.facts[20:23]).replace(" at home.", " in a house.", 1)  # one edit
    clean = "the weather in the north is cold today and the wind blows hard over the hills."
    items = [{"q": exact, "a": "", "key": "exact"}, {"q": near, "a": "", "key": "near"},
             {"q": clean, "a": "", "key": "clean"}]
    corpus, evalset, _ = _files(planted, tmp_path, items)
    args = ["audit", "--model", str(planted.model_dir), "--corpus", str(corpus), "--id-column", "id",
            "--eval-set", str(evalset), "--question-column", "q", "--answer-column", "a",
            "--eval-id-column", "key", "--output", str(tmp_path / "out"), "--ngram", "6"]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    verdicts = {item["id"]: item for item in report["items"]}
    assert verdicts["exact"]["leaked"] and verdicts["exact"]["score"] == 1.0
    assert verdicts["exact"]["evidence"][0]["documents"][0]["doc_id"] == "doc2"
    assert verdicts["near"]["leaked"] and 0.5 <= verdicts["near"]["score"] < 1.0
    assert not verdicts["clean"]["leaked"] and verdicts["clean"]["score"] == 0.0
    assert report["contamination_rate"] == pytest.approx(2 / 3)
    # memorised text is more likely under the model than the clean sentence (Min-K% Prob)
    assert verdicts["exact"]["min_k_prob"] > verdicts["clean"]["min_k_prob"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "LEAKED" in page and "doc2@" in page
    # the rate gates CI; other detectors are another run: --overwrite replaces the report (not --fail-above alone)
    assert main([*args, "--fail-above", "0.5", "--no-membership"]) == 2
    assert "different run" in capsys.readouterr().err
    assert main([*args, "--fail-above", "0.5", "--no-membership", "--overwrite"]) == 1
    assert "above --fail-above" in capsys.readouterr().err
    assert main([*args, "--fail-above", "0.9", "--no-membership"]) == 0
    assert main([*args[:-1], "8", "--index", str(tmp_path / "out" / "index"), "--output", str(tmp_path / "n8")]) == 2
    assert "holds 6-grams and --ngram asks for 8" in capsys.readouterr().err  # the index's own n-gram length
    assert main([*args, "--membership", "mink++", "--output", str(tmp_path / "pp")]) == 0  # Min-K%++
    pp = json.loads((tmp_path / "pp" / "report.json").read_text())
    assert pp["detector"]["membership"] == "mink++"
    assert {i["id"]: i for i in pp["items"]}["exact"]["min_k_prob"] > {i["id"]: i for i in pp["items"]}["clean"][
        "min_k_prob"]


def test_audit_missing_field_is_a_clear_error(planted, tmp_path, capsys):
    corpus, evalset, _ = _files(planted, tmp_path, [{"question": "x"}])
    rc = main(["audit", "--model", str(planted.model_dir), "--corpus", str(corpus), "--eval-set", str(evalset),
               "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "no field(s) ['text']; fields present: ['question']" in capsys.readouterr().err


def test_memorization_rate_of_a_memorising_model(planted, tmp_path, capsys):
    corpus = tmp_path / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"text": f}) + "\n" for f in planted.facts))
    args = ["memorization", "--model", str(planted.model_dir), "--corpus", str(corpus), "--prefix-tokens", "3",
            "--suffix-tokens", "4", "--samples", "20", "--output", str(tmp_path / "mem")]
    assert main(args) == 0
    report = json.loads((tmp_path / "mem" / "memorization.json").read_text())
    assert report["samples"] == 20 and report["extractable_rate"] >= 0.8
    assert all(item["exact"] == (item["generated_suffix"] == item["true_suffix"]) for item in report["items"])
    assert "extractable memorization" in capsys.readouterr().out


def test_an_untrained_model_memorises_nothing(tiny_model, planted, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_mirror import Corpus
    from hf_mirror.provenance.memorization import extractable_memorization

    _, tok = tiny_model
    untrained = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2)).eval()
    report = extractable_memorization(untrained, tok, Corpus(planted.facts), 3, 4, samples=20)
    assert report["exact"] == 0
