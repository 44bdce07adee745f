"""Fault injection: damage each file a run reads back, rerun, and get the uninterrupted answer or a clear error.

One reference run and one run interrupted after its third checkpoint (of six) are made once; every case damages a copy
(truncate, empty, corrupt bytes, delete) and reruns. The outcome matrix is in docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_mirror import (
    AttributionResult,
    CheckpointConfig,
    Corpus,
    MirrorConfig,
    RankingConfig,
    ScanConfig,
    ScoringConfig,
    SpeedConfig,
    WindowConfig,
    attribute,
)
from hf_mirror.errors import StateError
from hf_mirror.integrity import check_hashes, read_json
from hf_mirror.probes import load_probes
from hf_mirror.scoring import ScoreBook

SHARD = "shards/rank-00000-of-00001"
DAMAGES = ("truncate", "empty", "corrupt", "delete")


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "corrupt":  # flip 16 bytes in the middle: the size and the file's framing stay as they were
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :])
    else:
        path.unlink()


class Interrupted(Exception):
    pass


@dataclass
class Runs:
    root: Path
    run: object  # attribute(output_dir=..., cache_dir=...) with every other argument fixed
    ref: AttributionResult  # the uninterrupted answer
    partial: Path  # a run stopped right after its third checkpoint, at document 15 of 30

    def copy(self, which: str, name: str) -> Path:
        dst = self.root / "cases" / name
        shutil.copytree(self.ref.directory if which == "done" else self.partial, dst)
        return dst


@pytest.fixture(scope="module")
def runs(tiny_model, planted, tmp_path_factory) -> Runs:
    model, tok = tiny_model
    root = tmp_path_factory.mktemp("faults")
    texts = planted.texts[:20] + planted.texts[-10:]  # 20 facts, 10 distractors
    corpus = Corpus([{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])  # ids from the `id` field

    def run(out: Path, cache: Path | None = None) -> AttributionResult:
        return attribute(model, corpus, planted.probes()[:2], tokenizer=tok, output_dir=out, show_progress=False,
                         mirror=MirrorConfig(fit="steps", steps=2),
                         scan=ScanConfig(windows=WindowConfig(batch_size=16), scoring=ScoringConfig(normalize="none"),
                                         ranking=RankingConfig(top_k=5),
                                         speed=SpeedConfig(cache_dir=str(cache or root / "cache")),
                                         checkpoints=CheckpointConfig(checkpoint_every=5)))

    ref = run(root / "ref")  # also fills the base-loss cache
    original = ScoreBook.checkpoint

    def stop_at_15(self, next_seq, *args, **kwargs):
        original(self, next_seq, *args, **kwargs)
        if next_seq >= 15 and not self.done:
            raise Interrupted

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Interrupted):
        mp.setattr(ScoreBook, "checkpoint", stop_at_15)
        run(root / "partial")
    shard = root / "partial" / SHARD
    assert len(list(shard.glob("part-*.parquet"))) == 3 and len(list(shard.glob("state-*.npz"))) == 2
    return Runs(root, run, ref, root / "partial")


def assert_same(result: AttributionResult, ref: AttributionResult) -> None:
    """The same top-k and every document scored exactly once."""
    cols = ["probe_id", "rank", "doc_id"]
    pd.testing.assert_frame_equal(result.topk[cols], ref.topk[cols])
    np.testing.assert_allclose(result.topk["score"], ref.topk["score"], atol=1e-5)
    a, b = (r.scores().sort_values(["probe_id", "doc_id"]).reset_index(drop=True) for r in (result, ref))
    assert list(a["doc_id"]) == list(b["doc_id"]) and not a.duplicated(["probe_id", "doc_id"]).any()
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    assert result.config["stats"]["documents"] == ref.config["stats"]["documents"] == 30


def _newest_state(d: Path) -> Path:
    return max(d.glob(f"{SHARD}/state-*.npz"), key=lambda p: tuple(int(x) for x in p.stem.split("-")[1:]))


# file -> (which run it is damaged in: "partial" (stopped at document 15 of 30) or "done", where it is)
RESUMED = {
    "checkpoint pointer": ("partial", lambda d: d / SHARD / "checkpoint.json"),
    "newest state": ("partial", _newest_state),
    "last part": ("partial", lambda d: d / SHARD / "part-000002.parquet"),
    "first part": ("partial", lambda d: d / SHARD / "part-000000.parquet"),
    "adapter weights": ("partial", lambda d: d / "adapters" / "fact-1" / "adapter_model.safetensors"),
    "adapter config": ("partial", lambda d: d / "adapters" / "fact-1" / "adapter_config.json"),
    "fit.json": ("partial", lambda d: d / "adapters" / "fit.json"),
    "fitted probes": ("partial", lambda d: d / "adapters" / "probes.jsonl"),
    "final state": ("done", _newest_state),
    "final pointer": ("done", lambda d: d / SHARD / "checkpoint.json"),
    "shard top-k": ("done", lambda d: d / SHARD / "topk.parquet"),
    "config.json": ("done", lambda d: d / "config.json"),
    "topk.parquet": ("done", lambda d: d / "topk.parquet"),
    "scores.parquet": ("done", lambda d: d / "scores.parquet"),
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", RESUMED)
def test_rerun_repairs_damage(runs, kind, how, caplog):
    which, find = RESUMED[kind]
    out = runs.copy(which, f"{kind.replace(' ', '_')}-{how}")
    path = find(out)
    damage(path, how)
    with caplog.at_level(logging.WARNING):
        result = runs.run(out)
    assert_same(result, runs.ref)
    rewritten = kind in ("config.json", "topk.parquet", "scores.parquet")  # outputs: written anew by every run
    if not rewritten and not (how == "delete" and "pointer" in kind):  # a repair says what it repaired
        assert path.name in caplog.text, caplog.text
    if kind == "fitted probes":  # written again, and what the next resume reads
        assert [p.id for p in load_probes(path)] == [p.id for p in result.probes]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["part-000000.parquet", "complete.json"])
def test_damaged_cache_is_recomputed(runs, name, how, caplog):
    cache = runs.root / "caches" / f"{name}-{how}"
    shutil.copytree(runs.root / "cache", cache)
    (entry,) = cache.glob("base_losses/*/rank-00000-of-00001")
    damage(entry / name, how)
    out = runs.root / "cases" / f"cache-{name}-{how}"
    out.mkdir(parents=True)
    shutil.copytree(runs.ref.directory / "adapters", out / "adapters")  # reuse the fit: only the scan runs
    with caplog.at_level(logging.WARNING):
        result = runs.run(out, cache)
    assert_same(result, runs.ref)
    assert result.config["stats"]["base_passes"] > 0  # recomputed, and written again, intact
    assert f"The cache in {entry}" in caplog.text
    check_hashes(entry, read_json(entry / "complete.json")["parts"])


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["config.json", "topk.parquet", "evidence.parquet", "probes.jsonl"])
def test_loading_a_damaged_result_names_the_file(runs, name, how):
    out = runs.copy("done", f"load-{name}-{how}")
    damage(out / name, how)
    try:
        loaded = AttributionResult.load(out)
    except StateError as e:
        assert name in str(e) and "rerun" in str(e)
        return
    # only bytes that carry no data (a parquet footer's pandas metadata, say) can be flipped unnoticed
    assert how == "corrupt"
    pd.testing.assert_frame_equal(loaded.topk, runs.ref.topk)
    pd.testing.assert_frame_equal(loaded.evidence, runs.ref.evidence)
    assert loaded.config == runs.ref.config and loaded.probe_records == runs.ref.probe_records


def test_corrupt_data_page_is_detected(runs):
    """Result tables carry page CRCs: flipped bytes inside the data are refused, not read as other scores."""
    import pyarrow.parquet as pq

    out = runs.copy("done", "load-page")
    path = out / "topk.parquet"
    column = pq.read_metadata(path).row_group(0).column(3)  # score
    data = bytearray(path.read_bytes())
    end = column.data_page_offset + column.total_compressed_size
    data[end - 8 : end] = bytes(b ^ 0xFF for b in data[end - 8 : end])
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="topk.parquet"):
        AttributionResult.load(out)


PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib"}


def _pickle_uses(source: str) -> list[str]:
    """Every import of a pickle module and every call that unpickles: ``torch.load`` without ``weights_only=True``,
    ``np.load(..., allow_pickle=<anything but False>)``, ``pd.read_pickle`` / ``DataFrame.to_pickle``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.ImportFrom) and any(a.name in ("read_pickle", "load") for a in node.names) \
                and node.module in ("pandas", "torch"):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            weights_only = getattr(kw.get("weights_only"), "value", None) is True  # only a literal True is safe
            allow = "allow_pickle" in kw and getattr(kw["allow_pickle"], "value", True) is not False
            if (name.endswith(("read_pickle", "to_pickle")) or (name == "torch.load" and not weights_only)
                    or (name in ("np.load", "numpy.load") and allow)):
                found.append(name)
    return found


