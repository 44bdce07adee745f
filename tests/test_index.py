"""The candidate index (issue #13, part 1): `hf-mirror index` builds BM25 + n-grams (+ dense) once; `attribute
--index` reuses the BM25 index with the same answer; another corpus or tokenizer, a half-written index, a probe
with no candidates and M above the corpus size are refused or fall back as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_mirror import InputError, RetrievalConfig, ScanConfig, SpeedConfig, attribute
from hf_mirror.cli import main
from hf_mirror.corpus import Corpus
from hf_mirror.probes import Probe
from hf_mirror.provenance import NgramIndex, load_index
from hf_mirror.retrieval import CandidateIndex, build_index, ngram, retrieve

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture
def corpus_file(planted, tmp_path) -> Path:
    return _write(tmp_path / "corpus.jsonl", [*planted.texts, "", "   "])  # two documents without text


def _probes(planted) -> list[Probe]:
    return [Probe(f"p{i}", f"{n} keeps a", planted.facts[i].split(" keeps a")[1]) for i, n in
            enumerate(planted.names[:6])]


def _scores(result) -> pd.DataFrame:
    return result.scores().sort_values(["probe_id", "doc_id"]).reset_index(drop=True)


def test_index_command_builds_bm25_and_ngrams_and_attribute_reuses_it(planted, corpus_file, tmp_path, monkeypatch,
                                                                      one_thread):
    out = tmp_path / "index"
    assert main(["index", "--model", str(planted.model_dir), "--corpus", str(corpus_file), "--id-column", "id",
                 "--output", str(out), "--ngram", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bm25", "hf_mirror.json", "hf_mirror.lock", "manifest.json",
                                                     "ngram"]  # the index, and its ownership (hf_mirror.ownership)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "index"]  # no build leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_documents"] == len(planted.texts) + 2 and manifest["bm25"]["documents"] == len(planted.texts)
    # audit/provenance --index open its verbatim part as before
    from hf_mirror.modeling import load_tokenizer

    tok = load_tokenizer(str(planted.model_dir))  # as audit/provenance load it
    verbatim = load_index(out, tok)
    assert isinstance(verbatim, NgramIndex) and verbatim.n == 5 and verbatim.find(planted.texts[3]).coverage == 1.0
    # the saved BM25 index gives what indexing the corpus on the fly gives
    corpus = Corpus(str(corpus_file), id_column="id")
    probes = _probes(planted)
    assert CandidateIndex.load(out, tok, corpus).retrieve(probes, 7) == retrieve(corpus.documents(), probes, 7)

    probe_file = tmp_path / "probes.jsonl"
    probe_file.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "completion": p.completion}) + "\n"
                                  for p in probes))
    common = ["attribute", "--model", str(planted.model_dir), "--corpus", str(corpus_file), "--id-column", "id",
              "--probes", str(probe_file), "--no-cache", "--candidates", "bm25:5", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "fly")]) == 0

    def no_corpus_pass(*args, **kwargs):
        raise AssertionError("--index must not index the corpus again")

    monkeypatch.setattr("hf_mirror.pipeline.retrieve", no_corpus_pass)
    assert main([*common, "--output", str(tmp_path / "indexed"), "--index", str(out)]) == 0
    from hf_mirror.results import AttributionResult

    fly, indexed = AttributionResult.load(tmp_path / "fly"), AttributionResult.load(tmp_path / "indexed")
    pd.testing.assert_frame_equal(_scores(fly), _scores(indexed))
    for p in probes:
        pd.testing.assert_frame_equal(fly.top(p.id), indexed.top(p.id))
    assert indexed.config["scan"]["index"] == str(out)


def test_infini_gram_backend_serves_attribute_audit_and_provenance(planted, corpus_file, tmp_path, one_thread):
    """`hf-mirror index --backend infini-gram`: the same layout with infinigram/ for ngram/; attribute --index gets
    the same BM25 candidates (and result) as from the n-gram backend's index; audit/provenance --index open its
    suffix array and give the n-gram index's reports."""
    pytest.importorskip("infini_gram", reason="the infini-gram backend needs pip install 'hf_mirror[infinigram]'")
    from hf_mirror.modeling import load_tokenizer
    from hf_mirror.provenance import InfiniGramIndex
    from hf_mirror.results import AttributionResult

    tok = load_tokenizer(str(planted.model_dir))
    common = ["--model", str(planted.model_dir), "--corpus", str(corpus_file), "--id-column", "id", "--ngram", "4"]
    dirs = {b: tmp_path / b for b in ("ngram", "infini-gram")}
    for backend, out in dirs.items():
        assert main(["index", *common, "--backend", backend, "--output", str(out)]) == 0
    out = dirs["infini-gram"]
    assert sorted(p.name for p in out.iterdir()) == ["bm25", "hf_mirror.json", "hf_mirror.lock", "infinigram",
                                                     "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "infini-gram", "ngram"]  # no leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verbatim"] == {"backend": "infini-gram", "dir": "infinigram", "n": 4,
                                    "tokens": InfiniGramIndex.load(out / "infinigram", tok).manifest["n_tokens"]}
    assert "ngram" not in manifest and manifest["n_documents"] == len(planted.texts) + 2
    corpus = Corpus(str(corpus_file), id_column="id")
    ig, ng = CandidateIndex.load(out, tok, corpus), CandidateIndex.load(dirs["ngram"], tok, corpus)
    probes = _probes(planted)
    assert ig.retrieve(probes, 7) == ng.retrieve(probes, 7) == retrieve(corpus.documents(), probes, 7)
    verbatim = ig.verbatim(tok)
    assert isinstance(verbatim, InfiniGramIndex) and isinstance(load_index(out, tok), InfiniGramIndex)
    assert verbatim.find(planted.texts[3]).spans == ng.verbatim(tok).find(planted.texts[3]).spans
    with pytest.raises(InputError, match="infini-gram verbatim index.*load_index"):
        NgramIndex.load(out, tok)
    stamp = (out / "manifest.json").stat().st_mtime_ns  # the same build again: up to date; the backend is in its key
    assert main(["index", *common, "--backend", "infini-gram", "--output", str(out)]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert main(["index", *common, "--output", str(out)]) == 2  # the n-gram backend: another index, not over it
    # attribute --index: the same result from either index
    probe_file = _probe_file(tmp_path, [{"id": p.id, "prompt": p.prompt, "completion": p.completion}
                                        for p in probes[:2]])
    for backend, index in dirs.items():
        assert main(["attribute", *common[:-2], "--probes", str(probe_file), "--no-cache", "--candidates", "bm25:5",
                     "--no-progress", "--index", str(index), "--output", str(tmp_path / f"run-{backend}")]) == 0
    runs = [AttributionResult.load(tmp_path / f"run-{b}") for b in dirs]
    pd.testing.assert_frame_equal(_scores(runs[0]), _scores(runs[1]))
    # audit / provenance --index open the suffix array: the n-gram index's reports
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"text": planted.facts[3]}) + "\n" + json.dumps({"text": "an unseen line."}) + "\n")
    reports = {}
    for backend, index in dirs.items():
        audit, prov = tmp_path / f"audit-{backend}", tmp_path / f"provenance-{backend}"
        assert main(["audit", *common, "--eval-set", str(evals), "--eval-split", "train", "--detectors", "ngram",
                     "--index", str(index), "--output", str(audit)]) == 0
        assert main(["provenance", *common, "--probes", str(probe_file), "--no-mirror", "--index", str(index),
                     "--output", str(prov)]) == 0
        reports[backend] = (json.loads((audit / "report.json").read_text()),
                            json.loads((prov / "provenance.json").read_text()))
    assert reports["ngram"] == reports["infini-gram"] and reports["ngram"][0]["leaked"] == 1


