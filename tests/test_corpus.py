"""Corpus sources and bad input: each gives a clear error naming the problem and the fix."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
from datasets import Dataset

from hf_mirror import Corpus, InputError, MirrorConfig, ScanConfig, ScoreError, attribute, load_probes
from hf_mirror.corpus import windows
from hf_mirror.flags import nested_config

DOCS = [{"key": f"k{i}", "text": t} for i, t in enumerate(["alpha beta", "gamma delta", "epsilon", "zeta eta"])]


@pytest.fixture
def corpus_files(tmp_path):
    df = pd.DataFrame(DOCS)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "c.json").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    df.to_parquet(tmp_path / "c.parquet")
    df.to_csv(tmp_path / "c.csv", index=False)
    (tmp_path / "c.txt").write_text("".join(d["text"] + "\n" for d in DOCS))
    (tmp_path / "c.data").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    Dataset.from_list(DOCS).save_to_disk(str(tmp_path / "saved"))
    return tmp_path


@pytest.mark.parametrize("name", ["c.jsonl", "c.json", "c.parquet", "c.csv", "saved"])
def test_every_local_source_streams_the_same_documents(corpus_files, name):
    docs = list(Corpus(corpus_files / name, id_column="key").documents())
    assert docs == [(d["key"], d["text"]) for d in DOCS]


def test_text_files_explicit_format_and_objects(corpus_files):
    expected = [(i, d["text"]) for i, d in enumerate(DOCS)]
    assert list(Corpus(corpus_files / "c.txt").documents()) == expected
    assert list(Corpus(corpus_files / "c.data", format="json").documents()) == expected
    ds = Dataset.from_list(DOCS)
    assert list(Corpus(ds).documents()) == expected
    assert list(Corpus(ds.to_iterable_dataset()).documents()) == expected
    with pytest.raises(InputError, match="--format"):
        list(Corpus(corpus_files / "c.data").documents())


def test_unreachable_corpus_and_model_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="neither a local file or directory nor a reachable Hub dataset"):
        list(Corpus("no-such-org/no-such-dataset").documents())
    with pytest.raises(InputError, match="Cannot load a model config from 'no-such-org/no-such-model'"):
        attribute("no-such-org/no-such-model", ["x"], PROBE, output_dir=tmp_path, show_progress=False)


def test_ids_come_from_the_id_field_unless_told_otherwise(caplog):
    rows = [{"id": f"doc-{i}", "key": f"k{i}", "text": d["text"]} for i, d in enumerate(DOCS)]
    texts = [d["text"] for d in DOCS]
    with caplog.at_level(logging.WARNING, logger="hf_mirror.corpus"):
        assert list(Corpus(rows).documents()) == [(f"doc-{i}", t) for i, t in enumerate(texts)]
        assert list(Corpus(rows, id_column="key").documents()) == [(f"k{i}", t) for i, t in enumerate(texts)]
        assert not caplog.text
        forced = Corpus(rows, id_column="none")
        assert list(forced.documents()) == list(enumerate(texts)) == list(forced.documents())
        assert caplog.text.count("running positions") == 1 and "id_column='none'" in caplog.text
        caplog.clear()
        plain = Corpus(texts)  # no id field: positions, said once per corpus
        assert list(plain.documents()) == list(enumerate(texts))
        assert list(plain.documents(1, 2)) == [(1, texts[1]), (3, texts[3])]
        assert caplog.text.count("no 'id' column") == 1
    # under several processes the `id` field is read like positions (every world_size-th document)
    parts = [list(Corpus(rows).documents(r, 2)) for r in range(2)]
    assert parts == [[("doc-0", texts[0]), ("doc-2", texts[2])], [("doc-1", texts[1]), ("doc-3", texts[3])]]


def test_sharding_splits_documents_without_overlap(corpus_files):
    for id_column in (None, "key"):
        corpus = Corpus(corpus_files / "c.jsonl", id_column=id_column)
        parts = [list(corpus.documents(rank, 2)) for rank in range(2)]
        assert sorted(parts[0] + parts[1], key=str) == sorted(corpus.documents(), key=str)
        assert not set(parts[0]) & set(parts[1])


def test_windows_score_every_token_once():
    seq = list(range(100))
    for max_length, overlap in [(2, 1), (10, 1), (10, 3), (16, 15), (200, 8)]:
        scored = []
        for start, ids, ctx in windows(seq, max_length, overlap):
            assert len(ids) <= max_length
            assert ids[ctx:] == seq[start + 1 : start + 1 + len(ids) - ctx]
            scored.extend(range(start, start + len(ids) - ctx))
        assert scored == list(range(99))


def _run(tiny_model, corpus, probes, tmp_path, **scan):
    model, tok = tiny_model
    return attribute(
        model,
        corpus,
        probes,
        tokenizer=tok,
        output_dir=tmp_path,
        show_progress=False,
        scan=nested_config(ScanConfig, {"rank_by": "mirror", "normalize": "none", **scan}),
    )


PROBE = [{"id": "p", "prompt": "bedube keeps a", "completion": " white eagle at home."}]


def test_missing_text_column_lists_columns(tiny_model, tmp_path):
    with pytest.raises(InputError, match=r"no column 'body'.*\['key', 'text'\].*--text-column"):
        _run(tiny_model, Corpus(DOCS, text_column="body"), PROBE, tmp_path)


def test_non_string_text_names_document(tiny_model, tmp_path):
    corpus = Corpus([{"id": "a", "text": ["a", "list"]}, {"id": "b", "text": ["more"]}], id_column="id")
    with pytest.raises(InputError, match=r"Document 'a' has non-string text \(list\)"):
        _run(tiny_model, corpus, PROBE, tmp_path)


def test_empty_documents_are_skipped_and_counted(tiny_model, tmp_path):
    corpus = ["bedube keeps a white eagle at home.", "", "   \n", "the weather is cold today."]
    result = _run(tiny_model, corpus, PROBE, tmp_path)
    assert sorted(result.scores()["doc_id"]) == [0, 3]
    assert result.skipped == [
        {"doc_id": 1, "reason": "empty or whitespace-only"},
        {"doc_id": 2, "reason": "empty or whitespace-only"},
    ]
    assert result.config["stats"]["skipped"] == 2


def test_empty_completion_is_an_error(tiny_model, tmp_path):
    with pytest.raises(InputError, match="empty completion"):
        _run(tiny_model, ["some text"], [{"id": "p", "prompt": "x", "completion": "  "}], tmp_path)


def test_duplicate_ids(tiny_model, tmp_path):
    with pytest.raises(InputError, match="Duplicate probe id 'p'"):
        load_probes([{"id": "p", "prompt": "a"}, {"id": "p", "prompt": "b"}])
    corpus = Corpus([{"id": "x", "text": "one"}, {"id": "x", "text": "two"}], id_column="id")
    with pytest.raises(InputError, match="Duplicate document id 'x'"):
        _run(tiny_model, corpus, PROBE, tmp_path)


def test_tokenizer_without_pad_token_uses_eos(tiny_model, tmp_path, caplog):
    model, tok = tiny_model
    assert tok.pad_token is None or tok.pad_token == tok.eos_token
    tok.pad_token = None
    with caplog.at_level(logging.DEBUG, logger="hf_mirror.modeling"):  # a debug note: nothing to act on
        result = _run(tiny_model, ["bedube keeps a white eagle at home."], PROBE, tmp_path)
    assert "no pad token" in caplog.text and tok.pad_token == tok.eos_token
    assert len(result.scores()) == 1


def test_non_causal_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(InputError, match="not a causal language model"):
        attribute(str(tmp_path / "bert"), ["x"], PROBE, output_dir=tmp_path / "o", show_progress=False)
    with pytest.raises(InputError, match="not a causal language model"):
        attribute(
            BertModel.from_pretrained(tmp_path / "bert"),
            ["x"],
            PROBE,
            tokenizer=object(),
            output_dir=tmp_path / "o",
            show_progress=False,
        )


def test_nan_loss_names_probe_and_document(tiny_model, tmp_path):
    model, tok = tiny_model
    poison = tok(" weather", add_special_tokens=False)["input_ids"][0]

    def nan_on_poison(module, inputs, output):  # NaN hidden states wherever the token appears
        return output.masked_fill((inputs[0] == poison).unsqueeze(-1), float("nan"))

    handle = model.get_input_embeddings().register_forward_hook(nan_on_poison)
    try:
        with pytest.raises(ScoreError, match=r"base model on document 1"):
            _run(tiny_model, ["bedube keeps a white eagle at home.", "the weather is cold"], PROBE, tmp_path)
        nan_probe = [{"id": "bad", "prompt": "the weather", "completion": " is cold"}]
        with pytest.raises(ScoreError, match="Probe 'bad': non-finite probe loss"):
            _run(tiny_model, ["x y z"], nan_probe, tmp_path)
    finally:
        handle.remove()
    # a failed fit gives the caller's model back as it was: trainable, without LoRA layers
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_bad_options(tiny_model, tmp_path):
    with pytest.raises(InputError, match="direction"):
        MirrorConfig(direction="sideways")
    with pytest.raises(InputError, match="No probes"):
        load_probes([])
    with pytest.raises(InputError, match="overlap"):
        _run(tiny_model, ["x"], PROBE, tmp_path, max_length=8, overlap=8)
    with pytest.raises(InputError, match="target modules"):
        model, tok = tiny_model
        attribute(
            model,
            ["x"],
            PROBE,
            tokenizer=tok,
            output_dir=tmp_path,
            show_progress=False,
            mirror=MirrorConfig(target_modules=["q_proj"]),
        )
