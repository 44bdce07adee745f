"""The optional infini-gram backend of the verbatim index: same matches as NgramIndex, safe builds and loads."""

from __future__ import annotations

import json
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from conftest import planted_corpus

from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.provenance import InfiniGramIndex, NgramIndex, load_index
from hf_mirror.retrieval import infinigram
from hf_mirror.tiny_lm import train_tokenizer


@pytest.fixture(scope="module")
def ig():
    return pytest.importorskip("infini_gram")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, texts) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def built(ig, tmp_path_factory, tok, corpus_file) -> Path:
    # a path with words infini-gram's engine sorts its files by ('table', 'offset'): it must still load
    out = tmp_path_factory.mktemp("tables_and_offsets") / "index"
    InfiniGramIndex.build(Corpus(str(corpus_file), id_column="id"), tok, out, n=4, cpus=1)
    return out


@pytest.fixture(scope="module")
def index(built, tok) -> InfiniGramIndex:
    return InfiniGramIndex.load(built, tok)


def _same(a, b) -> None:
    assert a.n_tokens == b.n_tokens
    assert a.spans == b.spans
    np.testing.assert_array_equal(a.covered, b.covered)
    assert a.coverage == b.coverage


def test_finds_a_copied_document_with_its_offset(index, tok, texts):
    planted = planted_corpus()[0]
    m = index.find(texts[7])
    assert m.coverage == 1.0 and m.spans[0].length == m.n_tokens
    assert ("doc-7", 0) in [(o.doc_id, o.offset) for o in m.spans[0].occurrences]
    # the same text minus its first word: found at that word's token offset in document 7
    tail = texts[7][len(planted[7]):]
    m = index.find(tail)
    assert m.coverage == 1.0
    assert ("doc-7", len(tok(planted[7], add_special_tokens=False)["input_ids"])) in [
        (o.doc_id, o.offset) for o in m.spans[0].occurrences]
    assert index.count(texts[7]) == 1 and index.count("zzqx zzqx zzqx") == 0 and index.count("") == 0
    assert index.find("").coverage == 0.0 and index.find("").spans == []


@pytest.mark.parametrize("n", [2, 4, 7])
def test_agrees_with_the_ngram_index(index, tok, texts, corpus_file, n):
    ngrams = NgramIndex.build(Corpus(str(corpus_file), id_column="id"), tok, n=n)
    queries = [
        texts[3],
        texts[3] + " " + texts[10] + " and then " + texts[45],
        "zzqx " + texts[50][5:] + " unrelated words here " + texts[12][:20],
        "the weather in the north is cold today. the weather in the",
        "nothing of the sort",
        texts[0][:6],
    ]
    for q in queries:
        _same(index.find(q, n=n), ngrams.find(q))
    assert index.find(queries[1]).spans == NgramIndex.build(
        Corpus(str(corpus_file), id_column="id"), tok, n=4).find(queries[1]).spans  # default n: the build's


def test_refuses_a_foreign_tokenizer(built, texts):
    other = train_tokenizer(texts, vocab_size=300)
    with pytest.raises(InputError, match="another tokenizer.*InfiniGramIndex.build"):
        InfiniGramIndex.load(built, other)