def test_stale_half_written_and_foreign_indexes_are_refused(planted, tiny_model, corpus_file, tmp_path, monkeypatch,
                                                            capsys):
    model, tok = tiny_model
    corpus = Corpus(str(corpus_file), id_column="id")
    out = tmp_path / "index"
    build_index(corpus, tok, out, n=4)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert build_index(corpus, tok, out, n=4).n_documents == len(planted.texts)  # the same build again: up to date
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # (not rebuilt)
    with pytest.raises(InputError, match="holds a different run.*pass --overwrite"):
        build_index(corpus, tok, out, n=5)  # another index is never written over it without overwrite
    # another tokenizer
    from hf_mirror.tiny_lm import train_tokenizer

    other = train_tokenizer(planted.texts, vocab_size=300)
    with pytest.raises(InputError, match="another tokenizer"):
        CandidateIndex.load(out, other, corpus)
    # other corpus settings (ids from positions instead of the id column)
    with pytest.raises(InputError, match="other corpus settings.*id_column"):
        CandidateIndex.load(out, tok, Corpus(str(corpus_file), id_column="none"))
    # through attribute: refused before anything is fitted or written
    probes = [{"id": "p0", "prompt": f"{planted.names[0]} keeps a"}]
    edited = _write(tmp_path / "edited.jsonl", planted.texts[:10])
    with pytest.raises(InputError, match="other corpus content"):
        attribute(model, Corpus(str(edited), id_column="id"), probes, tokenizer=tok, output_dir=tmp_path / "r",
                  scan=ScanConfig(retrieval=RetrievalConfig(index=str(out))), show_progress=False)
    corpus_file.write_text(corpus_file.read_text() + json.dumps({"id": "new", "text": "a new document."}) + "\n")
    assert main(["attribute", "--model", str(planted.model_dir), "--corpus", str(corpus_file), "--id-column", "id",
                 "--probes", str(_probe_file(tmp_path, probes)), "--output", str(tmp_path / "r2"), "--index",
                 str(out), "--no-progress"]) == 2
    assert "other corpus content" in capsys.readouterr().err and not (tmp_path / "r2" / "adapters").exists()
    # a verbatim-only index (the old `hf-mirror index` layout) is not a candidate index
    NgramIndex.build(Corpus(str(corpus_file), id_column="id"), tok, n=4, output_dir=tmp_path / "old")
    with pytest.raises(InputError, match="only a verbatim index"):
        CandidateIndex.load(tmp_path / "old", tok)
    # half-written: no manifest
    (out / "manifest.json").unlink()
    with pytest.raises(InputError, match="not a complete hf-mirror index.*half-written"):
        CandidateIndex.load(out, tok, corpus)


