"""The n-gram index build: 1 vs 2 processes give the same index; an interrupted build resumes or restarts cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.provenance import NgramIndex
from hf_mirror.retrieval import ngram

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}

BUILD_SCRIPT = """
import sys
from transformers import AutoTokenizer
from hf_mirror.corpus import Corpus
from hf_mirror.provenance import NgramIndex

model, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model)
for name, source, id_column in [("one_file", sys.argv[3], "id"), ("two_files", sys.argv[4], "id"),
                                ("no_ids", sys.argv[3], None)]:
    NgramIndex.build(Corpus(source, id_column=id_column), tok, n=4, output_dir=f"{out}/{name}",
                     checkpoint_ngrams=100)
"""


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(texts, copies: int = 3) -> list[dict]:
    return [{"id": f"c{c}-d{i}", "text": t} for c in range(copies) for i, t in enumerate(texts)]


def _same(a: NgramIndex, b: NgramIndex) -> None:
    for name in ("hashes", "docs", "offsets"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    assert a.doc_ids == b.doc_ids
    assert a.manifest == b.manifest or {"files"} == {  # an index built in memory has no files' checksums
        k for k in a.manifest.keys() | b.manifest.keys() if a.manifest.get(k) != b.manifest.get(k)}


def test_two_processes_build_the_same_index(texts, tok, tok_dir, tmp_path):
    rows = _rows(texts)
    _write(tmp_path / "corpus.jsonl", rows)
    (tmp_path / "parts").mkdir()
    half = len(rows) // 2  # two files: datasets splits them by file (shards) across 2 processes
    _write(tmp_path / "parts" / "a.jsonl", rows[:half])
    _write(tmp_path / "parts" / "b.jsonl", rows[half:])
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT)
    args = [str(tok_dir), str(tmp_path / "{}"), str(tmp_path / "corpus.jsonl"),
            str(tmp_path / "parts" / "*.jsonl")]
    one = subprocess.run([sys.executable, str(script), *[a.format("one") for a in args]], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          *[a.format("two") for a in args]], env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("one_file", "two_files", "no_ids"):
        a = NgramIndex.load(tmp_path / "one" / name, tok)
        b = NgramIndex.load(tmp_path / "two" / name, tok)
        _same(a, b)
        assert a.manifest["n_documents"] == len(rows)
        assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["no_ids", "one_file", "two_files"]
    # the merged index is also the in-process one: same postings, documents in corpus order
    ref = NgramIndex.build(Corpus(str(tmp_path / "corpus.jsonl"), id_column="id"), tok, n=4)
    _same(ref, NgramIndex.load(tmp_path / "two" / "one_file", tok))
    assert ref.doc_ids == [r["id"] for r in rows]
    m = NgramIndex.load(tmp_path / "two" / "two_files", tok).find(texts[5])
    assert m.coverage == 1.0 and sorted(o.doc_id for o in m.spans[0].occurrences) == ["c0-d5", "c1-d5", "c2-d5"]


def _counting(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Count the documents the build tokenises (and raise at document ``fail_at``)."""
    calls = []
    real = ngram.ngram_hashes

    def hashes(tokens, n):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(tokens, n)

    monkeypatch.setattr(ngram, "ngram_hashes", hashes)
    return calls


def test_interrupted_build_resumes_and_never_loads_half_written(texts, tok, tmp_path, monkeypatch):
    rows = _rows(texts)
    _write(tmp_path / "corpus.jsonl", rows)
    corpus = Corpus(str(tmp_path / "corpus.jsonl"), id_column="id")
    ref = NgramIndex.build(corpus, tok, n=4)
    out = tmp_path / "idx"

    _counting(monkeypatch, fail_at=100)
    with pytest.raises(KeyboardInterrupt):
        NgramIndex.build(corpus, tok, n=4, output_dir=out, checkpoint_ngrams=200)
    assert not out.exists()
    with pytest.raises(InputError, match="not a complete n-gram index"):
        NgramIndex.load(out, tok)
    progress = json.loads((tmp_path / ".idx.build" / "rank-00000-of-00001" / "progress.json").read_text())
    assert 0 < progress["n_docs"] < 100 and not progress["done"]

    calls = _counting(monkeypatch)
    resumed = NgramIndex.build(corpus, tok, n=4, output_dir=out, checkpoint_ngrams=200)
    assert len(calls) == len(rows) - progress["n_docs"]  # the checkpointed documents are not redone
    _same(ref, resumed)
    _same(ref, NgramIndex.load(out, tok))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "idx"]  # work files removed


def test_interrupted_build_restarts_when_the_inputs_changed(texts, tok, tmp_path, monkeypatch):
    rows = _rows(texts, copies=2)
    path = tmp_path / "corpus.jsonl"
    _write(path, rows)
    out = tmp_path / "idx"
    _counting(monkeypatch, fail_at=70)
    with pytest.raises(KeyboardInterrupt):
        NgramIndex.build(Corpus(str(path), id_column="id"), tok, n=4, output_dir=out, checkpoint_ngrams=100)
    _write(path, rows[::-1])  # the corpus changed: its checkpointed part must not be reused
    calls = _counting(monkeypatch)
    rebuilt = NgramIndex.build(Corpus(str(path), id_column="id"), tok, n=4, output_dir=out, checkpoint_ngrams=100)
    assert len(calls) == len(rows)
    _same(NgramIndex.build(Corpus(str(path), id_column="id"), tok, n=4), rebuilt)
    assert rebuilt.doc_ids[0] == rows[-1]["id"]
    # resume=False restarts even when a matching checkpoint exists
    _counting(monkeypatch, fail_at=70)
    with pytest.raises(KeyboardInterrupt):
        NgramIndex.build(Corpus(str(path), id_column="id"), tok, n=4, output_dir=tmp_path / "b", checkpoint_ngrams=50)
    calls = _counting(monkeypatch)
    NgramIndex.build(Corpus(str(path), id_column="id"), tok, n=4, output_dir=tmp_path / "b", checkpoint_ngrams=50,
                     resume=False)
    assert len(calls) == len(rows)


def test_killed_build_leaves_no_loadable_index(texts, tok, tok_dir, tmp_path):
    """SIGKILL mid-build (a real process): the target never loads as an index, and a rerun completes it."""
    rows = _rows(texts, copies=20)
    _write(tmp_path / "corpus.jsonl", rows)
    script = tmp_path / "slow_build.py"
    script.write_text(
        "import sys, time\n"
        "from transformers import AutoTokenizer\n"
        "from hf_mirror.corpus import Corpus\n"
        "from hf_mirror.provenance import NgramIndex\n"
        "from hf_mirror.retrieval import ngram\n"
        "real = ngram.ngram_hashes\n"
        "def slow(tokens, n):\n"
        "    time.sleep(0.003)\n"
        "    return real(tokens, n)\n"
        "ngram.ngram_hashes = slow\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "NgramIndex.build(Corpus(sys.argv[2], id_column='id'), tok, n=4, output_dir=sys.argv[3],\n"
        "                 checkpoint_ngrams=300)\n"
    )
    args = [sys.executable, str(script), str(tok_dir), str(tmp_path / "corpus.jsonl"), str(tmp_path / "idx")]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = tmp_path / ".idx.build" / "rank-00000-of-00001" / "progress.json"
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["n_docs"] > 0:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.kill()
    proc.wait()
    with pytest.raises(InputError, match="not a complete"):
        NgramIndex.load(tmp_path / "idx", tok)
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _same(NgramIndex.build(Corpus(str(tmp_path / "corpus.jsonl"), id_column="id"), tok, n=4),
          NgramIndex.load(tmp_path / "idx", tok))