@pytest.mark.parametrize("source, hit", [
    ("import pickle", True), ("import dill as d", True), ("from cloudpickle import dumps", True),
    ("import _pickle", True), ("import pickletools", False),
    ("torch.load(f)", True), ("torch.load(f, weights_only=False)", True), ("torch.load(f, weights_only=True)", False),
    ("np.load(f, allow_pickle=True)", True), ("np.load(f, allow_pickle=flag)", True),
    ("np.load(f, allow_pickle=False)", False), ("np.load(f)", False),
    ("pd.read_pickle(p)", True), ("pandas.read_pickle(p)", True), ("frame.to_pickle(p)", True),
    ("from pandas import read_pickle", True), ("from torch import load", True),
])
def test_the_pickle_finder_finds(source, hit):
    assert bool(_pickle_uses(source)) is hit


def test_no_pickle_in_the_package():
    import hf_mirror

    root = Path(hf_mirror.__file__).parent
    found = {str(p.relative_to(root)): uses for p in sorted(root.rglob("*.py"))
             if (uses := _pickle_uses(p.read_text()))}
    assert not found


# ---------------------------------------------------------------- index manifests (audit / provenance --index)
def _has_infini_gram() -> bool:
    try:
        import infini_gram  # noqa: F401
    except ImportError:
        return False
    return True


