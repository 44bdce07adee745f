"""The mixed read (``exact_head``): under the linear read, each probe's N documents with the largest first-order change
are read again exactly at the merge; the result takes the forward read's values there and the linear read's elsewhere,
in ``scores.parquet``, the top-k (which a head document may enter or leave) and the columns made from them."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from hf_mirror import AttributionResult, InputError, attribute
from hf_mirror.config import MirrorConfig, ScanConfig
from hf_mirror.flags import nested_config
from hf_mirror.merge import exact_head, merge_shards
from hf_mirror.scan import ScannedDoc
from hf_mirror.scoring import ScoreBook

pytestmark = pytest.mark.usefixtures("one_thread")

N, TOP_K = 8, 2
SCAN = {"rank_by": "mirror", "top_k": TOP_K, "cache": False}


def _run(tiny_model, planted, out, **flat) -> AttributionResult:
    model, tok = tiny_model
    corpus = [{"id": f"d{i}", "text": t} for i, t in enumerate(planted.texts)]
    return attribute(model, corpus, planted.probes()[:3], tokenizer=copy.deepcopy(tok), output_dir=out,
                     show_progress=False, scan=nested_config(ScanConfig, {**SCAN, **flat}))


def _scores(result: AttributionResult) -> pd.DataFrame:
    return result.scores().sort_values(["probe_id", "doc_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def runs(tiny_model, planted, tmp_path_factory):
    """The same mirrors read three ways: first order alone, mixed (N exact per probe) and forward (on one thread, as
    the tests that compare with them: another thread count sums in another order)."""
    import torch

    root, threads = tmp_path_factory.mktemp("exact_head"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"linear": _run(tiny_model, planted, root / "linear", exact_head=0),
                "mixed": _run(tiny_model, planted, root / "mixed", exact_head=N),
                "forward": _run(tiny_model, planted, root / "forward", read="forward", exact_head=N)}
    finally:
        torch.set_num_threads(threads)


def _heads(linear: pd.DataFrame) -> dict[str, set]:
    """Each probe's N documents with the largest first-order change by magnitude (ties: the smaller id)."""
    ordered = linear.assign(size=linear["raw_score"].abs()).sort_values(["probe_id", "size", "doc_id"],
                                                                        ascending=[True, False, True])
    return {pid: set(rows["doc_id"].head(N)) for pid, rows in ordered.groupby("probe_id")}


def test_the_head_is_read_exactly_and_the_rest_to_first_order(runs):
    linear, mixed, forward = (_scores(runs[k]) for k in ("linear", "mixed", "forward"))
    assert list(mixed["doc_id"]) == list(linear["doc_id"]) == list(forward["doc_id"])
    heads = _heads(linear)
    in_head = np.array([d in heads[p] for p, d in zip(mixed["probe_id"], mixed["doc_id"], strict=True)])
    assert in_head.sum() == 3 * N == runs["mixed"].config["stats"]["exact_head_pairs"]
    # fp32 losses batched with other windows: equal to about 1e-7 nats
    np.testing.assert_allclose(mixed["raw_score"][in_head], forward["raw_score"][in_head], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(mixed["raw_score"][~in_head], linear["raw_score"][~in_head])
    np.testing.assert_array_equal(mixed["score"], mixed["raw_score"])  # normalize none
    # the two reads differ on the head far beyond the tolerance: the test sees which one the result took
    assert np.abs(forward["raw_score"] - linear["raw_score"])[in_head].max() > 1e-4
    # the influence column is made from the mixed scores: each probe's score over its spread
    for _, rows in mixed.groupby("probe_id"):
        np.testing.assert_allclose(rows["influence"], rows["score"] / rows["score"].std(ddof=0), rtol=1e-9)


def test_the_top_k_is_ranked_on_the_mixed_scores_with_texts_and_evidence(runs, planted):
    result, before = runs["mixed"], runs["linear"].topk
    scores, heads = _scores(result), _heads(_scores(runs["linear"]))
    texts = {f"d{i}": t for i, t in enumerate(planted.texts)}
    entered = [(p, d) for p, d in zip(result.topk["probe_id"], result.topk["doc_id"], strict=True)
               if d not in set(before[before["probe_id"] == p]["doc_id"])]
    assert entered and all(d in heads[p] for p, d in entered)  # here a head document moves into a top-k
    for pid, rows in scores.groupby("probe_id"):
        best = rows.assign(neg=-rows["score"]).sort_values(["neg", "doc_id"]).head(TOP_K)
        top = result.topk[result.topk["probe_id"] == pid]
        assert list(top["doc_id"]) == list(best["doc_id"]) and list(top["rank"]) == list(range(1, TOP_K + 1))
        np.testing.assert_array_equal(top["score"], best["score"])
        assert list(top["text"]) == [texts[d] for d in top["doc_id"]]
        for d, raw in zip(top["doc_id"], top["raw_score"], strict=True):  # the head's evidence is its exact read
            deltas = result.token_deltas(pid, d)["delta"]
            assert len(deltas) > 0 and (d not in heads[pid] or deltas.mean() == pytest.approx(raw, rel=1e-5, abs=1e-9))


def test_exact_head_zero_and_the_forward_read_are_untouched(runs):
    assert runs["linear"].config["stats"]["exact_head_pairs"] == 0
    assert runs["forward"].config["stats"]["exact_head_pairs"] == 0
    assert runs["mixed"].config["scan"]["exact_head"] == N and runs["linear"].config["scan"]["exact_head"] == 0
    linear = _scores(runs["linear"])
    for pid, rows in linear.groupby("probe_id"):  # the first-order ranking, as before
        best = rows.assign(neg=-rows["score"]).sort_values(["neg", "doc_id"]).head(TOP_K)
        assert list(runs["linear"].topk[runs["linear"].topk["probe_id"] == pid]["doc_id"]) == list(best["doc_id"])


def test_a_rerun_after_the_scan_gives_the_same_answer(tiny_model, planted, runs, tmp_path, monkeypatch):
    """Killed between the scan and the merge, then rerun: the head is read again from the finished shards, once."""
    import hf_mirror.pipeline as pipeline

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "merge_shards", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, planted, tmp_path, exact_head=N)
    monkeypatch.undo()
    reads, read = [], pipeline._read_exactly
    monkeypatch.setattr(pipeline, "_read_exactly", lambda run, pool, model, need, texts: reads.append(
        {(p, d) for p, docs in need.items() for d in docs}) or read(run, pool, model, need, texts))
    again = _run(tiny_model, planted, tmp_path, exact_head=N)
    pd.testing.assert_frame_equal(_scores(again), _scores(runs["mixed"]))
    pd.testing.assert_frame_equal(again.topk, runs["mixed"].topk)
    pd.testing.assert_frame_equal(again.evidence, runs["mixed"].evidence)
    assert again.config["stats"]["exact_head_pairs"] == 3 * N
    # the report's evidence reuses the head's reads: its own pass reads only documents outside the head
    assert len(reads[0]) == 3 * N and all(not reads[0] & later for later in reads[1:])


