"""The method contract and its dispatcher: every method by name through one call, the same result type, the CLI's
choices; what a method declares it needs and supports, and the refusals of what it does not support."""

from __future__ import annotations

import copy
import logging
import re
import shutil

import numpy as np
import pytest

from hf_mirror import InputError, MirrorConfig, RankingConfig, ScanConfig, attribute, methods
from hf_mirror.baselines import METHODS, Scorer, attribute_baseline
from hf_mirror.cli import build_parser
from hf_mirror.corpus import Corpus
from hf_mirror.methods import Method, Request
from hf_mirror.pipeline import Mirror


def test_the_registry_is_the_one_list_of_methods():
    assert set(METHODS) == set(methods.BASELINES) == set(methods.REGISTRY) - {"mirror"}
    attribute_parser = build_parser()._subparsers._group_actions[0].choices["attribute"]
    choices = next(a.choices for a in attribute_parser._actions if a.dest == "method")
    assert list(choices) == list(methods.REGISTRY)
    assert methods.load("mirror") is Mirror
    with pytest.raises(InputError, match="Unknown method"):
        methods.load("tracin")


def _with_completions(planted, n: int) -> list[dict]:
    return [{**p, "completion": " " + f.split(" keeps a ")[1]}
            for p, f in zip(planted.probes()[:n], planted.facts[:n], strict=True)]


def test_attribute_dispatches_by_method(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    probes = _with_completions(planted, 4)
    result = attribute(model, planted.texts, probes, tokenizer=tok, output_dir=tmp_path / "bm25", method="bm25",
                       scan=ScanConfig(ranking=RankingConfig(top_k=3)), show_progress=False)
    assert result.config["method"] == "bm25"
    assert list(result.topk.columns[:4]) == ["probe_id", "rank", "doc_id", "score"]
    for i, p in enumerate(probes):
        assert result.top(p["id"], 1)["doc_id"][0] == i
    with pytest.raises(InputError, match="Unknown option"):
        attribute(model, planted.texts, probes, tokenizer=tok, output_dir=tmp_path / "m", k1=1.2)


def test_a_method_without_a_model_never_loads_the_weights(planted, tmp_path):
    """bm25 declares needs_model = False: with completions given, a model directory without weights is enough."""
    light = tmp_path / "no-weights"
    shutil.copytree(planted.model_dir, light)
    for f in light.glob("*.safetensors"):
        f.unlink()
    probes = _with_completions(planted, 2)
    result = attribute(str(light), planted.texts, probes, output_dir=tmp_path / "out", method="bm25",
                       show_progress=False)
    assert result.top(probes[0]["id"], 1)["doc_id"][0] == 0 and result.config["device"] is None


def test_every_method_implements_the_contract():
    """The mirror and every baseline are Method subclasses under their registry name, and say what they support."""
    for name in methods.REGISTRY:
        cls = methods.load(name)
        assert issubclass(cls, Method) and cls.name == name
        assert set(cls.capabilities()) == {"needs_model", "needs_grad", "multi_process", "resumes", "token_evidence"}
    assert Mirror.capabilities() == dict.fromkeys(Mirror.capabilities(), True)
    for name in methods.BASELINES:
        cls = methods.load(name)
        assert issubclass(cls, Scorer)
        assert not (cls.multi_process or cls.resumes or cls.token_evidence), name
    assert not METHODS["bm25"].needs_model and not METHODS["bm25"].needs_grad
    assert METHODS["gradsim"].needs_grad and METHODS["ekfac"].needs_grad and not METHODS["embedding"].needs_grad
    with pytest.raises(TypeError):
        Scorer(None, None, [], 8, 1)  # score() is the scorer's own


class Constant(Scorer):
    """A method from outside the package: each document scores its position in the corpus, times ``value``."""

    name = "constant"
    needs_model = False

    def __init__(self, model, tokenizer, probes, max_length, overlap, *, value: float = 1.0) -> None:
        self.n, self.value = len(probes), value

    def score(self, documents):
        for doc in documents:
            yield doc, np.full(self.n, self.value * (doc.seq + 1))


@pytest.fixture
def constant():
    methods.register("constant", f"{__name__}:Constant")  # the public extension point: no file of the package changes
    yield Constant
    del methods.REGISTRY["constant"]


def test_a_registered_method_runs_through_the_one_dispatcher(constant, planted, tmp_path, tiny_model):
    """Adding a method is a Method subclass and one registry entry (#28: at most 2 files; here the test module alone):
    attribute() runs it like any baseline."""
    _, tok = tiny_model
    probes = _with_completions(planted, 2)
    result = attribute(planted.model_dir, planted.texts[:5], probes, tokenizer=copy.deepcopy(tok), method="constant",
                       output_dir=tmp_path / "c", scan=ScanConfig(ranking=RankingConfig(top_k=2)), show_progress=False,
                       value=2.0)
    assert result.config["method"] == "constant" and result.config["options"] == {"value": 2.0}
    assert list(result.top(probes[0]["id"])["doc_id"]) == [4, 3]
    assert list(result.top(probes[0]["id"])["score"]) == [10.0, 8.0]
    with pytest.raises(InputError, match=r"Unknown option\(s\) \['k1'\] for baseline 'constant'"):
        attribute(planted.model_dir, planted.texts[:5], probes, method="constant", output_dir=tmp_path / "d", k1=1.0)
    assert "constant" in next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["attribute"]
                              ._actions if a.dest == "method")