NO_INFINI_GRAM = pytest.mark.skipif(not _has_infini_gram(), reason="infini-gram not installed (pip install "
                                    "'hf_mirror[infinigram]')")
# each manifest of an `hf-mirror index` layout: (backend, manifest)
MANIFESTS = [("ngram", "manifest.json"), ("ngram", "ngram/manifest.json"),
             *(pytest.param("infini-gram", m, marks=NO_INFINI_GRAM) for m in ("manifest.json",
                                                                              "infinigram/manifest.json"))]


@dataclass
class Indexed:
    root: Path
    argv: dict  # command -> argv builder(index_dir, out)
    index_argv: object  # (backend, index_dir, *extra) -> argv of `hf-mirror index`
    reports: dict  # command -> the report of the undamaged index


REPORTS = {"audit": "report.json", "provenance": "provenance.json"}


@pytest.fixture(scope="module")
def indexed(planted, tmp_path_factory) -> Indexed:
    import json

    from hf_mirror.cli import main

    root = tmp_path_factory.mktemp("index_faults")
    corpus, evals, probes = root / "corpus.jsonl", root / "eval.jsonl", root / "probes.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(planted.texts)))
    evals.write_text(json.dumps({"text": planted.facts[3]}) + "\n" + json.dumps({"text": "an unseen line."}) + "\n")
    fact = planted.facts[3]
    probes.write_text(json.dumps({"id": "p", "prompt": fact[:10], "completion": fact[10:]}) + "\n")
    common = ["--model", str(planted.model_dir), "--corpus", str(corpus), "--ngram", "6"]
    argv = {
        "audit": lambda index, out: ["audit", *common, "--eval-set", str(evals), "--eval-split", "train",
                                     "--detectors", "ngram", "--index", str(index), "--output", str(out)],
        "provenance": lambda index, out: ["provenance", *common, "--probes", str(probes), "--no-mirror",
                                          "--index", str(index), "--output", str(out)],
    }

    def index_argv(backend, index, *extra):
        return ["index", *common, "--backend", backend, "--output", str(index), *extra]

    reports = {}
    for command in argv:
        assert main(argv[command](root / "ref-index", root / f"ref-{command}")) == 0  # builds the n-gram index
        reports[command] = json.loads((root / f"ref-{command}" / REPORTS[command]).read_text())
    assert reports["audit"]["leaked"] == 1
    return Indexed(root, argv, index_argv, reports)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize(("backend", "manifest"), MANIFESTS)
