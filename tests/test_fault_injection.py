"""Fault injection: damage each file a run reads back, rerun, and get the uninterrupted answer or a clear error.

One reference run and one run interrupted after its third checkpoint (of six) are made once; every case damages a copy
(truncate, empty, corrupt bytes, delete) and reruns. The outcome matrix is in docs/reliability.md.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_mirror import AttributionResult, Corpus, MirrorConfig, ScanConfig, attribute
from hf_mirror.errors import StateError
from hf_mirror.integrity import check_hashes, read_json
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
                         mirror=MirrorConfig(steps=2),
                         scan=ScanConfig(normalize="none", checkpoint_every=5, batch_size=16, top_k=5,
                                         cache_dir=str(cache or root / "cache")))

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


def test_no_pickle_in_the_package():
    import hf_mirror

    root = Path(hf_mirror.__file__).parent
    assert not [p for p in root.rglob("*.py") if "import pickle" in p.read_text()]


# ---------------------------------------------------------------- index manifests (audit / provenance --index)
def _has_infini_gram() -> bool:
    try:
        import infini_gram  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ["ngram", pytest.param("infini-gram", marks=pytest.mark.skipif(not _has_infini_gram(),
                                                                           reason="infini-gram not installed"))]


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
@pytest.mark.parametrize("manifest", ["manifest.json", "ngram/manifest.json"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("command", ["audit", "provenance"])
def test_damaged_index_manifest_is_a_clear_error(indexed, command, backend, manifest, how, capsys):
    """A damaged manifest of an --index directory: exit 2 with a message naming it and the fix; the fix works.

    ``manifest`` is each manifest the layout of `hf-mirror index` has (a case whose file is absent is skipped).
    """
    import json

    from hf_mirror.cli import main

    index = indexed.root / "cases" / f"{command}-{backend}-{manifest.replace('/', '_')}-{how}"
    assert main(indexed.index_argv(backend, index)) == 0
    if not (index / manifest).is_file():
        pytest.skip(f"this index layout has no {manifest}")
    damage(index / manifest, how)
    capsys.readouterr()
    out = index.parent / f"{index.name}-out"
    assert main(indexed.argv[command](index, out)) == 2  # an InputError, caught by the CLI: no traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("hf-mirror: error:"), err
    assert "overwrite" in err, err  # the fix: rebuild over it
    if how == "delete":  # a directory without its manifest is not an index: nothing writes into it
        assert str(index) in err, err
    else:
        assert str(index / manifest) in err and "damaged" in err and "hf-mirror index" in err, err
    assert not (out / REPORTS[command]).exists()
    # the fix the message names: rebuild the index, then the same command gives the undamaged answer
    assert main(indexed.index_argv(backend, index, "--overwrite")) == 0
    assert main(indexed.argv[command](index, out)) == 0
    assert json.loads((out / REPORTS[command]).read_text()) == indexed.reports[command]
