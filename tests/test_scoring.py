"""scoring.py: a document's score from its token losses, each probe's top-k with evidence, the parts on disk, and the
checkpoints a killed run resumes from (no document lost or counted twice)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from hf_mirror.errors import InputError, ScoreError, StateError
from hf_mirror.scan import ScannedDoc, Skipped
from hf_mirror.scoring import CHECKPOINT, ScoreBook, doc_sort_key, normalize_scores, read_state, token_pieces


class Chars:
    """A tokenizer whose token ids are character codes (not fast: pieces come from decode)."""

    is_fast = False

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def doc(seq: int, text: str, base, mirror, doc_id=None) -> ScannedDoc:
    return ScannedDoc(doc_id=seq if doc_id is None else doc_id, text=text,
                      token_ids=np.array([ord(c) for c in text], np.int64), base=np.asarray(base, np.float32),
                      mirror=np.asarray(mirror, np.float32), seq=seq)


def scores_of(book: ScoreBook) -> pd.DataFrame:
    return pd.concat([pq.read_table(book.dir / book.part_name(i)).to_pandas() for i in range(book.parts)],
                     ignore_index=True)


def test_normalisations():
    raw = np.array([1.0, 2.0, 3.0, 6.0])
    assert normalize_scores(raw, "none") is raw
    z = normalize_scores(raw, "zscore")
    assert np.isclose(z.mean(), 0) and np.isclose(z.std(), 1)
    loo = normalize_scores(raw, "loo")
    for i in range(4):
        others = np.delete(raw, i)
        assert np.isclose(loo[i], (raw[i] - others.mean()) / others.std())
    assert np.allclose(normalize_scores(np.full(4, 2.5), "zscore"), 0) and np.allclose(
        normalize_scores(np.full(4, 2.5), "loo"), 0)


def test_a_score_is_the_signed_aggregate_of_the_token_loss_deltas(tmp_path):
    base, mirror = [1.0, 1.0, 1.0], [[1.5, 1.0, 2.5], [0.0, 1.0, 1.0]]  # probe a: the mirror raises the losses
    for sign, aggregate, want in ((1.0, "mean", [2 / 3, -1 / 3]), (-1.0, "mean", [-2 / 3, 1 / 3]),
                                  (1.0, "sum", [2.0, -1.0]), (1.0, "max", [1.5, 0.0])):
        book = ScoreBook(["a", "b"], sign=sign, normalize="none", top_k=1, shard_dir=tmp_path / f"{sign}{aggregate}",
                         aggregate=aggregate)
        raw = book.add(doc(0, "xyz", base, mirror))
        assert np.allclose(raw, want), (sign, aggregate)
    with pytest.raises(ScoreError, match="3 probe scores, expected 2"):
        book = ScoreBook(["a", "b"], sign=1.0, normalize="none", top_k=1, shard_dir=tmp_path / "n")
        book.add(doc(0, "xyz", base, [[1, 1, 1]] * 3))


def test_each_probe_keeps_its_best_k_with_ties_broken_by_document_id(tmp_path):
    book = ScoreBook(["a", "b"], sign=1.0, normalize="none", top_k=2, shard_dir=tmp_path / "s")
    # document seq s scores s for probe a and -s for probe b; documents 3 and 5 tie for a
    for seq, a in ((0, 0.0), (1, 1.0), (2, 2.0), (3, 5.0), (4, 4.0), (5, 5.0)):
        book.add(doc(seq, "ab", [0.0, 0.0], [[a, a], [-seq, -seq]]))
    topk, evidence = book.topk_frames(Chars())
    assert list(topk[topk.probe_id == "a"].doc_id) == [3, 5]
    assert list(topk[topk.probe_id == "b"].doc_id) == [0, 1]
    assert list(topk.columns) == ["probe_id", "rank", "doc_id", "score", "raw_score", "n_tokens", "text"]
    # evidence: every token of each top document, its losses and the signed delta
    ev = evidence[(evidence.probe_id == "a") & (evidence.doc_id == 3)]
    assert list(ev.token) == ["a", "b"] and list(ev.delta) == [5.0, 5.0] and list(ev.mirror_loss) == [5.0, 5.0]


def test_eligible_documents_limit_a_probes_top_k_but_every_score_is_kept(tmp_path):
    book = ScoreBook(["a"], sign=1.0, normalize="none", top_k=5, shard_dir=tmp_path / "s", eligible={"a": {"1", "2"}})
    for seq in range(4):
        book.add(doc(seq, "ab", [0.0, 0.0], [[seq, seq]]))
    book.checkpoint(4)
    assert list(book.topk_frames(Chars())[0].doc_id) == [2, 1]
    assert sorted(scores_of(book).doc_id) == [0, 1, 2, 3]


def test_controls_are_normalised_with_but_never_reported(tmp_path):
    book = ScoreBook(["a", "c1", "c2"], sign=1.0, normalize="zscore", top_k=1, shard_dir=tmp_path / "s", n_controls=2)
    raw = book.add(doc(0, "ab", [0.0, 0.0], [[3.0, 3.0], [1.0, 1.0], [2.0, 2.0]]))
    book.checkpoint(1)
    rows = scores_of(book)
    assert list(rows.probe_id) == ["a"]
    assert np.isclose(rows.score[0], normalize_scores(raw, "zscore")[0]) and rows.raw_score[0] == 3.0


def test_ids_must_be_unique_and_of_one_type(tmp_path):
    book = ScoreBook(["a"], sign=1.0, normalize="none", top_k=1, shard_dir=tmp_path / "s")
    book.add(doc(0, "ab", [0, 0], [[1, 1]], doc_id=np.int64(7)))  # numpy ints are ints
    with pytest.raises(InputError, match="Duplicate document id 7"):
        book.add(doc(1, "ab", [0, 0], [[1, 1]], doc_id=7))
    with pytest.raises(InputError, match="one type"):
        book.add(doc(2, "ab", [0, 0], [[1, 1]], doc_id="x"))


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(InputError, match="at least 3 probes"):
        ScoreBook(["a", "b"], sign=1.0, normalize="zscore", top_k=1, shard_dir=tmp_path / "a")
    with pytest.raises(InputError, match="aggregate"):
        ScoreBook(["a"], sign=1.0, normalize="none", top_k=1, shard_dir=tmp_path / "b", aggregate="median")
    with pytest.raises(InputError, match="normalize"):
        ScoreBook(["a"], sign=1.0, normalize="minmax", top_k=1, shard_dir=tmp_path / "c")
    with pytest.raises(InputError, match="top_k"):
        ScoreBook(["a"], sign=1.0, normalize="none", top_k=0, shard_dir=tmp_path / "d")


def test_a_resume_continues_from_the_checkpoint_without_losing_or_repeating_a_document(tmp_path):
    shard = tmp_path / "s"
    mirror = lambda s: [[s, s], [-s, -s]]  # noqa: E731
    book = ScoreBook(["a", "b"], sign=1.0, normalize="none", top_k=2, shard_dir=shard, run_key="k", checkpoint_every=3)
    for seq in range(7):  # checkpoints after documents 2 and 5; document 6 is lost with the process
        book.add(doc(seq, "ab", [0, 0], mirror(seq)), [Skipped("gone", "empty or whitespace-only", 1)])
    again = ScoreBook(["a", "b"], sign=1.0, normalize="none", top_k=2, shard_dir=shard, run_key="k", checkpoint_every=3)
    assert again.next_seq == 6 and again.n_documents == 6 and not again.done
    assert again.skipped == [{"doc_id": "gone", "reason": "empty or whitespace-only", "seq": 1}]
    for seq in range(again.next_seq, 8):
        again.add(doc(seq, "ab", [0, 0], mirror(seq)))
    again.finish(8, [], Chars())
    rows = scores_of(again)
    assert sorted(rows[rows.probe_id == "a"].doc_id) == list(range(8))  # once each
    assert list(again.topk_frames(Chars())[0].query("probe_id == 'a'").doc_id) == [7, 6]
    assert list(again.topk_frames(Chars())[0].query("probe_id == 'b'").doc_id) == [0, 1]  # restored from the state
    finished = ScoreBook(["a", "b"], sign=1.0, normalize="none", top_k=2, shard_dir=shard, run_key="k")
    assert finished.done and finished.next_seq == 8
    with pytest.raises(InputError, match="different run"):
        ScoreBook(["a", "b"], sign=1.0, normalize="none", top_k=2, shard_dir=shard, run_key="other")


def test_a_damaged_state_falls_back_to_the_one_before(tmp_path, caplog):
    shard = tmp_path / "s"
    book = ScoreBook(["a"], sign=1.0, normalize="none", top_k=1, shard_dir=shard, run_key="k", checkpoint_every=2)
    for seq in range(4):
        book.add(doc(seq, "ab", [0, 0], [[seq, seq]]))
    newest = sorted(p for p in shard.iterdir() if p.name.startswith("state-"))[-1]
    newest.write_bytes(newest.read_bytes()[:-20])
    with pytest.raises(StateError, match="damaged"):
        read_state(newest, "fix")
    again = ScoreBook(["a"], sign=1.0, normalize="none", top_k=1, shard_dir=shard, run_key="k")
    assert again.next_seq == 2 and again.n_documents == 2  # the documents after the earlier checkpoint come again
    assert (shard / CHECKPOINT).exists()


def test_methods_without_token_losses_keep_no_evidence(tmp_path):
    book = ScoreBook(["a"], sign=1.0, normalize="none", top_k=2, shard_dir=tmp_path / "s")
    book.add_scores("d1", "ab", np.array([97, 98]), np.array([0.5]), 0)
    book.add_scores("d2", "ab", np.array([97, 98]), np.array([0.7]), 1)
    topk, evidence = book.topk_frames(Chars())
    assert list(topk.doc_id) == ["d2", "d1"] and evidence.empty


def test_doc_sort_key_orders_ints_numerically_and_others_as_text():
    assert sorted([10, 2, 33], key=doc_sort_key) == [2, 10, 33]
    assert sorted(["b", "a10", "a2"], key=doc_sort_key) == ["a10", "a2", "b"]


def test_token_pieces_concatenate_back_to_the_text(tok):
    text = "the fox keeps a red lantern"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, text, np.array(ids))
    assert "".join(pieces) == text and len(pieces) == len(ids)
    assert token_pieces(Chars(), "ab", np.array([97, 98])) == ["a", "b"]