def _probe_file(tmp_path: Path, probes: list[dict]) -> Path:
    path = tmp_path / "probes.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in probes))
    return path


def test_an_interrupted_build_is_never_loaded_and_a_rerun_completes_it(planted, tok, corpus_file, tmp_path,
                                                                          monkeypatch):
    corpus = Corpus(str(corpus_file), id_column="id")
    ref = build_index(corpus, tok, tmp_path / "ref", n=4)
    real, calls = ngram.ngram_hashes, []

    def failing(tokens, n):
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return real(tokens, n)

    monkeypatch.setattr(ngram, "ngram_hashes", failing)
    with pytest.raises(KeyboardInterrupt):
        build_index(corpus, tok, tmp_path / "index", n=4, checkpoint_ngrams=100)
    assert not (tmp_path / "index" / "manifest.json").exists() and (tmp_path / "index" / ".hf_mirror-new").is_dir()
    with pytest.raises(InputError, match="build was interrupted.*rerun"):
        CandidateIndex.load(tmp_path / "index", tok)
    calls.clear()
    monkeypatch.setattr(ngram, "ngram_hashes", lambda tokens, n: (calls.append(1), real(tokens, n))[1])
    index = build_index(corpus, tok, tmp_path / "index", n=4, checkpoint_ngrams=100)
    assert 0 < len(calls) < len(planted.texts) - 10  # resumed from the checkpoint, the BM25 terms with it
    assert not (tmp_path / "index" / ".hf_mirror-new").exists()
    assert {k: v for k, v in index.manifest.items()} == ref.manifest
    probes = _probes(planted)
    assert index.retrieve(probes, 10) == ref.retrieve(probes, 10)