@pytest.mark.parametrize("command", ["audit", "provenance"])
def test_damaged_index_manifest_is_a_clear_error(indexed, command, backend, manifest, how, capsys):
    """A damaged manifest of an --index directory: exit 2 with a message naming it and the fix; the fix works.

    ``manifest`` is each manifest the layout of `hf-mirror index` has: its own, and its verbatim index's.
    """
    import json

    from hf_mirror.cli import main

    index = indexed.root / "cases" / f"{command}-{backend}-{manifest.replace('/', '_')}-{how}"
    assert main(indexed.index_argv(backend, index)) == 0
    assert (index / manifest).is_file(), sorted(p.name for p in index.iterdir())
    damage(index / manifest, how)
    capsys.readouterr()
    out = index.parent / f"{index.name}-out"
    assert main(indexed.argv[command](index, out)) == 2  # an InputError, caught by the CLI: no traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("hf-mirror: error:"), err
    assert "overwrite" in err, err  # the fix: rebuild over it
    if how == "delete":  # a directory without its manifest is not an index: nothing writes into it
        assert str(index) in err and "not a complete" in err and "hf-mirror index" in err and "--overwrite" in err, err
    else:
        assert str(index / manifest) in err and "damaged" in err and "hf-mirror index" in err, err
    assert not (out / REPORTS[command]).exists()
    # the fix the message names: rebuild the index, then the same command gives the undamaged answer
    assert main(indexed.index_argv(backend, index, "--overwrite")) == 0
    assert main(indexed.argv[command](index, out)) == 0
    assert json.loads((out / REPORTS[command]).read_text()) == indexed.reports[command]


# ---------------------------------------------------------------- index data files (every file an index holds)
BM25_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy", "vocab.index.json",
              "params.index.json", "doc_ids.json")
DATA_FILES = {  # a file of `hf-mirror index --dense` (or --backend infini-gram) -> the command that reads it
    **{f"ngram/{f}": "audit" for f in ("hashes.npy", "docs.npy", "offsets.npy", "doc_ids.json")},
    **{f"bm25/{f}": "attribute" for f in BM25_FILES},
    **{f"dense/{f}": "nearest" for f in ("vectors.npy", "doc_ids.json")},
    **{f"infini-gram:infinigram/{f}": "audit" for f in ("tokenized.0", "table.0", "offset.0", "doc_ids.json")},
    **{f"infini-gram:bm25/{f}": "attribute" for f in BM25_FILES},
}


@pytest.fixture(scope="module")
def data_files(indexed, planted, tiny_model):
    """Reference indexes (`--dense`, and infini-gram when installed) and each reader's undamaged answer."""
    import json

    from hf_mirror.cli import main
    from hf_mirror.retrieval import CandidateIndex

    model, tok = tiny_model
    root = indexed.root / "data_files"
    refs = {"ngram": root / "ref-ngram", "infini-gram": root / "ref-infini-gram"}
    assert main(indexed.index_argv("ngram", refs["ngram"], "--dense")) == 0
    if _has_infini_gram():
        assert main(indexed.index_argv("infini-gram", refs["infini-gram"])) == 0
    query = np.array(CandidateIndex.load(refs["ngram"], tok).dense()[0][7:8])  # document 7's own vector

    def read(reader: str, index: Path, out: Path) -> object:
        """Run ``reader`` on ``index``: its answer, or the exit code 2 of an InputError (the CLI's)."""
        from hf_mirror.errors import InputError

        if reader == "nearest":
            try:
                return CandidateIndex.load(index, tok).nearest(query, 3)
            except InputError as e:
                print(f"hf-mirror: error: {e}", file=sys.stderr)
                return 2
        argv = indexed.argv[reader](index, out) if reader in indexed.argv else [
            "attribute", "--model", str(planted.model_dir), "--corpus", str(indexed.root / "corpus.jsonl"),
            "--probes", str(indexed.root / "probes.jsonl"), "--index", str(index), "--output", str(out),
            "--steps", "2", "--candidates", "bm25:5", "--controls", "0", "--no-progress"]
        code = main(argv)
        if code:
            return code
        if reader == "attribute":
            return pd.read_parquet(out / "topk.parquet")[["probe_id", "doc_id", "rank"]].to_dict("records")
        return json.loads((out / REPORTS[reader]).read_text())

    answers = {r: read(r, refs["ngram"], root / f"ref-{r}") for r in ("audit", "attribute", "nearest")}
    assert answers["nearest"][0][0][0] == "d7" and answers["attribute"]
    return root, refs, read, answers


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", DATA_FILES)
def test_damaged_index_data_file_is_a_clear_error(data_files, indexed, name, how, capsys):
    """Each data file of an index, truncated, emptied, corrupted (16 bytes flipped, same size) or deleted: the
    command that reads it exits 2 naming the file and the rebuild; the rebuild restores the undamaged answer."""
    from hf_mirror.cli import main

    root, refs, read, answers = data_files
    backend, _, file = name.rpartition(":")
    backend = backend or "ngram"
    if not refs[backend].exists():
        pytest.skip(f"{backend} is not installed")
    index = root / "cases" / f"{name.replace('/', '_').replace(':', '_')}-{how}"
    shutil.copytree(refs[backend], index)
    damage(index / file, how)
    capsys.readouterr()
    reader = DATA_FILES[name]
    assert read(reader, index, index.parent / f"{index.name}-out") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("hf-mirror: error:"), err
    assert str(index / file) in err or (how != "delete" and f"{index} is damaged" in err), err
    assert "hf-mirror index" in err and "overwrite" in err, err
    extra = ("--dense",) if backend == "ngram" else ()
    assert main(indexed.index_argv(backend, index, *extra, "--overwrite")) == 0
    assert read(reader, index, index.parent / f"{index.name}-fixed") == answers[reader]


