"""Scale-out: 1 vs 2 real processes (gloo on CPU), SIGKILL then resume, worker failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_mirror import (
    AttributionResult,
    CheckpointConfig,
    MirrorConfig,
    RankingConfig,
    ScanConfig,
    ScoringConfig,
    WindowConfig,
    attribute,
)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _write_inputs(planted, tmp_path: Path, copies: int = 1, n_probes: int = 8) -> tuple[Path, Path]:
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for c in range(copies):
            for i, t in enumerate(planted.texts):
                f.write(json.dumps({"id": f"c{c}-d{i}", "text": t}) + "\n")
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in planted.probes()[:n_probes]))
    return corpus, probes


def _cli(planted, corpus, probes, out, *extra) -> list[str]:
    return ["-m", "hf_mirror.cli", "attribute", "--model", str(planted.model_dir), "--corpus", str(corpus),
            "--id-column", "id", "--probes", str(probes), "--output", str(out), "--no-progress", *extra]


def _sorted_scores(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "scores.parquet").sort_values(["probe_id", "doc_id"]).reset_index(drop=True)


def _launch_two(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("normalize", ["none", "zscore"])
def test_one_and_two_processes_give_the_same_answer(planted, tmp_path, normalize):
    corpus, probes = _write_inputs(planted, tmp_path)
    extra = ["--normalize", normalize]
    if normalize == "zscore":  # a z-score divides fp32 noise by each document's spread: batch deterministically
        extra += ["--fixed-width", "--max-length", "32"]
    one = subprocess.run([sys.executable, *_cli(planted, corpus, probes, tmp_path / "one", *extra)], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch_two(_cli(planted, corpus, probes, tmp_path / "two", *extra))
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list((tmp_path / "two" / "shards").iterdir())) == 2
    assert two.stdout.count("wrote ") == 1  # only the main process reports
    a, b = _sorted_scores(tmp_path / "one"), _sorted_scores(tmp_path / "two")
    assert list(a["doc_id"]) == list(b["doc_id"]) and len(a) == 8 * len(planted.texts)
    # without --fixed-width, batches hold different windows in the two runs: fp32 losses differ in the last bits
    np.testing.assert_allclose(a["raw_score"], b["raw_score"], atol=1e-6)
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    # every document's BM25 score stays on the main process (the merge's), yet both runs carry the same columns
    np.testing.assert_array_equal(a["bm25"], b["bm25"])
    assert a["bm25"].notna().all() and (a["bm25"] > 0).any()
    np.testing.assert_allclose(a["influence"], b["influence"], rtol=1e-4, atol=1e-4)
    ta, tb = AttributionResult.load(tmp_path / "one").topk, AttributionResult.load(tmp_path / "two").topk
    assert list(ta["doc_id"]) == list(tb["doc_id"]) and list(ta["rank"]) == list(tb["rank"])


def test_sigkill_mid_scan_then_resume(planted, tmp_path):
    corpus, probes = _write_inputs(planted, tmp_path, copies=8)
    n_docs = 8 * len(planted.texts)
    args = _cli(planted, corpus, probes, tmp_path / "killed", "--batch-size", "1", "--checkpoint-every", "5")
    proc = subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "shards" / "rank-00000-of-00001" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            state = json.loads(ckpt.read_text())
            if state["next_seq"] >= 40:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(ckpt.read_text())
    assert not state["done"] and 40 <= state["next_seq"] < n_docs
    assert not (tmp_path / "killed" / "topk.parquet").exists()

    resumed = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean = subprocess.run([sys.executable, *_cli(planted, corpus, probes, tmp_path / "clean", "--batch-size", "1")],
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    a, b = _sorted_scores(tmp_path / "killed"), _sorted_scores(tmp_path / "clean")
    assert sorted(a[a["probe_id"] == "fact-0"]["doc_id"]) == sorted(
        json.loads(line)["id"] for line in corpus.read_text().splitlines())
    assert len(a) == len(b) == 8 * n_docs
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-6)
    pd.testing.assert_frame_equal(AttributionResult.load(tmp_path / "killed").topk,
                                  AttributionResult.load(tmp_path / "clean").topk)


def test_resume_after_an_exception_keeps_finished_work(tiny_model, planted, tmp_path, monkeypatch):
    from hf_mirror import corpus

    monkeypatch.setattr(corpus, "READ_BATCH", 4)  # the stream is read in batches: fail after some were scanned
    model, tok = tiny_model
    kw = dict(tokenizer=tok, show_progress=False, mirror=MirrorConfig(fit="steps", steps=2),
              scan=ScanConfig(windows=WindowConfig(batch_size=2, sort_batches=4),
                              scoring=ScoringConfig(normalize="none"), ranking=RankingConfig(rank_by="mirror"),
                              checkpoints=CheckpointConfig(checkpoint_every=3)))
    texts = planted.texts

    def failing(n):
        full = [0]  # the candidate stage reads the whole corpus before the scan: the disk goes away in the scan

        def gen():
            for i, t in enumerate(texts):
                if i == n and full[0]:
                    raise OSError("disk went away")
                yield {"text": t}
            full[0] += 1
        return gen

    from datasets import IterableDataset

    with pytest.raises(OSError, match="disk went away"):
        attribute(model, IterableDataset.from_generator(failing(25)), planted.probes()[:4],
                  output_dir=tmp_path / "run", **kw)
    state = json.loads((tmp_path / "run" / "shards" / "rank-00000-of-00001" / "checkpoint.json").read_text())
    assert 18 <= state["next_seq"] <= 25 and not state["done"]
    done = attribute(model, IterableDataset.from_generator(failing(-1)), planted.probes()[:4],
                     output_dir=tmp_path / "run", **kw)
    ref = attribute(model, IterableDataset.from_generator(failing(-1)), planted.probes()[:4],
                    output_dir=tmp_path / "ref", **kw)
    a, b = _sorted_scores(tmp_path / "run"), _sorted_scores(tmp_path / "ref")
    assert list(a["doc_id"]) == list(b["doc_id"]) and a["doc_id"].value_counts().eq(4).all()
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-6)
    pd.testing.assert_frame_equal(done.topk, ref.topk)


def test_a_different_run_in_the_same_directory_is_refused(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    kw = dict(tokenizer=tok, show_progress=False, output_dir=tmp_path)
    attribute(model, planted.texts[:6], planted.probes()[:3], **kw)
    from hf_mirror import InputError

    top3 = ScanConfig(ranking=RankingConfig(rank_by="mirror", top_k=3))
    with pytest.raises(InputError, match="different run"):
        attribute(model, planted.texts[:6], planted.probes()[:3], scan=top3, **kw)
    again = attribute(model, planted.texts[:6], planted.probes()[:3], scan=top3, overwrite=True, **kw)
    assert again.config["scan"]["top_k"] == 3


def test_worker_failure_names_rank_and_document(planted, tmp_path):
    corpus, probes = _write_inputs(planted, tmp_path, n_probes=3)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows[7]["text"] = ["not", "a", "string"]  # lands in process 1's shard (every other document)
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the curvature sample (the first 4 documents) is read before the scan: it leaves document 7 to process 1's shard
    proc = _launch_two(_cli(planted, corpus, probes, tmp_path / "out", "--curvature-docs", "4"))
    assert proc.returncode != 0
    assert "Process 1 of 2 failed while scanning document 'c0-d7'" in proc.stderr
    assert "error (process 1 of 2): Document 'c0-d7' has non-string text" in proc.stderr
