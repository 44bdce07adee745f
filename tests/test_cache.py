"""Base-loss cache: a hit skips the base model entirely; any change of model, corpus or windowing misses."""

from __future__ import annotations

import numpy as np
import torch

from hf_mirror import Corpus, MirrorConfig, RankingConfig, ScanConfig, ScoringConfig, SpeedConfig, attribute
from hf_mirror.cache import model_fingerprint
from hf_mirror.flags import nested_config


def _run(model, tok, corpus, probes, out, cache_dir, **scan):
    return attribute(model, corpus, probes, tokenizer=tok, output_dir=out, show_progress=False,
                     scan=nested_config(ScanConfig, {"rank_by": "mirror", "cache_dir": str(cache_dir),
                                                     "normalize": "none",
                                                     # passes counted one mirror at a time; the forward read reads
                                                     # the cache
                                                     "adapters_per_forward": 1, "read": "forward", **scan}))


def test_cache_hit_skips_base_pass_and_keeps_scores(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    corpus = Corpus(planted.texts)
    first = _run(model, tok, corpus, planted.probes()[:2], tmp_path / "a", tmp_path / "cache")
    assert first.config["stats"]["base_passes"] > 0 and first.config["stats"]["base_cache_hits"] == 0
    # a second run with new probes reads the base losses from the cache
    second = _run(model, tok, corpus, planted.probes()[2:5], tmp_path / "b", tmp_path / "cache")
    assert second.config["stats"]["base_passes"] == 0 and second.config["stats"]["base_cache_hits"] == 1
    # per batch: base + 2 mirrors the first time, 3 mirrors and no base the second time
    assert second.config["stats"]["forward_passes"] == first.config["stats"]["forward_passes"]
    uncached = attribute(model, corpus, planted.probes()[2:5], tokenizer=tok, output_dir=tmp_path / "c",
                         show_progress=False, scan=ScanConfig(scoring=ScoringConfig(normalize="none", read="forward"),
                                                              ranking=RankingConfig(rank_by="mirror"),
                                                              speed=SpeedConfig(cache=False)))
    assert uncached.config["stats"]["base_passes"] > 0
    a = second.scores().sort_values(["probe_id", "doc_id"])
    b = uncached.scores().sort_values(["probe_id", "doc_id"])
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-6)


def test_changed_corpus_model_or_windowing_misses(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    probes = planted.probes()[:2]
    cache = tmp_path / "cache"
    _run(model, tok, planted.texts, probes, tmp_path / "a", cache)
    hits = lambda r: r.config["stats"]["base_cache_hits"]  # noqa: E731
    assert hits(_run(model, tok, planted.texts, probes, tmp_path / "b", cache)) == 1
    changed = [*planted.texts[:-1], planted.texts[-1] + " changed"]
    assert hits(_run(model, tok, changed, probes, tmp_path / "c", cache)) == 0
    assert hits(_run(model, tok, planted.texts, probes, tmp_path / "d", cache, max_length=16)) == 0
    before = model_fingerprint(model)
    w = model.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        w[0, 0] += 1e-3
    try:
        assert model_fingerprint(model) != before
        assert hits(_run(model, tok, planted.texts, probes, tmp_path / "e", cache)) == 0
    finally:
        with torch.no_grad():
            w[0, 0] -= 1e-3


def test_file_corpus_fingerprint_follows_content(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "a"}\n')
    first = Corpus(f).fingerprint()
    assert first == Corpus(f).fingerprint() and first.startswith("files:")
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert Corpus(f).fingerprint() != first
    assert Corpus("some/hub-dataset").fingerprint() is None  # no revision: cannot know it did not change


def test_file_corpus_fingerprint_reads_every_byte(tmp_path):
    """One byte changed in the middle of a 3 MiB file, its size and mtime put back: another fingerprint, also from
    the Corpus object that fingerprinted it before (its memo is keyed by the ctime, which a write always moves)."""
    import os
    import time

    f = tmp_path / "c.jsonl"
    f.write_text("".join(f'{{"text": "document {i:07d} {"x" * 80}"}}\n' for i in range(33_000)))
    corpus = Corpus(f)
    first, st = corpus.fingerprint(), f.stat()
    assert st.st_size > 3 << 20 and Corpus(f).fingerprint() == first
    time.sleep(0.05)  # past the kernel's coarse ctime tick
    data = bytearray(f.read_bytes())
    data[len(data) // 2] = ord("y") if data[len(data) // 2] != ord("y") else ord("z")
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert corpus.fingerprint() != first and Corpus(f).fingerprint() == corpus.fingerprint()


def test_single_probe_reuses_cached_control_scores(tiny_model, planted, tmp_path):
    """A single probe z-scored against controls: the second run fits and scans only the probe itself."""
    model, tok = tiny_model
    corpus = Corpus(planted.texts)
    scan = dict(cache_dir=str(tmp_path / "cache"), normalize="zscore", rank_by="mirror", adapters_per_forward=1)
    # the step-fitted mirror: its deltas are far above float32's resolution, so cached and fresh scores agree to
    # 1e-5 (the default gradient mirror's 0.01-nat step moves a document's loss by about 1e-3 nats, where batching
    # changes the float32 rounding of a delta by up to 5e-4 of it)
    mirror = MirrorConfig(fit="steps", target_modules=None)
    run = lambda probes, out, **kw: attribute(  # noqa: E731
        model, corpus, probes, tokenizer=tok, output_dir=tmp_path / out, show_progress=False, mirror=mirror,
        scan=nested_config(ScanConfig, {**scan, **kw}))
    first = run(planted.probes()[:1], "a")
    assert first.config["scan"]["controls"] == 7 and first.config["stats"]["control_cache_hits"] == 0
    second = run(planted.probes()[1:2], "b")
    stats = second.config["stats"]
    assert stats["control_cache_hits"] == 1 and stats["base_passes"] == 0
    assert stats["forward_passes"] * 9 == first.config["stats"]["forward_passes"]  # 1 mirror vs base + 1 + 7 controls
    assert len(list((tmp_path / "b" / "adapters").glob("*/adapter_config.json"))) == 1  # controls not fitted
    uncached = attribute(model, corpus, planted.probes()[1:2], tokenizer=tok, output_dir=tmp_path / "c",
                         show_progress=False, mirror=mirror,
                         scan=ScanConfig(scoring=ScoringConfig(normalize="zscore"),
                                         ranking=RankingConfig(rank_by="mirror"), speed=SpeedConfig(cache=False)))
    assert uncached.config["control_probes"] == second.config["control_probes"]
    a = second.scores().sort_values("doc_id")
    b = uncached.scores().sort_values("doc_id")
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    assert list(second.topk["doc_id"]) == list(uncached.topk["doc_id"])
    # another aggregation keys other control scores
    assert run(planted.probes()[1:2], "d", aggregate="sum").config["stats"]["control_cache_hits"] == 0