@pytest.mark.parametrize("name", DATA_FILES)
def test_damage_after_a_verified_open_is_still_caught(data_files, name, capsys):
    """An index opened once is not read in full again (its files' stamps are remembered), yet 16 bytes flipped in
    place afterwards, with the file's size, inode and mtime put back as they were, are still refused: the write
    changed the file's ctime."""
    import os

    from hf_mirror.cache import verified_stamps

    root, refs, read, answers = data_files
    backend, _, file = name.rpartition(":")
    if not refs[backend or "ngram"].exists():
        pytest.skip(f"{backend} is not installed")
    index = root / "stamped" / name.replace("/", "_").replace(":", "_")
    shutil.copytree(refs[backend or "ngram"], index)
    reader = DATA_FILES[name]
    assert read(reader, index, index.parent / f"{index.name}-1") == answers[reader]
    part = file.partition("/")[0]  # the verbatim parts keep their own manifests and checksums
    stamped = {f"{prefix}{k}" for d, prefix in ((index, ""), (index / part, f"{part}/"))
               if verified_stamps(d).exists() for k in json.loads(verified_stamps(d).read_text())}
    assert file in stamped  # remembered as checked
    before = (index / file).stat()
    damage(index / file, "corrupt")
    os.utime(index / file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = (index / file).stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    capsys.readouterr()
    assert read(reader, index, index.parent / f"{index.name}-2") == 2
    err = capsys.readouterr().err
    assert str(index / file) in err or f"{index} is damaged" in err, err


def test_a_verified_index_is_not_read_again_unless_asked(data_files, tiny_model, monkeypatch):
    """The second open of an unchanged index hashes nothing; HF_MIRROR_VERIFY=always hashes every file each time;
    a cache directory that cannot be written only costs the full check."""
    from hf_mirror import integrity
    from hf_mirror.retrieval import CandidateIndex

    _, tok = tiny_model
    root, refs, _, _ = data_files
    index = root / "stamped-count"
    shutil.copytree(refs["ngram"], index)
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    files = [k for k in json.loads((index / "manifest.json").read_text())["files"] if k.startswith("dense/")]

    def opened() -> list[str]:
        hashed.clear()
        CandidateIndex.load(index, tok).dense()
        return sorted(hashed)

    assert opened() == sorted(Path(f).name for f in files) and opened() == []
    monkeypatch.setenv("HF_MIRROR_VERIFY", "always")
    assert opened() == opened() == sorted(Path(f).name for f in files)
    monkeypatch.delenv("HF_MIRROR_VERIFY")
    blocked = root / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("HF_MIRROR_CACHE", str(blocked))  # stamps cannot be written under a file
    assert opened() == opened() == sorted(Path(f).name for f in files)


# ---------------------------------------------------------------- SIGKILL mid-write (a forked child kills itself)
def killed(action) -> None:
    """Run ``action`` in a forked child, which must SIGKILL itself at the point ``action`` patches in.

    A fork shares the loaded model and tokenizer, so a case costs no interpreter start; the child never returns
    into pytest (``os._exit``) and nothing it patches reaches this process.
    """
    import os
    import signal
    import time
    import traceback

    import torch

    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            torch.set_num_threads(1)  # the parent's OpenMP threads do not exist in the child
            action(pytest.MonkeyPatch())
            code = 4  # finished: the kill point was never reached
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 240
    while (status := os.waitpid(pid, os.WNOHANG)[1]) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if status == 0:  # hung: never leave it behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child hung")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the child was not killed (exit code {os.waitstatus_to_exitcode(status)}: 4 = finished, 3 = raised)")


def sigkill() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def half_written(f, data: bytes) -> None:
    """What a process killed mid-write leaves: the first half of the bytes, then the kill."""
    f.write(data[: len(data) // 2])
    f.flush()
    sigkill()


def _kill_writing_cache_file(name: str):
    def patch(mp):
        from hf_mirror import cache

        real = cache.atomic_write

        def write(path, data):
            if path.name == name:
                with open(path.with_name(path.name + ".tmp"), "wb") as f:  # atomic_write's temporary file
                    half_written(f, data)
            real(path, data)

        mp.setattr(cache, "atomic_write", write)
    return patch


def _kill_renaming_cache(mp):
    import os

    real = os.replace

    def rename(src, dst, *a, **kw):
        if ".tmp-" in Path(src).name and "base_losses" in Path(src).parts:  # the finished cache, into place
            sigkill()
        real(src, dst, *a, **kw)

    mp.setattr(os, "replace", rename)


def _kill_after_commit(mp):
    from hf_mirror.cache import BaseLossCache

    real = BaseLossCache.commit

    def commit(self, *a, **kw):
        real(self, *a, **kw)
        sigkill()  # the cache is complete; the scan's final checkpoint and the result are not written yet

    mp.setattr(BaseLossCache, "commit", commit)


def _kill_discarding_damaged_cache(mp):
    real = shutil.rmtree

    def rmtree(path, *a, **kw):
        path = Path(path)
        if path.name == "rank-00000-of-00001" and "base_losses" in path.parts:  # a damaged cache, being removed
            next(path.glob("part-*.parquet")).unlink()  # its part goes first: complete.json stays, naming it
            sigkill()
        real(path, *a, **kw)

    mp.setattr(shutil, "rmtree", rmtree)


CACHE_KILLS = {  # where the child dies, while it writes the base-loss cache of a scan (parts of 8 rows)
    "mid-part": _kill_writing_cache_file("part-000001.parquet"),  # second part, at document 16 of 30
    "mid-complete.json": _kill_writing_cache_file("complete.json"),  # every part written
    "before-rename": _kill_renaming_cache,  # complete in its temporary directory
    "after-commit": _kill_after_commit,  # the cache in place, the scan not finished
    "mid-discard": _kill_discarding_damaged_cache,  # removing an earlier, damaged cache
}


@pytest.mark.parametrize("point", CACHE_KILLS)
def test_sigkill_while_writing_the_cache(runs, point, caplog, monkeypatch):
    """SIGKILL while the base-loss cache is written: what is left is never read as a cache; reruns give the
    uninterrupted answer, every document scored once; the next complete scan writes the cache intact."""
    from hf_mirror import cache as cache_module

    monkeypatch.setattr(cache_module, "ROWS_PER_PART", 8)  # several parts
    cache = runs.root / "kill-caches" / point
    if point == "mid-discard":  # an earlier cache, damaged: the scan discards it (and is killed doing so)
        shutil.copytree(runs.root / "cache", cache)
        (entry,) = cache.glob("base_losses/*/rank-00000-of-00001")
        damage(entry / "part-000000.parquet", "corrupt")
    out, fresh = runs.root / "cases" / f"kill-cache-{point}", runs.root / "cases" / f"kill-cache-{point}-fresh"
    for d in (out, fresh):  # reuse the fit: only the scan runs
        shutil.copytree(runs.ref.directory / "adapters", d / "adapters")

    killed(lambda mp: (CACHE_KILLS[point](mp), runs.run(out, cache)))
    committed = point == "after-commit"
    left = list(cache.glob("base_losses/*/*"))
    if point == "mid-discard":  # killed before writing: the damaged cache, half removed
        assert [p.name for p in left] == ["rank-00000-of-00001"], left
    else:  # a killed writer's temporary folder, or (after-commit) the complete cache alone
        assert any(".tmp-" in p.name for p in left) != committed, left
    with caplog.at_level(logging.WARNING):
        resumed = runs.run(out, cache)  # 1. the same command again: resumes from the last checkpoint
    assert_same(resumed, runs.ref)
    assert resumed.config["stats"]["base_cache_hits"] == int(committed)
    with caplog.at_level(logging.WARNING):
        again = runs.run(fresh, cache)  # 2. a new scan of the same corpus: reads or fills the cache
    assert_same(again, runs.ref)
    stats = again.config["stats"]
    filled = committed or point == "mid-discard"  # killed before its first checkpoint, the rerun filled it
    assert (stats["base_cache_hits"], stats["base_passes"] > 0) == ((1, False) if filled else (0, True))
    if point == "mid-discard":  # complete.json names a part the kill removed: discarded, not read
        assert "The cache in" in caplog.text and "discarding it" in caplog.text
    (entry,) = cache.glob("base_losses/*/rank-00000-of-00001")
    done = read_json(entry / "complete.json")
    check_hashes(entry, done["parts"])
    assert done["documents"] == 30 and len(done["parts"]) == 4  # 8 rows a part
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # the killed writer's leftovers removed
    from hf_mirror.cache import BaseLossCache

    rows = list(BaseLossCache(cache, entry.parent.name, rank=0, world=1).read())
    assert [r[0] for r in rows] == list(range(30)) and len({r[1] for r in rows}) == 30


def _build_in_small_checkpoints(mp):
    """`hf-mirror index` checkpoints every 1M n-grams: every 100 here, so that a kill lands between checkpoints."""
    from hf_mirror.retrieval.ngram import NgramIndex

    real = NgramIndex.build.__func__

    def build(cls, *a, **kw):
        kw.setdefault("checkpoint_ngrams", 100)
        return real(cls, *a, **kw)

    mp.setattr(NgramIndex, "build", classmethod(build))


def _kill_in_savez(mp):  # the second checkpoint chunk, half written
    import io

    real, calls = np.savez, []

    def savez(f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            buf = io.BytesIO()
            real(buf, *a, **kw)
            half_written(f, buf.getvalue())
        real(f, *a, **kw)

    mp.setattr(np, "savez", savez)


def _kill_at_rename(match, nth: int = 1):
    def patch(mp):
        import os

        real, calls = os.replace, []

        def rename(src, dst, *a, **kw):
            if match(Path(src), Path(dst)):
                calls.append(1)
                if len(calls) == nth:
                    sigkill()
            real(src, dst, *a, **kw)

        mp.setattr(os, "replace", rename)
    return patch


def _kill_in_save(mp):  # the finished index, written to its temporary folder: hashes.npy done, docs.npy not
    real = np.save

    def save(file, *a, **kw):
        if Path(str(file)).name == "docs.npy":
            sigkill()
        real(file, *a, **kw)

    mp.setattr(np, "save", save)


def _kill_in_suffix_array(mp):  # infini-gram: the corpus tokenised into its temporary folder, no suffix array yet
    from hf_mirror.retrieval import infinigram

    mp.setattr(infinigram, "_suffix_array", lambda *a, **kw: sigkill())


INDEX_KILLS = {  # where `hf-mirror index` dies; "overwrite-" cases rebuild over an index with --overwrite
    "mid-chunk": _kill_in_savez,
    "before-progress.json": _kill_at_rename(lambda src, dst: dst.name == "progress.json", nth=2),
    "mid-save": _kill_in_save,
    "before-publish": "publish",  # the complete index, being moved from --output/.hf_mirror-new into --output
    "overwrite-before-publish": "publish",  # the old index's manifest moved aside, the new files not yet in place
    # --backend infini-gram: its extras pass done, building the suffix array; the complete index, being published
    "infini-gram-mid-suffix-array": _kill_in_suffix_array,
    "infini-gram-before-publish": "publish",
}


@pytest.fixture(scope="module")
def index_build(tok_dir, texts, tmp_path_factory):
    import json

    from hf_mirror.cli import main

    root = tmp_path_factory.mktemp("index_kills")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"c{c}-d{i}", "text": t}) + "\n"
                              for c in range(3) for i, t in enumerate(texts)))

    def argv(out, *extra):
        return ["index", "--model", str(tok_dir), "--corpus", str(corpus), "--ngram", "4", "--output", str(out),
                *extra]

    assert main(argv(root / "ref")) == 0
    return root, argv


