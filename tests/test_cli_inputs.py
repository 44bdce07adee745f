"""Bad input refused up front by the hf-mirror command: every number finite, models that do not load, corpora and
probes checked before anything is fitted (issue 26, items 3 and 4)."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from hf_mirror.cli import build_parser, main
from hf_mirror.modeling import is_local


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok_dir, texts):
    """A random 2-layer GPT-2 with the planted tokenizer (nothing trained: these runs stop before fitting or barely
    fit), a corpus of the planted texts with ids and a probe file."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.save_pretrained(root / "model")
    # seeded: the weights decide what the model generates, and a generation that re-tokenises past the 64-token
    # window is refused (probes.generate_completions), which some random draws did
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=2, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
                    ).save_pretrained(root / "model")
    (root / "c.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    (root / "p.jsonl").write_text(json.dumps({"id": "p", "prompt": texts[0][:12], "completion": texts[0][12:]}) + "\n")
    return root


def _numeric_flags():
    """``(command, flag, required argv)`` for every option of every subcommand that parses a number."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        required = [x for a in parser._actions if a.required
                    for x in ([a.option_strings[0], "x"] if a.option_strings else ["x"])]
        for action in parser._actions:
            if action.type is None or not action.option_strings:
                continue
            try:
                numeric = isinstance(action.type("1"), (int, float))
            except Exception:  # noqa: BLE001 - a type that takes no "1" (e.g. auto|all|bm25:M) is not a number
                numeric = False
            if numeric:
                yield command, action.option_strings[0], required


NUMERIC = list(_numeric_flags())


def test_the_numeric_flags_are_found():
    found = {(c, f) for c, f, _ in NUMERIC}
    assert {("attribute", "--lr"), ("attribute", "--mirror-weight"), ("attribute", "--target-rise"),
            ("audit", "--threshold"), ("audit", "--combined-threshold"), ("provenance", "--ngram"),
            ("memorization", "--seed"), ("show", "-k")} <= found


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "-Infinity"])
def test_every_numeric_flag_refuses_nan_and_infinities(value, capsys):
    for command, flag, required in NUMERIC:
        with pytest.raises(SystemExit) as exit_:
            main([command, *required, f"{flag}={value}"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (command, flag)
        assert f"argument {flag}" in err and value in err, (command, flag, err)


@pytest.mark.parametrize(("name", "local"), [
    ("gpt2", False), ("org/name", False), ("HuggingFaceTB/SmolLM2-135M", False),
    ("./m", True), ("../m", True), ("/abs/m", True), ("~/m", True), (".m", True), ("runs/a/m", True),
    ("C:\\models\\m", True), ("org/name/", True), ("", True),
])
def test_which_model_names_are_local_paths(name, local):
    assert is_local(name) is local


def test_an_org_name_that_exists_here_is_a_local_path(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "gpt2").write_text("")
    monkeypatch.chdir(tmp_path)
    assert is_local("org/name") and is_local("org/other")  # org/ is a directory here: models under it are local
    assert is_local("gpt2") and not is_local("gpt3") and not is_local("other/name")


def _never_from_the_hub(monkeypatch):
    """Make every transformers load fail the test: a local path that is not a model is refused before them."""
    import transformers

    def looked_up(*args, **kwargs):
        raise AssertionError(f"from_pretrained called with {args} {kwargs}")

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", looked_up)


@pytest.mark.parametrize("command", ["attribute", "index", "memorization", "provenance", "audit"])
@pytest.mark.parametrize("model", ["./no-such-model", "no/such/model", "model/model.safetensors", "model/missing"])
def test_a_local_model_path_that_is_no_directory_is_refused_before_any_lookup(tiny, command, model, monkeypatch,
                                                                               capsys):
    _never_from_the_hub(monkeypatch)
    monkeypatch.chdir(tiny)
    extra = {"attribute": ["--probes", "p.jsonl"], "provenance": ["--probes", "p.jsonl"],
             "audit": ["--eval-set", "c.jsonl", "--detectors", "minkprob"]}.get(command, [])
    rc = main([command, "--model", model, "--corpus", "c.jsonl", "--output", "out", *extra, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    what = "is a file, not a model directory" if model.endswith(".safetensors") else "does not exist"
    assert f"The model path {model!r} {what}" in err and "Traceback" not in err
    assert not (tiny / "out").exists()


def test_a_model_directory_without_weights_or_tokenizer_is_an_input_error(tiny, tmp_path, capsys):
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text((tiny / "model" / "config.json").read_text())
    common = ["--corpus", str(tiny / "c.jsonl"), "--no-progress"]
    rc = main(["attribute", "--model", str(tmp_path / "config-only"), *common, "--probes", str(tiny / "p.jsonl"),
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"Cannot load the model weights from {str(tmp_path / 'config-only')!r}" in err
    assert "model.safetensors" in err  # what is missing
    assert main(["index", "--model", str(tmp_path / "config-only"), *common, "--output", str(tmp_path / "ix")]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err  # transformers would build an empty one from config.json
    assert not (tmp_path / "out").exists() and not (tmp_path / "ix").exists()
    assert main(["attribute", "--model", str(tiny / "model"), *common, "--probes", str(tiny / "p.jsonl"), "--output",
                 str(tmp_path / "ok"), "--gguf-file", "m.gguf"]) == 2
    assert "holds no GGUF file 'm.gguf' (--gguf-file)" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["config-only"]


def _attribute(tiny, corpus, out, *extra: str) -> list[str]:
    return ["attribute", "--model", str(tiny / "model"), "--corpus", str(corpus), "--probes", str(tiny / "p.jsonl"),
            "--output", str(out), "--steps", "1", "--no-progress", "--no-cache", "--threads", "1", *extra]


def _never_fitted(monkeypatch):
    import hf_mirror.pipeline

    def fitted(*args, **kwargs):
        raise AssertionError("a mirror was fitted")

    monkeypatch.setattr(hf_mirror.pipeline, "_mirrors_and_scan", fitted)


def test_duplicate_document_ids_are_refused_before_fitting(tiny, tmp_path, monkeypatch, capsys):
    _never_fitted(monkeypatch)
    corpus = tmp_path / "c.jsonl"
    ids = ["a", "b", "a", "c", "b", *[f"u{i}" for i in range(3000)], "c"]  # the last one read after several batches
    corpus.write_text("".join(json.dumps({"id": i, "text": f"text {n}"}) + "\n" for n, i in enumerate(ids)))
    assert main(_attribute(tiny, corpus, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "Duplicate document id 'a' (also 'b', 'c')" in err and "--id-column" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="a mirror was fitted"):  # running positions are unique: on to the fit
        main(_attribute(tiny, corpus, tmp_path / "positions", "--id-column", "none"))


def test_a_corpus_whose_texts_are_all_empty_is_refused(tiny, tmp_path, monkeypatch, capsys):
    _never_fitted(monkeypatch)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(["", "  ", "\n"])))
    assert main(_attribute(tiny, corpus, tmp_path / "out")) == 2
    assert "Every document of the corpus" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_probe_fields_nothing_reads_are_named_in_a_warning(tiny, tmp_path, caplog):
    probes = tmp_path / "p.jsonl"
    probes.write_text(json.dumps({"id": "p", "prompt": "a", "completon": " b", "note": 1}) + "\n")
    argv = _attribute(tiny, tiny / "c.jsonl", tmp_path / "out", "--max-new-tokens", "8")  # "completon": generated
    argv[argv.index("--probes") + 1] = str(probes)
    with caplog.at_level("WARNING", logger="hf_mirror.probes"):
        assert main(argv) == 0
    assert "probe field(s) 'completon', 'note' are not read (a probe is id, prompt, completion)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_mirror.probes"):
        assert main(_attribute(tiny, tiny / "c.jsonl", tmp_path / "out2")) == 0
    assert "probe field(s)" not in caplog.text


def test_document_ids_of_mixed_types_are_all_kept_as_strings(tiny, tmp_path):
    from hf_mirror import AttributionResult

    corpus = tmp_path / "c.jsonl"
    ids = ["0", 1, "2", "null", "1.50", 1.5, "abc"]
    corpus.write_text("".join(json.dumps({"id": i, "text": f"{i} keeps a red cat"}) + "\n" for i in ids))
    assert main(_attribute(tiny, corpus, tmp_path / "out", "--candidates", "all", "--top-k", "7")) == 0
    got = AttributionResult.load(tmp_path / "out").scores()["doc_id"].tolist()
    assert sorted(got) == sorted(["0", "1", "2", "null", "1.50", "1.5", "abc"])
    corpus.write_text("".join(json.dumps({"id": i, "text": f"{i} keeps a red cat"}) + "\n" for i in (0, 1, 2)))
    assert main(_attribute(tiny, corpus, tmp_path / "ints", "--top-k", "3")) == 0
    assert sorted(AttributionResult.load(tmp_path / "ints").scores()["doc_id"].tolist()) == [0, 1, 2]


def test_paths_spelled_another_way_are_the_same_run(tiny, tmp_path, monkeypatch, capsys):
    """./c.jsonl and its absolute path (and the output as ./out or absolute) resume the same run."""
    (tmp_path / "c.jsonl").write_text((tiny / "c.jsonl").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(_attribute(tiny, "./c.jsonl", "./out")) == 0
    manifest = (tmp_path / "out" / "hf_mirror.json").read_text()
    capsys.readouterr()
    assert main(_attribute(tiny, tmp_path / "c.jsonl", tmp_path / "out")) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "hf_mirror.json").read_text() == manifest
    assert main(_attribute(tiny, "c.jsonl", "out/")) == 0, capsys.readouterr().err


# ---- #27 item 5: one n-gram default for index, audit and provenance; "verbatim overlap" for given completions ----
def test_index_audit_and_provenance_share_one_ngram_default():
    import inspect

    from hf_mirror.cli import NGRAM_HELP
    from hf_mirror.provenance import InfiniGramIndex, NgramIndex, generation_provenance
    from hf_mirror.retrieval import build_index
    from hf_mirror.retrieval.ngram import NGRAM

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("index", "audit", "provenance"):
        flag = next(a for a in sub.choices[command]._actions if "--ngram" in a.option_strings)
        assert flag.default is None and flag.help == NGRAM_HELP  # resolved to NGRAM, or to a built --index's n
    assert f"default: {NGRAM} for every command" in NGRAM_HELP
    for function in (NgramIndex.build, InfiniGramIndex.build, build_index, generation_provenance):
        assert inspect.signature(function).parameters["n"].default == NGRAM, function


def test_provenance_reuses_an_index_built_on_defaults_and_names_a_mismatch(tiny, tmp_path, capsys):
    from hf_mirror.retrieval.ngram import NGRAM

    model, corpus, index = str(tiny / "model"), str(tiny / "c.jsonl"), tmp_path / "index"
    assert main(["index", "--model", model, "--corpus", corpus, "--output", str(index), "--no-progress"]) == 0
    manifest = (index / "manifest.json").read_text()
    prov = ["provenance", "--model", model, "--corpus", corpus, "--probes", str(tiny / "p.jsonl"), "--index",
            str(index), "--no-mirror", "--no-progress", "--threads", "1"]
    assert main([*prov, "--output", str(tmp_path / "p1")]) == 0  # defaults agree: no --ngram needed
    assert json.loads((tmp_path / "p1" / "provenance.json").read_text())["n"] == NGRAM
    capsys.readouterr()
    assert main([*prov, "--output", str(tmp_path / "p2"), "--ngram", "8"]) == 2
    err = capsys.readouterr().err
    assert f"holds {NGRAM}-grams and --ngram asks for 8: pass --ngram {NGRAM}" in err
    assert "delet" not in err and (index / "manifest.json").read_text() == manifest  # the index is valid: kept
    assert main([*prov, "--output", str(tmp_path / "p3"), "--ngram", str(NGRAM)]) == 0


def test_provenance_says_verbatim_overlap_for_a_given_completion(tiny, texts, tmp_path, capsys):
    long_doc = " ".join(texts[:4])
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "long", "text": long_doc}) + "\n"
                                      + json.dumps({"id": "other", "text": texts[30]}) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "given", "prompt": long_doc[:10], "completion": long_doc[10:]})
                                      + "\n" + json.dumps({"id": "own", "prompt": texts[30][:8]}) + "\n")
    assert main(["provenance", "--model", str(tiny / "model"), "--corpus", str(tmp_path / "c.jsonl"), "--probes",
                 str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "out"), "--no-mirror", "--no-progress",
                 "--max-new-tokens", "20", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "given: verbatim overlap with long (" in out and "given: memorized" not in out
    report = json.loads((tmp_path / "out" / "provenance.json").read_text())
    by_id = {r["id"]: r for r in report["items"]}
    assert by_id["given"]["verdict"] == "verbatim overlap" and not by_id["given"]["generated"]
    assert by_id["own"]["generated"] and by_id["own"]["verdict"] in ("memorized", "not memorized", "too short to check")
    assert "of the model's 1 generations memorized; 1 of 1 given completions overlap one document verbatim" in out
    page = (tmp_path / "out" / "provenance.html").read_text()
    assert "verbatim overlap</span> with document <b>long</b>" in page and "Memorization provenance" not in page