def test_the_forward_read_ignores_the_setting_and_keeps_its_identity(tiny_model, planted, runs):
    """A forward run's output is resumed, not refused, under another exact_head: the setting does not reach it."""
    again = _run(tiny_model, planted, runs["forward"].directory, read="forward", exact_head=3)
    pd.testing.assert_frame_equal(again.topk, runs["forward"].topk)
    with pytest.raises(InputError, match="different run"):  # the linear read's result changes with it: refused
        _run(tiny_model, planted, runs["mixed"].directory, exact_head=3)


def test_the_flag_reaches_the_config():
    from hf_mirror.cli import build_parser
    from hf_mirror.flags import config_from_args

    args = build_parser().parse_args(["attribute", "--model", "m", "--corpus", "c", "--probes", "p", "--output", "o",
                                      "--exact-head", "3"])
    assert config_from_args(ScanConfig, args).scoring.exact_head == 3
    assert ScanConfig().scoring.exact_head == 10 and MirrorConfig().fit == "gradient"  # the default read is mixed


# ------------------------------------------------------------------------------------------- the merge, on its own
PROBES = ["a", "b"]
# doc id -> (probe a's first-order score, probe b's)
FIRST = {0: (0.9, -0.1), 1: (0.8, 0.2), 2: (0.7, 0.3), 3: (0.6, -0.9), 4: (0.5, 0.1), 5: (-0.95, 0.0)}


class Chars:
    is_fast = False

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _shards(root, world: int, top_k: int) -> list:
    dirs = []
    for rank in range(world):
        book = ScoreBook(PROBES, sign=1.0, normalize="none", top_k=top_k, shard_dir=root / f"rank-{rank}")
        mine = [d for d in FIRST if d % world == rank]
        for seq, d in enumerate(mine):
            book.add(ScannedDoc(doc_id=d, text=f"doc {d}", token_ids=np.array([1, 2]), base=np.zeros(2, np.float32),
                                mirror=np.array([[s, s] for s in FIRST[d]], np.float32), seq=seq))
        book.finish(len(mine), [], Chars())
        dirs.append(book.dir)
    return dirs


@pytest.mark.parametrize("world", [1, 2])
def test_exact_rows_enter_and_leave_the_top_k(tmp_path, world):
    """The head by magnitude (ties: the smaller id); its exact scores replace the first-order ones, a head document
    from below the shards' top-k enters the merged top-k with its text and rank, and one that falls leaves it."""
    n, top_k = 2, 2
    dirs = _shards(tmp_path, world, top_k + n)  # the pipeline keeps top_k + n per shard
    head = exact_head(dirs, n)
    assert {p: list(rows["doc_id"]) for p, rows in head.groupby("probe_id")} == {"a": [5, 0], "b": [3, 2]}
    assert set(head["text"].dropna()) <= {f"doc {d}" for d in head["doc_id"]}  # where a shard's top-k holds it
    exact = {("a", 5): 2.0, ("a", 0): 0.1, ("b", 3): -0.5, ("b", 2): 0.35}
    raw = [exact[(p, d)] for p, d in zip(head["probe_id"], head["doc_id"], strict=True)]
    rows = head.assign(raw_score=raw, score=raw, text=[f"doc {d}" for d in head["doc_id"]])
    merged = merge_shards(dirs, tmp_path, PROBES, top_k, exact=rows)
    top = merged["topk"]
    assert list(zip(top["probe_id"], top["rank"], top["doc_id"], top["text"], strict=True)) == [
        ("a", 1, 5, "doc 5"), ("a", 2, 1, "doc 1"), ("b", 1, 2, "doc 2"), ("b", 2, 1, "doc 1")]
    np.testing.assert_allclose(top["score"], [2.0, 0.8, 0.35, 0.2], rtol=1e-6)
    scores = pd.read_parquet(tmp_path / "scores.parquet").set_index(["probe_id", "doc_id"])
    for (p, d), value in exact.items():
        assert scores.loc[(p, d), "score"] == scores.loc[(p, d), "raw_score"] == value
    assert scores.loc[("a", 1), "raw_score"] == pytest.approx(0.8) and len(scores) == 12
    (tmp_path / "plain").mkdir()
    plain = merge_shards(dirs, tmp_path / "plain", PROBES, top_k)
    assert list(plain["topk"]["doc_id"]) == [0, 1, 2, 1]  # without the exact rows: the first-order top-k