def test_no_candidates_and_m_above_the_corpus_fall_back_as_documented(planted, tiny_model, corpus_file, tmp_path,
                                                                     caplog, one_thread):
    model, tok = tiny_model
    corpus = Corpus(str(corpus_file), id_column="id")
    index = build_index(corpus, tok, tmp_path / "index", n=4)
    probes = [*_probes(planted)[:2], Probe("nothing", "???", " !!!"), Probe("unknown", "qwertyuiop", " zxcvb")]
    found = index.retrieve(probes, 1000)  # M above the corpus: every document with text is a candidate
    assert found == retrieve(corpus.documents(), probes, 1000)
    assert all(len(found.scores[p.id]) == len(planted.texts) for p in probes[:2])
    assert found.scores["nothing"] == {} and found.scores["unknown"] == {}  # no word in common: no candidates
    assert "shares no word with the corpus" in caplog.text
    result = attribute(model, corpus, [{"id": p.id, "prompt": p.prompt, "completion": p.completion} for p in probes],
                       tokenizer=tok, output_dir=tmp_path / "run", show_progress=False,
                       scan=ScanConfig(retrieval=RetrievalConfig(candidates=1000, index=str(tmp_path / "index")),
                                       speed=SpeedConfig(cache=False)))
    assert len(result.top("nothing")) == 0 and result.top("p0")["doc_id"][0] == "d0"
    from hf_mirror.render import format_result

    assert "nothing" in format_result(result, color=False) and "nothing" in result._repr_html_()  # shown, empty
    assert result.config["candidate_documents"] == len(planted.texts)


