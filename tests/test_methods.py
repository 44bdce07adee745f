"""The method registry: every method by name through one call, the same result type, the CLI's choices."""

from __future__ import annotations

import shutil

import pytest

from hf_mirror import InputError, ScanConfig, attribute, methods
from hf_mirror.baselines import METHODS
from hf_mirror.cli import build_parser


def test_the_registry_is_the_one_list_of_methods():
    assert set(METHODS) == set(methods.BASELINES) == set(methods.REGISTRY) - {"mirror"}
    attribute_parser = build_parser()._subparsers._group_actions[0].choices["attribute"]
    choices = next(a.choices for a in attribute_parser._actions if a.dest == "method")
    assert list(choices) == list(methods.REGISTRY)
    assert methods.load("mirror") is attribute
    with pytest.raises(InputError, match="Unknown method"):
        methods.load("tracin")


def _with_completions(planted, n: int) -> list[dict]:
    return [{**p, "completion": " " + f.split(" keeps a ")[1]}
            for p, f in zip(planted.probes()[:n], planted.facts[:n], strict=True)]


def test_attribute_dispatches_by_method(tiny_model, planted, tmp_path):
    model, tok = tiny_model
    probes = _with_completions(planted, 4)
    result = attribute(model, planted.texts, probes, tokenizer=tok, output_dir=tmp_path / "bm25", method="bm25",
                       scan=ScanConfig(top_k=3), show_progress=False)
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