def test_register_refuses_a_taken_name_and_load_refuses_what_is_not_a_method(monkeypatch):
    with pytest.raises(InputError, match="already registered as 'bm25'"):
        methods.register("bm25", "somewhere:Else")
    with pytest.raises(InputError, match="module:Class"):
        methods.register("new", "no_colon")
    monkeypatch.setitem(methods.REGISTRY, "plain", "hf_mirror.pipeline:attribute")  # a function, not a Method
    with pytest.raises(TypeError, match="not a Method subclass"):
        methods.load("plain")
    monkeypatch.setitem(methods.REGISTRY, "renamed", "hf_mirror.baselines.bm25:BM25Baseline")  # named bm25
    with pytest.raises(TypeError, match="named so"):
        methods.load("renamed")


@pytest.mark.parametrize("method", sorted(methods.BASELINES))
def test_several_processes_are_refused_for_a_one_process_method(method, monkeypatch, tmp_path):
    """Under accelerate launch / torchrun (WORLD_SIZE > 1) a baseline is refused before any input is read, naming the
    method and the mirror, which scores one shard per process; the mirror itself is not refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"Method '{method}' runs in one process.*--method mirror"):
        attribute("no/such/model", "no/such/corpus.jsonl", "no/such/probes.jsonl", output_dir=out, method=method)
    with pytest.raises(InputError, match=rf"Method '{method}' runs in one process"):
        attribute_baseline(method, "no/such/model", "no/such/corpus.jsonl", "no/such/probes.jsonl", output_dir=out)
    assert not out.exists()
    methods.check(methods.load("mirror"))  # multi-process: no refusal
    methods.check(methods.load(method), processes=1)


def test_a_request_is_keyword_only():
    with pytest.raises(TypeError):
        Request("model", "corpus", "probes")  # type: ignore[misc]
    assert Request(model="m", corpus="c", probes="p").options == {}


def test_no_token_evidence_is_refused_naming_the_mirror(planted, tmp_path, tiny_model):
    _, tok = tiny_model
    probes = _with_completions(planted, 1)
    result = attribute(planted.model_dir, planted.texts[:4], probes, tokenizer=copy.deepcopy(tok), method="bm25",
                       output_dir=tmp_path / "b", show_progress=False)
    assert not result.has_token_evidence
    with pytest.raises(InputError, match=r"\(bm25\) has no token-level evidence.*--method mirror keeps the per-token"):
        result.token_deltas(probes[0]["id"], result.top(probes[0]["id"], 1)["doc_id"][0])


def test_a_rerun_of_a_method_that_does_not_resume_says_it_starts_over(planted, tmp_path, tiny_model, caplog):
    _, tok = tiny_model
    probes = _with_completions(planted, 1)
    run = dict(tokenizer=copy.deepcopy(tok), method="bm25", output_dir=tmp_path / "b", show_progress=False)
    first = attribute(planted.model_dir, planted.texts[:4], probes, **run).scores()
    with caplog.at_level(logging.WARNING, logger="hf_mirror.baselines.scorer"):
        again = attribute(planted.model_dir, planted.texts[:4], probes, **run).scores()
    assert "bm25 does not resume" in caplog.text and "--method mirror resumes" in caplog.text
    assert first.equals(again)


def test_every_method_records_the_run_alike(planted, tmp_path, tiny_model):
    """config.json: the mirror and the baselines write the fields every run has (runs.run_record) under the same keys,
    in the same order, alike where they ran alike; each method adds only its own."""
    model, tok = tiny_model
    corpus = Corpus(planted.texts[:6])
    run = dict(tokenizer=tok, scan=ScanConfig(ranking=RankingConfig(top_k=2)), show_progress=False)
    mirror = attribute(model, corpus, _with_completions(planted, 2), output_dir=tmp_path / "m",
                       mirror=MirrorConfig(fit="steps", steps=1), **run).config
    gradsim = attribute(model, corpus, _with_completions(planted, 2), output_dir=tmp_path / "g", method="gradsim",
                        **run).config
    common = ["model", "model_kwargs", "corpus", "device", "num_processes", "run_key", "versions", "torch_dtype",
              "stats"]
    assert list(mirror) == [*common[:3], "mirror", "scan", "control_probes", "candidate_documents", "retrieval",
                            *common[3:], "regime"]
    assert list(gradsim) == ["method", *common[:3], "options", "scan", *common[3:]]
    for key in common:
        if key not in ("run_key", "stats"):
            assert mirror[key] == gradsim[key], key
    assert mirror["device"] == "cpu" and mirror["torch_dtype"] == "torch.float32" and mirror["num_processes"] == 1
    keys = [c["run_key"] for c in (mirror, gradsim)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", k) for k in keys) and keys[0] != keys[1]