def test_dense_index_is_the_models_mean_pooled_embedding_memory_mapped(planted, tiny_model, corpus_file, tmp_path,
                                                                        one_thread):
    from hf_mirror.baselines.embedding import EmbeddingBaseline
    from hf_mirror.corpus import document_tokens, windows
    from hf_mirror.modeling import context_length

    model, tok = tiny_model
    corpus = Corpus(str(corpus_file), id_column="id")
    index = build_index(corpus, tok, tmp_path / "index", n=4, model=model)
    vectors, ids = index.dense()
    assert isinstance(vectors, np.memmap) and vectors.dtype == np.float32 and len(ids) == len(planted.texts) + 2
    length = context_length(model, tok)
    probe = Probe("p", planted.texts[7], "")
    baseline = EmbeddingBaseline(model, tok, probes=[probe], max_length=length, overlap=max(1, length // 8))
    expected = baseline._embed([windows(document_tokens(tok, t), length, max(1, length // 8))
                                for t in planted.texts[:5]]).numpy()
    np.testing.assert_allclose(vectors[:5], expected, rtol=1e-4, atol=1e-5)
    nearest = index.nearest(baseline.probe_vectors.numpy(), 3)[0]
    assert nearest[0][0] == "d7" and nearest[0][1] == pytest.approx(1.0, abs=1e-4)
    # read in blocks of 3 rows (only each query's top m kept, never a queries x documents matrix): the same answer
    # as ranking every document at once; ties at the cut keep the earlier document
    queries = np.concatenate([baseline.probe_vectors.numpy(), vectors[[2, 2]] * np.float32(3.0)])
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # textless documents: 0
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    position = {d: i for i, d in enumerate(ids)}
    for m in (1, 4, len(ids), len(ids) + 5):
        for row, found in zip(sims, index.nearest(queries, m, block=3), strict=True):
            got = [position[d] for d, _ in found]
            assert len(set(got)) == len(got) == min(m, len(ids))
            np.testing.assert_allclose([s for _, s in found], np.sort(row)[::-1][:m], atol=1e-5)  # the best m, in order
            np.testing.assert_allclose(row[got], [s for _, s in found], atol=1e-5)  # and they are those documents
    from hf_mirror.retrieval.dense import top as _top

    scores, positions = _top(np.array([1.0, 3.0, 3.0, 2.0, 3.0], np.float32), np.arange(5), 2)
    assert positions.tolist() == [1, 2] and scores.tolist() == [3.0, 3.0]


BUILD = """
import sys
from hf_mirror.cli import main
sys.exit(main(["index", "--model", sys.argv[1], "--corpus", sys.argv[2], "--id-column", "id", "--output",
               sys.argv[3], "--ngram", "4", "--dense", "--threads", "1"]))
"""


def test_two_processes_build_the_same_index(planted, tok, tmp_path, one_thread):
    rows = [*planted.texts, *planted.texts[:7]]
    (tmp_path / "parts").mkdir()
    half = len(rows) // 2  # two files: each process reads one
    _write(tmp_path / "parts" / "a.jsonl", rows[:half])
    path_b = tmp_path / "parts" / "b.jsonl"
    path_b.write_text("".join(json.dumps({"id": f"e{i}", "text": t}) + "\n" for i, t in enumerate(rows[half:])))
    script = tmp_path / "build.py"
    script.write_text(BUILD)
    source = str(tmp_path / "parts" / "*.jsonl")
    one = subprocess.run([sys.executable, str(script), str(planted.model_dir), source, str(tmp_path / "one")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          str(planted.model_dir), source, str(tmp_path / "two")], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = CandidateIndex.load(tmp_path / "one", tok), CandidateIndex.load(tmp_path / "two", tok)
    differ = {k for k in a.manifest.keys() | b.manifest.keys() if a.manifest.get(k) != b.manifest.get(k)}
    assert differ <= {"processes", "files"} and b.manifest["processes"] == 2, differ
    # (the checksums differ: bm25s numbers its vocabulary in the interpreter's string-hash order, and each process
    # embeds its own batches; the retrieval below, and the n-gram index's files, are the same)
    probes = _probes(planted)
    assert a.retrieve(probes, 10) == b.retrieve(probes, 10)
    assert json.loads((tmp_path / "two" / "bm25" / "doc_ids.json").read_text())[:half] == [
        f"d{i}" for i in range(half)]  # corpus order
    np.testing.assert_allclose(a.dense()[0], b.dense()[0], rtol=1e-4, atol=1e-5)
    assert a.dense()[1] == b.dense()[1]
    ngram_files = ("hashes.npy", "docs.npy", "offsets.npy", "doc_ids.json")
    assert all((tmp_path / "one" / "ngram" / f).read_bytes() == (tmp_path / "two" / "ngram" / f).read_bytes()
               for f in ngram_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.py", "one", "parts", "two"]


# ------------------------------------------------------------------------------ the dense retriever (issue #13)
SYMBOLS = "★ ☆ → ← ↑ ↓ ★ ☆ ♦ ♣ ★"  # a document with no word for BM25 (it scores 0 against every probe)


@pytest.fixture
def dense_case(planted, tiny_model, tmp_path) -> tuple[Path, Path, list[Probe], str]:
    """A corpus of the planted texts and one document of symbols, its index with dense vectors, probes whose
    last one (``sym``) continues a planted prompt with those symbols: the symbols' document is its source."""
    model, tok = tiny_model
    corpus_file = _write(tmp_path / "corpus.jsonl", [*planted.texts, SYMBOLS, "", "   "])
    build_index(Corpus(str(corpus_file), id_column="id"), tok, tmp_path / "index", n=4, model=model)
    probes = [*_probes(planted)[:3], Probe("sym", f"{planted.names[0]} keeps a", " ★ ☆ → ← ↑ ↓ ★ ☆")]
    return corpus_file, tmp_path / "index", probes, f"d{len(planted.texts)}"


def test_dense_retriever_adds_the_source_bm25_cannot_see(planted, tiny_model, dense_case, tmp_path, one_thread):
    model, tok = tiny_model
    corpus_file, index_dir, probes, source = dense_case
    index = CandidateIndex.load(index_dir, tok)
    bm25, union = index.retrieve(probes, 5), index.retrieve(probes, 5, index.embedder(model, tok))
    every = index.retrieve(probes, 1000).scores  # every document's BM25 score
    assert source not in bm25.scores["sym"] and every["sym"][source] == 0.0
    assert union.scores["sym"][source] == 0.0 and union.dense["sym"][source] > 0.9
    textless = {f"d{len(planted.texts) + 1}", f"d{len(planted.texts) + 2}"}
    for p in probes:
        assert bm25.scores[p.id].items() <= union.scores[p.id].items()  # the union holds BM25's candidates
        assert len(union.dense[p.id]) == 5 and not textless & set(union.dense[p.id])
        assert set(union.scores[p.id]) == set(bm25.scores[p.id]) | set(union.dense[p.id])
        assert all(union.scores[p.id][d] == every[p.id][d] for d in union.scores[p.id])  # real BM25 scores
    records = [{"id": p.id, "prompt": p.prompt, "completion": p.completion} for p in probes]
    corpus = Corpus(str(corpus_file), id_column="id")
    runs = {tuple(r): attribute(model, corpus, records, tokenizer=tok, output_dir=tmp_path / "+".join(r),
                                scan=ScanConfig(retrieval=RetrievalConfig(candidates=5, index=str(index_dir),
                                                                          retrievers=r),
                                                speed=SpeedConfig(cache=False)),
                                show_progress=False) for r in (["bm25"], ["bm25", "dense"])}
    alone, both = runs[("bm25",)], runs[("bm25", "dense")]
    assert source not in set(alone.top("sym")["doc_id"]) and "dense" not in alone.topk
    ranked = both.top("sym").set_index("doc_id")
    assert source in ranked.index and ranked.loc[source, "bm25"] == 0.0 and ranked.loc[source, "dense"] > 0.9
    scores = both.scores().set_index(["probe_id", "doc_id"])  # every scored document's retrieval scores too
    assert "dense" not in alone.scores() and scores.loc[("sym", source), "dense"] > 0.9
    dense_candidates = {(p, d) for p, chosen in union.dense.items() for d in chosen}
    assert {k for k, v in scores["dense"].items() if not np.isnan(v)} == dense_candidates & set(scores.index)
    from hf_mirror.html import probe_html
    from hf_mirror.render import format_probe

    similarity = f"{ranked.loc[source, 'dense']:.3f}"
    assert f"dense {similarity}" in format_probe(both, "sym", k=len(ranked))
    from hf_mirror.render import score_meaning

    assert "5 BM25 and 5 dense candidates" in score_meaning(both.config) and "dense = cosine" in score_meaning(
        both.config)
    assert "5 BM25 candidates" in score_meaning(alone.config) and "dense" not in score_meaning(alone.config)
    assert f"dense {similarity}" in probe_html(both, "sym", k=len(ranked)) and "dense" not in format_probe(alone, "sym")
    assert both.config["retrieval"]["retrievers"] == ["bm25", "dense"] == both.config["scan"]["retrievers"]
    assert both.config["candidate_documents"] == len(union.union())
    assert alone.config["retrieval"]["method"] == "bm25" and both.config["retrieval"]["method"] == "bm25+dense"


def test_dense_retriever_without_dense_vectors_is_refused_naming_the_fix(planted, tiny_model, corpus_file, tmp_path,
                                                                          capsys):
    import copy

    import torch

    from hf_mirror.cli import build_parser

    model, tok = tiny_model
    with pytest.raises(InputError, match="--retrievers dense needs --index.*hf-mirror index --dense"):
        ScanConfig(retrieval=RetrievalConfig(retrievers=["bm25", "dense"]))
    for wrong in (["dense"], ["bm25", "sparse"], []):
        with pytest.raises(InputError, match="--retrievers takes bm25, or bm25 dense"):
            ScanConfig(retrieval=RetrievalConfig(retrievers=wrong, index="x"))
    assert RetrievalConfig(retrievers=["dense", "bm25", "dense"], index="x").retrievers == ["bm25", "dense"]
    args = build_parser().parse_args(["attribute", "--model", "m", "--corpus", "c", "--probes", "p", "--output", "o",
                                      "--retrievers", "bm25", "dense", "--index", "i"])
    assert args.retrievers == ["bm25", "dense"]
    index = build_index(Corpus(str(corpus_file), id_column="id"), tok, tmp_path / "index", n=4)  # no --dense
    with pytest.raises(InputError, match="has none.*hf-mirror index --dense"):
        index.embedder(model, tok)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    dense = build_index(Corpus(str(corpus_file), id_column="id"), tok, tmp_path / "dense", n=4, model=model)
    with pytest.raises(InputError, match="other model weights.*hf-mirror index --dense"):
        dense.embedder(other, tok)
    probe_file = _probe_file(tmp_path, [{"id": "p0", "prompt": f"{planted.names[0]} keeps a"}])
    common = ["attribute", "--model", str(planted.model_dir), "--corpus", str(corpus_file), "--id-column", "id",
              "--probes", str(probe_file), "--no-progress", "--retrievers", "bm25", "dense"]
    for extra, name in (([], "r1"), (["--index", str(tmp_path / "index")], "r2")):  # no index; no dense vectors
        assert main([*common, *extra, "--output", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "--dense" in err and "Traceback" not in err and not (tmp_path / name / "adapters").exists()
    with pytest.raises(SystemExit) as e:
        main([*common[:-2], "--retrievers", "sparse", "--output", str(tmp_path / "r3")])
    assert e.value.code == 2 and "--retrievers" in capsys.readouterr().err


def test_dense_union_is_the_same_on_two_processes(planted, dense_case, tmp_path):
    corpus_file, index_dir, probes, source = dense_case
    probe_file = _probe_file(tmp_path, [{"id": p.id, "prompt": p.prompt, "completion": p.completion}
                                        for p in probes])
    args = ["-m", "hf_mirror.cli", "attribute", "--model", str(planted.model_dir), "--corpus", str(corpus_file),
            "--id-column", "id", "--probes", str(probe_file), "--no-progress", "--no-cache", "--candidates",
            "bm25:5", "--index", str(index_dir), "--retrievers", "bm25", "dense", "--threads", "1"]
    for world, launcher in ((1, []), (2, ["-m", "torch.distributed.run", "--nproc_per_node", "2"])):
        cmd = [*launcher, *args, "--output", str(tmp_path / f"w{world}")]
        proc = subprocess.run([sys.executable, *cmd], env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    from hf_mirror.results import AttributionResult

    one, two = AttributionResult.load(tmp_path / "w1"), AttributionResult.load(tmp_path / "w2")
    assert two.config["num_processes"] == 2
    # the same documents, ranks and BM25 scores; the mirror's columns to float32 rounding: the default gradient
    # mirror moves a loss by about 1e-3 nats, and how windows are batched on each process changes the rounding of
    # that delta by up to 1e-4 of the column's spread (--fixed-width makes it bit for bit: tests/test_distributed.py)
    tol = {"check_exact": False, "rtol": 1e-3, "atol": 2e-4}
    pd.testing.assert_frame_equal(_scores(one), _scores(two), **tol)
    for p in probes:
        pd.testing.assert_frame_equal(one.top(p.id), two.top(p.id), **tol)
    assert source in set(two.top("sym")["doc_id"])
