"""Mirror leakage detector, combined detector, `hf-mirror audit --detectors`, per-generation provenance, benchmark."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_mirror import AttributionResult, Corpus
from hf_mirror.cli import main
from hf_mirror.errors import InputError
from hf_mirror.provenance import (
    NgramIndex,
    audit_leakage,
    combined_scores,
    generation_provenance,
    make_items,
    mirror_leakage,
    robust_z,
    split_item,
    stand_out,
)
from hf_mirror.provenance.rewrite import near_copy, paraphrase

CLEAN = [f"{n} writes long letters to a distant friend every winter." for n in ("kalo", "mira", "tuve", "zope")]


def test_split_item_keeps_the_text():
    assert split_item("dog: a member of the genus Canis.") == ("dog:", " a member of the genus Canis.")
    p, c = split_item("The quick brown fox jumps over the lazy dog today.")
    assert p == "The quick" and p + c == "The quick brown fox jumps over the lazy dog today."
    p, c = split_item("one two")
    assert (p, c) == ("one", " two")
    assert "".join(split_item("supercalifragilistic")) == "supercalifragilistic"
    with pytest.raises(InputError):
        split_item("   ")
    items = make_items([("q", "What is two plus two?", "Four."), ("t", "ab: cd"), {"id": "d", "text": "x y z w"}])
    assert [(i.prompt, i.completion) for i in items] == [("What is two plus two?", " Four."), ("ab:", " cd"),
                                                          ("x", " y z w")]
    assert items[0].text == "What is two plus two? Four."


def test_stand_out_statistic():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=500)
    lone = np.append(noise, 20.0)
    top_z, margin = stand_out(lone)
    assert top_z > 15 and margin > 10
    twice = np.append(lone, 20.0)  # the same text injected twice: margin collapses, top_z does not
    top_z2, margin2 = stand_out(twice)
    assert top_z2 > 15 and margin2 == 0.0
    assert stand_out(noise)[0] < 5
    assert math.isnan(stand_out(np.array([1.0, 2.0]))[0])


def test_combined_score_is_the_verdict_rule():
    cov = np.array([1.0, 0.5, 0.49, 0.0] + [0.0] * 8)
    mirror = np.array([0, 0, 0, 30.0] + list(np.linspace(-1, 1, 8)))
    mink = np.array([0, 0, 0, 30.0] + list(np.linspace(1, -1, 8)))
    s = combined_scores(cov, mirror, mink, threshold=0.5, combined_threshold=3.0)
    assert s[0] == pytest.approx(6.0) and s[1] == pytest.approx(3.0) and s[2] < 3.0
    assert s[3] > 3.0  # no verbatim overlap, but both the mirror and Min-K% stand out
    # one signal alone (mirror high, Min-K% at the median) is not enough at this threshold
    mink_flat = mink.copy()
    mink_flat[3] = 0.0
    assert combined_scores(cov, mirror, mink_flat, 0.5, 3.0)[3] < combined_scores(cov, mirror, mink, 0.5, 3.0)[3]
    z = robust_z(mirror)
    assert np.isfinite(z).all() and z[3] == z.max()
    assert np.isnan(robust_z([1.0, 2.0, 3.0])).all()  # too few items to calibrate
    assert combined_scores(np.zeros(3), mirror[:3] + 50, mink[:3] + 50)[2] == 0.0  # uncalibrated: n-gram only
    with pytest.raises(InputError):
        combined_scores(None, None, None)


def test_rewrites_are_small_edits_and_paraphrases():
    rng = random.Random(0)
    text = "grasshopper: terrestrial plant-eating insect with hind legs adapted for leaping. Also called hopper. " \
           "A kind of orthopterous insect."
    near = near_copy(text, rng)
    assert near != text and abs(len(near.split()) - len(text.split())) <= 1
    para = paraphrase(text, rng)
    assert "hopper" in para and "orthopterous insect" in para and "A kind of" not in para
    assert "plant-eating insect with hind legs" not in para


@pytest.fixture(scope="module")
def facts_corpus(planted, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(planted.texts)))
    return path


def test_mirror_detector_names_the_source_of_a_trained_item(tiny_model, planted, facts_corpus, tmp_path):
    model, tok = tiny_model
    trained = (0, 1, 3, 6, 7, 8, 10, 14)  # facts whose completion (colour, animal) no other fact shares
    items = [(f"fact-{i}", planted.facts[i]) for i in trained] + [(f"clean-{i}", t) for i, t in enumerate(CLEAN)]
    corpus = Corpus(str(facts_corpus), id_column="id")
    ev = mirror_leakage(model, corpus, items, tokenizer=tok, output_dir=tmp_path / "m", threshold=8.0)
    hits = [ev[f"fact-{i}"].top[0]["doc_id"] == f"doc-{i}" for i in trained]
    assert sum(hits) >= 5  # a 2-layer model memorising 60 sentences: the source is usually, not always, first
    for e in ev.values():
        assert e.ranking[: len(e.top)] == [t["doc_id"] for t in e.top] and len(e.ranking) == len(planted.texts)
        assert e.leaked == (e.top_z >= 8.0) and e.top[0]["score"] >= e.top[-1]["score"]
    fact_z = [ev[f"fact-{i}"].top_z for i in trained]
    clean_z = [ev[f"clean-{i}"].top_z for i in range(4)]
    assert np.mean(fact_z) > max(clean_z) and np.median(fact_z) > np.median(clean_z) + 2


def test_audit_with_all_detectors(planted, facts_corpus, tmp_path, capsys):
    rows = [{"id": f"fact-{i}", "text": planted.facts[i]} for i in range(4)]
    rows += [{"id": f"clean-{i}", "text": t} for i, t in enumerate(CLEAN)]
    rows += [{"id": f"shuffled-{i}", "text": "the " + " ".join(reversed(planted.facts[20 + i].split()))}
             for i in range(4)]
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["audit", "--model", str(planted.model_dir), "--corpus", str(facts_corpus), "--id-column", "id",
            "--eval-set", str(evalset), "--eval-id-column", "id", "--output", str(out), "--ngram", "6",
            "--detectors", "all"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["detector"]["method"] == "combined" and report["detector"]["detectors"] == [
        "ngram", "mirror", "minkprob"]
    items = {r["id"]: r for r in report["items"]}
    for i in range(4):
        r = items[f"fact-{i}"]
        assert r["leaked"] and set(r["scores"]) >= {"ngram", "mirror", "minkprob", "combined"}
        assert r["score"] == r["scores"]["combined"] and r["scores"]["ngram"] == 1.0
        assert r["mirror"]["margin"] >= 0 and r["mirror"]["top"][0]["doc_id"] == r["mirror"]["doc_id"]
        assert r["mirror"]["prompt"] + r["mirror"]["completion"] == planted.facts[i]
    assert sum(items[f"fact-{i}"]["mirror"]["doc_id"] == f"doc-{i}" for i in range(4)) >= 2
    assert not any(items[f"clean-{i}"]["leaked"] for i in range(4))
    assert report["contamination_rate"] == pytest.approx(4 / 12)
    page = (out / "report.html").read_text()
    assert "mirror: top document <b>doc-" in page and "<th>combined</th>" in page
    assert (out / "mirror" / "topk.parquet").exists()
    assert "verdict by combined" in capsys.readouterr().out
    # the default stays the n-gram verdict (with Min-K% as a side score); unknown detectors are refused
    assert main([*args[:-2], "--index", str(out / "index"), "--output", str(out.parent / "ngram-verdict")]) == 0
    out = out.parent / "ngram-verdict"
    report = json.loads((out / "report.json").read_text())
    assert report["detector"]["method"] == "ngram" and "mirror" not in report["items"][0]["scores"]
    assert report["items"][0]["score"] == report["items"][0]["scores"]["ngram"]
    assert main([*args[:-1], "ngram,bogus"]) == 2
    assert "Unknown --detectors" in capsys.readouterr().err


def test_audit_leakage_library_without_ngram(tiny_model, planted):
    model, tok = tiny_model
    items = [(f"fact-{i}", planted.facts[i]) for i in range(10)] + [(f"clean-{i}", t) for i, t in enumerate(CLEAN)]
    report = audit_leakage(None, items, model=model, tokenizer=tok, detectors=["minkprob"])
    assert report["detector"]["method"] == "combined"
    scores = [r["scores"]["minkprob_z"] for r in report["items"]]
    assert np.mean(scores[:10]) > np.mean(scores[10:])
    with pytest.raises(InputError, match="needs the corpus"):
        audit_leakage(None, items, model=model, tokenizer=tok, detectors=["mirror"])
    with pytest.raises(InputError, match="n-gram index"):
        audit_leakage(None, items, detectors=["ngram"])


def test_generation_provenance_names_the_memorized_source(tiny_model, planted, facts_corpus, tmp_path):
    model, tok = tiny_model
    corpus = Corpus(str(facts_corpus), id_column="id")
    probes = [{"id": f"p{i}", "prompt": f"{planted.names[i]} keeps a"} for i in (1, 4)]
    probes.append({"id": "free", "prompt": "Hello", "completion": " the sky over the sea is very wide and calm"})
    index = NgramIndex.build(corpus, tok, n=4)
    report = generation_provenance(model, corpus, probes, tokenizer=tok, index=index, output_dir=tmp_path)
    by_id = {r["id"]: r for r in report["items"]}
    for i in (1, 4):
        r = by_id[f"p{i}"]
        assert r["verdict"] == "memorized" and r["source"] == f"doc-{i}"
        span = r["spans"][0]
        assert r["generation"][span["chars"][0]:span["chars"][1]] == span["text"]
        assert planted.texts[i][len(f"{planted.names[i]} keeps a"):].startswith(r["generation"][:5])
        assert r["mirror"]["source_rank"] <= 3 and r["mirror"]["top"][0]["rank"] == 1
        # the mirror's own view: every scanned document by the mirror's score (not the hybrid's candidates-only score)
        moved = AttributionResult.load(tmp_path / "attribution").moved(f"p{i}", 3)
        assert [t["doc_id"] for t in r["mirror"]["top"][:3]] == moved["doc_id"].tolist()
    assert by_id["free"]["verdict"] == "no verbatim overlap" and by_id["free"]["source"] is None  # a given text
    assert report["memorized"] == 2


def test_provenance_cli(planted, facts_corpus, tmp_path, capsys):
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"id": "p0", "prompt": f"{planted.names[0]} keeps a"}) + "\n")
    out = tmp_path / "prov"
    assert main(["provenance", "--model", str(planted.model_dir), "--corpus", str(facts_corpus), "--id-column", "id",
                 "--probes", str(probes), "--output", str(out), "--ngram", "4", "--no-mirror"]) == 0
    report = json.loads((out / "provenance.json").read_text())
    assert report["items"][0]["verdict"] == "memorized" and report["items"][0]["source"] == "doc-0"
    assert "mirror" not in report["items"][0]
    assert "<mark>" in (out / "provenance.html").read_text()
    assert "p0: memorized from doc-0" in capsys.readouterr().out


def test_benchmark_quick(tmp_path):
    cmd = [sys.executable, "recipes/benchmark_leakage.py", "--quick", "--json", str(tmp_path / "b.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| injection | detector |" in proc.stdout
    result = json.loads((tmp_path / "b.json").read_text())
    rows = {(e["injection"], e["detector"]): e for e in result["table"]}
    assert rows[("exact", "ngram")]["top1"] == 1.0 and rows[("exact", "combined")]["auroc"] == 1.0
    assert rows[("exact", "minkprob")]["top1"] is None
    assert rows[("clean", "combined")]["flagged"] == 0.0
    assert rows[("exact", "mirror")]["top5"] >= 2 / 3
    assert all({"mink", "mink++"} <= set(r["scores"]) for r in result["per_item"].values())
    rescore = [sys.executable, "recipes/benchmark_leakage.py", "--rescore", str(tmp_path / "b.json"),
               "--membership", "mink++", "--json", str(tmp_path / "pp.json")]
    proc = subprocess.run(rescore, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pp = json.loads((tmp_path / "pp.json").read_text())
    assert pp["membership"] == "mink++"
    assert all(r["scores"]["minkprob"] == r["scores"]["mink++"] for r in pp["per_item"].values())