def test_interrupted_build_never_loads(ig, built, tok, texts, tmp_path, monkeypatch):
    half = tmp_path / "half"
    shutil.copytree(built, half)
    (half / "manifest.json").unlink()
    with pytest.raises(InputError, match="not a complete infini-gram index"):
        InfiniGramIndex.load(half, tok)
    with pytest.raises(InputError, match="not a complete"):
        load_index(half, tok)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(infinigram, "_suffix_array", crash)
    with pytest.raises(KeyboardInterrupt):
        InfiniGramIndex.build(texts, tok, tmp_path / "crashed", cpus=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"]  # no index, no temporary directory left
    with pytest.raises(InputError, match="not a complete"):
        InfiniGramIndex.load(tmp_path / "crashed", tok)


def test_load_index_dispatches_on_the_manifest(index, built, tok, texts, tmp_path):
    assert isinstance(load_index(built, tok), InfiniGramIndex)
    NgramIndex.build(texts, tok, n=4, output_dir=tmp_path / "ngram")
    assert isinstance(load_index(tmp_path / "ngram", tok), NgramIndex)
    with pytest.raises(InputError, match="not an hf_mirror infini-gram index"):
        InfiniGramIndex.load(tmp_path / "ngram", tok)
    with pytest.raises(InputError, match="already exists"):
        InfiniGramIndex.build(texts, tok, built)


def _naive_table(data: bytes, width: int, ptr_size: int) -> bytes:
    ptrs = sorted(range(0, len(data), width), key=lambda p: data[p:])
    return b"".join(p.to_bytes(ptr_size, "little") for p in ptrs)


def _naive_suffix_array(binary, directory, width, ptr_size, *args, **kwargs) -> None:
    (directory / "table.0").write_bytes(_naive_table((directory / "tokenized.0").read_bytes(), width, ptr_size))


def test_suffix_array_in_parts_matches_a_plain_sort(ig, tmp_path):
    rng = np.random.default_rng(0)
    data = b"".join(b"\xff\xff" + rng.integers(0, 40, size=rng.integers(0, 200)).astype(np.uint16).tobytes()
                    for _ in range(100))
    (tmp_path / "tokenized.0").write_bytes(data)
    ptr_size = int(np.ceil(np.log2(len(data)) / 8))
    binary = Path(ig.__file__).parent / "rust_indexing"
    expected = _naive_table(data, 2, ptr_size)
    assert len(infinigram._part_ranges(len(data), 2, cpus=2, mem_bytes=8 * 4000, hack=512)[0]) == 2
    for cpus, mem in [(1, 1 << 30), (2, 8 * 4000)]:  # one part; several parts, two at a time
        infinigram._suffix_array(binary, tmp_path, 2, ptr_size, cpus, mem, hack=512)
        assert (tmp_path / "table.0").read_bytes() == expected
        assert sorted(p.name for p in tmp_path.iterdir()) == ["table.0", "tokenized.0"]


def test_32_bit_tokens(ig, index, tok, texts, tmp_path, monkeypatch):
    # infini-gram's own u32 indexer needs 32 GiB of memory: sort the suffixes here to check the rest of the path
    monkeypatch.setattr(infinigram, "_suffix_array", _naive_suffix_array)
    wide = InfiniGramIndex.build(texts, tok, tmp_path / "wide", n=4, token_dtype="u32")
    assert wide.manifest["token_dtype"] == "u32"
    for q in [texts[3] + " " + texts[10], "zzqx " + texts[50][5:]]:
        a, b = wide.find(q), index.find(q)
        assert [(s.start, s.end) for s in a.spans] == [(s.start, s.end) for s in b.spans]
        assert [[o.offset for o in s.occurrences] for s in a.spans] == [
            [o.offset for o in s.occurrences] for s in b.spans]


def test_cli_builds_and_reopens_any_n(ig, tok_dir, corpus_file, tmp_path):
    from hf_mirror.cli import _open_or_build_index, main
    from hf_mirror.modeling import load_tokenizer

    out = tmp_path / "index"
    assert main(["index", "--backend", "infini-gram", "--model", str(tok_dir), "--corpus", str(corpus_file),
                 "--id-column", "id", "--output", str(out), "--ngram", "5"]) == 0
    tokenizer = load_tokenizer(str(tok_dir))
    corpus = Corpus(str(corpus_file), id_column="id", split="train")

    def args(n: int) -> Namespace:
        return Namespace(ngram=n, no_progress=True)

    opened = _open_or_build_index(args(9), corpus, tokenizer, out)
    assert isinstance(opened, InfiniGramIndex) and opened.n == 9
    with pytest.raises(InputError, match="another corpus"):
        _open_or_build_index(args(9), Corpus(str(corpus_file), split="train"), tokenizer, out)
    # the n-gram backend (the default) is reopened as before, for its own n only
    assert main(["index", "--model", str(tok_dir), "--corpus", str(corpus_file), "--id-column", "id",
                 "--output", str(tmp_path / "ngram"), "--ngram", "5"]) == 0
    assert isinstance(_open_or_build_index(args(5), corpus, tokenizer, tmp_path / "ngram"), NgramIndex)
    with pytest.raises(InputError, match="holds 5-grams and --ngram asks for 9: pass --ngram 5"):
        _open_or_build_index(args(9), corpus, tokenizer, tmp_path / "ngram")


def test_missing_package_names_the_install(monkeypatch, texts, tmp_path):
    monkeypatch.setitem(sys.modules, "infini_gram", None)
    monkeypatch.setitem(sys.modules, "infini_gram.engine", None)
    with pytest.raises(InputError, match=r"pip install 'hf_mirror\[infinigram\]'"):
        InfiniGramIndex.build(texts, object(), tmp_path / "index")