def _files(d: Path) -> dict[str, bytes]:
    """Every file of the index, hidden ones included (a killed save's leftovers must not be published with it);
    bm25s's vocabulary is compared as a mapping (it numbers words in the interpreter's string-hash order)."""
    import json

    return {p.relative_to(d).as_posix(): json.loads(p.read_text()) if p.name == "vocab.index.json" else p.read_bytes()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("point", INDEX_KILLS)
def test_sigkill_during_the_index_build(index_build, point, capsys):
    """SIGKILL at each step of `hf-mirror index`: the output never loads as an index until complete, and the same
    command again (resuming from the build's checkpoint) writes the same files as an uninterrupted build."""
    import json

    from hf_mirror.cli import main
    from hf_mirror.errors import InputError
    from hf_mirror.retrieval.infinigram import load_index

    root, argv = index_build
    out, ref = root / point, root / "ref"
    extra = ("--overwrite",) if point.startswith("overwrite") else ()
    if extra:
        shutil.copytree(ref, out)
    if point.startswith("infini-gram"):
        if not _has_infini_gram():
            pytest.skip("infini-gram not installed (pip install 'hf_mirror[infinigram]')")
        extra, ref = ("--backend", "infini-gram"), root / "ref-infini-gram"
        if not ref.exists():
            assert main(argv(ref, *extra)) == 0
    kill = INDEX_KILLS[point]
    if kill == "publish":  # the swap's first move of the new index into --output
        kill = _kill_at_rename(lambda src, dst: src.parent.name == ".hf_mirror-new" and dst.parent == out)

    def child(mp):
        _build_in_small_checkpoints(mp)
        kill(mp)
        main(argv(out, *extra))

    killed(child)
    # nothing half-built is ever in place of the index (an --overwrite: nor the old one, its manifest moved first)
    assert not (out / "manifest.json").exists()
    with pytest.raises(InputError, match="not a complete"):
        load_index(out, None)
    if point in ("mid-chunk", "before-progress.json"):  # killed between checkpoints: the rerun resumes
        (progress,) = [p for p in root.rglob("progress.json") if f"/{point}/.hf_mirror-new/" in str(p)]
        state = json.loads(progress.read_text())
        assert state["n_docs"] > 0 and not state["done"]
    capsys.readouterr()
    assert main(argv(out, *extra)) == 0, capsys.readouterr().err
    assert _files(out) == _files(ref)
    assert sorted(p.name for p in root.glob(f".{point}.*")) == []  # the killed writer's folders are removed


def _kill_at_cleanup(mp):  # the index is published; its build checkpoint (`.NAME.build/`) is not yet removed
    real = shutil.rmtree

    def rmtree(path, *a, **kw):
        if Path(path).name.endswith(".build"):
            sigkill()
        real(path, *a, **kw)

    mp.setattr(shutil, "rmtree", rmtree)


AUDIT_KILLS = {"mid-save": _kill_in_save, "after-publish": _kill_at_cleanup}


@pytest.mark.parametrize("point", AUDIT_KILLS)
def test_sigkill_while_audit_builds_its_index(indexed, point, capsys):
    """`audit --index DIR` builds the n-gram index it lacks: killed while saving it, or after publishing it and
    before removing its checkpoint, the same command again gives the undamaged report and leaves no hidden
    folder of the killed build behind."""
    import json

    from hf_mirror.cli import main

    index, out = indexed.root / f"audit-kill-{point}", indexed.root / f"audit-kill-{point}-out"

    def child(mp):
        _build_in_small_checkpoints(mp)
        AUDIT_KILLS[point](mp)
        main(indexed.argv["audit"](index, out))

    killed(child)
    left = sorted(p.name.replace(index.name, "NAME").split("-")[0] for p in index.parent.glob(f".{index.name}.*"))
    assert left == ([".NAME.build"] if point == "after-publish" else [".NAME.build", ".NAME.tmp"])
    assert (index / "manifest.json").is_file() == (point == "after-publish")
    capsys.readouterr()
    assert main(indexed.argv["audit"](index, out)) == 0, capsys.readouterr().err
    assert json.loads((out / REPORTS["audit"]).read_text()) == indexed.reports["audit"]
    assert list(index.parent.glob(f".{index.name}.*")) == []
