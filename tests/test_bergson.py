"""bergson's EK-FAC and TrackStar (the optional ``bergson`` extra) as registry methods, on the planted-facts tiny
model: the memorised fact's source document ranks first, only completion tokens are in the probe loss, the result
is the other methods' AttributionResult, and ``hf-mirror attribute --method`` runs them."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys

import numpy as np
import pytest

from hf_mirror import AttributionResult, InputError, attribute, methods
from hf_mirror.baselines import METHODS
from hf_mirror.probes import IGNORE_INDEX, Probe, encode_probe
from hf_mirror.results import FILES
from hf_mirror.scoring import EVIDENCE_COLUMNS, TOPK_COLUMNS

pytestmark = pytest.mark.usefixtures("one_thread")
SKIP = "bergson is not installed (pip install 'hf-mirror[bergson]' && pip install --no-deps bergson==2.5.1)"
BERGSON = ("bergson_ekfac", "trackstar")


def needs_bergson():
    from hf_mirror.baselines.bergson import _bergson

    with contextlib.suppress(InputError):
        _bergson()  # the first import, with the root logger's configuration put back (bergson reconfigures it)
    return pytest.importorskip("bergson", reason=SKIP)


def fact_probes(planted) -> list[dict]:
    """The planted probes with their facts as completions (no generation needed)."""
    return [{**p, "completion": fact[len(p["prompt"]):]} for p, fact in zip(planted.probes(), planted.facts,
                                                                               strict=True)]


@pytest.fixture(scope="module", params=BERGSON)
def result(request, tiny_model, planted, tmp_path_factory):
    needs_bergson()
    import torch

    model, tok = tiny_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return attribute(model, [*planted.texts, "   "], fact_probes(planted), tokenizer=tok, method=request.param,
                         output_dir=tmp_path_factory.mktemp(request.param), show_progress=False)
    finally:
        torch.set_num_threads(threads)


def test_both_are_registry_methods_and_cli_choices():
    from hf_mirror.cli import build_parser

    assert set(BERGSON) <= set(METHODS) and set(BERGSON) <= set(methods.REGISTRY)
    attribute_parser = build_parser()._subparsers._group_actions[0].choices["attribute"]
    choices = next(a.choices for a in attribute_parser._actions if a.dest == "method")
    assert set(BERGSON) <= set(choices)


def test_importing_bergson_leaves_the_root_logger_alone():
    needs_bergson()
    from hf_mirror.baselines.bergson import _bergson

    root = logging.getLogger()
    before = root.handlers[:], root.level
    for name in [m for m in sys.modules if m == "bergson" or m.startswith("bergson.")]:
        sys.modules.pop(name)  # a fresh import runs bergson's logging.basicConfig(force=True) again
    _bergson()
    assert (root.handlers[:], root.level) == before


def test_without_bergson_the_error_says_how_to_install(monkeypatch, tiny_model, planted):
    monkeypatch.setitem(sys.modules, "bergson", None)  # import bergson -> ImportError
    model, tok = tiny_model
    with pytest.raises(InputError, match=r"--no-deps bergson==2\.5\.1"):
        attribute(model, planted.texts[:3], fact_probes(planted)[:1], tokenizer=tok, method="trackstar",
                  show_progress=False)


def test_the_source_document_ranks_first(result, planted):
    # measured: source first for 40/40 probes (bergson_ekfac) and 38/40 (trackstar)
    hits = [result.top(f"fact-{i}", 1)["doc_id"][0] == i for i in range(len(planted.names))]
    assert np.mean(hits) >= 0.9, f"{result.config['method']}: source first for only {np.mean(hits):.0%} of probes"
    scores = result.scores()
    own = scores[scores["probe_id"] == "fact-0"].set_index("doc_id")["score"]
    assert own[0] > 0 and own[0] > own.drop(0).max()  # positive = supports the probe


def test_the_result_is_the_other_methods_result(result, planted):
    loaded = AttributionResult.load(result.directory)
    for name in FILES.values():
        assert (loaded.directory / name).exists(), name
    assert list(loaded.topk.columns) == TOPK_COLUMNS and list(loaded.evidence.columns) == EVIDENCE_COLUMNS
    assert loaded.evidence.empty and loaded.config["method"] in BERGSON
    assert loaded.skipped == [{"doc_id": len(planted.texts), "reason": "empty or whitespace-only"}]
    assert len(loaded.scores()) == len(planted.names) * len(planted.texts)


def test_only_completion_tokens_are_labelled(tiny_model):
    """bergson's own tokenization of a prompt/completion row, under the template hf_mirror supplies."""
    needs_bergson()
    from hf_mirror.baselines.bergson import _bergson, chat_template, probe_rows

    _, tok = tiny_model
    tok = copy.deepcopy(tok)
    tok.chat_template = chat_template(tok)
    probe = Probe("p", "kalo keeps a", " red cat at home.")
    bg = _bergson()
    row = bg.tokenize(probe_rows(bg, tok, [probe], 128), args=bg.DataConfig(prompt_column="prompt",
                                                                             completion_column="completion"),
                      tokenizer=tok)
    ids, labels = row["input_ids"][0], row["labels"][0]
    n_prompt = len(encode_probe(tok, probe)["input_ids"][0]) - len(tok(probe.completion, add_special_tokens=False)
                                                                      ["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the start token and the prompt: not in the loss
    assert tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]) == probe.completion
    # a completion that does not start at a token boundary would label part of the prompt: refused
    with pytest.raises(InputError, match="boundary"):
        probe_rows(bg, tok, [Probe("q", "keeps a re", "d cat")], 128)


def test_options_are_checked_and_the_caller_keeps_its_model_and_tokenizer(tiny_model, planted):
    needs_bergson()
    import torch

    from hf_mirror.baselines.bergson import TrackStarBaseline

    model, tok = tiny_model
    probes = [Probe(**p) for p in fact_probes(planted)[:2]]
    with pytest.raises(InputError, match="token_batch_size"):
        # beyond the 128-token context
        TrackStarBaseline(model, tok, probes=probes, max_length=128, overlap=16, token_batch_size=4096)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = TrackStarBaseline(model, tok, probes=probes, max_length=128, overlap=16)
    try:
        assert scorer.workdir.exists() and tok.chat_template is None
    finally:
        scorer.close()
    assert not scorer.workdir.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_method(planted, tmp_path, capsys):
    needs_bergson()
    from hf_mirror.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"doc": f"d{i}", "text": t}) + "\n" for i, t in enumerate(planted.texts)))
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in fact_probes(planted)[:4]))
    rc = main(["attribute", "--method", "bergson_ekfac", "--model", str(planted.model_dir), "--corpus", str(corpus),
               "--id-column", "doc", "--probes", str(probes), "--output", str(tmp_path / "out"), "--no-progress",
               "--threads", "1"])
    assert rc == 0
    result = AttributionResult.load(tmp_path / "out")
    assert result.config["method"] == "bergson_ekfac"
    assert [result.top(f"fact-{i}", 1)["doc_id"][0] for i in range(4)] == ["d0", "d1", "d2", "d3"]
    assert "probe fact-0" in capsys.readouterr().out
